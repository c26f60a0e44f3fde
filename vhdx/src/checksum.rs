//! CRC-32C (Castagnoli) as VHDX uses it: headers, region tables and log entries carry the
//! checksum of the whole structure in a 4-byte field at offset 4, computed with that field as
//! zero (docs/vhdx.md, "Checksums"). The arithmetic is the `crc32c` crate's; the field handling
//! stays here, explicit, rather than hidden in a parser.

/// Where the checksum field sits in every checksummed structure.
pub const CHECKSUM_OFFSET: usize = 4;

/// CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// CRC-32C of `data` with the 4 bytes at `skip` treated as zero (the checksum field).
pub fn crc32c_skip(data: &[u8], skip: usize) -> u32 {
    let c = crc32c::crc32c(&data[..skip]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &data[skip + 4..])
}

/// The checksum stored in `structure` and the one its bytes have.
pub fn stored_and_computed(structure: &[u8]) -> (u32, u32) {
    let mut field = [0u8; 4];
    field.copy_from_slice(&structure[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4]);
    (
        u32::from_le_bytes(field),
        crc32c_skip(structure, CHECKSUM_OFFSET),
    )
}

/// Computes the checksum of `structure` (whole) and stores it in its field.
pub fn seal(structure: &mut [u8]) {
    let c = crc32c_skip(structure, CHECKSUM_OFFSET);
    structure[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].copy_from_slice(&c.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        let mut b = b"xxxx123456789".to_vec();
        b[..4].fill(0);
        assert_eq!(crc32c_skip(&b, 0), crc32c(&b));
    }

    #[test]
    fn sealed_structure_verifies() {
        let mut b = vec![0x5au8; 4096];
        seal(&mut b);
        let (stored, computed) = stored_and_computed(&b);
        assert_eq!(stored, computed);
        b[100] ^= 1;
        let (stored, computed) = stored_and_computed(&b);
        assert_ne!(stored, computed);
    }
}

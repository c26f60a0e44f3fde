//! The file type identifier and the two headers: their layout, choosing the current header,
//! and updating both copies so one valid, newest header always survives (docs/vhdx.md,
//! "Headers").

use binrw::binrw;
use disk::{Error, Guid, Result, Storage};

use crate::checksum;
use crate::codec::{decode, encode, guid_from_disk, guid_to_disk};
use crate::format::{HEADER1_OFFSET, HEADER2_OFFSET, HEADER_SIZE};
use crate::io_err;

/// The file type identifier at offset 0: the signature and a free-form creator string.
#[binrw]
#[brw(little, magic = b"vhdxfile")]
#[derive(Clone, Debug)]
pub struct FileIdentifier {
    /// UTF-16, zero-padded.
    pub creator: [u16; 256],
}

impl FileIdentifier {
    pub fn new(creator: &str) -> FileIdentifier {
        let mut c = [0u16; 256];
        for (d, s) in c.iter_mut().zip(creator.encode_utf16()) {
            *d = s;
        }
        FileIdentifier { creator: c }
    }

    /// The 64 KiB the identifier occupies.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; 64 * 1024];
        encode(self, &mut b);
        b
    }
}

/// A header (checksummed over [`HEADER_SIZE`] bytes; the bytes after these fields are zero).
#[binrw]
#[brw(little, magic = b"head")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// CRC-32C of the whole 4 KiB (see checksum.rs); filled in by [`Header::serialize`].
    #[br(temp)]
    #[bw(calc = 0u32)]
    checksum: u32,
    pub sequence: u64,
    #[br(map = guid_from_disk)]
    #[bw(map = guid_to_disk)]
    pub file_write_guid: Guid,
    #[br(map = guid_from_disk)]
    #[bw(map = guid_to_disk)]
    pub data_write_guid: Guid,
    #[br(map = guid_from_disk)]
    #[bw(map = guid_to_disk)]
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// Parses and validates the header bytes `b` (at least [`HEADER_SIZE`]) found at `offset`.
    pub fn parse(b: &[u8], offset: u64) -> Result<Header> {
        let h: Header = decode(b)
            .map_err(|_| Error::corrupt("VHDX header", offset, "signature is not 'head'"))?;
        let (stored, calc) = checksum::stored_and_computed(&b[..HEADER_SIZE]);
        if stored != calc {
            return Err(Error::corrupt(
                "VHDX header",
                offset,
                format!("checksum {stored:#010x}, expected {calc:#010x}"),
            ));
        }
        if h.version != 1 {
            return Err(Error::corrupt(
                "VHDX header",
                offset,
                format!("version {}, expected 1", h.version),
            ));
        }
        Ok(h)
    }

    /// The [`HEADER_SIZE`] bytes of this header, checksum included.
    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        encode(self, &mut b);
        checksum::seal(&mut b);
        b
    }
}

/// The current header and where it lives.
#[derive(Debug)]
pub(crate) struct HeaderState {
    pub current: Header,
    /// 0: header 1 (64 KiB) is current; 1: header 2.
    pub slot: usize,
}

pub(crate) fn header_offset(slot: usize) -> u64 {
    if slot == 0 {
        HEADER1_OFFSET
    } else {
        HEADER2_OFFSET
    }
}

/// Reads both headers and picks the current one. Returns the state and the per-slot results.
pub(crate) fn read_headers(s: &dyn Storage) -> Result<(HeaderState, [Option<Header>; 2])> {
    let read = |slot: usize| -> Result<Header> {
        let off = header_offset(slot);
        let mut b = vec![0u8; HEADER_SIZE];
        s.read_at(&mut b, off)
            .map_err(io_err(format!("cannot read VHDX header at {off:#x}")))?;
        Header::parse(&b, off)
    };
    let (r1, r2) = (read(0), read(1));
    let both = [r1.as_ref().ok().cloned(), r2.as_ref().ok().cloned()];
    let (current, slot) = choose_current(r1, r2)?;
    Ok((HeaderState { current, slot }, both))
}

/// The header with the higher sequence number wins; a header that failed to read or validate
/// loses to a valid one.
fn choose_current(r1: Result<Header>, r2: Result<Header>) -> Result<(Header, usize)> {
    Ok(match (r1, r2) {
        (Ok(a), Ok(b)) => {
            if a.sequence > b.sequence {
                (a, 0)
            } else if b.sequence > a.sequence {
                (b, 1)
            } else if a == b {
                // Disk2vhd writes two identical headers with equal sequence numbers.
                (a, 0)
            } else {
                return Err(Error::corrupt(
                    "VHDX header",
                    HEADER1_OFFSET,
                    format!(
                        "both headers have sequence number {} but differ",
                        a.sequence
                    ),
                ));
            }
        }
        (Ok(a), Err(_)) => (a, 0),
        (Err(_), Ok(b)) => (b, 1),
        (Err(e1), Err(e2)) => {
            return Err(Error::corrupt(
                "VHDX header",
                HEADER1_OFFSET,
                format!("no valid header: header 1: {e1}; header 2: {e2}"),
            ))
        }
    })
}

/// Writes `nh` to the non-current slot, flushes, then to the other slot, flushes: both copies
/// end up valid and the newest is always intact.
pub(crate) fn write_header_pair(
    s: &dyn Storage,
    hs: &mut HeaderState,
    mut nh: Header,
) -> Result<()> {
    for _ in 0..2 {
        nh.sequence = hs.current.sequence + 1;
        let slot = 1 - hs.slot;
        let off = header_offset(slot);
        s.write_at(&nh.serialize(), off)
            .map_err(io_err(format!("cannot write VHDX header at {off:#x}")))?;
        s.flush().map_err(io_err("cannot flush VHDX header"))?;
        hs.current = nh.clone();
        hs.slot = slot;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(sequence: u64) -> Header {
        Header {
            sequence,
            file_write_guid: Guid::from_str_const("11111111-2222-3333-4444-555555555555"),
            data_write_guid: Guid::NIL,
            log_guid: Guid::NIL,
            log_version: 0,
            version: 1,
            log_length: 1 << 20,
            log_offset: 1 << 20,
        }
    }

    #[test]
    fn layout_round_trips_with_checksum() {
        let h = header(7);
        let b = h.serialize();
        assert_eq!(&b[0..4], b"head");
        assert_eq!(b[8], 7, "sequence at offset 8");
        // The first GUID field is in Windows byte order at offset 16.
        assert_eq!(&b[16..20], &[0x11, 0x11, 0x11, 0x11]);
        assert_eq!(&b[20..22], &[0x22, 0x22]);
        assert_eq!(b[66], 1, "version at offset 66");
        assert_eq!(Header::parse(&b, 0).unwrap(), h);
        let mut torn = b.clone();
        torn[4000] = 1;
        let e = Header::parse(&torn, 0).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        let mut bad = b;
        bad[0] = b'x';
        let e = Header::parse(&bad, 0).unwrap_err().to_string();
        assert!(e.contains("signature"), "{e}");
    }

    #[test]
    fn the_newer_valid_header_is_current() {
        let bad = || Err(Error::corrupt("VHDX header", 0, "x"));
        assert_eq!(choose_current(Ok(header(3)), Ok(header(4))).unwrap().1, 1);
        assert_eq!(choose_current(Ok(header(5)), Ok(header(4))).unwrap().1, 0);
        assert_eq!(choose_current(Ok(header(3)), bad()).unwrap().1, 0);
        assert_eq!(choose_current(bad(), Ok(header(3))).unwrap().1, 1);
        // Equal and identical (Disk2vhd): the first; equal but different: corrupt.
        assert_eq!(choose_current(Ok(header(3)), Ok(header(3))).unwrap().1, 0);
        let mut other = header(3);
        other.log_offset = 2 << 20;
        assert!(choose_current(Ok(header(3)), Ok(other)).is_err());
        assert!(choose_current(bad(), bad()).is_err());
    }
}

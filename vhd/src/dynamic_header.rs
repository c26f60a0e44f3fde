//! The 1024-byte dynamic disk header of dynamic and differencing disks, at the footer's
//! `data_offset` (docs/vhd.md, "Dynamic disk header").

use std::io::Cursor;

use binrw::{binrw, BinRead, BinWrite};
use disk::Guid;

use crate::footer::checksum;
use crate::locator::LocatorEntry;

pub const HEADER_SIZE: usize = 1024;
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Offsets of fields within the header, for error messages.
pub const MAX_TABLE_ENTRIES_FIELD: u64 = 28;
pub const BLOCK_SIZE_FIELD: u64 = 32;
pub const LOCATORS_FIELD: u64 = 576;
/// UTF-16 units of the parent name field.
pub const PARENT_NAME_UNITS: usize = 256;
/// Parent locator entries in the header.
pub const LOCATOR_SLOTS: usize = 8;

#[binrw]
#[brw(big, magic = b"cxsparse")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynHeader {
    /// Unused; all ones.
    pub data_offset: u64,
    /// File offset of the BAT.
    pub table_offset: u64,
    pub version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    /// As read; [`DynHeader::to_bytes`] computes a fresh one.
    pub stored_checksum: u32,
    #[br(map = Guid::from_rfc_bytes)]
    #[bw(map = |g: &Guid| g.to_rfc_bytes())]
    pub parent_unique_id: Guid,
    pub parent_timestamp: u32,
    pub reserved1: u32,
    /// Raw UTF-16BE code units of the parent name, up to the first NUL (unpaired surrogates
    /// kept).
    #[br(map = |units: [u16; PARENT_NAME_UNITS]| until_nul(&units))]
    #[bw(map = |name: &Vec<u16>| name_field(name))]
    pub parent_name: Vec<u16>,
    /// Followed by 256 reserved bytes (written as zeros).
    #[brw(pad_after = 256)]
    pub locators: [LocatorEntry; LOCATOR_SLOTS],
}

fn until_nul(units: &[u16]) -> Vec<u16> {
    let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
    units[..end].to_vec()
}

fn name_field(name: &[u16]) -> [u16; PARENT_NAME_UNITS] {
    let mut f = [0u16; PARENT_NAME_UNITS];
    for (d, s) in f.iter_mut().zip(name) {
        *d = *s;
    }
    f
}

impl DynHeader {
    /// A header for a new image: BAT at `table_offset`, no parent.
    pub fn new(table_offset: u64, max_table_entries: u32, block_size: u32) -> DynHeader {
        DynHeader {
            data_offset: u64::MAX,
            table_offset,
            version: HEADER_VERSION,
            max_table_entries,
            block_size,
            stored_checksum: 0,
            parent_unique_id: Guid::NIL,
            parent_timestamp: 0,
            reserved1: 0,
            parent_name: Vec::new(),
            locators: Default::default(),
        }
    }

    /// Parses 1024 bytes; only the cookie is required here (`None` when it is wrong).
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Option<DynHeader> {
        DynHeader::read(&mut Cursor::new(&b[..])).ok()
    }

    /// The checksum `raw` (the bytes this header was parsed from) should carry.
    pub fn computed_checksum(&self, raw: &[u8; HEADER_SIZE]) -> u32 {
        checksum(raw, self.stored_checksum)
    }

    pub fn checksum_ok(&self, raw: &[u8; HEADER_SIZE]) -> bool {
        self.computed_checksum(raw) == self.stored_checksum
    }

    /// Serialises with a freshly computed checksum.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut h = self.clone();
        h.stored_checksum = 0;
        let mut b = [0u8; HEADER_SIZE];
        h.write_into(&mut b);
        h.stored_checksum = checksum(&b, 0);
        h.write_into(&mut b);
        b
    }

    fn write_into(&self, b: &mut [u8; HEADER_SIZE]) {
        self.write(&mut Cursor::new(&mut b[..]))
            .expect("a dynamic header fits its 1024 bytes");
    }

    pub fn parent_name_lossy(&self) -> String {
        String::from_utf16_lossy(&self.parent_name)
    }

    /// File offset of locator entry `slot` when the header is at `header_offset`.
    pub fn locator_field(header_offset: u64, slot: usize) -> u64 {
        header_offset + LOCATORS_FIELD + (LocatorEntry::SIZE * slot) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_the_documented_one() {
        let mut h = DynHeader::new(1536, 16, 2 << 20);
        h.parent_unique_id = Guid::from_str_const("00112233-4455-6677-8899-aabbccddeeff");
        h.parent_name = "p.vhd".encode_utf16().collect();
        h.locators[1].code = 0x5732_7275;
        h.locators[1].data_offset = 0x1234;
        let b = h.to_bytes();
        assert_eq!(&b[0..8], b"cxsparse");
        assert_eq!(b[8..16], [0xFF; 8]);
        assert_eq!(b[16..24], 1536u64.to_be_bytes());
        let at = MAX_TABLE_ENTRIES_FIELD as usize;
        assert_eq!(b[at..at + 4], 16u32.to_be_bytes());
        let at = BLOCK_SIZE_FIELD as usize;
        assert_eq!(b[at..at + 4], (2u32 << 20).to_be_bytes());
        assert_eq!(b[40..44], [0x00, 0x11, 0x22, 0x33]);
        // UTF-16 big-endian name.
        assert_eq!(b[64..68], [0, b'p', 0, b'.']);
        let at = DynHeader::locator_field(0, 1) as usize;
        assert_eq!(b[at..at + 4], *b"W2ru");
        assert_eq!(b[at + 16..at + 24], 0x1234u64.to_be_bytes());
        assert!(b[768..].iter().all(|&x| x == 0));
        let back = DynHeader::parse(&b).unwrap();
        assert!(back.checksum_ok(&b));
        assert_eq!(back.parent_name_lossy(), "p.vhd");
        assert_eq!(back.to_bytes(), b);
    }

    #[test]
    fn a_full_length_name_has_no_terminator() {
        let mut h = DynHeader::new(1536, 1, 4096);
        h.parent_name = vec![0x41; PARENT_NAME_UNITS];
        let back = DynHeader::parse(&h.to_bytes()).unwrap();
        assert_eq!(back.parent_name.len(), PARENT_NAME_UNITS);
    }
}

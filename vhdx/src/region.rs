//! The region table: where the BAT and the metadata region are (docs/vhdx.md, "Region table").

use binrw::binrw;
use disk::{Error, Guid, Result};

use crate::checksum;
use crate::codec::{decode, encode, guid_from_disk, guid_to_disk};
use crate::format::{MIB, RT_SIZE};

pub const GUID_BAT: Guid = Guid::from_str_const("2DC27766-F623-4200-9D64-115E9BFD4A08");
pub const GUID_METADATA: Guid = Guid::from_str_const("8B7CA206-4790-4B9A-B8FE-575F050F886E");

/// At most this many entries fit the 64 KiB table.
const MAX_ENTRIES: u32 = 2047;

/// The table's first 16 bytes (checksummed over [`RT_SIZE`] bytes).
#[binrw]
#[brw(little, magic = b"regi")]
struct RegionTableHeader {
    /// CRC-32C of the whole table (see checksum.rs), filled in after writing.
    #[br(temp)]
    #[bw(calc = 0u32)]
    checksum: u32,
    entry_count: u32,
    reserved: u32,
}

/// One entry (32 bytes, from offset 16).
#[binrw]
#[brw(little)]
#[derive(Clone, Debug)]
pub struct RegionEntry {
    #[br(map = guid_from_disk)]
    #[bw(map = guid_to_disk)]
    pub guid: Guid,
    pub offset: u64,
    pub length: u32,
    /// Bit 0 of a 32-bit field: a reader that does not know the region must refuse the file.
    #[br(map = |f: u32| f & 1 != 0)]
    #[bw(map = |r: &bool| *r as u32)]
    pub required: bool,
}

const ENTRY_SIZE: usize = 32;
const ENTRIES_AT: usize = 16;

#[derive(Clone, Debug)]
pub struct RegionTable {
    pub bat_offset: u64,
    pub bat_length: u32,
    pub meta_offset: u64,
    pub meta_length: u32,
    pub entries: Vec<RegionEntry>,
}

impl RegionTable {
    /// Parses and validates the table bytes `b` (at least [`RT_SIZE`]) found at `offset` of a
    /// file of `file_len` bytes.
    pub fn parse(b: &[u8], offset: u64, file_len: u64) -> Result<RegionTable> {
        let corrupt = |d: String| Error::corrupt("VHDX region table", offset, d);
        let head: RegionTableHeader =
            decode(b).map_err(|_| corrupt("signature is not 'regi'".into()))?;
        let (stored, calc) = checksum::stored_and_computed(&b[..RT_SIZE]);
        if stored != calc {
            return Err(corrupt(format!(
                "checksum {stored:#010x}, expected {calc:#010x}"
            )));
        }
        let count = head.entry_count;
        if count > MAX_ENTRIES {
            return Err(corrupt(format!("entry count {count} exceeds 2047")));
        }
        let mut entries = Vec::new();
        let (mut bat, mut meta) = (None, None);
        for i in 0..count as usize {
            let at = ENTRIES_AT + i * ENTRY_SIZE;
            let e: RegionEntry = decode(&b[at..at + ENTRY_SIZE])
                .map_err(|err| corrupt(format!("entry {i}: {err}")))?;
            if !e.offset.is_multiple_of(MIB)
                || e.offset < MIB
                || !(e.length as u64).is_multiple_of(MIB)
            {
                return Err(corrupt(format!(
                    "entry {i} ({}) offset {:#x} length {:#x} not 1 MiB aligned",
                    e.guid, e.offset, e.length
                )));
            }
            let end = e.offset.saturating_add(e.length as u64);
            if e.guid == GUID_BAT || e.guid == GUID_METADATA {
                if end > file_len {
                    return Err(corrupt(format!(
                        "region {} at {:#x}+{:#x} lies past end of file ({file_len})",
                        e.guid, e.offset, e.length
                    )));
                }
                let slot = if e.guid == GUID_BAT {
                    &mut bat
                } else {
                    &mut meta
                };
                if slot.is_some() {
                    return Err(corrupt(format!("duplicate region {}", e.guid)));
                }
                *slot = Some((e.offset, e.length));
            } else if e.required {
                return Err(Error::Unsupported(format!(
                    "VHDX region {} is marked required but is unknown to this implementation",
                    e.guid
                )));
            }
            entries.push(e);
        }
        // Regions must not overlap each other.
        for (i, a) in entries.iter().enumerate() {
            for bb in entries.iter().skip(i + 1) {
                let ae = a.offset + a.length as u64;
                let be = bb.offset + bb.length as u64;
                if a.offset < be && bb.offset < ae {
                    return Err(corrupt(format!(
                        "regions {} and {} overlap",
                        a.guid, bb.guid
                    )));
                }
            }
        }
        let (bat_offset, bat_length) = bat.ok_or_else(|| corrupt("no BAT region".into()))?;
        let (meta_offset, meta_length) =
            meta.ok_or_else(|| corrupt("no metadata region".into()))?;
        if meta_length == 0 || bat_length == 0 {
            return Err(corrupt("BAT or metadata region has length 0".into()));
        }
        Ok(RegionTable {
            bat_offset,
            bat_length,
            meta_offset,
            meta_length,
            entries,
        })
    }

    /// The [`RT_SIZE`] bytes of this table, checksum included.
    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; RT_SIZE];
        encode(
            &RegionTableHeader {
                entry_count: self.entries.len() as u32,
                reserved: 0,
            },
            &mut b,
        );
        for (i, e) in self.entries.iter().enumerate() {
            let at = ENTRIES_AT + i * ENTRY_SIZE;
            encode(e, &mut b[at..at + ENTRY_SIZE]);
        }
        checksum::seal(&mut b);
        b
    }

    pub fn new(bat_offset: u64, bat_length: u32, meta_offset: u64, meta_length: u32) -> Self {
        RegionTable {
            bat_offset,
            bat_length,
            meta_offset,
            meta_length,
            entries: vec![
                RegionEntry {
                    guid: GUID_BAT,
                    offset: bat_offset,
                    length: bat_length,
                    required: true,
                },
                RegionEntry {
                    guid: GUID_METADATA,
                    offset: meta_offset,
                    length: meta_length,
                    required: true,
                },
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_constants_have_the_windows_byte_layout() {
        assert_eq!(
            GUID_BAT.to_windows_bytes(),
            [
                0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD,
                0x4A, 0x08
            ]
        );
        let s = GUID_BAT.to_string();
        assert_eq!(s, "2dc27766-f623-4200-9d64-115e9bfd4a08");
        assert_eq!(Guid::parse(&format!("{{{s}}}")), Some(GUID_BAT));
        assert_eq!(Guid::parse("nonsense"), None);
    }

    #[test]
    fn table_round_trips() {
        let t = RegionTable::new(3 * MIB, MIB as u32, 2 * MIB, MIB as u32);
        let b = t.serialize();
        assert_eq!(&b[0..4], b"regi");
        assert_eq!(b[8], 2, "entry count at offset 8");
        assert_eq!(&b[16..32], &GUID_BAT.to_windows_bytes());
        assert_eq!(b[44], 1, "required flag at offset 16 + 28");
        let p = RegionTable::parse(&b, 0, 4 * MIB).unwrap();
        assert_eq!((p.bat_offset, p.bat_length), (3 * MIB, MIB as u32));
        assert_eq!((p.meta_offset, p.meta_length), (2 * MIB, MIB as u32));
        assert!(p.entries.iter().all(|e| e.required));
        // Past the end of the file.
        assert!(RegionTable::parse(&b, 0, 3 * MIB).is_err());
    }
}

//! The parent locator metadata item of a differencing image: a type GUID and UTF-16 key/value
//! pairs (docs/vhdx.md, "Parent locator").

use binrw::binrw;
use disk::{Error, Guid, Result};

use crate::codec::{decode, encode, encode_vec, guid_from_disk, guid_to_disk};

pub const GUID_LOCATOR_TYPE_VHDX: Guid =
    Guid::from_str_const("B04AEFB7-D19E-4A81-B789-25B8E9445913");

/// The item's first 20 bytes.
#[binrw]
#[brw(little)]
struct LocatorHeader {
    #[br(map = guid_from_disk)]
    #[bw(map = guid_to_disk)]
    locator_type: Guid,
    reserved: u16,
    key_value_count: u16,
}

const HEADER_SIZE: usize = 20;

/// One key/value entry (12 bytes, from offset 20): where the UTF-16 key and value are within
/// the item.
#[binrw]
#[brw(little)]
struct KeyValueEntry {
    key_offset: u32,
    value_offset: u32,
    key_length: u16,
    value_length: u16,
}

const ENTRY_SIZE: usize = 12;

#[derive(Clone, Debug, Default)]
pub struct ParentLocator {
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Parses the item bytes `b` found at file offset `offset`.
    pub fn parse(b: &[u8], offset: u64) -> Result<ParentLocator> {
        let corrupt = |d: String| Error::corrupt("VHDX parent locator", offset, d);
        if b.len() < HEADER_SIZE {
            return Err(corrupt(format!("length {} is below 20", b.len())));
        }
        let head: LocatorHeader = decode(b).map_err(|e| corrupt(e.to_string()))?;
        if head.locator_type != GUID_LOCATOR_TYPE_VHDX {
            return Err(Error::Unsupported(format!(
                "VHDX parent locator type {} (only the VHDX locator type is known)",
                head.locator_type
            )));
        }
        let count = head.key_value_count as usize;
        if HEADER_SIZE + count * ENTRY_SIZE > b.len() {
            return Err(corrupt(format!(
                "{count} key/value entries do not fit in {} bytes",
                b.len()
            )));
        }
        let mut entries = Vec::new();
        for i in 0..count {
            let at = HEADER_SIZE + i * ENTRY_SIZE;
            let kv: KeyValueEntry =
                decode(&b[at..at + ENTRY_SIZE]).map_err(|e| corrupt(format!("entry {i}: {e}")))?;
            let get = |off: usize, len: usize, what: &str| -> Result<String> {
                if off.checked_add(len).is_none_or(|e| e > b.len()) || !len.is_multiple_of(2) {
                    return Err(corrupt(format!(
                        "entry {i} {what} at {off}+{len} outside the {} byte item",
                        b.len()
                    )));
                }
                let u: Vec<u16> = b[off..off + len]
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                Ok(String::from_utf16_lossy(&u))
            };
            let k = get(kv.key_offset as usize, kv.key_length as usize, "key")?;
            let v = get(kv.value_offset as usize, kv.value_length as usize, "value")?;
            if entries.iter().any(|(ek, _): &(String, String)| *ek == k) {
                return Err(corrupt(format!("duplicate key {k:?}")));
            }
            entries.push((k, v));
        }
        Ok(ParentLocator { entries })
    }

    /// The item's bytes: header, entries, then the keys and values.
    pub fn serialize(&self) -> Vec<u8> {
        let mut b = encode_vec(&LocatorHeader {
            locator_type: GUID_LOCATOR_TYPE_VHDX,
            reserved: 0,
            key_value_count: self.entries.len() as u16,
        });
        b.resize(HEADER_SIZE + ENTRY_SIZE * self.entries.len(), 0);
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let kb: Vec<u8> = k.encode_utf16().flat_map(|c| c.to_le_bytes()).collect();
            let vb: Vec<u8> = v.encode_utf16().flat_map(|c| c.to_le_bytes()).collect();
            let key_offset = b.len() as u32;
            b.extend_from_slice(&kb);
            let value_offset = b.len() as u32;
            b.extend_from_slice(&vb);
            let at = HEADER_SIZE + i * ENTRY_SIZE;
            encode(
                &KeyValueEntry {
                    key_offset,
                    value_offset,
                    key_length: kb.len() as u16,
                    value_length: vb.len() as u16,
                },
                &mut b[at..at + ENTRY_SIZE],
            );
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locator_round_trips() {
        let l = ParentLocator {
            entries: vec![
                ("parent_linkage".into(), "{abc}".into()),
                ("relative_path".into(), ".\\base.vhdx".into()),
            ],
        };
        let b = l.serialize();
        assert_eq!(&b[0..16], &GUID_LOCATOR_TYPE_VHDX.to_windows_bytes());
        assert_eq!(b[18], 2, "count at offset 18");
        let p = ParentLocator::parse(&b, 0).unwrap();
        assert_eq!(p.entries, l.entries);
        assert_eq!(p.get("relative_path"), Some(".\\base.vhdx"));
        assert!(ParentLocator::parse(&b[..19], 0).is_err());
    }
}

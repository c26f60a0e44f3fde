//! Parent locator entries (24 bytes each, eight in the dynamic header) and their payloads: where
//! a differencing disk says its parent is (docs/vhd.md, "Parent locators").

use binrw::binrw;
use serde::Serialize;

use crate::limits::SECTOR;

pub const PLAT_NONE: u32 = 0;
pub const PLAT_WI2R: u32 = u32::from_be_bytes(*b"Wi2r");
pub const PLAT_WI2K: u32 = u32::from_be_bytes(*b"Wi2k");
pub const PLAT_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
pub const PLAT_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
// `Mac ` (0x4D616320) locators hold an alias blob we do not decode.
pub const PLAT_MACX: u32 = u32::from_be_bytes(*b"MacX");

/// One parent locator entry.
#[binrw]
#[brw(big)]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocatorEntry {
    /// Platform code (`W2ku`, `W2ru`, ...; 0 for an unused slot).
    pub code: u32,
    /// Room reserved for the payload (see [`LocatorEntry::space_bytes`]).
    pub data_space: u32,
    pub data_len: u32,
    pub reserved: u32,
    /// Absolute file offset of the payload.
    pub data_offset: u64,
}

impl LocatorEntry {
    pub const SIZE: usize = 24;

    /// Room reserved for the payload in bytes. The specification says sectors, Windows writes
    /// bytes: a value smaller than the payload length can only be sectors.
    pub fn space_bytes(&self) -> u64 {
        let s = self.data_space as u64;
        if s >= self.data_len as u64 && s >= SECTOR {
            s
        } else {
            s * SECTOR
        }
    }
}

/// A decoded parent locator, as `info` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LocatorInfo {
    pub index: usize,
    pub platform: String,
    pub platform_code: u32,
    pub data_space: u32,
    pub data_space_bytes: u64,
    pub data_length: u32,
    pub data_offset: u64,
    pub path: Option<String>,
}

impl LocatorInfo {
    pub fn new(index: usize, l: &LocatorEntry, data: &[u8]) -> LocatorInfo {
        LocatorInfo {
            index,
            platform: platform_name(l.code),
            platform_code: l.code,
            data_space: l.data_space,
            data_space_bytes: l.space_bytes(),
            data_length: l.data_len,
            data_offset: l.data_offset,
            path: decode_locator(l.code, data),
        }
    }
}

/// Decodes a locator payload to a path string.
pub fn decode_locator(code: u32, data: &[u8]) -> Option<String> {
    match code {
        PLAT_W2KU | PLAT_W2RU => {
            let units: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
            Some(String::from_utf16_lossy(&units[..end]))
        }
        PLAT_WI2K | PLAT_WI2R => {
            let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
            Some(String::from_utf8_lossy(&data[..end]).into_owned())
        }
        PLAT_MACX => {
            let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
            let s = String::from_utf8_lossy(&data[..end]).into_owned();
            let s = s.strip_prefix("file://").unwrap_or(&s);
            let s = s.strip_prefix("localhost").unwrap_or(s);
            Some(percent_decode(s))
        }
        _ => None,
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let h = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(v) = h {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn platform_name(code: u32) -> String {
    if code == PLAT_NONE {
        return "none".into();
    }
    crate::footer::fourcc(&code.to_be_bytes())
}

/// Encodes a path as UTF-16LE (W2ku/W2ru payloads).
pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent() {
        assert_eq!(percent_decode("/a%20b/c%2"), "/a b/c%2");
    }

    #[test]
    fn payloads_decode_by_platform() {
        assert_eq!(
            decode_locator(PLAT_W2RU, &utf16le(".\\p.vhd")).as_deref(),
            Some(".\\p.vhd")
        );
        assert_eq!(
            decode_locator(PLAT_MACX, b"file://localhost/a%20b\0junk").as_deref(),
            Some("/a b")
        );
        assert_eq!(decode_locator(0x4D61_6320, b"alias"), None);
    }

    #[test]
    fn space_is_bytes_unless_it_can_only_be_sectors() {
        let mut l = LocatorEntry {
            data_space: 4096,
            data_len: 100,
            ..Default::default()
        };
        assert_eq!(l.space_bytes(), 4096);
        l.data_space = 1;
        assert_eq!(l.space_bytes(), 512);
    }
}

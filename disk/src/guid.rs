//! The one GUID type of the workspace.
//!
//! A GUID is a 128-bit value written as `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`. Two byte orders
//! meet in this project:
//! * **Windows order** (`GUID` in memory): the first three fields little-endian, the last eight
//!   bytes as written. VHDX stores every GUID this way, and so does the VMBus wire.
//! * **RFC 4122 order**: all sixteen bytes as written in the text. VHD's unique id and parent id
//!   are stored this way.
//!
//! `Guid` keeps the value itself; the byte order is chosen only when converting to or from bytes,
//! so a GUID read from a VHD and the same GUID read from a VHDX compare equal and print the same.

use std::fmt;

/// A GUID. Prints in lower-case canonical form; `{:?}` adds braces.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Guid(u128);

impl Guid {
    /// The all-zero GUID.
    pub const NIL: Guid = Guid(0);

    /// From the fields as written in the text form: `ba6163d9-04a1-4d29-b605-72e2ffb1dc7f` is
    /// `from_fields(0xba6163d9, 0x04a1, 0x4d29, [0xb6, 0x05, 0x72, 0xe2, 0xff, 0xb1, 0xdc, 0x7f])`.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        Guid(
            (d1 as u128) << 96
                | (d2 as u128) << 80
                | (d3 as u128) << 64
                | u64::from_be_bytes(d4) as u128,
        )
    }

    /// From sixteen bytes in Windows order (VHDX, VMBus).
    pub const fn from_windows_bytes(b: [u8; 16]) -> Guid {
        Guid::from_fields(
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            [b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]],
        )
    }

    /// The sixteen bytes in Windows order (VHDX, VMBus).
    pub const fn to_windows_bytes(self) -> [u8; 16] {
        let mut b = self.0.to_be_bytes();
        // Data1, Data2 and Data3 are little-endian in Windows order.
        let (d1, d2, d3) = ([b[0], b[1], b[2], b[3]], [b[4], b[5]], [b[6], b[7]]);
        b[0] = d1[3];
        b[1] = d1[2];
        b[2] = d1[1];
        b[3] = d1[0];
        b[4] = d2[1];
        b[5] = d2[0];
        b[6] = d3[1];
        b[7] = d3[0];
        b
    }

    /// From sixteen bytes in RFC 4122 order (VHD).
    pub const fn from_rfc_bytes(b: [u8; 16]) -> Guid {
        Guid(u128::from_be_bytes(b))
    }

    /// The sixteen bytes in RFC 4122 order (VHD).
    pub const fn to_rfc_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// True for the all-zero GUID.
    pub const fn is_nil(self) -> bool {
        self.0 == 0
    }

    /// Parses the text form at compile time, for constants. Panics (a compile error in a const)
    /// on anything but 32 hex digits with optional dashes.
    pub const fn from_str_const(s: &str) -> Guid {
        let s = s.as_bytes();
        let mut v: u128 = 0;
        let mut digits = 0;
        let mut i = 0;
        while i < s.len() {
            let c = s[i];
            i += 1;
            if c == b'-' {
                continue;
            }
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => panic!("not a GUID digit"),
            };
            v = v << 4 | d as u128;
            digits += 1;
        }
        assert!(digits == 32, "a GUID has 32 hex digits");
        Guid(v)
    }

    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, braces optional, either case.
    pub fn parse(s: &str) -> Option<Guid> {
        let s = s.trim();
        let s = s
            .strip_prefix('{')
            .and_then(|r| r.strip_suffix('}'))
            .unwrap_or(s);
        let groups: Vec<&str> = s.split('-').collect();
        let lengths_ok = groups.len() == 5
            && groups
                .iter()
                .zip([8, 4, 4, 4, 12])
                .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
        if !lengths_ok {
            return None;
        }
        u128::from_str_radix(&groups.concat(), 16).ok().map(Guid)
    }

    /// A fresh random (version 4, RFC 4122 variant) GUID from the kernel's random source.
    pub fn new_random() -> std::io::Result<Guid> {
        let mut b = [0u8; 16];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Ok(Guid::from_rfc_bytes(b))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            (v >> 96) as u32,
            (v >> 80) as u16,
            (v >> 64) as u16,
            (v >> 48) as u16,
            v & 0xffff_ffff_ffff
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{self}}}")
    }
}

/// Serialized as its canonical text, the one form every report shows.
impl serde::Serialize for Guid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for Guid {
    type Err = String;
    fn from_str(s: &str) -> Result<Guid, String> {
        Guid::parse(s)
            .ok_or_else(|| format!("'{s}' is not a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCSI: &str = "ba6163d9-04a1-4d29-b605-72e2ffb1dc7f";

    #[test]
    fn windows_order_swaps_the_first_three_fields() {
        let g = Guid::parse(SCSI).unwrap();
        assert_eq!(
            g.to_windows_bytes(),
            [
                0xd9, 0x63, 0x61, 0xba, 0xa1, 0x04, 0x29, 0x4d, 0xb6, 0x05, 0x72, 0xe2, 0xff, 0xb1,
                0xdc, 0x7f
            ]
        );
        assert_eq!(Guid::from_windows_bytes(g.to_windows_bytes()), g);
        assert_eq!(g.to_string(), SCSI);
    }

    #[test]
    fn rfc_order_is_the_text_order() {
        let g = Guid::parse(SCSI).unwrap();
        assert_eq!(g.to_rfc_bytes()[..4], [0xba, 0x61, 0x63, 0xd9]);
        assert_eq!(Guid::from_rfc_bytes(g.to_rfc_bytes()), g);
    }

    #[test]
    fn const_parse_fields_and_text_agree() {
        const G: Guid = Guid::from_str_const("BA6163D9-04A1-4D29-B605-72E2FFB1DC7F");
        let f = Guid::from_fields(
            0xba6163d9,
            0x04a1,
            0x4d29,
            [0xb6, 0x05, 0x72, 0xe2, 0xff, 0xb1, 0xdc, 0x7f],
        );
        assert_eq!(G, f);
        assert_eq!(Guid::parse(&format!("{{{SCSI}}}")), Some(G));
        assert_eq!(format!("{G:?}"), format!("{{{SCSI}}}"));
    }

    #[test]
    fn bad_text_is_refused() {
        for s in [
            "nope",
            "ba6163d9-04a1-4d29-b605-72e2ffb1dc7",
            "ba6163d904a14d29b60572e2ffb1dc7f",
            "ba6163d9-04a1-4d29-b605-72e2ffb1dc7g",
            "{ba6163d9-04a1-4d29-b605-72e2ffb1dc7f",
            "+a6163d9-04a1-4d29-b605-72e2ffb1dc7f",
        ] {
            assert_eq!(Guid::parse(s), None, "{s}");
        }
    }

    #[test]
    fn random_guids_are_version_4_and_differ() {
        let a = Guid::new_random().unwrap();
        let b = Guid::new_random().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.to_rfc_bytes()[6] >> 4, 4);
        assert_eq!(a.to_rfc_bytes()[8] >> 6, 0b10);
    }
}

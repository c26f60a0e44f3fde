//! The 512-byte hard disk footer: at the end of every VHD, and copied at offset 0 of dynamic and
//! differencing disks (docs/vhd.md, "Footer").

use std::io::Cursor;

use binrw::{binrw, BinRead, BinWrite};
use disk::Guid;

pub const FOOTER_SIZE: usize = 512;
/// Seconds between 1970-01-01 and 2000-01-01 (the VHD epoch).
pub const VHD_EPOCH: u64 = 946_684_800;
/// The file format version every writer uses.
pub const FOOTER_VERSION: u32 = 0x0001_0000;
/// Feature bit 1 is reserved and always set.
pub const FEATURES_RESERVED: u32 = 2;
/// File offset of the footer's `data_offset` field, for error messages.
pub const DATA_OFFSET_FIELD: u64 = 16;
/// File offset of the footer's `disk_type` field, for error messages.
pub const DISK_TYPE_FIELD: u64 = 60;
const RESERVED_LEN: usize = 427;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
    /// Dynamic and differencing disks have a dynamic header, a BAT and a footer copy at 0.
    pub fn is_sparse(self) -> bool {
        self != DiskType::Fixed
    }
}

/// The hard disk footer, field by field (big-endian).
#[binrw]
#[brw(big, magic = b"conectix")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub version: u32,
    /// Dynamic/differencing: file offset of the dynamic header; fixed: all ones.
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: u32,
    pub original_size: u64,
    pub current_size: u64,
    /// Cylinders, heads, sectors per track.
    pub geometry: (u16, u8, u8),
    pub disk_type_code: u32,
    /// As read; [`Footer::to_bytes`] computes a fresh one.
    pub stored_checksum: u32,
    #[br(map = Guid::from_rfc_bytes)]
    #[bw(map = |g: &Guid| g.to_rfc_bytes())]
    pub unique_id: Guid,
    pub saved_state: u8,
    /// blktap keeps a `hidden` flag in the first byte; kept so rewrites preserve it.
    pub reserved: [u8; RESERVED_LEN],
}

impl Footer {
    /// A footer with the fixed fields every writer sets and everything else zero.
    pub fn new(kind: DiskType, size: u64, unique_id: Guid) -> Footer {
        Footer {
            features: FEATURES_RESERVED,
            version: FOOTER_VERSION,
            data_offset: u64::MAX,
            timestamp: 0,
            creator_app: [0; 4],
            creator_version: 0,
            creator_os: 0,
            original_size: size,
            current_size: size,
            geometry: (0, 0, 0),
            disk_type_code: kind.code(),
            stored_checksum: 0,
            unique_id,
            saved_state: 0,
            reserved: [0; RESERVED_LEN],
        }
    }

    /// Parses 512 bytes; only the cookie is required here (`None` when it is wrong).
    pub fn parse(b: &[u8; FOOTER_SIZE]) -> Option<Footer> {
        Footer::read(&mut Cursor::new(&b[..])).ok()
    }

    /// The checksum `raw` (the bytes this footer was parsed from) should carry.
    pub fn computed_checksum(&self, raw: &[u8; FOOTER_SIZE]) -> u32 {
        checksum(raw, self.stored_checksum)
    }

    pub fn checksum_ok(&self, raw: &[u8; FOOTER_SIZE]) -> bool {
        self.computed_checksum(raw) == self.stored_checksum
    }

    pub fn disk_type(&self) -> Option<DiskType> {
        match self.disk_type_code {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }

    /// Serialises with a freshly computed checksum.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut f = self.clone();
        f.stored_checksum = 0;
        let mut b = [0u8; FOOTER_SIZE];
        f.write_into(&mut b);
        f.stored_checksum = checksum(&b, 0);
        f.write_into(&mut b);
        b
    }

    fn write_into(&self, b: &mut [u8; FOOTER_SIZE]) {
        self.write(&mut Cursor::new(&mut b[..]))
            .expect("a footer fits its 512 bytes");
    }

    pub fn creator_app_str(&self) -> String {
        fourcc(&self.creator_app)
    }
}

/// One's complement of the byte sum of a structure, its checksum field counted as zero:
/// `stored` is the value that field holds in `bytes` (footer and dynamic header alike).
pub fn checksum(bytes: &[u8], stored: u32) -> u32 {
    let sum = |b: &[u8]| b.iter().fold(0u32, |s, &x| s.wrapping_add(x as u32));
    !sum(bytes).wrapping_sub(sum(&stored.to_be_bytes()))
}

/// Printable form of a four-character code (NULs shown as `\0`).
pub fn fourcc(b: &[u8; 4]) -> String {
    let mut s = String::new();
    for &c in b {
        if c == 0 {
            s.push_str("\\0");
        } else if c.is_ascii_graphic() || c == b' ' {
            s.push(c as char);
        } else {
            s.push_str(&format!("\\x{c:02x}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Footer {
        let mut f = Footer::new(
            DiskType::Dynamic,
            1 << 30,
            Guid::from_str_const("01234567-89ab-cdef-0011-223344556677"),
        );
        f.data_offset = 512;
        f.creator_app = *b"vrdn";
        f.geometry = (2080, 16, 63);
        f.reserved[0] = 1;
        f
    }

    #[test]
    fn layout_is_the_documented_one() {
        let b = sample().to_bytes();
        assert_eq!(&b[0..8], b"conectix");
        assert_eq!(b[8..12], 2u32.to_be_bytes());
        assert_eq!(b[16..24], 512u64.to_be_bytes());
        assert_eq!(&b[28..32], b"vrdn");
        assert_eq!(b[48..56], (1u64 << 30).to_be_bytes());
        assert_eq!(b[56..60], [0x08, 0x20, 16, 63]);
        let at = DISK_TYPE_FIELD as usize;
        assert_eq!(b[at..at + 4], 3u32.to_be_bytes());
        let at = DATA_OFFSET_FIELD as usize;
        assert_eq!(b[at..at + 8], 512u64.to_be_bytes());
        // The unique id in RFC 4122 order: the bytes as the text reads.
        assert_eq!(b[68..72], [0x01, 0x23, 0x45, 0x67]);
        assert_eq!(b[85], 1);
    }

    #[test]
    fn checksum_round_trips_and_detects_a_flip() {
        let mut b = sample().to_bytes();
        let f = Footer::parse(&b).unwrap();
        assert!(f.checksum_ok(&b));
        assert_eq!(f.to_bytes(), b);
        // The stored value is the one's complement of the other bytes' sum.
        let others: u32 = b[..64].iter().chain(&b[68..]).map(|&x| x as u32).sum();
        assert_eq!(f.stored_checksum, !others);
        b[100] ^= 1;
        let g = Footer::parse(&b).unwrap();
        assert!(!g.checksum_ok(&b));
    }

    #[test]
    fn wrong_cookie_is_not_a_footer() {
        let mut b = sample().to_bytes();
        b[0] = b'C';
        assert!(Footer::parse(&b).is_none());
    }
}

//! On-disk structures of VHD (Microsoft VHD specification v1.0): footer, dynamic header, parent
//! locators, CHS geometry and checksums. All fields are big-endian.

pub const SECTOR: u64 = 512;
pub const FOOTER_SIZE: usize = 512;
pub const HEADER_SIZE: usize = 1024;
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
pub const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// Seconds between 1970-01-01 and 2000-01-01 (the VHD epoch).
pub const VHD_EPOCH: u64 = 946_684_800;
/// Largest CHS geometry; qemu treats it as "use current_size".
pub const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;
/// Hyper-V / qemu limit for dynamic disks (qemu `VHD_MAX_SECTORS`).
pub const MAX_DYNAMIC_SIZE: u64 = 0xff00_0000 * SECTOR;
/// Largest fixed VHD Azure accepts (32 TiB).
pub const MAX_FIXED_SIZE: u64 = 32 << 40;
/// Block sizes we accept when reading (qemu rejects 0x80000000; keep bitmaps small).
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Most BAT entries we hold in memory (256 MiB of table; 2 TiB at 32 KiB blocks).
pub const MAX_BAT_ENTRIES: u64 = 1 << 26;
/// Longest locator payload we read (a 32K-unit UTF-16 path).
pub const MAX_LOCATOR_LEN: u32 = 64 << 10;

pub const PLAT_NONE: u32 = 0;
pub const PLAT_WI2R: u32 = u32::from_be_bytes(*b"Wi2r");
pub const PLAT_WI2K: u32 = u32::from_be_bytes(*b"Wi2k");
pub const PLAT_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
pub const PLAT_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
// `Mac ` (0x4D616320) locators hold an alias blob we do not decode.
pub const PLAT_MACX: u32 = u32::from_be_bytes(*b"MacX");

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
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_be_bytes());
}

/// One's complement of the byte sum, with the checksum field (4 bytes at `field`) taken as zero.
pub fn checksum(buf: &[u8], field: usize) -> u32 {
    let mut sum: u32 = 0;
    for (i, &b) in buf.iter().enumerate() {
        if i < field || i >= field + 4 {
            sum = sum.wrapping_add(b as u32);
        }
    }
    !sum
}

/// CHS geometry as (cylinders, heads, sectors per track), spec appendix algorithm (as qemu's
/// `calculate_geometry`: clamp, then 255 spt above 65535*16*63).
pub fn chs_for_sectors(total: u64) -> (u16, u8, u8) {
    let total = total.min(MAX_CHS_SECTORS);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255u64;
        heads = 16u64;
        cth = total / spt;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    let cyl = (cth / heads).min(65535);
    (cyl as u16, heads as u8, spt as u8)
}

pub fn chs_sectors(g: (u16, u8, u8)) -> u64 {
    g.0 as u64 * g.1 as u64 * g.2 as u64
}

/// Smallest CHS-representable size >= `size` (qemu's create rounding), or None above the CHS
/// maximum.
pub fn round_to_chs(size: u64) -> Option<u64> {
    let total = size.div_ceil(SECTOR);
    if total > MAX_CHS_SECTORS {
        return None;
    }
    // The CHS capacity grows in steps of at most 255*16 sectors, so this loop is short.
    let mut i = 0u64;
    loop {
        let g = chs_for_sectors(total + i);
        let cap = chs_sectors(g);
        if cap >= total {
            return Some(cap * SECTOR);
        }
        i += 1;
        if total + i > MAX_CHS_SECTORS || i > 1 << 20 {
            return None;
        }
    }
}

/// The 512-byte hard disk footer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub version: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: u32,
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: (u16, u8, u8),
    pub disk_type_code: u32,
    pub stored_checksum: u32,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
    /// Byte 85.. (blktap keeps a `hidden` flag at 85); kept so rewrites preserve it.
    pub reserved: Vec<u8>,
}

impl Footer {
    /// Parses 512 bytes; only the cookie is required here. `Ok(None)` if the cookie is wrong.
    pub fn parse(b: &[u8; FOOTER_SIZE]) -> Option<Footer> {
        if &b[0..8] != FOOTER_COOKIE {
            return None;
        }
        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&b[68..84]);
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&b[28..32]);
        Some(Footer {
            features: be32(b, 8),
            version: be32(b, 12),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app,
            creator_version: be32(b, 32),
            creator_os: be32(b, 36),
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            geometry: (u16::from_be_bytes([b[56], b[57]]), b[58], b[59]),
            disk_type_code: be32(b, 60),
            stored_checksum: be32(b, 64),
            unique_id,
            saved_state: b[84],
            reserved: b[85..].to_vec(),
        })
    }

    pub fn checksum_ok(b: &[u8; FOOTER_SIZE]) -> bool {
        checksum(b, 64) == be32(b, 64)
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
        let mut b = [0u8; FOOTER_SIZE];
        b[0..8].copy_from_slice(FOOTER_COOKIE);
        put32(&mut b, 8, self.features);
        put32(&mut b, 12, self.version);
        put64(&mut b, 16, self.data_offset);
        put32(&mut b, 24, self.timestamp);
        b[28..32].copy_from_slice(&self.creator_app);
        put32(&mut b, 32, self.creator_version);
        put32(&mut b, 36, self.creator_os);
        put64(&mut b, 40, self.original_size);
        put64(&mut b, 48, self.current_size);
        b[56..58].copy_from_slice(&self.geometry.0.to_be_bytes());
        b[58] = self.geometry.1;
        b[59] = self.geometry.2;
        put32(&mut b, 60, self.disk_type_code);
        b[68..84].copy_from_slice(&self.unique_id);
        b[84] = self.saved_state;
        let n = self.reserved.len().min(FOOTER_SIZE - 85);
        b[85..85 + n].copy_from_slice(&self.reserved[..n]);
        let c = checksum(&b, 64);
        put32(&mut b, 64, c);
        b
    }

    pub fn creator_app_str(&self) -> String {
        fourcc(&self.creator_app)
    }
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

/// One parent locator entry (24 bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocatorEntry {
    pub code: u32,
    pub data_space: u32,
    pub data_len: u32,
    pub reserved: u32,
    pub data_offset: u64,
}

impl LocatorEntry {
    /// Room reserved for the payload in bytes. The spec says sectors, Windows writes bytes: a
    /// value smaller than the payload length can only be sectors.
    pub fn space_bytes(&self) -> u64 {
        let s = self.data_space as u64;
        if s >= self.data_len as u64 && s >= SECTOR {
            s
        } else {
            s * SECTOR
        }
    }
}

/// The 1024-byte dynamic disk header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynHeader {
    pub data_offset: u64,
    pub table_offset: u64,
    pub version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub stored_checksum: u32,
    pub parent_unique_id: [u8; 16],
    pub parent_timestamp: u32,
    pub reserved1: u32,
    /// Raw UTF-16BE code units of the parent name, up to the first NUL (unpaired surrogates
    /// kept).
    pub parent_name: Vec<u16>,
    pub locators: [LocatorEntry; 8],
}

impl DynHeader {
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Option<DynHeader> {
        if &b[0..8] != HEADER_COOKIE {
            return None;
        }
        let mut parent_unique_id = [0u8; 16];
        parent_unique_id.copy_from_slice(&b[40..56]);
        let mut parent_name = Vec::new();
        for i in 0..256 {
            let u = u16::from_be_bytes([b[64 + 2 * i], b[65 + 2 * i]]);
            if u == 0 {
                break;
            }
            parent_name.push(u);
        }
        let mut locators: [LocatorEntry; 8] = Default::default();
        for (i, l) in locators.iter_mut().enumerate() {
            let o = 576 + 24 * i;
            *l = LocatorEntry {
                code: be32(b, o),
                data_space: be32(b, o + 4),
                data_len: be32(b, o + 8),
                reserved: be32(b, o + 12),
                data_offset: be64(b, o + 16),
            };
        }
        Some(DynHeader {
            data_offset: be64(b, 8),
            table_offset: be64(b, 16),
            version: be32(b, 24),
            max_table_entries: be32(b, 28),
            block_size: be32(b, 32),
            stored_checksum: be32(b, 36),
            parent_unique_id,
            parent_timestamp: be32(b, 56),
            reserved1: be32(b, 60),
            parent_name,
            locators,
        })
    }

    pub fn checksum_ok(b: &[u8; HEADER_SIZE]) -> bool {
        checksum(b, 36) == be32(b, 36)
    }

    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(HEADER_COOKIE);
        put64(&mut b, 8, self.data_offset);
        put64(&mut b, 16, self.table_offset);
        put32(&mut b, 24, self.version);
        put32(&mut b, 28, self.max_table_entries);
        put32(&mut b, 32, self.block_size);
        b[40..56].copy_from_slice(&self.parent_unique_id);
        put32(&mut b, 56, self.parent_timestamp);
        put32(&mut b, 60, self.reserved1);
        for (i, u) in self.parent_name.iter().take(256).enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
        }
        for (i, l) in self.locators.iter().enumerate() {
            let o = 576 + 24 * i;
            put32(&mut b, o, l.code);
            put32(&mut b, o + 4, l.data_space);
            put32(&mut b, o + 8, l.data_len);
            put32(&mut b, o + 12, l.reserved);
            put64(&mut b, o + 16, l.data_offset);
        }
        let c = checksum(&b, 36);
        put32(&mut b, 36, c);
        b
    }

    pub fn parent_name_lossy(&self) -> String {
        String::from_utf16_lossy(&self.parent_name)
    }
}

/// Bytes of the sector bitmap in front of each block (padded to whole sectors).
pub fn bitmap_bytes(block_size: u32) -> u64 {
    (block_size as u64 / SECTOR).div_ceil(8).div_ceil(SECTOR) * SECTOR
}

/// Where a new block's bitmap goes when the first free byte is `free`: the Windows layout, with
/// the bitmap just below a 4 KiB boundary so that the payload is 4 KiB aligned.
pub fn block_position(free: u64, bitmap: u64) -> u64 {
    (free + bitmap).div_ceil(4096) * 4096 - bitmap
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
    fourcc(&code.to_be_bytes())
}

/// Encodes a path as UTF-16LE (W2ku/W2ru payloads).
pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_examples() {
        // 127 GiB (FORMATS 3.2): 65278/16/255.
        let g = chs_for_sectors(266_338_304);
        assert_eq!(g, (65278, 16, 255));
        // qemu 4G default rounding (iotest 146): 8 389 584 sectors.
        assert_eq!(round_to_chs(4 << 30), Some(8_389_584 * 512));
        // Windows 4 MiB: 120/4/17.
        assert_eq!(chs_for_sectors(8192), (120, 4, 17));
    }

    #[test]
    fn percent() {
        assert_eq!(percent_decode("/a%20b/c%2"), "/a b/c%2");
    }

    #[test]
    fn positions() {
        assert_eq!(block_position(1536 + 512, 512), 3584);
        assert_eq!(block_position(3584, 512), 3584);
        assert_eq!(block_position(4096, 512), 7680);
        assert_eq!(bitmap_bytes(2 << 20), 512);
        assert_eq!(bitmap_bytes(512), 512);
    }
}

//! On-disk structures of VHDX (MS-VHDX v1.0): constants, GUIDs, CRC-32C, and parsers that
//! validate every field they read and report the structure, offset and detail on failure.

use disk::{Error, Result};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const HEADER1_OFFSET: u64 = 64 * KIB;
pub const HEADER2_OFFSET: u64 = 128 * KIB;
pub const RT1_OFFSET: u64 = 192 * KIB;
pub const RT2_OFFSET: u64 = 256 * KIB;
pub const HEADER_SIZE: usize = 4096;
pub const RT_SIZE: usize = 64 * 1024;
pub const MAX_SIZE: u64 = 64 << 40;
pub const PAGE: u64 = 4096;

pub const SIG_FILE: &[u8; 8] = b"vhdxfile";
pub const SIG_HEAD: &[u8; 4] = b"head";
pub const SIG_REGI: &[u8; 4] = b"regi";
pub const SIG_META: &[u8; 8] = b"metadata";

pub type Guid = [u8; 16];

/// Parses "XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX" (braces optional) into on-disk byte order.
pub fn guid_parse(s: &str) -> Option<Guid> {
    let s = s.trim().trim_start_matches('{').trim_end_matches('}');
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 || s.len() != 36 {
        return None;
    }
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    // Data1, Data2, Data3 are little-endian on disk.
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    Some(b)
}

/// Formats on-disk bytes as "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (lower case).
pub fn guid_fmt(g: &Guid) -> String {
    let mut b = *g;
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

const fn g(s: &str) -> Guid {
    // Compile-time parser for the constant GUIDs below.
    let s = s.as_bytes();
    let mut out = [0u8; 16];
    let mut i = 0;
    let mut n = 0;
    while i < s.len() {
        if s[i] == b'-' {
            i += 1;
            continue;
        }
        let hi = hexval(s[i]);
        let lo = hexval(s[i + 1]);
        out[n] = hi * 16 + lo;
        n += 1;
        i += 2;
    }
    // Swap Data1..Data3 to little-endian.
    let mut r = out;
    r[0] = out[3];
    r[1] = out[2];
    r[2] = out[1];
    r[3] = out[0];
    r[4] = out[5];
    r[5] = out[4];
    r[6] = out[7];
    r[7] = out[6];
    r
}

const fn hexval(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => 0,
    }
}

pub const GUID_BAT: Guid = g("2DC27766-F623-4200-9D64-115E9BFD4A08");
pub const GUID_METADATA: Guid = g("8B7CA206-4790-4B9A-B8FE-575F050F886E");
pub const GUID_FILE_PARAMS: Guid = g("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
pub const GUID_VDISK_SIZE: Guid = g("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
pub const GUID_PAGE83: Guid = g("BECA12AB-B2E6-4523-93EF-C309E000C746");
pub const GUID_LOGICAL_SECTOR: Guid = g("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
pub const GUID_PHYSICAL_SECTOR: Guid = g("CDA348C7-445D-4471-9CC9-E9885251C556");
pub const GUID_PARENT_LOCATOR: Guid = g("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
pub const GUID_LOCATOR_TYPE_VHDX: Guid = g("B04AEFB7-D19E-4A81-B789-25B8E9445913");

/// A fresh random (version 4) GUID.
pub fn new_guid() -> Guid {
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if !ok {
        // Fallback: time and a counter through a mixer; uniqueness is all we need.
        use std::sync::atomic::{AtomicU64, Ordering};
        static CTR: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut s = disk::fault::SplitMix(t ^ CTR.fetch_add(1, Ordering::Relaxed) << 32);
        b[..8].copy_from_slice(&s.next_u64().to_le_bytes());
        b[8..].copy_from_slice(&s.next_u64().to_le_bytes());
    }
    b[7] = (b[7] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

// ---- CRC-32C (Castagnoli), from the crc32c crate ----

/// CRC-32C of `data` with the 4 bytes at `skip` treated as zero (the checksum field).
pub fn crc32c_skip(data: &[u8], skip: usize) -> u32 {
    let c = crc32c::crc32c(&data[..skip]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &data[skip + 4..])
}

pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

pub fn rd16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub fn rd32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub fn rd64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
pub fn rdguid(b: &[u8], o: usize) -> Guid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[o..o + 16]);
    a
}
pub fn wr16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn wr32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn wr64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

// ---- Headers ----

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    pub fn parse(b: &[u8], offset: u64) -> Result<Header> {
        if &b[0..4] != SIG_HEAD {
            return Err(Error::corrupt(
                "VHDX header",
                offset,
                "signature is not 'head'",
            ));
        }
        let stored = rd32(b, 4);
        let calc = crc32c_skip(&b[..HEADER_SIZE], 4);
        if stored != calc {
            return Err(Error::corrupt(
                "VHDX header",
                offset,
                format!("checksum {stored:#010x}, expected {calc:#010x}"),
            ));
        }
        let h = Header {
            sequence: rd64(b, 8),
            file_write_guid: rdguid(b, 16),
            data_write_guid: rdguid(b, 32),
            log_guid: rdguid(b, 48),
            log_version: rd16(b, 64),
            version: rd16(b, 66),
            log_length: rd32(b, 68),
            log_offset: rd64(b, 72),
        };
        if h.version != 1 {
            return Err(Error::corrupt(
                "VHDX header",
                offset,
                format!("version {}, expected 1", h.version),
            ));
        }
        Ok(h)
    }

    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(SIG_HEAD);
        wr64(&mut b, 8, self.sequence);
        b[16..32].copy_from_slice(&self.file_write_guid);
        b[32..48].copy_from_slice(&self.data_write_guid);
        b[48..64].copy_from_slice(&self.log_guid);
        wr16(&mut b, 64, self.log_version);
        wr16(&mut b, 66, self.version);
        wr32(&mut b, 68, self.log_length);
        wr64(&mut b, 72, self.log_offset);
        let c = crc32c_skip(&b, 4);
        wr32(&mut b, 4, c);
        b
    }
}

// ---- Region table ----

#[derive(Clone, Debug)]
pub struct RegionEntry {
    pub guid: Guid,
    pub offset: u64,
    pub length: u32,
    pub required: bool,
}

#[derive(Clone, Debug)]
pub struct RegionTable {
    pub bat_offset: u64,
    pub bat_length: u32,
    pub meta_offset: u64,
    pub meta_length: u32,
    pub entries: Vec<RegionEntry>,
}

impl RegionTable {
    pub fn parse(b: &[u8], offset: u64, file_len: u64) -> Result<RegionTable> {
        let corrupt = |d: String| Error::corrupt("VHDX region table", offset, d);
        if &b[0..4] != SIG_REGI {
            return Err(corrupt("signature is not 'regi'".into()));
        }
        let stored = rd32(b, 4);
        let calc = crc32c_skip(&b[..RT_SIZE], 4);
        if stored != calc {
            return Err(corrupt(format!(
                "checksum {stored:#010x}, expected {calc:#010x}"
            )));
        }
        let count = rd32(b, 8);
        if count > 2047 {
            return Err(corrupt(format!("entry count {count} exceeds 2047")));
        }
        let mut entries = Vec::new();
        let (mut bat, mut meta) = (None, None);
        for i in 0..count as usize {
            let o = 16 + i * 32;
            let e = RegionEntry {
                guid: rdguid(b, o),
                offset: rd64(b, o + 16),
                length: rd32(b, o + 24),
                required: rd32(b, o + 28) & 1 != 0,
            };
            if !e.offset.is_multiple_of(MIB)
                || e.offset < MIB
                || !(e.length as u64).is_multiple_of(MIB)
            {
                return Err(corrupt(format!(
                    "entry {i} ({}) offset {:#x} length {:#x} not 1 MiB aligned",
                    guid_fmt(&e.guid),
                    e.offset,
                    e.length
                )));
            }
            let end = e.offset.saturating_add(e.length as u64);
            if e.guid == GUID_BAT || e.guid == GUID_METADATA {
                if end > file_len {
                    return Err(corrupt(format!(
                        "region {} at {:#x}+{:#x} lies past end of file ({file_len})",
                        guid_fmt(&e.guid),
                        e.offset,
                        e.length
                    )));
                }
                let slot = if e.guid == GUID_BAT {
                    &mut bat
                } else {
                    &mut meta
                };
                if slot.is_some() {
                    return Err(corrupt(format!("duplicate region {}", guid_fmt(&e.guid))));
                }
                *slot = Some((e.offset, e.length));
            } else if e.required {
                return Err(Error::Unsupported(format!(
                    "VHDX region {} is marked required but is unknown to this implementation",
                    guid_fmt(&e.guid)
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
                        guid_fmt(&a.guid),
                        guid_fmt(&bb.guid)
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

    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; RT_SIZE];
        b[0..4].copy_from_slice(SIG_REGI);
        wr32(&mut b, 8, self.entries.len() as u32);
        for (i, e) in self.entries.iter().enumerate() {
            let o = 16 + i * 32;
            b[o..o + 16].copy_from_slice(&e.guid);
            wr64(&mut b, o + 16, e.offset);
            wr32(&mut b, o + 24, e.length);
            wr32(&mut b, o + 28, e.required as u32);
        }
        let c = crc32c_skip(&b, 4);
        wr32(&mut b, 4, c);
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

// ---- Metadata ----

#[derive(Clone, Debug)]
pub struct MetaEntry {
    pub guid: Guid,
    pub offset: u32,
    pub length: u32,
    pub flags: u32,
}

pub const META_IS_USER: u32 = 1;
pub const META_IS_VDISK: u32 = 2;
pub const META_IS_REQUIRED: u32 = 4;

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

    pub fn parse(b: &[u8], offset: u64) -> Result<ParentLocator> {
        let corrupt = |d: String| Error::corrupt("VHDX parent locator", offset, d);
        if b.len() < 20 {
            return Err(corrupt(format!("length {} is below 20", b.len())));
        }
        if rdguid(b, 0) != GUID_LOCATOR_TYPE_VHDX {
            return Err(Error::Unsupported(format!(
                "VHDX parent locator type {} (only the VHDX locator type is known)",
                guid_fmt(&rdguid(b, 0))
            )));
        }
        let count = rd16(b, 18) as usize;
        if 20 + count * 12 > b.len() {
            return Err(corrupt(format!(
                "{count} key/value entries do not fit in {} bytes",
                b.len()
            )));
        }
        let mut entries = Vec::new();
        for i in 0..count {
            let o = 20 + i * 12;
            let ko = rd32(b, o) as usize;
            let vo = rd32(b, o + 4) as usize;
            let kl = rd16(b, o + 8) as usize;
            let vl = rd16(b, o + 10) as usize;
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
            let k = get(ko, kl, "key")?;
            let v = get(vo, vl, "value")?;
            if entries.iter().any(|(ek, _): &(String, String)| *ek == k) {
                return Err(corrupt(format!("duplicate key {k:?}")));
            }
            entries.push((k, v));
        }
        Ok(ParentLocator { entries })
    }

    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; 20 + 12 * self.entries.len()];
        b[0..16].copy_from_slice(&GUID_LOCATOR_TYPE_VHDX);
        wr16(&mut b, 18, self.entries.len() as u16);
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let kb: Vec<u8> = k.encode_utf16().flat_map(|c| c.to_le_bytes()).collect();
            let vb: Vec<u8> = v.encode_utf16().flat_map(|c| c.to_le_bytes()).collect();
            let ko = b.len();
            b.extend_from_slice(&kb);
            let vo = b.len();
            b.extend_from_slice(&vb);
            let o = 20 + i * 12;
            wr32(&mut b, o, ko as u32);
            wr32(&mut b, o + 4, vo as u32);
            wr16(&mut b, o + 8, kb.len() as u16);
            wr16(&mut b, o + 10, vb.len() as u16);
        }
        b
    }
}

/// The parsed system metadata.
#[derive(Clone, Debug)]
pub struct Metadata {
    pub block_size: u32,
    pub leave_blocks_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub page83: Guid,
    pub logical_sector: u32,
    pub physical_sector: u32,
    pub parent_locator: Option<ParentLocator>,
    pub entries: Vec<MetaEntry>,
}

/// Parses the metadata region `region` (the whole region's bytes) at file offset `offset`.
pub fn parse_metadata(region: &[u8], offset: u64) -> Result<Metadata> {
    let corrupt = |d: String| Error::corrupt("VHDX metadata table", offset, d);
    if region.len() < 65536 {
        return Err(corrupt("region shorter than 64 KiB".into()));
    }
    if &region[0..8] != SIG_META {
        return Err(corrupt("signature is not 'metadata'".into()));
    }
    let count = rd16(region, 10) as usize;
    if count > 2047 {
        return Err(corrupt(format!("entry count {count} exceeds 2047")));
    }
    let mut entries: Vec<MetaEntry> = Vec::new();
    for i in 0..count {
        let o = 32 + i * 32;
        let e = MetaEntry {
            guid: rdguid(region, o),
            offset: rd32(region, o + 16),
            length: rd32(region, o + 20),
            flags: rd32(region, o + 24),
        };
        if e.length > MIB as u32 {
            return Err(corrupt(format!(
                "item {} length {} exceeds 1 MiB",
                guid_fmt(&e.guid),
                e.length
            )));
        }
        if (e.length == 0) != (e.offset == 0)
            || (e.length > 0
                && (e.offset < 65536 || e.offset as u64 + e.length as u64 > region.len() as u64))
        {
            return Err(corrupt(format!(
                "item {} at {:#x}+{:#x} lies outside the {:#x}-byte region",
                guid_fmt(&e.guid),
                e.offset,
                e.length,
                region.len()
            )));
        }
        if entries
            .iter()
            .any(|x| x.guid == e.guid && (x.flags & META_IS_USER) == (e.flags & META_IS_USER))
        {
            return Err(corrupt(format!("duplicate item {}", guid_fmt(&e.guid))));
        }
        entries.push(e);
    }
    let find = |guid: &Guid| {
        entries
            .iter()
            .find(|e| e.guid == *guid && e.flags & META_IS_USER == 0)
    };
    let item = |guid: &Guid, name: &str, min_len: u32| -> Result<&[u8]> {
        let e = find(guid).ok_or_else(|| corrupt(format!("required item {name} is missing")))?;
        if e.length < min_len {
            return Err(corrupt(format!(
                "item {name} length {} is below {min_len}",
                e.length
            )));
        }
        Ok(&region[e.offset as usize..(e.offset + e.length) as usize])
    };
    for e in &entries {
        let known = [
            GUID_FILE_PARAMS,
            GUID_VDISK_SIZE,
            GUID_PAGE83,
            GUID_LOGICAL_SECTOR,
            GUID_PHYSICAL_SECTOR,
            GUID_PARENT_LOCATOR,
        ];
        if e.flags & META_IS_REQUIRED != 0
            && (e.flags & META_IS_USER != 0 || !known.contains(&e.guid))
        {
            return Err(Error::Unsupported(format!(
                "VHDX metadata item {} is marked required but is unknown to this implementation",
                guid_fmt(&e.guid)
            )));
        }
    }
    let fp = item(&GUID_FILE_PARAMS, "file parameters", 8)?;
    let block_size = rd32(fp, 0);
    let fpflags = rd32(fp, 4);
    if !(MIB as u32..=256 * MIB as u32).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(corrupt(format!(
            "block size {block_size} is not a power of 2 in 1..256 MiB"
        )));
    }
    let virtual_size = rd64(item(&GUID_VDISK_SIZE, "virtual disk size", 8)?, 0);
    let page83 = rdguid(item(&GUID_PAGE83, "page 83 data", 16)?, 0);
    let logical_sector = rd32(item(&GUID_LOGICAL_SECTOR, "logical sector size", 4)?, 0);
    let physical_sector = rd32(item(&GUID_PHYSICAL_SECTOR, "physical sector size", 4)?, 0);
    if logical_sector != 512 && logical_sector != 4096 {
        return Err(corrupt(format!(
            "logical sector size {logical_sector}, expected 512 or 4096"
        )));
    }
    if physical_sector != 512 && physical_sector != 4096 {
        return Err(corrupt(format!(
            "physical sector size {physical_sector}, expected 512 or 4096"
        )));
    }
    if virtual_size > MAX_SIZE || !virtual_size.is_multiple_of(logical_sector as u64) {
        return Err(corrupt(format!(
            "virtual disk size {virtual_size} is not a multiple of {logical_sector} up to 64 TiB"
        )));
    }
    let has_parent = fpflags & 2 != 0;
    let parent_locator = match find(&GUID_PARENT_LOCATOR) {
        Some(e) if has_parent => Some(ParentLocator::parse(
            &region[e.offset as usize..(e.offset + e.length) as usize],
            offset + e.offset as u64,
        )?),
        _ => None,
    };
    if has_parent && parent_locator.is_none() {
        return Err(corrupt(
            "HasParent is set but the parent locator item is missing".into(),
        ));
    }
    Ok(Metadata {
        block_size,
        leave_blocks_allocated: fpflags & 1 != 0,
        has_parent,
        virtual_size,
        page83,
        logical_sector,
        physical_sector,
        parent_locator,
        entries,
    })
}

/// Builds a metadata region (`len` bytes) with the system items and an optional locator.
pub fn build_metadata(m: &Metadata, len: usize) -> Vec<u8> {
    let mut r = vec![0u8; len];
    r[0..8].copy_from_slice(SIG_META);
    let mut items: Vec<(Guid, Vec<u8>, u32)> = Vec::new();
    let mut fp = vec![0u8; 8];
    wr32(&mut fp, 0, m.block_size);
    wr32(
        &mut fp,
        4,
        (m.leave_blocks_allocated as u32) | ((m.has_parent as u32) << 1),
    );
    items.push((GUID_FILE_PARAMS, fp, META_IS_REQUIRED));
    items.push((
        GUID_VDISK_SIZE,
        m.virtual_size.to_le_bytes().to_vec(),
        META_IS_REQUIRED | META_IS_VDISK,
    ));
    items.push((
        GUID_PAGE83,
        m.page83.to_vec(),
        META_IS_REQUIRED | META_IS_VDISK,
    ));
    items.push((
        GUID_LOGICAL_SECTOR,
        m.logical_sector.to_le_bytes().to_vec(),
        META_IS_REQUIRED | META_IS_VDISK,
    ));
    items.push((
        GUID_PHYSICAL_SECTOR,
        m.physical_sector.to_le_bytes().to_vec(),
        META_IS_REQUIRED | META_IS_VDISK,
    ));
    if let Some(pl) = &m.parent_locator {
        items.push((GUID_PARENT_LOCATOR, pl.serialize(), META_IS_REQUIRED));
    }
    wr16(&mut r, 10, items.len() as u16);
    let mut pos = 65536usize;
    for (i, (guid, data, flags)) in items.iter().enumerate() {
        let o = 32 + i * 32;
        r[o..o + 16].copy_from_slice(guid);
        wr32(&mut r, o + 16, pos as u32);
        wr32(&mut r, o + 20, data.len() as u32);
        wr32(&mut r, o + 24, *flags);
        r[pos..pos + data.len()].copy_from_slice(data);
        pos += data.len().div_ceil(8) * 8;
    }
    r
}

// ---- BAT ----

pub const PB_NOT_PRESENT: u64 = 0;
pub const PB_UNDEFINED: u64 = 1;
pub const PB_ZERO: u64 = 2;
pub const PB_UNMAPPED: u64 = 3;
pub const PB_UNMAPPED_V095: u64 = 5;
pub const PB_FULLY_PRESENT: u64 = 6;
pub const PB_PARTIALLY_PRESENT: u64 = 7;
pub const SB_PRESENT: u64 = 6;

pub fn bat_state(e: u64) -> u64 {
    e & 7
}
pub fn bat_offset(e: u64) -> u64 {
    (e >> 20) << 20
}
pub fn bat_entry(state: u64, offset: u64) -> u64 {
    (offset & !(MIB - 1)) | state
}

/// Geometry derived from the metadata.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub block_size: u64,
    pub logical_sector: u64,
    pub chunk_ratio: u64,
    pub data_blocks: u64,
    pub bitmap_blocks: u64,
    pub bat_entries: u64,
}

impl Geometry {
    pub fn new(size: u64, block_size: u32, logical_sector: u32, differencing: bool) -> Geometry {
        let bs = block_size as u64;
        let chunk_ratio = ((1u64 << 23) * logical_sector as u64) / bs;
        let data_blocks = size.div_ceil(bs);
        let bitmap_blocks = data_blocks.div_ceil(chunk_ratio);
        let bat_entries = if differencing {
            bitmap_blocks * (chunk_ratio + 1)
        } else if data_blocks == 0 {
            0
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        Geometry {
            block_size: bs,
            logical_sector: logical_sector as u64,
            chunk_ratio,
            data_blocks,
            bitmap_blocks,
            bat_entries,
        }
    }
    /// BAT index of payload block `b`.
    pub fn payload_index(&self, b: u64) -> usize {
        (b + b / self.chunk_ratio) as usize
    }
    /// BAT index of the sector-bitmap entry for chunk `c`.
    pub fn bitmap_index(&self, c: u64) -> usize {
        (c * (self.chunk_ratio + 1) + self.chunk_ratio) as usize
    }
    /// Sectors per block.
    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.logical_sector
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_round_trip_and_layout() {
        assert_eq!(
            GUID_BAT,
            [
                0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD,
                0x4A, 0x08
            ]
        );
        let s = guid_fmt(&GUID_BAT);
        assert_eq!(s, "2dc27766-f623-4200-9d64-115e9bfd4a08");
        assert_eq!(guid_parse(&format!("{{{s}}}")), Some(GUID_BAT));
        assert_eq!(guid_parse("nonsense"), None);
    }

    #[test]
    fn crc32c_known_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        let mut b = b"xxxx123456789".to_vec();
        b[..4].fill(0);
        assert_eq!(crc32c_skip(&b, 0), crc32c(&b));
    }

    #[test]
    fn chunk_ratio_examples() {
        assert_eq!(
            Geometry::new(1 << 30, 1 << 20, 512, false).chunk_ratio,
            4096
        );
        assert_eq!(
            Geometry::new(1 << 30, 256 << 20, 512, false).chunk_ratio,
            16
        );
        assert_eq!(
            Geometry::new(1 << 30, 1 << 20, 4096, false).chunk_ratio,
            32768
        );
    }
}

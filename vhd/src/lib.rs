//! VHD (Microsoft Virtual Hard Disk v1): fixed, dynamic and differencing images.
//!
//! * Reading: footer at EOF (or the copy at offset 0, or a 511-byte footer), dynamic header, BAT,
//!   MSB-first sector bitmaps for differencing disks, parent locators (W2ku/W2ru, deprecated
//!   Wi2k/Wi2r/MacX), UTF-16BE parent name.
//! * Writing and creating all three types, with the Windows block layout (payload 4 KiB aligned).
//! * Size policy: `current_size`, except creators `vpc ` and `qemu` (CHS), as qemu 10 does; an
//!   override for both.
//! * Tolerance decisions (each one is reported in `format_specific().warnings`):
//!   - A footer or dynamic-header checksum mismatch is a warning, not an error. qemu 10 rejects a
//!     bad footer checksum, but older qemu, libvhdi and (by our reading) Windows accept it; the
//!     dfvfs images `image.vhd`/`image-differential.vhd` carry bad checksums on otherwise sound
//!     structures, and refusing them would lose data for no safety gain: every offset we use is
//!     still bounds-checked. When a valid copy exists (offset 0 vs EOF), the valid one wins.
//!     `check` reports the mismatch as corruption and `check -r all` rewrites it.
//!   - Footer copy at offset 0 differing from the trailer: warning; the trailer wins.
//!   - A 511-byte trailing footer (old Virtual PC): accepted with a warning.
//!   - Missing/damaged trailing footer on a dynamic disk: the copy at offset 0 is used.
//!   - BAT at any byte offset (not only 1536 or sector aligned).
//!   - Everything else that would make us read or write outside the structures (BAT entries past
//!     EOF or on top of metadata, bad block size, too few table entries, locators out of range)
//!     is a typed [`disk::Error::Corrupt`].

mod amend;
mod check;
mod format;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use disk::{
    check_aligned, check_range, Access, Allocation, BlockDevice, Error, Extent, FileStorage,
    ParentLink, Result, Storage, ZeroFlags,
};
use serde::Serialize;

pub use check::check;
use format::*;
pub use format::{chs_for_sectors, DiskType, MAX_DYNAMIC_SIZE, MAX_FIXED_SIZE};

/// Which size authority to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SizeRule {
    /// qemu 10 rule: CHS for creators `vpc ` and `qemu` (unless the geometry is the
    /// 65535/16/255 marker), `current_size` for everything else.
    #[default]
    Auto,
    Chs,
    CurrentSize,
}

#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    pub size_rule: SizeRule,
}

pub enum CreateKind {
    Fixed,
    Dynamic,
    Differencing {
        parent_path: PathBuf,
        parent: Arc<dyn BlockDevice>,
    },
}

impl std::fmt::Debug for CreateKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CreateKind::Fixed => write!(f, "Fixed"),
            CreateKind::Dynamic => write!(f, "Dynamic"),
            CreateKind::Differencing { parent_path, .. } => {
                write!(f, "Differencing({})", parent_path.display())
            }
        }
    }
}

#[derive(Debug)]
pub struct CreateOptions {
    pub kind: CreateKind,
    /// Virtual size in bytes (ignored for differencing: the parent's size is used).
    pub size: u64,
    /// Block size of dynamic/differencing disks (power of two, 4 KiB..256 MiB). Default 2 MiB.
    pub block_size: u32,
    /// `Chs` rounds the size up to a CHS-representable one (like qemu without force_size);
    /// `CurrentSize` and `Auto` keep the exact size (rounded up to 512 bytes).
    pub size_rule: SizeRule,
    /// Azure-ready: fixed only, size rounded up to a whole MiB, 20 MiB ..= 32 TiB.
    pub azure: bool,
    /// Differencing: the parent's Windows path, when known (W2ku locator, header parent name).
    pub parent_windows: disk::ParentWindowsPaths,
    /// How the new file is opened (lock, skip_file_sync).
    pub file: disk::FileOptions,
}

pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;

impl CreateOptions {
    pub fn new(kind: CreateKind, size: u64) -> Self {
        CreateOptions {
            kind,
            size,
            block_size: DEFAULT_BLOCK_SIZE,
            size_rule: SizeRule::CurrentSize,
            azure: false,
            parent_windows: disk::ParentWindowsPaths::default(),
            file: disk::FileOptions::default(),
        }
    }
}

/// What `compact` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CompactStats {
    pub blocks_freed: u64,
    pub blocks_moved: u64,
    pub file_size_before: u64,
    pub file_size_after: u64,
}

/// A decoded parent locator.
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

/// Parsed facts about an image.
#[derive(Clone, Debug, Serialize)]
pub struct VhdInfo {
    pub disk_type: &'static str,
    pub virtual_size: u64,
    pub size_rule: &'static str,
    pub size_rule_reason: String,
    pub creator_app: String,
    pub creator_version: u32,
    pub creator_host_os: String,
    pub original_size: u64,
    pub current_size: u64,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
    pub chs_size: u64,
    pub timestamp: u32,
    pub unique_id: String,
    pub saved_state: bool,
    pub features: u32,
    pub block_size: Option<u32>,
    pub max_table_entries: Option<u32>,
    pub bat_offset: Option<u64>,
    pub header_offset: Option<u64>,
    pub allocated_blocks: u64,
    pub parent_name: Option<String>,
    pub parent_unique_id: Option<String>,
    pub parent_timestamp: Option<u32>,
    pub locators: Vec<LocatorInfo>,
    pub file_size: u64,
    pub warnings: Vec<String>,
}

/// Metadata, behind one RwLock: readers hold it only to copy a BAT entry.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub(crate) footer: Footer,
    pub(crate) header: Option<DynHeader>,
    pub(crate) header_offset: u64,
    pub(crate) size: u64,
    pub(crate) rule: &'static str,
    pub(crate) rule_reason: String,
    pub(crate) bat: Vec<u32>,
    pub(crate) block_size: u32,
    pub(crate) bitmap: u64,
    pub(crate) locators: Vec<LocatorInfo>,
    /// Offset of the trailing footer: new blocks go here.
    pub(crate) footer_pos: u64,
    pub(crate) file_len: u64,
    pub(crate) warnings: Vec<String>,
    /// Problems a strict open refuses; collected instead in lenient (check) mode.
    pub(crate) errors: Vec<(u64, String)>,
    pub(crate) trailer_ok: bool,
    pub(crate) footer_checksum_ok: bool,
    pub(crate) copy_matches: bool,
    pub(crate) header_checksum_ok: bool,
    /// Sector bitmaps are LSB-first (old blktap).
    pub(crate) bitmap_lsb: bool,
}

impl Meta {
    fn kind(&self) -> DiskType {
        self.footer.disk_type().unwrap_or(DiskType::Fixed)
    }
}

pub struct VhdDisk {
    storage: Arc<dyn Storage>,
    path: Option<PathBuf>,
    read_only: bool,
    kind: DiskType,
    meta: RwLock<Meta>,
    /// Serialises writers (allocation, bitmap updates, metadata changes).
    wlock: Mutex<()>,
    parent: Option<Arc<dyn BlockDevice>>,
    /// Set when a failed write left a BAT entry in an unknown state (its repair failed too):
    /// every later write and flush fails, since a later allocation could reuse the block.
    failed: disk::FailLatch,
}

impl std::fmt::Debug for VhdDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdDisk")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("size", &self.size())
            .field("read_only", &self.read_only)
            .finish()
    }
}

fn io_err(what: impl Into<String>, e: std::io::Error) -> Error {
    Error::io(what, e)
}

/// Reads exactly `buf.len()` bytes; a read past EOF is reported as corruption of `structure`.
pub(crate) fn read_exact(
    s: &dyn Storage,
    buf: &mut [u8],
    off: u64,
    structure: &'static str,
) -> Result<()> {
    s.read_at(buf, off).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::corrupt(
                structure,
                off,
                format!("{} bytes needed past end of file", buf.len()),
            )
        } else {
            io_err(format!("reading {structure} at offset {off}"), e)
        }
    })
}

fn write_all(s: &dyn Storage, buf: &[u8], off: u64, what: &str) -> Result<()> {
    s.write_at(buf, off)
        .map_err(|e| io_err(format!("writing {what} at offset {off}"), e))
}

fn flush_storage(s: &dyn Storage) -> Result<()> {
    s.flush().map_err(|e| io_err("flushing VHD file", e))
}

fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut u))
        .is_ok();
    if !ok {
        use std::hash::{BuildHasher, Hasher};
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for (i, chunk) in u.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(t);
            h.write_usize(i);
            h.write_u32(std::process::id());
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

fn vhd_now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().saturating_sub(VHD_EPOCH) as u32)
        .unwrap_or(0)
}

/// Parses footer, header, BAT and locators. `strict` refuses structural problems; otherwise they
/// are collected in `Meta::errors` (for check) and the offending BAT entries are kept as is.
pub(crate) fn load(storage: &dyn Storage, rule: SizeRule, strict: bool) -> Result<Meta> {
    let len = storage
        .len()
        .map_err(|e| io_err("reading VHD file length", e))?;
    if len < FOOTER_SIZE as u64 {
        return Err(Error::WrongFormat {
            format: "vhd",
            detail: format!("file is {len} bytes, smaller than a VHD footer"),
        });
    }
    let mut warnings = Vec::new();
    let mut trailer = [0u8; FOOTER_SIZE];
    read_exact(storage, &mut trailer, len - 512, "VHD footer")?;
    let mut copy = [0u8; FOOTER_SIZE];
    read_exact(storage, &mut copy, 0, "VHD footer copy")?;
    let copy_footer = Footer::parse(&copy).filter(|f| {
        matches!(
            f.disk_type(),
            Some(DiskType::Dynamic) | Some(DiskType::Differencing)
        )
    });

    let mut trailer_ok = true;
    let (mut raw, mut footer_pos) = (trailer, len - 512);
    if Footer::parse(&trailer).is_none() {
        // Old Virtual PC wrote 511-byte footers (the last reserved byte missing).
        let mut short = [0u8; FOOTER_SIZE];
        let got511 = len >= 511
            && read_exact(storage, &mut short[..511], len - 511, "VHD footer").is_ok()
            && Footer::parse(&short).is_some();
        if got511 {
            warnings.push("511-byte footer at end of file (old Virtual PC); accepted".into());
            raw = short;
            footer_pos = len - 511;
        } else if copy_footer.is_some() {
            trailer_ok = false;
            warnings
                .push("no valid footer at end of file; using the footer copy at offset 0".into());
            raw = copy;
            footer_pos = len;
        } else {
            return Err(Error::WrongFormat {
                format: "vhd",
                detail: "no 'conectix' footer at end of file or at offset 0".into(),
            });
        }
    }
    let mut footer_checksum_ok = Footer::checksum_ok(&raw);
    let mut copy_matches = true;
    // Only a dynamic/differencing trailer has a copy at 0; on a fixed disk offset 0 is guest
    // data (which may well be another VHD).
    let trailer_sparse = Footer::parse(&raw).is_some_and(|f| {
        matches!(
            f.disk_type(),
            Some(DiskType::Dynamic) | Some(DiskType::Differencing)
        )
    });
    if trailer_ok && trailer_sparse && copy_footer.is_some() {
        copy_matches = copy == raw;
        if !copy_matches {
            if !footer_checksum_ok && Footer::checksum_ok(&copy) {
                warnings.push(
                    "footer at end of file has a bad checksum; using the valid copy at offset 0"
                        .into(),
                );
                raw = copy;
                footer_checksum_ok = true;
            } else {
                warnings.push("footer copy at offset 0 differs from the footer at end of file; using the one at end of file".into());
            }
        }
    }
    let Some(footer) = Footer::parse(&raw) else {
        return Err(Error::corrupt("VHD footer", footer_pos, "bad cookie"));
    };
    if !footer_checksum_ok {
        warnings.push(format!(
            "footer checksum mismatch (stored {:#010x}, computed {:#010x}); accepted like older qemu/libvhdi/Windows",
            footer.stored_checksum,
            checksum(&raw, 64)
        ));
    }
    if footer.features & 2 == 0 {
        warnings.push(format!(
            "footer features {:#x} lack the reserved bit 0x2",
            footer.features
        ));
    }
    if footer.saved_state != 0 {
        warnings.push(
            "saved-state flag is set: a virtual machine saved its state with this disk".into(),
        );
    }
    if footer.version != 0x0001_0000 {
        warnings.push(format!(
            "footer file format version {:#x} (expected 0x10000)",
            footer.version
        ));
    }
    let Some(kind) = footer.disk_type() else {
        return Err(Error::corrupt(
            "VHD footer",
            footer_pos + 60,
            format!(
                "disk type {} is not fixed (2), dynamic (3) or differencing (4)",
                footer.disk_type_code
            ),
        ));
    };

    // Size policy (FORMATS 6.2 / 12.1).
    let chs_sec = chs_sectors(footer.geometry);
    let is_max = chs_sec == MAX_CHS_SECTORS;
    let app = footer.creator_app;
    let creator_chs = &app == b"vpc " || &app == b"qemu";
    let (size, rule_name, reason): (u64, &'static str, String) = match rule {
        SizeRule::CurrentSize => (
            footer.current_size,
            "current_size",
            "forced current_size".into(),
        ),
        SizeRule::Chs if !is_max => (chs_sec * SECTOR, "chs", "forced chs".into()),
        SizeRule::Chs => (
            footer.current_size,
            "current_size",
            "forced chs, but the geometry is the 65535/16/255 marker".into(),
        ),
        SizeRule::Auto if creator_chs && !is_max => (
            chs_sec * SECTOR,
            "chs",
            format!(
                "creator {:?} uses CHS geometry (qemu 10 rule)",
                fourcc(&app)
            ),
        ),
        SizeRule::Auto => (
            footer.current_size,
            "current_size",
            format!("creator {:?}: current_size is the authority", fourcc(&app)),
        ),
    };
    let mut size = size;
    if size % SECTOR != 0 {
        warnings.push(format!(
            "virtual size {size} is not a multiple of 512; rounded down"
        ));
        size -= size % SECTOR;
    }

    let mut meta = Meta {
        footer: footer.clone(),
        header: None,
        header_offset: 0,
        size,
        rule: rule_name,
        rule_reason: reason,
        bat: Vec::new(),
        block_size: 0,
        bitmap: 0,
        locators: Vec::new(),
        footer_pos,
        file_len: len,
        warnings,
        errors: Vec::new(),
        trailer_ok,
        footer_checksum_ok,
        copy_matches,
        header_checksum_ok: true,
        bitmap_lsb: false,
    };

    if kind == DiskType::Fixed {
        if size > footer_pos {
            return Err(Error::corrupt(
                "VHD fixed disk data",
                0,
                format!(
                    "virtual size {size} needs {size} data bytes but the file holds {footer_pos} before its footer (truncated?)"
                ),
            ));
        }
        return Ok(meta);
    }

    // Dynamic header.
    let hoff = footer.data_offset;
    if hoff.checked_add(HEADER_SIZE as u64).is_none_or(|e| e > len) || hoff < 512 {
        return Err(Error::corrupt(
            "VHD footer",
            footer_pos + 16,
            format!("dynamic header offset {hoff:#x} is outside the file (length {len})"),
        ));
    }
    let mut hraw = [0u8; HEADER_SIZE];
    read_exact(storage, &mut hraw, hoff, "VHD dynamic header")?;
    let Some(header) = DynHeader::parse(&hraw) else {
        return Err(Error::corrupt(
            "VHD dynamic header",
            hoff,
            "cookie is not 'cxsparse'",
        ));
    };
    if !DynHeader::checksum_ok(&hraw) {
        meta.header_checksum_ok = false;
        meta.warnings.push(format!(
            "dynamic header checksum mismatch (stored {:#010x}, computed {:#010x}); accepted like qemu (which does not check it)",
            header.stored_checksum,
            checksum(&hraw, 36)
        ));
    }
    let bs = header.block_size;
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(Error::corrupt(
            "VHD dynamic header",
            hoff + 32,
            format!("block size {bs:#x} is not a power of two between 512 B and 256 MiB"),
        ));
    }
    let needed = size.div_ceil(bs as u64);
    if needed > header.max_table_entries as u64 {
        return Err(Error::corrupt(
            "VHD dynamic header",
            hoff + 28,
            format!(
                "max table entries {} cannot cover virtual size {size} with {bs}-byte blocks (needs {needed})",
                header.max_table_entries
            ),
        ));
    }
    if needed > MAX_BAT_ENTRIES {
        return Err(Error::Unsupported(format!(
            "virtual size {size} with {bs}-byte blocks needs {needed} BAT entries; at most {MAX_BAT_ENTRIES} are supported"
        )));
    }
    let bat_off = header.table_offset;
    let bat_bytes = needed * 4;
    // The BAT must be in the file: this bounds the allocation below by the file size.
    if bat_off.checked_add(bat_bytes).is_none_or(|e| e > len) {
        return Err(Error::corrupt(
            "VHD BAT",
            bat_off,
            format!("{needed} entries ({bat_bytes} bytes) extend past end of file ({len})"),
        ));
    }
    let mut raw_bat = vec![0u8; bat_bytes as usize];
    read_exact(storage, &mut raw_bat, bat_off, "VHD BAT")?;
    let bat: Vec<u32> = raw_bat
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    drop(raw_bat);
    let bitmap = bitmap_bytes(bs);
    let meta_ranges = [
        (0u64, 512u64),
        (hoff, hoff + HEADER_SIZE as u64),
        (bat_off, bat_off + bat_bytes),
    ];
    let mut errors = Vec::new();
    for (i, &e) in bat.iter().enumerate() {
        if e == UNALLOCATED {
            continue;
        }
        let start = e as u64 * SECTOR;
        let end = start + bitmap + bs as u64;
        let eoff = bat_off + 4 * i as u64;
        if end > footer_pos {
            errors.push((
                eoff,
                format!("entry {i} = {e:#x} puts block at {start}..{end}, past the data area end {footer_pos} (file length {len})"),
            ));
        } else if meta_ranges.iter().any(|&(a, b)| start < b && end > a) {
            errors.push((
                eoff,
                format!("entry {i} = {e:#x} puts block at {start}..{end} on top of the footer copy, dynamic header or BAT"),
            ));
        }
    }
    if strict {
        if let Some((off, msg)) = errors.first() {
            return Err(Error::corrupt("VHD BAT", *off, msg.clone()));
        }
        // Two entries sharing (part of) a block: reads are defined, but a write through one
        // would change the other's data, so an open refuses it (check reports it as well).
        let slot = bitmap + bs as u64;
        let mut starts: Vec<(u32, usize)> = bat
            .iter()
            .enumerate()
            .filter(|(_, &e)| e != UNALLOCATED)
            .map(|(i, &e)| (e, i))
            .collect();
        starts.sort_unstable();
        if let Some(w) = starts
            .windows(2)
            .find(|w| w[0].0 as u64 * SECTOR + slot > w[1].0 as u64 * SECTOR)
        {
            return Err(Error::corrupt(
                "VHD BAT",
                bat_off + 4 * w[1].1 as u64,
                format!(
                    "entries {} and {} put blocks at sectors {:#x} and {:#x}, which overlap",
                    w[0].1, w[1].1, w[0].0, w[1].0
                ),
            ));
        }
    }

    // Parent locators.
    let mut locators = Vec::new();
    if kind == DiskType::Differencing {
        for (i, l) in header.locators.iter().enumerate() {
            if l.code == PLAT_NONE {
                continue;
            }
            let field = hoff + 576 + 24 * i as u64;
            if l.data_len > MAX_LOCATOR_LEN {
                return Err(Error::corrupt(
                    "VHD parent locator",
                    field,
                    format!(
                        "locator {i} data length {} exceeds {MAX_LOCATOR_LEN}",
                        l.data_len
                    ),
                ));
            }
            if l.data_offset
                .checked_add(l.data_len as u64)
                .is_none_or(|e| e > len)
            {
                return Err(Error::corrupt(
                    "VHD parent locator",
                    field,
                    format!(
                        "locator {i} ({}) data at {}+{} is outside the file (length {len})",
                        platform_name(l.code),
                        l.data_offset,
                        l.data_len
                    ),
                ));
            }
            let mut data = vec![0u8; l.data_len as usize];
            read_exact(storage, &mut data, l.data_offset, "VHD parent locator data")?;
            locators.push(LocatorInfo {
                index: i,
                platform: platform_name(l.code),
                platform_code: l.code,
                data_space: l.data_space,
                data_space_bytes: l.space_bytes(),
                data_length: l.data_len,
                data_offset: l.data_offset,
                path: decode_locator(l.code, &data),
            });
        }
        if header
            .parent_name
            .iter()
            .any(|&u| (0xD800..0xE000).contains(&u))
            && String::from_utf16(&header.parent_name).is_err()
        {
            meta.warnings.push(
                "parent name contains unpaired UTF-16 surrogates; shown lossily, kept raw".into(),
            );
        }
    }
    if &app == b"tap\0" && footer.creator_version == 1 {
        meta.bitmap_lsb = true;
        meta.warnings.push(
            "creator blktap version 0x00000001: sector bitmaps read LSB-first like it wrote them"
                .into(),
        );
    }
    meta.errors = errors;
    meta.header = Some(header);
    meta.header_offset = hoff;
    meta.bat = bat;
    meta.block_size = bs;
    meta.bitmap = bitmap;
    meta.locators = locators;
    Ok(meta)
}

/// Converts a stored Windows or POSIX path to a local path (backslashes to slashes).
fn slashes(s: &str) -> String {
    s.replace('\\', "/")
}

impl VhdDisk {
    /// True when the bytes say VHD by the rules of [`VhdDisk::probe_rule`].
    pub fn probe(storage: &dyn Storage) -> Result<bool> {
        Ok(Self::probe_rule(storage)?.is_some())
    }

    /// Whether the store is a VHD, judged only by what guest data of a raw disk cannot fake
    /// without also matching the file's real layout; returns the rule that matched.
    ///
    /// * A footer cookie at offset 0 (every dynamic VHD has its footer copy there; qemu probes
    ///   VHD by this alone). A raw image opened by us with a probed format refuses writes that
    ///   would create it.
    /// * A trailing footer (last 512 bytes, or 511 for old Virtual PC) with a valid checksum
    ///   that agrees with the file: for a fixed disk, file size == current size + 512 (or +511)
    ///   exactly; for a dynamic/differencing disk, a dynamic header cookie at its data offset.
    ///
    /// A footer with a bad checksum or a size that disagrees is guest data: the file is raw
    /// (open it with an explicit `vhd` format to read it anyway).
    pub fn probe_rule(storage: &dyn Storage) -> Result<Option<&'static str>> {
        let len = storage
            .len()
            .map_err(|e| io_err("reading file length", e))?;
        if len < 511 {
            return Ok(None);
        }
        let read = |buf: &mut [u8], off: u64| -> Result<bool> {
            match storage.read_at(buf, off) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
                Err(e) => Err(io_err("probing for a VHD footer", e)),
            }
        };
        let mut b = [0u8; FOOTER_SIZE];
        if len >= 512 && read(&mut b, 0)? && Footer::parse(&b).is_some() {
            return Ok(Some(
                "VHD footer cookie 'conectix' at offset 0 (a dynamic VHD's footer copy)",
            ));
        }
        for (footer_len, rule_fixed, rule_sparse) in [
            (
                512u64,
                "fixed VHD footer at end of file (valid checksum, file size = current size + 512)",
                "dynamic VHD footer at end of file (valid checksum, dynamic header at its data offset)",
            ),
            (
                511,
                "fixed VHD 511-byte footer at end of file (valid checksum, file size = current size + 511)",
                "dynamic VHD 511-byte footer at end of file (valid checksum, dynamic header at its data offset)",
            ),
        ] {
            let mut b = [0u8; FOOTER_SIZE];
            if len < footer_len || !read(&mut b[..footer_len as usize], len - footer_len)? {
                continue;
            }
            let Some(f) = Footer::parse(&b).filter(|_| Footer::checksum_ok(&b)) else {
                continue;
            };
            match f.disk_type() {
                Some(DiskType::Fixed) if f.current_size.checked_add(footer_len) == Some(len) => {
                    return Ok(Some(rule_fixed))
                }
                Some(DiskType::Dynamic) | Some(DiskType::Differencing) => {
                    let mut h = [0u8; 8];
                    if f.data_offset.checked_add(HEADER_SIZE as u64).is_some_and(|e| e <= len)
                        && read(&mut h, f.data_offset)?
                        && &h == HEADER_COOKIE
                    {
                        return Ok(Some(rule_sparse));
                    }
                }
                _ => {}
            }
        }
        Ok(None)
    }

    pub fn open(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<VhdDisk> {
        let meta = load(&*storage, opts.size_rule, true)?;
        let kind = meta.kind();
        Ok(VhdDisk {
            path: storage.path().map(Path::to_path_buf),
            storage,
            read_only: opts.read_only,
            kind,
            meta: RwLock::new(meta),
            wlock: Mutex::new(()),
            parent: None,
            failed: disk::FailLatch::new(),
        })
    }

    /// Fails once a failure left this handle in a state no retry can repair.
    fn usable(&self) -> Result<()> {
        match self.failed.get() {
            None => Ok(()),
            Some(first) => Err(Error::io(
                format!(
                    "cannot write or flush {}",
                    self.path
                        .as_ref()
                        .map_or_else(|| "VHD image".to_string(), |p| p.display().to_string())
                ),
                std::io::Error::other(format!(
                    "an earlier failure left it in an unknown state ({first}); reopen the image"
                )),
            )),
        }
    }

    /// Writes the 4-byte BAT entry at file offset `at`; if that fails, puts `old` back. Should the
    /// repair fail as well, the entry on disk is unknown (maybe torn, maybe new) and the handle
    /// stops: a later allocation reusing the place would give two entries one block.
    fn write_bat_entry(&self, at: u64, new: u32, old: u32) -> Result<()> {
        let s = &*self.storage;
        if let Err(e) = write_all(s, &new.to_be_bytes(), at, "VHD BAT entry") {
            if let Err(e2) = s.write_at(&old.to_be_bytes(), at) {
                self.failed.set(format!(
                    "BAT entry at offset {at} could not be written ({e}) nor restored ({e2})"
                ));
            }
            return Err(e);
        }
        Ok(())
    }

    pub fn open_path(path: &Path, opts: &OpenOptions) -> Result<VhdDisk> {
        let access = if opts.read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        let s = FileStorage::open(path, access, true)?;
        Self::open(Arc::new(s), opts)
    }

    /// Attaches the parent of a differencing disk (its size must equal ours).
    pub fn attach_parent(&mut self, parent: Arc<dyn BlockDevice>) -> Result<()> {
        if self.kind != DiskType::Differencing {
            return Err(Error::InvalidArgument(
                "only a differencing VHD has a parent".into(),
            ));
        }
        if parent.size() != self.size() {
            return Err(Error::ParentMismatch {
                child: self.path.clone().unwrap_or_default(),
                parent: parent.path().map(Path::to_path_buf).unwrap_or_default(),
                detail: format!(
                    "parent size {} differs from the child's size {}",
                    parent.size(),
                    self.size()
                ),
            });
        }
        self.parent = Some(parent);
        Ok(())
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub fn disk_type(&self) -> DiskType {
        self.kind
    }

    fn m(&self) -> std::sync::RwLockReadGuard<'_, Meta> {
        self.meta.read().unwrap_or_else(|e| e.into_inner())
    }
    fn mw(&self) -> std::sync::RwLockWriteGuard<'_, Meta> {
        self.meta.write().unwrap_or_else(|e| e.into_inner())
    }
    fn wl(&self) -> std::sync::MutexGuard<'_, ()> {
        self.wlock.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn info(&self) -> VhdInfo {
        let m = self.m();
        let f = &m.footer;
        let h = m.header.as_ref();
        let diff = self.kind == DiskType::Differencing;
        VhdInfo {
            disk_type: self.kind.name(),
            virtual_size: m.size,
            size_rule: m.rule,
            size_rule_reason: m.rule_reason.clone(),
            creator_app: f.creator_app_str(),
            creator_version: f.creator_version,
            creator_host_os: fourcc(&f.creator_os.to_be_bytes()),
            original_size: f.original_size,
            current_size: f.current_size,
            cylinders: f.geometry.0,
            heads: f.geometry.1,
            sectors_per_track: f.geometry.2,
            chs_size: chs_sectors(f.geometry) * SECTOR,
            timestamp: f.timestamp,
            unique_id: uuid_string(&f.unique_id),
            saved_state: f.saved_state != 0,
            features: f.features,
            block_size: h.map(|h| h.block_size),
            max_table_entries: h.map(|h| h.max_table_entries),
            bat_offset: h.map(|h| h.table_offset),
            header_offset: h.map(|_| m.header_offset),
            allocated_blocks: m.bat.iter().filter(|&&e| e != UNALLOCATED).count() as u64,
            parent_name: h.filter(|_| diff).map(|h| h.parent_name_lossy()),
            parent_unique_id: h.filter(|_| diff).map(|h| uuid_string(&h.parent_unique_id)),
            parent_timestamp: h.filter(|_| diff).map(|h| h.parent_timestamp),
            locators: m.locators.clone(),
            file_size: m.file_len,
            warnings: m.warnings.clone(),
        }
    }

    /// The raw UTF-16 code units of the parent name (unpaired surrogates kept).
    pub fn parent_name_raw(&self) -> Option<Vec<u16>> {
        let m = self.m();
        m.header
            .as_ref()
            .filter(|_| self.kind == DiskType::Differencing)
            .map(|h| h.parent_name.clone())
    }

    fn child_dir(&self) -> PathBuf {
        self.path
            .as_ref()
            .and_then(|p| p.parent())
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    // ---- reading ----

    fn parent_read(&self, m: &Meta, buf: &mut [u8], off: u64) -> Result<()> {
        let Some(p) = &self.parent else {
            let name = m
                .header
                .as_ref()
                .map(|h| h.parent_name_lossy())
                .unwrap_or_default();
            return Err(Error::ParentNotFound {
                child: self.path.clone().unwrap_or_default(),
                name,
                tried: Vec::new(),
            });
        };
        // After a resize the child may be larger than its parent: beyond it reads zeros.
        let psize = p.size();
        if off >= psize {
            buf.fill(0);
            return Ok(());
        }
        let n = ((psize - off) as usize).min(buf.len());
        p.read_at(&mut buf[..n], off)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// Reads the bitmap bits for in-block byte range `lo..hi` (returns the bitmap bytes from
    /// the byte holding sector lo/512).
    fn read_bitmap(&self, entry: u32, lo: u64, hi: u64) -> Result<(u64, Vec<u8>)> {
        let first = lo / SECTOR / 8;
        let last = (hi - 1) / SECTOR / 8;
        let mut b = vec![0u8; (last - first + 1) as usize];
        read_exact(
            &*self.storage,
            &mut b,
            entry as u64 * SECTOR + first,
            "VHD sector bitmap",
        )?;
        Ok((first, b))
    }

    /// Reads `buf` from block `blk` at in-block offset `inb` (merged view). Callers hold the
    /// metadata read guard `m` across the I/O, so compact/resize cannot move the block under
    /// them; readers still run in parallel.
    fn read_in_block(
        &self,
        m: &Meta,
        blk: u64,
        entry: u32,
        inb: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let (bs, bitmap) = (m.block_size as u64, m.bitmap);
        let voff = blk * bs + inb;
        if entry == UNALLOCATED {
            if self.kind == DiskType::Differencing {
                return self.parent_read(m, buf, voff);
            }
            buf.fill(0);
            return Ok(());
        }
        let data = entry as u64 * SECTOR + bitmap;
        if self.kind != DiskType::Differencing {
            // Dynamic disks: like qemu, the bitmap is not consulted (blocks are zero-filled
            // when allocated).
            return read_exact(&*self.storage, buf, data + inb, "VHD data block");
        }
        let end = inb + buf.len() as u64;
        let lsb = m.bitmap_lsb;
        let (first, bm) = self.read_bitmap(entry, inb, end)?;
        let bit = |sector: u64| -> bool {
            let byte = (sector / 8 - first) as usize;
            bm.get(byte).is_some_and(|b| b & bit_mask(sector, lsb) != 0)
        };
        let mut p = inb;
        while p < end {
            let present = bit(p / SECTOR);
            let mut q = (p / SECTOR + 1) * SECTOR;
            while q < end && bit(q / SECTOR) == present {
                q += SECTOR;
            }
            let q = q.min(end);
            let out = &mut buf[(p - inb) as usize..(q - inb) as usize];
            if present {
                read_exact(&*self.storage, out, data + p, "VHD data block")?;
            } else {
                self.parent_read(m, out, blk * bs + p)?;
            }
            p = q;
        }
        Ok(())
    }

    // ---- writing ----

    /// Allocates block `blk` and writes `data` at in-block offset `inb` (sector aligned for
    /// differencing disks).
    ///
    /// Crash ordering (FaultyStorage keeps any subset of unflushed writes, so only flushes
    /// order anything):
    /// 1. write a footer copy at the new EOF (after the new block) and flush: from now on the
    ///    file ends in a valid footer whatever happens; the old trailing footer becomes a dead
    ///    sector that the new block's bitmap may overwrite;
    /// 2. write the bitmap and the payload, flush: the block is durable but unreferenced
    ///    (a crash here leaks it, nothing else);
    /// 3. write the 4-byte BAT entry (durable at the caller's next flush).
    ///
    /// No crash point can leave a BAT entry pointing at unwritten space or a file without a
    /// footer at its end; the worst outcome is a leaked block, which `check -r leaks` trims.
    fn allocate(&self, blk: u64, inb: u64, data: &[u8]) -> Result<()> {
        let (footer, footer_pos, bitmap, bs, bat_off) = {
            let m = self.m();
            let h = m.header.as_ref().ok_or_else(|| {
                Error::corrupt("VHD dynamic header", 0, "missing on a dynamic disk")
            })?;
            (
                m.footer.clone(),
                m.footer_pos,
                m.bitmap,
                m.block_size as u64,
                h.table_offset,
            )
        };
        let pos = block_position(footer_pos, bitmap);
        let sector = pos / SECTOR;
        if sector >= UNALLOCATED as u64 {
            return Err(Error::Unsupported(
                "VHD file too large: block offset does not fit the 32-bit BAT".into(),
            ));
        }
        let end = pos + bitmap + bs;
        let s = &*self.storage;
        let cur_len = s.len().map_err(|e| io_err("reading VHD file length", e))?;
        if let Err(e) =
            write_all(s, &footer.to_bytes(), end, "VHD footer").and_then(|_| flush_storage(s))
        {
            // A failed or short footer write must not leave a torn footer at EOF: cut it off
            // again (best effort; the old footer is still intact).
            let _ = s.set_len(cur_len);
            return Err(e);
        }
        // Space past the old footer is normally fresh (zeros); if an earlier failed attempt
        // left bytes there, zero the payload so unwritten sectors read as zeros.
        if cur_len > footer_pos + FOOTER_SIZE as u64 {
            disk::write_zeros(s, pos + bitmap, bs).map_err(|e| io_err("zeroing new block", e))?;
        }
        let mut bm = vec![0u8; bitmap as usize];
        if self.kind == DiskType::Differencing {
            let lsb = self.m().bitmap_lsb;
            set_bits(
                &mut bm,
                0,
                inb / SECTOR,
                (inb + data.len() as u64) / SECTOR,
                lsb,
            );
        } else {
            bm.fill(0xFF);
        }
        write_all(s, &bm, pos, "VHD sector bitmap")?;
        write_all(s, data, pos + bitmap + inb, "VHD data block")?;
        flush_storage(s)?;
        // A short write may have torn the entry: the old value goes back, so the block is
        // merely leaked (and reused by the next allocation). Memory changes only on success.
        self.write_bat_entry(bat_off + 4 * blk, sector as u32, UNALLOCATED)?;
        let mut m = self.mw();
        m.bat[blk as usize] = sector as u32;
        m.footer_pos = end;
        m.file_len = m.file_len.max(end + FOOTER_SIZE as u64);
        Ok(())
    }

    fn write_in_block(&self, blk: u64, inb: u64, data: &[u8]) -> Result<()> {
        let m = self.m();
        let (entry, bitmap) = (m.bat[blk as usize], m.bitmap);
        let diff = self.kind == DiskType::Differencing;
        // Whole sectors only: the request layer (disk::Disk) merged any partial sector.
        drop(m);
        if entry == UNALLOCATED {
            return self.allocate(blk, inb, data);
        }
        let base = entry as u64 * SECTOR;
        write_all(&*self.storage, data, base + bitmap + inb, "VHD data block")?;
        if diff {
            let end = inb + data.len() as u64;
            let (first, mut bm) = self.read_bitmap(entry, inb, end)?;
            let before = bm.clone();
            let lsb = self.m().bitmap_lsb;
            set_bits(&mut bm, first * 8, inb / SECTOR, end / SECTOR, lsb);
            if bm != before {
                // Data must be durable before the bit that exposes it, or a crash could show
                // never-written sectors instead of the parent's data.
                flush_storage(&*self.storage)?;
                write_all(&*self.storage, &bm, base + first, "VHD sector bitmap")?;
            }
        }
        Ok(())
    }

    /// Writes the trailing footer and (dynamic) the copy at offset 0 from `m.footer`.
    fn write_footers(&self, m: &Meta) -> Result<()> {
        let b = m.footer.to_bytes();
        let s = &*self.storage;
        write_all(s, &b, m.footer_pos, "VHD footer")?;
        if self.kind != DiskType::Fixed {
            flush_storage(s)?;
            write_all(s, &b, 0, "VHD footer copy")?;
        }
        flush_storage(s)
    }

    fn write_header(&self, h: &DynHeader, hoff: u64) -> Result<()> {
        write_all(&*self.storage, &h.to_bytes(), hoff, "VHD dynamic header")?;
        flush_storage(&*self.storage)
    }

    /// Appends `len` bytes of space at the end (before the trailing footer, which moves after
    /// it, written and flushed first). Returns the offset of the new space.
    fn append_space(&self, len: u64) -> Result<u64> {
        let mut m = self.mw();
        let pos = m.footer_pos.div_ceil(SECTOR) * SECTOR;
        let end = pos + len.div_ceil(SECTOR) * SECTOR;
        write_all(&*self.storage, &m.footer.to_bytes(), end, "VHD footer")?;
        flush_storage(&*self.storage)?;
        m.footer_pos = end;
        m.file_len = m.file_len.max(end + FOOTER_SIZE as u64);
        Ok(pos)
    }

    /// Re-links a differencing disk to a new parent (`rebase -u`): parent unique id, time
    /// stamp, name and W2ku/W2ru locators.
    ///
    /// Crash order: the new locator payloads go to fresh space appended at the end (the old
    /// payloads stay intact), flush; then the 1024-byte header, flush. A crash before the
    /// header write leaves the complete old link. The header spans two sectors, so a torn
    /// header write can mix old and new halves (the checksum then fails, which we tolerate with
    /// a warning): the unique id and the locators then name different parents, and opening the
    /// chain fails with a parent mismatch instead of reading wrong data; `set_parent` again
    /// repairs it. The old locator space is left unused (a few KiB per rebase).
    pub fn set_parent(&self, parent_path: &Path, parent: &dyn BlockDevice) -> Result<()> {
        self.set_parent_with(parent_path, &disk::ParentWindowsPaths::default(), parent)
    }

    /// [`VhdDisk::set_parent`], also recording the parent's Windows path when it is known.
    pub fn set_parent_with(
        &self,
        parent_path: &Path,
        windows: &disk::ParentWindowsPaths,
        parent: &dyn BlockDevice,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.kind != DiskType::Differencing {
            return Err(Error::InvalidArgument(
                "set_parent needs a differencing VHD".into(),
            ));
        }
        if parent.size() != self.size() {
            return Err(Error::InvalidArgument(format!(
                "new parent size {} differs from the child's size {}",
                parent.size(),
                self.size()
            )));
        }
        let id = parent.unique_id().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} has no unique id (not a VHD?)",
                parent_path.display()
            ))
        })?;
        let _g = self.wl();
        self.usable()?;
        let link = ParentPaths::new(parent_path, self.path.as_deref(), windows)?;
        let (mut h, hoff) = {
            let m = self.m();
            let h = m
                .header
                .clone()
                .ok_or_else(|| Error::corrupt("VHD dynamic header", 0, "missing"))?;
            (h, m.header_offset)
        };
        let payloads = link.payloads();
        let mut new_locs: [LocatorEntry; 8] = Default::default();
        for (slot, (code, data)) in payloads.iter().enumerate() {
            let space = (data.len() as u64).div_ceil(4096).max(1) * 4096;
            let off = self.append_space(space)?;
            write_all(&*self.storage, data, off, "VHD parent locator data")?;
            new_locs[slot] = LocatorEntry {
                code: *code,
                data_space: space as u32,
                data_len: data.len() as u32,
                reserved: 0,
                data_offset: off,
            };
        }
        flush_storage(&*self.storage)?;
        h.parent_unique_id = id;
        h.parent_timestamp = parent_timestamp(parent);
        h.parent_name = link.name_units();
        h.locators = new_locs;
        self.write_header(&h, hoff)?;
        let fresh = load(&*self.storage, SizeRule::CurrentSize, true)?;
        let mut m = self.mw();
        m.header = Some(h);
        m.locators = fresh.locators;
        Ok(())
    }

    /// Grows the disk. Fixed: the footer moves to the new end. Dynamic/differencing: the BAT
    /// grows in place when there is room before the first block, else it is relocated to the
    /// end of the file. Shrinking is refused.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let _g = self.wl();
        self.usable()?;
        let cur = self.size();
        let rule_chs = self.m().rule == "chs";
        let mut new_size = new_size.div_ceil(SECTOR) * SECTOR;
        if rule_chs {
            new_size = round_to_chs(new_size).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{new_size} bytes cannot be represented in CHS geometry (this image's size rule)"
                ))
            })?;
        }
        if new_size < cur {
            return Err(Error::InvalidArgument(format!(
                "shrinking a VHD ({cur} -> {new_size} bytes) is not supported: it would drop data"
            )));
        }
        if new_size == cur {
            return Ok(());
        }
        let s = &*self.storage;
        let geometry = chs_for_sectors(new_size / SECTOR);
        if self.kind == DiskType::Fixed {
            if new_size > MAX_FIXED_SIZE {
                return Err(Error::InvalidArgument("fixed VHD limit is 32 TiB".into()));
            }
            let mut m = self.mw();
            let old_pos = m.footer_pos;
            // Memory changes only once the file has the new footer.
            let mut footer = m.footer.clone();
            footer.current_size = new_size;
            footer.geometry = geometry;
            // New footer first (the file then ends in a valid footer), then zero the old one,
            // which is now inside the data area.
            write_all(s, &footer.to_bytes(), new_size, "VHD footer")?;
            flush_storage(s)?;
            disk::write_zeros(s, old_pos, FOOTER_SIZE as u64)
                .map_err(|e| io_err("zeroing old footer", e))?;
            flush_storage(s)?;
            m.footer = footer;
            m.footer_pos = new_size;
            m.file_len = new_size + FOOTER_SIZE as u64;
            m.size = new_size;
            return Ok(());
        }
        if new_size > MAX_DYNAMIC_SIZE {
            return Err(Error::InvalidArgument(
                "dynamic VHD limit is 2040 GiB".into(),
            ));
        }
        let (mut h, hoff, bat, bs) = {
            let m = self.m();
            let h = m
                .header
                .clone()
                .ok_or_else(|| Error::corrupt("VHD dynamic header", 0, "missing"))?;
            (h, m.header_offset, m.bat.clone(), m.block_size as u64)
        };
        let needed = new_size.div_ceil(bs);
        if needed > MAX_BAT_ENTRIES {
            return Err(Error::InvalidArgument(format!(
                "{new_size} bytes in {bs}-byte blocks needs more than {MAX_BAT_ENTRIES} BAT entries"
            )));
        }
        if needed > h.max_table_entries as u64 || needed > bat.len() as u64 {
            let old_entries = bat.len() as u64;
            let mut table = Vec::with_capacity((needed * 4) as usize);
            for &e in &bat {
                table.extend_from_slice(&e.to_be_bytes());
            }
            table.resize(
                (needed * 4).div_ceil(SECTOR) as usize * SECTOR as usize,
                0xFF,
            );
            // Room in place: up to the first block or locator after the BAT.
            let limit = {
                let m = self.m();
                let mut lim = m.footer_pos;
                for &e in &bat {
                    if e != UNALLOCATED {
                        lim = lim.min(e as u64 * SECTOR);
                    }
                }
                for l in &m.locators {
                    if l.data_offset >= h.table_offset {
                        lim = lim.min(l.data_offset);
                    }
                }
                if m.header_offset >= h.table_offset {
                    lim = lim.min(m.header_offset);
                }
                lim
            };
            let new_off = if h.table_offset + table.len() as u64 <= limit {
                h.table_offset
            } else {
                self.append_space(table.len() as u64)?
            };
            // New entries (or the whole relocated table) first, then the header that makes
            // them count.
            let from = if new_off == h.table_offset {
                old_entries * 4
            } else {
                0
            };
            write_all(s, &table[from as usize..], new_off + from, "VHD BAT")?;
            flush_storage(s)?;
            h.table_offset = new_off;
            h.max_table_entries = (table.len() / 4) as u32;
            self.write_header(&h, hoff)?;
            let mut m = self.mw();
            m.bat.resize(needed as usize, UNALLOCATED);
            m.header = Some(h);
        } else {
            self.mw().bat.resize(needed as usize, UNALLOCATED);
        }
        // The size lives in the footers: memory takes it only once they are written (until
        // then writes past the old size are refused and allocations write the old footer).
        let mut snapshot = self.m().clone();
        snapshot.footer.current_size = new_size;
        snapshot.footer.geometry = geometry;
        self.write_footers(&snapshot)?;
        let mut m = self.mw();
        m.footer.current_size = new_size;
        m.footer.geometry = geometry;
        m.size = new_size;
        Ok(())
    }

    /// Frees all-zero blocks of a dynamic disk and shrinks the file by moving the last blocks
    /// into the holes. Differencing disks are left alone (a zero block there may hide parent
    /// data); fixed disks have nothing to free.
    pub fn compact(&self) -> Result<CompactStats> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let _g = self.wl();
        self.usable()?;
        let s = &*self.storage;
        let before = s.len().map_err(|e| io_err("reading file length", e))?;
        let mut st = CompactStats {
            file_size_before: before,
            file_size_after: before,
            ..Default::default()
        };
        if self.kind != DiskType::Dynamic {
            return Ok(st);
        }
        let (bat_off, bs, bitmap, meta_end) = {
            let m = self.m();
            let h = m
                .header
                .as_ref()
                .ok_or_else(|| Error::corrupt("VHD dynamic header", 0, "missing"))?;
            let mut end = m.header_offset + HEADER_SIZE as u64;
            end = end.max(h.table_offset + h.max_table_entries as u64 * 4);
            for l in &m.locators {
                end = end.max(l.data_offset + l.data_space_bytes);
            }
            (h.table_offset, m.block_size as u64, m.bitmap, end)
        };
        let slot = bitmap + bs;
        let mut buf = vec![0u8; bs as usize];
        // 1. Unmap zero blocks (they read as zeros either way).
        let n = self.m().bat.len();
        let mut freed = Vec::new();
        for i in 0..n {
            let e = self.m().bat[i];
            if e == UNALLOCATED {
                continue;
            }
            read_exact(s, &mut buf, e as u64 * SECTOR + bitmap, "VHD data block")?;
            if disk::is_zero(&buf) {
                // A short write may have torn the entry: the old value goes back, as
                // allocation does.
                self.write_bat_entry(bat_off + 4 * i as u64, UNALLOCATED, e)?;
                self.mw().bat[i] = UNALLOCATED;
                freed.push(e as u64 * SECTOR);
                st.blocks_freed += 1;
            }
        }
        flush_storage(s)?;
        // 2. Move the highest block into the lowest hole left by a freed block (an exact slot
        // of the same size, so any layout works). A move copies, flushes, and only then
        // repoints the BAT entry, so the old copy stays valid until the entry changes.
        let mut holes: std::collections::BTreeSet<u64> = freed.into_iter().collect();
        let mut used: std::collections::BTreeMap<u64, usize> = self
            .m()
            .bat
            .iter()
            .enumerate()
            .filter(|(_, &e)| e != UNALLOCATED)
            .map(|(i, &e)| (e as u64 * SECTOR, i))
            .collect();
        let mut whole = vec![0u8; slot as usize];
        while let (Some(&h), Some((&last_off, &last_i))) = (holes.first(), used.last_key_value()) {
            if h >= last_off {
                break;
            }
            read_exact(s, &mut whole, last_off, "VHD data block")?;
            write_sparse(s, &whole, h)?;
            flush_storage(s)?;
            {
                let mut m = self.mw();
                // A torn entry would point nowhere: the old one goes back; the old copy of the
                // block is still intact.
                self.write_bat_entry(
                    bat_off + 4 * last_i as u64,
                    (h / SECTOR) as u32,
                    (last_off / SECTOR) as u32,
                )?;
                m.bat[last_i] = (h / SECTOR) as u32;
            }
            flush_storage(s)?;
            holes.remove(&h);
            used.remove(&last_off);
            used.insert(h, last_i);
            st.blocks_moved += 1;
        }
        // 3. Trim: footer at the new end first, then truncate.
        let end = {
            let m = self.m();
            m.bat
                .iter()
                .filter(|&&e| e != UNALLOCATED)
                .map(|&e| e as u64 * SECTOR + slot)
                .max()
                .unwrap_or(meta_end)
                .max(meta_end)
        };
        let mut m = self.mw();
        if end < m.footer_pos {
            write_all(s, &m.footer.to_bytes(), end, "VHD footer")?;
            flush_storage(s)?;
            s.set_len(end + FOOTER_SIZE as u64)
                .map_err(|e| io_err("truncating VHD file", e))?;
            flush_storage(s)?;
            m.footer_pos = end;
            m.file_len = end + FOOTER_SIZE as u64;
        }
        drop(m);
        // 4. Freed slots still below the end (durable now that their BAT entries are) go back
        // to the file system, so compacting never leaves more bytes allocated than before.
        for h in holes {
            if h + slot <= end {
                s.punch_hole(h, slot)
                    .map_err(|e| io_err("releasing a freed VHD block", e))?;
            }
        }
        flush_storage(s)?;
        st.file_size_after = s.len().map_err(|e| io_err("reading file length", e))?;
        Ok(st)
    }

    // ---- creating ----

    /// Creates a new image file (refuses an existing one).
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<VhdDisk> {
        // Validate before touching the file system.
        resolve_size(opts)?;
        let s = FileStorage::create_with(path, &opts.file)?;
        match Self::create_on(Arc::new(s), opts) {
            Ok(d) => Ok(d),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }

    /// Creates an image on an empty store.
    pub fn create_on(storage: Arc<dyn Storage>, opts: &CreateOptions) -> Result<VhdDisk> {
        let cur = storage
            .len()
            .map_err(|e| io_err("reading file length", e))?;
        if cur != 0 {
            return Err(Error::InvalidArgument(
                "create_on needs an empty store".into(),
            ));
        }
        let size = resolve_size(opts)?;
        let kind = match opts.kind {
            CreateKind::Fixed => DiskType::Fixed,
            CreateKind::Dynamic => DiskType::Dynamic,
            CreateKind::Differencing { .. } => DiskType::Differencing,
        };
        let footer = Footer {
            features: 2,
            version: 0x0001_0000,
            data_offset: if kind == DiskType::Fixed {
                u64::MAX
            } else {
                512
            },
            timestamp: vhd_now(),
            creator_app: *b"vrdn",
            creator_version: creator_version(),
            creator_os: PLAT_WI2K,
            original_size: size,
            current_size: size,
            geometry: chs_for_sectors(size / SECTOR),
            disk_type_code: kind.code(),
            stored_checksum: 0,
            unique_id: random_uuid(),
            saved_state: 0,
            reserved: vec![0; FOOTER_SIZE - 85],
        };
        let s = &*storage;
        if kind == DiskType::Fixed {
            s.set_len(size).map_err(|e| io_err("sizing fixed VHD", e))?;
            write_all(s, &footer.to_bytes(), size, "VHD footer")?;
            flush_storage(s)?;
        } else {
            let bs = opts.block_size as u64;
            let entries = size.div_ceil(bs);
            let bat_off = 1536u64;
            let bat_bytes = (entries * 4).div_ceil(SECTOR) * SECTOR;
            let mut end = bat_off + bat_bytes;
            let mut h = DynHeader {
                data_offset: u64::MAX,
                table_offset: bat_off,
                version: 0x0001_0000,
                max_table_entries: entries as u32,
                block_size: opts.block_size,
                stored_checksum: 0,
                parent_unique_id: [0; 16],
                parent_timestamp: 0,
                reserved1: 0,
                parent_name: Vec::new(),
                locators: Default::default(),
            };
            let mut locs = Vec::new();
            if let CreateKind::Differencing {
                parent_path,
                parent,
            } = &opts.kind
            {
                let link = ParentPaths::new(parent_path, storage.path(), &opts.parent_windows)?;
                h.parent_unique_id = parent.unique_id().ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "{} has no unique id: a differencing VHD needs a VHD parent",
                        parent_path.display()
                    ))
                })?;
                h.parent_timestamp = parent_timestamp(&**parent);
                h.parent_name = link.name_units();
                for (slot, (code, data)) in link.payloads().into_iter().enumerate() {
                    // Generous space (bytes, like Windows) so set_parent can rewrite in place.
                    let space = (data.len() as u64).div_ceil(4096).max(1) * 4096;
                    h.locators[slot] = LocatorEntry {
                        code,
                        data_space: space as u32,
                        data_len: data.len() as u32,
                        reserved: 0,
                        data_offset: end,
                    };
                    locs.push((end, data));
                    end += space;
                }
            }
            // BAT of all-ones, in bounded chunks.
            let chunk = vec![0xFFu8; bat_bytes.min(1 << 20) as usize];
            let mut off = 0;
            while off < bat_bytes {
                let n = (bat_bytes - off).min(chunk.len() as u64) as usize;
                write_all(s, &chunk[..n], bat_off + off, "VHD BAT")?;
                off += n as u64;
            }
            for (o, d) in &locs {
                write_all(s, d, *o, "VHD parent locator data")?;
            }
            write_all(s, &h.to_bytes(), 512, "VHD dynamic header")?;
            let fb = footer.to_bytes();
            write_all(s, &fb, 0, "VHD footer copy")?;
            write_all(s, &fb, end, "VHD footer")?;
            flush_storage(s)?;
        }
        let mut d = Self::open(
            storage,
            &OpenOptions {
                read_only: false,
                size_rule: SizeRule::CurrentSize,
            },
        )?;
        if let CreateKind::Differencing { parent, .. } = &opts.kind {
            d.attach_parent(parent.clone())?;
        }
        Ok(d)
    }
}

fn creator_version() -> u32 {
    let major: u32 = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap_or(0);
    let minor: u32 = env!("CARGO_PKG_VERSION_MINOR").parse().unwrap_or(0);
    (major << 16) | (minor & 0xFFFF)
}

/// The "Parent Time Stamp" a child records: the parent file's modification time, in seconds
/// since 2000-01-01 UTC (0 when it is unknown). Nothing verifies it when a chain is opened
/// (the Unique ID is the identity), so it is informational.
fn parent_timestamp(parent: &dyn BlockDevice) -> u32 {
    parent
        .path()
        .and_then(|p| std::fs::metadata(p).ok())
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| {
            d.as_secs()
                .saturating_sub(VHD_EPOCH)
                .min(u64::from(u32::MAX)) as u32
        })
        .unwrap_or(0)
}

/// Sets bitmap bits (MSB-first) for sectors `from..to`; `base` is the sector of bit 7 of
/// byte 0 of `bm`.
fn set_bits(bm: &mut [u8], base: u64, from: u64, to: u64, lsb: bool) {
    for s in from..to {
        let i = s - base;
        if let Some(b) = bm.get_mut((i / 8) as usize) {
            *b |= bit_mask(i, lsb);
        }
    }
}

/// The bit of `sector` within its bitmap byte: MSB-first per the spec; LSB-first for images
/// from blktap `tap` version 0x00000001 (FORMATS 12.5).
fn bit_mask(sector: u64, lsb: bool) -> u8 {
    if lsb {
        1 << (sector % 8)
    } else {
        0x80 >> (sector % 8)
    }
}

/// The paths a child records for its parent. The relative path (W2ru) is always written; the
/// Windows absolute path (W2ku, and the header's parent name) only when the caller knows it:
/// a POSIX path there means nothing to Windows, and libvhdi takes the name after its last
/// backslash, so the header then carries the parent's bare file name.
struct ParentPaths {
    windows_absolute: Option<String>,
    relative: String,
    file_name: String,
}

impl ParentPaths {
    fn new(
        parent: &Path,
        child: Option<&Path>,
        windows: &disk::ParentWindowsPaths,
    ) -> Result<Self> {
        let abs = std::path::absolute(parent)
            .map_err(|e| io_err(format!("resolving {}", parent.display()), e))?;
        let file = abs
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("{} has no file name", parent.display()))
            })?;
        let relative = match child.and_then(|c| std::path::absolute(c).ok()) {
            Some(c) => disk::windows_relative_path(c.parent().unwrap_or(Path::new("/")), &abs),
            None => format!(".\\{file}"),
        };
        Ok(ParentPaths {
            windows_absolute: windows.absolute.clone().filter(|w| !w.is_empty()),
            relative,
            file_name: file,
        })
    }

    /// Locator payloads, relative first (what every reader here tries first).
    fn payloads(&self) -> Vec<(u32, Vec<u8>)> {
        let mut v = vec![(PLAT_W2RU, utf16le(&self.relative))];
        if let Some(w) = &self.windows_absolute {
            v.push((PLAT_W2KU, utf16le(w)));
        }
        v
    }

    /// UTF-16 units of the header's parent name: the Windows absolute path when known (and it
    /// fits), else the file name.
    fn name_units(&self) -> Vec<u16> {
        if let Some(w) = &self.windows_absolute {
            let u: Vec<u16> = w.encode_utf16().collect();
            if u.len() <= 255 {
                return u;
            }
        }
        self.file_name.encode_utf16().take(255).collect()
    }
}

/// The virtual size a create will produce, after the size rule and Azure rounding.
fn resolve_size(opts: &CreateOptions) -> Result<u64> {
    let mut size = match &opts.kind {
        CreateKind::Differencing { parent, .. } => parent.size(),
        _ => opts.size,
    };
    if let CreateKind::Differencing { .. } = opts.kind {
        if size % SECTOR != 0 {
            return Err(Error::InvalidArgument(format!(
                "parent size {size} is not a multiple of 512"
            )));
        }
    }
    if opts.azure {
        if !matches!(opts.kind, CreateKind::Fixed) {
            return Err(Error::InvalidArgument(
                "Azure-ready VHDs must be fixed".into(),
            ));
        }
        size = size.div_ceil(1 << 20) << 20;
        if !((20 << 20)..=MAX_FIXED_SIZE).contains(&size) {
            return Err(Error::InvalidArgument(format!(
                "Azure needs 20 MiB <= size <= 32 TiB, got {size}"
            )));
        }
    } else if opts.size_rule == SizeRule::Chs {
        size = round_to_chs(size).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{size} bytes cannot be represented in CHS geometry (max {}); use the current_size rule",
                MAX_CHS_SECTORS * SECTOR
            ))
        })?;
    } else {
        size = size.div_ceil(SECTOR) * SECTOR;
    }
    match opts.kind {
        CreateKind::Fixed => {
            if size > MAX_FIXED_SIZE {
                return Err(Error::InvalidArgument(format!(
                    "fixed VHD size {size} exceeds 32 TiB"
                )));
            }
        }
        _ => {
            if size > MAX_DYNAMIC_SIZE {
                return Err(Error::InvalidArgument(format!(
                    "dynamic VHD size {size} exceeds 2040 GiB"
                )));
            }
            let bs = opts.block_size;
            if !bs.is_power_of_two() || !(4096..=MAX_BLOCK_SIZE).contains(&bs) {
                return Err(Error::InvalidArgument(format!(
                    "block size {bs} must be a power of two between 4 KiB and 256 MiB"
                )));
            }
            if size.div_ceil(bs as u64) > MAX_BAT_ENTRIES {
                return Err(Error::InvalidArgument(format!(
                    "{size} bytes in {bs}-byte blocks needs more than {MAX_BAT_ENTRIES} blocks; use a larger block size"
                )));
            }
        }
    }
    Ok(size)
}

/// Bytes a new image of `size` needs with `allocated` bytes of data (rounded to whole blocks),
/// and fully allocated. Follows our own layout (BAT at 1536, Windows 4 KiB payload alignment).
pub fn measure(size: u64, allocated: u64, opts: &CreateOptions) -> (u64, u64) {
    let probe = CreateOptions {
        kind: match opts.kind {
            CreateKind::Fixed => CreateKind::Fixed,
            _ => CreateKind::Dynamic,
        },
        size,
        block_size: opts.block_size,
        size_rule: opts.size_rule,
        azure: opts.azure,
        parent_windows: disk::ParentWindowsPaths::default(),
        file: opts.file,
    };
    let size = resolve_size(&probe).unwrap_or(size.div_ceil(SECTOR) * SECTOR);
    if matches!(opts.kind, CreateKind::Fixed) {
        let t = size + FOOTER_SIZE as u64;
        return (t, t);
    }
    let bs = opts.block_size.max(4096) as u64;
    let bitmap = bitmap_bytes(bs as u32);
    let entries = size.div_ceil(bs);
    let mut meta_end = 1536 + (entries * 4).div_ceil(SECTOR) * SECTOR;
    if matches!(opts.kind, CreateKind::Differencing { .. }) {
        meta_end += 2 * 4096;
    }
    let first = block_position(meta_end, bitmap);
    // With 4 KiB-multiple block sizes, block k starts at first + k * stride.
    let stride = bitmap.div_ceil(4096) * 4096 + bs.div_ceil(4096) * 4096;
    let total = |n: u64| -> u64 {
        if n == 0 {
            meta_end + FOOTER_SIZE as u64
        } else {
            first + (n - 1) * stride + bitmap + bs + FOOTER_SIZE as u64
        }
    };
    let used = allocated.div_ceil(bs).min(entries);
    (total(used), total(entries))
}

impl BlockDevice for VhdDisk {
    fn format(&self) -> &'static str {
        "vhd"
    }

    fn size(&self) -> u64 {
        self.m().size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // A shared guard for the whole read: many readers at once, but compact/resize (which
        // take it exclusively) cannot move blocks mid-read.
        let m = self.m();
        let bs = m.block_size as u64;
        check_range(offset, buf.len() as u64, m.size)?;
        if self.kind == DiskType::Fixed {
            return read_exact(&*self.storage, buf, offset, "VHD fixed disk data");
        }
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let blk = off / bs;
            let inb = off % bs;
            let n = ((bs - inb) as usize).min(buf.len() - done);
            let entry = m.bat.get(blk as usize).copied().unwrap_or(UNALLOCATED);
            self.read_in_block(&m, blk, entry, inb, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let (size, bs) = {
            let m = self.m();
            (m.size, m.block_size as u64)
        };
        check_aligned(offset, buf.len() as u64, size, SECTOR as u32)?;
        self.usable()?;
        if self.kind == DiskType::Fixed {
            return write_all(&*self.storage, buf, offset, "VHD fixed disk data");
        }
        let _g = self.wl();
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let blk = off / bs;
            let inb = off % bs;
            let n = ((bs - inb) as usize).min(buf.len() - done);
            let data = &buf[done..done + n];
            // Writing zeros into an unallocated block of a dynamic disk changes nothing.
            let skip = self.kind == DiskType::Dynamic
                && self.m().bat[blk as usize] == UNALLOCATED
                && disk::is_zero(data);
            if !skip {
                self.write_in_block(blk, inb, data)?;
            }
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.usable()?;
        flush_storage(&*self.storage)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_aligned(offset, len, self.size(), SECTOR as u32)?;
        self.usable()?;
        if self.kind == DiskType::Fixed && flags.may_unmap {
            // The data area is the file itself: a hole reads as zeros.
            return self
                .storage
                .punch_hole(offset, len)
                .map_err(|e| io_err(format!("zeroing {len} bytes at {offset}"), e));
        }
        // write_at skips zero writes to unallocated dynamic blocks; nothing is freed here
        // (freeing a block in the middle of the file would only leak its space).
        disk::write_zero_buffers(self, offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let m = self.m();
        check_range(offset, len, m.size)?;
        if self.kind == DiskType::Fixed {
            return Ok(Extent {
                len,
                allocation: Allocation::Data {
                    host_offset: Some(offset),
                },
            });
        }
        let bs = m.block_size as u64;
        let end = offset + len;
        let blk = offset / bs;
        let entry = m.bat.get(blk as usize).copied().unwrap_or(UNALLOCATED);
        if entry == UNALLOCATED {
            // Merge following unallocated blocks.
            let mut b = blk + 1;
            while b * bs < end && m.bat.get(b as usize).copied() == Some(UNALLOCATED) {
                b += 1;
            }
            // A dynamic disk defines unallocated blocks as zeros (qemu-img map reports them
            // present+zero); only a differencing disk defers them to its parent.
            let allocation = if self.kind == DiskType::Dynamic {
                Allocation::Zero
            } else {
                Allocation::Unallocated
            };
            return Ok(Extent {
                len: (b * bs).min(end) - offset,
                allocation,
            });
        }
        let inb = offset % bs;
        let data = entry as u64 * SECTOR + m.bitmap + inb;
        let blk_end = ((blk + 1) * bs).min(end);
        if self.kind == DiskType::Dynamic {
            return Ok(Extent {
                len: blk_end - offset,
                allocation: Allocation::Data {
                    host_offset: Some(data),
                },
            });
        }
        let hi = blk_end - blk * bs;
        let lsb = m.bitmap_lsb;
        let (first, bm) = self.read_bitmap(entry, inb, hi)?;
        let bit = |sector: u64| -> bool {
            bm.get((sector / 8 - first) as usize)
                .is_some_and(|b| b & bit_mask(sector, lsb) != 0)
        };
        let present = bit(inb / SECTOR);
        let mut q = (inb / SECTOR + 1) * SECTOR;
        while q < hi && bit(q / SECTOR) == present {
            q += SECTOR;
        }
        let n = q.min(hi) - inb;
        Ok(Extent {
            len: n,
            allocation: if present {
                Allocation::Data {
                    host_offset: Some(data),
                }
            } else {
                Allocation::Unallocated
            },
        })
    }

    fn backing(&self) -> Option<&Arc<dyn BlockDevice>> {
        self.parent.as_ref()
    }

    fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn unique_id(&self) -> Option<[u8; 16]> {
        Some(self.m().footer.unique_id)
    }

    fn parent_link(&self) -> Option<ParentLink> {
        if self.kind != DiskType::Differencing {
            return None;
        }
        let m = self.m();
        let h = m.header.as_ref()?;
        let dir = self.child_dir();
        let mut cands: Vec<PathBuf> = Vec::new();
        let mut push = |p: PathBuf| {
            if !p.as_os_str().is_empty() && !cands.contains(&p) {
                cands.push(p);
            }
        };
        for l in &m.locators {
            if let (PLAT_W2RU | PLAT_WI2R, Some(p)) = (l.platform_code, &l.path) {
                let mut rel = slashes(p);
                while let Some(r) = rel.strip_prefix("./") {
                    rel = r.to_string();
                }
                push(dir.join(rel));
            }
        }
        for l in &m.locators {
            if let (PLAT_W2KU | PLAT_WI2K | PLAT_MACX, Some(p)) = (l.platform_code, &l.path) {
                push(PathBuf::from(p));
                let s = slashes(p);
                if &s != p {
                    push(PathBuf::from(s));
                }
            }
        }
        let name = h.parent_name_lossy();
        if let Some(file) = slashes(&name).rsplit('/').next().filter(|f| !f.is_empty()) {
            push(dir.join(file));
        }
        Some(ParentLink {
            name,
            candidates: cands,
            expected_id: h.parent_unique_id,
            also_accepted: None,
            format: "vhd",
        })
    }

    fn cluster_size(&self) -> Option<u64> {
        let m = self.m();
        (self.kind != DiskType::Fixed).then_some(m.block_size as u64)
    }

    fn facts(&self) -> disk::LayerFacts {
        let i = self.info();
        disk::LayerFacts {
            disk_type: Some(i.disk_type),
            creator_app: Some(i.creator_app),
            creator_host_os: Some(i.creator_host_os),
            size_rule: Some(i.size_rule),
            current_size: Some(i.current_size),
            chs_size: Some(i.chs_size),
            geometry: Some((i.cylinders, i.heads, i.sectors_per_track)),
            saved_state: i.saved_state,
        }
    }

    fn format_specific(&self) -> Option<serde_json::Value> {
        let i = self.info();
        let mut v = serde_json::to_value(&i).ok()?;
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "geometry".into(),
                serde_json::json!({
                    "cylinders": i.cylinders, "heads": i.heads,
                    "sectors-per-track": i.sectors_per_track,
                }),
            );
        }
        Some(v)
    }
}

impl Drop for VhdDisk {
    fn drop(&mut self) {
        if !self.read_only {
            let _ = self.storage.flush();
        }
    }
}

/// Writes a moved block into a free slot without allocating its zero runs: the slot is punched
/// first (so skipped runs read zeros), then only non-zero 4 KiB pieces are written. Compaction
/// uses it so moving a block never fills the holes it had.
fn write_sparse(s: &dyn Storage, buf: &[u8], off: u64) -> Result<()> {
    s.punch_hole(off, buf.len() as u64)
        .map_err(|e| io_err("clearing a VHD block slot", e))?;
    const PIECE: usize = 4096;
    let mut i = 0;
    while i < buf.len() {
        let start = i;
        while i < buf.len() && !disk::is_zero(&buf[i..(i + PIECE).min(buf.len())]) {
            i = (i + PIECE).min(buf.len());
        }
        if i > start {
            write_all(s, &buf[start..i], off + start as u64, "VHD data block")?;
        }
        while i < buf.len() && disk::is_zero(&buf[i..(i + PIECE).min(buf.len())]) {
            i = (i + PIECE).min(buf.len());
        }
    }
    Ok(())
}

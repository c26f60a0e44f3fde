//! Creating images (fixed, dynamic, differencing) in our layout: footer copy, header at 512,
//! BAT at 1536, locator payloads, then blocks with 4 KiB-aligned payloads; and `measure`, which
//! predicts the file size of that layout.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use disk::{BlockDevice, Error, FileStorage, Guid, Result, Storage};

use crate::alloc::block_position;
use crate::bitmap::bitmap_bytes;
use crate::dynamic_header::DynHeader;
use crate::footer::{DiskType, Footer, FOOTER_SIZE, VHD_EPOCH};
use crate::geometry::{chs_for_sectors, round_to_chs};
use crate::io::{flush_storage, io_err, write_all};
use crate::limits::*;
use crate::locator::{LocatorEntry, PLAT_WI2K};
use crate::parent::{parent_timestamp, ParentPaths};
use crate::{OpenOptions, SizeRule, VhdDisk};

pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Where we put the dynamic header and the BAT.
const HEADER_OFFSET: u64 = 512;
const BAT_OFFSET: u64 = 1536;

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
    /// Bound of the new image's BAT page cache ([`VhdDisk::open_with_cache`]).
    pub bat_cache_bytes: usize,
}

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
            bat_cache_bytes: crate::DEFAULT_BAT_CACHE_BYTES,
        }
    }
}

fn vhd_now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().saturating_sub(VHD_EPOCH) as u32)
        .unwrap_or(0)
}

fn creator_version() -> u32 {
    let major: u32 = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap_or(0);
    let minor: u32 = env!("CARGO_PKG_VERSION_MINOR").parse().unwrap_or(0);
    (major << 16) | (minor & 0xFFFF)
}

impl VhdDisk {
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
        let id = Guid::new_random().map_err(|e| io_err("drawing a random unique id", e))?;
        let mut footer = Footer::new(kind, size, id);
        if kind.is_sparse() {
            footer.data_offset = HEADER_OFFSET;
        }
        footer.timestamp = vhd_now();
        footer.creator_app = *b"vrdn";
        footer.creator_version = creator_version();
        footer.creator_os = PLAT_WI2K;
        footer.geometry = chs_for_sectors(size / SECTOR);
        let s = &*storage;
        if kind == DiskType::Fixed {
            s.set_len(size).map_err(|e| io_err("sizing fixed VHD", e))?;
            write_all(s, &footer.to_bytes(), size, "VHD footer")?;
            flush_storage(s)?;
        } else {
            write_sparse_layout(s, &footer, opts, size)?;
        }
        let mut d = Self::open_with_cache(
            storage,
            &OpenOptions {
                read_only: false,
                size_rule: SizeRule::CurrentSize,
            },
            opts.bat_cache_bytes,
        )?;
        if let CreateKind::Differencing { parent, .. } = &opts.kind {
            d.attach_parent(parent.clone())?;
        }
        Ok(d)
    }
}

/// Writes header, BAT (all unallocated), locator payloads and both footers of a new dynamic or
/// differencing image of `size` bytes.
fn write_sparse_layout(
    s: &dyn Storage,
    footer: &Footer,
    opts: &CreateOptions,
    size: u64,
) -> Result<()> {
    let bs = opts.block_size as u64;
    let entries = size.div_ceil(bs);
    let bat_bytes = (entries * 4).div_ceil(SECTOR) * SECTOR;
    let mut end = BAT_OFFSET + bat_bytes;
    let mut h = DynHeader::new(BAT_OFFSET, entries as u32, opts.block_size);
    let mut locs = Vec::new();
    if let CreateKind::Differencing {
        parent_path,
        parent,
    } = &opts.kind
    {
        let link = ParentPaths::new(parent_path, s.path(), &opts.parent_windows)?;
        let id = parent.unique_id().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} has no unique id: a differencing VHD needs a VHD parent",
                parent_path.display()
            ))
        })?;
        h.parent_unique_id = id;
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
        write_all(s, &chunk[..n], BAT_OFFSET + off, "VHD BAT")?;
        off += n as u64;
    }
    for (o, d) in &locs {
        write_all(s, d, *o, "VHD parent locator data")?;
    }
    write_all(s, &h.to_bytes(), HEADER_OFFSET, "VHD dynamic header")?;
    let fb = footer.to_bytes();
    write_all(s, &fb, 0, "VHD footer copy")?;
    write_all(s, &fb, end, "VHD footer")?;
    flush_storage(s)
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
        bat_cache_bytes: opts.bat_cache_bytes,
    };
    let size = resolve_size(&probe).unwrap_or(size.div_ceil(SECTOR) * SECTOR);
    if matches!(opts.kind, CreateKind::Fixed) {
        let t = size + FOOTER_SIZE as u64;
        return (t, t);
    }
    let bs = opts.block_size.max(4096) as u64;
    let bitmap = bitmap_bytes(bs as u32);
    let entries = size.div_ceil(bs);
    let mut meta_end = BAT_OFFSET + (entries * 4).div_ceil(SECTOR) * SECTOR;
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

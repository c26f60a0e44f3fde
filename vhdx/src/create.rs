//! Creating images: the layout of a new file (header section, log, metadata region, BAT, then
//! data) and writing its structures.

use super::*;

/// What to create.
#[derive(Clone, Debug)]
pub enum CreateKind {
    Fixed,
    Dynamic,
    Differencing {
        parent_path: PathBuf,
        parent: Arc<dyn BlockDevice>,
    },
}

/// Create options. `block_size` 0 means the default (1 MiB: right for Linux guests and accepted
/// by Hyper-V; docs/BLOCK_SIZE.md weighs it against Hyper-V's 32 MiB); `log_size` 0 means 1 MiB.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub kind: CreateKind,
    pub size: u64,
    pub block_size: u32,
    pub log_size: u32,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// Differencing: the parent's Windows paths when known (`absolute_win32_path`,
    /// `volume_path`); the relative path is always written.
    pub parent_windows: disk::ParentWindowsPaths,
    /// How the new file is opened (lock, skip_file_sync).
    pub file: disk::FileOptions,
    /// Bound of the new image's BAT page cache ([`VhdxDisk::open_with_cache`]).
    pub bat_cache_bytes: usize,
}

pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
pub const DEFAULT_LOG_SIZE: u32 = 1 << 20;

impl CreateOptions {
    /// Defaults: 1 MiB blocks, 1 MiB log, 512-byte logical and 4096-byte physical sectors (the
    /// physical size Hyper-V and WSL use). A differencing child takes size and logical sector
    /// size from its parent.
    pub fn new(kind: CreateKind, size: u64) -> Self {
        CreateOptions {
            kind,
            size,
            block_size: DEFAULT_BLOCK_SIZE,
            log_size: DEFAULT_LOG_SIZE,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            parent_windows: disk::ParentWindowsPaths::default(),
            file: disk::FileOptions::default(),
            bat_cache_bytes: crate::DEFAULT_BAT_CACHE_BYTES,
        }
    }
}

impl VhdxDisk {
    /// Creates an image at `path` (which must not exist).
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<VhdxDisk> {
        let s = FileStorage::create_with(path, &opts.file)?;
        let mut opts = opts.clone();
        Self::create_impl(Arc::new(s), &mut opts, Some(path))
    }

    /// Creates an image on an empty store.
    pub fn create_on(storage: Arc<dyn Storage>, opts: &CreateOptions) -> Result<VhdxDisk> {
        let mut opts = opts.clone();
        Self::create_impl(storage, &mut opts, None)
    }

    pub(crate) fn create_impl(
        storage: Arc<dyn Storage>,
        opts: &mut CreateOptions,
        path: Option<&Path>,
    ) -> Result<VhdxDisk> {
        let (locator, parent) = match &opts.kind {
            CreateKind::Differencing {
                parent_path,
                parent,
            } => {
                opts.size = parent.size();
                opts.logical_sector_size = parent.logical_sector_size();
                let child_path = path
                    .map(|p| p.to_path_buf())
                    .or_else(|| storage.path().map(|p| p.to_path_buf()))
                    .unwrap_or_else(|| PathBuf::from("child.vhdx"));
                (
                    Some(build_locator(
                        &child_path,
                        parent_path,
                        &opts.parent_windows,
                        &**parent,
                    )?),
                    Some(parent.clone()),
                )
            }
            _ => (None, None),
        };
        let layout = Layout::compute(opts)?;
        let fixed = matches!(opts.kind, CreateKind::Fixed);
        // Nothing at or past the BAT yet: unwritten BAT pieces read as zeros (holes).
        let fresh_store = storage
            .len()
            .map_err(io_err("cannot get the new image's length"))?
            <= layout.bat_offset;
        let has_parent = locator.is_some();
        let meta = Metadata {
            block_size: layout.block_size,
            leave_blocks_allocated: fixed,
            has_parent,
            virtual_size: layout.size,
            page83: new_guid()?,
            logical_sector: opts.logical_sector_size,
            physical_sector: opts.physical_sector_size,
            parent_locator: locator,
            entries: Vec::new(),
        };
        let geo = Geometry::new(
            layout.size,
            layout.block_size,
            opts.logical_sector_size,
            has_parent,
        );
        let w = |b: &[u8], o: u64| {
            storage
                .write_at(b, o)
                .map_err(io_err(format!("cannot write new image at {o:#x}")))
        };
        // File type identifier.
        w(&FileIdentifier::new("Viridian vhdx").to_bytes(), 0)?;
        let rt = RegionTable::new(
            layout.bat_offset,
            layout.bat_len as u32,
            layout.meta_offset,
            MIB as u32,
        );
        let rtb = rt.serialize();
        w(&rtb, RT1_OFFSET)?;
        w(&rtb, RT2_OFFSET)?;
        w(&build_metadata(&meta, MIB as usize), layout.meta_offset)?;
        // The BAT, a piece at a time (a 64 TiB disk with 1 MiB blocks has a 512 MiB BAT). All
        // zeros means "not present": on a store that held nothing there before, those pieces
        // stay holes, so an empty dynamic disk costs a few MiB on disk whatever its size.
        let bat_bytes = geo.bat_entries * 8;
        let mut piece = vec![0u8; bat_bytes.min(MIB) as usize];
        let mut end = layout.data_offset;
        let mut next_block = 0u64;
        let mut at = 0u64;
        while at < bat_bytes {
            let n = (bat_bytes - at).min(MIB) as usize;
            let piece = &mut piece[..n];
            piece.fill(0);
            if fixed {
                let first = at / 8;
                let last = first + n as u64 / 8;
                while next_block < geo.data_blocks {
                    let i = geo.payload_index(next_block) as u64;
                    if i >= last {
                        break;
                    }
                    let at = ((i - first) * 8) as usize;
                    piece[at..at + 8]
                        .copy_from_slice(&bat_entry(PB_FULLY_PRESENT, end).to_le_bytes());
                    end += geo.block_size;
                    next_block += 1;
                }
            }
            if !(fresh_store && disk::is_zero(piece)) {
                w(piece, layout.bat_offset + at)?;
            }
            at += n as u64;
        }
        storage
            .set_len(end)
            .map_err(io_err("cannot size new image"))?;
        let dwg = new_guid()?;
        let h = Header {
            sequence: 1,
            file_write_guid: new_guid()?,
            data_write_guid: dwg,
            log_guid: Guid::NIL,
            log_version: 0,
            version: 1,
            log_length: layout.log_size,
            log_offset: MIB,
        };
        w(&h.serialize(), HEADER1_OFFSET)?;
        let h2 = Header {
            sequence: 2,
            ..h.clone()
        };
        w(&h2.serialize(), HEADER2_OFFSET)?;
        storage.flush().map_err(io_err("cannot flush new image"))?;
        let mut d = Self::open_inner(storage, false, Lenient::default(), opts.bat_cache_bytes)?;
        if let Some(p) = parent {
            d.attach_parent(p)?;
        }
        Ok(d)
    }
}

/// Where everything goes in a new image.
struct Layout {
    size: u64,
    block_size: u32,
    log_size: u32,
    meta_offset: u64,
    bat_offset: u64,
    bat_len: u64,
    data_offset: u64,
}

impl Layout {
    fn compute(opts: &CreateOptions) -> Result<Layout> {
        let ls = opts.logical_sector_size;
        if ls != 512 && ls != 4096 {
            return Err(Error::InvalidArgument(format!(
                "logical sector size {ls} (512 or 4096)"
            )));
        }
        let ps = opts.physical_sector_size;
        if ps != 512 && ps != 4096 {
            return Err(Error::InvalidArgument(format!(
                "physical sector size {ps} (512 or 4096)"
            )));
        }
        let block_size = if opts.block_size == 0 {
            DEFAULT_BLOCK_SIZE
        } else {
            opts.block_size
        };
        if !block_size.is_power_of_two() || !(1 << 20..=256 << 20).contains(&block_size) {
            return Err(Error::InvalidArgument(format!(
                "block size {block_size} must be a power of 2 from 1 MiB to 256 MiB"
            )));
        }
        let log_size = if opts.log_size == 0 {
            DEFAULT_LOG_SIZE
        } else {
            opts.log_size
        };
        if !(log_size as u64).is_multiple_of(MIB) {
            return Err(Error::InvalidArgument(format!(
                "log size {log_size} must be a multiple of 1 MiB"
            )));
        }
        let size = round_up(opts.size, ls as u64);
        if size > MAX_SIZE {
            return Err(Error::InvalidArgument(format!(
                "size {} exceeds the VHDX maximum of 64 TiB",
                opts.size
            )));
        }
        let diff = matches!(opts.kind, CreateKind::Differencing { .. });
        let geo = Geometry::new(size, block_size, ls, diff);
        let meta_offset = MIB + log_size as u64;
        let bat_offset = meta_offset + MIB;
        let bat_len = round_up((geo.bat_entries * 8).max(1), MIB);
        Ok(Layout {
            size,
            block_size,
            log_size,
            meta_offset,
            bat_offset,
            bat_len,
            data_offset: bat_offset + bat_len,
        })
    }
}

/// (required bytes for `allocated` bytes of data, bytes when fully allocated).
pub fn measure(size: u64, allocated: u64, opts: &CreateOptions) -> (u64, u64) {
    let mut o = opts.clone();
    o.size = size;
    let Ok(l) = Layout::compute(&o) else {
        return (0, 0);
    };
    let bs = l.block_size as u64;
    let geo = Geometry::new(
        l.size,
        l.block_size,
        o.logical_sector_size,
        matches!(o.kind, CreateKind::Differencing { .. }),
    );
    let full = l.data_offset + geo.data_blocks * bs;
    let bitmaps = if matches!(o.kind, CreateKind::Differencing { .. }) {
        geo.bitmap_blocks * MIB
    } else {
        0
    };
    let req = match o.kind {
        CreateKind::Fixed => full,
        _ => l.data_offset + round_up(allocated.min(l.size), bs) + bitmaps,
    };
    (req, full + bitmaps)
}

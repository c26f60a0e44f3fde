//! VHDX (MS-VHDX v1.0): fixed, dynamic and differencing images; log replay (in place and in
//! memory); crash-consistent writes through a write-ahead log (see [`log`] for the scheme);
//! create, trim, block status, resize, compact, re-parenting, check and measure.

mod amend;
mod bat;
mod check;
pub mod format;
pub mod log;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bat::Bat;
use disk::{
    check_aligned, check_range, Access, Allocation, BlockDevice, Error, Extent, FileStorage,
    ParentLink, Result, Storage, ZeroFlags,
};
use format::*;

pub use check::check;

/// How to open an image.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    pub read_only: bool,
}

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
        }
    }
}

/// What compaction did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactStats {
    /// Blocks found to read as zeros (or unmapped) and released.
    pub blocks_released: u64,
    /// Blocks moved towards the start of the file.
    pub blocks_moved: u64,
    /// File length before and after.
    pub old_len: u64,
    pub new_len: u64,
}

/// Facts about an open image.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VhdxInfo {
    pub virtual_size: u64,
    pub block_size: u32,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub has_parent: bool,
    pub leave_blocks_allocated: bool,
    pub chunk_ratio: u64,
    pub header_sequence: u64,
    /// Sequence numbers of header 1 and header 2 (None where that copy is invalid).
    pub header_sequences: [Option<u64>; 2],
    pub file_write_guid: String,
    pub data_write_guid: String,
    pub log_guid: String,
    pub log_offset: u64,
    pub log_length: u32,
    pub bat_offset: u64,
    pub metadata_offset: u64,
    pub page83: String,
    pub parent_locator: Vec<(String, String)>,
    pub block_states: BTreeMap<String, u64>,
    pub replayed_log_entries: usize,
    pub dirty_at_open: bool,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let w = what.into();
    move |e| Error::io(w, e)
}

/// In-memory result of replaying a dirty log for a read-only open.
#[derive(Debug, Default)]
struct Overlay {
    pages: BTreeMap<u64, (usize, Box<[u8]>)>,
    zeros: Vec<(u64, u64, usize)>,
}

impl Overlay {
    fn is_empty(&self) -> bool {
        self.pages.is_empty() && self.zeros.is_empty()
    }
    /// Patches `buf` (read from the file at `off`) with the logged page images.
    fn patch(&self, buf: &mut [u8], off: u64) {
        let end = off + buf.len() as u64;
        let first = off / PAGE * PAGE;
        let mut p = first;
        while p < end {
            let data = self.pages.get(&p);
            let zero = self
                .zeros
                .iter()
                .filter(|(s, e, _)| p >= *s && p < *e)
                .map(|z| z.2)
                .max();
            let newest_data = match (data, zero) {
                (Some((di, img)), Some(zi)) if *di > zi => Some(Some(img)),
                (Some((_, img)), None) => Some(Some(img)),
                (_, Some(_)) => Some(None),
                (None, None) => None,
            };
            if let Some(src) = newest_data {
                let s = p.max(off);
                let e = (p + PAGE).min(end);
                let dst = &mut buf[(s - off) as usize..(e - off) as usize];
                match src {
                    Some(img) => dst.copy_from_slice(&img[(s - p) as usize..(e - p) as usize]),
                    None => dst.fill(0),
                }
            }
            p += PAGE;
        }
    }
}

#[derive(Debug)]
struct HeaderState {
    current: Header,
    /// 0: header 1 (64 KiB) is current; 1: header 2.
    slot: usize,
}

#[derive(Debug, Default)]
struct Bitmaps {
    /// Page images of sector-bitmap blocks, by file offset.
    pages: HashMap<u64, Box<[u8]>>,
    dirty: BTreeSet<u64>,
}

/// Where a page of a flush came from, to clear its dirty mark once it is durable.
#[derive(Clone, Copy, Debug)]
enum DirtyPage {
    Bitmap(u64),
    Bat(u64),
    Raw(u64),
}

#[derive(Debug)]
struct Wal {
    /// Other dirty metadata pages (metadata region, region tables), by file offset.
    raw_dirty: BTreeMap<u64, Box<[u8]>>,
    /// Where the next block goes.
    next_free: u64,
    sequence: u64,
    /// Ring offset and length of the last entry written.
    prev: Option<(u64, u64)>,
    /// Pages were applied after the last entry and are not yet flushed.
    applied_unflushed: bool,
    entries_written: u64,
}

/// An open VHDX image.
pub struct VhdxDisk {
    storage: Arc<dyn Storage>,
    path: Option<PathBuf>,
    read_only: bool,
    overlay: Overlay,
    header: Mutex<HeaderState>,
    regions: RwLock<RegionTable>,
    meta: RwLock<Metadata>,
    bat: RwLock<Bat>,
    bitmaps: Mutex<Bitmaps>,
    wal: Mutex<Wal>,
    parent: Option<Arc<dyn BlockDevice>>,
    /// A session (log active, write GUIDs changed) has started.
    session: AtomicBool,
    data_guid_changed: AtomicBool,
    /// The DataWriteGuid the first data write of this open takes, when the caller chose it in
    /// advance (crash-safe commit: the child already accepts it as `parent_linkage2`).
    next_data_write_guid: Mutex<Option<Guid>>,
    closed: AtomicBool,
    dirty_at_open: bool,
    replayed: usize,
    size_cache: AtomicU64,
    /// Set when a failure left state that no retry can make safe (a half-done resize or
    /// re-parenting, a half-written closing header): every later write, flush and close fails.
    failed: disk::FailLatch,
}

impl std::fmt::Debug for VhdxDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdxDisk")
            .field("path", &self.path)
            .field("size", &self.size())
            .field("read_only", &self.read_only)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn rlock<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}
fn wlock<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// Reads `buf` at `off` from `s`, patched by `ov`.
fn read_via(s: &dyn Storage, ov: &Overlay, buf: &mut [u8], off: u64, what: &str) -> Result<()> {
    s.read_at(buf, off)
        .map_err(|e| Error::io(format!("cannot read {what} at {off:#x}"), e))?;
    if !ov.is_empty() {
        ov.patch(buf, off);
    }
    Ok(())
}

fn round_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Options used internally by `check`.
#[derive(Clone, Copy, Default)]
pub(crate) struct Lenient {
    /// Do not refuse BAT entries past the end of the file or overlapping (check reports them).
    pub bat: bool,
}

impl VhdxDisk {
    /// Whether the store starts with the VHDX file type identifier.
    pub fn probe(storage: &dyn Storage) -> Result<bool> {
        let mut b = [0u8; 8];
        match storage.read_at(&mut b, 0) {
            Ok(()) => Ok(&b == SIG_FILE),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(Error::io("cannot read file type identifier", e)),
        }
    }

    pub fn open_path(path: &Path, opts: &OpenOptions) -> Result<VhdxDisk> {
        let access = if opts.read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        let s = FileStorage::open(path, access, true)?;
        Self::open(Arc::new(s), opts)
    }

    pub fn open(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<VhdxDisk> {
        Self::open_inner(storage, opts.read_only, Lenient::default())
    }

    pub(crate) fn open_inner(
        storage: Arc<dyn Storage>,
        read_only: bool,
        lenient: Lenient,
    ) -> Result<VhdxDisk> {
        if !Self::probe(&*storage)? {
            return Err(Error::WrongFormat {
                format: "vhdx",
                detail: "no 'vhdxfile' signature at offset 0".into(),
            });
        }
        let file_len = storage.len().map_err(io_err("cannot get file length"))?;
        let (hs, _) = read_headers(&*storage)?;
        let h = hs.current.clone();

        // The log.
        let mut overlay = Overlay::default();
        let mut replayed = 0;
        let mut dirty_at_open = false;
        let mut logged_len = 0u64;
        if h.log_guid != [0u8; 16] {
            if h.log_version != 0 {
                return Err(Error::corrupt(
                    "VHDX header",
                    header_offset(hs.slot),
                    format!("log version {}, expected 0", h.log_version),
                ));
            }
            let (lo, ll) = (h.log_offset, h.log_length as u64);
            if lo < MIB || lo % MIB != 0 || ll == 0 || ll % MIB != 0 || lo + ll > file_len {
                return Err(Error::corrupt(
                    "VHDX header",
                    header_offset(hs.slot),
                    format!(
                        "log at {lo:#x}+{ll:#x} is not 1 MiB aligned or lies past end of file ({file_len})"
                    ),
                ));
            }
            let mut logbuf = vec![0u8; ll as usize];
            storage
                .read_at(&mut logbuf, lo)
                .map_err(io_err("cannot read the VHDX log"))?;
            let seq = log::find_sequence(&logbuf, &h.log_guid);
            drop(logbuf);
            if !seq.entries.is_empty() {
                dirty_at_open = true;
                log::validate_targets(&seq, lo, ll)?;
                // Everything the log touches must lie inside the file it describes.
                let limit = file_len.max(seq.last_file_offset());
                if seq.last_file_offset() > MAX_SIZE + 64 * MIB * 1024 {
                    return Err(Error::corrupt(
                        "VHDX log entry",
                        lo,
                        format!("last file offset {} is absurd", seq.last_file_offset()),
                    ));
                }
                for e in &seq.entries {
                    for op in &e.ops {
                        if let log::LogOp::Zero { file_offset, len } = op {
                            if file_offset.saturating_add(*len) > limit {
                                return Err(Error::corrupt(
                                    "VHDX log entry",
                                    lo + e.offset,
                                    format!(
                                        "zero descriptor {file_offset:#x}+{len:#x} reaches past the file ({limit})"
                                    ),
                                ));
                            }
                        }
                    }
                }
                if seq.flushed_file_offset() > file_len {
                    return Err(Error::corrupt(
                        "VHDX log entry",
                        lo + seq.entries.last().map_or(0, |e| e.offset),
                        format!(
                            "flushed file offset {} is beyond the file length {file_len}: the file was truncated",
                            seq.flushed_file_offset()
                        ),
                    ));
                }
                replayed = seq.entries.len();
                logged_len = seq.last_file_offset();
                if read_only {
                    for (i, e) in seq.entries.iter().enumerate() {
                        for (j, op) in e.ops.iter().enumerate() {
                            let idx = i * 1_000_000 + j;
                            match op {
                                log::LogOp::Data { file_offset, page } => {
                                    overlay.pages.insert(*file_offset, (idx, page.clone()));
                                }
                                log::LogOp::Zero { file_offset, len } => {
                                    overlay.zeros.push((*file_offset, file_offset + len, idx));
                                }
                            }
                        }
                    }
                } else {
                    replay_in_place(&*storage, &seq)?;
                }
            }
            if !read_only {
                // Log applied (or empty): mark it empty.
                let mut hs2 = hs;
                let mut nh = hs2.current.clone();
                nh.log_guid = [0; 16];
                write_header_pair(&*storage, &mut hs2, nh)?;
                return Self::open_inner(storage, read_only, lenient).map(|mut d| {
                    d.dirty_at_open = dirty_at_open;
                    d.replayed = replayed;
                    d
                });
            }
        }

        // A read-only replay may refer to space the replay would have added.
        let file_len_eff = file_len.max(logged_len);

        // Region tables: the first, else the second.
        let mut rtb = vec![0u8; RT_SIZE];
        let rt = match read_via(&*storage, &overlay, &mut rtb, RT1_OFFSET, "region table 1")
            .and_then(|_| RegionTable::parse(&rtb, RT1_OFFSET, file_len_eff))
        {
            Ok(rt) => rt,
            Err(e1) => {
                let r2 = read_via(&*storage, &overlay, &mut rtb, RT2_OFFSET, "region table 2")
                    .and_then(|_| RegionTable::parse(&rtb, RT2_OFFSET, file_len_eff));
                match r2 {
                    Ok(rt) => rt,
                    Err(Error::Unsupported(m)) => return Err(Error::Unsupported(m)),
                    Err(_) => return Err(e1),
                }
            }
        };
        // Regions must not overlap the log or the header section.
        let log_end = h.log_offset + h.log_length as u64;
        for e in &rt.entries {
            let end = e.offset + e.length as u64;
            if h.log_length > 0 && e.offset < log_end && h.log_offset < end {
                return Err(Error::corrupt(
                    "VHDX region table",
                    RT1_OFFSET,
                    format!("region {} overlaps the log", guid_fmt(&e.guid)),
                ));
            }
        }

        // Metadata.
        if rt.meta_length as u64 > 128 * MIB {
            return Err(Error::corrupt(
                "VHDX region table",
                RT1_OFFSET,
                format!("metadata region length {} exceeds 128 MiB", rt.meta_length),
            ));
        }
        let mut mb = vec![0u8; rt.meta_length as usize];
        read_via(
            &*storage,
            &overlay,
            &mut mb,
            rt.meta_offset,
            "metadata region",
        )?;
        let meta = parse_metadata(&mb, rt.meta_offset)?;
        drop(mb);
        let geo = Geometry::new(
            meta.virtual_size,
            meta.block_size,
            meta.logical_sector,
            meta.has_parent,
        );
        if geo.bat_entries * 8 > rt.bat_length as u64 {
            return Err(Error::corrupt(
                "VHDX BAT",
                rt.bat_offset,
                format!(
                    "region length {} cannot hold the {} entries a {}-byte disk with {}-byte blocks needs",
                    rt.bat_length, geo.bat_entries, meta.virtual_size, meta.block_size
                ),
            ));
        }
        // Only the BAT's data is read: holes in the file read as zeros (not present), unless a
        // replayed log patches pages in memory.
        let bat = Bat::load(
            geo,
            meta.virtual_size,
            geo.bat_entries as usize,
            |buf, at| read_via(&*storage, &overlay, buf, rt.bat_offset + at, "BAT"),
            |at, n| {
                // Past the end of the file is not a hole but a truncated image: read (and fail).
                let from = rt.bat_offset + at;
                if !overlay.is_empty() || from >= file_len {
                    return Ok(0);
                }
                match storage.data_run(from, n.min(file_len - from)) {
                    Ok((false, run)) => Ok(run),
                    Ok((true, _)) => Ok(0),
                    Err(e) => Err(Error::io(
                        format!(
                            "cannot query allocation of the BAT at {:#x}",
                            rt.bat_offset + at
                        ),
                        e,
                    )),
                }
            },
        )?;

        let mut max_end = round_up(file_len, MIB).max(log_end);
        for e in &rt.entries {
            max_end = max_end.max(e.offset + e.length as u64);
        }
        let fixed_regions: Vec<(u64, u64)> = rt
            .entries
            .iter()
            .map(|e| (e.offset, e.offset + e.length as u64))
            .chain(std::iter::once((h.log_offset, log_end)))
            .chain(std::iter::once((0, MIB)))
            .collect();
        let mut used: Vec<(u64, u64, usize)> = Vec::new();
        // Zero entries (not present, no offset) need no checks.
        for (i, e) in bat.nonzero() {
            let is_sb = (i as u64 % (geo.chunk_ratio + 1)) == geo.chunk_ratio;
            let st = bat_state(e);
            let (present, len) = if is_sb {
                if st != 0 && st != SB_PRESENT {
                    return Err(Error::corrupt(
                        "VHDX BAT",
                        rt.bat_offset + i as u64 * 8,
                        format!("sector bitmap entry {i} has invalid state {st}"),
                    ));
                }
                (st == SB_PRESENT && meta.has_parent, MIB)
            } else {
                if ![0, 1, 2, 3, 5, 6, 7].contains(&st) {
                    return Err(Error::corrupt(
                        "VHDX BAT",
                        rt.bat_offset + i as u64 * 8,
                        format!("payload entry {i} has invalid state {st}"),
                    ));
                }
                if st == PB_PARTIALLY_PRESENT && !meta.has_parent {
                    return Err(Error::corrupt(
                        "VHDX BAT",
                        rt.bat_offset + i as u64 * 8,
                        format!(
                            "payload entry {i} is PARTIALLY_PRESENT in an image without parent"
                        ),
                    ));
                }
                (
                    st == PB_FULLY_PRESENT || st == PB_PARTIALLY_PRESENT,
                    geo.block_size,
                )
            };
            if !present {
                continue;
            }
            let off = bat_offset(e);
            let end = off.saturating_add(len);
            max_end = max_end.max(end);
            if lenient.bat {
                continue;
            }
            if off >= file_len_eff || off < MIB {
                return Err(Error::corrupt(
                    "VHDX BAT",
                    rt.bat_offset + i as u64 * 8,
                    format!(
                        "entry {i} start offset {off} points after end of file ({file_len}) or into the header; image probably truncated"
                    ),
                ));
            }
            if let Some(r) = fixed_regions.iter().find(|r| off < r.1 && r.0 < end) {
                return Err(Error::corrupt(
                    "VHDX BAT",
                    rt.bat_offset + i as u64 * 8,
                    format!(
                        "entry {i} block at {off:#x} overlaps a region or the log at {:#x}..{:#x}",
                        r.0, r.1
                    ),
                ));
            }
            used.push((off, end, i));
        }
        used.sort_unstable();
        for w in used.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(Error::corrupt(
                    "VHDX BAT",
                    rt.bat_offset + w[1].2 as u64 * 8,
                    format!(
                        "entries {} and {} point to overlapping blocks at {:#x} and {:#x}",
                        w[0].2, w[1].2, w[0].0, w[1].0
                    ),
                ));
            }
        }

        Ok(VhdxDisk {
            path: storage.path().map(|p| p.to_path_buf()),
            storage,
            read_only,
            overlay,
            regions: RwLock::new(rt),
            size_cache: AtomicU64::new(meta.virtual_size),
            bat: RwLock::new(bat),
            meta: RwLock::new(meta),
            bitmaps: Mutex::new(Bitmaps::default()),
            wal: Mutex::new(Wal {
                raw_dirty: BTreeMap::new(),
                next_free: max_end,
                sequence: 0,
                prev: None,
                applied_unflushed: false,
                entries_written: 0,
            }),
            header: Mutex::new(hs),
            parent: None,
            session: AtomicBool::new(false),
            data_guid_changed: AtomicBool::new(false),
            next_data_write_guid: Mutex::new(None),
            closed: AtomicBool::new(false),
            dirty_at_open,
            replayed,
            failed: disk::FailLatch::new(),
        })
    }

    /// Attaches the parent of a differencing image. Size and logical sector size must match.
    pub fn attach_parent(&mut self, parent: Arc<dyn BlockDevice>) -> Result<()> {
        let meta = rlock(&self.meta);
        if !meta.has_parent {
            return Err(Error::InvalidArgument(
                "image is not a differencing disk".into(),
            ));
        }
        if parent.size() != meta.virtual_size {
            return Err(Error::ParentMismatch {
                child: self.path.clone().unwrap_or_default(),
                parent: parent.path().map(|p| p.to_path_buf()).unwrap_or_default(),
                detail: format!(
                    "parent size {} differs from the child's {}",
                    parent.size(),
                    meta.virtual_size
                ),
            });
        }
        if parent.logical_sector_size() != meta.logical_sector {
            return Err(Error::ParentMismatch {
                child: self.path.clone().unwrap_or_default(),
                parent: parent.path().map(|p| p.to_path_buf()).unwrap_or_default(),
                detail: format!(
                    "parent logical sector size {} differs from the child's {}",
                    parent.logical_sector_size(),
                    meta.logical_sector
                ),
            });
        }
        drop(meta);
        self.parent = Some(parent);
        Ok(())
    }

    fn parent_missing(&self) -> Error {
        let meta = rlock(&self.meta);
        let name = meta
            .parent_locator
            .as_ref()
            .and_then(|l| {
                l.get("relative_path")
                    .or_else(|| l.get("absolute_win32_path"))
            })
            .unwrap_or("")
            .to_string();
        Error::ParentNotFound {
            child: self.path.clone().unwrap_or_default(),
            name,
            tried: Vec::new(),
        }
    }

    // ---- low-level I/O ----

    fn read_file(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match self.storage.read_at(buf, off) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                // A block that runs past the end of the file (old QEMU partial last block): the
                // missing tail reads as zeros.
                let len = self
                    .storage
                    .len()
                    .map_err(io_err("cannot get file length"))?;
                buf.fill(0);
                if off < len {
                    let n = ((len - off) as usize).min(buf.len());
                    self.storage
                        .read_at(&mut buf[..n], off)
                        .map_err(io_err(format!("cannot read data at {off:#x}")))?;
                }
            }
            Err(e) => return Err(Error::io(format!("cannot read data at {off:#x}"), e)),
        }
        if !self.overlay.is_empty() {
            self.overlay.patch(buf, off);
        }
        Ok(())
    }

    fn write_file(&self, buf: &[u8], off: u64) -> Result<()> {
        self.storage
            .write_at(buf, off)
            .map_err(io_err(format!("cannot write at {off:#x}")))
    }

    /// Writes a block into free space at `off` without allocating its zero runs: the range is
    /// punched first (so skipped runs read zeros), then only non-zero 4 KiB pieces are written.
    /// Used when compaction moves a block, which must not fill the holes the block had.
    fn write_file_sparse(&self, buf: &[u8], off: u64) -> Result<()> {
        self.storage
            .punch_hole(off, buf.len() as u64)
            .map_err(io_err(format!("cannot clear {off:#x}")))?;
        const PIECE: usize = 4096;
        let mut i = 0;
        while i < buf.len() {
            let start = i;
            while i < buf.len() && !disk::is_zero(&buf[i..(i + PIECE).min(buf.len())]) {
                i = (i + PIECE).min(buf.len());
            }
            if i > start {
                self.write_file(&buf[start..i], off + start as u64)?;
            }
            while i < buf.len() && disk::is_zero(&buf[i..(i + PIECE).min(buf.len())]) {
                i = (i + PIECE).min(buf.len());
            }
        }
        Ok(())
    }

    fn rt(&self) -> RwLockReadGuard<'_, RegionTable> {
        rlock(&self.regions)
    }

    /// Fails once a failure left this handle in a state no retry can repair.
    fn usable(&self) -> Result<()> {
        match self.failed.get() {
            None => Ok(()),
            Some(first) => Err(Error::io(
                format!("cannot write or flush {}", self.name()),
                std::io::Error::other(format!(
                    "an earlier failure left it in an unknown state ({first}); reopen the image"
                )),
            )),
        }
    }

    /// Records a failure no retry can repair (see [`Self::usable`]) and returns it.
    fn poison(&self, what: &str, e: Error) -> Error {
        self.failed.set(format!("{what}: {e}"));
        e
    }

    fn name(&self) -> String {
        self.path
            .as_ref()
            .map_or_else(|| "VHDX image".to_string(), |p| p.display().to_string())
    }

    fn sflush(&self) -> Result<()> {
        self.storage.flush().map_err(io_err("cannot flush image"))
    }

    /// The bitmap page (4 KiB) at file offset `po`, loaded on demand.
    fn bitmap_page<'a>(&self, bm: &'a mut Bitmaps, po: u64) -> Result<&'a mut Box<[u8]>> {
        if let std::collections::hash_map::Entry::Vacant(e) = bm.pages.entry(po) {
            let mut p = vec![0u8; PAGE as usize].into_boxed_slice();
            self.read_file(&mut p, po)?;
            e.insert(p);
        }
        Ok(bm.pages.get_mut(&po).expect("inserted above"))
    }

    /// For block `b` of a differencing disk: starting at sector `s` (within the block), whether
    /// it is present and how many following sectors (up to `max`) share that.
    fn bitmap_run(&self, bat: &Bat, b: u64, s: u64, max: u64) -> Result<(bool, u64)> {
        let geo = &bat.geo;
        let chunk = b / geo.chunk_ratio;
        let sbe = bat.get(geo.bitmap_index(chunk));
        if bat_state(sbe) != SB_PRESENT {
            return Ok((false, max));
        }
        let spb = geo.sectors_per_block();
        let bit0 = (b % geo.chunk_ratio) * spb + s;
        let mut bm = lock(&self.bitmaps);
        let mut n = 0u64;
        let mut first = None;
        while n < max {
            let bit = bit0 + n;
            let po = bat_offset(sbe) + (bit / 8) / PAGE * PAGE;
            let page = self.bitmap_page(&mut bm, po)?;
            let byte_in_page = ((bit / 8) % PAGE) as usize;
            // Whole bytes at a time when aligned.
            let v = (page[byte_in_page] >> (bit % 8)) & 1 == 1;
            match first {
                None => first = Some(v),
                Some(f) if f != v => break,
                _ => {}
            }
            if bit.is_multiple_of(8) && n + 8 <= max {
                let byte = page[byte_in_page];
                if (v && byte == 0xff) || (!v && byte == 0) {
                    n += 8;
                    continue;
                }
            }
            n += 1;
        }
        Ok((first.unwrap_or(false), n.max(1).min(max)))
    }

    // ---- sessions and headers ----

    /// Starts a write session: new FileWriteGuid (and DataWriteGuid when `data`), LogGuid set.
    fn ensure_session(&self, data: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.session.load(Ordering::Acquire)
            && (!data || self.data_guid_changed.load(Ordering::Acquire))
        {
            return Ok(());
        }
        let mut hs = lock(&self.header);
        let started = self.session.load(Ordering::Acquire);
        let need_data = data && !self.data_guid_changed.load(Ordering::Acquire);
        if started && !need_data {
            return Ok(());
        }
        let mut nh = hs.current.clone();
        if !started {
            nh.file_write_guid = new_guid();
            nh.log_guid = new_guid();
            if nh.log_length == 0 {
                return Err(Error::Unsupported(
                    "VHDX image has no log region; cannot write safely".into(),
                ));
            }
        }
        if need_data {
            nh.data_write_guid = lock(&self.next_data_write_guid)
                .take()
                .unwrap_or_else(new_guid);
        }
        write_header_pair(&*self.storage, &mut hs, nh)?;
        if need_data {
            self.data_guid_changed.store(true, Ordering::Release);
        }
        // (Log sequence numbers were reset when the previous session closed; taking the WAL
        // lock here would invert the WAL -> header lock order.)
        self.session.store(true, Ordering::Release);
        Ok(())
    }

    // ---- the write-ahead log (see log.rs) ----

    /// Makes everything durable: data, then one log entry with every dirty page, then applies.
    ///
    /// A dirty page stays dirty until the log entry carrying it is durable and the page has
    /// been applied: a failure anywhere leaves every outstanding change pending, and the next
    /// flush logs it again (in a new, self-contained entry).
    fn flush_locked(&self, wal: &mut Wal) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.usable()?;
        if !self.session.load(Ordering::Acquire) {
            return self.sflush();
        }
        let hs_log = {
            let hs = lock(&self.header);
            (
                hs.current.log_guid,
                hs.current.log_offset,
                hs.current.log_length as u64,
            )
        };
        let (guid, log_off, log_len) = hs_log;
        // Step 1: data and previously applied pages become durable.
        self.sflush()?;
        wal.applied_unflushed = false;
        // Collect dirty pages (copies: the dirty sets are only cleared below, page by page,
        // once a durable entry carries them). The WAL lock keeps them from changing meanwhile.
        // When the dirty set needs several entries, the order matters: sector bitmaps first
        // (bits may precede the BAT entry that uses them, never follow it), then BAT pages, then
        // the metadata region and region tables (a new size or BAT location only after the
        // entries it covers).
        let mut pages: Vec<(u64, Box<[u8]>, DirtyPage)> = Vec::new();
        {
            let bat = rlock(&self.bat);
            let bm = lock(&self.bitmaps);
            for &po in &bm.dirty {
                if let Some(img) = bm.pages.get(&po) {
                    pages.push((po, img.clone(), DirtyPage::Bitmap(po)));
                }
            }
            drop(bm);
            let bat_offset = self.rt().bat_offset;
            for &p in &bat.dirty_pages {
                let mut img = bat.page_image(p);
                let first = (p * 512) as usize;
                if first + 512 > bat.len() {
                    // Keep whatever follows the last entry on that page.
                    let mut cur = vec![0u8; PAGE as usize];
                    self.read_file(&mut cur, bat_offset + p * PAGE)?;
                    let keep = (bat.len() - first) * 8;
                    img[keep..].copy_from_slice(&cur[keep..]);
                }
                pages.push((bat_offset + p * PAGE, img, DirtyPage::Bat(p)));
            }
        }
        for (o, img) in &wal.raw_dirty {
            pages.push((*o, img.clone(), DirtyPage::Raw(*o)));
        }
        if pages.is_empty() {
            return Ok(());
        }
        // Each entry is at most half the log so it never overlaps the previous one.
        let max_pages = ((log_len / 2) / PAGE).saturating_sub(2).max(1) as usize;
        let mut first = true;
        for group in pages.chunks(max_pages) {
            if !first {
                // Checkpoint: the previous group's applied pages become durable.
                self.sflush()?;
            }
            first = false;
            let durable_len = self
                .storage
                .len()
                .map_err(io_err("cannot get file length"))?;
            let start = wal.prev.map_or(0, |(s, l)| (s + l) % log_len);
            wal.sequence += 1;
            let refs: Vec<(u64, &[u8])> = group.iter().map(|(o, p, _)| (*o, &p[..])).collect();
            let entry = log::build_entry(
                wal.sequence,
                start as u32,
                &guid,
                durable_len,
                wal.next_free.max(durable_len),
                &refs,
            );
            let len = entry.len() as u64;
            // Write, wrapping around the end of the ring. A failed attempt is simply
            // overwritten by the next one at the same place (with a higher sequence number).
            let first_part = (log_len - start).min(len) as usize;
            self.write_file(&entry[..first_part], log_off + start)?;
            if first_part < entry.len() {
                self.write_file(&entry[first_part..], log_off)?;
            }
            self.sflush()?;
            wal.prev = Some((start, len));
            wal.entries_written += 1;
            // Apply lazily: durable at the next flush. Until every page is in place the entry
            // is the only copy, so the pages stay dirty (the next entry carries them again
            // before this one can be overwritten).
            wal.applied_unflushed = true;
            for (o, p, _) in group {
                self.write_file(p, *o)?;
            }
            let mut bat = wlock(&self.bat);
            let mut bm = lock(&self.bitmaps);
            for (_, _, which) in group {
                match which {
                    DirtyPage::Bitmap(po) => {
                        bm.dirty.remove(po);
                    }
                    DirtyPage::Bat(p) => {
                        bat.dirty_pages.remove(p);
                    }
                    DirtyPage::Raw(o) => {
                        wal.raw_dirty.remove(o);
                    }
                }
            }
        }
        Ok(())
    }

    /// Flush, make the applied pages durable and mark the log empty.
    fn close_locked(&self, wal: &mut Wal) -> Result<()> {
        if self.read_only || !self.session.load(Ordering::Acquire) {
            return Ok(());
        }
        self.flush_locked(wal)?;
        self.sflush()?;
        wal.applied_unflushed = false;
        let mut hs = lock(&self.header);
        let mut nh = hs.current.clone();
        nh.log_guid = [0; 16];
        // Half written, the current header may already say "no log": later entries would be
        // written under an empty LogGuid and never replayed. So no write may follow.
        write_header_pair(&*self.storage, &mut hs, nh)
            .map_err(|e| self.poison("closing header update failed", e))?;
        self.session.store(false, Ordering::Release);
        wal.prev = None;
        wal.sequence = 0;
        Ok(())
    }

    /// Sets a BAT entry (caller holds the WAL lock).
    fn set_entry(&self, bat: &mut Bat, idx: usize, v: u64) {
        if bat.get(idx) != v {
            bat.put(idx, v);
            bat.dirty_pages.insert(idx as u64 / 512);
        }
    }

    /// Reserves `len` bytes at the end of the file (caller holds the WAL lock).
    fn allocate(&self, wal: &mut Wal, len: u64) -> Result<u64> {
        let off = round_up(wal.next_free, MIB);
        let end = off + len;
        let cur = self
            .storage
            .len()
            .map_err(io_err("cannot get file length"))?;
        if cur < end {
            self.storage
                .set_len(end)
                .map_err(io_err(format!("cannot extend image to {end}")))?;
        }
        wal.next_free = end;
        Ok(off)
    }

    /// Sets bitmap bits for sectors `s..s+n` of block `b` (caller holds the WAL lock and bat).
    /// With `fresh` the block's other bits are cleared first: a block just allocated must not
    /// inherit bits left by an earlier allocation that a crash undid.
    fn set_bits(
        &self,
        wal: &mut Wal,
        bat: &mut Bat,
        b: u64,
        s: u64,
        n: u64,
        fresh: bool,
    ) -> Result<()> {
        let geo = bat.geo;
        let chunk = b / geo.chunk_ratio;
        let sbi = geo.bitmap_index(chunk);
        if bat_state(bat.get(sbi)) != SB_PRESENT {
            let off = self.allocate(wal, MIB)?;
            self.set_entry(bat, sbi, bat_entry(SB_PRESENT, off));
        }
        let sb = bat_offset(bat.get(sbi));
        let spb = geo.sectors_per_block();
        let mut bm = lock(&self.bitmaps);
        if fresh {
            // Sectors per block is a multiple of 8 (block >= 1 MiB, sector <= 4 KiB).
            let first = (b % geo.chunk_ratio) * spb / 8;
            let last = first + spb / 8;
            let mut byte = first;
            while byte < last {
                let po = sb + byte / PAGE * PAGE;
                let page = self.bitmap_page(&mut bm, po)?;
                let from = (byte % PAGE) as usize;
                let to = (PAGE as usize).min(from + (last - byte) as usize);
                if page[from..to].iter().any(|&x| x != 0) {
                    page[from..to].fill(0);
                    bm.dirty.insert(po);
                }
                byte += (to - from) as u64;
            }
        }
        let bit0 = (b % geo.chunk_ratio) * spb + s;
        let mut bit = bit0;
        while bit < bit0 + n {
            let po = sb + (bit / 8) / PAGE * PAGE;
            let page = self.bitmap_page(&mut bm, po)?;
            let byte = ((bit / 8) % PAGE) as usize;
            if bit.is_multiple_of(8) && bit + 8 <= bit0 + n {
                page[byte] = 0xff;
                bit += 8;
            } else {
                page[byte] |= 1 << (bit % 8);
                bit += 1;
            }
            bm.dirty.insert(po);
        }
        Ok(())
    }

    // ---- reads ----

    fn read_parent(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match &self.parent {
            Some(p) => p.read_at(buf, off),
            None => Err(self.parent_missing()),
        }
    }

    fn read_block_part(&self, bat: &Bat, buf: &mut [u8], off: u64) -> Result<()> {
        let geo = bat.geo;
        let b = off / geo.block_size;
        let in_block = off % geo.block_size;
        let e = bat.get(geo.payload_index(b));
        let has_parent = rlock(&self.meta).has_parent;
        match bat_state(e) {
            PB_FULLY_PRESENT => self.read_file(buf, bat_offset(e) + in_block),
            PB_PARTIALLY_PRESENT => {
                let ls = geo.logical_sector;
                let mut pos = 0usize;
                while pos < buf.len() {
                    let o = in_block + pos as u64;
                    let s = o / ls;
                    let last_s = (in_block + buf.len() as u64 - 1) / ls;
                    let (present, n) = self.bitmap_run(bat, b, s, last_s - s + 1)?;
                    let run_end = ((s + n) * ls).min(in_block + buf.len() as u64);
                    let len = (run_end - o) as usize;
                    let part = &mut buf[pos..pos + len];
                    if present {
                        self.read_file(part, bat_offset(e) + o)?;
                    } else {
                        self.read_parent(part, b * geo.block_size + o)?;
                    }
                    pos += len;
                }
                Ok(())
            }
            PB_NOT_PRESENT if has_parent => self.read_parent(buf, off),
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    // ---- writes ----

    /// Writes sector-aligned `buf` at aligned `off`, within one block.
    fn write_block_part(&self, buf: &[u8], off: u64) -> Result<()> {
        let has_parent = rlock(&self.meta).has_parent;
        // Fast path: the block is present and (for differencing) every sector already is.
        {
            let bat = rlock(&self.bat);
            let geo = bat.geo;
            let b = off / geo.block_size;
            let in_block = off % geo.block_size;
            let e = bat.get(geo.payload_index(b));
            match bat_state(e) {
                PB_FULLY_PRESENT => return self.write_file(buf, bat_offset(e) + in_block),
                PB_PARTIALLY_PRESENT => {
                    let s = in_block / geo.logical_sector;
                    let n = buf.len() as u64 / geo.logical_sector;
                    let (present, run) = self.bitmap_run(&bat, b, s, n)?;
                    if present && run >= n {
                        return self.write_file(buf, bat_offset(e) + in_block);
                    }
                }
                _ => {}
            }
        }
        // Slow path: allocation or bitmap update, serialised with flushes.
        let mut wal = lock(&self.wal);
        let mut bat = wlock(&self.bat);
        let geo = bat.geo;
        let b = off / geo.block_size;
        let in_block = off % geo.block_size;
        let idx = geo.payload_index(b);
        let e = bat.get(idx);
        let st = bat_state(e);
        match st {
            PB_FULLY_PRESENT => self.write_file(buf, bat_offset(e) + in_block),
            PB_PARTIALLY_PRESENT => {
                self.write_file(buf, bat_offset(e) + in_block)?;
                let s = in_block / geo.logical_sector;
                self.set_bits(
                    &mut wal,
                    &mut bat,
                    b,
                    s,
                    buf.len() as u64 / geo.logical_sector,
                    false,
                )
            }
            _ => {
                // A new block at the end of the file reads as zeros apart from what we write.
                let before = wal.next_free;
                let len_before = self
                    .storage
                    .len()
                    .map_err(io_err("cannot get file length"))?;
                let blk = self.allocate(&mut wal, geo.block_size)?;
                if let Err(e) = self.write_file(buf, blk + in_block) {
                    // Nothing refers to the block yet. If cutting the file back removes every
                    // byte the failed write may have left (the next user of the place must see
                    // zeros), the next allocation reuses the place instead of leaking it (a
                    // disk filling up would leak a block per retry).
                    if len_before <= blk && self.storage.set_len(len_before).is_ok() {
                        wal.next_free = before;
                    }
                    return Err(e);
                }
                if has_parent && st == PB_NOT_PRESENT {
                    let s = in_block / geo.logical_sector;
                    self.set_bits(
                        &mut wal,
                        &mut bat,
                        b,
                        s,
                        buf.len() as u64 / geo.logical_sector,
                        true,
                    )?;
                    self.set_entry(&mut bat, idx, bat_entry(PB_PARTIALLY_PRESENT, blk));
                } else {
                    self.set_entry(&mut bat, idx, bat_entry(PB_FULLY_PRESENT, blk));
                }
                Ok(())
            }
        }
    }

    fn write_aligned(&self, buf: &[u8], offset: u64) -> Result<()> {
        let bs = rlock(&self.bat).geo.block_size;
        let mut pos = 0usize;
        while pos < buf.len() {
            let o = offset + pos as u64;
            let n = ((bs - o % bs) as usize).min(buf.len() - pos);
            self.write_block_part(&buf[pos..pos + n], o)?;
            pos += n;
        }
        Ok(())
    }

    // ---- trim ----

    /// Releases whole blocks in `offset..offset+len`; returns the unaligned head/tail ranges.
    fn release_blocks(&self, offset: u64, len: u64, may_unmap: bool) -> Result<Vec<(u64, u64)>> {
        self.usable()?;
        self.ensure_session(true)?;
        let mut wal = lock(&self.wal);
        let mut bat = wlock(&self.bat);
        let geo = bat.geo;
        let size = bat.size;
        let meta = rlock(&self.meta);
        let end = offset + len;
        let mut rest = Vec::new();
        let mut o = offset;
        while o < end {
            let b = o / geo.block_size;
            let bstart = b * geo.block_size;
            let bend = (bstart + geo.block_size).min(size);
            let e_end = bend.min(end);
            if o == bstart && e_end == bend && !meta.leave_blocks_allocated {
                let idx = geo.payload_index(b);
                let e = bat.get(idx);
                let st = bat_state(e);
                if (st == PB_FULLY_PRESENT || st == PB_PARTIALLY_PRESENT) && may_unmap {
                    self.storage
                        .punch_hole(bat_offset(e), geo.block_size)
                        .map_err(io_err("cannot punch hole"))?;
                }
                // Differencing: ZERO hides the parent; base: NOT_PRESENT reads zeros.
                let new_state = if meta.has_parent {
                    PB_ZERO
                } else {
                    PB_NOT_PRESENT
                };
                self.set_entry(&mut bat, idx, bat_entry(new_state, 0));
                let _ = &mut wal;
            } else {
                rest.push((o, e_end - o));
            }
            o = e_end;
        }
        Ok(rest)
    }

    /// Block `b` reads as zeros without any work.
    fn block_reads_zero(&self, b: u64) -> bool {
        let bat = rlock(&self.bat);
        let st = bat_state(bat.get(bat.geo.payload_index(b)));
        let has_parent = rlock(&self.meta).has_parent;
        matches!(st, PB_ZERO | PB_UNMAPPED | PB_UNDEFINED | PB_UNMAPPED_V095)
            || (st == PB_NOT_PRESENT && !has_parent)
    }

    // ---- public operations ----

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

    fn create_impl(
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
            page83: new_guid(),
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
        let mut fid = vec![0u8; 65536];
        fid[0..8].copy_from_slice(SIG_FILE);
        for (i, c) in "Viridian vhdx".encode_utf16().enumerate() {
            wr16(&mut fid, 8 + i * 2, c);
        }
        w(&fid, 0)?;
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
                    wr64(
                        piece,
                        ((i - first) * 8) as usize,
                        bat_entry(PB_FULLY_PRESENT, end),
                    );
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
        let dwg = new_guid();
        let h = Header {
            sequence: 1,
            file_write_guid: new_guid(),
            data_write_guid: dwg,
            log_guid: [0; 16],
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
        let mut d = Self::open_inner(storage, false, Lenient::default())?;
        if let Some(p) = parent {
            d.attach_parent(p)?;
        }
        Ok(d)
    }

    /// Chooses the DataWriteGuid that the first data write of this open will give the image
    /// (instead of a random one). Fails once data has been written in this open.
    pub fn set_next_data_write_guid(&self, guid: Guid) -> Result<()> {
        let _hs = lock(&self.header);
        if self.data_guid_changed.load(Ordering::Acquire) {
            return Err(Error::InvalidArgument(
                "the DataWriteGuid of this open has already changed".into(),
            ));
        }
        *lock(&self.next_data_write_guid) = Some(guid);
        Ok(())
    }

    /// Re-parents a differencing image (`rebase -u`): a new locator pointing at `parent_path`,
    /// linked to `parent`'s DataWriteGuid; written through the log.
    pub fn set_parent(&self, parent_path: &Path, parent: &dyn BlockDevice) -> Result<()> {
        self.set_parent_full(
            parent_path,
            &disk::ParentWindowsPaths::default(),
            parent,
            None,
        )
    }

    /// Like [`set_parent`](Self::set_parent), and when `next` is set, records it as
    /// `parent_linkage2`: the child then also accepts a parent whose DataWriteGuid is `next`
    /// (the identity a commit will give the parent), so a crash mid-commit leaves it openable.
    pub fn set_parent_with_next(
        &self,
        parent_path: &Path,
        parent: &dyn BlockDevice,
        next: Option<Guid>,
    ) -> Result<()> {
        self.set_parent_full(
            parent_path,
            &disk::ParentWindowsPaths::default(),
            parent,
            next,
        )
    }

    /// [`VhdxDisk::set_parent`], also recording the parent's Windows paths when they are known.
    pub fn set_parent_with(
        &self,
        parent_path: &Path,
        windows: &disk::ParentWindowsPaths,
        parent: &dyn BlockDevice,
    ) -> Result<()> {
        self.set_parent_full(parent_path, windows, parent, None)
    }

    fn set_parent_full(
        &self,
        parent_path: &Path,
        windows: &disk::ParentWindowsPaths,
        parent: &dyn BlockDevice,
        next: Option<Guid>,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        {
            let meta = rlock(&self.meta);
            if !meta.has_parent {
                return Err(Error::InvalidArgument(
                    "image is not a differencing disk".into(),
                ));
            }
            if parent.size() != meta.virtual_size
                || parent.logical_sector_size() != meta.logical_sector
            {
                return Err(Error::InvalidArgument(format!(
                    "new parent has size {} / sector {}, the child {} / {}",
                    parent.size(),
                    parent.logical_sector_size(),
                    meta.virtual_size,
                    meta.logical_sector
                )));
            }
        }
        let child = self
            .path
            .clone()
            .unwrap_or_else(|| PathBuf::from("child.vhdx"));
        let mut loc = build_locator(&child, parent_path, windows, parent)?;
        if let Some(g) = next {
            loc.entries.push((
                "parent_linkage2".to_string(),
                format!("{{{}}}", guid_fmt(&g)),
            ));
        }
        let item = loc.serialize();
        self.usable()?;
        self.ensure_session(false)?;
        let mut wal = lock(&self.wal);
        // Earlier changes first, so the locator's pages go in one entry of their own.
        self.flush_locked(&mut wal)?;
        let mo = self.rt().meta_offset;
        let mlen = self.rt().meta_length as usize;
        let mut region = vec![0u8; mlen];
        self.read_meta_region(&wal, &mut region)?;
        let count = rd16(&region, 10) as usize;
        let mut slot = None;
        let mut top = 65536u64;
        for i in 0..count {
            let o = 32 + i * 32;
            let g = rdguid(&region, o);
            let (io, il) = (rd32(&region, o + 16) as u64, rd32(&region, o + 20) as u64);
            if g == GUID_PARENT_LOCATOR && rd32(&region, o + 24) & META_IS_USER == 0 {
                slot = Some(o);
            } else {
                top = top.max(round_up(io + il, 8));
            }
        }
        let slot = slot.ok_or_else(|| {
            Error::corrupt(
                "VHDX metadata table",
                mo,
                "no parent locator item to replace",
            )
        })?;
        let old_off = rd32(&region, slot + 16) as u64;
        // Reuse the old place when it is past every other item, else go past them.
        let place = if old_off >= top { old_off } else { top };
        if place + item.len() as u64 > mlen as u64 {
            return Err(Error::Unsupported(
                "new parent locator does not fit in the metadata region".into(),
            ));
        }
        let new_region = {
            let mut r = region.clone();
            wr32(&mut r, slot + 16, place as u32);
            wr32(&mut r, slot + 20, item.len() as u32);
            r[place as usize..place as usize + item.len()].copy_from_slice(&item);
            r
        };
        for p in 0..(mlen as u64 / PAGE) {
            let a = (p * PAGE) as usize;
            let b = a + PAGE as usize;
            if region[a..b] != new_region[a..b] {
                wal.raw_dirty
                    .insert(mo + p * PAGE, new_region[a..b].to_vec().into_boxed_slice());
            }
        }
        let parsed = parse_metadata(&new_region, mo)?;
        *wlock(&self.meta) = parsed;
        // Failed, the new locator may or may not be in a durable log entry: neither keeping it
        // pending (a later flush would re-parent after we reported failure) nor dropping it is
        // honest, so the handle stops.
        self.flush_locked(&mut wal)
            .map_err(|e| self.poison("re-parenting failed", e))
    }

    fn read_meta_region(&self, wal: &Wal, region: &mut [u8]) -> Result<()> {
        let mo = self.rt().meta_offset;
        self.read_file(region, mo)?;
        for (o, p) in &wal.raw_dirty {
            if *o >= mo && *o + PAGE <= mo + region.len() as u64 {
                let a = (*o - mo) as usize;
                region[a..a + PAGE as usize].copy_from_slice(p);
            }
        }
        Ok(())
    }

    /// Changes the virtual size. Growing needs room in the BAT region; shrinking needs the
    /// blocks past the new end to be unallocated.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let (ls, bsz, has_parent, fixed) = {
            let m = rlock(&self.meta);
            (
                m.logical_sector as u64,
                m.block_size,
                m.has_parent,
                m.leave_blocks_allocated,
            )
        };
        if !new_size.is_multiple_of(ls) || new_size > MAX_SIZE {
            return Err(Error::InvalidArgument(format!(
                "size {new_size} must be a multiple of {ls} and at most 64 TiB"
            )));
        }
        let ng = Geometry::new(new_size, bsz, ls as u32, has_parent);
        let relocate = ng.bat_entries * 8 > self.rt().bat_length as u64;
        if relocate && round_up(ng.bat_entries * 8, MIB) > u32::MAX as u64 / MIB * MIB {
            return Err(Error::InvalidArgument(format!(
                "a {new_size}-byte disk with {bsz}-byte blocks needs a BAT larger than 4 GiB"
            )));
        }
        {
            let bat = rlock(&self.bat);
            let og = bat.geo;
            if ng.data_blocks < og.data_blocks {
                let mut min = 0;
                for b in (0..og.data_blocks).rev() {
                    let st = bat_state(bat.get(og.payload_index(b)));
                    if st == PB_FULLY_PRESENT || st == PB_PARTIALLY_PRESENT {
                        min = (b + 1) * og.block_size;
                        break;
                    }
                }
                if new_size < min.min(bat.size) && !fixed {
                    return Err(Error::InvalidArgument(format!(
                        "cannot shrink to {new_size}: blocks up to {min} are allocated (minimum size {min})"
                    )));
                }
                if fixed && new_size < bat.size {
                    return Err(Error::InvalidArgument(
                        "shrinking a fixed VHDX is not supported".into(),
                    ));
                }
            }
        }
        self.usable()?;
        self.ensure_session(true)?;
        let mut wal = lock(&self.wal);
        // Earlier changes go in their own entries; the resize's pages then share as few as
        // possible.
        self.flush_locked(&mut wal)?;
        // From here on the in-memory tables change before the log makes the change durable: a
        // failure leaves the handle between two sizes, which no retry can sort out.
        let old_bat = self
            .resize_locked(&mut wal, new_size, ng, relocate)
            .map_err(|e| self.poison(&format!("resize to {new_size} failed"), e))?;
        if let Some((o, l)) = old_bat {
            // Once the switch is durable the old table's space can go back to the file system.
            self.sflush()?;
            wal.applied_unflushed = false;
            self.storage
                .punch_hole(o, l)
                .map_err(io_err("cannot release the old BAT"))?;
        }
        Ok(())
    }

    /// The part of [`Self::resize`] that changes the tables; returns a BAT region left behind.
    fn resize_locked(
        &self,
        wal: &mut Wal,
        new_size: u64,
        ng: Geometry,
        relocate: bool,
    ) -> Result<Option<(u64, u64)>> {
        let (has_parent, fixed) = {
            let m = rlock(&self.meta);
            (m.has_parent, m.leave_blocks_allocated)
        };
        let mut bat = wlock(&self.bat);
        let og = bat.geo;
        // Zero the part of a kept, allocated last block that falls past the new end.
        if new_size < bat.size && !new_size.is_multiple_of(og.block_size) {
            let b = new_size / og.block_size;
            let e = bat.get(og.payload_index(b));
            if matches!(bat_state(e), PB_FULLY_PRESENT | PB_PARTIALLY_PRESENT) {
                let from = new_size % og.block_size;
                let z = vec![0u8; (og.block_size - from) as usize];
                self.write_file(&z, bat_offset(e) + from)?;
            }
        }
        // Kept blocks (and, for differencing disks, their chunks' bitmaps) move to their indexes
        // in the new geometry; only entries that are not zero need visiting.
        let mut newe = Bat::new(ng, new_size, ng.bat_entries as usize);
        for (i, e) in bat.nonzero() {
            let (chunk, k) = (
                i as u64 / (og.chunk_ratio + 1),
                i as u64 % (og.chunk_ratio + 1),
            );
            if k == og.chunk_ratio {
                if has_parent && chunk < og.bitmap_blocks.min(ng.bitmap_blocks) {
                    newe.put(ng.bitmap_index(chunk), e);
                }
            } else {
                let b = chunk * og.chunk_ratio + k;
                if b < og.data_blocks.min(ng.data_blocks) {
                    newe.put(ng.payload_index(b), e);
                }
            }
        }
        let old_len = bat.len();
        newe.dirty_pages = std::mem::take(&mut bat.dirty_pages);
        *bat = newe;
        bat.geo = ng;
        bat.size = new_size;
        if fixed {
            for b in og.data_blocks..ng.data_blocks {
                let off = self.allocate(wal, ng.block_size)?;
                let i = ng.payload_index(b);
                bat.put(i, bat_entry(PB_FULLY_PRESENT, off));
            }
        }
        let mut old_bat = None;
        if relocate {
            // The BAT outgrows its region: write the whole new table to fresh space at the end
            // of the file (unreachable until the region tables point at it), then switch both
            // region tables through the log, in the same entry as the new virtual size.
            let len = round_up(ng.bat_entries * 8, MIB);
            let off = self.allocate(wal, len)?;
            let mut img = vec![0u8; len as usize];
            for (i, e) in bat.nonzero() {
                wr64(&mut img, i * 8, e);
            }
            self.write_file(&img, off)?;
            let mut rt = self.rt().clone();
            old_bat = Some((rt.bat_offset, rt.bat_length as u64));
            rt.bat_offset = off;
            rt.bat_length = len as u32;
            for e in rt.entries.iter_mut() {
                if e.guid == GUID_BAT {
                    e.offset = off;
                    e.length = len as u32;
                }
            }
            let new_rt = rt.serialize();
            for at in [RT1_OFFSET, RT2_OFFSET] {
                let mut cur = vec![0u8; RT_SIZE];
                self.read_file(&mut cur, at)?;
                for p in 0..(RT_SIZE as u64 / PAGE) {
                    let (a, b) = ((p * PAGE) as usize, ((p + 1) * PAGE) as usize);
                    if cur[a..b] != new_rt[a..b] {
                        wal.raw_dirty
                            .insert(at + p * PAGE, new_rt[a..b].to_vec().into_boxed_slice());
                    }
                }
            }
            *wlock(&self.regions) = rt;
            bat.dirty_pages.clear();
        } else {
            // Payload indexes keep their places, so only pages past the shorter table change
            // (plus, for differencing disks, none: bitmap entries keep their places too).
            let from = (old_len.min(bat.len()) as u64) / 512;
            let to = (old_len.max(bat.len()) as u64).div_ceil(512);
            for p in from..to {
                bat.dirty_pages.insert(p);
            }
        }
        // Entries past the new end must read back as zero: extend the table temporarily.
        let keep = bat.len();
        if old_len > keep {
            bat.set_len(old_len);
        }
        let mo = self.rt().meta_offset;
        let mut region = vec![0u8; self.rt().meta_length as usize];
        self.read_meta_region(wal, &mut region)?;
        let count = rd16(&region, 10) as usize;
        for i in 0..count {
            let o = 32 + i * 32;
            if rdguid(&region, o) == GUID_VDISK_SIZE {
                let io = rd32(&region, o + 16) as u64;
                let po = io / PAGE * PAGE;
                let mut page = region[po as usize..(po + PAGE) as usize].to_vec();
                if (io % PAGE) + 8 > PAGE {
                    return Err(Error::Unsupported(
                        "virtual size item straddles a page".into(),
                    ));
                }
                wr64(&mut page, (io % PAGE) as usize, new_size);
                wal.raw_dirty.insert(mo + po, page.into_boxed_slice());
            }
        }
        drop(bat);
        let r = self.flush_locked(wal);
        let mut bat = wlock(&self.bat);
        bat.set_len(keep);
        drop(bat);
        r?;
        wlock(&self.meta).virtual_size = new_size;
        self.size_cache.store(new_size, Ordering::Release);
        Ok(old_bat)
    }

    /// Releases blocks that read as zeros, moves tail blocks down into the gaps and truncates.
    pub fn compact(&self) -> Result<CompactStats> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let mut stats = CompactStats {
            old_len: self
                .storage
                .len()
                .map_err(io_err("cannot get file length"))?,
            ..Default::default()
        };
        let (has_parent, fixed) = {
            let m = rlock(&self.meta);
            (m.has_parent, m.leave_blocks_allocated)
        };
        self.usable()?;
        self.ensure_session(true)?;
        let mut wal = lock(&self.wal);
        // 1. Release zero blocks.
        if !fixed {
            let mut bat = wlock(&self.bat);
            let geo = bat.geo;
            let mut buf = vec![0u8; geo.block_size as usize];
            for b in 0..geo.data_blocks {
                let idx = geo.payload_index(b);
                let e = bat.get(idx);
                let st = bat_state(e);
                let release = match st {
                    PB_FULLY_PRESENT => {
                        self.read_file(&mut buf, bat_offset(e))?;
                        disk::is_zero(&buf)
                    }
                    PB_UNMAPPED | PB_UNDEFINED | PB_UNMAPPED_V095 => !has_parent,
                    _ => false,
                };
                if release {
                    let ns = if has_parent { PB_ZERO } else { PB_NOT_PRESENT };
                    self.set_entry(&mut bat, idx, bat_entry(ns, 0));
                    stats.blocks_released += 1;
                }
            }
        }
        self.flush_locked(&mut wal)?;
        self.sflush()?;
        wal.applied_unflushed = false;
        // 2. Move blocks down.
        let data_start = {
            let hs = lock(&self.header);
            let mut s = round_up(hs.current.log_offset + hs.current.log_length as u64, MIB);
            for e in &self.rt().entries {
                s = s.max(e.offset + e.length as u64);
            }
            s
        };
        let mut blocks: Vec<(u64, u64, usize)> = {
            let bat = rlock(&self.bat);
            let geo = bat.geo;
            bat.nonzero()
                .filter_map(|(i, e)| {
                    let is_sb = (i as u64 % (geo.chunk_ratio + 1)) == geo.chunk_ratio;
                    let st = bat_state(e);
                    if is_sb && st == SB_PRESENT && has_parent {
                        Some((bat_offset(e), MIB, i))
                    } else if !is_sb && (st == PB_FULLY_PRESENT || st == PB_PARTIALLY_PRESENT) {
                        Some((bat_offset(e), geo.block_size, i))
                    } else {
                        None
                    }
                })
                .collect()
        };
        blocks.sort_unstable();
        let mut target = data_start;
        let mut unsafe_from = u64::MAX; // lowest freed source whose BAT change is not durable
        for (off, len, idx) in blocks {
            let t = round_up(target, MIB);
            if t + len <= off {
                if t + len > unsafe_from {
                    self.flush_locked(&mut wal)?;
                    self.sflush()?;
                    unsafe_from = u64::MAX;
                }
                let mut buf = vec![0u8; len as usize];
                self.read_file(&mut buf, off)?;
                self.write_file_sparse(&buf, t)?;
                let mut bat = wlock(&self.bat);
                let st = bat_state(bat.get(idx));
                self.set_entry(&mut bat, idx, bat_entry(st, t));
                drop(bat);
                if len == MIB && has_parent {
                    // Bitmap pages are cached by file offset.
                    let mut bm = lock(&self.bitmaps);
                    if !bm.dirty.is_empty() {
                        drop(bm);
                        self.flush_locked(&mut wal)?;
                        bm = lock(&self.bitmaps);
                    }
                    bm.pages.clear();
                }
                unsafe_from = unsafe_from.min(off);
                stats.blocks_moved += 1;
                target = t + len;
            } else {
                target = target.max(off + len);
            }
        }
        self.close_locked(&mut wal)?;
        let new_len = round_up(target, MIB).max(data_start);
        if new_len < stats.old_len {
            self.storage
                .set_len(new_len)
                .map_err(io_err("cannot truncate image"))?;
            self.sflush()?;
        }
        wal.next_free = new_len.max(target);
        lock(&self.bitmaps).pages.clear();
        // 3. The BAT is durable now: give every unreferenced range below the new end back to
        // the file system (released zero blocks, sources of moves that were not truncated), so
        // compacting never leaves more bytes allocated than before.
        let mut used: Vec<(u64, u64)> = {
            let bat = rlock(&self.bat);
            let geo = bat.geo;
            bat.nonzero()
                .filter_map(|(i, e)| {
                    let is_sb = (i as u64 % (geo.chunk_ratio + 1)) == geo.chunk_ratio;
                    let st = bat_state(e);
                    if is_sb && st == SB_PRESENT {
                        Some((bat_offset(e), MIB))
                    } else if !is_sb && (st == PB_FULLY_PRESENT || st == PB_PARTIALLY_PRESENT) {
                        Some((bat_offset(e), geo.block_size))
                    } else {
                        None
                    }
                })
                .collect()
        };
        used.sort_unstable();
        // The headers now say there is no log to replay, so the log's entries (written by this
        // compaction's BAT updates) are dead bytes too.
        {
            let hs = lock(&self.header);
            let (lo, ll) = (hs.current.log_offset, hs.current.log_length as u64);
            if hs.current.log_guid == [0; 16] && ll > 0 {
                self.storage
                    .punch_hole(lo, ll)
                    .map_err(io_err("cannot release the log"))?;
            }
        }
        let file_end = self
            .storage
            .len()
            .map_err(io_err("cannot get file length"))?;
        let mut free_from = data_start;
        for (off, len) in used.into_iter().chain([(file_end, 0)]) {
            if off > free_from {
                self.storage
                    .punch_hole(free_from, off.min(file_end) - free_from)
                    .map_err(io_err("cannot release unused space"))?;
            }
            free_from = free_from.max(off + len);
        }
        self.sflush()?;
        stats.new_len = self
            .storage
            .len()
            .map_err(io_err("cannot get file length"))?;
        Ok(stats)
    }

    pub fn info(&self) -> VhdxInfo {
        let both = read_headers(&*self.storage)
            .map(|(_, b)| {
                [
                    b[0].as_ref().map(|h| h.sequence),
                    b[1].as_ref().map(|h| h.sequence),
                ]
            })
            .unwrap_or([None, None]);
        let hs = lock(&self.header);
        let meta = rlock(&self.meta);
        let bat = rlock(&self.bat);
        let mut states: BTreeMap<String, u64> = BTreeMap::new();
        // Entries that are zero are not present: count the others and infer those.
        let geo = bat.geo;
        let mut others = 0u64;
        for (i, e) in bat.nonzero() {
            let (chunk, k) = (
                i as u64 / (geo.chunk_ratio + 1),
                i as u64 % (geo.chunk_ratio + 1),
            );
            if k == geo.chunk_ratio || chunk * geo.chunk_ratio + k >= geo.data_blocks {
                continue; // a sector bitmap entry, or padding past the last block
            }
            let st = bat_state(e);
            let name = match st {
                PB_NOT_PRESENT => continue,
                PB_UNDEFINED => "undefined",
                PB_ZERO => "zero",
                PB_UNMAPPED | PB_UNMAPPED_V095 => "unmapped",
                PB_FULLY_PRESENT => "fully_present",
                _ => "partially_present",
            };
            others += 1;
            *states.entry(name.to_string()).or_default() += 1;
        }
        if geo.data_blocks > others {
            states.insert("not_present".to_string(), geo.data_blocks - others);
        }
        VhdxInfo {
            virtual_size: bat.size,
            block_size: meta.block_size,
            logical_sector_size: meta.logical_sector,
            physical_sector_size: meta.physical_sector,
            has_parent: meta.has_parent,
            leave_blocks_allocated: meta.leave_blocks_allocated,
            chunk_ratio: bat.geo.chunk_ratio,
            header_sequence: hs.current.sequence,
            header_sequences: both,
            file_write_guid: guid_fmt(&hs.current.file_write_guid),
            data_write_guid: guid_fmt(&hs.current.data_write_guid),
            log_guid: guid_fmt(&hs.current.log_guid),
            log_offset: hs.current.log_offset,
            log_length: hs.current.log_length,
            bat_offset: self.rt().bat_offset,
            metadata_offset: self.rt().meta_offset,
            page83: guid_fmt(&meta.page83),
            parent_locator: meta
                .parent_locator
                .as_ref()
                .map(|l| l.entries.clone())
                .unwrap_or_default(),
            block_states: states,
            replayed_log_entries: self.replayed,
            dirty_at_open: self.dirty_at_open,
        }
    }

    /// Log entries written by this handle (for tests and benchmarks).
    pub fn log_entries_written(&self) -> u64 {
        lock(&self.wal).entries_written
    }

    /// The raw BAT entry of payload block `b` (tests and tools).
    pub fn bat_entry(&self, b: u64) -> Option<u64> {
        let bat = rlock(&self.bat);
        if b >= bat.geo.data_blocks {
            return None;
        }
        Some(bat.get(bat.geo.payload_index(b)))
    }

    /// The storage under this image.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
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

fn header_offset(slot: usize) -> u64 {
    if slot == 0 {
        HEADER1_OFFSET
    } else {
        HEADER2_OFFSET
    }
}

/// Reads both headers and picks the current one. Returns the state and the per-slot results.
fn read_headers(s: &dyn Storage) -> Result<(HeaderState, [Option<Header>; 2])> {
    let mut res: [Result<Header>; 2] = [Ok(dummy_header()), Ok(dummy_header())];
    for (slot, r) in res.iter_mut().enumerate() {
        let off = header_offset(slot);
        let mut b = vec![0u8; HEADER_SIZE];
        *r = s
            .read_at(&mut b, off)
            .map_err(io_err(format!("cannot read VHDX header at {off:#x}")))
            .and_then(|_| Header::parse(&b, off));
    }
    let [r1, r2] = res;
    let both = [r1.as_ref().ok().cloned(), r2.as_ref().ok().cloned()];
    let (current, slot) = match (r1, r2) {
        (Ok(a), Ok(b)) => {
            if a.sequence > b.sequence {
                (a, 0)
            } else if b.sequence > a.sequence {
                (b, 1)
            } else if a == b {
                // Disk2vhd writes two identical headers with equal sequence numbers.
                (a, 0)
            } else {
                return Err(Error::corrupt(
                    "VHDX header",
                    HEADER1_OFFSET,
                    format!(
                        "both headers have sequence number {} but differ",
                        a.sequence
                    ),
                ));
            }
        }
        (Ok(a), Err(_)) => (a, 0),
        (Err(_), Ok(b)) => (b, 1),
        (Err(e1), Err(e2)) => {
            return Err(Error::corrupt(
                "VHDX header",
                HEADER1_OFFSET,
                format!("no valid header: header 1: {e1}; header 2: {e2}"),
            ))
        }
    };
    Ok((HeaderState { current, slot }, both))
}

fn dummy_header() -> Header {
    Header {
        sequence: 0,
        file_write_guid: [0; 16],
        data_write_guid: [0; 16],
        log_guid: [0; 16],
        log_version: 0,
        version: 1,
        log_length: 0,
        log_offset: 0,
    }
}

/// Writes `nh` to the non-current slot, flushes, then to the other slot, flushes: both copies
/// end up valid and the newest is always intact.
fn write_header_pair(s: &dyn Storage, hs: &mut HeaderState, mut nh: Header) -> Result<()> {
    for _ in 0..2 {
        nh.sequence = hs.current.sequence + 1;
        let slot = 1 - hs.slot;
        let off = header_offset(slot);
        s.write_at(&nh.serialize(), off)
            .map_err(io_err(format!("cannot write VHDX header at {off:#x}")))?;
        s.flush().map_err(io_err("cannot flush VHDX header"))?;
        hs.current = nh.clone();
        hs.slot = slot;
    }
    Ok(())
}

fn replay_in_place(s: &dyn Storage, seq: &log::LogSequence) -> Result<()> {
    for e in &seq.entries {
        for op in &e.ops {
            match op {
                log::LogOp::Data { file_offset, page } => s
                    .write_at(page, *file_offset)
                    .map_err(io_err("cannot replay VHDX log"))?,
                // Punching reads back as zeros and costs no I/O on real files.
                log::LogOp::Zero { file_offset, len } => s
                    .punch_hole(*file_offset, *len)
                    .map_err(io_err("cannot replay VHDX log"))?,
            }
        }
    }
    let len = s.len().map_err(io_err("cannot get file length"))?;
    let want = seq.last_file_offset();
    if want > len {
        s.set_len(want)
            .map_err(io_err("cannot extend file after log replay"))?;
    }
    s.flush().map_err(io_err("cannot flush after log replay"))
}

/// The parent locator of a new link: `parent_linkage`, `relative_path` (always), and the
/// Windows paths only when known. A POSIX path in `absolute_win32_path` helps no Windows
/// reader, so none is written.
fn build_locator(
    child: &Path,
    parent_path: &Path,
    windows: &disk::ParentWindowsPaths,
    parent: &dyn BlockDevice,
) -> Result<ParentLocator> {
    let id = parent.unique_id().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{} has no unique id ({} images cannot be VHDX parents)",
            parent_path.display(),
            parent.format()
        ))
    })?;
    let abs = |p: &Path| -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(p))
                .unwrap_or(p.to_path_buf())
        }
    };
    let pabs = abs(parent_path);
    let cabs = abs(child);
    let cdir = cabs.parent().unwrap_or(Path::new("/"));
    let mut entries = vec![
        (
            "parent_linkage".to_string(),
            format!("{{{}}}", guid_fmt(&id)),
        ),
        (
            "relative_path".to_string(),
            disk::windows_relative_path(cdir, &pabs),
        ),
    ];
    if let Some(v) = windows.volume.as_ref().filter(|v| !v.is_empty()) {
        entries.push(("volume_path".to_string(), v.clone()));
    }
    if let Some(a) = windows.absolute.as_ref().filter(|a| !a.is_empty()) {
        entries.push(("absolute_win32_path".to_string(), a.clone()));
    }
    entries.retain(|(_, v)| v.len() < 32000);
    Ok(ParentLocator { entries })
}

fn win_to_path(s: &str) -> PathBuf {
    let s = s.strip_prefix("\\\\?\\").unwrap_or(s);
    PathBuf::from(s.replace('\\', "/"))
}

impl BlockDevice for VhdxDisk {
    fn format(&self) -> &'static str {
        "vhdx"
    }
    fn size(&self) -> u64 {
        self.size_cache.load(Ordering::Acquire)
    }
    fn logical_sector_size(&self) -> u32 {
        rlock(&self.meta).logical_sector
    }
    fn physical_sector_size(&self) -> u32 {
        rlock(&self.meta).physical_sector
    }
    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let bat = rlock(&self.bat);
        check_range(offset, buf.len() as u64, bat.size)?;
        let bs = bat.geo.block_size;
        let mut pos = 0usize;
        while pos < buf.len() {
            let o = offset + pos as u64;
            let n = ((bs - o % bs) as usize).min(buf.len() - pos);
            self.read_block_part(&bat, &mut buf[pos..pos + n], o)?;
            pos += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        // Whole sectors only: the request layer (disk::Disk) merged any partial sector.
        check_aligned(
            offset,
            buf.len() as u64,
            self.size(),
            self.logical_sector_size(),
        )?;
        if buf.is_empty() {
            return Ok(());
        }
        self.usable()?;
        self.ensure_session(true)?;
        self.write_aligned(buf, offset)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut wal = lock(&self.wal);
        self.flush_locked(&mut wal)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_aligned(offset, len, self.size(), self.logical_sector_size())?;
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if len == 0 {
            return Ok(());
        }
        // Partial blocks are left alone: discard is a hint.
        self.release_blocks(offset, len, true).map(|_| ())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_aligned(offset, len, self.size(), self.logical_sector_size())?;
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if len == 0 {
            return Ok(());
        }
        let rest = self.release_blocks(offset, len, flags.may_unmap)?;
        let bs = rlock(&self.bat).geo.block_size;
        for (o, l) in rest {
            if self.block_reads_zero(o / bs) {
                continue;
            }
            disk::write_zero_buffers(self, o, l)?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let bat = rlock(&self.bat);
        check_range(offset, len, bat.size)?;
        if len == 0 {
            return Ok(Extent {
                len: 0,
                allocation: Allocation::Unallocated,
            });
        }
        let geo = bat.geo;
        let has_parent = rlock(&self.meta).has_parent;
        let classify = |b: u64, in_block: u64, max: u64| -> Result<(Allocation, u64)> {
            let e = bat.get(geo.payload_index(b));
            let room = (geo.block_size - in_block).min(max);
            Ok(match bat_state(e) {
                PB_FULLY_PRESENT => (
                    Allocation::Data {
                        host_offset: Some(bat_offset(e) + in_block),
                    },
                    room,
                ),
                PB_PARTIALLY_PRESENT => {
                    let ls = geo.logical_sector;
                    let s = in_block / ls;
                    let last = (in_block + room - 1) / ls;
                    let (present, n) = self.bitmap_run(&bat, b, s, last - s + 1)?;
                    let run = ((s + n) * ls).min(in_block + room) - in_block;
                    if present {
                        (
                            Allocation::Data {
                                host_offset: Some(bat_offset(e) + in_block),
                            },
                            run,
                        )
                    } else {
                        (Allocation::Unallocated, run)
                    }
                }
                PB_NOT_PRESENT => (Allocation::Unallocated, room),
                _ => (Allocation::Zero, room),
            })
        };
        let _ = has_parent;
        let mut b = offset / geo.block_size;
        let (alloc, mut got) = classify(b, offset % geo.block_size, len)?;
        while got < len {
            let o = offset + got;
            if !o.is_multiple_of(geo.block_size) {
                break;
            }
            b = o / geo.block_size;
            if alloc == Allocation::Unallocated {
                // A run of zero entries (not present): skip it without classifying each block.
                // Of z entries from a payload index at least z*cr/(cr+1) - 1 are payloads.
                let z = bat.zero_run(geo.payload_index(b)) as u64;
                let skip = (z * geo.chunk_ratio / (geo.chunk_ratio + 1)).saturating_sub(1);
                if skip > 0 {
                    got = got.saturating_add(skip * geo.block_size);
                    continue;
                }
            }
            let (a, n) = classify(b, 0, len - got)?;
            let same = match (alloc, a) {
                (
                    Allocation::Data {
                        host_offset: Some(h),
                    },
                    Allocation::Data {
                        host_offset: Some(h2),
                    },
                ) => h + got == h2,
                (x, y) => x == y,
            };
            if !same {
                break;
            }
            got += n;
        }
        Ok(Extent {
            len: got.min(len),
            allocation: alloc,
        })
    }

    fn backing(&self) -> Option<&Arc<dyn BlockDevice>> {
        self.parent.as_ref()
    }

    fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.usable()?;
        let mut wal = lock(&self.wal);
        self.close_locked(&mut wal)?;
        self.closed.store(true, Ordering::Release);
        Ok(())
    }

    fn unique_id(&self) -> Option<[u8; 16]> {
        Some(lock(&self.header).current.data_write_guid)
    }

    fn parent_link(&self) -> Option<ParentLink> {
        let meta = rlock(&self.meta);
        if !meta.has_parent {
            return None;
        }
        let loc = meta.parent_locator.as_ref()?;
        let child_dir = self
            .path
            .as_ref()
            .and_then(|p| p.parent().map(|d| d.to_path_buf()))
            .unwrap_or_default();
        let mut candidates = Vec::new();
        if let Some(r) = loc.get("relative_path") {
            candidates.push(child_dir.join(win_to_path(r)));
        }
        for k in ["absolute_win32_path", "volume_path"] {
            if let Some(v) = loc.get(k) {
                let p = PathBuf::from(v);
                if !candidates.contains(&p) {
                    candidates.push(p);
                }
                let conv = win_to_path(v);
                if !candidates.contains(&conv) {
                    candidates.push(conv);
                }
            }
        }
        let name = loc
            .get("relative_path")
            .or_else(|| loc.get("absolute_win32_path"))
            .or_else(|| loc.get("volume_path"))
            .unwrap_or("")
            .to_string();
        let file_name = name.rsplit(['\\', '/']).next().unwrap_or("").to_string();
        if !file_name.is_empty() {
            let p = child_dir.join(&file_name);
            if !candidates.contains(&p) {
                candidates.push(p);
            }
        }
        let expected_id = loc
            .get("parent_linkage")
            .and_then(guid_parse)
            .unwrap_or([0; 16]);
        let also_accepted = loc.get("parent_linkage2").and_then(guid_parse);
        Some(ParentLink {
            name,
            candidates,
            expected_id,
            also_accepted,
            format: "vhdx",
        })
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(rlock(&self.meta).block_size as u64)
    }

    fn dirty(&self) -> bool {
        self.dirty_at_open
    }

    fn facts(&self) -> disk::LayerFacts {
        let (has_parent, fixed) = {
            let m = rlock(&self.meta);
            (m.has_parent, m.leave_blocks_allocated)
        };
        disk::LayerFacts {
            disk_type: Some(if has_parent {
                "differencing"
            } else if fixed {
                "fixed"
            } else {
                "dynamic"
            }),
            ..Default::default()
        }
    }

    fn format_specific(&self) -> Option<serde_json::Value> {
        let i = self.info();
        let mut v = serde_json::to_value(&i).ok()?;
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "parent_locator".into(),
                serde_json::Value::Object(
                    i.parent_locator
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                        .collect(),
                ),
            );
        }
        Some(v)
    }

    fn file_run(&self, offset: u64, len: u64) -> Option<(&std::fs::File, u64, u64)> {
        // Only fully present blocks are file bytes as they are; a replayed-log overlay would
        // patch them in memory.
        if len == 0 || !self.overlay.is_empty() {
            return None;
        }
        let bat = rlock(&self.bat);
        if offset.checked_add(len)? > bat.size {
            return None;
        }
        let geo = bat.geo;
        let in_block = offset % geo.block_size;
        let e = bat.get(geo.payload_index(offset / geo.block_size));
        if bat_state(e) != PB_FULLY_PRESENT {
            return None;
        }
        let n = len.min(geo.block_size - in_block);
        Some((self.storage.file()?, bat_offset(e) + in_block, n))
    }
}

impl Drop for VhdxDisk {
    fn drop(&mut self) {
        if !self.read_only && !self.closed.load(Ordering::Acquire) {
            let _ = BlockDevice::close(self);
        }
    }
}

//! Opening an image, as a sequence of small steps: check the signature, read the headers,
//! validate and replay the log, read the region table, load the metadata, load and validate the
//! BAT. Every step refuses what it cannot trust with an error naming the structure and offset.

use super::*;
use crate::log_replay::Overlay;

/// Options used internally by `check`.
#[derive(Clone, Copy, Default)]
pub(crate) struct Lenient {
    /// Do not refuse BAT entries past the end of the file or overlapping (check reports them).
    pub bat: bool,
}

/// What the log step found.
#[derive(Default)]
struct LogState {
    /// A read-only open's view of the replayed pages.
    overlay: Overlay,
    replayed: usize,
    dirty_at_open: bool,
    /// The file length the replayed log asks for (0 when nothing was replayed).
    logged_len: u64,
    /// The header names a log (LogGuid set): a writable open must mark it empty.
    active: bool,
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
        Self::open_path_with_cache(path, opts, DEFAULT_BAT_CACHE_BYTES)
    }

    /// [`VhdxDisk::open_path`] with a bound on the BAT page cache (see
    /// [`VhdxDisk::open_with_cache`]).
    pub fn open_path_with_cache(
        path: &Path,
        opts: &OpenOptions,
        bat_cache_bytes: usize,
    ) -> Result<VhdxDisk> {
        let access = if opts.read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        let s = FileStorage::open(path, access, true)?;
        Self::open_with_cache(Arc::new(s), opts, bat_cache_bytes)
    }

    pub fn open(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<VhdxDisk> {
        Self::open_with_cache(storage, opts, DEFAULT_BAT_CACHE_BYTES)
    }

    /// [`VhdxDisk::open`], keeping at most `bat_cache_bytes` of clean BAT pages in memory
    /// (4 KiB each; pages changed and not yet flushed are kept whatever the bound).
    pub fn open_with_cache(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        bat_cache_bytes: usize,
    ) -> Result<VhdxDisk> {
        Self::open_inner(storage, opts.read_only, Lenient::default(), bat_cache_bytes)
    }

    pub(crate) fn open_inner(
        storage: Arc<dyn Storage>,
        read_only: bool,
        lenient: Lenient,
        bat_cache_bytes: usize,
    ) -> Result<VhdxDisk> {
        if !Self::probe(&*storage)? {
            return Err(Error::WrongFormat {
                format: "vhdx",
                detail: "no 'vhdxfile' signature at offset 0".into(),
            });
        }
        let file_len = storage.len().map_err(io_err("cannot get file length"))?;
        let (hs, _) = read_headers(&*storage)?;
        let log = replay_log(&*storage, &hs, file_len, read_only)?;
        if log.active && !read_only {
            // Log applied (or empty): mark it empty, then open what is now a clean image.
            let mut hs = hs;
            let mut nh = hs.current.clone();
            nh.log_guid = Guid::NIL;
            write_header_pair(&*storage, &mut hs, nh)?;
            return Self::open_inner(storage, read_only, lenient, bat_cache_bytes).map(|mut d| {
                d.dirty_at_open = log.dirty_at_open;
                d.replayed = log.replayed;
                d
            });
        }
        // A read-only replay may refer to space the replay would have added.
        let file_len_eff = file_len.max(log.logged_len);
        let overlay = Arc::new(log.overlay);
        let rt = read_region_table(&*storage, &overlay, file_len_eff)?;
        check_regions_clear_of_log(&rt, &hs.current)?;
        let meta = load_metadata(&*storage, &overlay, &rt)?;
        let geo = check_bat_region(&rt, &meta)?;
        // Nothing of the BAT is read here: pages are read (and their entries checked) on
        // first use. New blocks go past the end of the file and every structure; a block that
        // runs past the end of the file is found when the first allocation needs to know
        // (`alloc.rs`).
        let h = &hs.current;
        let mut next_free = round_up(file_len, MIB).max(h.log_offset + h.log_length as u64);
        for e in &rt.entries {
            next_free = next_free.max(e.offset + e.length as u64);
        }
        let rules = EntryRules {
            geo,
            has_parent: meta.has_parent,
            lenient,
            fixed: rt
                .entries
                .iter()
                .map(|e| (e.offset, e.offset + e.length as u64))
                .chain(std::iter::once((
                    h.log_offset,
                    h.log_offset + h.log_length as u64,
                )))
                .collect(),
            logged_len: log.logged_len,
            open_len: file_len_eff,
            known_len: AtomicU64::new(file_len_eff),
            storage: storage.clone(),
        };
        let name = storage
            .path()
            .map_or_else(|| "VHDX image".to_string(), |p| p.display().to_string());
        let source = bat_source(storage.clone(), overlay.clone(), name, rules);
        let bat = Bat::new(
            geo,
            meta.virtual_size,
            geo.bat_entries as usize,
            rt.bat_offset,
            source,
            bat_cache_bytes,
        );
        // The first pages (the whole table of any image up to the cache size) are read and
        // checked now; blocks must not overlap one another (`Bat::check_page`).
        bat.warm()?;
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
                next_free,
                end_known: geo.block_size <= MIB,
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
            dirty_at_open: log.dirty_at_open,
            replayed: log.replayed,
            failed: disk::FailLatch::new(),
        })
    }
}

/// Validates the log the current header names and replays its sequence: in place when
/// writable, into an overlay when read-only.
fn replay_log(
    storage: &dyn Storage,
    hs: &HeaderState,
    file_len: u64,
    read_only: bool,
) -> Result<LogState> {
    let h = &hs.current;
    let mut state = LogState::default();
    if h.log_guid.is_nil() {
        return Ok(state);
    }
    state.active = true;
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
    if seq.entries.is_empty() {
        return Ok(state);
    }
    state.dirty_at_open = true;
    log::validate_targets(&seq, lo, ll)?;
    log_replay::check_against_file(&seq, lo, file_len)?;
    state.replayed = seq.entries.len();
    state.logged_len = seq.last_file_offset();
    if read_only {
        state.overlay = Overlay::from_sequence(&seq);
    } else {
        replay_in_place(storage, &seq)?;
    }
    Ok(state)
}

/// The first region table, else the second.
fn read_region_table(
    storage: &dyn Storage,
    overlay: &Overlay,
    file_len: u64,
) -> Result<RegionTable> {
    let mut rtb = vec![0u8; RT_SIZE];
    match read_via(storage, overlay, &mut rtb, RT1_OFFSET, "region table 1")
        .and_then(|_| RegionTable::parse(&rtb, RT1_OFFSET, file_len))
    {
        Ok(rt) => Ok(rt),
        Err(e1) => {
            let r2 = read_via(storage, overlay, &mut rtb, RT2_OFFSET, "region table 2")
                .and_then(|_| RegionTable::parse(&rtb, RT2_OFFSET, file_len));
            match r2 {
                Ok(rt) => Ok(rt),
                Err(Error::Unsupported(m)) => Err(Error::Unsupported(m)),
                Err(_) => Err(e1),
            }
        }
    }
}

/// Regions must not overlap the log.
fn check_regions_clear_of_log(rt: &RegionTable, h: &Header) -> Result<()> {
    let log_end = h.log_offset + h.log_length as u64;
    for e in &rt.entries {
        let end = e.offset + e.length as u64;
        if h.log_length > 0 && e.offset < log_end && h.log_offset < end {
            return Err(Error::corrupt(
                "VHDX region table",
                RT1_OFFSET,
                format!("region {} overlaps the log", e.guid),
            ));
        }
    }
    Ok(())
}

/// Reads and parses the metadata region (at most 128 MiB are read).
fn load_metadata(storage: &dyn Storage, overlay: &Overlay, rt: &RegionTable) -> Result<Metadata> {
    if rt.meta_length as u64 > 128 * MIB {
        return Err(Error::corrupt(
            "VHDX region table",
            RT1_OFFSET,
            format!("metadata region length {} exceeds 128 MiB", rt.meta_length),
        ));
    }
    let mut mb = vec![0u8; rt.meta_length as usize];
    read_via(storage, overlay, &mut mb, rt.meta_offset, "metadata region")?;
    parse_metadata(&mb, rt.meta_offset)
}

/// The geometry the metadata calls for, once the BAT region is known to hold its table.
fn check_bat_region(rt: &RegionTable, meta: &Metadata) -> Result<Geometry> {
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
    Ok(geo)
}

/// Where BAT pages come from: the file, patched by a read-only open's replayed log. Holes in
/// the file read as zeros (not present) without I/O, unless a replayed log patches pages.
fn bat_source(
    storage: Arc<dyn Storage>,
    overlay: Arc<Overlay>,
    name: String,
    rules: EntryRules,
) -> bat::Source {
    let (s1, s2, o1, o2) = (storage.clone(), storage, overlay.clone(), overlay);
    let what = format!("the BAT of {name}");
    let source_name = name.clone();
    let known_data = std::sync::Mutex::new(0..0u64);
    bat::Source {
        read: Box::new(move |buf, at| read_via(&*s1, &o1, buf, at, &what)),
        hole: Box::new(move |from, n| {
            // The last data run found, so a walk over a dense table asks the file system once
            // per run, not once per page (on tmpfs each SEEK_HOLE scans to the run's end, so
            // asking per page made a 512 MiB table take minutes). Only data is remembered: a
            // run punched since then just reads as zeros.
            let mut known = known_data.lock().unwrap_or_else(|e| e.into_inner());
            if known.contains(&from) || !o2.is_empty() {
                return Ok(0);
            }
            // Past the end of the file is not a hole but a truncated image: read (and fail).
            let file_len = s2.len().map_err(io_err("cannot get file length"))?;
            if from >= file_len {
                return Ok(0);
            }
            match s2.data_run(from, file_len - from) {
                Ok((false, run)) => Ok(run.min(n)),
                Ok((true, run)) => {
                    *known = from..from + run;
                    Ok(0)
                }
                Err(e) => Err(Error::io(
                    format!("cannot query allocation of the BAT at {from:#x}"),
                    e,
                )),
            }
        }),
        check: Box::new(move |i, e, at, first_sight| {
            rules
                .check(i, e, first_sight)
                .map_err(|d| Error::corrupt("VHDX BAT", at, format!("{name}: {d}")))
        }),
        name: source_name,
    }
}

/// What a BAT entry read from the file must satisfy: a valid state, and (unless lenient) a
/// block inside the file, clear of the header section, the regions and the log. Blocks that
/// overlap each other are refused by the table as their pages are first read
/// (`Bat::check_page`); `check`, lenient, reports them instead.
struct EntryRules {
    geo: Geometry,
    has_parent: bool,
    lenient: Lenient,
    /// Regions and the log, as byte ranges.
    fixed: Vec<(u64, u64)>,
    /// The file length a read-only open's replayed log asks for.
    logged_len: u64,
    /// The file length at open (with `logged_len`): where an entry first read in this session
    /// may point. New blocks go past it, so an entry read for the first time that points past
    /// it was never written by us and would alias a block we allocate.
    open_len: u64,
    /// The file length last seen (it only grows while open; refreshed when an entry points
    /// past it).
    known_len: AtomicU64,
    storage: Arc<dyn Storage>,
}

impl EntryRules {
    /// Checks entry `i` = `e`. `first_sight`: its page was never read in this session, so
    /// its entries must lie in the file as it was at open (see `open_len`). Returns the file
    /// range (offset, length) the block takes, when it takes one no other entry may share.
    fn check(
        &self,
        i: usize,
        e: u64,
        first_sight: bool,
    ) -> std::result::Result<Option<(u64, u64)>, String> {
        let st = bat_state(e);
        let (present, len) = if self.geo.is_bitmap_index(i) {
            if st != 0 && st != SB_PRESENT {
                return Err(format!("sector bitmap entry {i} has invalid state {st}"));
            }
            (st == SB_PRESENT && self.has_parent, MIB)
        } else {
            if ![0, 1, 2, 3, 5, 6, 7].contains(&st) {
                return Err(format!("payload entry {i} has invalid state {st}"));
            }
            if st == PB_PARTIALLY_PRESENT && !self.has_parent {
                return Err(format!(
                    "payload entry {i} is PARTIALLY_PRESENT in an image without parent"
                ));
            }
            (
                st == PB_FULLY_PRESENT || st == PB_PARTIALLY_PRESENT,
                self.geo.block_size,
            )
        };
        if !present || self.lenient.bat {
            return Ok(None);
        }
        let off = bat_offset(e);
        let end = off.saturating_add(len);
        let mut file_len = if first_sight {
            self.open_len.max(self.logged_len)
        } else {
            self.known_len.load(Ordering::Relaxed)
        };
        if off >= file_len && !first_sight {
            let now = self
                .storage
                .len()
                .map_err(|e| format!("cannot get file length: {e}"))?;
            file_len = now.max(self.logged_len);
            self.known_len.fetch_max(file_len, Ordering::Relaxed);
        }
        if off >= file_len || off < MIB {
            return Err(format!(
                "entry {i} start offset {off} points after end of file ({file_len}) or into the header; image probably truncated"
            ));
        }
        if let Some(r) = self.fixed.iter().find(|r| off < r.1 && r.0 < end) {
            return Err(format!(
                "entry {i} block at {off:#x} overlaps a region or the log at {:#x}..{:#x}",
                r.0, r.1
            ));
        }
        Ok(Some((off, len)))
    }
}

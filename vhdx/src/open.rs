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
        let log = replay_log(&*storage, &hs, file_len, read_only)?;
        if log.active && !read_only {
            // Log applied (or empty): mark it empty, then open what is now a clean image.
            let mut hs = hs;
            let mut nh = hs.current.clone();
            nh.log_guid = Guid::NIL;
            write_header_pair(&*storage, &mut hs, nh)?;
            return Self::open_inner(storage, read_only, lenient).map(|mut d| {
                d.dirty_at_open = log.dirty_at_open;
                d.replayed = log.replayed;
                d
            });
        }
        // A read-only replay may refer to space the replay would have added.
        let file_len_eff = file_len.max(log.logged_len);
        let overlay = &log.overlay;
        let rt = read_region_table(&*storage, overlay, file_len_eff)?;
        check_regions_clear_of_log(&rt, &hs.current)?;
        let meta = load_metadata(&*storage, overlay, &rt)?;
        let bat = load_bat(&*storage, overlay, &rt, &meta, file_len)?;
        let next_free = validate_bat(
            &bat,
            &rt,
            &meta,
            &hs.current,
            lenient,
            file_len,
            file_len_eff,
        )?;
        Ok(VhdxDisk {
            path: storage.path().map(|p| p.to_path_buf()),
            storage,
            read_only,
            overlay: log.overlay,
            regions: RwLock::new(rt),
            size_cache: AtomicU64::new(meta.virtual_size),
            bat: RwLock::new(bat),
            meta: RwLock::new(meta),
            bitmaps: Mutex::new(Bitmaps::default()),
            wal: Mutex::new(Wal {
                raw_dirty: BTreeMap::new(),
                next_free,
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

/// Loads the BAT the metadata's geometry calls for, once the region is known to hold it.
fn load_bat(
    storage: &dyn Storage,
    overlay: &Overlay,
    rt: &RegionTable,
    meta: &Metadata,
    file_len: u64,
) -> Result<Bat> {
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
    Bat::load(
        geo,
        meta.virtual_size,
        geo.bat_entries as usize,
        |buf, at| read_via(storage, overlay, buf, rt.bat_offset + at, "BAT"),
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
    )
}

/// Checks every BAT entry that is not zero: a valid state, and (unless `lenient`) a block inside
/// the file, clear of the header section, the regions, the log and every other block. Returns
/// where the next allocation may go (past everything the file holds).
fn validate_bat(
    bat: &Bat,
    rt: &RegionTable,
    meta: &Metadata,
    h: &Header,
    lenient: Lenient,
    file_len: u64,
    file_len_eff: u64,
) -> Result<u64> {
    let geo = bat.geo;
    let log_end = h.log_offset + h.log_length as u64;
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
    let at = |i: usize| rt.bat_offset + i as u64 * 8;
    // Zero entries (not present, no offset) need no checks.
    for (i, e) in bat.nonzero() {
        let st = bat_state(e);
        let (present, len) = if geo.is_bitmap_index(i) {
            if st != 0 && st != SB_PRESENT {
                return Err(Error::corrupt(
                    "VHDX BAT",
                    at(i),
                    format!("sector bitmap entry {i} has invalid state {st}"),
                ));
            }
            (st == SB_PRESENT && meta.has_parent, MIB)
        } else {
            if ![0, 1, 2, 3, 5, 6, 7].contains(&st) {
                return Err(Error::corrupt(
                    "VHDX BAT",
                    at(i),
                    format!("payload entry {i} has invalid state {st}"),
                ));
            }
            if st == PB_PARTIALLY_PRESENT && !meta.has_parent {
                return Err(Error::corrupt(
                    "VHDX BAT",
                    at(i),
                    format!("payload entry {i} is PARTIALLY_PRESENT in an image without parent"),
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
                at(i),
                format!(
                    "entry {i} start offset {off} points after end of file ({file_len}) or into the header; image probably truncated"
                ),
            ));
        }
        if let Some(r) = fixed_regions.iter().find(|r| off < r.1 && r.0 < end) {
            return Err(Error::corrupt(
                "VHDX BAT",
                at(i),
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
                at(w[1].2),
                format!(
                    "entries {} and {} point to overlapping blocks at {:#x} and {:#x}",
                    w[0].2, w[1].2, w[0].0, w[1].0
                ),
            ));
        }
    }
    Ok(max_end)
}

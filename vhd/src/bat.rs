//! The block allocation table: one big-endian u32 per block, the sector offset of the block's
//! bitmap, or all ones for a block not allocated (docs/vhd.md, "BAT").
//!
//! The table is not held in memory. A 2 TiB disk with 2 MiB blocks has a 4 MiB table (with
//! 32 KiB blocks, 256 MiB), so pages of 1024 entries (4 KiB of file) are read on demand into a
//! bounded cache with CLOCK replacement. The file is the authority: an entry is written to the
//! file first (`alloc.rs`: data, flush, then the entry), and only then changed in a cached page,
//! so a page is never dirty and eviction never writes. Readers hold the metadata read guard,
//! writers change entries under the write guard, so a page read from the file can never be
//! older than an entry changed while it was read.
//!
//! Open reads only the first pages (as many as the cache holds), so open time and memory do not
//! depend on the table's size. Every page is checked the first time it is read in a session
//! (by a lookup or a walk): an entry may not point outside the data area as it was at open, on
//! the metadata, or at (part of) a block another entry uses or this session allocated. The
//! starts of the blocks seen so far are kept in a sorted set (entries are sector offsets and a
//! hostile one may point anywhere, so the check compares a block with its neighbours by
//! position, which is exact whatever the alignment); memory follows the allocated entries
//! read, which the table on disk justifies. The count of allocated blocks is not known at
//! open: [`Bat::allocated_count`] walks the table when asked (`info`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use disk::{Error, Result, Storage};

use crate::io::read_exact;
use crate::limits::SECTOR;

/// The entry of a block that is not allocated.
pub const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// Bytes per entry.
pub const ENTRY_SIZE: u64 = 4;
/// Entries per cached page (4 KiB of table).
pub const PAGE_ENTRIES: u64 = 1024;
/// Default bound of the page cache: 1 MiB of entries (256 pages), which covers 512 GiB of a
/// disk with 2 MiB blocks.
pub const DEFAULT_CACHE_BYTES: usize = 1 << 20;
/// Entries read per piece when the whole table is walked (open, check, compact, resize).
const SCAN_ENTRIES: u64 = 16 * PAGE_ENTRIES;

/// One cached page and its CLOCK reference bit.
#[derive(Debug)]
struct Slot {
    page: u64,
    /// Shared with readers, who scan it without holding the cache lock.
    entries: Arc<[u32]>,
    referenced: bool,
}

#[derive(Debug, Default)]
struct Cache {
    slots: Vec<Slot>,
    /// Page number -> index in `slots`.
    index: HashMap<u64, usize>,
    hand: usize,
    max_pages: usize,
    /// Pages checked in this session, one bit each (8 KiB for the largest table).
    seen: disk::BitSet,
    /// Start sectors of the blocks of every entry checked and every block set in this session.
    starts: BTreeSet<u32>,
}

impl Cache {
    fn seen(&self, page: u64) -> bool {
        self.seen.contains(page)
    }

    fn mark_seen(&mut self, page: u64) {
        self.seen.insert(page);
    }

    /// A block start already kept whose block (`slot` bytes) overlaps the one at `sector`.
    fn clash(&self, sector: u32, slot: u64) -> Option<u32> {
        let start = sector as u64 * SECTOR;
        let below = self.starts.range(..=sector).next_back();
        let above = self.starts.range(sector..).next();
        [below, above]
            .into_iter()
            .flatten()
            .copied()
            .find(|&o| (o as u64 * SECTOR).abs_diff(start) < slot)
    }

    fn lookup(&mut self, page: u64) -> Option<Arc<[u32]>> {
        let &slot = self.index.get(&page)?;
        let s = &mut self.slots[slot];
        s.referenced = true;
        Some(s.entries.clone())
    }

    fn full(&self) -> bool {
        self.slots.len() >= self.max_pages
    }

    fn insert(&mut self, page: u64, entries: Arc<[u32]>) {
        if self.index.contains_key(&page) || self.max_pages == 0 {
            return;
        }
        if !self.full() {
            self.index.insert(page, self.slots.len());
            self.slots.push(Slot {
                page,
                entries,
                referenced: false,
            });
            return;
        }
        // CLOCK: the first page not used since the hand last passed it goes.
        loop {
            let s = &mut self.slots[self.hand];
            if s.referenced {
                s.referenced = false;
                self.hand = (self.hand + 1) % self.slots.len();
                continue;
            }
            self.index.remove(&s.page);
            self.index.insert(page, self.hand);
            *s = Slot {
                page,
                entries,
                referenced: false,
            };
            self.hand = (self.hand + 1) % self.slots.len();
            return;
        }
    }

    /// Entry `i` of a cached page becomes `e` (a fresh copy of the page: readers may hold the
    /// old one, which is fine, as they hold the metadata read guard a change excludes).
    fn update(&mut self, i: u64, e: u32) {
        if let Some(&slot) = self.index.get(&(i / PAGE_ENTRIES)) {
            let s = &mut self.slots[slot];
            let mut v = s.entries.to_vec();
            if let Some(x) = v.get_mut((i % PAGE_ENTRIES) as usize) {
                *x = e;
            }
            s.entries = v.into();
        }
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.index.clear();
        self.hand = 0;
    }
}

/// The table: where it is, how many entries are in use, and the page cache.
#[derive(Debug, Default)]
pub struct Bat {
    /// File offset of the table.
    offset: u64,
    /// Entries in use (the virtual size in blocks).
    len: u64,
    /// What entries must satisfy when their page is first read (none when lenient: `check`
    /// collects the errors at open instead).
    rules: Option<Rules>,
    cache: Mutex<Cache>,
    /// Entries whose write and restore both failed (the handle then refuses writes): the value
    /// memory had, which is what reads go on seeing, whatever the file now holds.
    pinned: Mutex<BTreeMap<u64, u32>>,
    /// `pinned` is not empty (so lookups need not lock it).
    any_pinned: AtomicBool,
}

/// What entries first read in a session must satisfy.
#[derive(Debug)]
struct Rules {
    layout: Layout,
    /// The file, for errors.
    name: String,
}

/// What a block may not touch: the file's metadata ranges and the end of its data area.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Byte ranges of the footer copy, dynamic header and BAT.
    pub metadata: [(u64, u64); 3],
    /// Where the trailing footer starts.
    pub data_end: u64,
    pub file_len: u64,
    /// Bytes of one block with its bitmap.
    pub slot: u64,
}

impl Layout {
    /// Why entry `i` = `e` cannot be used, if it cannot.
    fn misplaced(&self, i: u64, e: u32) -> Option<String> {
        let start = e as u64 * SECTOR;
        let end = start + self.slot;
        let (data_end, len) = (self.data_end, self.file_len);
        if end > data_end {
            Some(format!("entry {i} = {e:#x} puts block at {start}..{end}, past the data area end {data_end} (file length {len})"))
        } else if self.metadata.iter().any(|&(a, b)| start < b && end > a) {
            Some(format!("entry {i} = {e:#x} puts block at {start}..{end} on top of the footer copy, dynamic header or BAT"))
        } else {
            None
        }
    }
}

fn decode(raw: &[u8]) -> impl Iterator<Item = u32> + '_ {
    raw.chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
}

impl Bat {
    /// The table of `len` entries at `offset`, with up to `cache_bytes` of pages cached.
    /// `strict`: the first pages (as many as the cache holds) are read and checked now, the
    /// others when first read; entries that put a block outside the data area, on the
    /// metadata or on another block are refused. Lenient (`check`): the whole table is read
    /// now and the entries that put a block outside the data area or on the metadata are
    /// returned as (file offset of the entry, message); nothing is refused.
    pub fn open(
        s: &dyn Storage,
        offset: u64,
        len: u64,
        cache_bytes: usize,
        layout: Layout,
        strict: bool,
    ) -> Result<(Bat, Vec<(u64, String)>)> {
        let max_pages = cache_bytes / (PAGE_ENTRIES * ENTRY_SIZE) as usize;
        let name = s
            .path()
            .map_or_else(|| "VHD image".to_string(), |p| p.display().to_string());
        let mut bat = Bat {
            offset,
            len,
            cache: Mutex::new(Cache {
                max_pages,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut errors = Vec::new();
        if strict {
            bat.rules = Some(Rules { layout, name });
            let warm = (max_pages as u64 * PAGE_ENTRIES).min(len);
            scan_file(s, offset, warm, |first, piece| {
                let c = &mut *bat.cache();
                for (p, chunk) in piece.chunks(PAGE_ENTRIES as usize).enumerate() {
                    let page = first / PAGE_ENTRIES + p as u64;
                    bat.check_page(c, page, chunk)?;
                    c.insert(page, Arc::from(chunk));
                }
                Ok(())
            })?;
            return Ok((bat, errors));
        }
        let cache = bat.cache.get_mut().unwrap_or_else(|e| e.into_inner());
        scan_file(s, offset, len, |first, piece| {
            for (k, e) in piece.iter().enumerate() {
                let i = first + k as u64;
                if *e == UNALLOCATED {
                    continue;
                }
                if let Some(msg) = layout.misplaced(i, *e) {
                    errors.push((offset + ENTRY_SIZE * i, msg));
                }
            }
            for (p, chunk) in piece.chunks(PAGE_ENTRIES as usize).enumerate() {
                if cache.full() {
                    break;
                }
                cache.insert(first / PAGE_ENTRIES + p as u64, Arc::from(chunk));
            }
            Ok(())
        })?;
        Ok((bat, errors))
    }

    /// Checks page `page` (`entries`, just read from the file) if this session has not yet:
    /// every block in the data area as it was at open, off the metadata, and clear of every
    /// block seen or set so far. A refused page marks nothing, so reading it again fails the
    /// same way.
    fn check_page(&self, c: &mut Cache, page: u64, entries: &[u32]) -> Result<()> {
        let Some(rules) = &self.rules else {
            return Ok(());
        };
        if c.seen(page) {
            return Ok(());
        }
        let first = page * PAGE_ENTRIES;
        let slot = rules.layout.slot;
        let corrupt = |i: u64, msg: String| {
            Error::corrupt(
                "VHD BAT",
                self.entry_offset(i),
                format!("{}: {msg}", rules.name),
            )
        };
        let mut claims: Vec<(u32, u64)> = Vec::new();
        for (k, &e) in entries.iter().enumerate() {
            let i = first + k as u64;
            let e = self.unless_pinned(i, e);
            if e == UNALLOCATED {
                continue;
            }
            if let Some(msg) = rules.layout.misplaced(i, e) {
                return Err(corrupt(i, msg));
            }
            claims.push((e, i));
        }
        claims.sort_unstable();
        if let Some(w) = claims
            .windows(2)
            .find(|w| w[0].0 as u64 * SECTOR + slot > w[1].0 as u64 * SECTOR)
        {
            return Err(corrupt(
                w[1].1,
                format!(
                    "entries {} and {} put blocks at sectors {:#x} and {:#x}, which overlap",
                    w[0].1, w[1].1, w[0].0, w[1].0
                ),
            ));
        }
        for &(e, i) in &claims {
            if let Some(o) = c.clash(e, slot) {
                return Err(corrupt(
                    i,
                    format!(
                        "entry {i} puts its block at sector {e:#x}, which overlaps the block at sector {o:#x} of another entry (or one allocated since open)"
                    ),
                ));
            }
        }
        c.starts.extend(claims.iter().map(|&(e, _)| e));
        c.mark_seen(page);
        Ok(())
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Entries in use (the virtual size in blocks).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// File offset of entry `i`.
    pub fn entry_offset(&self, i: u64) -> u64 {
        self.offset + ENTRY_SIZE * i
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Page `page` of the table, from the cache or the file.
    fn page(&self, s: &dyn Storage, page: u64) -> Result<Arc<[u32]>> {
        if let Some(p) = self.cache().lookup(page) {
            return Ok(p);
        }
        // Read outside the lock, so hits go on meanwhile. Two readers missing the same page
        // read the same bytes: entries change only under the metadata write guard.
        let first = page * PAGE_ENTRIES;
        let n = PAGE_ENTRIES.min(self.len - first);
        let mut raw = vec![0u8; (n * ENTRY_SIZE) as usize];
        read_exact(s, &mut raw, self.entry_offset(first), "VHD BAT")?;
        let entries: Arc<[u32]> = decode(&raw).collect();
        let mut c = self.cache();
        self.check_page(&mut c, page, &entries)?;
        c.insert(page, entries.clone());
        Ok(entries)
    }

    /// `e`, read for entry `i`, or the value pinned for it.
    fn unless_pinned(&self, i: u64, e: u32) -> u32 {
        if !self.any_pinned.load(Ordering::Acquire) {
            return e;
        }
        let pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        pinned.get(&i).copied().unwrap_or(e)
    }

    /// Entry `i` ([`UNALLOCATED`] past the end).
    pub fn get(&self, s: &dyn Storage, i: u64) -> Result<u32> {
        if i >= self.len {
            return Ok(UNALLOCATED);
        }
        let e = self.page(s, i / PAGE_ENTRIES)?[(i % PAGE_ENTRIES) as usize];
        Ok(self.unless_pinned(i, e))
    }

    /// The first allocated entry in `from..to` (`to` when there is none), a page at a time.
    pub fn next_allocated(&self, s: &dyn Storage, from: u64, to: u64) -> Result<u64> {
        let to = to.min(self.len);
        let mut i = from;
        while i < to {
            let page = i / PAGE_ENTRIES;
            let first = page * PAGE_ENTRIES;
            let entries = self.page(s, page)?;
            let end = (to - first).min(entries.len() as u64);
            for k in i - first..end {
                if self.unless_pinned(first + k, entries[k as usize]) != UNALLOCATED {
                    return Ok(first + k);
                }
            }
            i = first + PAGE_ENTRIES;
        }
        Ok(to.max(from))
    }

    /// Entry `i` is now `new` in the file (was `old`): the cached page follows, and the block
    /// is this session's (an entry first read later may not point into it). A block released
    /// stays marked: only an entry that overlapped it from the start could point there.
    pub fn set(&mut self, i: u64, new: u32, _old: u32) {
        let c = self.cache.get_mut().unwrap_or_else(|e| e.into_inner());
        c.update(i, new);
        if new != UNALLOCATED && self.rules.is_some() {
            // A start already kept within one slot is a block released since (compaction
            // moves a block into a released one's place): the new block replaces it.
            let slot = self.rules.as_ref().map_or(0, |r| r.layout.slot);
            while let Some(o) = c.clash(new, slot) {
                c.starts.remove(&o);
            }
            c.starts.insert(new);
        }
    }

    /// The write of entry `i` and its restore both failed: reads keep seeing `value`.
    pub fn pin(&self, i: u64, value: u32) {
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        pinned.insert(i, value);
        self.any_pinned.store(true, Ordering::Release);
    }

    /// Calls `f(index, entry)` for every allocated block, in table order, reading the table
    /// from the file in bounded pieces (pages read for the first time are checked).
    pub fn for_each_allocated(
        &self,
        s: &dyn Storage,
        mut f: impl FnMut(u64, u32) -> Result<()>,
    ) -> Result<()> {
        scan_file(s, self.offset, self.len, |first, piece| {
            if self.rules.is_some() {
                let mut c = self.cache();
                for (p, chunk) in piece.chunks(PAGE_ENTRIES as usize).enumerate() {
                    self.check_page(&mut c, first / PAGE_ENTRIES + p as u64, chunk)?;
                }
            }
            for (k, &e) in piece.iter().enumerate() {
                let i = first + k as u64;
                let e = self.unless_pinned(i, e);
                if e != UNALLOCATED {
                    f(i, e)?;
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    /// (index, entry) of every allocated block, in table order.
    pub fn allocated(&self, s: &dyn Storage) -> Result<Vec<(u64, u32)>> {
        let mut v = Vec::new();
        self.for_each_allocated(s, |i, e| {
            v.push((i, e));
            Ok(())
        })?;
        Ok(v)
    }

    /// How many blocks are allocated: a walk of the table (not known at open).
    pub fn allocated_count(&self, s: &dyn Storage) -> Result<u64> {
        let mut n = 0;
        self.for_each_allocated(s, |_, _| {
            n += 1;
            Ok(())
        })?;
        Ok(n)
    }

    /// The table now has `len` entries at `offset` (a resize wrote them, all ones past the old
    /// end).
    pub fn grow(&mut self, offset: u64, len: u64) {
        self.offset = offset;
        self.len = len;
        // The last page may have grown: start afresh (resizes are rare).
        self.cache
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Pages in the cache now (for tests and statistics).
    #[cfg(test)]
    fn cached_pages(&self) -> usize {
        self.cache().slots.len()
    }
}

/// Reads entries `0..len` of the table at `offset` in pieces of [`SCAN_ENTRIES`] (whole
/// pages), calling `f(first index, entries)` per piece.
fn scan_file(
    s: &dyn Storage,
    offset: u64,
    len: u64,
    mut f: impl FnMut(u64, &[u32]) -> Result<()>,
) -> Result<()> {
    let mut raw = vec![0u8; (SCAN_ENTRIES.min(len) * ENTRY_SIZE) as usize];
    let mut entries = Vec::with_capacity(SCAN_ENTRIES.min(len) as usize);
    let mut first = 0;
    while first < len {
        let n = SCAN_ENTRIES.min(len - first);
        let raw = &mut raw[..(n * ENTRY_SIZE) as usize];
        read_exact(s, raw, offset + first * ENTRY_SIZE, "VHD BAT")?;
        entries.clear();
        entries.extend(decode(raw));
        f(first, &entries)?;
        first += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::MemStorage;

    /// A file with a `len`-entry table at 512 where entry i (for i in `used`) is block i's
    /// slot after the table.
    fn table(len: u64, used: &[u64]) -> (MemStorage, Layout) {
        let s = MemStorage::new();
        let data = 512 + len * 4;
        let mut raw = vec![0xFFu8; (len * 4) as usize];
        for &i in used {
            let sector = (data.div_ceil(512) + i * 2) as u32;
            raw[(i * 4) as usize..(i * 4 + 4) as usize].copy_from_slice(&sector.to_be_bytes());
        }
        s.write_at(&raw, 512).unwrap();
        let end = data.div_ceil(512) * 512 + len * 1024;
        s.write_at(&[0u8; 512], end).unwrap();
        let layout = Layout {
            metadata: [(0, 512), (0, 0), (512, data)],
            data_end: end,
            file_len: end + 512,
            slot: 1024,
        };
        (s, layout)
    }

    #[test]
    fn the_cache_stays_within_its_bound_and_reads_what_the_file_says() {
        let len = 10 * PAGE_ENTRIES + 7;
        let used = [0, 5, 1500, 9000, len - 1];
        let (s, layout) = table(len, &used);
        let (bat, errors) = Bat::open(&s, 512, len, 3 * 4096, layout, true).unwrap();
        assert!(errors.is_empty());
        assert_eq!(bat.allocated_count(&s).unwrap(), used.len() as u64);
        assert_eq!(bat.cached_pages(), 3, "open warms at most the bound");
        for round in 0..2 {
            for i in (0..len).rev().step_by(97).chain(used) {
                let e = bat.get(&s, i).unwrap();
                assert_eq!(
                    e != UNALLOCATED,
                    used.contains(&i),
                    "round {round} entry {i}"
                );
                assert!(bat.cached_pages() <= 3);
            }
        }
        assert_eq!(bat.get(&s, len).unwrap(), UNALLOCATED);
        assert_eq!(bat.next_allocated(&s, 1, len).unwrap(), 5);
        assert_eq!(bat.next_allocated(&s, 6, len).unwrap(), 1500);
        assert_eq!(bat.next_allocated(&s, 1501, 9000).unwrap(), 9000);
        assert_eq!(bat.next_allocated(&s, 9001, len + 5).unwrap(), len - 1);
        assert_eq!(bat.next_allocated(&s, len, len + 5).unwrap(), len);
        let all = bat.allocated(&s).unwrap();
        assert_eq!(all.iter().map(|x| x.0).collect::<Vec<_>>(), used);
    }

    #[test]
    fn set_updates_a_cached_page_and_pins_win() {
        let len = 3 * PAGE_ENTRIES;
        let (s, layout) = table(len, &[]);
        let (mut bat, _) = Bat::open(&s, 512, len, 4096, layout, true).unwrap();
        assert_eq!(bat.get(&s, 2000).unwrap(), UNALLOCATED);
        // The file first, then memory (as allocation does).
        s.write_at(&77u32.to_be_bytes(), 512 + 4 * 2000).unwrap();
        bat.set(2000, 77, UNALLOCATED);
        assert_eq!(bat.get(&s, 2000).unwrap(), 77);
        assert_eq!(bat.allocated_count(&s).unwrap(), 1);
        // Evict it (another page), then read it back from the file.
        assert_eq!(bat.get(&s, 0).unwrap(), UNALLOCATED);
        assert_eq!(bat.get(&s, 2000).unwrap(), 77);
        s.write_at(&[0xAB; 4], 512 + 4 * 10).unwrap();
        bat.pin(10, UNALLOCATED);
        assert_eq!(bat.get(&s, 10).unwrap(), UNALLOCATED);
        assert_eq!(bat.allocated(&s).unwrap(), vec![(2000, 77)]);
    }

    #[test]
    fn misplaced_and_overlapping_entries() {
        let len = 4;
        let (s, layout) = table(len, &[0, 1]);
        // Entry 1 onto entry 0's block.
        let e0 = Bat::open(&s, 512, len, 4096, layout.clone(), true)
            .unwrap()
            .0
            .get(&s, 0)
            .unwrap();
        s.write_at(&(e0 + 1).to_be_bytes(), 512 + 4).unwrap();
        let err = Bat::open(&s, 512, len, 4096, layout.clone(), true).unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");
        // Past the data area: refused, or collected when lenient.
        s.write_at(&0x00FF_0000u32.to_be_bytes(), 512 + 8).unwrap();
        assert!(Bat::open(&s, 512, len, 4096, layout.clone(), true).is_err());
        let (_, errors) = Bat::open(&s, 512, len, 4096, layout, false).unwrap();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, 512 + 8);
    }
}

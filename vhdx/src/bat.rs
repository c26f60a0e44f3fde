//! The block allocation table, paged on demand: 4 KiB pages (512 entries) are read from the
//! file's BAT region on first use into a bounded cache with CLOCK replacement, so open time and
//! memory do not depend on the virtual size or on how much of the disk is allocated (a 64 TiB
//! disk with 1 MiB blocks has a 512 MiB table; the default cache holds 4 MiB of it).
//!
//! * **Clean pages** are copies of the file (patched by a read-only open's log overlay) and may
//!   be dropped at any time; a miss reads the page again. A page the file holds as a hole reads
//!   as zeros without I/O. Every entry read from the file is checked on the way in
//!   ([`Source::check`]), so a bad entry is refused when its page is loaded, not at open.
//! * **Dirty pages** (changed since the log entry that last carried them) are pinned: never
//!   evicted, whatever the cache size, until the flush clears them once the log entry carrying
//!   them is durable and applied ([`Bat::clear_dirty`]). A failed flush clears nothing, so the
//!   next one carries every page again. The cache may exceed its bound by the dirty pages
//!   (memory then follows the writes not yet flushed, which the log entry needs anyway).
//!
//! Locking: the table sits in the image's `RwLock`. Readers look entries up under the read
//! guard (misses load under the cache's own mutex); every change takes the write guard, so a
//! page read from the file can never be older than a change made while it was read, and two
//! writers cannot allocate the same block.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use crate::geometry::Geometry;
use crate::owners::Owners;
use disk::{Error, Result};

/// Entries per 4 KiB BAT page.
pub(crate) const PER_PAGE: usize = 512;
const PAGE_BYTES: u64 = (PER_PAGE * 8) as u64;
/// Default bound of the page cache: 4 MiB (1024 pages), the entries of 512 GiB of a disk with
/// 1 MiB blocks.
pub const DEFAULT_CACHE_BYTES: usize = 4 << 20;
/// Bytes read per piece when the whole table is walked.
const SCAN_BYTES: u64 = 1 << 20;

type Page = Box<[u64; PER_PAGE]>;
type ReadFn = dyn Fn(&mut [u8], u64) -> Result<()> + Send + Sync;
type HoleFn = dyn Fn(u64, u64) -> Result<u64> + Send + Sync;
type CheckFn = dyn Fn(usize, u64, u64, bool) -> Result<Option<(u64, u64)>> + Send + Sync;

/// Where pages come from: the file, by absolute offset.
pub(crate) struct Source {
    /// Fills `buf` from file offset `at`.
    pub read: Box<ReadFn>,
    /// How many bytes from file offset `at` (at most `n`) are known to read as zeros without
    /// reading them (0 when they must be read).
    pub hole: Box<HoleFn>,
    /// Refuses entry `i` = `e` (not zero, just read from file offset `at`) if it is invalid.
    /// The last argument says whether its page is read for the first time in this session:
    /// such an entry was not written by this session, so it must point inside the file as it
    /// was at open (a block this session allocated past that would otherwise alias it).
    /// Returns the file range (offset, length) the entry's block takes, if it takes one that
    /// no other entry may share.
    pub check: Box<CheckFn>,
    /// The file, for errors.
    pub name: String,
}

impl Source {
    /// A source that serves `bytes` as the file (tests).
    #[cfg(test)]
    pub fn memory(bytes: std::sync::Arc<Mutex<Vec<u8>>>) -> Source {
        Source {
            read: Box::new(move |buf, at| {
                let f = bytes.lock().unwrap();
                buf.copy_from_slice(&f[at as usize..at as usize + buf.len()]);
                Ok(())
            }),
            hole: Box::new(|_, _| Ok(0)),
            check: Box::new(|_, _, _, _| Ok(None)),
            name: "memory".into(),
        }
    }
}

/// One cached page and its CLOCK reference bit.
struct Slot {
    page: u64,
    entries: Page,
    referenced: bool,
}

#[derive(Default)]
struct Cache {
    slots: Vec<Slot>,
    /// Page number -> index in `slots`.
    index: HashMap<u64, usize>,
    hand: usize,
    max_pages: usize,
    /// Pages changed since the log entry that last carried them: always in `slots`.
    dirty: BTreeSet<u64>,
    /// Pages read (and checked) at least once in this session, one bit each: 16 KiB for the
    /// 512 MiB table of a 64 TiB disk with 1 MiB blocks.
    seen: disk::BitSet,
    /// The file space taken by the blocks of every entry seen and every block allocated in
    /// this session: an entry first seen later may not share it.
    owners: Owners,
}

impl Cache {
    fn seen(&self, page: u64) -> bool {
        self.seen.contains(page)
    }

    fn mark_seen(&mut self, page: u64) {
        self.seen.insert(page);
    }

    fn slot(&mut self, page: u64) -> Option<&mut Slot> {
        let &k = self.index.get(&page)?;
        let s = &mut self.slots[k];
        s.referenced = true;
        Some(s)
    }

    /// A clean page not used since the hand last passed it, if any page is clean.
    fn victim(&mut self) -> Option<usize> {
        let n = self.slots.len();
        // Two turns: the first clears reference bits, the second finds one cleared.
        for _ in 0..2 * n {
            let k = self.hand;
            self.hand = (self.hand + 1) % n;
            let s = &mut self.slots[k];
            if self.dirty.contains(&s.page) {
                continue;
            }
            if s.referenced {
                s.referenced = false;
                continue;
            }
            return Some(k);
        }
        None
    }

    fn insert(&mut self, page: u64, entries: Page) -> &mut Slot {
        let slot = Slot {
            page,
            entries,
            referenced: true,
        };
        let k = match (self.slots.len() >= self.max_pages.max(1))
            .then(|| self.victim())
            .flatten()
        {
            Some(k) => {
                self.index.remove(&self.slots[k].page);
                self.slots[k] = slot;
                k
            }
            // Room left, or every page dirty (pinned): grow past the bound.
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.index.insert(page, k);
        &mut self.slots[k]
    }

    fn remove(&mut self, page: u64) {
        self.dirty.remove(&page);
        if let Some(k) = self.index.remove(&page) {
            self.slots.swap_remove(k);
            if k < self.slots.len() {
                self.index.insert(self.slots[k].page, k);
            }
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
        }
    }

    /// Drops clean pages until the cache is within its bound again (after dirty pages that
    /// pushed it past the bound became clean).
    fn shrink(&mut self) {
        while self.slots.len() > self.max_pages.max(1) {
            match self.victim() {
                Some(k) => {
                    let p = self.slots[k].page;
                    self.remove(p);
                }
                None => break,
            }
        }
    }
}

pub(crate) struct Bat {
    pub geo: Geometry,
    pub size: u64,
    /// File offset of the BAT region (resize may move it).
    pub region: u64,
    len: usize,
    source: Source,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for Bat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bat")
            .field("len", &self.len)
            .field("region", &self.region)
            .finish()
    }
}

fn decode(bytes: &[u8], page: &mut [u64; PER_PAGE]) {
    for (j, e) in bytes.chunks_exact(8).enumerate() {
        page[j] = u64::from_le_bytes(e.try_into().expect("8 bytes"));
    }
}

impl Bat {
    /// The table of `len` entries in the region at file offset `region`, keeping at most
    /// `cache_bytes` of clean pages in memory. Reads nothing.
    pub fn new(
        geo: Geometry,
        size: u64,
        len: usize,
        region: u64,
        source: Source,
        cache_bytes: usize,
    ) -> Bat {
        Bat {
            geo,
            size,
            region,
            len,
            source,
            cache: Mutex::new(Cache {
                max_pages: cache_bytes / PAGE_BYTES as usize,
                ..Default::default()
            }),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn pages(&self) -> u64 {
        self.len.div_ceil(PER_PAGE) as u64
    }

    fn lock(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads page `p` from the file and checks its entries (those past the table's end are
    /// ignored and kept as zeros).
    fn read_page(&self, c: &mut Cache, p: u64) -> Result<Page> {
        let mut page: Page = Box::new([0u64; PER_PAGE]);
        let at = self.region + p * PAGE_BYTES;
        if (self.source.hole)(at, PAGE_BYTES)? >= PAGE_BYTES {
            c.mark_seen(p);
            return Ok(page);
        }
        let mut bytes = vec![0u8; PAGE_BYTES as usize];
        (self.source.read)(&mut bytes, at)?;
        decode(&bytes, &mut page);
        self.check_page(c, p, &mut page)?;
        Ok(page)
    }

    /// Checks the entries of page `p` just read from the file (those past the table's end
    /// become zeros) and records the page as seen. The first time a page is seen, the blocks
    /// of its entries are marked as taken, and refused if another entry's block or a block
    /// this session allocated already took (part of) their space.
    fn check_page(&self, c: &mut Cache, p: u64, page: &mut [u64; PER_PAGE]) -> Result<()> {
        let first_sight = !c.seen(p);
        let first = p as usize * PER_PAGE;
        let mut claims: Vec<(u64, u64, usize)> = Vec::new();
        for (k, e) in page.iter_mut().enumerate() {
            if first + k >= self.len {
                *e = 0;
            } else if *e != 0 {
                let at = self.entry_at(first + k);
                if let Some((off, len)) = (self.source.check)(first + k, *e, at, first_sight)? {
                    if first_sight {
                        claims.push((off, off.saturating_add(len), first + k));
                    }
                }
            }
        }
        // All or nothing: a page refused marks nothing, so reading it again fails the same way.
        claims.sort_unstable();
        for w in claims.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(Error::corrupt(
                    "VHDX BAT",
                    self.entry_at(w[1].2),
                    format!(
                        "{}: entries {} and {} point to overlapping blocks at {:#x} and {:#x}",
                        self.source.name, w[0].2, w[1].2, w[0].0, w[1].0
                    ),
                ));
            }
        }
        if let Some(&(off, end, i)) = claims.iter().find(|b| c.owners.any(b.0, b.1 - b.0)) {
            return Err(Error::corrupt(
                "VHDX BAT",
                self.entry_at(i),
                format!(
                    "{}: entry {i} points to the block at {off:#x}..{end:#x}, which overlaps the block of another entry (or one allocated since open)",
                    self.source.name
                ),
            ));
        }
        for &(off, end, _) in &claims {
            c.owners.mark(off, end - off);
        }
        c.mark_seen(p);
        Ok(())
    }

    /// File offset of entry `i`.
    fn entry_at(&self, i: usize) -> u64 {
        self.region + i as u64 * 8
    }

    /// `len` bytes at file offset `off` now belong to a block this session allocated: no entry
    /// first seen from now on may point into them.
    pub fn claim(&self, off: u64, len: u64) {
        self.lock().owners.mark(off, len);
    }

    /// The cached slot of page `p`, loading it on a miss.
    fn load<'a>(&self, c: &'a mut Cache, p: u64) -> Result<&'a mut Slot> {
        if c.index.contains_key(&p) {
            return Ok(c.slot(p).expect("indexed"));
        }
        let page = self.read_page(c, p)?;
        Ok(c.insert(p, page))
    }

    /// Entry `i`. Panics past the end, like indexing a slice (callers index by geometry).
    pub fn get(&self, i: usize) -> Result<u64> {
        assert!(i < self.len, "BAT index {i} out of {}", self.len);
        let mut c = self.lock();
        Ok(self.load(&mut c, (i / PER_PAGE) as u64)?.entries[i % PER_PAGE])
    }

    /// Stores entry `i`; its page stays in memory, dirty, until [`Self::clear_dirty`].
    pub fn put(&mut self, i: usize, v: u64) -> Result<()> {
        assert!(i < self.len, "BAT index {i} out of {}", self.len);
        let p = (i / PER_PAGE) as u64;
        self.load_mut(p)?[i % PER_PAGE] = v;
        self.cache
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .dirty
            .insert(p);
        Ok(())
    }

    fn load_mut(&mut self, p: u64) -> Result<&mut [u64; PER_PAGE]> {
        let loaded = {
            let c = self.cache.get_mut().unwrap_or_else(|e| e.into_inner());
            c.index.contains_key(&p)
        };
        if !loaded {
            let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let page = self.read_page(&mut c, p)?;
            c.insert(p, page);
        }
        let c = self.cache.get_mut().unwrap_or_else(|e| e.into_inner());
        Ok(&mut c.slot(p).expect("loaded").entries)
    }

    /// How many entries from `i` on are zero. Pages the file holds as holes are skipped without
    /// reading or caching them.
    pub fn zero_run(&self, i: usize) -> Result<usize> {
        let mut j = i;
        let mut c = self.lock();
        while j < self.len {
            let p = (j / PER_PAGE) as u64;
            if !c.index.contains_key(&p) {
                let at = self.region + p * PAGE_BYTES;
                let rest = (self.pages() - p) * PAGE_BYTES;
                let mut hole = (self.source.hole)(at, rest)? / PAGE_BYTES;
                // The file's hole says nothing of pages changed since (in the cache, not yet
                // in the file): the skip stops at the first cached page inside it.
                if let Some(&cached) = c.index.keys().filter(|&&k| k > p && k < p + hole).min() {
                    hole = cached - p;
                }
                if hole > 0 {
                    j = ((p + hole) as usize) * PER_PAGE;
                    continue;
                }
            }
            let page = &self.load(&mut c, p)?.entries;
            match page[j % PER_PAGE..].iter().position(|&e| e != 0) {
                Some(k) => {
                    j += k;
                    break;
                }
                None => j = (p as usize + 1) * PER_PAGE,
            }
        }
        Ok(j.min(self.len).saturating_sub(i))
    }

    /// How many entries from `i` on satisfy `keep(index, entry)`, looked up a page at a time
    /// (runs of blocks in one state, e.g. all PAYLOAD_BLOCK_ZERO, cost one lock per page).
    pub fn run_while(&self, i: usize, keep: impl Fn(usize, u64) -> bool) -> Result<usize> {
        let mut j = i;
        let mut c = self.lock();
        while j < self.len {
            let p = (j / PER_PAGE) as u64;
            let page = &self.load(&mut c, p)?.entries;
            let first = p as usize * PER_PAGE;
            let end = (first + PER_PAGE).min(self.len);
            match (j..end).position(|k| !keep(k, page[k - first])) {
                Some(n) => return Ok(j + n - i),
                None => j = end,
            }
        }
        Ok(j - i)
    }

    /// Calls `f` for every entry that is not zero, in index order, streaming the table from
    /// the file in pieces (cached pages, which may be newer, win) without filling the cache.
    pub fn for_each_nonzero(&self, mut f: impl FnMut(usize, u64) -> Result<()>) -> Result<()> {
        let total = self.pages() * PAGE_BYTES;
        let mut buf = vec![0u8; SCAN_BYTES.min(total) as usize];
        let mut page: Page = Box::new([0u64; PER_PAGE]);
        let mut at = 0u64;
        while at < total {
            let hole = (self.source.hole)(self.region + at, total - at)? / PAGE_BYTES * PAGE_BYTES;
            // A hole is zeros in the file, but a cached page there may hold entries.
            let n = if hole > 0 {
                hole
            } else {
                (total - at).min(SCAN_BYTES)
            };
            if hole == 0 {
                (self.source.read)(&mut buf[..n as usize], self.region + at)?;
            }
            for k in 0..n / PAGE_BYTES {
                let p = at / PAGE_BYTES + k;
                let cached = {
                    let c = self.lock();
                    c.index.get(&p).map(|&k| c.slots[k].entries.clone())
                };
                if let Some(cached) = cached {
                    page = cached;
                } else if hole > 0 {
                    continue;
                } else {
                    let b = &buf[(k * PAGE_BYTES) as usize..((k + 1) * PAGE_BYTES) as usize];
                    if disk::is_zero(b) {
                        continue;
                    }
                    decode(b, &mut page);
                    self.check_page(&mut self.lock(), p, &mut page)?;
                }
                let first = p as usize * PER_PAGE;
                for (j, &e) in page.iter().enumerate() {
                    if e != 0 && first + j < self.len {
                        f(first + j, e)?;
                    }
                }
            }
            at += n;
        }
        Ok(())
    }

    /// Reads and checks the first pages of the table, as many as the cache holds, keeping
    /// those with entries. Returns whether that was the whole table. (Open uses it: a table
    /// that fits the cache is checked whole at open, as a small image always was; a bigger one
    /// is checked page by page as it is used.)
    pub fn warm(&self) -> Result<bool> {
        let max = self.lock().max_pages as u64;
        let n = self.pages().min(max);
        let total = n * PAGE_BYTES;
        let mut buf = vec![0u8; SCAN_BYTES.min(total) as usize];
        let mut at = 0u64;
        while at < total {
            let hole = (self.source.hole)(self.region + at, total - at)? / PAGE_BYTES * PAGE_BYTES;
            if hole > 0 {
                at += hole;
                continue;
            }
            let len = (total - at).min(SCAN_BYTES);
            (self.source.read)(&mut buf[..len as usize], self.region + at)?;
            for (k, b) in buf[..len as usize].chunks(PAGE_BYTES as usize).enumerate() {
                if disk::is_zero(b) {
                    continue;
                }
                let p = at / PAGE_BYTES + k as u64;
                let mut page: Page = Box::new([0u64; PER_PAGE]);
                decode(b, &mut page);
                self.check_page(&mut self.lock(), p, &mut page)?;
                let mut c = self.lock();
                if !c.index.contains_key(&p) {
                    c.insert(p, page);
                }
            }
            at += len;
        }
        Ok(n == self.pages())
    }

    /// Pages changed since the log entry that last carried them, in order.
    pub fn dirty_pages(&self) -> Vec<u64> {
        self.lock().dirty.iter().copied().collect()
    }

    /// How many pages are dirty.
    pub fn dirty_count(&self) -> usize {
        self.lock().dirty.len()
    }

    /// Page `p` is durable in the file: it may be evicted from now on (by the next
    /// [`Self::shrink_to_bound`], called once per batch: shrinking after every page would scan
    /// the dirty pages again each time).
    pub fn clear_dirty(&mut self, p: u64) {
        let c = self.cache.get_mut().unwrap_or_else(|e| e.into_inner());
        c.dirty.remove(&p);
    }

    /// Drops clean pages until the cache is within its bound again.
    pub fn shrink_to_bound(&mut self) {
        self.cache
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .shrink();
    }

    /// Every dirty page is durable in the file (resize wrote a whole new table).
    pub fn clear_all_dirty(&mut self) {
        let c = self.cache.get_mut().unwrap_or_else(|e| e.into_inner());
        c.dirty.clear();
        c.shrink();
    }

    /// The bytes of the entries on page `p` (4 KiB; bytes past the last entry are zero: the
    /// caller keeps what the file has there).
    pub fn page_image(&self, p: u64) -> Result<Box<[u8]>> {
        let mut img = vec![0u8; PER_PAGE * 8].into_boxed_slice();
        if p >= self.pages() {
            return Ok(img);
        }
        let mut c = self.lock();
        let page = &self.load(&mut c, p)?.entries;
        let n = self.len.saturating_sub(p as usize * PER_PAGE).min(PER_PAGE);
        for (k, e) in page.iter().take(n).enumerate() {
            img[k * 8..k * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        Ok(img)
    }

    /// Changes the number of entries. Dropped ones are forgotten. New ones read as zero: the
    /// pages that hold them are zeroed and marked dirty (the log writes the zeros), except whole
    /// pages the file holds as holes, which already read as zeros.
    pub fn set_len(&mut self, len: usize) -> Result<()> {
        let old = self.len;
        if len < old {
            self.len = len;
            let c = self.cache.get_mut().unwrap_or_else(|e| e.into_inner());
            let gone: Vec<u64> = c
                .index
                .keys()
                .copied()
                .filter(|&p| p >= len.div_ceil(PER_PAGE) as u64)
                .collect();
            for p in gone {
                c.remove(p);
            }
            if let Some(s) = c.slot((len / PER_PAGE) as u64) {
                s.entries[len % PER_PAGE..].fill(0);
            }
            return Ok(());
        }
        self.len = len;
        for p in (old / PER_PAGE) as u64..len.div_ceil(PER_PAGE) as u64 {
            let first = p as usize * PER_PAGE;
            let from = old.max(first) - first;
            let at = self.region + p * PAGE_BYTES;
            let resident = self
                .cache
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .index
                .contains_key(&p);
            if from == 0 && !resident && (self.source.hole)(at, PAGE_BYTES)? >= PAGE_BYTES {
                continue;
            }
            // Entries past the old end are not the table's yet: not read, not checked.
            let page = if resident {
                self.load_mut(p)?
            } else {
                let mut page: Page = Box::new([0u64; PER_PAGE]);
                if from > 0 {
                    let mut bytes = vec![0u8; PAGE_BYTES as usize];
                    if (self.source.hole)(at, PAGE_BYTES)? < PAGE_BYTES {
                        (self.source.read)(&mut bytes, at)?;
                    }
                    decode(&bytes, &mut page);
                    page[from..].fill(0);
                    let saved = self.len;
                    self.len = old;
                    let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                    let r = self.check_page(&mut c, p, &mut page);
                    drop(c);
                    self.len = saved;
                    r?;
                }
                let c = self.cache.get_mut().unwrap_or_else(|e| e.into_inner());
                &mut c.insert(p, page).entries
            };
            page[from..].fill(0);
            self.cache
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .dirty
                .insert(p);
        }
        Ok(())
    }

    /// Pages held in memory.
    #[cfg(test)]
    pub fn resident_pages(&self) -> usize {
        self.lock().slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn geo() -> Geometry {
        Geometry::new(64 << 40, 1 << 20, 512, false)
    }

    fn file_with(entries: &[(usize, u64)], len: usize) -> Arc<Mutex<Vec<u8>>> {
        let mut f = vec![0u8; len.div_ceil(PER_PAGE) * PAGE_BYTES as usize];
        for &(i, e) in entries {
            f[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        Arc::new(Mutex::new(f))
    }

    #[test]
    fn reads_back_what_was_put_and_streams_nonzero() {
        let g = geo();
        let len = 4 * PER_PAGE;
        let file = file_with(&[(3, 7)], len);
        let mut b = Bat::new(g, 64 << 40, len, 0, Source::memory(file), 1 << 20);
        assert_eq!(b.resident_pages(), 0, "open reads nothing");
        b.put(1_500, 0x1234_0006).unwrap();
        assert_eq!(b.get(1_500).unwrap(), 0x1234_0006);
        assert_eq!(b.get(3).unwrap(), 7);
        assert_eq!(b.get(4).unwrap(), 0);
        assert_eq!(b.zero_run(4).unwrap(), 1_500 - 4);
        assert_eq!(b.zero_run(1_501).unwrap(), len - 1_501);
        let mut seen = Vec::new();
        b.for_each_nonzero(|i, e| {
            seen.push((i, e));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(3, 7), (1_500, 0x1234_0006)]);
        let img = b.page_image(1_500 / 512).unwrap();
        let k = 1_500 % 512;
        assert_eq!(&img[k * 8..k * 8 + 8], &0x1234_0006u64.to_le_bytes());
        assert_eq!(b.dirty_pages(), vec![2]);
    }

    #[test]
    fn clean_pages_are_evicted_and_dirty_pages_are_pinned() {
        let g = geo();
        let len = 64 * PER_PAGE;
        let entries: Vec<(usize, u64)> = (0..64).map(|p| (p * PER_PAGE, p as u64 + 1)).collect();
        let file = file_with(&entries, len);
        // Room for 4 pages.
        let mut b = Bat::new(g, 64 << 40, len, 0, Source::memory(file.clone()), 4 * 4096);
        for p in 0..3 {
            b.put(p * PER_PAGE + 1, 100 + p as u64).unwrap();
        }
        // Walk every page twice: only one slot is left for clean pages.
        for _ in 0..2 {
            for p in 0..64 {
                assert_eq!(b.get(p * PER_PAGE).unwrap(), p as u64 + 1);
            }
        }
        assert_eq!(b.resident_pages(), 4, "the cache stays within its bound");
        // The file still has the old values, yet the changes were never dropped.
        for p in 0..3 {
            assert_eq!(b.get(p * PER_PAGE + 1).unwrap(), 100 + p as u64);
        }
        // More dirty pages than the bound: the cache grows past it rather than lose one.
        for p in 3..10 {
            b.put(p * PER_PAGE + 1, 100 + p as u64).unwrap();
        }
        assert_eq!(b.resident_pages(), 10);
        for p in 0..64 {
            b.get(p * PER_PAGE).unwrap();
        }
        for p in 0..10 {
            assert_eq!(b.get(p * PER_PAGE + 1).unwrap(), 100 + p as u64);
        }
        assert_eq!(b.dirty_pages(), (0..10).collect::<Vec<_>>());
        // A flush writes the pages, then clears them: the cache shrinks back to its bound and
        // evicted pages read back from the file.
        for p in b.dirty_pages() {
            let img = b.page_image(p).unwrap();
            let at = (p * PAGE_BYTES) as usize;
            file.lock().unwrap()[at..at + 4096].copy_from_slice(&img);
            b.clear_dirty(p);
        }
        b.shrink_to_bound();
        assert_eq!(b.resident_pages(), 4);
        for p in 0..64 {
            b.get(p * PER_PAGE).unwrap();
        }
        for p in 0..10 {
            assert_eq!(b.get(p * PER_PAGE + 1).unwrap(), 100 + p as u64);
        }
    }

    #[test]
    fn holes_read_as_zeros_without_io_and_bad_entries_are_refused() {
        let g = Geometry::new(4 << 30, 1 << 20, 512, false);
        let len = g.bat_entries as usize;
        let file = file_with(&[(600, 0xabcd_0006), (1100, 0xbad)], len);
        let reads = Arc::new(Mutex::new(0usize));
        let r = reads.clone();
        let f = file.clone();
        let src = Source {
            read: Box::new(move |buf, at| {
                *r.lock().unwrap() += buf.len();
                buf.copy_from_slice(&f.lock().unwrap()[at as usize..at as usize + buf.len()]);
                Ok(())
            }),
            // Only the second and third pages hold data.
            hole: Box::new(|at, n| {
                Ok(if at == 4096 || at == 8192 {
                    0
                } else {
                    4096.min(n)
                })
            }),
            check: Box::new(|i, e, at, _| {
                if e & 7 == 5 {
                    Err(disk::Error::corrupt("VHDX BAT", at, format!("entry {i}")))
                } else {
                    Ok(None)
                }
            }),
            name: "memory".into(),
        };
        let b = Bat::new(g, 4 << 30, len, 0, src, 1 << 20);
        assert_eq!(b.get(10).unwrap(), 0);
        assert_eq!(*reads.lock().unwrap(), 0);
        assert_eq!(b.zero_run(0).unwrap(), 600);
        assert_eq!(b.get(600).unwrap(), 0xabcd_0006);
        let e = b.get(1100).unwrap_err().to_string();
        assert!(e.contains("entry 1100") && e.contains("0x2260"), "{e}");
    }

    /// Every non-zero entry `e` takes the MiB at `e << 20`: an entry first read after an
    /// allocation took its space is refused, and so is one that shares a block with an entry of
    /// a page read earlier; a refused page stays refused.
    #[test]
    fn an_entry_onto_a_block_taken_earlier_in_the_session_is_refused() {
        let g = geo();
        let len = 4 * PER_PAGE;
        let file = file_with(&[(3, 7), (600, 9), (1100, 7)], len);
        let mut src = Source::memory(file);
        src.check = Box::new(|_, e, _, _| Ok(Some((e << 20, 1 << 20))));
        let b = Bat::new(g, 64 << 40, len, 0, src, 1 << 20);
        b.claim(9 << 20, 1 << 20);
        let e = b.get(600).unwrap_err().to_string();
        assert!(e.contains("entry 600") && e.contains("memory"), "{e}");
        assert_eq!(b.get(3).unwrap(), 7);
        for _ in 0..2 {
            let e = b.get(1100).unwrap_err().to_string();
            assert!(e.contains("entry 1100"), "{e}");
        }
        assert_eq!(b.get(2000).unwrap(), 0, "other pages are unaffected");
    }

    #[test]
    fn shrinking_forgets_the_tail_and_growing_reads_zeros() {
        let g = geo();
        let file = file_with(&[(700, 9), (1500, 8)], 4 * PER_PAGE);
        let mut b = Bat::new(g, 64 << 40, 4 * PER_PAGE, 0, Source::memory(file), 1 << 20);
        assert_eq!(b.get(700).unwrap(), 9);
        b.set_len(600).unwrap();
        b.set_len(4 * PER_PAGE).unwrap();
        assert_eq!(b.get(700).unwrap(), 0);
        assert_eq!(
            b.get(1500).unwrap(),
            0,
            "a page re-read from the file is zeroed too"
        );
        assert_eq!(b.dirty_pages(), vec![1, 2, 3]);
    }
}

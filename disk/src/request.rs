//! The request layer: the one path from every consumer (CLI, FUSE, NBD, storvsc, VMM) to a
//! format.
//!
//! [`Disk`] checks range and read-only once and turns any write (and write-zeroes and discard)
//! into requests aligned to the image's logical sector size, so formats never write a partial
//! sector and none of them does read-modify-write itself. Reads pass through unchanged. A write
//! that covers only part of a sector is done here as read-modify-write of the enclosing
//! sectors while those sectors are locked.
//!
//! The lock table orders overlapping requests, so every request sees or leaves each sector
//! whole:
//! - A read-modify-write reads sector S, merges its bytes and writes S back. Any write to S
//!   landing between that read and that write-back would be silently undone.
//! - A read copying S while a write copies new bytes into S sees a mix of both (the page
//!   cache does not make `pread` atomic against `pwrite`): a sector nobody ever wrote.
//! - Two writes to S running at once may leave bytes of each.
//!
//! So every request registers its range (a write: the whole sectors it writes; a read: its
//! bytes) and waits for the overlapping requests registered before it, unless both are reads.
//! Waiting only on earlier requests means no request can deadlock or starve: a stream of reads
//! does not hold off a write that arrived before them. The table holds only the requests in
//! flight (a queue depth's worth). While no write is registered, reads skip the table and only
//! count themselves on an atomic (a write then waits for those counted reads to finish), so a
//! read-only workload shares no lock.

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::{check_range, BlockDevice, Error, Extent, ParentLink, Result, ZeroFlags};

/// Up to this size an unaligned write is merged into one buffer and written in one call.
const MERGED_WRITE_MAX: u64 = 16 << 20;

/// A handle to an opened image (and its chain) that every consumer does its I/O through.
/// Cheap to clone; clones share the lock table.
#[derive(Clone, Debug)]
pub struct Disk {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    image: Arc<dyn BlockDevice>,
    /// Logical sector size of the image: the alignment every format request has.
    sector: u64,
    locks: RangeLocks,
}

impl Disk {
    /// Puts the request layer in front of an opened image.
    pub fn new(image: Arc<dyn BlockDevice>) -> Disk {
        let sector = u64::from(image.logical_sector_size().max(1));
        Disk {
            inner: Arc::new(Inner {
                image,
                sector,
                locks: RangeLocks::default(),
            }),
        }
    }

    /// The image behind this handle, for facts and management (never for data I/O, which would
    /// bypass the alignment and the lock).
    pub fn image(&self) -> &Arc<dyn BlockDevice> {
        &self.inner.image
    }

    /// Whether two handles share one request layer (and so one lock table).
    pub fn same_disk(&self, other: &Disk) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// How many handles to this disk exist (the undo commit needs to be the last user).
    pub fn handle_count(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    fn img(&self) -> &dyn BlockDevice {
        &*self.inner.image
    }

    /// The sector-aligned range enclosing `offset..end`, clipped to the disk size (a raw image
    /// may end inside a sector; its last partial sector counts as whole).
    fn enclosing(&self, offset: u64, end: u64) -> Range<u64> {
        let s = self.inner.sector;
        let start = offset / s * s;
        let stop = end.div_ceil(s).saturating_mul(s).min(self.img().size());
        start..stop
    }

    fn is_aligned(&self, offset: u64, end: u64) -> bool {
        let s = self.inner.sector;
        offset.is_multiple_of(s) && (end.is_multiple_of(s) || end == self.img().size())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.img().size())?;
        if self.img().read_only() {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// The first and the last sector of `whole` (the same sector when it is one).
    fn end_sectors(&self, whole: &Range<u64>) -> (Range<u64>, Range<u64>) {
        let s = self.inner.sector;
        let first = whole.start..(whole.start + s).min(whole.end);
        let last_start = (whole.end - 1) / s * s;
        (first, last_start..whole.end)
    }

    fn read_sector(&self, sector: &Range<u64>) -> Result<Vec<u8>> {
        let mut b = vec![0u8; (sector.end - sector.start) as usize];
        self.img().read_at(&mut b, sector.start)?;
        Ok(b)
    }

    /// Reads `buf.len()` bytes at `offset` (the merged view through the chain). Reads go to
    /// the format as they are (a read merges nothing, so it needs no alignment), once the
    /// overlapping writes registered before it are done.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.img().size())?;
        if buf.is_empty() {
            return Ok(());
        }
        let _g = self.inner.locks.read(offset..offset + buf.len() as u64);
        self.img().read_at(buf, offset)
    }

    /// Writes all of `buf` at `offset`. Durable after [`Disk::flush`] returns Ok.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        if self.is_aligned(offset, end) {
            let _g = self.inner.locks.write(offset..end);
            return self.img().write_at(buf, offset);
        }
        let whole = self.enclosing(offset, end);
        let _g = self.inner.locks.write(whole.clone());
        let (first, last) = self.end_sectors(&whole);
        if whole.end - whole.start <= MERGED_WRITE_MAX {
            // One format write of the merged sectors: the request stays one request (FUSE and
            // NBD send page-split, sector-unaligned pieces of large writes).
            let mut merged = vec![0u8; (whole.end - whole.start) as usize];
            let last_at = (last.start - whole.start) as usize;
            if offset != first.start || end < first.end {
                self.img().read_at(
                    &mut merged[..(first.end - first.start) as usize],
                    first.start,
                )?;
            }
            if last.start > first.start && end < last.end {
                self.img().read_at(&mut merged[last_at..], last.start)?;
            }
            merged[(offset - whole.start) as usize..(end - whole.start) as usize]
                .copy_from_slice(buf);
            return self.img().write_at(&merged, whole.start);
        }
        // Larger: the partial end sectors on their own, the middle straight from `buf`.
        // A partial sector: read it, patch in our bytes, write it back whole.
        let patched = |sector: &Range<u64>| -> Result<Vec<u8>> {
            let mut b = self.read_sector(sector)?;
            let lo = offset.max(sector.start);
            let hi = end.min(sector.end);
            b[(lo - sector.start) as usize..(hi - sector.start) as usize]
                .copy_from_slice(&buf[(lo - offset) as usize..(hi - offset) as usize]);
            Ok(b)
        };
        let head_partial = offset != first.start || end < first.end;
        let tail_partial = last.start > first.start && end < last.end;
        let mut pos = offset;
        if head_partial {
            self.img().write_at(&patched(&first)?, first.start)?;
            pos = end.min(first.end);
        }
        let mid_end = if tail_partial { last.start } else { end };
        if mid_end > pos {
            self.img().write_at(
                &buf[(pos - offset) as usize..(mid_end - offset) as usize],
                pos,
            )?;
        }
        if tail_partial {
            self.img().write_at(&patched(&last)?, last.start)?;
        }
        Ok(())
    }

    /// Makes every write that returned Ok before this call durable.
    pub fn flush(&self) -> Result<()> {
        self.img().flush()
    }

    /// Hint that a range is unused; the format frees whole sectors (partial sectors at the ends
    /// are left alone: discard never has to read).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        let s = self.inner.sector;
        let end = offset + len;
        let start = offset.div_ceil(s) * s;
        let stop = if end == self.img().size() {
            end
        } else {
            end / s * s
        };
        if stop <= start {
            return Ok(());
        }
        let _g = self.inner.locks.write(start..stop);
        self.img().discard(start, stop - start)
    }

    /// Makes the range read as zeros; with `may_unmap` the format may deallocate it (see
    /// [`BlockDevice::unmap_reads_zero`] for what a guest may assume afterwards).
    pub fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        if self.is_aligned(offset, end) {
            let _g = self.inner.locks.write(offset..end);
            return self.img().write_zeroes(offset, len, flags);
        }
        let whole = self.enclosing(offset, end);
        let _g = self.inner.locks.write(whole);
        let s = self.inner.sector;
        // Whole sectors by the format; partial end sectors by read-modify-write with zeros.
        let inner_start = offset.div_ceil(s) * s;
        let inner_end = if end == self.img().size() {
            end
        } else {
            end / s * s
        };
        if inner_end > inner_start {
            self.img()
                .write_zeroes(inner_start, inner_end - inner_start, flags)?;
            self.zero_partial(offset, inner_start)?;
            self.zero_partial(inner_end, end)
        } else {
            let boundary = ((offset / s + 1) * s).min(end);
            self.zero_partial(offset, boundary)?;
            self.zero_partial(boundary, end)
        }
    }

    /// Zeros `from..to`, which lies inside one sector (the caller holds the lock).
    fn zero_partial(&self, from: u64, to: u64) -> Result<()> {
        if to <= from {
            return Ok(());
        }
        let sector = self.enclosing(from, to);
        let mut b = self.read_sector(&sector)?;
        b[(from - sector.start) as usize..(to - sector.start) as usize].fill(0);
        self.img().write_at(&b, sector.start)
    }

    /// Allocation of the top layer for the run starting at `offset`.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.img().size())?;
        self.img().block_status(offset, len)
    }

    /// Flushes and leaves the image clean on disk.
    pub fn close(&self) -> Result<()> {
        self.img().close()
    }

    pub fn size(&self) -> u64 {
        self.img().size()
    }
    pub fn logical_sector_size(&self) -> u32 {
        self.img().logical_sector_size()
    }
    pub fn physical_sector_size(&self) -> u32 {
        self.img().physical_sector_size()
    }
    pub fn read_only(&self) -> bool {
        self.img().read_only()
    }
    pub fn format(&self) -> &'static str {
        self.img().format()
    }
}

/// A `Disk` is itself a block device, so helpers written against the trait (partition
/// tables, allocation maps, copies) run through the request layer when handed one.
impl BlockDevice for Disk {
    fn format(&self) -> &'static str {
        self.img().format()
    }
    fn size(&self) -> u64 {
        self.img().size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.img().logical_sector_size()
    }
    fn physical_sector_size(&self) -> u32 {
        self.img().physical_sector_size()
    }
    fn read_only(&self) -> bool {
        self.img().read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Disk::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Disk::write_at(self, buf, offset)
    }
    fn flush(&self) -> Result<()> {
        Disk::flush(self)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Disk::discard(self, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        Disk::write_zeroes(self, offset, len, flags)
    }
    fn unmap_reads_zero(&self) -> bool {
        self.img().unmap_reads_zero()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        Disk::block_status(self, offset, len)
    }
    fn backing(&self) -> Option<&Arc<dyn BlockDevice>> {
        self.img().backing()
    }
    fn path(&self) -> Option<&Path> {
        self.img().path()
    }
    fn close(&self) -> Result<()> {
        Disk::close(self)
    }
    fn unique_id(&self) -> Option<crate::Guid> {
        self.img().unique_id()
    }
    fn parent_link(&self) -> Option<ParentLink> {
        self.img().parent_link()
    }
    fn cluster_size(&self) -> Option<u64> {
        self.img().cluster_size()
    }
    fn dirty(&self) -> bool {
        self.img().dirty()
    }
    fn facts(&self) -> crate::LayerFacts {
        self.img().facts()
    }
    fn format_specific(&self) -> Option<serde_json::Value> {
        self.img().format_specific()
    }

    fn file_run(&self, offset: u64, len: u64) -> Option<(&std::fs::File, u64, u64)> {
        self.img().file_run(offset, len)
    }
}

/// The requests in flight, in arrival order (see the module comment).
#[derive(Debug, Default)]
struct RangeLocks {
    /// Writes registered in the table, waiting or running. While zero, reads skip the table.
    writers: AtomicUsize,
    /// Reads in flight that skipped the table (no write was registered when they started).
    fast_readers: AtomicUsize,
    table: Mutex<Table>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Table {
    next_ticket: u64,
    /// Requests sleeping on the condition variable (so a release with none skips the wake-up).
    sleepers: usize,
    /// Registered requests, running or waiting, in ticket order (pushed under the mutex).
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    ticket: u64,
    range: Range<u64>,
    write: bool,
}

impl Entry {
    /// Whether the two may not run at the same time.
    fn conflicts(&self, other: &Entry) -> bool {
        (self.write || other.write)
            && self.range.start < other.range.end
            && other.range.start < self.range.end
    }
}

/// Released on drop.
enum Guard<'a> {
    Fast(&'a RangeLocks),
    Held {
        locks: &'a RangeLocks,
        ticket: u64,
        write: bool,
    },
}

impl Table {
    /// Whether a request registered before `ticket` still blocks it.
    fn blocked(&self, ticket: u64) -> bool {
        let Some(i) = self.entries.iter().position(|e| e.ticket == ticket) else {
            return false;
        };
        let me = &self.entries[i];
        self.entries[..i].iter().any(|e| e.conflicts(me))
    }
}

impl RangeLocks {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads are many and mostly alone: with no write registered a read only counts itself.
    /// The read announces itself before it looks for writers and a write registers before it
    /// looks for reads (both sequentially consistent), so one of the two always sees the other.
    fn read(&self, range: Range<u64>) -> Guard<'_> {
        self.fast_readers.fetch_add(1, SeqCst);
        if self.writers.load(SeqCst) == 0 {
            return Guard::Fast(self);
        }
        self.leave_fast();
        self.take(range, false)
    }

    /// For anything that changes sectors: writes, read-modify-writes, write-zeroes, discards.
    /// Besides the earlier overlapping entries, a write waits for the reads that skipped the
    /// table (they cannot be told apart by range; they are short, and no new one starts).
    fn write(&self, range: Range<u64>) -> Guard<'_> {
        self.writers.fetch_add(1, SeqCst);
        self.take(range, true)
    }

    fn take(&self, range: Range<u64>, write: bool) -> Guard<'_> {
        let mut t = self.lock();
        let ticket = t.next_ticket;
        t.next_ticket += 1;
        // Registered before waiting, so requests arriving later queue behind this one.
        t.entries.push(Entry {
            ticket,
            range,
            write,
        });
        while t.blocked(ticket) || (write && self.fast_readers.load(SeqCst) > 0) {
            t.sleepers += 1;
            t = self.changed.wait(t).unwrap_or_else(|p| p.into_inner());
            t.sleepers -= 1;
        }
        Guard::Held {
            locks: self,
            ticket,
            write,
        }
    }

    fn leave_fast(&self) {
        if self.fast_readers.fetch_sub(1, SeqCst) == 1 && self.writers.load(SeqCst) > 0 {
            // A write may be waiting for the last fast read; wake it under the lock so the
            // wake-up cannot fall between its check and its wait.
            let t = self.lock();
            if t.sleepers > 0 {
                self.changed.notify_all();
            }
        }
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        match *self {
            Guard::Fast(locks) => locks.leave_fast(),
            Guard::Held {
                locks,
                ticket,
                write,
            } => {
                let mut t = locks.lock();
                if let Some(i) = t.entries.iter().position(|e| e.ticket == ticket) {
                    t.entries.remove(i);
                }
                if write {
                    locks.writers.fetch_sub(1, SeqCst);
                }
                let sleepers = t.sleepers > 0;
                drop(t);
                if sleepers {
                    locks.changed.notify_all();
                }
            }
        }
    }
}

/// Lets code written against `&dyn BlockDevice` take a `Disk` as `d.as_ref()`, still through
/// the request layer.
impl AsRef<dyn BlockDevice> for Disk {
    fn as_ref(&self) -> &(dyn BlockDevice + 'static) {
        self
    }
}

impl From<Arc<dyn BlockDevice>> for Disk {
    fn from(image: Arc<dyn BlockDevice>) -> Disk {
        Disk::new(image)
    }
}

impl<T: BlockDevice + 'static> From<Arc<T>> for Disk {
    fn from(image: Arc<T>) -> Disk {
        Disk::new(image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RawDisk;
    use std::sync::Barrier;

    /// A raw RAM disk that yields inside every read and write, so that requests without the
    /// ordering would interleave. With `piece`, it also copies that many bytes at a time with
    /// a pause between, as a page cache copy can be seen halfway by a concurrent request (the
    /// RAM disk under it then takes requests of `piece` bytes).
    #[derive(Debug)]
    struct Slow {
        ram: RawDisk,
        sector: u32,
        piece: Option<usize>,
    }

    impl BlockDevice for Slow {
        fn format(&self) -> &'static str {
            "raw"
        }
        fn size(&self) -> u64 {
            self.ram.size()
        }
        fn logical_sector_size(&self) -> u32 {
            self.sector
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            std::thread::yield_now();
            let Some(p) = self.piece else {
                let r = self.ram.read_at(buf, offset);
                std::thread::sleep(std::time::Duration::from_micros(20));
                return r;
            };
            for (k, piece) in buf.chunks_mut(p).enumerate() {
                self.ram.read_at(piece, offset + (p * k) as u64)?;
                std::thread::yield_now();
            }
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            std::thread::yield_now();
            let Some(p) = self.piece else {
                return self.ram.write_at(buf, offset);
            };
            for (k, piece) in buf.chunks(p).enumerate() {
                self.ram.write_at(piece, offset + (p * k) as u64)?;
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
            self.ram.write_zeroes(offset, len, flags)
        }
    }

    fn disk(size: u64, sector: u32) -> Disk {
        let raw = RawDisk::memory(size)
            .unwrap()
            .with_logical_sector_size(sector);
        Disk::new(Arc::new(Slow {
            ram: raw,
            sector,
            piece: None,
        }))
    }

    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n.max(1)
        }
    }

    #[test]
    fn unaligned_requests_match_a_model() {
        // Sizes that end inside a sector too (a raw file need not be whole sectors).
        for (size, sector) in [
            (64 << 10, 512),
            (64 << 10, 4096),
            (50_001, 4096),
            (9_000, 512),
        ] {
            let d = disk(size, sector);
            let mut model = vec![0u8; size as usize];
            let mut rng = Rng(size ^ u64::from(sector));
            for i in 0..2000u64 {
                let len = 1 + rng.below(3 * u64::from(sector)).min(size - 1);
                let off = rng.below(size - len + 1);
                match i % 5 {
                    0 => {
                        d.write_zeroes(
                            off,
                            len,
                            ZeroFlags {
                                may_unmap: i % 2 == 0,
                            },
                        )
                        .unwrap();
                        model[off as usize..(off + len) as usize].fill(0);
                    }
                    1 => {
                        let mut b = vec![0u8; len as usize];
                        d.read_at(&mut b, off).unwrap();
                        assert!(
                            b == model[off as usize..(off + len) as usize],
                            "read {off}+{len}"
                        );
                    }
                    _ => {
                        let b: Vec<u8> = (0..len).map(|k| (i + k) as u8 | 1).collect();
                        d.write_at(&b, off).unwrap();
                        model[off as usize..(off + len) as usize].copy_from_slice(&b);
                    }
                }
            }
            let mut all = vec![0u8; size as usize];
            d.read_at(&mut all, 0).unwrap();
            assert!(all == model, "size {size} sector {sector}");
        }
    }

    #[test]
    fn formats_refuse_what_the_layer_would_have_merged() {
        let raw = RawDisk::memory(1 << 20)
            .unwrap()
            .with_logical_sector_size(4096);
        assert!(matches!(
            raw.write_at(&[1; 512], 512),
            Err(Error::InvalidArgument(_))
        ));
        let d = Disk::new(Arc::new(raw));
        d.write_at(&[1; 512], 512).unwrap();
    }

    #[test]
    fn concurrent_sub_sector_writers_all_land() {
        // Eight writers own interleaved single bytes of the same few 4 KiB sectors.
        let d = disk(32 << 10, 4096);
        let writers = 8u64;
        let start = Barrier::new(writers as usize);
        std::thread::scope(|s| {
            for w in 0..writers {
                let (d, start) = (d.clone(), &start);
                s.spawn(move || {
                    start.wait();
                    let mut off = w;
                    while off < 32 << 10 {
                        d.write_at(&[w as u8 + 1], off).unwrap();
                        off += writers;
                    }
                });
            }
        });
        let mut all = vec![0u8; 32 << 10];
        d.read_at(&mut all, 0).unwrap();
        for (i, &b) in all.iter().enumerate() {
            assert_eq!(b, (i as u64 % writers) as u8 + 1, "byte {i} lost");
        }
    }

    #[test]
    fn aligned_writes_survive_a_racing_read_modify_write() {
        // A rewrites whole sectors; B keeps patching the first 10 bytes of the same sectors
        // until A is done. A stale write-back by B would bring back an older pattern behind
        // byte 10.
        use std::sync::atomic::AtomicBool;
        let d = disk(64 << 10, 4096);
        let done = AtomicBool::new(false);
        let last = 40u8;
        std::thread::scope(|s| {
            let (b, done) = (d.clone(), &done);
            s.spawn(move || {
                let mut k = 0u64;
                while !done.load(SeqCst) {
                    b.write_at(&[7u8; 10], (k % 16) * 4096).unwrap();
                    k += 1;
                }
            });
            for pass in 1..=last {
                for k in 0..16u64 {
                    d.write_at(&[pass; 4096], k * 4096).unwrap();
                }
            }
            done.store(true, SeqCst);
        });
        let mut all = vec![0u8; 64 << 10];
        d.read_at(&mut all, 0).unwrap();
        for k in 0..16usize {
            let sector = &all[k * 4096..(k + 1) * 4096];
            assert!(
                sector[10..].iter().all(|&x| x == last),
                "sector {k} lost the last aligned write: {:?}",
                &sector[10..20]
            );
        }
    }

    #[test]
    fn reads_and_writes_racing_on_a_sector_see_it_whole() {
        // Two writers rewrite the same 8 sectors with whole-sector patterns, one or two sectors
        // at a time; two readers read them, one to three sectors at a time. Every
        // sector a reader sees, and every sector at the end, must be one writer's whole
        // pattern: never a mix.
        use std::sync::atomic::AtomicBool;
        const SECTORS: u64 = 8;
        let ram = RawDisk::memory(SECTORS * 512)
            .unwrap()
            .with_logical_sector_size(64);
        let d = Disk::new(Arc::new(Slow {
            ram,
            sector: 512,
            piece: Some(64),
        }));
        d.write_at(&[1u8; (SECTORS * 512) as usize], 0).unwrap();
        let done = AtomicBool::new(false);
        let whole = |s: &[u8]| s.iter().all(|&x| x == s[0]);
        std::thread::scope(|sc| {
            for r in 0..2u64 {
                let (d, done) = (d.clone(), &done);
                sc.spawn(move || {
                    let mut b = vec![0u8; (SECTORS * 512) as usize];
                    let mut n = 0u64;
                    while !done.load(SeqCst) || n < 50 {
                        let off = (n + r) % SECTORS * 512;
                        let len = 512 * (1 + (n % 3)).min(SECTORS - off / 512);
                        d.read_at(&mut b[..len as usize], off).unwrap();
                        for (i, s) in b[..len as usize].chunks(512).enumerate() {
                            assert!(whole(s), "read at {off}: sector {i} is torn");
                        }
                        n += 1;
                    }
                });
            }
            let d2 = d.clone();
            sc.spawn(move || {
                for pass in 0..300u64 {
                    let k = pass % SECTORS;
                    d2.write_at(&[2 + (pass % 100) as u8; 512], k * 512)
                        .unwrap();
                }
            });
            for pass in 0..300u64 {
                let k = (pass * 3) % SECTORS;
                d.write_at(
                    &[200 + (pass % 50) as u8; 1024][..512 * (1 + (k < SECTORS - 1) as usize)],
                    k * 512,
                )
                .unwrap();
            }
            done.store(true, SeqCst);
        });
        let mut all = vec![0u8; (SECTORS * 512) as usize];
        d.read_at(&mut all, 0).unwrap();
        for (i, s) in all.chunks(512).enumerate() {
            assert!(whole(s), "sector {i} was left torn");
        }
    }

    #[test]
    fn range_and_read_only_are_checked_once_here() {
        let d = disk(8192, 512);
        assert!(matches!(
            d.write_at(&[1; 2], 8191),
            Err(Error::OutOfRange { .. })
        ));
        let ro = Disk::new(Arc::new(
            RawDisk::new(Arc::new(crate::MemStorage::with_len(4096)), true).unwrap(),
        ));
        assert!(matches!(ro.write_at(&[1], 3), Err(Error::ReadOnly)));
        assert!(matches!(ro.discard(0, 512), Err(Error::ReadOnly)));
    }
}

//! A pass-through [`BlockDevice`] that counts what the guest moves through it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use disk::{BlockDevice, Extent, ParentLink, ZeroFlags};

/// Bytes and requests seen by one disk.
#[derive(Debug, Default)]
pub struct DiskCounters {
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    /// Requests that failed: reads; writes, flushes and write-zeroes.
    pub read_errors: AtomicU64,
    pub write_errors: AtomicU64,
    /// Nanoseconds since `epoch` of the first and the latest data request (0 = none yet).
    pub first_io_ns: AtomicU64,
    pub last_io_ns: AtomicU64,
    epoch: std::sync::OnceLock<std::time::Instant>,
}

/// A snapshot of [`DiskCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiskStats {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    /// When the first and the last data request arrived, from the start of the VM.
    pub first_io: Option<std::time::Duration>,
    pub last_io: Option<std::time::Duration>,
}

impl DiskStats {
    /// Bytes read and written per second between the first and the last request.
    pub fn bytes_per_second(&self) -> Option<f64> {
        let (a, b) = (self.first_io?, self.last_io?);
        let secs = b.checked_sub(a)?.as_secs_f64();
        (secs > 0.0).then(|| (self.read_bytes + self.write_bytes) as f64 / secs)
    }
}

impl DiskCounters {
    /// Counters whose times count from `epoch` (the VM start).
    pub fn with_epoch(epoch: std::time::Instant) -> Self {
        let c = DiskCounters::default();
        let _ = c.epoch.set(epoch);
        c
    }

    fn touch(&self) {
        if let Some(e) = self.epoch.get() {
            let ns = (e.elapsed().as_nanos() as u64).max(1);
            let _ = self
                .first_io_ns
                .compare_exchange(0, ns, Ordering::Relaxed, Ordering::Relaxed);
            self.last_io_ns.fetch_max(ns, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> DiskStats {
        let t = |a: &AtomicU64| match a.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(std::time::Duration::from_nanos(ns)),
        };
        DiskStats {
            first_io: t(&self.first_io_ns),
            last_io: t(&self.last_io_ns),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            write_bytes: self.write_bytes.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            read_errors: self.read_errors.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug)]
pub struct CountingDisk {
    inner: disk::Disk,
    pub counters: Arc<DiskCounters>,
}

impl CountingDisk {
    pub fn new(inner: impl Into<disk::Disk>, epoch: std::time::Instant) -> Self {
        CountingDisk {
            inner: inner.into(),
            counters: Arc::new(DiskCounters::with_epoch(epoch)),
        }
    }

    fn counted(&self, write: bool, r: disk::Result<()>) -> disk::Result<()> {
        if r.is_err() {
            let c = if write {
                &self.counters.write_errors
            } else {
                &self.counters.read_errors
            };
            c.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl BlockDevice for CountingDisk {
    fn format(&self) -> &'static str {
        self.inner.format()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.inner.logical_sector_size()
    }
    fn physical_sector_size(&self) -> u32 {
        self.inner.physical_sector_size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> disk::Result<()> {
        self.counters.touch();
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters
            .read_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.counted(false, self.inner.read_at(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> disk::Result<()> {
        self.counters.touch();
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .write_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.counted(true, self.inner.write_at(buf, offset))
    }
    fn flush(&self) -> disk::Result<()> {
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        self.counted(true, self.inner.flush())
    }
    fn discard(&self, offset: u64, len: u64) -> disk::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> disk::Result<()> {
        self.counters.touch();
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters.write_bytes.fetch_add(len, Ordering::Relaxed);
        self.counted(true, self.inner.write_zeroes(offset, len, flags))
    }
    fn block_status(&self, offset: u64, len: u64) -> disk::Result<Extent> {
        self.inner.block_status(offset, len)
    }
    fn backing(&self) -> Option<&Arc<dyn BlockDevice>> {
        self.inner.backing()
    }
    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
    fn close(&self) -> disk::Result<()> {
        self.inner.close()
    }
    fn unique_id(&self) -> Option<disk::Guid> {
        self.inner.unique_id()
    }
    fn parent_link(&self) -> Option<ParentLink> {
        self.inner.parent_link()
    }
    fn cluster_size(&self) -> Option<u64> {
        self.inner.cluster_size()
    }
    fn dirty(&self) -> bool {
        self.inner.dirty()
    }
    fn facts(&self) -> disk::LayerFacts {
        self.inner.facts()
    }
    fn format_specific(&self) -> Option<serde_json::Value> {
        self.inner.format_specific()
    }
}

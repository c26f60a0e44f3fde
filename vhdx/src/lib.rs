//! VHDX: fixed, dynamic and differencing images; log replay (in place and in memory);
//! crash-consistent writes through a write-ahead log (see [`log`] for the scheme); create,
//! trim, block status, resize, compact, re-parenting, check and measure. The facts about the
//! format this crate relies on are in docs/vhdx.md.
//!
//! # Life of an open image
//!
//! 1. **Open** (`open.rs`): signature, the two headers (the newer valid one is current), the
//!    log (replayed in place, or into a memory overlay when read-only: `log_replay.rs`), the
//!    region table, the metadata, the BAT; each step validates what it reads.
//! 2. **Reads** (`io.rs`) go through the BAT and, for differencing images, the sector bitmap
//!    (`sector_bitmap.rs`) to this file or the parent (`parent.rs`).
//! 3. **The first write** starts a session (`log_write.rs`): new FileWriteGuid, DataWriteGuid
//!    and LogGuid in both headers (`header.rs`). Data goes straight to its block; new blocks
//!    are appended (`alloc.rs`); BAT and bitmap changes stay in memory as dirty pages.
//! 4. **Flush** writes every dirty page in one log entry, makes it durable, then applies it.
//! 5. **Close** flushes, makes the applied pages durable and clears the LogGuid.
//!
//! Whole-image operations (`create.rs`, `trim.rs`, `resize.rs`, `compact.rs`, re-parenting in
//! `parent.rs`, `amend.rs`, `check.rs`, `info.rs`) are built from the same steps. The on-disk
//! structures are in `header.rs`, `region.rs`, `metadata.rs`, `locator.rs`, `bat_entry.rs`,
//! `log.rs` and `checksum.rs`; [`format`](mod@format) is their public face.

#![forbid(unsafe_code)]

// On-disk structures, each defined once (parse and write).
mod bat_entry;
mod checksum;
mod codec;
pub mod format;
mod geometry;
mod header;
mod locator;
pub mod log;
mod metadata;
mod region;
// The table in memory.
mod bat;
mod owners;
mod sector_bitmap;
// The jobs done on an open image.
mod alloc;
mod amend;
mod check;
mod compact;
mod create;
mod info;
mod io;
mod log_replay;
mod log_write;
mod open;
mod parent;
mod resize;
mod trim;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bat::Bat;
use bat_entry::*;
use disk::{
    check_aligned, check_range, Access, Allocation, BlockDevice, Error, Extent, FileStorage, Guid,
    LocatorKind, LocatorPath, ParentLink, Result, Storage, ZeroFlags,
};
use format::*;
use geometry::Geometry;
use header::{header_offset, read_headers, write_header_pair, HeaderState};
use locator::ParentLocator;
use log_replay::{read_via, replay_in_place, Overlay};
use log_write::Wal;
use metadata::{parse_metadata, Metadata};
use open::Lenient;
use parent::build_locator;
use region::RegionTable;
use sector_bitmap::Bitmaps;

/// Default bound of the BAT page cache ([`VhdxDisk::open_with_cache`]).
pub use bat::DEFAULT_CACHE_BYTES as DEFAULT_BAT_CACHE_BYTES;
pub use check::{check, check_with_cache};
pub use compact::CompactStats;
pub use create::{measure, CreateKind, CreateOptions, DEFAULT_BLOCK_SIZE, DEFAULT_LOG_SIZE};
pub use info::VhdxInfo;

/// How to open an image.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    pub read_only: bool,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let w = what.into();
    move |e| Error::io(w, e)
}

/// A fresh random GUID (write GUIDs, LogGuid, page 83 id).
fn new_guid() -> Result<Guid> {
    Guid::new_random().map_err(io_err("cannot generate a GUID"))
}

fn round_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// An open VHDX image.
pub struct VhdxDisk {
    storage: Arc<dyn Storage>,
    path: Option<PathBuf>,
    read_only: bool,
    overlay: Arc<Overlay>,
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

impl VhdxDisk {
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
        self.write_aligned(buf, offset)?;
        self.flush_if_many_dirty();
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut wal = lock(&self.wal);
        self.flush_locked(&mut wal)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_range(offset, len)?;
        self.flush_if_many_dirty();
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.zero_range(offset, len, flags)?;
        self.flush_if_many_dirty();
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.block_status_at(offset, len)
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

    /// The DataWriteGuid: what a child's `parent_linkage` names.
    fn unique_id(&self) -> Option<Guid> {
        Some(lock(&self.header).current.data_write_guid)
    }

    fn parent_link(&self) -> Option<ParentLink> {
        self.parent_link_of()
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(rlock(&self.meta).block_size as u64)
    }

    fn dirty(&self) -> bool {
        self.dirty_at_open
    }

    fn facts(&self) -> disk::LayerFacts {
        self.layer_facts()
    }

    fn format_specific(&self) -> Option<serde_json::Value> {
        self.info_json()
    }

    fn file_run(&self, offset: u64, len: u64) -> Option<(&std::fs::File, u64, u64)> {
        self.file_run_at(offset, len)
    }
}

impl Drop for VhdxDisk {
    fn drop(&mut self) {
        if !self.read_only && !self.closed.load(Ordering::Acquire) {
            let _ = BlockDevice::close(self);
        }
    }
}

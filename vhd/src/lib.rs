//! VHD (Microsoft Virtual Hard Disk v1): fixed, dynamic and differencing images.
//!
//! The on-disk structures and the rules this crate follows are described in `docs/vhd.md`.
//!
//! # Lifecycle of a [`VhdDisk`]
//!
//! * **Probe** ([`VhdDisk::probe_rule`], `open.rs`): is this file a VHD at all?
//! * **Open** ([`VhdDisk::open`], `open.rs`): footer (`footer.rs`), size rule
//!   (`geometry.rs`), dynamic header (`dynamic_header.rs`), BAT (`bat.rs`), parent locators
//!   (`locator.rs`), each step checked before the next trusts it. A differencing disk then gets
//!   its parent with [`VhdDisk::attach_parent`] (`parent.rs`; `chain` finds it).
//! * **I/O** (`io.rs`): reads merge a differencing disk's sector bitmaps (`bitmap.rs`) with
//!   its parent; a write into a block not yet allocated grows the file (`alloc.rs`) in the
//!   crash-safe order data, then BAT entry, with a valid footer at the end at every step.
//! * **Changes**: [`VhdDisk::create`] (`create.rs`), [`VhdDisk::resize`] (`resize.rs`),
//!   [`VhdDisk::compact`] (`compact.rs`), [`VhdDisk::set_parent`] (`parent.rs`), identity
//!   adoption (`amend.rs`); [`check`] (`check.rs`); [`VhdDisk::info`] (`info.rs`).
//!
//! # Tolerances (each reported in `format_specific().warnings`)
//!
//! * A footer or dynamic-header checksum mismatch is a warning, not an error. qemu 10 rejects a
//!   bad footer checksum, but older qemu, libvhdi and (by our reading) Windows accept it; real
//!   images carry bad checksums on otherwise sound structures, and refusing them would lose
//!   data for no safety gain: every offset we use is still bounds-checked. When a valid copy
//!   exists (offset 0 vs EOF), the valid one wins. `check` reports the mismatch as corruption
//!   and `check -r all` rewrites it.
//! * Footer copy at offset 0 differing from the trailer: warning; the trailer wins.
//! * A 511-byte trailing footer (old Virtual PC): accepted with a warning.
//! * Missing/damaged trailing footer on a dynamic disk: the copy at offset 0 is used.
//! * BAT at any byte offset (not only 1536 or sector aligned).
//! * Everything else that would make us read or write outside the structures (BAT entries past
//!   EOF or on top of metadata, bad block size, too few table entries, locators out of range)
//!   is a typed [`disk::Error::Corrupt`].

#![forbid(unsafe_code)]

mod alloc;
mod amend;
mod bat;
mod bitmap;
mod check;
mod compact;
mod create;
mod dynamic_header;
mod footer;
mod geometry;
mod info;
mod io;
mod limits;
mod locator;
mod open;
mod parent;
mod resize;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use disk::{BlockDevice, Error, Extent, ParentLink, Result, Storage, ZeroFlags};

pub use check::{check, check_with_cache};
pub use compact::CompactStats;
pub use create::{measure, CreateKind, CreateOptions, DEFAULT_BLOCK_SIZE};
pub use footer::DiskType;
pub use geometry::chs_for_sectors;
pub use info::VhdInfo;
pub use limits::{MAX_DYNAMIC_SIZE, MAX_FIXED_SIZE};
pub use locator::LocatorInfo;
pub use open::{OpenOptions, SizeRule, DEFAULT_BAT_CACHE_BYTES};

use bat::Bat;
use dynamic_header::DynHeader;
use footer::Footer;
use io::{flush_storage, io_err};
use limits::SECTOR;

/// What an open learned, behind one RwLock: readers hold it for the length of a read (so
/// compact and resize cannot move blocks under them), writers briefly to change it.
#[derive(Debug)]
pub(crate) struct Meta {
    pub(crate) footer: Footer,
    pub(crate) header: Option<DynHeader>,
    pub(crate) header_offset: u64,
    pub(crate) size: u64,
    pub(crate) rule: &'static str,
    pub(crate) rule_reason: String,
    pub(crate) bat: Bat,
    pub(crate) block_size: u32,
    /// Bytes of each block's sector bitmap.
    pub(crate) bitmap: u64,
    pub(crate) locators: Vec<LocatorInfo>,
    /// Offset of the trailing footer: new blocks go here.
    pub(crate) footer_pos: u64,
    pub(crate) file_len: u64,
    pub(crate) warnings: Vec<String>,
    /// Problems a strict open refuses; collected instead in lenient (check) mode.
    pub(crate) errors: Vec<(u64, String)>,
    pub(crate) trailer_ok: bool,
    pub(crate) footer_checksum_ok: bool,
    pub(crate) copy_matches: bool,
    pub(crate) header_checksum_ok: bool,
    /// Sector bitmaps are LSB-first (old blktap).
    pub(crate) bitmap_lsb: bool,
}

impl Meta {
    fn kind(&self) -> DiskType {
        self.footer.disk_type().unwrap_or(DiskType::Fixed)
    }
}

pub struct VhdDisk {
    storage: Arc<dyn Storage>,
    path: Option<PathBuf>,
    read_only: bool,
    kind: DiskType,
    meta: RwLock<Meta>,
    /// Serialises writers (allocation, bitmap updates, metadata changes).
    wlock: Mutex<()>,
    parent: Option<Arc<dyn BlockDevice>>,
    /// Set when a failed write left a BAT entry in an unknown state (its repair failed too):
    /// every later write and flush fails, since a later allocation could reuse the block.
    failed: disk::FailLatch,
}

impl std::fmt::Debug for VhdDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdDisk")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("size", &self.size())
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl VhdDisk {
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub fn disk_type(&self) -> DiskType {
        self.kind
    }

    /// Fails once a failure left this handle in a state no retry can repair.
    fn usable(&self) -> Result<()> {
        match self.failed.get() {
            None => Ok(()),
            Some(first) => Err(Error::io(
                format!(
                    "cannot write or flush {}",
                    self.path
                        .as_ref()
                        .map_or_else(|| "VHD image".to_string(), |p| p.display().to_string())
                ),
                std::io::Error::other(format!(
                    "an earlier failure left it in an unknown state ({first}); reopen the image"
                )),
            )),
        }
    }

    fn m(&self) -> std::sync::RwLockReadGuard<'_, Meta> {
        self.meta.read().unwrap_or_else(|e| e.into_inner())
    }
    fn mw(&self) -> std::sync::RwLockWriteGuard<'_, Meta> {
        self.meta.write().unwrap_or_else(|e| e.into_inner())
    }
    fn wl(&self) -> std::sync::MutexGuard<'_, ()> {
        self.wlock.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BlockDevice for VhdDisk {
    fn format(&self) -> &'static str {
        "vhd"
    }

    fn size(&self) -> u64 {
        self.m().size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_blocks(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_blocks(buf, offset)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.usable()?;
        flush_storage(&*self.storage)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        disk::check_aligned(offset, len, self.size(), SECTOR as u32)?;
        self.usable()?;
        if self.kind == DiskType::Fixed && flags.may_unmap {
            // The data area is the file itself: a hole reads as zeros.
            return self
                .storage
                .punch_hole(offset, len)
                .map_err(|e| io_err(format!("zeroing {len} bytes at {offset}"), e));
        }
        // write_at skips zero writes to unallocated dynamic blocks; nothing is freed here
        // (freeing a block in the middle of the file would only leak its space).
        disk::write_zero_buffers(self, offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.extent(offset, len)
    }

    fn backing(&self) -> Option<&Arc<dyn BlockDevice>> {
        self.parent.as_ref()
    }

    fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn unique_id(&self) -> Option<disk::Guid> {
        Some(self.m().footer.unique_id)
    }

    fn parent_link(&self) -> Option<ParentLink> {
        self.link()
    }

    fn cluster_size(&self) -> Option<u64> {
        let m = self.m();
        (self.kind != DiskType::Fixed).then_some(m.block_size as u64)
    }

    fn facts(&self) -> disk::LayerFacts {
        self.layer_facts()
    }

    fn format_specific(&self) -> Option<serde_json::Value> {
        self.info_json()
    }

    /// Fixed disks and allocated blocks of dynamic disks are file bytes as they are (a dynamic
    /// block's bitmap is not consulted, as in `read_in_block`); differencing blocks mix in the
    /// parent, so they are not. Lets a copy skip the file's holes and use copy_file_range.
    fn file_run(&self, offset: u64, len: u64) -> Option<(&std::fs::File, u64, u64)> {
        let m = self.m();
        if len == 0 || offset.checked_add(len)? > m.size {
            return None;
        }
        match self.kind {
            DiskType::Fixed => Some((self.storage.file()?, offset, len)),
            DiskType::Dynamic => {
                let bs = m.block_size as u64;
                // A BAT page that cannot be read: no file run (the read path reports it).
                let entry = m.bat.get(&*self.storage, offset / bs).ok()?;
                if entry == bat::UNALLOCATED {
                    return None;
                }
                let inb = offset % bs;
                let at = entry as u64 * SECTOR + m.bitmap + inb;
                Some((self.storage.file()?, at, len.min(bs - inb)))
            }
            DiskType::Differencing => None,
        }
    }
}

impl Drop for VhdDisk {
    fn drop(&mut self) {
        if !self.read_only {
            let _ = self.storage.flush();
        }
    }
}

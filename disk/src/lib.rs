//! The block-device layer of Viridian.
//!
//! * [`BlockDevice`]: the one trait every consumer (CLI, FUSE, NBD, storvsc, VMM) uses and every
//!   format (raw, VHD, VHDX, undo overlay) implements.
//! * [`Storage`]: the file layer under a format: real files, memory, fault injection.
//! * [`RawDisk`]: a raw image over any storage, sparse-aware.
//! * [`map`]: walking allocation across a chain (qemu-img map semantics).

// unsafe only for Linux calls std has no wrapper for (flock, fallocate, lseek SEEK_DATA/
// SEEK_HOLE, copy_file_range, block-device ioctls), each with a SAFETY comment.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bitset;
pub mod blockdev;
pub mod check;
mod error;
pub mod fault;
pub mod guid;
mod human;
pub mod map;
pub mod overlay;
mod parent;
mod paths;
mod qemu_lock;
mod raw;
mod request;
pub mod sticky;
mod storage;

pub use bitset::BitSet;
pub use blockdev::BlockGeometry;
pub use check::CheckReport;
pub use error::{Error, IoContext, Result};
pub use guid::Guid;
pub use human::human_size;
pub use parent::{read_parent, LocatorKind, LocatorPath, ParentLink};
pub use paths::{windows_path_under, windows_relative_path, ParentWindowsPaths};
pub use raw::RawDisk;
pub use request::Disk;
pub use sticky::{FailLatch, StickyFlush};
pub use storage::{
    copy_file_range, file_data_run, write_zeros, Access, FileOptions, FileStorage, MemStorage,
    Storage,
};

use std::path::Path;
use std::sync::Arc;

/// How a range of a layer is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Bytes stored in this layer. `host_offset` is their offset in this layer's file when the
    /// whole extent is contiguous there (fixed VHD, allocated VHD/VHDX block, raw file).
    Data { host_offset: Option<u64> },
    /// Defined by this layer to read as zeros (VHDX ZERO/UNMAPPED blocks, holes in a raw file).
    Zero,
    /// Not defined by this layer: read from the backing disk, or zeros when there is none
    /// (an unallocated block of a dynamic VHD or a NOT_PRESENT VHDX block).
    Unallocated,
}

/// One run of equal allocation, starting at the offset that was asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub allocation: Allocation,
}

/// Flags for [`BlockDevice::write_zeroes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (it must still read as zeros afterwards).
    pub may_unmap: bool,
}

/// A virtual disk format (raw, VHD, VHDX, undo overlay): random access to `size()` bytes.
///
/// All methods take `&self`; implementations are internally synchronised and must let
/// concurrent readers proceed in parallel for data I/O (metadata may use locks).
///
/// Consumers never call a format directly: they go through [`Disk`], the request layer, which
/// checks the range and read-only once and hands the format only requests whose offset is a
/// multiple of [`BlockDevice::logical_sector_size`] and whose end is too (or is the end of the
/// disk). Formats therefore never read-modify-write a sector: their writes, write-zeroes and
/// discards refuse anything unaligned with [`check_aligned`]. Reads of any range stay allowed
/// (a read has nothing to merge, so it cannot lose data), which keeps parsers and tests simple.
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// Short format name as qemu-img prints it: "raw", "vpc" is qemu's name for VHD but we say
    /// "vhd"; "vhdx".
    fn format(&self) -> &'static str;

    /// Virtual size in bytes.
    fn size(&self) -> u64;

    fn logical_sector_size(&self) -> u32 {
        512
    }

    fn physical_sector_size(&self) -> u32 {
        512
    }

    fn read_only(&self) -> bool;

    /// Reads exactly `buf.len()` bytes at `offset` (the merged view, parents included).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes all of `buf` at `offset`. Durable only after [`BlockDevice::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes all completed writes durable (and metadata consistent on disk).
    fn flush(&self) -> Result<()>;

    /// Hint that the range is no longer needed: afterwards it reads as either its old contents
    /// or zeros. Formats free whole blocks where they safely can.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size())?;
        if self.read_only() {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Makes the range read as zeros, deallocating it where allowed and possible.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let _ = flags;
        check_range(offset, len, self.size())?;
        write_zero_buffers(self, offset, len)
    }

    /// Whether a range deallocated by [`BlockDevice::discard`] or by `write_zeroes` with
    /// `may_unmap` then reads as zeros (SCSI LBPRZ). False unless the format guarantees it: a
    /// differencing layer that deallocates shows its parent again.
    fn unmap_reads_zero(&self) -> bool {
        false
    }

    /// Allocation of this layer only, for the run starting at `offset` (at most `len` bytes,
    /// at least one byte when `len > 0`). The default says "data" for everything.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size())?;
        Ok(Extent {
            len,
            allocation: Allocation::Data { host_offset: None },
        })
    }

    /// The parent of a differencing layer.
    fn backing(&self) -> Option<&Arc<dyn BlockDevice>> {
        None
    }

    /// The image file, when there is one.
    fn path(&self) -> Option<&Path> {
        None
    }

    /// Flushes and leaves the image clean on disk (VHDX: log empty). Called on every orderly
    /// exit; implementations also do it on drop, as best effort.
    fn close(&self) -> Result<()> {
        if self.read_only() {
            Ok(())
        } else {
            self.flush()
        }
    }

    /// The identity children link to: a VHD footer's Unique ID, a VHDX DataWriteGuid. None for
    /// formats without one (raw).
    fn unique_id(&self) -> Option<Guid> {
        None
    }

    /// What a differencing layer records about its parent (None for base images).
    fn parent_link(&self) -> Option<ParentLink> {
        None
    }

    /// Allocation unit (VHD/VHDX block size), for `info`'s cluster-size.
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    /// Whether the image needs recovery (VHDX log not empty).
    fn dirty(&self) -> bool {
        false
    }

    /// The typed facts of this layer that Get-VHD and `migrate` show (VHD type, creator,
    /// geometry); defaults to none.
    fn facts(&self) -> LayerFacts {
        LayerFacts::default()
    }

    /// Format-specific facts for `info` (goes under qemu-img's "format-specific" → "data").
    fn format_specific(&self) -> Option<serde_json::Value> {
        None
    }

    /// Where the virtual bytes at `offset` lie in a plain file, when they lie there as they are:
    /// the file, the file offset, and how many bytes (1..=`len`) continue contiguously. Lets a
    /// copy hand the run to the kernel (`copy_file_range`). `None` when the bytes are not one
    /// file's bytes (holes, parents, memory, a dirty log overlay).
    fn file_run(&self, offset: u64, len: u64) -> Option<(&std::fs::File, u64, u64)> {
        let _ = (offset, len);
        None
    }
}

/// Facts about one layer beyond its data, typed (what formats other than raw record).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerFacts {
    /// Hyper-V's VhdType: "fixed", "dynamic" or "differencing".
    pub disk_type: Option<&'static str>,
    pub creator_app: Option<String>,
    pub creator_host_os: Option<String>,
    /// How the virtual size was derived (VHD: "chs" or "current_size").
    pub size_rule: Option<&'static str>,
    /// VHD footer fields: current size and the capacity of its CHS geometry.
    pub current_size: Option<u64>,
    pub chs_size: Option<u64>,
    /// Cylinders, heads, sectors per track.
    pub geometry: Option<(u16, u8, u8)>,
    /// VHD: the image has a saved state (a suspended Virtual PC machine).
    pub saved_state: bool,
}

/// Fails with [`Error::OutOfRange`] unless `offset..offset+len` lies inside `size`.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// Fails unless `offset..offset+len` is inside the disk and aligned to `sector` at both ends
/// (the end may also be the disk's end): the contract between [`Disk`] and every format.
pub fn check_aligned(offset: u64, len: u64, size: u64, sector: u32) -> Result<()> {
    check_range(offset, len, size)?;
    let s = u64::from(sector.max(1));
    let end = offset + len;
    if !offset.is_multiple_of(s) || (!end.is_multiple_of(s) && end != size) {
        return Err(Error::InvalidArgument(format!(
            "request at offset {offset} length {len} is not aligned to the {s}-byte sector \
             (formats take aligned requests only; go through disk::Disk)"
        )));
    }
    Ok(())
}

/// Writes zeros through `write_at` in bounded chunks (fallback for `write_zeroes`).
pub fn write_zero_buffers<D: BlockDevice + ?Sized>(
    d: &D,
    mut offset: u64,
    mut len: u64,
) -> Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    while len > 0 {
        let n = len.min(zeros.len() as u64) as usize;
        d.write_at(&zeros[..n], offset)?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

/// True when every byte is zero. Word-at-a-time; used to skip zero runs everywhere.
pub fn is_zero(buf: &[u8]) -> bool {
    // OR-reduce 64-byte pieces so the compiler vectorises the loop, stopping at the first
    // piece with a set bit; convert scans every byte it copies, so this is on the hot path.
    let mut pieces = buf.chunks_exact(64);
    for piece in &mut pieces {
        if piece.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    pieces.remainder().iter().all(|&b| b == 0)
}

/// Depth of the chain below `d` (0 for a disk without parent).
pub fn chain_depth(d: &dyn BlockDevice) -> usize {
    let mut n = 0;
    let mut cur = d.backing();
    while let Some(p) = cur {
        n += 1;
        cur = p.backing();
    }
    n
}

impl<T: BlockDevice + ?Sized> BlockDevice for Arc<T> {
    fn format(&self) -> &'static str {
        (**self).format()
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn logical_sector_size(&self) -> u32 {
        (**self).logical_sector_size()
    }
    fn physical_sector_size(&self) -> u32 {
        (**self).physical_sector_size()
    }
    fn read_only(&self) -> bool {
        (**self).read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        (**self).write_zeroes(offset, len, flags)
    }
    fn unmap_reads_zero(&self) -> bool {
        (**self).unmap_reads_zero()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        (**self).block_status(offset, len)
    }
    fn backing(&self) -> Option<&Arc<dyn BlockDevice>> {
        (**self).backing()
    }
    fn path(&self) -> Option<&Path> {
        (**self).path()
    }
    fn close(&self) -> Result<()> {
        (**self).close()
    }
    fn unique_id(&self) -> Option<Guid> {
        (**self).unique_id()
    }
    fn parent_link(&self) -> Option<ParentLink> {
        (**self).parent_link()
    }
    fn cluster_size(&self) -> Option<u64> {
        (**self).cluster_size()
    }
    fn dirty(&self) -> bool {
        (**self).dirty()
    }
    fn facts(&self) -> LayerFacts {
        (**self).facts()
    }
    fn format_specific(&self) -> Option<serde_json::Value> {
        (**self).format_specific()
    }

    fn file_run(&self, offset: u64, len: u64) -> Option<(&std::fs::File, u64, u64)> {
        (**self).file_run(offset, len)
    }
}

//! Linux block devices under an image: size, sector sizes, discard and zeroing by ioctl.
//!
//! A block device's inode says 0 bytes, so its size must come from `BLKGETSIZE64`; it cannot be
//! truncated or fallocated, so zeroing goes through `BLKZEROOUT` and discarding through
//! `BLKDISCARD`. Request numbers are the kernel's `_IO`/`_IOR` encodings of type 0x12 (the
//! generic encoding used by x86, arm, arm64 and riscv); BLKSSZGET/BLKPBSZGET come from libc.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// `_IOR(0x12, 114, size_t)`: device size in bytes (u64).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 119)`: discard a byte range given as `[start, len]` (u64 pair).
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `_IO(0x12, 127)`: write zeros over a byte range `[start, len]`, never unmapping.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// What the kernel says about a block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockGeometry {
    /// Size in bytes.
    pub size: u64,
    /// Smallest addressable unit (512 or 4096).
    pub logical_sector: u32,
    /// Unit the device writes atomically.
    pub physical_sector: u32,
}

/// Size in bytes of the block device `file`.
pub fn size(file: &File) -> io::Result<u64> {
    let mut n: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `n`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut n as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n)
}

fn int_ioctl(file: &File, req: libc::Ioctl) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKSSZGET and BLKPBSZGET write one int through the pointer, which points at `v`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), req, &mut v as *mut libc::c_int) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v as u32)
}

/// Size and sector sizes of the block device `file`.
pub fn geometry(file: &File) -> io::Result<BlockGeometry> {
    let logical_sector = int_ioctl(file, libc::BLKSSZGET)?;
    // Some drivers report physical 0; the logical size is then the honest answer.
    let physical_sector = int_ioctl(file, libc::BLKPBSZGET)?.max(logical_sector);
    Ok(BlockGeometry {
        size: size(file)?,
        logical_sector,
        physical_sector,
    })
}

fn range_ioctl(file: &File, req: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD and BLKZEROOUT read two u64s through the pointer, which points at
    // `range`, alive for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), req as _, range.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Discards `offset..offset+len` (a hint: the range afterwards reads as old data or zeros).
/// Offset and length must be multiples of the logical sector size.
pub fn discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
    range_ioctl(file, BLKDISCARD, offset, len)
}

/// Makes `offset..offset+len` read as zeros (the kernel writes zeros or uses the device's
/// zeroing command). Offset and length must be multiples of the logical sector size.
pub fn zero_out(file: &File, offset: u64, len: u64) -> io::Result<()> {
    range_ioctl(file, BLKZEROOUT, offset, len)
}

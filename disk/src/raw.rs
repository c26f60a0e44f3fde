//! Raw images: the virtual disk is the file's bytes.

use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::{
    check_aligned, check_range, Access, Allocation, BlockDevice, Error, Extent, FileOptions,
    FileStorage, Result, Storage, ZeroFlags,
};

/// A raw image over any [`Storage`]. Holes in a sparse file are reported as zero extents, and
/// zeroing with `may_unmap` punches holes. On a block device the sector sizes are the device's,
/// zeroing is BLKZEROOUT and discard is BLKDISCARD.
#[derive(Debug)]
pub struct RawDisk {
    storage: Arc<dyn Storage>,
    size: u64,
    read_only: bool,
    logical_sector: u32,
    physical_sector: u32,
    /// A failed flush may have lost writes (whatever the store): later flushes fail too.
    flush_failed: crate::FailLatch,
    /// Set when the format was probed: refuse writes that would make the image probe as
    /// something else. The mutex makes check-and-write of the guarded sectors one step.
    probe_guard: Option<Mutex<()>>,
}

/// The first bytes of a VHDX file (file type identifier) and of a VHD footer ("cookie").
const VHDX_SIGNATURE: &[u8; 8] = b"vhdxfile";
const VHD_COOKIE: &[u8; 8] = b"conectix";
/// Bytes at each end of the image that format probing looks at.
const GUARD_WINDOW: u64 = 512;

impl RawDisk {
    /// Opens a raw file. The size is the file's length.
    pub fn open(path: &Path, access: Access) -> Result<Self> {
        let s = FileStorage::open(path, access, true)?;
        Self::new(Arc::new(s), access == Access::ReadOnly)
    }

    /// Creates (or refuses to overwrite) a raw file of `size` bytes, sparse.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        Self::create_with(path, size, &FileOptions::default())
    }

    /// Like [`RawDisk::create`], with the file opened as `opts` say.
    pub fn create_with(path: &Path, size: u64, opts: &FileOptions) -> Result<Self> {
        let s = FileStorage::create_with(path, opts)?;
        s.set_len(size)
            .map_err(|e| Error::io(format!("cannot size {}", path.display()), e))?;
        Self::new(Arc::new(s), false)
    }

    /// Wraps a store; the size is its length.
    pub fn new(storage: Arc<dyn Storage>, read_only: bool) -> Result<Self> {
        let size = storage
            .len()
            .map_err(|e| Error::io("cannot read image length", e))?;
        let (logical_sector, physical_sector) = match storage.block_geometry() {
            Some(g) => (g.logical_sector, g.physical_sector),
            None => (512, 512),
        };
        Ok(RawDisk {
            storage,
            size,
            read_only,
            flush_failed: Default::default(),
            logical_sector,
            physical_sector,
            probe_guard: None,
        })
    }

    /// Guards against format-changing writes, for an image whose format was probed: a write
    /// that would put a VHDX file identifier or a VHD footer cookie at offset 0, or a VHD
    /// footer with a valid checksum in the last 512 (or 511) bytes, fails with
    /// [`Error::ProbedRawGuard`]. An image opened with an explicit raw format has no guard.
    pub fn with_probe_guard(mut self) -> Self {
        self.probe_guard = Some(Mutex::new(()));
        self
    }

    /// Whether writes are guarded (see [`RawDisk::with_probe_guard`]).
    pub fn probe_guarded(&self) -> bool {
        self.probe_guard.is_some()
    }

    /// A RAM disk of `size` bytes.
    pub fn memory(size: u64) -> Result<Self> {
        if size > (1u64 << 40) {
            return Err(Error::InvalidArgument("memory disk too large".into()));
        }
        Self::new(Arc::new(crate::MemStorage::with_len(size as usize)), false)
    }

    /// Reports this logical sector size (e.g. 4096 for a RAM disk used as a 4Kn device).
    pub fn with_logical_sector_size(mut self, n: u32) -> Self {
        self.logical_sector = n;
        self.physical_sector = self.physical_sector.max(n);
        self
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn ctx(&self, op: &str, offset: u64) -> String {
        match self.storage.path() {
            Some(p) => format!("{op} {} at offset {offset}", p.display()),
            None => format!("{op} at offset {offset}"),
        }
    }

    /// Runs `write` (which stores `len` bytes of `data`, or zeros when None, at `offset`) after checking that
    /// the guarded windows would not then probe as another format. Writes that miss both
    /// windows, and unguarded disks, go straight through.
    fn guarded<F>(&self, offset: u64, len: u64, data: Option<&[u8]>, write: F) -> Result<()>
    where
        F: FnOnce() -> Result<()>,
    {
        let Some(lock) = &self.probe_guard else {
            return write();
        };
        let end = offset + len;
        let head_end = GUARD_WINDOW.min(self.size);
        let tail_start = self.size.saturating_sub(GUARD_WINDOW);
        let touches_head = offset < head_end;
        let touches_tail = end > tail_start && len > 0;
        if !touches_head && !touches_tail {
            return write();
        }
        let _g = lock.lock().unwrap_or_else(|e| e.into_inner());
        if touches_head {
            let new = self.window_after(0, head_end, offset, len, data)?;
            for (sig, what) in [
                (VHDX_SIGNATURE, "a VHDX file identifier"),
                (VHD_COOKIE, "a VHD footer"),
            ] {
                if new.len() >= sig.len() && &new[..sig.len()] == sig {
                    return Err(Error::ProbedRawGuard {
                        offset,
                        detail: format!("it would put {what} at offset 0"),
                    });
                }
            }
        }
        if touches_tail {
            let new = self.window_after(tail_start, self.size, offset, len, data)?;
            if forms_vhd_footer(&new) || (new.len() > 1 && forms_vhd_footer(&new[1..])) {
                return Err(Error::ProbedRawGuard {
                    offset,
                    detail: "it would put a valid VHD footer in the last sector".into(),
                });
            }
        }
        write()
    }

    /// The bytes of `from..to` as they would be after writing `len` bytes of `data` (zeros
    /// when None) at `offset`.
    fn window_after(
        &self,
        from: u64,
        to: u64,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<Vec<u8>> {
        let mut w = vec![0u8; (to - from) as usize];
        self.storage
            .read_at(&mut w, from)
            .map_err(|e| Error::io(self.ctx("cannot read", from), e))?;
        let (lo, hi) = (offset.max(from), (offset + len).min(to));
        if lo < hi {
            let dst = &mut w[(lo - from) as usize..(hi - from) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(lo - offset) as usize..(hi - offset) as usize]),
                None => dst.fill(0),
            }
        }
        Ok(w)
    }
}

/// Whether `b` starts with a VHD footer (cookie and a valid checksum) as far as `b` reaches;
/// a 511-byte `b` is an old Virtual PC footer with its last (reserved) byte missing.
fn forms_vhd_footer(b: &[u8]) -> bool {
    if b.len() < 511 || &b[..8] != VHD_COOKIE {
        return false;
    }
    let stored = u32::from_be_bytes([b[64], b[65], b[66], b[67]]);
    let sum: u32 = b[..b.len().min(512)]
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .map(|(_, &x)| x as u32)
        .sum();
    !sum == stored
}

impl BlockDevice for RawDisk {
    fn format(&self) -> &'static str {
        "raw"
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn logical_sector_size(&self) -> u32 {
        self.logical_sector
    }
    fn physical_sector_size(&self) -> u32 {
        self.physical_sector
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.storage
            .read_at(buf, offset)
            .map_err(|e| Error::io(self.ctx("cannot read", offset), e))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_aligned(offset, buf.len() as u64, self.size, self.logical_sector)?;
        self.guarded(offset, buf.len() as u64, Some(buf), || {
            self.storage
                .write_at(buf, offset)
                .map_err(|e| Error::io(self.ctx("cannot write", offset), e))
        })
    }
    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        crate::sticky::latched_flush(&self.flush_failed, self.storage.path(), || {
            self.storage.flush()
        })
        .map_err(|e| Error::io(self.ctx("cannot flush", 0), e))
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.storage.block_geometry().is_none() {
            return self.write_zeroes(offset, len, ZeroFlags { may_unmap: true });
        }
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_aligned(offset, len, self.size, self.logical_sector)?;
        // A device may return zeros afterwards, so the guard treats discards as zeroing.
        self.guarded(offset, len, None, || {
            self.storage
                .discard(offset, len)
                .map_err(|e| Error::io(self.ctx("cannot discard", offset), e))
        })
    }
    /// Holes punched by discard read as zeros; a block device's BLKDISCARD promises nothing.
    fn unmap_reads_zero(&self) -> bool {
        self.storage.block_geometry().is_none()
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_aligned(offset, len, self.size, self.logical_sector)?;
        self.guarded(offset, len, None, || {
            // On a block device punch_hole is BLKZEROOUT, which never unmaps.
            let r = if flags.may_unmap || self.storage.block_geometry().is_some() {
                self.storage.punch_hole(offset, len)
            } else {
                crate::write_zeros(&*self.storage, offset, len)
            };
            r.map_err(|e| Error::io(self.ctx("cannot zero", offset), e))
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size)?;
        let (data, run) = self
            .storage
            .data_run(offset, len)
            .map_err(|e| Error::io(self.ctx("cannot query allocation", offset), e))?;
        Ok(Extent {
            len: run.clamp(1, len.max(1)).min(len),
            allocation: if data {
                Allocation::Data {
                    host_offset: Some(offset),
                }
            } else {
                Allocation::Zero
            },
        })
    }
    fn path(&self) -> Option<&Path> {
        self.storage.path()
    }

    fn file_run(&self, offset: u64, len: u64) -> Option<(&std::fs::File, u64, u64)> {
        let end = offset.checked_add(len)?;
        // A guarded image hands out no file: a copy into it must pass the guard.
        if len == 0 || end > self.size || self.probe_guard.is_some() {
            return None;
        }
        Some((self.storage.file()?, offset, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::is_zero;

    #[test]
    fn sparse_file_reports_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.raw");
        let d = RawDisk::create(&p, 8 << 20).unwrap();
        d.write_at(&[7u8; 4096], 4 << 20).unwrap();
        let e = d.block_status(0, 8 << 20).unwrap();
        // tmpfs and ext4 both report the leading hole; other file systems may say data.
        if e.allocation == Allocation::Zero {
            assert!(e.len <= 4 << 20);
            let e2 = d.block_status(4 << 20, 4096).unwrap();
            assert!(matches!(e2.allocation, Allocation::Data { .. }));
        }
        let mut b = [0u8; 4096];
        d.read_at(&mut b, 4 << 20).unwrap();
        assert_eq!(b, [7u8; 4096]);
        d.write_zeroes(4 << 20, 4096, ZeroFlags { may_unmap: true })
            .unwrap();
        d.read_at(&mut b, 4 << 20).unwrap();
        assert!(crate::is_zero(&b));
    }

    #[test]
    fn out_of_range_and_read_only_are_errors() {
        let d = RawDisk::memory(4096).unwrap();
        let mut b = [0u8; 512];
        assert!(matches!(
            d.read_at(&mut b, 4000),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            d.read_at(&mut b, u64::MAX - 10),
            Err(Error::OutOfRange { .. })
        ));
        let ro = RawDisk::new(d.storage().clone(), true).unwrap();
        assert!(matches!(ro.write_at(&b, 0), Err(Error::ReadOnly)));
    }

    /// A VHD-footer-shaped sector: cookie, and a checksum that is valid when `valid`.
    fn footer(valid: bool) -> Vec<u8> {
        let mut f = vec![0u8; 512];
        f[..8].copy_from_slice(VHD_COOKIE);
        f[60..64].copy_from_slice(&2u32.to_be_bytes());
        let sum: u32 = f.iter().map(|&b| b as u32).sum();
        let c = if valid { !sum } else { !sum ^ 1 };
        f[64..68].copy_from_slice(&c.to_be_bytes());
        f
    }

    fn guarded(size: usize) -> RawDisk {
        RawDisk::memory(size as u64).unwrap().with_probe_guard()
    }

    fn sector_with(prefix: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 512];
        v[..prefix.len()].copy_from_slice(prefix);
        v
    }

    #[test]
    fn probe_guard_refuses_format_signatures_at_either_end() {
        let size = 64 << 10;
        let d = guarded(size);
        let end = size as u64;
        let refused = |r: Result<()>| matches!(r, Err(Error::ProbedRawGuard { .. }));
        assert!(refused(d.write_at(&sector_with(b"vhdxfile"), 0)));
        assert!(refused(d.write_at(&footer(true), 0)));
        assert!(refused(d.write_at(&footer(true), end - 512)));
        // The 511-byte form: the footer starts one byte into the last sector.
        let mut shifted = vec![0u8; 512];
        shifted[1..].copy_from_slice(&footer(true)[..511]);
        assert!(refused(d.write_at(&shifted, end - 512)));
        // Inside a larger write covering the last sector, or sector 0.
        let mut big = vec![0u8; 4096];
        big[4096 - 512..].copy_from_slice(&footer(true));
        assert!(refused(d.write_at(&big, end - 4096)));
        let mut big = vec![0u8; 8192];
        big[..8].copy_from_slice(b"vhdxfile");
        assert!(refused(d.write_at(&big, 0)));
        // Nothing refused was written.
        let mut b = vec![0u8; size];
        d.read_at(&mut b, 0).unwrap();
        assert!(is_zero(&b));
        // A footer-like sector with a bad checksum, ordinary data, zeros: all fine.
        d.write_at(&footer(false), end - 512).unwrap();
        d.write_at(&[7u8; 4096], 8192).unwrap();
        d.write_zeroes(0, end, ZeroFlags::default()).unwrap();
        // Unguarded (explicit raw): the guest owns every byte.
        let free = RawDisk::memory(end).unwrap();
        assert!(!free.probe_guarded());
        free.write_at(&sector_with(b"vhdxfile"), 0).unwrap();
        free.write_at(&footer(true), end - 512).unwrap();
    }

    #[test]
    fn probe_guard_sees_sub_sector_writes_through_the_request_layer() {
        // disk::Disk turns sub-sector writes into whole-sector read-modify-writes: a signature
        // assembled from small writes reaches the guard as one full sector.
        let d = crate::Disk::new(Arc::new(guarded(8192)));
        d.write_at(b"vhdx", 0).unwrap();
        let e = d.write_at(b"file", 4).unwrap_err();
        assert!(matches!(e, Error::ProbedRawGuard { .. }), "{e}");
        let f = footer(true);
        d.write_at(&f[..8], 8192 - 512).unwrap();
        let e = d.write_at(&f[8..], 8192 - 504).unwrap_err();
        assert!(matches!(e, Error::ProbedRawGuard { .. }), "{e}");
        let mut b = vec![0u8; 8192];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[..8], b"vhdx\0\0\0\0");
        assert_eq!(&b[8192 - 512..8192 - 504], b"conectix");
        assert!(is_zero(&b[8192 - 504..]));
    }

    #[test]
    fn probe_guard_checks_zeroing_that_would_complete_a_footer() {
        let size = 8192usize;
        let d = guarded(size);
        // A valid footer whose byte 100 is then spoiled: zeroing that byte (through the
        // request layer) would repair it.
        let mut f = footer(true);
        f[100] = 1;
        d.write_at(&f, size as u64 - 512).unwrap();
        let disk = crate::Disk::new(Arc::new(d));
        let r = disk.write_zeroes(size as u64 - 512 + 100, 1, ZeroFlags::default());
        assert!(matches!(r, Err(Error::ProbedRawGuard { .. })), "{r:?}");
    }

    #[test]
    fn a_failed_flush_fails_every_later_flush() {
        use crate::fault::{FaultPlan, FaultyStorage};
        let plan = FaultPlan {
            fail_flush: Some(1),
            ..Default::default()
        };
        let fs = Arc::new(FaultyStorage::new(vec![0; 4096], plan));
        let d = RawDisk::new(fs.clone(), false).unwrap();
        d.write_at(&[1u8; 512], 0).unwrap();
        assert!(d.flush().is_err());
        // The store would now succeed; the disk must not, the write may be gone.
        let e = d.flush().unwrap_err().to_string();
        assert!(e.contains("earlier flush failed"), "{e}");
        d.write_at(&[2u8; 512], 512).unwrap();
        assert!(d.flush().is_err());
    }

    #[test]
    fn second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.raw");
        let _w = RawDisk::create(&p, 1 << 20).unwrap();
        assert!(matches!(
            RawDisk::open(&p, Access::ReadWrite),
            Err(Error::Locked { .. })
        ));
        assert!(matches!(
            RawDisk::open(&p, Access::ReadOnly),
            Err(Error::Locked { .. })
        ));
    }
}

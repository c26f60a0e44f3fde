//! Raw images: the virtual disk is the file's bytes.

use std::any::Any;
use std::path::Path;
use std::sync::Arc;

use crate::{
    check_aligned, check_range, Access, Allocation, BlockDevice, Error, Extent, FileStorage,
    Result, Storage, ZeroFlags,
};

/// A raw image over any [`Storage`]. Holes in a sparse file are reported as zero extents, and
/// zeroing with `may_unmap` punches holes.
#[derive(Debug)]
pub struct RawDisk {
    storage: Arc<dyn Storage>,
    size: u64,
    read_only: bool,
    logical_sector: u32,
    /// A failed flush may have lost writes (whatever the store): later flushes fail too.
    flush_failed: crate::FailLatch,
}

impl RawDisk {
    /// Opens a raw file. The size is the file's length.
    pub fn open(path: &Path, access: Access) -> Result<Self> {
        let s = FileStorage::open(path, access, true)?;
        Self::new(Arc::new(s), access == Access::ReadOnly)
    }

    /// Creates (or refuses to overwrite) a raw file of `size` bytes, sparse.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let s = FileStorage::create(path)?;
        s.set_len(size)
            .map_err(|e| Error::io(format!("cannot size {}", path.display()), e))?;
        Self::new(Arc::new(s), false)
    }

    /// Wraps a store; the size is its length.
    pub fn new(storage: Arc<dyn Storage>, read_only: bool) -> Result<Self> {
        let size = storage
            .len()
            .map_err(|e| Error::io("cannot read image length", e))?;
        Ok(RawDisk {
            storage,
            size,
            read_only,
            logical_sector: 512,
            flush_failed: Default::default(),
        })
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
        self.storage
            .write_at(buf, offset)
            .map_err(|e| Error::io(self.ctx("cannot write", offset), e))
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
        self.write_zeroes(offset, len, ZeroFlags { may_unmap: true })
    }
    /// Holes punched by discard read as zeros.
    fn unmap_reads_zero(&self) -> bool {
        true
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_aligned(offset, len, self.size, self.logical_sector)?;
        let r = if flags.may_unmap {
            self.storage.punch_hole(offset, len)
        } else {
            crate::write_zeros(&*self.storage, offset, len)
        };
        r.map_err(|e| Error::io(self.ctx("cannot zero", offset), e))
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
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn file_run(&self, offset: u64, len: u64) -> Option<(&std::fs::File, u64, u64)> {
        let end = offset.checked_add(len)?;
        if len == 0 || end > self.size {
            return None;
        }
        Some((self.storage.file()?, offset, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! A copy-on-write overlay over any disk, kept in a scratch store.
//!
//! Used for undo mode on images whose format has no differencing child (raw): writes go to the
//! scratch store at the same offsets, a bitmap of 64 KiB granules says which granules live
//! there, and the base is never written. Losing the scratch store (a crash) is the same as
//! discarding the undo session.

use std::any::Any;
use std::sync::{Arc, RwLock};

use crate::{check_aligned, check_range, Allocation, BlockDevice, Error, Extent, Result, Storage};

const GRANULE: u64 = 64 * 1024;

#[derive(Debug)]
pub struct CowOverlay {
    base: Arc<dyn BlockDevice>,
    scratch: Arc<dyn Storage>,
    /// One bit per granule: set when the granule's bytes live in `scratch`.
    present: RwLock<Vec<u64>>,
    size: u64,
    /// A failed scratch flush may have lost overlay writes: later flushes fail too.
    flush_failed: crate::FailLatch,
}

impl CowOverlay {
    pub fn new(base: Arc<dyn BlockDevice>, scratch: Arc<dyn Storage>) -> Self {
        let size = base.size();
        let granules = size.div_ceil(GRANULE);
        CowOverlay {
            base,
            scratch,
            present: RwLock::new(vec![0; granules.div_ceil(64) as usize]),
            size,
            flush_failed: Default::default(),
        }
    }

    pub fn base(&self) -> &Arc<dyn BlockDevice> {
        &self.base
    }

    /// The scratch store: every written granule is complete there, at its own offset.
    pub fn scratch(&self) -> &Arc<dyn Storage> {
        &self.scratch
    }

    fn is_present(bits: &[u64], g: u64) -> bool {
        bits[(g / 64) as usize] & (1 << (g % 64)) != 0
    }

    fn scratch_err(e: std::io::Error) -> Error {
        Error::io("undo overlay scratch file", e)
    }

    /// Ranges (offset, len) whose data lives in the overlay, merged.
    pub fn written_ranges(&self) -> Vec<(u64, u64)> {
        let bits = self.present.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(u64, u64)> = Vec::new();
        for g in 0..self.size.div_ceil(GRANULE) {
            if Self::is_present(&bits, g) {
                let start = g * GRANULE;
                let len = GRANULE.min(self.size - start);
                match out.last_mut() {
                    Some((s, l)) if *s + *l == start => *l += len,
                    _ => out.push((start, len)),
                }
            }
        }
        out
    }
}

impl BlockDevice for CowOverlay {
    fn format(&self) -> &'static str {
        self.base.format()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn logical_sector_size(&self) -> u32 {
        self.base.logical_sector_size()
    }
    fn physical_sector_size(&self) -> u32 {
        self.base.physical_sector_size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let bits = self.present.read().unwrap_or_else(|e| e.into_inner());
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let g = pos / GRANULE;
            let here = Self::is_present(&bits, g);
            // Extend over following granules in the same state.
            let mut end = (g + 1) * GRANULE;
            while end < offset + buf.len() as u64 && Self::is_present(&bits, end / GRANULE) == here
            {
                end += GRANULE;
            }
            let n = (end.min(offset + buf.len() as u64) - pos) as usize;
            let part = &mut buf[done..done + n];
            if here {
                self.scratch.read_at(part, pos).map_err(Self::scratch_err)?;
            } else {
                self.base.read_at(part, pos)?;
            }
            done += n;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_aligned(
            offset,
            buf.len() as u64,
            self.size,
            self.logical_sector_size(),
        )?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut bits = self.present.write().unwrap_or_else(|e| e.into_inner());
        let first = offset / GRANULE;
        let last = (offset + buf.len() as u64 - 1) / GRANULE;
        // Copy up partially covered granules from the base before overwriting them.
        for g in [first, last] {
            if Self::is_present(&bits, g) {
                continue;
            }
            let start = g * GRANULE;
            let len = GRANULE.min(self.size - start);
            let covered = offset <= start && offset + buf.len() as u64 >= start + len;
            if !covered {
                let mut tmp = vec![0u8; len as usize];
                self.base.read_at(&mut tmp, start)?;
                self.scratch
                    .write_at(&tmp, start)
                    .map_err(Self::scratch_err)?;
            }
        }
        self.scratch
            .write_at(buf, offset)
            .map_err(Self::scratch_err)?;
        for g in first..=last {
            bits[(g / 64) as usize] |= 1 << (g % 64);
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        // Durable scratch data matters when the caller named the undo file and keeps it.
        crate::sticky::latched_flush(&self.flush_failed, self.scratch.path(), || {
            self.scratch.flush()
        })
        .map_err(Self::scratch_err)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size)?;
        let bits = self.present.read().unwrap_or_else(|e| e.into_inner());
        let g = offset / GRANULE;
        let here = Self::is_present(&bits, g);
        let mut end = (g + 1) * GRANULE;
        while end < offset + len && Self::is_present(&bits, end / GRANULE) == here {
            end += GRANULE;
        }
        let n = end.min(offset + len) - offset;
        Ok(Extent {
            len: n.max(1).min(len),
            allocation: if here {
                Allocation::Data { host_offset: None }
            } else {
                Allocation::Unallocated
            },
        })
    }
    fn backing(&self) -> Option<&Arc<dyn BlockDevice>> {
        Some(&self.base)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemStorage, RawDisk};

    #[test]
    fn writes_stay_in_overlay_and_reads_merge() {
        let base = Arc::new(RawDisk::memory(1 << 20).unwrap());
        base.write_at(&[1u8; 1 << 20], 0).unwrap();
        let ov = crate::Disk::new(Arc::new(CowOverlay::new(
            base.clone(),
            Arc::new(MemStorage::new()),
        )));
        ov.write_at(&[9u8; 100], 70_000).unwrap();
        let mut b = vec![0u8; 200];
        ov.read_at(&mut b, 69_950).unwrap();
        assert!(b[..50].iter().all(|&x| x == 1));
        assert!(b[50..150].iter().all(|&x| x == 9));
        assert!(b[150..].iter().all(|&x| x == 1));
        let mut c = vec![0u8; 1 << 20];
        base.read_at(&mut c, 0).unwrap();
        assert!(c.iter().all(|&x| x == 1), "base untouched");
        let inner = ov.image().as_any().downcast_ref::<CowOverlay>().unwrap();
        assert_eq!(inner.written_ranges(), vec![(65536, 65536)]);
    }

    #[test]
    fn a_failed_scratch_flush_fails_every_later_flush() {
        use crate::fault::{FaultPlan, FaultyStorage};
        let base = Arc::new(RawDisk::memory(1 << 20).unwrap());
        let plan = FaultPlan {
            fail_flush: Some(1),
            ..Default::default()
        };
        let ov = CowOverlay::new(base, Arc::new(FaultyStorage::new(Vec::new(), plan)));
        ov.write_at(&[9u8; 65536], 0).unwrap();
        assert!(ov.flush().is_err());
        let e = ov.flush().unwrap_err().to_string();
        assert!(e.contains("earlier flush failed"), "{e}");
    }
}

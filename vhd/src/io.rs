//! Guest reads and writes: storage helpers, the merged (child over parent) read of a block, the
//! write into an allocated block, and the BlockDevice read/write/status bodies.

use disk::{check_aligned, check_range, Allocation, Error, Extent, Result, Storage};

use crate::bat::UNALLOCATED;
use crate::bitmap::SectorBitmap;
use crate::limits::SECTOR;
use crate::{DiskType, Meta, VhdDisk};

pub(crate) fn io_err(what: impl Into<String>, e: std::io::Error) -> Error {
    Error::io(what, e)
}

/// Reads exactly `buf.len()` bytes; a read past EOF is reported as corruption of `structure`.
pub(crate) fn read_exact(
    s: &dyn Storage,
    buf: &mut [u8],
    off: u64,
    structure: &'static str,
) -> Result<()> {
    s.read_at(buf, off).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::corrupt(
                structure,
                off,
                format!("{} bytes needed past end of file", buf.len()),
            )
        } else {
            io_err(format!("reading {structure} at offset {off}"), e)
        }
    })
}

pub(crate) fn write_all(s: &dyn Storage, buf: &[u8], off: u64, what: &str) -> Result<()> {
    s.write_at(buf, off)
        .map_err(|e| io_err(format!("writing {what} at offset {off}"), e))
}

pub(crate) fn flush_storage(s: &dyn Storage) -> Result<()> {
    s.flush().map_err(|e| io_err("flushing VHD file", e))
}

impl VhdDisk {
    /// The parent's bytes (zeros past a smaller parent's end, `disk::read_parent`).
    fn parent_read(&self, m: &Meta, buf: &mut [u8], off: u64) -> Result<()> {
        disk::read_parent(self.parent.as_ref(), buf, off, || Error::ParentNotFound {
            child: self.path.clone().unwrap_or_default(),
            name: m
                .header
                .as_ref()
                .map(|h| h.parent_name_lossy())
                .unwrap_or_default(),
            tried: Vec::new(),
            unusable: Box::default(),
        })
    }

    /// Reads `buf` from block `blk` at in-block offset `inb` (merged view). Callers hold the
    /// metadata read guard `m` across the I/O, so compact/resize cannot move the block under
    /// them; readers still run in parallel.
    fn read_in_block(
        &self,
        m: &Meta,
        blk: u64,
        entry: u32,
        inb: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let (bs, bitmap) = (m.block_size as u64, m.bitmap);
        let voff = blk * bs + inb;
        if entry == UNALLOCATED {
            if self.kind == DiskType::Differencing {
                return self.parent_read(m, buf, voff);
            }
            buf.fill(0);
            return Ok(());
        }
        let data = entry as u64 * SECTOR + bitmap;
        if self.kind != DiskType::Differencing {
            // Dynamic disks: like qemu, the bitmap is not consulted (blocks are zero-filled
            // when allocated).
            return read_exact(&*self.storage, buf, data + inb, "VHD data block");
        }
        let end = inb + buf.len() as u64;
        let bm = SectorBitmap::read(
            &*self.storage,
            entry as u64 * SECTOR,
            inb,
            end,
            m.bitmap_lsb,
        )?;
        let mut p = inb;
        while p < end {
            let q = bm.run_end(p, end);
            let out = &mut buf[(p - inb) as usize..(q - inb) as usize];
            if bm.present(p / SECTOR) {
                read_exact(&*self.storage, out, data + p, "VHD data block")?;
            } else {
                self.parent_read(m, out, blk * bs + p)?;
            }
            p = q;
        }
        Ok(())
    }

    /// Writes whole sectors `data` into block `blk` at in-block offset `inb`, allocating it
    /// when needed.
    fn write_in_block(&self, blk: u64, inb: u64, data: &[u8]) -> Result<()> {
        let m = self.m();
        let (entry, bitmap, lsb) = (m.bat.get(&*self.storage, blk)?, m.bitmap, m.bitmap_lsb);
        // Whole sectors only: the request layer (disk::Disk) merged any partial sector.
        drop(m);
        if entry == UNALLOCATED {
            return self.allocate(blk, inb, data);
        }
        let base = entry as u64 * SECTOR;
        write_all(&*self.storage, data, base + bitmap + inb, "VHD data block")?;
        if self.kind == DiskType::Differencing {
            let end = inb + data.len() as u64;
            let mut bm = SectorBitmap::read(&*self.storage, base, inb, end, lsb)?;
            let before = bm.clone();
            bm.set(inb / SECTOR, end / SECTOR);
            if bm != before {
                // Data must be durable before the bit that exposes it, or a crash could show
                // never-written sectors instead of the parent's data.
                flush_storage(&*self.storage)?;
                write_all(
                    &*self.storage,
                    bm.bytes(),
                    base + bm.byte_offset(),
                    "VHD sector bitmap",
                )?;
            }
        }
        Ok(())
    }

    /// [`disk::BlockDevice::read_at`].
    pub(crate) fn read_blocks(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // A shared guard for the whole read: many readers at once, but compact/resize (which
        // take it exclusively) cannot move blocks mid-read.
        let m = self.m();
        let bs = m.block_size as u64;
        check_range(offset, buf.len() as u64, m.size)?;
        if self.kind == DiskType::Fixed {
            return read_exact(&*self.storage, buf, offset, "VHD fixed disk data");
        }
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let blk = off / bs;
            let inb = off % bs;
            let n = ((bs - inb) as usize).min(buf.len() - done);
            let entry = m.bat.get(&*self.storage, blk)?;
            self.read_in_block(&m, blk, entry, inb, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// [`disk::BlockDevice::write_at`].
    pub(crate) fn write_blocks(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let (size, bs) = {
            let m = self.m();
            (m.size, m.block_size as u64)
        };
        check_aligned(offset, buf.len() as u64, size, SECTOR as u32)?;
        self.usable()?;
        if self.kind == DiskType::Fixed {
            return write_all(&*self.storage, buf, offset, "VHD fixed disk data");
        }
        let _g = self.wl();
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let blk = off / bs;
            let inb = off % bs;
            let n = ((bs - inb) as usize).min(buf.len() - done);
            let data = &buf[done..done + n];
            // Writing zeros into an unallocated block of a dynamic disk changes nothing.
            let skip = self.kind == DiskType::Dynamic
                && self.m().bat.get(&*self.storage, blk)? == UNALLOCATED
                && disk::is_zero(data);
            if !skip {
                self.write_in_block(blk, inb, data)?;
            }
            done += n;
        }
        Ok(())
    }

    /// [`disk::BlockDevice::block_status`].
    pub(crate) fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
        let m = self.m();
        check_range(offset, len, m.size)?;
        if self.kind == DiskType::Fixed {
            return Ok(Extent {
                len,
                allocation: Allocation::Data {
                    host_offset: Some(offset),
                },
            });
        }
        let bs = m.block_size as u64;
        let end = offset + len;
        let blk = offset / bs;
        let entry = m.bat.get(&*self.storage, blk)?;
        if entry == UNALLOCATED {
            // Merge following unallocated blocks.
            let b = m
                .bat
                .next_allocated(&*self.storage, blk + 1, end.div_ceil(bs))?;
            // A dynamic disk defines unallocated blocks as zeros (qemu-img map reports them
            // present+zero); only a differencing disk defers them to its parent.
            let allocation = if self.kind == DiskType::Dynamic {
                Allocation::Zero
            } else {
                Allocation::Unallocated
            };
            return Ok(Extent {
                len: (b * bs).min(end) - offset,
                allocation,
            });
        }
        let inb = offset % bs;
        let data = entry as u64 * SECTOR + m.bitmap + inb;
        let blk_end = ((blk + 1) * bs).min(end);
        if self.kind == DiskType::Dynamic {
            return Ok(Extent {
                len: blk_end - offset,
                allocation: Allocation::Data {
                    host_offset: Some(data),
                },
            });
        }
        let hi = blk_end - blk * bs;
        let bm = SectorBitmap::read(&*self.storage, entry as u64 * SECTOR, inb, hi, m.bitmap_lsb)?;
        Ok(Extent {
            len: bm.run_end(inb, hi) - inb,
            allocation: if bm.present(inb / SECTOR) {
                Allocation::Data {
                    host_offset: Some(data),
                }
            } else {
                Allocation::Unallocated
            },
        })
    }
}

//! Trim: releasing whole blocks (discard, write zeroes); partial blocks are the caller's.

use super::*;

impl VhdxDisk {
    /// Releases whole blocks in `offset..offset+len`; returns the unaligned head/tail ranges.
    pub(crate) fn release_blocks(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<Vec<(u64, u64)>> {
        self.usable()?;
        self.ensure_session(true)?;
        let mut wal = lock(&self.wal);
        let mut bat = wlock(&self.bat);
        let geo = bat.geo;
        let size = bat.size;
        let meta = rlock(&self.meta);
        let end = offset + len;
        let mut rest = Vec::new();
        let mut o = offset;
        while o < end {
            let b = o / geo.block_size;
            let bstart = b * geo.block_size;
            let bend = (bstart + geo.block_size).min(size);
            let e_end = bend.min(end);
            if o == bstart && e_end == bend && !meta.leave_blocks_allocated {
                let idx = geo.payload_index(b);
                let e = bat.get(idx)?;
                let st = bat_state(e);
                let present = st == PB_FULLY_PRESENT || st == PB_PARTIALLY_PRESENT;
                if present && !may_unmap {
                    // The block stays and holds zeros: a ZERO entry may not keep its file
                    // offset (Hyper-V refuses one that does), so dropping the offset would
                    // leak the block (allocation only appends; neither compact nor check -r
                    // reclaims space in the middle of the file). Every sector is now present.
                    disk::write_zeros(&*self.storage, bat_offset(e), bend - bstart)
                        .map_err(io_err("cannot write zeros into a block"))?;
                    if st == PB_PARTIALLY_PRESENT {
                        self.set_entry(&mut bat, idx, bat_entry(PB_FULLY_PRESENT, bat_offset(e)))?;
                    }
                    o = e_end;
                    continue;
                }
                if present {
                    self.storage
                        .punch_hole(bat_offset(e), geo.block_size)
                        .map_err(io_err("cannot punch hole"))?;
                }
                // Differencing: ZERO hides the parent; base: NOT_PRESENT reads zeros.
                let new_state = if meta.has_parent {
                    PB_ZERO
                } else {
                    PB_NOT_PRESENT
                };
                self.set_entry(&mut bat, idx, bat_entry(new_state, 0))?;
                let _ = &mut wal;
            } else {
                rest.push((o, e_end - o));
            }
            o = e_end;
        }
        Ok(rest)
    }

    /// Block `b` reads as zeros without any work.
    pub(crate) fn block_reads_zero(&self, b: u64) -> Result<bool> {
        let bat = rlock(&self.bat);
        let st = bat_state(bat.get(bat.geo.payload_index(b))?);
        let has_parent = rlock(&self.meta).has_parent;
        Ok(
            matches!(st, PB_ZERO | PB_UNMAPPED | PB_UNDEFINED | PB_UNMAPPED_V095)
                || (st == PB_NOT_PRESENT && !has_parent),
        )
    }

    /// [`BlockDevice::discard`]: whole blocks are released; partial blocks are left alone
    /// (discard is a hint).
    pub(crate) fn discard_range(&self, offset: u64, len: u64) -> Result<()> {
        check_aligned(offset, len, self.size(), self.logical_sector_size())?;
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if len == 0 {
            return Ok(());
        }
        self.release_blocks(offset, len, true).map(|_| ())
    }

    /// [`BlockDevice::write_zeroes`]: whole blocks are released, partial ones written with
    /// zeros unless they already read as zeros.
    pub(crate) fn zero_range(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_aligned(offset, len, self.size(), self.logical_sector_size())?;
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if len == 0 {
            return Ok(());
        }
        let rest = self.release_blocks(offset, len, flags.may_unmap)?;
        let bs = rlock(&self.bat).geo.block_size;
        for (o, l) in rest {
            if self.block_reads_zero(o / bs)? {
                continue;
            }
            disk::write_zero_buffers(self, o, l)?;
        }
        Ok(())
    }
}

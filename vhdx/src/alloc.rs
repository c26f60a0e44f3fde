//! Allocation: new blocks are appended at the end of the file, and BAT changes are recorded as
//! dirty pages for the log.

use super::*;

impl VhdxDisk {
    /// Sets a BAT entry (caller holds the WAL lock).
    pub(crate) fn set_entry(&self, bat: &mut Bat, idx: usize, v: u64) -> Result<()> {
        if bat.get(idx)? != v {
            bat.put(idx, v)?;
        }
        Ok(())
    }

    /// Reserves `len` bytes at the end of the file (caller holds the WAL lock and the BAT).
    pub(crate) fn allocate(&self, wal: &mut Wal, bat: &Bat, len: u64) -> Result<u64> {
        if !wal.end_known {
            wal.next_free = wal.next_free.max(self.last_block_end(bat)?);
            wal.end_known = true;
        }
        let off = round_up(wal.next_free, MIB);
        let end = off + len;
        let cur = self
            .storage
            .len()
            .map_err(io_err("cannot get file length"))?;
        if cur < end {
            self.storage
                .set_len(end)
                .map_err(io_err(format!("cannot extend image to {end}")))?;
        }
        wal.next_free = end;
        // Ours now: an entry first read from here on may not point into it.
        bat.claim(off, len);
        Ok(off)
    }

    /// Where the last block the BAT points at ends (a block may run past the end of the file:
    /// old QEMU wrote partial last blocks). Walks the table without filling the cache.
    fn last_block_end(&self, bat: &Bat) -> Result<u64> {
        let geo = bat.geo;
        let mut end = 0u64;
        bat.for_each_nonzero(|i, e| {
            let st = bat_state(e);
            let len = if geo.is_bitmap_index(i) {
                (st == SB_PRESENT).then_some(MIB)
            } else {
                matches!(st, PB_FULLY_PRESENT | PB_PARTIALLY_PRESENT).then_some(geo.block_size)
            };
            if let Some(len) = len {
                end = end.max(bat_offset(e) + len);
            }
            Ok(())
        })?;
        Ok(end)
    }
}

//! Allocation: new blocks are appended at the end of the file, and BAT changes are recorded as
//! dirty pages for the log.

use super::*;

impl VhdxDisk {
    /// Sets a BAT entry (caller holds the WAL lock).
    pub(crate) fn set_entry(&self, bat: &mut Bat, idx: usize, v: u64) {
        if bat.get(idx) != v {
            bat.put(idx, v);
            bat.dirty_pages.insert(idx as u64 / 512);
        }
    }

    /// Reserves `len` bytes at the end of the file (caller holds the WAL lock).
    pub(crate) fn allocate(&self, wal: &mut Wal, len: u64) -> Result<u64> {
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
        Ok(off)
    }
}

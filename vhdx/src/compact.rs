//! Compaction: releasing blocks that read as zeros, moving tail blocks into gaps, truncating.

use super::*;

/// What compaction did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactStats {
    /// Blocks found to read as zeros (or unmapped) and released.
    pub blocks_released: u64,
    /// Blocks moved towards the start of the file.
    pub blocks_moved: u64,
    /// File length before and after.
    pub old_len: u64,
    pub new_len: u64,
}

impl VhdxDisk {
    /// Releases blocks that read as zeros, moves tail blocks down into the gaps and truncates.
    pub fn compact(&self) -> Result<CompactStats> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let mut stats = CompactStats {
            old_len: self
                .storage
                .len()
                .map_err(io_err("cannot get file length"))?,
            ..Default::default()
        };
        let (has_parent, fixed) = {
            let m = rlock(&self.meta);
            (m.has_parent, m.leave_blocks_allocated)
        };
        self.usable()?;
        // Compacting keeps every byte the disk reads (a released block was all zeros, a moved
        // block keeps its data), so the data identity children check (DataWriteGuid) stays:
        // only the file's own write GUID changes.
        self.ensure_session(false)?;
        let mut wal = lock(&self.wal);
        // 1. Release zero blocks.
        if !fixed {
            let mut bat = wlock(&self.bat);
            let geo = bat.geo;
            let mut buf = vec![0u8; geo.block_size as usize];
            for b in 0..geo.data_blocks {
                let idx = geo.payload_index(b);
                let e = bat.get(idx)?;
                let st = bat_state(e);
                let release = match st {
                    PB_FULLY_PRESENT => {
                        self.read_file(&mut buf, bat_offset(e))?;
                        disk::is_zero(&buf)
                    }
                    PB_UNMAPPED | PB_UNDEFINED | PB_UNMAPPED_V095 => !has_parent,
                    _ => false,
                };
                if release {
                    let ns = if has_parent { PB_ZERO } else { PB_NOT_PRESENT };
                    self.set_entry(&mut bat, idx, bat_entry(ns, 0))?;
                    stats.blocks_released += 1;
                }
            }
        }
        self.flush_locked(&mut wal)?;
        self.sflush()?;
        wal.applied_unflushed = false;
        // 2. Move blocks down.
        let data_start = {
            let hs = lock(&self.header);
            let mut s = round_up(hs.current.log_offset + hs.current.log_length as u64, MIB);
            for e in &self.rt().entries {
                s = s.max(e.offset + e.length as u64);
            }
            s
        };
        let mut blocks: Vec<(u64, u64, usize)> = Vec::new();
        {
            let bat = rlock(&self.bat);
            let geo = bat.geo;
            bat.for_each_nonzero(|i, e| {
                let is_sb = geo.is_bitmap_index(i);
                let st = bat_state(e);
                if is_sb && st == SB_PRESENT && has_parent {
                    blocks.push((bat_offset(e), MIB, i));
                } else if !is_sb && (st == PB_FULLY_PRESENT || st == PB_PARTIALLY_PRESENT) {
                    blocks.push((bat_offset(e), geo.block_size, i));
                }
                Ok(())
            })?;
        }
        blocks.sort_unstable();
        let mut target = data_start;
        let mut unsafe_from = u64::MAX; // lowest freed source whose BAT change is not durable
        for (off, len, idx) in blocks {
            let t = round_up(target, MIB);
            if t + len <= off {
                if t + len > unsafe_from {
                    self.flush_locked(&mut wal)?;
                    self.sflush()?;
                    unsafe_from = u64::MAX;
                }
                let mut buf = vec![0u8; len as usize];
                self.read_file(&mut buf, off)?;
                self.write_file_sparse(&buf, t)?;
                let mut bat = wlock(&self.bat);
                let st = bat_state(bat.get(idx)?);
                bat.claim(t, len);
                self.set_entry(&mut bat, idx, bat_entry(st, t))?;
                drop(bat);
                if len == MIB && has_parent {
                    // Bitmap pages are cached by file offset.
                    let mut bm = lock(&self.bitmaps);
                    if !bm.dirty.is_empty() {
                        drop(bm);
                        self.flush_locked(&mut wal)?;
                        bm = lock(&self.bitmaps);
                    }
                    bm.pages.clear();
                }
                unsafe_from = unsafe_from.min(off);
                stats.blocks_moved += 1;
                target = t + len;
            } else {
                target = target.max(off + len);
            }
        }
        self.close_locked(&mut wal)?;
        let new_len = round_up(target, MIB).max(data_start);
        if new_len < stats.old_len {
            self.storage
                .set_len(new_len)
                .map_err(io_err("cannot truncate image"))?;
            self.sflush()?;
        }
        wal.next_free = new_len.max(target);
        lock(&self.bitmaps).pages.clear();
        // 3. The BAT is durable now: give every unreferenced range below the new end back to
        // the file system (released zero blocks, sources of moves that were not truncated), so
        // compacting never leaves more bytes allocated than before.
        let mut used: Vec<(u64, u64)> = Vec::new();
        {
            let bat = rlock(&self.bat);
            let geo = bat.geo;
            bat.for_each_nonzero(|i, e| {
                let is_sb = geo.is_bitmap_index(i);
                let st = bat_state(e);
                if is_sb && st == SB_PRESENT {
                    used.push((bat_offset(e), MIB));
                } else if !is_sb && (st == PB_FULLY_PRESENT || st == PB_PARTIALLY_PRESENT) {
                    used.push((bat_offset(e), geo.block_size));
                }
                Ok(())
            })?;
        }
        used.sort_unstable();
        // The headers now say there is no log to replay, so the log's entries (written by this
        // compaction's BAT updates) are dead bytes too.
        {
            let hs = lock(&self.header);
            let (lo, ll) = (hs.current.log_offset, hs.current.log_length as u64);
            if hs.current.log_guid.is_nil() && ll > 0 {
                self.storage
                    .punch_hole(lo, ll)
                    .map_err(io_err("cannot release the log"))?;
            }
        }
        let file_end = self
            .storage
            .len()
            .map_err(io_err("cannot get file length"))?;
        let mut free_from = data_start;
        for (off, len) in used.into_iter().chain([(file_end, 0)]) {
            if off > free_from {
                self.storage
                    .punch_hole(free_from, off.min(file_end) - free_from)
                    .map_err(io_err("cannot release unused space"))?;
            }
            free_from = free_from.max(off + len);
        }
        self.sflush()?;
        stats.new_len = self
            .storage
            .len()
            .map_err(io_err("cannot get file length"))?;
        Ok(stats)
    }
}

//! Data I/O: reading and writing payload blocks (through the sector bitmap for differencing
//! images), block status, and the raw file access under them.

use super::*;

impl VhdxDisk {
    pub(crate) fn read_file(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match self.storage.read_at(buf, off) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                // A block that runs past the end of the file (old QEMU partial last block): the
                // missing tail reads as zeros.
                let len = self
                    .storage
                    .len()
                    .map_err(io_err("cannot get file length"))?;
                buf.fill(0);
                if off < len {
                    let n = ((len - off) as usize).min(buf.len());
                    self.storage
                        .read_at(&mut buf[..n], off)
                        .map_err(io_err(format!("cannot read data at {off:#x}")))?;
                }
            }
            Err(e) => return Err(Error::io(format!("cannot read data at {off:#x}"), e)),
        }
        if !self.overlay.is_empty() {
            self.overlay.patch(buf, off);
        }
        Ok(())
    }

    pub(crate) fn write_file(&self, buf: &[u8], off: u64) -> Result<()> {
        self.storage
            .write_at(buf, off)
            .map_err(io_err(format!("cannot write at {off:#x}")))
    }

    /// Writes a block into free space at `off` without allocating its zero runs: the range is
    /// punched first (so skipped runs read zeros), then only non-zero 4 KiB pieces are written.
    /// Used when compaction moves a block, which must not fill the holes the block had.
    pub(crate) fn write_file_sparse(&self, buf: &[u8], off: u64) -> Result<()> {
        self.storage
            .punch_hole(off, buf.len() as u64)
            .map_err(io_err(format!("cannot clear {off:#x}")))?;
        const PIECE: usize = 4096;
        let mut i = 0;
        while i < buf.len() {
            let start = i;
            while i < buf.len() && !disk::is_zero(&buf[i..(i + PIECE).min(buf.len())]) {
                i = (i + PIECE).min(buf.len());
            }
            if i > start {
                self.write_file(&buf[start..i], off + start as u64)?;
            }
            while i < buf.len() && disk::is_zero(&buf[i..(i + PIECE).min(buf.len())]) {
                i = (i + PIECE).min(buf.len());
            }
        }
        Ok(())
    }

    pub(crate) fn sflush(&self) -> Result<()> {
        self.storage.flush().map_err(io_err("cannot flush image"))
    }

    /// The parent's bytes (zeros past a smaller parent's end, `disk::read_parent`).
    pub(crate) fn read_parent(&self, buf: &mut [u8], off: u64) -> Result<()> {
        disk::read_parent(self.parent.as_ref(), buf, off, || self.parent_missing())
    }

    pub(crate) fn read_block_part(&self, bat: &Bat, buf: &mut [u8], off: u64) -> Result<()> {
        let geo = bat.geo;
        let b = off / geo.block_size;
        let in_block = off % geo.block_size;
        let e = bat.get(geo.payload_index(b))?;
        let has_parent = rlock(&self.meta).has_parent;
        match bat_state(e) {
            PB_FULLY_PRESENT => self.read_file(buf, bat_offset(e) + in_block),
            PB_PARTIALLY_PRESENT => {
                let ls = geo.logical_sector;
                let mut pos = 0usize;
                while pos < buf.len() {
                    let o = in_block + pos as u64;
                    let s = o / ls;
                    let last_s = (in_block + buf.len() as u64 - 1) / ls;
                    let (present, n) = self.bitmap_run(bat, b, s, last_s - s + 1)?;
                    let run_end = ((s + n) * ls).min(in_block + buf.len() as u64);
                    let len = (run_end - o) as usize;
                    let part = &mut buf[pos..pos + len];
                    if present {
                        self.read_file(part, bat_offset(e) + o)?;
                    } else {
                        self.read_parent(part, b * geo.block_size + o)?;
                    }
                    pos += len;
                }
                Ok(())
            }
            PB_NOT_PRESENT if has_parent => self.read_parent(buf, off),
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Writes sector-aligned `buf` at aligned `off`, within one block.
    pub(crate) fn write_block_part(&self, buf: &[u8], off: u64) -> Result<()> {
        let has_parent = rlock(&self.meta).has_parent;
        // Fast path: the block is present and (for differencing) every sector already is.
        {
            let bat = rlock(&self.bat);
            let geo = bat.geo;
            let b = off / geo.block_size;
            let in_block = off % geo.block_size;
            let e = bat.get(geo.payload_index(b))?;
            match bat_state(e) {
                PB_FULLY_PRESENT => return self.write_file(buf, bat_offset(e) + in_block),
                PB_PARTIALLY_PRESENT => {
                    let s = in_block / geo.logical_sector;
                    let n = buf.len() as u64 / geo.logical_sector;
                    let (present, run) = self.bitmap_run(&bat, b, s, n)?;
                    if present && run >= n {
                        return self.write_file(buf, bat_offset(e) + in_block);
                    }
                }
                _ => {}
            }
        }
        // Slow path: allocation or bitmap update, serialised with flushes.
        let mut wal = lock(&self.wal);
        let mut bat = wlock(&self.bat);
        let geo = bat.geo;
        let b = off / geo.block_size;
        let in_block = off % geo.block_size;
        let idx = geo.payload_index(b);
        let e = bat.get(idx)?;
        let st = bat_state(e);
        match st {
            PB_FULLY_PRESENT => self.write_file(buf, bat_offset(e) + in_block),
            PB_PARTIALLY_PRESENT => {
                self.write_file(buf, bat_offset(e) + in_block)?;
                let s = in_block / geo.logical_sector;
                self.set_bits(
                    &mut wal,
                    &mut bat,
                    b,
                    s,
                    buf.len() as u64 / geo.logical_sector,
                    false,
                )
            }
            _ => {
                // A new block at the end of the file reads as zeros apart from what we write.
                let before = wal.next_free;
                let len_before = self
                    .storage
                    .len()
                    .map_err(io_err("cannot get file length"))?;
                let blk = self.allocate(&mut wal, &bat, geo.block_size)?;
                if let Err(e) = self.write_file(buf, blk + in_block) {
                    // Nothing refers to the block yet. If cutting the file back removes every
                    // byte the failed write may have left (the next user of the place must see
                    // zeros), the next allocation reuses the place instead of leaking it (a
                    // disk filling up would leak a block per retry).
                    if len_before <= blk && self.storage.set_len(len_before).is_ok() {
                        wal.next_free = before;
                    }
                    return Err(e);
                }
                if has_parent && st == PB_NOT_PRESENT {
                    let s = in_block / geo.logical_sector;
                    self.set_bits(
                        &mut wal,
                        &mut bat,
                        b,
                        s,
                        buf.len() as u64 / geo.logical_sector,
                        true,
                    )?;
                    self.set_entry(&mut bat, idx, bat_entry(PB_PARTIALLY_PRESENT, blk))?;
                } else {
                    self.set_entry(&mut bat, idx, bat_entry(PB_FULLY_PRESENT, blk))?;
                }
                Ok(())
            }
        }
    }

    pub(crate) fn write_aligned(&self, buf: &[u8], offset: u64) -> Result<()> {
        let bs = rlock(&self.bat).geo.block_size;
        let mut pos = 0usize;
        while pos < buf.len() {
            let o = offset + pos as u64;
            let n = ((bs - o % bs) as usize).min(buf.len() - pos);
            self.write_block_part(&buf[pos..pos + n], o)?;
            pos += n;
        }
        Ok(())
    }

    pub(crate) fn read_meta_region(&self, wal: &Wal, region: &mut [u8]) -> Result<()> {
        let mo = self.rt().meta_offset;
        self.read_file(region, mo)?;
        for (o, p) in &wal.raw_dirty {
            if *o >= mo && *o + PAGE <= mo + region.len() as u64 {
                let a = (*o - mo) as usize;
                region[a..a + PAGE as usize].copy_from_slice(p);
            }
        }
        Ok(())
    }

    /// [`BlockDevice::block_status`].
    pub(crate) fn block_status_at(&self, offset: u64, len: u64) -> Result<Extent> {
        let bat = rlock(&self.bat);
        check_range(offset, len, bat.size)?;
        if len == 0 {
            return Ok(Extent {
                len: 0,
                allocation: Allocation::Unallocated,
            });
        }
        let geo = bat.geo;
        let has_parent = rlock(&self.meta).has_parent;
        let classify = |b: u64, in_block: u64, max: u64| -> Result<(Allocation, u64)> {
            let e = bat.get(geo.payload_index(b))?;
            let room = (geo.block_size - in_block).min(max);
            Ok(match bat_state(e) {
                PB_FULLY_PRESENT => (
                    Allocation::Data {
                        host_offset: Some(bat_offset(e) + in_block),
                    },
                    room,
                ),
                PB_PARTIALLY_PRESENT => {
                    let ls = geo.logical_sector;
                    let s = in_block / ls;
                    let last = (in_block + room - 1) / ls;
                    let (present, n) = self.bitmap_run(&bat, b, s, last - s + 1)?;
                    let run = ((s + n) * ls).min(in_block + room) - in_block;
                    if present {
                        (
                            Allocation::Data {
                                host_offset: Some(bat_offset(e) + in_block),
                            },
                            run,
                        )
                    } else {
                        (Allocation::Unallocated, run)
                    }
                }
                PB_NOT_PRESENT => (Allocation::Unallocated, room),
                _ => (Allocation::Zero, room),
            })
        };
        let _ = has_parent;
        let mut b = offset / geo.block_size;
        let (alloc, mut got) = classify(b, offset % geo.block_size, len)?;
        while got < len {
            let o = offset + got;
            if !o.is_multiple_of(geo.block_size) {
                break;
            }
            b = o / geo.block_size;
            if alloc == Allocation::Unallocated {
                // A run of zero entries (not present): skip it without classifying each block.
                // Of z entries from a payload index at least z*cr/(cr+1) - 1 are payloads.
                let z = bat.zero_run(geo.payload_index(b))? as u64;
                let skip = (z * geo.chunk_ratio / (geo.chunk_ratio + 1)).saturating_sub(1);
                if skip > 0 {
                    got = got.saturating_add(skip * geo.block_size);
                    continue;
                }
            }
            if alloc == Allocation::Zero {
                // A run of blocks that read as zeros (states 1, 2, 3, 5), bitmap entries between.
                let p = geo.payload_index(b);
                let j = p + bat.run_while(p, |i, e| {
                    geo.is_bitmap_index(i) || matches!(bat_state(e), 1 | 2 | 3 | 5)
                })?;
                let per = geo.chunk_ratio as usize + 1;
                let blocks = ((j - p) - (j / per - p / per)) as u64;
                if blocks > 0 {
                    got = got.saturating_add(blocks * geo.block_size);
                    continue;
                }
            }
            if let Allocation::Data {
                host_offset: Some(h),
            } = alloc
            {
                // A run of fully present blocks stored one after another: counted a table
                // page at a time, not a lookup per block (a dense 64 TiB table has 64 M).
                let p = geo.payload_index(b);
                let per = geo.chunk_ratio + 1;
                let want = |i: usize| {
                    let block = i as u64 - i as u64 / per;
                    h + got + (block - b) * geo.block_size
                };
                let j = p + bat.run_while(p, |i, e| {
                    geo.is_bitmap_index(i)
                        || (bat_state(e) == PB_FULLY_PRESENT && bat_offset(e) == want(i))
                })?;
                let blocks = ((j - p) as u64) - (j as u64 / per - p as u64 / per);
                if blocks > 0 {
                    got = got.saturating_add(blocks * geo.block_size);
                    continue;
                }
            }
            let (a, n) = classify(b, 0, len - got)?;
            let same = match (alloc, a) {
                (
                    Allocation::Data {
                        host_offset: Some(h),
                    },
                    Allocation::Data {
                        host_offset: Some(h2),
                    },
                ) => h + got == h2,
                (x, y) => x == y,
            };
            if !same {
                break;
            }
            got += n;
        }
        Ok(Extent {
            len: got.min(len),
            allocation: alloc,
        })
    }

    /// [`BlockDevice::file_run`].
    pub(crate) fn file_run_at(&self, offset: u64, len: u64) -> Option<(&std::fs::File, u64, u64)> {
        // Only fully present blocks are file bytes as they are; a replayed-log overlay would
        // patch them in memory.
        if len == 0 || !self.overlay.is_empty() {
            return None;
        }
        let bat = rlock(&self.bat);
        if offset.checked_add(len)? > bat.size {
            return None;
        }
        let geo = bat.geo;
        let in_block = offset % geo.block_size;
        // A page that cannot be read: the ordinary read path reports it.
        let e = bat.get(geo.payload_index(offset / geo.block_size)).ok()?;
        if bat_state(e) != PB_FULLY_PRESENT {
            return None;
        }
        let n = len.min(geo.block_size - in_block);
        Some((self.storage.file()?, bat_offset(e) + in_block, n))
    }
}

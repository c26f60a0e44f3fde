//! Resizing: growing or shrinking the virtual size, relocating the BAT when it outgrows its
//! region; the change is one log entry.

use super::*;

impl VhdxDisk {
    /// blocks past the new end to be unallocated.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let (ls, bsz, has_parent, fixed) = {
            let m = rlock(&self.meta);
            (
                m.logical_sector as u64,
                m.block_size,
                m.has_parent,
                m.leave_blocks_allocated,
            )
        };
        if !new_size.is_multiple_of(ls) || new_size > MAX_SIZE {
            return Err(Error::InvalidArgument(format!(
                "size {new_size} must be a multiple of {ls} and at most 64 TiB"
            )));
        }
        let ng = Geometry::new(new_size, bsz, ls as u32, has_parent);
        let relocate = ng.bat_entries * 8 > self.rt().bat_length as u64;
        if relocate && round_up(ng.bat_entries * 8, MIB) > u32::MAX as u64 / MIB * MIB {
            return Err(Error::InvalidArgument(format!(
                "a {new_size}-byte disk with {bsz}-byte blocks needs a BAT larger than 4 GiB"
            )));
        }
        {
            let bat = rlock(&self.bat);
            let og = bat.geo;
            if ng.data_blocks < og.data_blocks {
                let mut min = 0;
                for b in (0..og.data_blocks).rev() {
                    let st = bat_state(bat.get(og.payload_index(b))?);
                    if st == PB_FULLY_PRESENT || st == PB_PARTIALLY_PRESENT {
                        min = (b + 1) * og.block_size;
                        break;
                    }
                }
                if new_size < min.min(bat.size) && !fixed {
                    return Err(Error::InvalidArgument(format!(
                        "cannot shrink to {new_size}: blocks up to {min} are allocated (minimum size {min})"
                    )));
                }
                if fixed && new_size < bat.size {
                    return Err(Error::InvalidArgument(
                        "shrinking a fixed VHDX is not supported".into(),
                    ));
                }
            }
        }
        self.usable()?;
        self.ensure_session(true)?;
        let mut wal = lock(&self.wal);
        // Earlier changes go in their own entries; the resize's pages then share as few as
        // possible.
        self.flush_locked(&mut wal)?;
        // From here on the in-memory tables change before the log makes the change durable: a
        // failure leaves the handle between two sizes, which no retry can sort out.
        let old_bat = self
            .resize_locked(&mut wal, new_size, ng, relocate)
            .map_err(|e| self.poison(&format!("resize to {new_size} failed"), e))?;
        if let Some((o, l)) = old_bat {
            // Once the switch is durable the old table's space can go back to the file system.
            self.sflush()?;
            wal.applied_unflushed = false;
            self.storage
                .punch_hole(o, l)
                .map_err(io_err("cannot release the old BAT"))?;
        }
        Ok(())
    }

    /// The part of [`Self::resize`] that changes the tables; returns a BAT region left behind.
    pub(crate) fn resize_locked(
        &self,
        wal: &mut Wal,
        new_size: u64,
        ng: Geometry,
        relocate: bool,
    ) -> Result<Option<(u64, u64)>> {
        let fixed = rlock(&self.meta).leave_blocks_allocated;
        let mut bat = wlock(&self.bat);
        let og = bat.geo;
        // Zero the part of a kept, allocated last block that falls past the new end.
        if new_size < bat.size && !new_size.is_multiple_of(og.block_size) {
            let b = new_size / og.block_size;
            let e = bat.get(og.payload_index(b))?;
            if matches!(bat_state(e), PB_FULLY_PRESENT | PB_PARTIALLY_PRESENT) {
                let from = new_size % og.block_size;
                let z = vec![0u8; (og.block_size - from) as usize];
                self.write_file(&z, bat_offset(e) + from)?;
            }
        }
        // Indexes depend only on the chunk ratio, which a resize keeps: kept entries stay in
        // place. Payload entries of blocks past the new end that still fall inside the table
        // (the padding of a differencing disk's last chunk) become zero; the table's new or
        // dropped tail reads as zeros (`Bat::set_len` zeroes and marks those pages dirty).
        let old_len = bat.len();
        let keep = ng.bat_entries as usize;
        let mut b = og.data_blocks.min(ng.data_blocks);
        while og.payload_index(b) < old_len.min(keep) {
            if !og.is_bitmap_index(og.payload_index(b)) && bat.get(og.payload_index(b))? != 0 {
                bat.put(og.payload_index(b), 0)?;
            }
            b += 1;
        }
        let mut old_bat = None;
        if relocate {
            // The BAT outgrows its region: copy the table, page by page, to fresh space at the
            // end of the file (unreachable until the region tables point at it; pages of zeros
            // stay holes), then switch both region tables through the log, in the same entry
            // as the new virtual size.
            let len = round_up(ng.bat_entries * 8, MIB);
            let off = self.allocate(wal, &bat, len)?;
            for p in 0..(old_len.div_ceil(512) as u64) {
                let img = bat.page_image(p)?;
                if !disk::is_zero(&img) {
                    self.write_file(&img, off + p * PAGE)?;
                }
            }
            let mut rt = self.rt().clone();
            old_bat = Some((rt.bat_offset, rt.bat_length as u64));
            rt.bat_offset = off;
            rt.bat_length = len as u32;
            for e in rt.entries.iter_mut() {
                if e.guid == GUID_BAT {
                    e.offset = off;
                    e.length = len as u32;
                }
            }
            let new_rt = rt.serialize();
            for at in [RT1_OFFSET, RT2_OFFSET] {
                let mut cur = vec![0u8; RT_SIZE];
                self.read_file(&mut cur, at)?;
                for p in 0..(RT_SIZE as u64 / PAGE) {
                    let (a, b) = ((p * PAGE) as usize, ((p + 1) * PAGE) as usize);
                    if cur[a..b] != new_rt[a..b] {
                        wal.raw_dirty
                            .insert(at + p * PAGE, new_rt[a..b].to_vec().into_boxed_slice());
                    }
                }
            }
            *wlock(&self.regions) = rt;
            bat.region = off;
            bat.clear_all_dirty();
        }
        bat.set_len(keep)?;
        bat.geo = ng;
        bat.size = new_size;
        if fixed {
            for b in og.data_blocks..ng.data_blocks {
                let off = self.allocate(wal, &bat, ng.block_size)?;
                let i = ng.payload_index(b);
                bat.put(i, bat_entry(PB_FULLY_PRESENT, off))?;
            }
        }
        // Entries past the new end must read back as zero: extend the table temporarily, so
        // the log carries their pages zeroed.
        if old_len > keep && !relocate {
            bat.set_len(old_len)?;
        }
        let mo = self.rt().meta_offset;
        let mut region = vec![0u8; self.rt().meta_length as usize];
        self.read_meta_region(wal, &mut region)?;
        for e in metadata::read_table(&region) {
            if e.guid == GUID_VDISK_SIZE {
                let io = e.offset as u64;
                let po = io / PAGE * PAGE;
                let mut page = region[po as usize..(po + PAGE) as usize].to_vec();
                if (io % PAGE) + 8 > PAGE {
                    return Err(Error::Unsupported(
                        "virtual size item straddles a page".into(),
                    ));
                }
                let at = (io % PAGE) as usize;
                page[at..at + 8].copy_from_slice(&metadata::virtual_size_item(new_size));
                wal.raw_dirty.insert(mo + po, page.into_boxed_slice());
            }
        }
        drop(bat);
        let r = self.flush_locked(wal);
        let shrunk = wlock(&self.bat).set_len(keep);
        r?;
        shrunk?;
        wlock(&self.meta).virtual_size = new_size;
        self.size_cache.store(new_size, Ordering::Release);
        Ok(old_bat)
    }
}

//! Writing through the log: write sessions (LogGuid and write GUIDs in the headers), and the
//! flush that carries every dirty metadata page in one log entry before applying it. The
//! scheme is described in [`crate::log`].

use super::*;

/// Dirty BAT and sector-bitmap pages (4 KiB each) that make a write flush by itself: 4 MiB.
const AUTO_FLUSH_DIRTY_PAGES: usize = 1024;

/// The most pages one entry may carry: with its descriptor sectors it must fit in half the log,
/// so it never overlaps the previous entry, which stays the replay target until it is durable.
fn pages_per_entry(log_len: u64) -> usize {
    let half = (log_len / 2) / PAGE;
    // Every 128 pages past the first 126 need one more descriptor sector.
    let mut n = half.saturating_sub(1).max(1);
    while n > 1 && log::desc_sectors(n) + n > half {
        n -= 1;
    }
    n as usize
}

/// Where a page of a flush came from, to clear its dirty mark once it is durable.
#[derive(Clone, Copy, Debug)]
pub(crate) enum DirtyPage {
    Bitmap(u64),
    Bat(u64),
    Raw(u64),
}

#[derive(Debug)]
pub(crate) struct Wal {
    /// Other dirty metadata pages (metadata region, region tables), by file offset.
    pub raw_dirty: BTreeMap<u64, Box<[u8]>>,
    /// Where the next block goes.
    pub next_free: u64,
    /// `next_free` lies past every block the BAT points at. Open sets it from the file length,
    /// which is enough when blocks are 1 MiB; with larger blocks the last one may run past the
    /// end of the file, so the first allocation walks the table once.
    pub end_known: bool,
    pub sequence: u64,
    /// Ring offset and length of the last entry written.
    pub prev: Option<(u64, u64)>,
    /// Pages were applied after the last entry and are not yet flushed.
    pub applied_unflushed: bool,
    pub entries_written: u64,
}

impl VhdxDisk {
    // ---- sessions and headers ----

    /// Starts a write session: new FileWriteGuid (and DataWriteGuid when `data`), LogGuid set.
    pub(crate) fn ensure_session(&self, data: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.session.load(Ordering::Acquire)
            && (!data || self.data_guid_changed.load(Ordering::Acquire))
        {
            return Ok(());
        }
        let mut hs = lock(&self.header);
        let started = self.session.load(Ordering::Acquire);
        let need_data = data && !self.data_guid_changed.load(Ordering::Acquire);
        if started && !need_data {
            return Ok(());
        }
        let mut nh = hs.current.clone();
        if !started {
            nh.file_write_guid = new_guid()?;
            nh.log_guid = new_guid()?;
            if nh.log_length == 0 {
                return Err(Error::Unsupported(
                    "VHDX image has no log region; cannot write safely".into(),
                ));
            }
        }
        if need_data {
            let chosen = lock(&self.next_data_write_guid).take();
            nh.data_write_guid = match chosen {
                Some(g) => g,
                None => new_guid()?,
            };
        }
        write_header_pair(&*self.storage, &mut hs, nh)?;
        if need_data {
            self.data_guid_changed.store(true, Ordering::Release);
        }
        // (Log sequence numbers were reset when the previous session closed; taking the WAL
        // lock here would invert the WAL -> header lock order.)
        self.session.store(true, Ordering::Release);
        Ok(())
    }

    // ---- the write-ahead log (see log.rs) ----

    /// Makes everything durable: data, then one log entry with every dirty page, then applies.
    ///
    /// A dirty page stays dirty until the log entry carrying it is durable and the page has
    /// been applied: a failure anywhere leaves every outstanding change pending, and the next
    /// flush logs it again (in a new, self-contained entry).
    pub(crate) fn flush_locked(&self, wal: &mut Wal) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.usable()?;
        if !self.session.load(Ordering::Acquire) {
            return self.sflush();
        }
        let hs_log = {
            let hs = lock(&self.header);
            (
                hs.current.log_guid,
                hs.current.log_offset,
                hs.current.log_length as u64,
            )
        };
        let (guid, log_off, log_len) = hs_log;
        // Step 1: data and previously applied pages become durable.
        self.sflush()?;
        wal.applied_unflushed = false;
        // Collect dirty pages (copies: the dirty sets are only cleared below, page by page,
        // once a durable entry carries them). The WAL lock keeps them from changing meanwhile.
        // When the dirty set needs several entries, the order matters: sector bitmaps first
        // (bits may precede the BAT entry that uses them, never follow it), then BAT pages, then
        // the metadata region and region tables (a new size or BAT location only after the
        // entries it covers).
        let mut pages: Vec<(u64, Box<[u8]>, DirtyPage)> = Vec::new();
        {
            let bat = rlock(&self.bat);
            let bm = lock(&self.bitmaps);
            for &po in &bm.dirty {
                if let Some(img) = bm.pages.get(&po) {
                    pages.push((po, img.clone(), DirtyPage::Bitmap(po)));
                }
            }
            drop(bm);
            let bat_offset = self.rt().bat_offset;
            for p in bat.dirty_pages() {
                let mut img = bat.page_image(p)?;
                let first = (p * 512) as usize;
                if first + 512 > bat.len() {
                    // Keep whatever follows the last entry on that page.
                    let mut cur = vec![0u8; PAGE as usize];
                    self.read_file(&mut cur, bat_offset + p * PAGE)?;
                    let keep = (bat.len() - first) * 8;
                    img[keep..].copy_from_slice(&cur[keep..]);
                }
                pages.push((bat_offset + p * PAGE, img, DirtyPage::Bat(p)));
            }
        }
        for (o, img) in &wal.raw_dirty {
            pages.push((*o, img.clone(), DirtyPage::Raw(*o)));
        }
        if pages.is_empty() {
            return Ok(());
        }
        // Each entry is at most half the log so it never overlaps the previous one.
        let max_pages = pages_per_entry(log_len);
        let mut first = true;
        for group in pages.chunks(max_pages) {
            if !first {
                // Checkpoint: the previous group's applied pages become durable.
                self.sflush()?;
            }
            first = false;
            let durable_len = self
                .storage
                .len()
                .map_err(io_err("cannot get file length"))?;
            let start = wal.prev.map_or(0, |(s, l)| (s + l) % log_len);
            wal.sequence += 1;
            let refs: Vec<(u64, &[u8])> = group.iter().map(|(o, p, _)| (*o, &p[..])).collect();
            let entry = log::build_entry(
                wal.sequence,
                start as u32,
                &guid,
                durable_len,
                wal.next_free.max(durable_len),
                &refs,
            );
            let len = entry.len() as u64;
            // Write, wrapping around the end of the ring. A failed attempt is simply
            // overwritten by the next one at the same place (with a higher sequence number).
            let first_part = (log_len - start).min(len) as usize;
            self.write_file(&entry[..first_part], log_off + start)?;
            if first_part < entry.len() {
                self.write_file(&entry[first_part..], log_off)?;
            }
            self.sflush()?;
            wal.prev = Some((start, len));
            wal.entries_written += 1;
            // Apply lazily: durable at the next flush. Until every page is in place the entry
            // is the only copy, so the pages stay dirty (the next entry carries them again
            // before this one can be overwritten).
            wal.applied_unflushed = true;
            for (o, p, _) in group {
                self.write_file(p, *o)?;
            }
            let mut bat = wlock(&self.bat);
            let mut bm = lock(&self.bitmaps);
            for (_, _, which) in group {
                match which {
                    DirtyPage::Bitmap(po) => {
                        bm.dirty.remove(po);
                    }
                    DirtyPage::Bat(p) => bat.clear_dirty(*p),
                    DirtyPage::Raw(o) => {
                        wal.raw_dirty.remove(o);
                    }
                }
            }
            bat.shrink_to_bound();
        }
        Ok(())
    }

    /// Flushes when many metadata pages are waiting for one: dirty pages are pinned in memory
    /// until a log entry carries them, so a writer that never flushes would otherwise make
    /// memory (and the one big flush that comes at last) grow with every page it touches.
    /// A failure here is not the write's: its data is in place and its pages stay dirty, so
    /// the caller's next flush retries them and reports the error.
    pub(crate) fn flush_if_many_dirty(&self) {
        let dirty = rlock(&self.bat).dirty_count() + lock(&self.bitmaps).dirty.len();
        if dirty >= AUTO_FLUSH_DIRTY_PAGES {
            let mut wal = lock(&self.wal);
            let _ = self.flush_locked(&mut wal);
        }
    }

    /// Flush, make the applied pages durable and mark the log empty.
    pub(crate) fn close_locked(&self, wal: &mut Wal) -> Result<()> {
        if self.read_only || !self.session.load(Ordering::Acquire) {
            return Ok(());
        }
        self.flush_locked(wal)?;
        self.sflush()?;
        wal.applied_unflushed = false;
        let mut hs = lock(&self.header);
        let mut nh = hs.current.clone();
        nh.log_guid = Guid::NIL;
        // Half written, the current header may already say "no log": later entries would be
        // written under an empty LogGuid and never replayed. So no write may follow.
        write_header_pair(&*self.storage, &mut hs, nh)
            .map_err(|e| self.poison("closing header update failed", e))?;
        self.session.store(false, Ordering::Release);
        wal.prev = None;
        wal.sequence = 0;
        Ok(())
    }

    /// Chooses the DataWriteGuid that the first data write of this open will give the image
    /// (instead of a random one). Fails once data has been written in this open.
    pub fn set_next_data_write_guid(&self, guid: Guid) -> Result<()> {
        let _hs = lock(&self.header);
        if self.data_guid_changed.load(Ordering::Acquire) {
            return Err(Error::InvalidArgument(
                "the DataWriteGuid of this open has already changed".into(),
            ));
        }
        *lock(&self.next_data_write_guid) = Some(guid);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_fits_in_half_the_log() {
        for log_len in [MIB, 2 * MIB, 8 * MIB, 64 * MIB] {
            let n = pages_per_entry(log_len) as u64;
            let sectors = log::desc_sectors(n) + n;
            assert!(sectors * PAGE <= log_len / 2, "{log_len}: {n} pages");
            // And not much less: a bigger group would not fit.
            assert!((log::desc_sectors(n + 1) + n + 1) * PAGE > log_len / 2);
        }
    }

    /// A flush writes one entry with every dirty page, and replaying that entry alone gives the
    /// pages the flush applied.
    #[test]
    fn a_flush_writes_one_replayable_entry() {
        let s: Arc<dyn Storage> = Arc::new(disk::MemStorage::new());
        let d = VhdxDisk::create_on(
            s.clone(),
            &CreateOptions::new(CreateKind::Dynamic, 64 << 20),
        )
        .unwrap();
        d.write_at(&[0xa5; 4096], 0).unwrap();
        d.write_at(&[0x5a; 4096], 8 << 20).unwrap();
        d.flush().unwrap();
        assert_eq!(d.log_entries_written(), 1);
        let h = lock(&d.header).current.clone();
        assert!(
            !h.log_guid.is_nil(),
            "the session's log is active until close"
        );
        let mut ring = vec![0u8; h.log_length as usize];
        s.read_at(&mut ring, h.log_offset).unwrap();
        let seq = log::find_sequence(&ring, &h.log_guid);
        assert_eq!(seq.entries.len(), 1);
        let bat_at = d.rt().bat_offset;
        let pages: Vec<u64> = seq.entries[0]
            .ops
            .iter()
            .map(|op| match op {
                log::LogOp::Data { file_offset, page } => {
                    let mut now = vec![0u8; PAGE as usize];
                    s.read_at(&mut now, *file_offset).unwrap();
                    assert_eq!(&now[..], &page[..], "applied page equals its log image");
                    *file_offset
                }
                log::LogOp::Zero { .. } => panic!("a flush logs page images only"),
            })
            .collect();
        // Both blocks' entries are on the BAT's first page.
        assert_eq!(pages, vec![bat_at]);
        d.close().unwrap();
    }
}

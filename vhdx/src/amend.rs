//! In-place changes for `viridian amend`: metadata items and the identity children check.

use super::*;

impl VhdxDisk {
    /// The DataWriteGuid: what a differencing child records as its parent's identity.
    pub fn data_write_guid(&self) -> Guid {
        lock(&self.header).current.data_write_guid
    }

    /// Gives this image the DataWriteGuid of another image with the same content, so children
    /// made against that image open on this one. Only for a faithful copy (amend rewrites an
    /// image into a new file and then puts it in the old one's place). Everything written
    /// before is flushed first; a data write after this changes the GUID again, as it must.
    pub fn adopt_data_write_guid(&self, guid: Guid) -> Result<()> {
        self.ensure_session(false)?;
        {
            let mut wal = lock(&self.wal);
            self.flush_locked(&mut wal)?;
        }
        let mut hs = lock(&self.header);
        let mut nh = hs.current.clone();
        nh.data_write_guid = guid;
        write_header_pair(&*self.storage, &mut hs, nh)?;
        // Data writes after this point must still get a fresh GUID.
        self.data_guid_changed.store(false, Ordering::Release);
        Ok(())
    }

    /// Changes the physical sector size metadata item (512 or 4096) through the log, as a
    /// guest-visible fact that leaves the data and the DataWriteGuid alone (the content a child
    /// reads through this parent does not change).
    pub fn set_physical_sector_size(&self, size: u32) -> Result<()> {
        if size != 512 && size != 4096 {
            return Err(Error::InvalidArgument(format!(
                "physical sector size {size} (512 or 4096)"
            )));
        }
        self.set_metadata_item(&GUID_PHYSICAL_SECTOR, &metadata::sector_size_item(size))?;
        wlock(&self.meta).physical_sector = size;
        Ok(())
    }

    /// The page 83 identifier (the SCSI serial the guest sees).
    pub fn page83(&self) -> Guid {
        rlock(&self.meta).page83
    }

    /// Sets the page 83 identifier: amend gives a rewritten image the old one, so the guest
    /// keeps seeing the same disk.
    pub fn set_page83(&self, id: Guid) -> Result<()> {
        self.set_metadata_item(&GUID_PAGE83, &metadata::page83_item(id))?;
        wlock(&self.meta).page83 = id;
        Ok(())
    }

    /// Overwrites the value of an existing fixed-size metadata item through the log (a crash
    /// leaves the old or the new value, never a torn one).
    fn set_metadata_item(&self, guid: &Guid, value: &[u8]) -> Result<()> {
        self.usable()?;
        self.ensure_session(false)?;
        let mut wal = lock(&self.wal);
        self.flush_locked(&mut wal)?;
        let mo = self.rt().meta_offset;
        let mut region = vec![0u8; self.rt().meta_length as usize];
        self.read_meta_region(&wal, &mut region)?;
        let mut found = false;
        for e in metadata::read_table(&region) {
            if e.guid != *guid {
                continue;
            }
            let io = e.offset as u64;
            let len = e.length as usize;
            let po = io / PAGE * PAGE;
            let at = (io % PAGE) as usize;
            if len != value.len() || at + len > PAGE as usize || po + PAGE > region.len() as u64 {
                return Err(Error::Unsupported(format!(
                    "metadata item {guid} has an unexpected size or place"
                )));
            }
            let mut page = region[po as usize..(po + PAGE) as usize].to_vec();
            page[at..at + len].copy_from_slice(value);
            wal.raw_dirty.insert(mo + po, page.into_boxed_slice());
            found = true;
        }
        if !found {
            return Err(Error::Unsupported(format!(
                "the image has no metadata item {guid}"
            )));
        }
        self.flush_locked(&mut wal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reopen(path: &Path, read_only: bool) -> VhdxDisk {
        VhdxDisk::open_path(path, &OpenOptions { read_only }).unwrap()
    }

    #[test]
    fn amended_items_survive_reopening_and_data_stays() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a.vhdx");
        let disk =
            VhdxDisk::create(&path, &CreateOptions::new(CreateKind::Dynamic, 8 << 20)).unwrap();
        disk.write_at(&[0x5a; 4096], 1 << 20).unwrap();
        disk.close().unwrap();
        drop(disk);

        let disk = reopen(&path, false);
        let guid = Guid::from_windows_bytes([7u8; 16]);
        disk.set_physical_sector_size(512).unwrap();
        disk.set_page83(Guid::from_windows_bytes([9u8; 16]))
            .unwrap();
        disk.adopt_data_write_guid(guid).unwrap();
        assert!(disk.set_physical_sector_size(1000).is_err());
        disk.close().unwrap();
        drop(disk);

        let disk = reopen(&path, true);
        assert_eq!(disk.physical_sector_size(), 512);
        assert_eq!(disk.page83(), Guid::from_windows_bytes([9u8; 16]));
        assert_eq!(disk.data_write_guid(), guid);
        let mut buf = [0u8; 4096];
        disk.read_at(&mut buf, 1 << 20).unwrap();
        assert_eq!(buf, [0x5a; 4096]);
    }

    #[test]
    fn a_data_write_after_adopting_changes_the_guid_again() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a.vhdx");
        let disk =
            VhdxDisk::create(&path, &CreateOptions::new(CreateKind::Dynamic, 8 << 20)).unwrap();
        disk.close().unwrap();
        drop(disk);
        let disk = reopen(&path, false);
        disk.adopt_data_write_guid(Guid::from_windows_bytes([3u8; 16]))
            .unwrap();
        disk.write_at(&[1; 4096], 0).unwrap();
        disk.close().unwrap();
        drop(disk);
        assert_ne!(
            reopen(&path, true).data_write_guid(),
            Guid::from_windows_bytes([3u8; 16])
        );
    }
}

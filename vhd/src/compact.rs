//! Compaction of a dynamic disk: all-zero blocks are freed, the last blocks move into the holes,
//! and the file is cut after the last block. Each step keeps the image openable and its
//! contents unchanged at every crash point.

use std::collections::{BTreeMap, BTreeSet};

use disk::{Error, Result, Storage};
use serde::Serialize;

use crate::bat::UNALLOCATED;
use crate::dynamic_header::HEADER_SIZE;
use crate::footer::FOOTER_SIZE;
use crate::io::{flush_storage, io_err, read_exact, write_all};
use crate::limits::SECTOR;
use crate::{DiskType, VhdDisk};

/// What `compact` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CompactStats {
    pub blocks_freed: u64,
    pub blocks_moved: u64,
    pub file_size_before: u64,
    pub file_size_after: u64,
}

impl VhdDisk {
    /// Frees all-zero blocks of a dynamic disk and shrinks the file by moving the last blocks
    /// into the holes. Differencing disks are left alone (a zero block there may hide parent
    /// data); fixed disks have nothing to free.
    pub fn compact(&self) -> Result<CompactStats> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let _g = self.wl();
        self.usable()?;
        let s = &*self.storage;
        let before = s.len().map_err(|e| io_err("reading file length", e))?;
        let mut st = CompactStats {
            file_size_before: before,
            file_size_after: before,
            ..Default::default()
        };
        if self.kind != DiskType::Dynamic {
            return Ok(st);
        }
        let (bs, bitmap, meta_end) = {
            let m = self.m();
            let h = m
                .header
                .as_ref()
                .ok_or_else(|| Error::corrupt("VHD dynamic header", 0, "missing"))?;
            let mut end = m.header_offset + HEADER_SIZE as u64;
            end = end.max(h.table_offset + h.max_table_entries as u64 * 4);
            for l in &m.locators {
                end = end.max(l.data_offset + l.data_space_bytes);
            }
            (m.block_size as u64, m.bitmap, end)
        };
        let slot = bitmap + bs;
        let mut buf = vec![0u8; bs as usize];
        // 1. Unmap zero blocks (they read as zeros either way).
        let allocated = self.m().bat.allocated(s)?;
        let mut freed = Vec::new();
        let mut used = BTreeMap::new();
        for (i, e) in allocated {
            read_exact(s, &mut buf, e as u64 * SECTOR + bitmap, "VHD data block")?;
            if disk::is_zero(&buf) {
                // A short write may have torn the entry: the old value goes back, as
                // allocation does.
                self.write_bat_entry(&self.m().bat, i, UNALLOCATED, e)?;
                self.mw().bat.set(i, UNALLOCATED, e);
                freed.push(e as u64 * SECTOR);
                st.blocks_freed += 1;
            } else {
                used.insert(e as u64 * SECTOR, i);
            }
        }
        flush_storage(s)?;
        // 2. Move the highest block into the lowest hole left by a freed block (an exact slot
        // of the same size, so any layout works). A move copies, flushes, and only then
        // repoints the BAT entry, so the old copy stays valid until the entry changes.
        let mut holes: BTreeSet<u64> = freed.into_iter().collect();
        let mut whole = vec![0u8; slot as usize];
        while let (Some(&h), Some((&last_off, &last_i))) = (holes.first(), used.last_key_value()) {
            if h >= last_off {
                break;
            }
            read_exact(s, &mut whole, last_off, "VHD data block")?;
            write_sparse(s, &whole, h)?;
            flush_storage(s)?;
            {
                let mut m = self.mw();
                // A torn entry would point nowhere: the old one goes back; the old copy of the
                // block is still intact.
                let (new, old) = ((h / SECTOR) as u32, (last_off / SECTOR) as u32);
                self.write_bat_entry(&m.bat, last_i, new, old)?;
                m.bat.set(last_i, new, old);
            }
            flush_storage(s)?;
            holes.remove(&h);
            used.remove(&last_off);
            used.insert(h, last_i);
            st.blocks_moved += 1;
        }
        // 3. Trim: footer at the new end first, then truncate.
        let end = used
            .last_key_value()
            .map_or(meta_end, |(&off, _)| off + slot)
            .max(meta_end);
        let mut m = self.mw();
        if end < m.footer_pos {
            write_all(s, &m.footer.to_bytes(), end, "VHD footer")?;
            flush_storage(s)?;
            s.set_len(end + FOOTER_SIZE as u64)
                .map_err(|e| io_err("truncating VHD file", e))?;
            flush_storage(s)?;
            m.footer_pos = end;
            m.file_len = end + FOOTER_SIZE as u64;
        }
        drop(m);
        // 4. Freed slots still below the end (durable now that their BAT entries are) go back
        // to the file system, so compacting never leaves more bytes allocated than before.
        for h in holes {
            if h + slot <= end {
                s.punch_hole(h, slot)
                    .map_err(|e| io_err("releasing a freed VHD block", e))?;
            }
        }
        flush_storage(s)?;
        st.file_size_after = s.len().map_err(|e| io_err("reading file length", e))?;
        Ok(st)
    }
}

/// Writes a moved block into a free slot without allocating its zero runs: the slot is punched
/// first (so skipped runs read zeros), then only non-zero 4 KiB pieces are written. Compaction
/// uses it so moving a block never fills the holes it had.
fn write_sparse(s: &dyn Storage, buf: &[u8], off: u64) -> Result<()> {
    s.punch_hole(off, buf.len() as u64)
        .map_err(|e| io_err("clearing a VHD block slot", e))?;
    const PIECE: usize = 4096;
    let mut i = 0;
    while i < buf.len() {
        let start = i;
        while i < buf.len() && !disk::is_zero(&buf[i..(i + PIECE).min(buf.len())]) {
            i = (i + PIECE).min(buf.len());
        }
        if i > start {
            write_all(s, &buf[start..i], off + start as u64, "VHD data block")?;
        }
        while i < buf.len() && disk::is_zero(&buf[i..(i + PIECE).min(buf.len())]) {
            i = (i + PIECE).min(buf.len());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::MemStorage;

    #[test]
    fn sparse_write_skips_zero_pieces() {
        let s = MemStorage::new();
        s.write_at(&[0xAA; 3 * 4096], 0).unwrap();
        let mut b = vec![0u8; 3 * 4096];
        b[4096 * 2 + 5] = 7;
        write_sparse(&s, &b, 0).unwrap();
        let mut back = vec![1u8; 3 * 4096];
        s.read_at(&mut back, 0).unwrap();
        assert_eq!(back, b);
    }
}

//! Growing a disk: the footer moves (fixed), or the BAT grows in place or moves to the end
//! (dynamic/differencing), and the footers take the new size last.

use disk::{BlockDevice, Error, Result};

use crate::bat::ENTRY_SIZE;
use crate::dynamic_header::DynHeader;
use crate::footer::{Footer, FOOTER_SIZE};
use crate::geometry::{chs_for_sectors, round_to_chs};
use crate::io::{flush_storage, io_err, read_exact, write_all};
use crate::limits::*;
use crate::{DiskType, VhdDisk};

impl VhdDisk {
    /// Grows the disk. Fixed: the footer moves to the new end. Dynamic/differencing: the BAT
    /// grows in place when there is room before the first block, else it is relocated to the
    /// end of the file. Shrinking is refused.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let _g = self.wl();
        self.usable()?;
        let cur = self.size();
        let rule_chs = self.m().rule == "chs";
        let mut new_size = new_size.div_ceil(SECTOR) * SECTOR;
        if rule_chs {
            new_size = round_to_chs(new_size).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{new_size} bytes cannot be represented in CHS geometry (this image's size rule)"
                ))
            })?;
        }
        if new_size < cur {
            return Err(Error::InvalidArgument(format!(
                "shrinking a VHD ({cur} -> {new_size} bytes) is not supported: it would drop data"
            )));
        }
        if new_size == cur {
            return Ok(());
        }
        if self.kind == DiskType::Fixed {
            return self.resize_fixed(new_size);
        }
        if new_size > MAX_DYNAMIC_SIZE {
            return Err(Error::InvalidArgument(
                "dynamic VHD limit is 2040 GiB".into(),
            ));
        }
        self.grow_table(new_size)?;
        // The size lives in the footers: memory takes it only once they are written (until
        // then writes past the old size are refused and allocations write the old footer).
        let mut footer = self.m().footer.clone();
        footer.current_size = new_size;
        footer.geometry = chs_for_sectors(new_size / SECTOR);
        self.write_footers(&footer, self.m().footer_pos)?;
        let mut m = self.mw();
        m.footer = footer;
        m.size = new_size;
        Ok(())
    }

    fn resize_fixed(&self, new_size: u64) -> Result<()> {
        if new_size > MAX_FIXED_SIZE {
            return Err(Error::InvalidArgument("fixed VHD limit is 32 TiB".into()));
        }
        let s = &*self.storage;
        let mut m = self.mw();
        let old_pos = m.footer_pos;
        // Memory changes only once the file has the new footer.
        let mut footer = m.footer.clone();
        footer.current_size = new_size;
        footer.geometry = chs_for_sectors(new_size / SECTOR);
        // New footer first (the file then ends in a valid footer), then zero the old one,
        // which is now inside the data area.
        write_all(s, &footer.to_bytes(), new_size, "VHD footer")?;
        flush_storage(s)?;
        disk::write_zeros(s, old_pos, FOOTER_SIZE as u64)
            .map_err(|e| io_err("zeroing old footer", e))?;
        flush_storage(s)?;
        m.footer = footer;
        m.footer_pos = new_size;
        m.file_len = new_size + FOOTER_SIZE as u64;
        m.size = new_size;
        Ok(())
    }

    /// Makes the BAT cover `new_size`: the new entries (or the whole relocated table) are
    /// written first, then the header that makes them count.
    fn grow_table(&self, new_size: u64) -> Result<()> {
        let s = &*self.storage;
        let (mut h, hoff, bs, old_entries, old_off) = {
            let m = self.m();
            let h = m
                .header
                .clone()
                .ok_or_else(|| Error::corrupt("VHD dynamic header", 0, "missing"))?;
            (
                h,
                m.header_offset,
                m.block_size as u64,
                m.bat.len(),
                m.bat.offset(),
            )
        };
        let needed = new_size.div_ceil(bs);
        if needed > MAX_BAT_ENTRIES {
            return Err(Error::InvalidArgument(format!(
                "{new_size} bytes in {bs}-byte blocks needs more than {MAX_BAT_ENTRIES} BAT entries"
            )));
        }
        if needed <= old_entries {
            return Ok(());
        }
        let table_bytes = (needed * ENTRY_SIZE).div_ceil(SECTOR) * SECTOR;
        // Room in place: up to the first block or locator after the BAT.
        let limit = {
            let m = self.m();
            let mut lim = m.footer_pos;
            m.bat.for_each_allocated(s, |_, e| {
                lim = lim.min(e as u64 * SECTOR);
                Ok(())
            })?;
            for l in &m.locators {
                if l.data_offset >= old_off {
                    lim = lim.min(l.data_offset);
                }
            }
            if m.header_offset >= old_off {
                lim = lim.min(m.header_offset);
            }
            lim
        };
        let new_off = if old_off + table_bytes <= limit {
            old_off
        } else {
            self.append_space(table_bytes)?
        };
        let kept = if new_off == old_off { old_entries } else { 0 };
        // Copy the old entries (relocation), then all ones up to the padded end, in bounded
        // pieces.
        const PIECE: u64 = 1 << 20;
        let mut buf = vec![0u8; PIECE.min(table_bytes) as usize];
        let mut at = kept * ENTRY_SIZE;
        while at < table_bytes {
            let n = (table_bytes - at).min(PIECE);
            let piece = &mut buf[..n as usize];
            let old_bytes = (old_entries * ENTRY_SIZE).saturating_sub(at).min(n);
            read_exact(s, &mut piece[..old_bytes as usize], old_off + at, "VHD BAT")?;
            piece[old_bytes as usize..].fill(0xFF);
            write_all(s, piece, new_off + at, "VHD BAT")?;
            at += n;
        }
        flush_storage(s)?;
        h.table_offset = new_off;
        h.max_table_entries = (table_bytes / ENTRY_SIZE) as u32;
        self.write_header(&h, hoff)?;
        let mut m = self.mw();
        m.bat.grow(new_off, needed);
        m.header = Some(h);
        Ok(())
    }

    /// Writes the trailing footer at `footer_pos` and (dynamic) the copy at offset 0.
    pub(crate) fn write_footers(&self, footer: &Footer, footer_pos: u64) -> Result<()> {
        let b = footer.to_bytes();
        let s = &*self.storage;
        write_all(s, &b, footer_pos, "VHD footer")?;
        if self.kind.is_sparse() {
            flush_storage(s)?;
            write_all(s, &b, 0, "VHD footer copy")?;
        }
        flush_storage(s)
    }

    pub(crate) fn write_header(&self, h: &DynHeader, hoff: u64) -> Result<()> {
        write_all(&*self.storage, &h.to_bytes(), hoff, "VHD dynamic header")?;
        flush_storage(&*self.storage)
    }
}

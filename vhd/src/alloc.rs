//! Growing the file: a new block at the end (with the crash ordering that keeps every BAT entry
//! pointing at written space), BAT entry writes, and raw space for relocated metadata.

use disk::{Error, Result};

use crate::bat::{Bat, UNALLOCATED};
use crate::bitmap::SectorBitmap;
use crate::footer::FOOTER_SIZE;
use crate::io::{flush_storage, io_err, write_all};
use crate::limits::SECTOR;
use crate::{DiskType, VhdDisk};

/// Where a new block's bitmap goes when the first free byte is `free`: the Windows layout, with
/// the bitmap just below a 4 KiB boundary so that the payload is 4 KiB aligned.
pub fn block_position(free: u64, bitmap: u64) -> u64 {
    (free + bitmap).div_ceil(4096) * 4096 - bitmap
}

impl VhdDisk {
    /// Writes BAT entry `i` of `bat` (value `new`, was `old`) to the file; if that fails, puts `old`
    /// back. Should the repair fail as well, the entry on disk is unknown (maybe torn, maybe
    /// new) and the handle stops: a later allocation reusing the place would give two entries
    /// one block.
    pub(crate) fn write_bat_entry(&self, bat: &Bat, i: u64, new: u32, old: u32) -> Result<()> {
        let s = &*self.storage;
        let at = bat.entry_offset(i);
        if let Err(e) = write_all(s, &new.to_be_bytes(), at, "VHD BAT entry") {
            if let Err(e2) = s.write_at(&old.to_be_bytes(), at) {
                self.failed.set(format!(
                    "BAT entry at offset {at} could not be written ({e}) nor restored ({e2})"
                ));
                // Reads go on seeing what memory had, not whatever the file now holds.
                bat.pin(i, old);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Allocates block `blk` and writes `data` at in-block offset `inb` (sector aligned for
    /// differencing disks).
    ///
    /// Crash ordering (FaultyStorage keeps any subset of unflushed writes, so only flushes
    /// order anything):
    /// 1. write a footer copy at the new EOF (after the new block) and flush: from now on the
    ///    file ends in a valid footer whatever happens; the old trailing footer becomes a dead
    ///    sector that the new block's bitmap may overwrite;
    /// 2. write the bitmap and the payload, flush: the block is durable but unreferenced
    ///    (a crash here leaks it, nothing else);
    /// 3. write the 4-byte BAT entry (durable at the caller's next flush).
    ///
    /// No crash point can leave a BAT entry pointing at unwritten space or a file without a
    /// footer at its end; the worst outcome is a leaked block, which `check -r leaks` trims.
    pub(crate) fn allocate(&self, blk: u64, inb: u64, data: &[u8]) -> Result<()> {
        let (footer, footer_pos, bitmap, bs, lsb) = {
            let m = self.m();
            if m.header.is_none() {
                return Err(Error::corrupt(
                    "VHD dynamic header",
                    0,
                    "missing on a dynamic disk",
                ));
            }
            (
                m.footer.clone(),
                m.footer_pos,
                m.bitmap,
                m.block_size as u64,
                m.bitmap_lsb,
            )
        };
        let pos = block_position(footer_pos, bitmap);
        let sector = pos / SECTOR;
        if sector >= UNALLOCATED as u64 {
            return Err(Error::Unsupported(
                "VHD file too large: block offset does not fit the 32-bit BAT".into(),
            ));
        }
        let end = pos + bitmap + bs;
        let s = &*self.storage;
        let cur_len = s.len().map_err(|e| io_err("reading VHD file length", e))?;
        if let Err(e) =
            write_all(s, &footer.to_bytes(), end, "VHD footer").and_then(|_| flush_storage(s))
        {
            // A failed or short footer write must not leave a torn footer at EOF: cut it off
            // again (best effort; the old footer is still intact).
            let _ = s.set_len(cur_len);
            return Err(e);
        }
        // Space past the old footer is normally fresh (zeros); if an earlier failed attempt
        // left bytes there, zero the payload so unwritten sectors read as zeros.
        if cur_len > footer_pos + FOOTER_SIZE as u64 {
            disk::write_zeros(s, pos + bitmap, bs).map_err(|e| io_err("zeroing new block", e))?;
        }
        let bm = if self.kind == DiskType::Differencing {
            let mut bm = SectorBitmap::clear(bitmap, lsb);
            bm.set(inb / SECTOR, (inb + data.len() as u64) / SECTOR);
            bm
        } else {
            SectorBitmap::full(bitmap)
        };
        write_all(s, bm.bytes(), pos, "VHD sector bitmap")?;
        write_all(s, data, pos + bitmap + inb, "VHD data block")?;
        flush_storage(s)?;
        // A short write may have torn the entry: the old value goes back, so the block is
        // merely leaked (and reused by the next allocation). Memory changes only on success.
        self.write_bat_entry(&self.m().bat, blk, sector as u32, UNALLOCATED)?;
        let mut m = self.mw();
        m.bat.set(blk, sector as u32, UNALLOCATED);
        m.footer_pos = end;
        m.file_len = m.file_len.max(end + FOOTER_SIZE as u64);
        Ok(())
    }

    /// Appends `len` bytes of space at the end (before the trailing footer, which moves after
    /// it, written and flushed first). Returns the offset of the new space.
    pub(crate) fn append_space(&self, len: u64) -> Result<u64> {
        let mut m = self.mw();
        let pos = m.footer_pos.div_ceil(SECTOR) * SECTOR;
        let end = pos + len.div_ceil(SECTOR) * SECTOR;
        write_all(&*self.storage, &m.footer.to_bytes(), end, "VHD footer")?;
        flush_storage(&*self.storage)?;
        m.footer_pos = end;
        m.file_len = m.file_len.max(end + FOOTER_SIZE as u64);
        Ok(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        assert_eq!(block_position(1536 + 512, 512), 3584);
        assert_eq!(block_position(3584, 512), 3584);
        assert_eq!(block_position(4096, 512), 7680);
    }
}

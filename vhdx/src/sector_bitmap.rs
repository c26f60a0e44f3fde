//! Sector bitmaps of differencing images: one bit per logical sector, set when the child holds
//! the sector (clear: read the parent). A 1 MiB bitmap block covers one chunk of payload blocks
//! (docs/vhdx.md, "Sector bitmap"). Pages are cached by file offset and logged when dirty.

use super::*;

/// The bit, within its chunk's bitmap block, of the first sector of payload block `b`.
fn first_bit(geo: &Geometry, b: u64) -> u64 {
    (b % geo.chunk_ratio) * geo.sectors_per_block()
}

/// Where bit `bit` of a bitmap block is: the page's offset in the block and the byte in the
/// page (bit `bit % 8` of that byte, least significant first).
fn bit_place(bit: u64) -> (u64, usize) {
    ((bit / 8) / PAGE * PAGE, ((bit / 8) % PAGE) as usize)
}

#[derive(Debug, Default)]
pub(crate) struct Bitmaps {
    /// Page images of sector-bitmap blocks, by file offset.
    pub pages: HashMap<u64, Box<[u8]>>,
    pub dirty: BTreeSet<u64>,
}

impl VhdxDisk {
    /// The bitmap page (4 KiB) at file offset `po`, loaded on demand.
    pub(crate) fn bitmap_page<'a>(
        &self,
        bm: &'a mut Bitmaps,
        po: u64,
    ) -> Result<&'a mut Box<[u8]>> {
        if let std::collections::hash_map::Entry::Vacant(e) = bm.pages.entry(po) {
            let mut p = vec![0u8; PAGE as usize].into_boxed_slice();
            self.read_file(&mut p, po)?;
            e.insert(p);
        }
        Ok(bm.pages.get_mut(&po).expect("inserted above"))
    }

    /// For block `b` of a differencing disk: starting at sector `s` (within the block), whether
    /// it is present and how many following sectors (up to `max`) share that.
    pub(crate) fn bitmap_run(&self, bat: &Bat, b: u64, s: u64, max: u64) -> Result<(bool, u64)> {
        let geo = &bat.geo;
        let chunk = b / geo.chunk_ratio;
        let sbe = bat.get(geo.bitmap_index(chunk))?;
        if bat_state(sbe) != SB_PRESENT {
            return Ok((false, max));
        }
        let bit0 = first_bit(geo, b) + s;
        let mut bm = lock(&self.bitmaps);
        let mut n = 0u64;
        let mut first = None;
        while n < max {
            let bit = bit0 + n;
            let (page_at, byte_in_page) = bit_place(bit);
            let page = self.bitmap_page(&mut bm, bat_offset(sbe) + page_at)?;
            // Whole bytes at a time when aligned.
            let v = (page[byte_in_page] >> (bit % 8)) & 1 == 1;
            match first {
                None => first = Some(v),
                Some(f) if f != v => break,
                _ => {}
            }
            if bit.is_multiple_of(8) && n + 8 <= max {
                let byte = page[byte_in_page];
                if (v && byte == 0xff) || (!v && byte == 0) {
                    n += 8;
                    continue;
                }
            }
            n += 1;
        }
        Ok((first.unwrap_or(false), n.max(1).min(max)))
    }

    /// Sets bitmap bits for sectors `s..s+n` of block `b` (caller holds the WAL lock and bat).
    /// With `fresh` the block's other bits are cleared first: a block just allocated must not
    /// inherit bits left by an earlier allocation that a crash undid.
    pub(crate) fn set_bits(
        &self,
        wal: &mut Wal,
        bat: &mut Bat,
        b: u64,
        s: u64,
        n: u64,
        fresh: bool,
    ) -> Result<()> {
        let geo = bat.geo;
        let chunk = b / geo.chunk_ratio;
        let sbi = geo.bitmap_index(chunk);
        if bat_state(bat.get(sbi)?) != SB_PRESENT {
            let off = self.allocate(wal, bat, MIB)?;
            self.set_entry(bat, sbi, bat_entry(SB_PRESENT, off))?;
        }
        let sb = bat_offset(bat.get(sbi)?);
        let spb = geo.sectors_per_block();
        let mut bm = lock(&self.bitmaps);
        if fresh {
            // Sectors per block is a multiple of 8 (block >= 1 MiB, sector <= 4 KiB).
            let first = first_bit(&geo, b) / 8;
            let last = first + spb / 8;
            let mut byte = first;
            while byte < last {
                let po = sb + byte / PAGE * PAGE;
                let page = self.bitmap_page(&mut bm, po)?;
                let from = (byte % PAGE) as usize;
                let to = (PAGE as usize).min(from + (last - byte) as usize);
                if page[from..to].iter().any(|&x| x != 0) {
                    page[from..to].fill(0);
                    bm.dirty.insert(po);
                }
                byte += (to - from) as u64;
            }
        }
        let bit0 = first_bit(&geo, b) + s;
        let mut bit = bit0;
        while bit < bit0 + n {
            let (page_at, byte) = bit_place(bit);
            let po = sb + page_at;
            let page = self.bitmap_page(&mut bm, po)?;
            if bit.is_multiple_of(8) && bit + 8 <= bit0 + n {
                page[byte] = 0xff;
                bit += 8;
            } else {
                page[byte] |= 1 << (bit % 8);
                bit += 1;
            }
            bm.dirty.insert(po);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_bits_are_placed_by_chunk_and_block() {
        // 1 MiB blocks, 512-byte sectors: 2048 sectors per block, 4096 blocks per chunk, so a
        // chunk's bitmap is exactly 2^23 bits (1 MiB).
        let g = Geometry::new(16 << 30, 1 << 20, 512, true);
        assert_eq!(first_bit(&g, 0), 0);
        assert_eq!(first_bit(&g, 1), 2048);
        assert_eq!(first_bit(&g, 4095), 4095 * 2048);
        assert_eq!(first_bit(&g, 4095) + 2048, 1 << 23);
        // The next chunk has its own bitmap block: block 4096 starts at bit 0 again.
        assert_eq!(first_bit(&g, 4096), 0);
        assert_eq!(bit_place(0), (0, 0));
        assert_eq!(bit_place(7), (0, 0));
        assert_eq!(bit_place(8), (0, 1));
        // Block 16's first sector: bit 32768, byte 4096, the second page.
        assert_eq!(bit_place(first_bit(&g, 16)), (4096, 0));
        assert_eq!(bit_place((1 << 23) - 1), ((1 << 20) - 4096, 4095));
    }
}

//! Geometry derived from the metadata: chunk ratio, block counts and BAT indexes (docs/vhdx.md,
//! "BAT": payload entries of a chunk are followed by that chunk's sector-bitmap entry).

/// Geometry derived from the metadata.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub block_size: u64,
    pub logical_sector: u64,
    pub chunk_ratio: u64,
    pub data_blocks: u64,
    pub bitmap_blocks: u64,
    pub bat_entries: u64,
}

impl Geometry {
    pub fn new(size: u64, block_size: u32, logical_sector: u32, differencing: bool) -> Geometry {
        let bs = block_size as u64;
        // A sector-bitmap block (1 MiB, 2^23 bits) covers 2^23 sectors.
        let chunk_ratio = ((1u64 << 23) * logical_sector as u64) / bs;
        let data_blocks = size.div_ceil(bs);
        let bitmap_blocks = data_blocks.div_ceil(chunk_ratio);
        let bat_entries = if differencing {
            bitmap_blocks * (chunk_ratio + 1)
        } else if data_blocks == 0 {
            0
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        Geometry {
            block_size: bs,
            logical_sector: logical_sector as u64,
            chunk_ratio,
            data_blocks,
            bitmap_blocks,
            bat_entries,
        }
    }

    /// BAT index of payload block `b`.
    pub fn payload_index(&self, b: u64) -> usize {
        (b + b / self.chunk_ratio) as usize
    }

    /// BAT index of the sector-bitmap entry for chunk `c`.
    pub fn bitmap_index(&self, c: u64) -> usize {
        (c * (self.chunk_ratio + 1) + self.chunk_ratio) as usize
    }

    /// Whether BAT index `i` holds a sector-bitmap entry.
    pub fn is_bitmap_index(&self, i: usize) -> bool {
        (i as u64 % (self.chunk_ratio + 1)) == self.chunk_ratio
    }

    /// Sectors per block.
    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.logical_sector
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ratio_examples() {
        assert_eq!(
            Geometry::new(1 << 30, 1 << 20, 512, false).chunk_ratio,
            4096
        );
        assert_eq!(
            Geometry::new(1 << 30, 256 << 20, 512, false).chunk_ratio,
            16
        );
        assert_eq!(
            Geometry::new(1 << 30, 1 << 20, 4096, false).chunk_ratio,
            32768
        );
    }

    #[test]
    fn indexes_interleave_bitmap_entries() {
        // 1 MiB blocks, 512-byte sectors: 4096 payload entries, then one bitmap entry.
        let g = Geometry::new(8 << 30, 1 << 20, 512, true);
        assert_eq!(g.data_blocks, 8192);
        assert_eq!(g.bitmap_blocks, 2);
        assert_eq!(g.bat_entries, 2 * 4097);
        assert_eq!(g.payload_index(4095), 4095);
        assert_eq!(g.bitmap_index(0), 4096);
        assert_eq!(g.payload_index(4096), 4097);
        assert!(g.is_bitmap_index(4096) && !g.is_bitmap_index(4097));
        assert_eq!(g.sectors_per_block(), 2048);
        // Without a parent the table stops after the last payload entry.
        let base = Geometry::new(8 << 30, 1 << 20, 512, false);
        assert_eq!(base.bat_entries, 8192 + 1);
    }
}

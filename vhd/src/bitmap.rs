//! Sector bitmaps: the whole sectors in front of each data block with one bit per sector of the
//! block. A differencing disk reads a clear bit's sector from its parent; a dynamic disk sets
//! them all (docs/vhd.md, "Blocks and sector bitmaps").

use disk::{Result, Storage};

use crate::io::read_exact;
use crate::limits::SECTOR;

/// Bytes of the sector bitmap in front of each block (padded to whole sectors).
pub fn bitmap_bytes(block_size: u32) -> u64 {
    (block_size as u64 / SECTOR).div_ceil(8).div_ceil(SECTOR) * SECTOR
}

/// The bit of `sector` within its bitmap byte: MSB-first per the specification; LSB-first for
/// images from blktap `tap` version 0x00000001, which wrote them that way.
fn bit_mask(sector: u64, lsb: bool) -> u8 {
    if lsb {
        1 << (sector % 8)
    } else {
        0x80 >> (sector % 8)
    }
}

/// The part of one block's sector bitmap that covers an in-block byte range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectorBitmap {
    /// Index of the first bitmap byte held (sector `first * 8` is its first bit).
    first: u64,
    bytes: Vec<u8>,
    lsb: bool,
}

impl SectorBitmap {
    /// An all-clear bitmap of a whole block (`len` bytes).
    pub fn clear(len: u64, lsb: bool) -> SectorBitmap {
        SectorBitmap {
            first: 0,
            bytes: vec![0; len as usize],
            lsb,
        }
    }

    /// An all-set bitmap of a whole block (`len` bytes): a dynamic disk's.
    pub fn full(len: u64) -> SectorBitmap {
        SectorBitmap {
            first: 0,
            bytes: vec![0xFF; len as usize],
            lsb: false,
        }
    }

    /// Reads the bitmap bytes covering in-block bytes `lo..hi` of the block whose bitmap starts
    /// at file offset `at`.
    pub fn read(s: &dyn Storage, at: u64, lo: u64, hi: u64, lsb: bool) -> Result<SectorBitmap> {
        let first = lo / SECTOR / 8;
        let last = (hi - 1) / SECTOR / 8;
        let mut bytes = vec![0u8; (last - first + 1) as usize];
        read_exact(s, &mut bytes, at + first, "VHD sector bitmap")?;
        Ok(SectorBitmap { first, bytes, lsb })
    }

    /// Offset of the held bytes within the block's bitmap.
    pub fn byte_offset(&self) -> u64 {
        self.first
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether in-block sector `sector` is present in this file (false outside the held part).
    pub fn present(&self, sector: u64) -> bool {
        (sector / 8)
            .checked_sub(self.first)
            .and_then(|i| self.bytes.get(i as usize))
            .is_some_and(|b| b & bit_mask(sector, self.lsb) != 0)
    }

    /// Marks in-block sectors `from..to` present (bits outside the held part are ignored).
    pub fn set(&mut self, from: u64, to: u64) {
        for s in from..to {
            if let Some(i) = (s / 8).checked_sub(self.first) {
                if let Some(b) = self.bytes.get_mut(i as usize) {
                    *b |= bit_mask(s, self.lsb);
                }
            }
        }
    }

    /// The end (exclusive, at most `end`) of the run of sectors that share the presence of the
    /// sector holding in-block byte `p`.
    pub fn run_end(&self, p: u64, end: u64) -> u64 {
        let present = self.present(p / SECTOR);
        let mut q = (p / SECTOR + 1) * SECTOR;
        while q < end && self.present(q / SECTOR) == present {
            q += SECTOR;
        }
        q.min(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_orders() {
        let mut b = SectorBitmap::clear(512, false);
        b.set(0, 1);
        b.set(9, 10);
        assert_eq!(&b.bytes()[..2], &[0x80, 0x40]);
        let mut l = SectorBitmap::clear(512, true);
        l.set(0, 1);
        l.set(9, 10);
        assert_eq!(&l.bytes()[..2], &[0x01, 0x02]);
        assert!(l.present(9) && !l.present(8));
    }

    #[test]
    fn runs() {
        let mut b = SectorBitmap::clear(512, false);
        b.set(2, 5);
        assert_eq!(b.run_end(0, 8 * SECTOR), 2 * SECTOR);
        assert_eq!(b.run_end(2 * SECTOR + 7, 8 * SECTOR), 5 * SECTOR);
        assert_eq!(b.run_end(5 * SECTOR, 6 * SECTOR + 1), 6 * SECTOR + 1);
    }

    #[test]
    fn sizes() {
        assert_eq!(bitmap_bytes(2 << 20), 512);
        assert_eq!(bitmap_bytes(512), 512);
        assert_eq!(bitmap_bytes(4 << 20), 1024);
    }
}

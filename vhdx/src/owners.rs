//! Which MiB of the file belong to a block this session uses: one bit per MiB, kept in 4 KiB
//! chunks (32 GiB of file each) created on first use, so memory follows the file space the
//! table really points at (8 MiB for a 64 TiB file whose every MiB is a block, nothing for an
//! empty image).
//!
//! Blocks and sector bitmaps start on MiB boundaries and are whole MiBs long, so the bits are
//! exact. Every entry marks its block the first time its page is read in a session, and every
//! allocation marks the space it takes: an entry whose block is already marked would alias
//! another entry's data (or a block we allocated), so the table refuses it.

use std::collections::HashMap;

const MIB: u64 = 1 << 20;
/// Words per chunk: 4 KiB, 32,768 MiB of file.
const WORDS: usize = 512;
const BITS: u64 = WORDS as u64 * 64;

#[derive(Default)]
pub(crate) struct Owners {
    chunks: HashMap<u64, Box<[u64; WORDS]>>,
}

/// The MiBs `off..off+len` covers (offsets are MiB-aligned; a length is rounded up).
fn mibs(off: u64, len: u64) -> std::ops::Range<u64> {
    off / MIB..off.saturating_add(len).div_ceil(MIB)
}

impl Owners {
    fn bit(&self, m: u64) -> bool {
        self.chunks
            .get(&(m / BITS))
            .is_some_and(|c| c[((m % BITS) / 64) as usize] & (1 << (m % 64)) != 0)
    }

    /// Whether any MiB of `off..off+len` is marked.
    pub fn any(&self, off: u64, len: u64) -> bool {
        let r = mibs(off, len);
        let mut m = r.start;
        while m < r.end {
            if !self.chunks.contains_key(&(m / BITS)) {
                // A whole chunk unmarked: skip it.
                m = (m / BITS + 1) * BITS;
                continue;
            }
            if self.bit(m) {
                return true;
            }
            m += 1;
        }
        false
    }

    /// Marks `off..off+len`.
    pub fn mark(&mut self, off: u64, len: u64) {
        for m in mibs(off, len) {
            let c = self
                .chunks
                .entry(m / BITS)
                .or_insert_with(|| Box::new([0; WORDS]));
            c[((m % BITS) / 64) as usize] |= 1 << (m % 64);
        }
    }

    /// Bytes of bits held (tests).
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.chunks.len() * WORDS * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_exact_to_the_mib_and_sparse() {
        let mut o = Owners::default();
        assert!(!o.any(0, 64 << 40));
        o.mark(5 * MIB, 4 * MIB);
        assert!(o.any(8 * MIB, MIB));
        assert!(!o.any(9 * MIB, MIB));
        assert!(!o.any(MIB, 4 * MIB));
        assert!(o.any(MIB, 5 * MIB));
        // Far apart: one chunk each.
        o.mark(60 << 40, 32 * MIB);
        assert!(o.any((60 << 40) + 31 * MIB, MIB));
        assert!(!o.any((60 << 40) + 32 * MIB, 1 << 40));
        assert_eq!(o.bytes(), 2 * 4096);
    }
}

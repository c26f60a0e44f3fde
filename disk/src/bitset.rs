//! A growable set of small integers, one bit each (BAT pages seen, MiB of file owned).
//!
//! The words are allocated zeroed and grown by a fresh zeroed allocation, so the pages of it no
//! bit was ever set in are never touched and cost no memory: a set whose highest member is far
//! out but whose members are few stays small in resident memory. Callers bound the highest
//! member by what the file justifies.

use std::ops::Range;

#[derive(Debug, Default)]
pub struct BitSet {
    words: Vec<u64>,
}

impl BitSet {
    pub fn contains(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Whether any member lies in `r`.
    pub fn any_in(&self, r: Range<u64>) -> bool {
        let end = r.end.min(self.words.len() as u64 * 64);
        (r.start..end).any(|i| self.contains(i))
    }

    pub fn insert(&mut self, i: u64) {
        self.insert_range(i..i + 1);
    }

    pub fn insert_range(&mut self, r: Range<u64>) {
        let need = r.end.div_ceil(64) as usize;
        if need > self.words.len() {
            // At least twice as long, so growing costs amortised O(1) per word.
            let mut grown = vec![0u64; need.max(self.words.len() * 2)];
            grown[..self.words.len()].copy_from_slice(&self.words);
            self.words = grown;
        }
        for i in r {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Bytes allocated for the bits (resident only where bits were set).
    pub fn allocated_bytes(&self) -> usize {
        self.words.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_ranges_and_growth() {
        let mut s = BitSet::default();
        assert!(!s.contains(0) && !s.any_in(0..u64::MAX));
        s.insert(5);
        s.insert_range(100..130);
        assert!(s.contains(5) && !s.contains(4) && !s.contains(6));
        assert!(s.any_in(129..200) && !s.any_in(130..200) && !s.any_in(6..100));
        s.insert(1 << 20);
        assert!(s.contains(1 << 20) && s.contains(129) && s.contains(5));
        assert_eq!(s.allocated_bytes(), ((1usize << 20) / 64 + 1) * 8);
    }
}

//! Which MiB of the file belong to a block this session uses: one bit per MiB in a
//! [`disk::BitSet`], as long as the highest MiB marked (8 MiB for a 64 TiB file; the file's
//! length at open bounds every entry, and allocation only grows the file). Pages of it never
//! marked cost no memory, so an empty image costs nothing, and a lookup is one index.
//!
//! Blocks and sector bitmaps start on MiB boundaries and are whole MiBs long, so the bits are
//! exact. Every entry marks its block the first time its page is read in a session, and every
//! allocation marks the space it takes: an entry whose block is already marked would alias
//! another entry's data (or a block we allocated), so the table refuses it.

const MIB: u64 = 1 << 20;

#[derive(Default)]
pub(crate) struct Owners {
    mibs: disk::BitSet,
}

/// The MiBs `off..off+len` covers (offsets are MiB-aligned; a length is rounded up).
fn mibs(off: u64, len: u64) -> std::ops::Range<u64> {
    off / MIB..off.saturating_add(len).div_ceil(MIB)
}

impl Owners {
    /// Whether any MiB of `off..off+len` is marked.
    pub fn any(&self, off: u64, len: u64) -> bool {
        self.mibs.any_in(mibs(off, len))
    }

    /// Marks `off..off+len`.
    pub fn mark(&mut self, off: u64, len: u64) {
        self.mibs.insert_range(mibs(off, len));
    }

    /// Bytes of bits held (tests).
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.mibs.allocated_bytes()
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
        // Far apart.
        o.mark(60 << 40, 32 * MIB);
        assert!(o.any((60 << 40) + 31 * MIB, MIB));
        assert!(!o.any((60 << 40) + 32 * MIB, 1 << 40));
        // As long as the highest mark: 60 TiB of file in MiB bits.
        assert_eq!(
            o.bytes(),
            (((60 << 40) / MIB + 32).div_ceil(64) * 8) as usize
        );
    }
}

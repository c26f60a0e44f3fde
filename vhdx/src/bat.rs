//! The block allocation table in memory, held by 4 KiB page (512 entries): only pages with an
//! entry other than zero are allocated, so memory follows what the image holds, not its virtual
//! size (an empty 64 TiB disk with 1 MiB blocks: a 1 MiB page index instead of a 512 MiB table).
//!
//! At open only the parts of the BAT region that hold data are read ([`Bat::load`] skips the
//! file's holes, and pages of zeros are not kept). Dirty pages are tracked for the log as
//! before: the flush asks for the dirty page numbers, their bytes ([`Bat::page_image`]), and
//! clears them once the log entry carrying them is durable. Nothing is ever evicted, so a dirty
//! page cannot be lost before it is durable.

use std::collections::BTreeSet;

use crate::geometry::Geometry;

/// Entries per 4 KiB BAT page.
pub(crate) const PER_PAGE: usize = 512;

/// A thin pointer, so an absent page costs 8 bytes of index.
type Page = Box<[u64; PER_PAGE]>;

#[derive(Debug)]
pub(crate) struct Bat {
    pub geo: Geometry,
    pub size: u64,
    /// BAT pages (by page number in the table) changed since the log entry that last carried them.
    pub dirty_pages: BTreeSet<u64>,
    len: usize,
    pages: Vec<Option<Page>>,
}

impl Bat {
    /// A table of `len` entries, all zero (not present).
    pub fn new(geo: Geometry, size: u64, len: usize) -> Bat {
        Bat {
            geo,
            size,
            dirty_pages: BTreeSet::new(),
            len,
            pages: std::iter::repeat_with(|| None)
                .take(len.div_ceil(PER_PAGE))
                .collect(),
        }
    }

    /// Reads a table of `len` entries. `read(buf, at)` fills `buf` from byte `at` of the BAT
    /// region; `hole(at, n)` says how many bytes from `at` (at most `n`) are known to read as
    /// zeros without reading them (0 when the bytes must be read).
    pub fn load<R, H>(
        geo: Geometry,
        size: u64,
        len: usize,
        mut read: R,
        mut hole: H,
    ) -> crate::Result<Bat>
    where
        R: FnMut(&mut [u8], u64) -> crate::Result<()>,
        H: FnMut(u64, u64) -> crate::Result<u64>,
    {
        const PIECE: u64 = 1 << 20;
        let mut bat = Bat::new(geo, size, len);
        let bytes = len as u64 * 8;
        let mut buf = vec![0u8; bytes.min(PIECE) as usize];
        let mut at = 0u64;
        while at < bytes {
            // Skip holes a page at a time: pages are the unit kept.
            let skip = hole(at, bytes - at)? / 4096 * 4096;
            if skip > 0 {
                at += skip;
                continue;
            }
            let n = (bytes - at).min(PIECE) as usize;
            let piece = &mut buf[..n];
            read(piece, at)?;
            for (k, chunk) in piece.chunks(4096).enumerate() {
                if disk::is_zero(chunk) {
                    continue;
                }
                let first = (at / 8) as usize + k * PER_PAGE;
                let page = bat.page_mut(first / PER_PAGE);
                for (j, e) in chunk.chunks_exact(8).enumerate() {
                    page[j] = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                }
            }
            at += n as u64;
        }
        Ok(bat)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Entry `i`. Panics past the end, like indexing a slice (callers index by geometry).
    pub fn get(&self, i: usize) -> u64 {
        assert!(i < self.len, "BAT index {i} out of {}", self.len);
        self.pages[i / PER_PAGE]
            .as_ref()
            .map_or(0, |p| p[i % PER_PAGE])
    }

    /// Stores entry `i` (dirty tracking is the caller's: see `VhdxDisk::set_entry`).
    pub fn put(&mut self, i: usize, v: u64) {
        assert!(i < self.len, "BAT index {i} out of {}", self.len);
        if v == 0 && self.pages[i / PER_PAGE].is_none() {
            return;
        }
        self.page_mut(i / PER_PAGE)[i % PER_PAGE] = v;
    }

    fn page_mut(&mut self, p: usize) -> &mut Page {
        self.pages[p].get_or_insert_with(|| Box::new([0u64; PER_PAGE]))
    }

    /// How many entries from `i` on are zero (absent pages are skipped whole).
    pub fn zero_run(&self, i: usize) -> usize {
        let mut j = i;
        while j < self.len {
            match &self.pages[j / PER_PAGE] {
                None => j = (j / PER_PAGE + 1) * PER_PAGE,
                Some(p) if p[j % PER_PAGE] == 0 => j += 1,
                Some(_) => break,
            }
        }
        j.min(self.len).saturating_sub(i)
    }

    /// The entries that are not zero, in index order.
    pub fn nonzero(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        let len = self.len;
        self.pages.iter().enumerate().flat_map(move |(p, page)| {
            page.iter().flat_map(move |page| {
                page.iter()
                    .enumerate()
                    .map(move |(k, &e)| (p * PER_PAGE + k, e))
                    .filter(move |&(i, e)| e != 0 && i < len)
            })
        })
    }

    /// The bytes of the entries on page `p` (4 KiB; bytes past the last entry are zero: the
    /// caller keeps what the file has there).
    pub fn page_image(&self, p: u64) -> Box<[u8]> {
        let mut img = vec![0u8; PER_PAGE * 8].into_boxed_slice();
        if let Some(Some(page)) = self.pages.get(p as usize) {
            let n = self.len.saturating_sub(p as usize * PER_PAGE).min(PER_PAGE);
            for (k, e) in page.iter().take(n).enumerate() {
                img[k * 8..k * 8 + 8].copy_from_slice(&e.to_le_bytes());
            }
        }
        img
    }

    /// Changes the number of entries; new ones are zero, dropped ones are forgotten.
    pub fn set_len(&mut self, len: usize) {
        if len < self.len {
            // Zero the dropped tail of the last kept page so a later extension reads zeros.
            if let Some(Some(page)) = self.pages.get_mut(len / PER_PAGE) {
                page[len % PER_PAGE..].fill(0);
            }
        }
        self.pages.resize_with(len.div_ceil(PER_PAGE), || None);
        self.len = len;
    }

    /// Pages held in memory.
    #[cfg(test)]
    pub fn resident_pages(&self) -> usize {
        self.pages.iter().filter(|p| p.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry::new(64 << 40, 1 << 20, 512, false)
    }

    #[test]
    fn sparse_table_reads_back_what_was_put() {
        let g = geo();
        let mut b = Bat::new(g, 64 << 40, g.bat_entries as usize);
        assert_eq!(b.resident_pages(), 0);
        b.put(5, 0); // zero into an absent page allocates nothing
        assert_eq!(b.resident_pages(), 0);
        b.put(1_000_000, 0x1234_0006);
        b.put(3, 7);
        assert_eq!(b.get(1_000_000), 0x1234_0006);
        assert_eq!(b.get(3), 7);
        assert_eq!(b.get(4), 0);
        assert_eq!(b.resident_pages(), 2);
        assert_eq!(b.zero_run(4), 1_000_000 - 4);
        assert_eq!(b.zero_run(1_000_001), b.len() - 1_000_001);
        assert_eq!(
            b.nonzero().collect::<Vec<_>>(),
            vec![(3, 7), (1_000_000, 0x1234_0006)]
        );
        let img = b.page_image(1_000_000 / 512);
        let k = 1_000_000 % 512;
        assert_eq!(&img[k * 8..k * 8 + 8], &0x1234_0006u64.to_le_bytes());
    }

    #[test]
    fn load_skips_holes_and_zero_pages() {
        let g = Geometry::new(4 << 30, 1 << 20, 512, false);
        let len = g.bat_entries as usize;
        let mut file = vec![0u8; len * 8];
        file[8 * 600..8 * 601].copy_from_slice(&0xabcd_0006u64.to_le_bytes());
        let mut reads = 0;
        let b = Bat::load(
            g,
            4 << 30,
            len,
            |buf, at| {
                reads += buf.len();
                buf.copy_from_slice(&file[at as usize..at as usize + buf.len()]);
                Ok(())
            },
            // The first page is a hole.
            |at, n| Ok(if at == 0 { 4096.min(n) } else { 0 }),
        )
        .unwrap();
        assert_eq!(b.get(600), 0xabcd_0006);
        assert_eq!(b.resident_pages(), 1);
        assert_eq!(reads, len * 8 - 4096);
    }

    #[test]
    fn shrinking_forgets_the_tail() {
        let g = geo();
        let mut b = Bat::new(g, 64 << 40, 1024);
        b.put(700, 9);
        b.set_len(600);
        b.set_len(1024);
        assert_eq!(b.get(700), 0);
    }
}

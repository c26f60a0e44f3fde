//! A copy-on-write overlay over any disk, kept in a scratch store that survives a crash.
//!
//! Used for undo mode on images whose format has no differencing child (raw): writes go to the
//! scratch store, a bitmap of 64 KiB granules says which granules live there, and the base is
//! never written.
//!
//! The scratch store is a small self-describing file (a "raw undo file"), so that an undo
//! session interrupted by a crash or a kill can still be committed or discarded:
//!
//! ```text
//! 0            header (4 KiB): magic, version, granule, virtual size, where the bitmap and
//!              the data start, and a label (the caller's name for the base: its path)
//! 4096         bitmap, one bit per granule, rounded up to 4 KiB
//! data_offset  granule data (1 MiB aligned); guest offset X lives at data_offset + X
//! ```
//!
//! Durability order, at every flush: (1) take a copy of the bitmap pages changed since the
//! last flush, (2) make the data durable, (3) write those bitmap pages, (4) make them durable.
//! A bit is therefore never durable before its granule's data, and bits only ever go from 0
//! to 1 during a session, so a torn bitmap write still names only complete granules. Writes
//! not yet flushed may be lost by a crash, like on any disk. A failed flush is sticky: every
//! later flush fails too (the kernel may have dropped the unwritten pages).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::{check_aligned, check_range, Allocation, BlockDevice, Error, Extent, Result, Storage};

const GRANULE: u64 = 64 * 1024;
const MAGIC: &[u8; 16] = b"viridian-rawundo";
const VERSION: u32 = 1;
const HEADER_SIZE: u64 = 4096;
const PAGE: u64 = 4096;
/// Longest label the header can hold.
pub const MAX_LABEL: usize = 3072;

/// What the header of a raw undo file says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayHeader {
    pub size: u64,
    pub label: Vec<u8>,
    bitmap_offset: u64,
    bitmap_len: u64,
    data_offset: u64,
}

impl OverlayHeader {
    fn new(size: u64, label: &[u8]) -> Self {
        let granules = size.div_ceil(GRANULE);
        let bitmap_len = granules.div_ceil(8).div_ceil(PAGE).max(1) * PAGE;
        let data_offset = (HEADER_SIZE + bitmap_len).div_ceil(1 << 20) * (1 << 20);
        OverlayHeader {
            size,
            label: label.to_vec(),
            bitmap_offset: HEADER_SIZE,
            bitmap_len,
            data_offset,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE as usize];
        b[0..16].copy_from_slice(MAGIC);
        b[16..20].copy_from_slice(&VERSION.to_le_bytes());
        b[20..24].copy_from_slice(&(GRANULE as u32).to_le_bytes());
        b[24..32].copy_from_slice(&self.size.to_le_bytes());
        b[32..40].copy_from_slice(&self.bitmap_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.bitmap_len.to_le_bytes());
        b[48..56].copy_from_slice(&self.data_offset.to_le_bytes());
        b[56..60].copy_from_slice(&(self.label.len() as u32).to_le_bytes());
        b[64..64 + self.label.len()].copy_from_slice(&self.label);
        b
    }

    /// Reads the header of a raw undo file; Ok(None) when the store is not one.
    pub fn read(scratch: &dyn Storage) -> Result<Option<OverlayHeader>> {
        let mut b = vec![0u8; HEADER_SIZE as usize];
        match scratch.read_at(&mut b, 0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(Error::io("cannot read the undo file header", e)),
        }
        if &b[0..16] != MAGIC {
            return Ok(None);
        }
        let corrupt = |d: String| Error::corrupt("raw undo file header", 0, d);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        if u32_at(16) != VERSION {
            return Err(Error::Unsupported(format!(
                "raw undo file version {}",
                u32_at(16)
            )));
        }
        if u32_at(20) as u64 != GRANULE {
            return Err(corrupt(format!("granule {} is not {GRANULE}", u32_at(20))));
        }
        let label_len = u32_at(56) as usize;
        if label_len > MAX_LABEL {
            return Err(corrupt(format!("label length {label_len}")));
        }
        let h = OverlayHeader::new(u64_at(24), &b[64..64 + label_len]);
        if (u64_at(32), u64_at(40), u64_at(48)) != (h.bitmap_offset, h.bitmap_len, h.data_offset) {
            return Err(corrupt(
                "bitmap or data offset does not match the size".into(),
            ));
        }
        Ok(Some(h))
    }
}

#[derive(Debug)]
struct Map {
    /// One bit per granule: set when the granule's bytes live in `scratch`.
    present: Vec<u64>,
    /// Bitmap pages changed since the last flush started.
    dirty_pages: std::collections::BTreeSet<u64>,
}

#[derive(Debug)]
pub struct CowOverlay {
    base: Arc<dyn BlockDevice>,
    scratch: Arc<dyn Storage>,
    header: OverlayHeader,
    map: RwLock<Map>,
    /// Serializes flushes (so bitmap pages are written in order).
    flushing: Mutex<()>,
    size: u64,
    /// A failed scratch flush may have lost overlay writes: later flushes fail too.
    flush_failed: crate::FailLatch,
}

impl CowOverlay {
    /// Starts a new raw undo file in the empty store `scratch` over `base`, `label` naming the
    /// base (its path), and makes the empty file durable.
    pub fn create(
        base: Arc<dyn BlockDevice>,
        scratch: Arc<dyn Storage>,
        label: &[u8],
    ) -> Result<Self> {
        if label.len() > MAX_LABEL {
            return Err(Error::InvalidArgument(format!(
                "the base's name is longer than {MAX_LABEL} bytes"
            )));
        }
        let size = base.size();
        let header = OverlayHeader::new(size, label);
        let io = |e| Error::io("cannot write the undo file header", e);
        scratch.set_len(header.data_offset).map_err(io)?;
        scratch.write_at(&header.to_bytes(), 0).map_err(io)?;
        scratch.flush().map_err(io)?;
        Ok(Self::with_map(
            base,
            scratch,
            header,
            vec![0; Self::words(size)],
        ))
    }

    /// Reopens a raw undo file over `base` (after a crash): the durable bitmap says what it holds.
    pub fn open(base: Arc<dyn BlockDevice>, scratch: Arc<dyn Storage>) -> Result<Self> {
        let header = OverlayHeader::read(&*scratch)?.ok_or_else(|| Error::WrongFormat {
            format: "raw undo",
            detail: "no raw undo file signature".into(),
        })?;
        if header.size != base.size() {
            return Err(Error::InvalidArgument(format!(
                "the undo file covers {} bytes but its base has {}",
                header.size,
                base.size()
            )));
        }
        let present = Self::read_bitmap(&*scratch, &header)?;
        Ok(Self::with_map(base, scratch, header, present))
    }

    fn words(size: u64) -> usize {
        size.div_ceil(GRANULE).div_ceil(64) as usize
    }

    fn read_bitmap(scratch: &dyn Storage, h: &OverlayHeader) -> Result<Vec<u64>> {
        let words = Self::words(h.size);
        let mut raw = vec![0u8; words * 8];
        scratch
            .read_at(&mut raw, h.bitmap_offset)
            .map_err(|e| Error::io("cannot read the undo file bitmap", e))?;
        let mut present: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // Bits past the last granule mean nothing; clear them.
        let granules = h.size.div_ceil(GRANULE);
        if !granules.is_multiple_of(64) {
            if let Some(last) = present.last_mut() {
                *last &= (1u64 << (granules % 64)) - 1;
            }
        }
        Ok(present)
    }

    fn with_map(
        base: Arc<dyn BlockDevice>,
        scratch: Arc<dyn Storage>,
        header: OverlayHeader,
        present: Vec<u64>,
    ) -> Self {
        let size = header.size;
        CowOverlay {
            base,
            scratch,
            header,
            map: RwLock::new(Map {
                present,
                dirty_pages: Default::default(),
            }),
            flushing: Mutex::new(()),
            size,
            flush_failed: Default::default(),
        }
    }

    pub fn base(&self) -> &Arc<dyn BlockDevice> {
        &self.base
    }

    /// The header: the label names the base.
    pub fn header(&self) -> &OverlayHeader {
        &self.header
    }

    fn is_present(bits: &[u64], g: u64) -> bool {
        bits[(g / 64) as usize] & (1 << (g % 64)) != 0
    }

    fn scratch_err(e: std::io::Error) -> Error {
        Error::io("undo overlay scratch file", e)
    }

    /// Reads `buf` from the overlay's own copy of guest offset `offset` (which must lie in
    /// written ranges).
    pub fn read_written(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.scratch
            .read_at(buf, self.header.data_offset + offset)
            .map_err(Self::scratch_err)
    }

    /// Ranges (offset, len) whose data lives in the overlay, merged.
    pub fn written_ranges(&self) -> Vec<(u64, u64)> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(u64, u64)> = Vec::new();
        for g in 0..self.size.div_ceil(GRANULE) {
            if Self::is_present(&map.present, g) {
                let start = g * GRANULE;
                let len = GRANULE.min(self.size - start);
                match out.last_mut() {
                    Some((s, l)) if *s + *l == start => *l += len,
                    _ => out.push((start, len)),
                }
            }
        }
        out
    }

    fn sread(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        self.read_written(buf, pos)
    }

    fn swrite(&self, buf: &[u8], pos: u64) -> Result<()> {
        self.scratch
            .write_at(buf, self.header.data_offset + pos)
            .map_err(Self::scratch_err)
    }

    fn flush_inner(&self) -> Result<()> {
        let _one = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        // (1) Copy the changed bitmap pages as they are now: every bit in them is set only
        // after its granule's data was written.
        let pages: BTreeMap<u64, Vec<u8>> = {
            let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
            let dirty = std::mem::take(&mut map.dirty_pages);
            dirty
                .into_iter()
                .map(|p| {
                    let words_per_page = (PAGE / 8) as usize;
                    let first = p as usize * words_per_page;
                    let mut bytes = vec![0u8; PAGE as usize];
                    for (i, w) in map
                        .present
                        .iter()
                        .skip(first)
                        .take(words_per_page)
                        .enumerate()
                    {
                        bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
                    }
                    (p, bytes)
                })
                .collect()
        };
        // (2) The data they describe.
        self.scratch.flush().map_err(Self::scratch_err)?;
        if pages.is_empty() {
            return Ok(());
        }
        // (3) and (4): the bitmap pages.
        for (p, bytes) in &pages {
            self.scratch
                .write_at(bytes, self.header.bitmap_offset + p * PAGE)
                .map_err(Self::scratch_err)?;
        }
        self.scratch.flush().map_err(Self::scratch_err)
    }
}

impl BlockDevice for CowOverlay {
    fn format(&self) -> &'static str {
        self.base.format()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn logical_sector_size(&self) -> u32 {
        self.base.logical_sector_size()
    }
    fn physical_sector_size(&self) -> u32 {
        self.base.physical_sector_size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let bits = &map.present;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let g = pos / GRANULE;
            let here = Self::is_present(bits, g);
            // Extend over following granules in the same state.
            let mut end = (g + 1) * GRANULE;
            while end < offset + buf.len() as u64 && Self::is_present(bits, end / GRANULE) == here {
                end += GRANULE;
            }
            let n = (end.min(offset + buf.len() as u64) - pos) as usize;
            let part = &mut buf[done..done + n];
            if here {
                self.sread(part, pos)?;
            } else {
                self.base.read_at(part, pos)?;
            }
            done += n;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_aligned(
            offset,
            buf.len() as u64,
            self.size,
            self.logical_sector_size(),
        )?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let first = offset / GRANULE;
        let last = (offset + buf.len() as u64 - 1) / GRANULE;
        // Copy up partially covered granules from the base before overwriting them.
        for g in [first, last] {
            if Self::is_present(&map.present, g) {
                continue;
            }
            let start = g * GRANULE;
            let len = GRANULE.min(self.size - start);
            let covered = offset <= start && offset + buf.len() as u64 >= start + len;
            if !covered {
                let mut tmp = vec![0u8; len as usize];
                self.base.read_at(&mut tmp, start)?;
                self.swrite(&tmp, start)?;
            }
        }
        self.swrite(buf, offset)?;
        let granules_per_page = PAGE * 8;
        for g in first..=last {
            if !Self::is_present(&map.present, g) {
                map.present[(g / 64) as usize] |= 1 << (g % 64);
                map.dirty_pages.insert(g / granules_per_page);
            }
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        // Durable scratch data (and map) is what lets `viridian undo` recover a killed session.
        self.flush_failed
            .check(self.scratch.path())
            .map_err(Self::scratch_err)?;
        self.flush_inner()
            .inspect_err(|e| self.flush_failed.set(e.to_string()))
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size)?;
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let bits = &map.present;
        let g = offset / GRANULE;
        let here = Self::is_present(bits, g);
        let mut end = (g + 1) * GRANULE;
        while end < offset + len && Self::is_present(bits, end / GRANULE) == here {
            end += GRANULE;
        }
        let n = end.min(offset + len) - offset;
        Ok(Extent {
            len: n.max(1).min(len),
            allocation: if here {
                Allocation::Data { host_offset: None }
            } else {
                Allocation::Unallocated
            },
        })
    }
    fn backing(&self) -> Option<&Arc<dyn BlockDevice>> {
        Some(&self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemStorage, RawDisk};

    #[test]
    fn writes_stay_in_overlay_and_reads_merge() {
        let base = Arc::new(RawDisk::memory(1 << 20).unwrap());
        base.write_at(&[1u8; 1 << 20], 0).unwrap();
        let inner = Arc::new(
            CowOverlay::create(base.clone(), Arc::new(MemStorage::new()), b"base").unwrap(),
        );
        let ov = crate::Disk::new(inner.clone());
        ov.write_at(&[9u8; 100], 70_000).unwrap();
        let mut b = vec![0u8; 200];
        ov.read_at(&mut b, 69_950).unwrap();
        assert!(b[..50].iter().all(|&x| x == 1));
        assert!(b[50..150].iter().all(|&x| x == 9));
        assert!(b[150..].iter().all(|&x| x == 1));
        let mut c = vec![0u8; 1 << 20];
        base.read_at(&mut c, 0).unwrap();
        assert!(c.iter().all(|&x| x == 1), "base untouched");
        assert_eq!(inner.written_ranges(), vec![(65536, 65536)]);
    }

    #[test]
    fn a_failed_scratch_flush_fails_every_later_flush() {
        use crate::fault::{FaultPlan, FaultyStorage};
        let base = Arc::new(RawDisk::memory(1 << 20).unwrap());
        let plan = FaultPlan {
            // Operations: set_len, header write, header flush (creating the undo file), the
            // data write, then the flush that fails (4).
            fail_flush: Some(4),
            ..Default::default()
        };
        let ov =
            CowOverlay::create(base, Arc::new(FaultyStorage::new(Vec::new(), plan)), b"b").unwrap();
        ov.write_at(&[9u8; 65536], 0).unwrap();
        assert!(ov.flush().is_err());
        let e = ov.flush().unwrap_err().to_string();
        assert!(e.contains("earlier flush failed"), "{e}");
    }

    #[test]
    fn flushed_map_survives_a_reopen_and_unflushed_bits_do_not() {
        let base = Arc::new(RawDisk::memory(8 << 20).unwrap());
        let scratch: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let ov = CowOverlay::create(base.clone(), scratch.clone(), b"/x/base.img").unwrap();
        ov.write_at(&[7u8; 4096], 3 << 20).unwrap();
        ov.flush().unwrap();
        ov.write_at(&[8u8; 4096], 5 << 20).unwrap();
        drop(ov);
        let again = CowOverlay::open(base, scratch.clone()).unwrap();
        assert_eq!(again.header().label, b"/x/base.img");
        assert_eq!(again.written_ranges(), vec![(3 << 20, GRANULE)]);
        let mut b = vec![0u8; 4096];
        again.read_at(&mut b, 3 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        assert!(OverlayHeader::read(&*scratch).unwrap().is_some());
        assert!(OverlayHeader::read(&MemStorage::new()).unwrap().is_none());
    }
}

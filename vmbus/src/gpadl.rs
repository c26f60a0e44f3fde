//! GPADLs (guest physical address descriptor lists) and page-list buffers.
//!
//! A GPADL names a list of guest pages by PFN; the guest builds it with one GPADL_HEADER and
//! zero or more GPADL_BODY messages. [`GpadlTable`] assembles them and [`PageBuffer`] reads and
//! writes a byte range described by page lists (a GPADL or the GPA-direct ranges of a packet),
//! checking every guest address against [`GuestMemory`].

use std::collections::HashMap;

use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE};
use crate::protocol::GpadlHeader;

/// The most pages one GPADL may name (4 GiB). Bounds host memory use per guest request.
pub const MAX_GPADL_PAGES: usize = 1 << 20;
/// The most GPADLs (complete or being built) the host keeps.
pub const MAX_GPADLS: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpadlError {
    #[error("GPADL {0:#x} already exists")]
    Duplicate(u32),
    #[error("GPADL {0:#x} is unknown")]
    Unknown(u32),
    #[error("GPADL {gpadl:#x}: {detail}")]
    Invalid { gpadl: u32, detail: String },
    #[error("too many GPADLs")]
    TooMany,
}

/// One range of guest pages: `byte_count` bytes starting `byte_offset` bytes into the first
/// page of `pfns`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GpaRange {
    pub byte_count: u32,
    pub byte_offset: u32,
    pub pfns: Vec<u64>,
}

impl GpaRange {
    /// Checks the range's shape: offset inside the first page and exactly enough pages.
    pub fn validate(&self) -> Result<(), String> {
        if self.byte_offset as u64 >= PAGE_SIZE {
            return Err(format!("byte offset {} ≥ page size", self.byte_offset));
        }
        let need = (self.byte_offset as u64 + self.byte_count as u64).div_ceil(PAGE_SIZE);
        if (self.pfns.len() as u64) < need {
            return Err(format!(
                "{} bytes at offset {} need {need} pages, got {}",
                self.byte_count,
                self.byte_offset,
                self.pfns.len()
            ));
        }
        Ok(())
    }
}

/// A complete GPADL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpadl {
    pub id: u32,
    pub child_relid: u32,
    pub range: GpaRange,
}

#[derive(Debug)]
struct Pending {
    gpadl: Gpadl,
    total_pfns: usize,
    next_msg: u32,
}

/// GPADLs of one VMBus connection.
#[derive(Debug, Default)]
pub struct GpadlTable {
    complete: HashMap<u32, Gpadl>,
    pending: HashMap<u32, Pending>,
}

impl GpadlTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles GPADL_HEADER. Returns the GPADL when it needs no body messages.
    pub fn header(&mut self, h: &GpadlHeader) -> Result<Option<&Gpadl>, GpadlError> {
        let id = h.gpadl;
        if self.complete.contains_key(&id) || self.pending.contains_key(&id) {
            return Err(GpadlError::Duplicate(id));
        }
        if self.complete.len() + self.pending.len() >= MAX_GPADLS {
            return Err(GpadlError::TooMany);
        }
        let invalid = |detail: String| GpadlError::Invalid { gpadl: id, detail };
        if h.range_count != 1 {
            return Err(invalid(format!(
                "{} ranges (only 1 supported)",
                h.range_count
            )));
        }
        let total = h.total_pfns();
        if total == 0 || (h.range_buflen as usize) != 8 + 8 * total {
            return Err(invalid(format!("range_buflen {}", h.range_buflen)));
        }
        if total > MAX_GPADL_PAGES {
            return Err(invalid(format!("{total} pages")));
        }
        if h.pfns.len() < total.min(crate::protocol::GPADL_HEADER_MAX_PFNS) {
            return Err(invalid(format!(
                "header holds {} PFNs, expected {}",
                h.pfns.len(),
                total.min(crate::protocol::GPADL_HEADER_MAX_PFNS)
            )));
        }
        let range = GpaRange {
            byte_count: h.byte_count,
            byte_offset: h.byte_offset,
            pfns: Vec::with_capacity(total),
        };
        let mut p = Pending {
            gpadl: Gpadl {
                id,
                child_relid: h.child_relid,
                range,
            },
            total_pfns: total,
            next_msg: 1,
        };
        p.gpadl.range.pfns.extend_from_slice(&h.pfns);
        self.finish_or_park(p)
    }

    /// Handles GPADL_BODY. Returns the GPADL once its last PFN has arrived.
    pub fn body(
        &mut self,
        msg_number: u32,
        gpadl: u32,
        pfns: &[u64],
    ) -> Result<Option<&Gpadl>, GpadlError> {
        let mut p = self
            .pending
            .remove(&gpadl)
            .ok_or(GpadlError::Unknown(gpadl))?;
        let _ = msg_number; // Linux numbers bodies but Hyper-V does not enforce the order.
        let room = p.total_pfns - p.gpadl.range.pfns.len();
        if pfns.is_empty() {
            return Err(GpadlError::Invalid {
                gpadl,
                detail: "empty body message".into(),
            });
        }
        let take = pfns.len().min(room);
        p.gpadl.range.pfns.extend_from_slice(&pfns[..take]);
        p.next_msg += 1;
        self.finish_or_park(p)
    }

    fn finish_or_park(&mut self, p: Pending) -> Result<Option<&Gpadl>, GpadlError> {
        let id = p.gpadl.id;
        if p.gpadl.range.pfns.len() < p.total_pfns {
            self.pending.insert(id, p);
            return Ok(None);
        }
        p.gpadl
            .range
            .validate()
            .map_err(|detail| GpadlError::Invalid { gpadl: id, detail })?;
        self.complete.insert(id, p.gpadl);
        Ok(self.complete.get(&id))
    }

    pub fn get(&self, id: u32) -> Option<&Gpadl> {
        self.complete.get(&id)
    }

    /// Removes a GPADL (complete or not).
    pub fn remove(&mut self, id: u32) -> Option<Gpadl> {
        self.pending.remove(&id);
        self.complete.remove(&id)
    }

    /// Removes every GPADL of one channel.
    pub fn remove_channel(&mut self, relid: u32) {
        self.complete.retain(|_, g| g.child_relid != relid);
        self.pending.retain(|_, g| g.gpadl.child_relid != relid);
    }

    pub fn clear(&mut self) {
        self.complete.clear();
        self.pending.clear();
    }

    pub fn len(&self) -> usize {
        self.complete.len()
    }

    pub fn is_empty(&self) -> bool {
        self.complete.is_empty()
    }
}

/// A byte buffer in guest memory described by one or more page ranges, read and written as one
/// linear space of `len()` bytes.
#[derive(Clone, Copy)]
pub struct PageBuffer<'a> {
    mem: &'a dyn GuestMemory,
    ranges: &'a [GpaRange],
    len: u64,
}

impl<'a> PageBuffer<'a> {
    /// Validates the ranges' shape (not yet the addresses: each access checks those).
    pub fn new(mem: &'a dyn GuestMemory, ranges: &'a [GpaRange]) -> Result<Self, String> {
        let mut len = 0u64;
        for r in ranges {
            r.validate()?;
            len += r.byte_count as u64;
        }
        Ok(PageBuffer { mem, ranges, len })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks that every page of the buffer is guest memory.
    pub fn check(&self) -> Result<(), MemoryError> {
        for r in self.ranges {
            let pages = (r.byte_offset as u64 + r.byte_count as u64).div_ceil(PAGE_SIZE);
            for &pfn in &r.pfns[..pages as usize] {
                let gpa = pfn
                    .checked_mul(PAGE_SIZE)
                    .ok_or(MemoryError::OutOfRange { gpa: pfn, len: 0 })?;
                self.mem.check(gpa, PAGE_SIZE)?;
            }
        }
        Ok(())
    }

    /// Calls `f(gpa, buffer_offset, len)` for each guest-contiguous piece of
    /// `offset..offset+len`, merging physically adjacent pages.
    fn walk(
        &self,
        mut offset: u64,
        len: u64,
        mut f: impl FnMut(u64, usize, usize) -> Result<(), MemoryError>,
    ) -> Result<(), MemoryError> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .ok_or(MemoryError::OutOfRange { gpa: offset, len })?;
        let mut done = 0usize;
        let mut base = 0u64;
        for r in self.ranges {
            let rlen = r.byte_count as u64;
            if offset >= base + rlen {
                base += rlen;
                continue;
            }
            while offset < end && offset < base + rlen {
                let in_range = offset - base + r.byte_offset as u64;
                let page = (in_range / PAGE_SIZE) as usize;
                let mut n = (PAGE_SIZE - in_range % PAGE_SIZE).min(end - offset);
                n = n.min(base + rlen - offset);
                let pfn = r.pfns[page];
                let gpa = pfn
                    .checked_mul(PAGE_SIZE)
                    .and_then(|g| g.checked_add(in_range % PAGE_SIZE))
                    .ok_or(MemoryError::OutOfRange { gpa: pfn, len: n })?;
                // Extend over physically contiguous following pages.
                let mut p = page;
                while offset + n < end
                    && offset + n < base + rlen
                    && p + 1 < r.pfns.len()
                    && r.pfns[p + 1] == r.pfns[p].wrapping_add(1)
                {
                    p += 1;
                    n += PAGE_SIZE
                        .min(end - offset - n)
                        .min(base + rlen - offset - n);
                }
                f(gpa, done, n as usize)?;
                done += n as usize;
                offset += n;
            }
            if offset >= end {
                break;
            }
            base += rlen;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` of the buffer.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.walk(offset, buf.len() as u64, |gpa, at, n| {
            self.mem.read(gpa, &mut buf[at..at + n])
        })
    }

    /// Writes `data` at `offset` of the buffer.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.walk(offset, data.len() as u64, |gpa, at, n| {
            self.mem.write(gpa, &data[at..at + n])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::VecMemory;

    fn header(id: u32, total: usize, byte_count: u32) -> GpadlHeader {
        GpadlHeader {
            child_relid: 1,
            gpadl: id,
            range_buflen: (8 + 8 * total) as u16,
            range_count: 1,
            byte_count,
            byte_offset: 0,
            pfns: (0..total.min(26) as u64).map(|p| p + 10).collect(),
        }
    }

    #[test]
    fn header_and_bodies_assemble() {
        let mut t = GpadlTable::new();
        assert!(t.header(&header(5, 64, 64 * 4096)).unwrap().is_none());
        let b1: Vec<u64> = (26..54).map(|p| p + 10).collect();
        assert!(t.body(1, 5, &b1).unwrap().is_none());
        let b2: Vec<u64> = (54..64).map(|p| p + 10).collect();
        let g = t.body(2, 5, &b2).unwrap().unwrap();
        assert_eq!(g.range.pfns, (10..74).collect::<Vec<_>>());
        assert!(matches!(
            t.header(&header(5, 1, 4096)),
            Err(GpadlError::Duplicate(5))
        ));
        assert!(matches!(t.body(1, 9, &[1]), Err(GpadlError::Unknown(9))));
    }

    #[test]
    fn bad_headers_are_rejected() {
        let mut t = GpadlTable::new();
        let mut h = header(1, 2, 2 * 4096);
        h.range_count = 2;
        assert!(t.header(&h).is_err());
        let mut h = header(2, 2, 2 * 4096);
        h.range_buflen = 7;
        assert!(t.header(&h).is_err());
        // byte_count larger than the pages can hold.
        assert!(t.header(&header(3, 2, 3 * 4096)).is_err());
        let mut h = header(4, 2, 2 * 4096);
        h.pfns.truncate(1);
        assert!(t.header(&h).is_err());
        assert!(t.is_empty());
    }

    #[test]
    fn page_buffer_crosses_pages_and_ranges() {
        let mem = VecMemory::new(16 * 4096);
        let ranges = vec![
            GpaRange {
                byte_count: 5000,
                byte_offset: 4000,
                pfns: vec![3, 7, 8],
            },
            GpaRange {
                byte_count: 100,
                byte_offset: 0,
                pfns: vec![1],
            },
        ];
        let pb = PageBuffer::new(&mem, &ranges).unwrap();
        assert_eq!(pb.len(), 5100);
        pb.check().unwrap();
        let data: Vec<u8> = (0..5100u32).map(|i| (i * 7) as u8).collect();
        pb.write_at(0, &data).unwrap();
        let mut back = vec![0u8; 5100];
        pb.read_at(0, &mut back).unwrap();
        assert_eq!(back, data);
        let mut b = [0u8; 96];
        mem.read(3 * 4096 + 4000, &mut b).unwrap();
        assert_eq!(&b[..], &data[..96]);
        mem.read(7 * 4096, &mut b).unwrap();
        assert_eq!(&b[..], &data[96..192]);
        mem.read(4096, &mut b).unwrap();
        assert_eq!(&b[..], &data[5000..5096]);
        assert!(pb.read_at(5000, &mut [0u8; 101]).is_err());
        // A PFN outside guest memory fails cleanly.
        let bad = vec![GpaRange {
            byte_count: 10,
            byte_offset: 0,
            pfns: vec![u64::MAX / 2],
        }];
        let pb = PageBuffer::new(&mem, &bad).unwrap();
        assert!(pb.check().is_err());
        assert!(pb.write_at(0, &[1; 10]).is_err());
        // Shape errors.
        let bad = vec![GpaRange {
            byte_count: 5000,
            byte_offset: 0,
            pfns: vec![1],
        }];
        assert!(PageBuffer::new(&mem, &bad).is_err());
    }
}

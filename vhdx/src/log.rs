//! The VHDX log: finding and replaying a log sequence, and writing entries.
//!
//! # How Viridian writes metadata (the write-ahead scheme)
//!
//! Every change to metadata at file offsets >= 192 KiB (BAT pages, sector-bitmap pages, the
//! metadata region, region tables) goes through the log. Headers are never logged: they are
//! updated with the two-copy sequence-number rule.
//!
//! * **Session start** (first write after open): one header update sets a fresh LogGuid, a new
//!   FileWriteGuid and a new DataWriteGuid (written to the non-current slot, flushed, then to
//!   the other slot, flushed, so both copies are valid). From then on the log is "active"; log
//!   sequence numbers restart at 1 with every new LogGuid, so entries of older sessions can never
//!   join a sequence.
//! * **Between flushes**, metadata changes only touch the in-memory BAT and a map of dirty 4 KiB
//!   pages. Payload data is written straight to its block (positional I/O). New blocks are only
//!   ever appended at the end of the file, so a block the log has not yet made reachable holds
//!   nothing that matters, and a crash can at worst leak it.
//! * **Flush** (`flush()`), in this order:
//!   1. `storage.flush()`: all payload writes and every page applied after the previous entry are
//!      now durable, so the previous entry is no longer needed.
//!   2. Write ONE log entry holding every dirty page (a full 4 KiB image each) whose Tail points
//!      at itself (nothing older is needed), FlushedFileOffset = the durable file length and
//!      LastFileOffset = the length the file must have.
//!   3. `storage.flush()`: the entry is durable; the flush is acknowledged.
//!   4. Apply the pages to their final places *without* flushing; step 1 of the next flush (or
//!      close) makes them durable before the entry they came from can be overwritten.
//!
//!   So a flush costs two storage flushes and no header writes, however many blocks were
//!   allocated. An entry is placed right after the previous one in the ring (wrapping around the
//!   end) and is limited to half the log, so it never overwrites the previous entry, which is
//!   still the replay target until the new one is durable. A dirty set larger than that is
//!   written as several entries with a checkpoint (flush, apply, flush) between them, ordered so
//!   that every prefix is consistent: sector-bitmap pages first, then BAT pages, then the
//!   metadata region and region tables (a new virtual size or BAT location lands only after the
//!   entries it covers). Bits may thus become durable before the BAT entry that uses them, so a
//!   newly allocated PARTIALLY_PRESENT block always clears its bitmap range before setting bits.
//!   Operations that must be atomic as a whole (resize, re-parenting) flush earlier changes
//!   first so their own entry stays small.
//! * **Crash at any instant**: replay finds the valid entry with the highest sequence number (a
//!   torn entry fails its CRC and is ignored) and rewrites its page images, which are complete
//!   and idempotent, so re-applying an entry whose pages had already reached the file is
//!   harmless.
//! * **Close**: flush as above, flush the applied pages, then clear LogGuid with a header update
//!   (log empty, image clean).
//!
//! Replay itself follows MS-VHDX: the candidate heads are tried from the highest sequence number
//! down; a head is accepted when the chain from its Tail to it consists of valid, contiguous
//! (modulo the ring) entries with consecutive sequence numbers.

use std::collections::BTreeMap;

use binrw::binrw;
use disk::{Error, Guid, Result};

use crate::checksum;
use crate::codec::{decode, encode, guid_from_disk, guid_to_disk};
use crate::format::{MAX_SIZE, PAGE, RT1_OFFSET};

/// An entry's first 64 bytes (the entry is checksummed over its whole length).
#[binrw]
#[brw(little, magic = b"loge")]
struct LogEntryHeader {
    /// CRC-32C of the whole entry (see checksum.rs), filled in after writing.
    #[br(temp)]
    #[bw(calc = 0u32)]
    checksum: u32,
    entry_length: u32,
    tail: u32,
    sequence: u64,
    descriptor_count: u32,
    reserved: u32,
    #[br(map = guid_from_disk)]
    #[bw(map = guid_to_disk)]
    log_guid: Guid,
    flushed_file_offset: u64,
    last_file_offset: u64,
}

/// A 32-byte descriptor; descriptors follow the entry header.
#[binrw]
#[brw(little)]
enum Descriptor {
    /// Zero `zero_length` bytes at `file_offset`.
    #[brw(magic = b"zero")]
    Zero {
        reserved: u32,
        zero_length: u64,
        file_offset: u64,
        sequence: u64,
    },
    /// Write a 4 KiB page at `file_offset`: its first 8 and last 4 bytes are here, the rest in
    /// the matching data sector.
    #[brw(magic = b"desc")]
    Data {
        trailing_bytes: [u8; 4],
        leading_bytes: [u8; 8],
        file_offset: u64,
        sequence: u64,
    },
}

/// A 4 KiB data sector: the middle 4084 bytes of a page, framed by the sequence number's halves.
#[binrw]
#[brw(little, magic = b"data")]
struct DataSector {
    sequence_high: u32,
    #[br(count = PAGE_MIDDLE)]
    data: Vec<u8>,
    sequence_low: u32,
}

const ENTRY_HEADER_SIZE: usize = 64;
const DESCRIPTOR_SIZE: usize = 32;
/// The bytes of a page that a data sector carries (8..4092).
const PAGE_MIDDLE: usize = 4084;

/// One operation of a log entry.
#[derive(Clone, Debug)]
pub enum LogOp {
    Data { file_offset: u64, page: Box<[u8]> },
    Zero { file_offset: u64, len: u64 },
}

#[derive(Clone, Debug)]
pub struct LogEntry {
    pub offset: u64,
    pub length: u64,
    pub tail: u64,
    pub sequence: u64,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub ops: Vec<LogOp>,
}

/// The sequence to replay (oldest first).
#[derive(Clone, Debug, Default)]
pub struct LogSequence {
    pub entries: Vec<LogEntry>,
}

impl LogSequence {
    pub fn flushed_file_offset(&self) -> u64 {
        self.entries.last().map_or(0, |e| e.flushed_file_offset)
    }
    pub fn last_file_offset(&self) -> u64 {
        self.entries.last().map_or(0, |e| e.last_file_offset)
    }
    pub fn head_sequence(&self) -> u64 {
        self.entries.last().map_or(0, |e| e.sequence)
    }
    pub fn head_end(&self, log_len: u64) -> u64 {
        self.entries
            .last()
            .map_or(0, |e| (e.offset + e.length) % log_len)
    }
}

fn ring(log: &[u8], off: u64, len: u64) -> Vec<u8> {
    let n = log.len() as u64;
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = off % n;
    let mut left = len;
    while left > 0 {
        let take = left.min(n - pos);
        out.extend_from_slice(&log[pos as usize..(pos + take) as usize]);
        left -= take;
        pos = (pos + take) % n;
    }
    out
}

/// Number of 4 KiB descriptor sectors for `n` descriptors.
pub fn desc_sectors(n: u64) -> u64 {
    if n <= 126 {
        1
    } else {
        1 + (n - 126).div_ceil(128)
    }
}

/// Validates and decodes the entry at ring offset `off`; None when it is not a valid entry.
fn parse_entry(log: &[u8], off: u64, guid: &Guid) -> Option<LogEntry> {
    let n = log.len() as u64;
    let h: LogEntryHeader = decode(&ring(log, off, ENTRY_HEADER_SIZE as u64)).ok()?;
    let length = h.entry_length as u64;
    let tail = h.tail as u64;
    let sequence = h.sequence;
    let count = h.descriptor_count as u64;
    if length < PAGE || !length.is_multiple_of(PAGE) || length > n || sequence == 0 {
        return None;
    }
    if !tail.is_multiple_of(PAGE) || tail >= n || h.log_guid != *guid {
        return None;
    }
    let ds = desc_sectors(count);
    if ds * PAGE > length {
        return None;
    }
    let e = ring(log, off, length);
    let (stored, computed) = checksum::stored_and_computed(&e);
    if stored != computed {
        return None;
    }
    let mut ops = Vec::new();
    let mut data_idx = 0u64;
    for i in 0..count as usize {
        let d = ENTRY_HEADER_SIZE + i * DESCRIPTOR_SIZE;
        match decode::<Descriptor>(&e[d..d + DESCRIPTOR_SIZE]).ok()? {
            Descriptor::Zero {
                zero_length,
                file_offset,
                sequence: s,
                ..
            } => {
                if s != sequence
                    || !file_offset.is_multiple_of(PAGE)
                    || !zero_length.is_multiple_of(PAGE)
                {
                    return None;
                }
                ops.push(LogOp::Zero {
                    file_offset,
                    len: zero_length,
                });
            }
            Descriptor::Data {
                trailing_bytes,
                leading_bytes,
                file_offset,
                sequence: s,
            } => {
                if s != sequence || !file_offset.is_multiple_of(PAGE) {
                    return None;
                }
                let at = ((ds + data_idx) * PAGE) as usize;
                if at as u64 + PAGE > length {
                    return None;
                }
                let sec: DataSector = decode(&e[at..at + PAGE as usize]).ok()?;
                if sec.sequence_high as u64 != sequence >> 32
                    || sec.sequence_low as u64 != sequence & 0xffff_ffff
                {
                    return None;
                }
                let mut page = vec![0u8; PAGE as usize].into_boxed_slice();
                page[0..8].copy_from_slice(&leading_bytes);
                page[8..4092].copy_from_slice(&sec.data);
                page[4092..4096].copy_from_slice(&trailing_bytes);
                ops.push(LogOp::Data { file_offset, page });
                data_idx += 1;
            }
        }
    }
    Some(LogEntry {
        offset: off,
        length,
        tail,
        sequence,
        flushed_file_offset: h.flushed_file_offset,
        last_file_offset: h.last_file_offset,
        ops,
    })
}

/// Finds the sequence to replay in the log region bytes `log` (whole region).
pub fn find_sequence(log: &[u8], guid: &Guid) -> LogSequence {
    let n = log.len() as u64;
    if n < PAGE {
        return LogSequence::default();
    }
    let mut valid: BTreeMap<u64, LogEntry> = BTreeMap::new();
    let mut off = 0;
    while off < n {
        if &log[off as usize..off as usize + 4] == b"loge" {
            if let Some(e) = parse_entry(log, off, guid) {
                valid.insert(off, e);
            }
        }
        off += PAGE;
    }
    let mut heads: Vec<&LogEntry> = valid.values().collect();
    heads.sort_by_key(|e| std::cmp::Reverse(e.sequence));
    'heads: for head in heads {
        // Walk from the tail to the head.
        let mut chain = Vec::new();
        let mut pos = head.tail;
        let mut expect: Option<u64> = None;
        let mut used = 0u64;
        loop {
            let Some(e) = valid.get(&pos) else {
                continue 'heads;
            };
            if let Some(s) = expect {
                if e.sequence != s {
                    continue 'heads;
                }
            }
            used += e.length;
            if used > n || e.sequence > head.sequence {
                continue 'heads;
            }
            chain.push(e.clone());
            if e.offset == head.offset {
                break;
            }
            expect = Some(e.sequence + 1);
            pos = (e.offset + e.length) % n;
        }
        return LogSequence { entries: chain };
    }
    LogSequence::default()
}

/// Serialises one entry holding full-page images (`pages`: file offset, 4 KiB each).
pub fn build_entry(
    sequence: u64,
    tail: u32,
    guid: &Guid,
    flushed_file_offset: u64,
    last_file_offset: u64,
    pages: &[(u64, &[u8])],
) -> Vec<u8> {
    build_entry_with_zeros(
        sequence,
        tail,
        guid,
        flushed_file_offset,
        last_file_offset,
        pages,
        &[],
    )
}

/// As [`build_entry`], plus zero descriptors (file offset, length; 4 KiB multiples), which are
/// applied after the pages.
pub fn build_entry_with_zeros(
    sequence: u64,
    tail: u32,
    guid: &Guid,
    flushed_file_offset: u64,
    last_file_offset: u64,
    pages: &[(u64, &[u8])],
    zeros: &[(u64, u64)],
) -> Vec<u8> {
    let count = pages.len() as u64 + zeros.len() as u64;
    let ds = desc_sectors(count);
    let len = (ds + pages.len() as u64) * PAGE;
    let mut e = vec![0u8; len as usize];
    encode(
        &LogEntryHeader {
            entry_length: len as u32,
            tail,
            sequence,
            descriptor_count: count as u32,
            reserved: 0,
            log_guid: *guid,
            flushed_file_offset,
            last_file_offset,
        },
        &mut e,
    );
    let descriptor_at = |i: usize| ENTRY_HEADER_SIZE + i * DESCRIPTOR_SIZE;
    for (i, (off, page)) in pages.iter().enumerate() {
        let d = descriptor_at(i);
        let mut trailing_bytes = [0u8; 4];
        trailing_bytes.copy_from_slice(&page[4092..4096]);
        let mut leading_bytes = [0u8; 8];
        leading_bytes.copy_from_slice(&page[0..8]);
        encode(
            &Descriptor::Data {
                trailing_bytes,
                leading_bytes,
                file_offset: *off,
                sequence,
            },
            &mut e[d..d + DESCRIPTOR_SIZE],
        );
        let s = ((ds + i as u64) * PAGE) as usize;
        encode(
            &DataSector {
                sequence_high: (sequence >> 32) as u32,
                data: page[8..4092].to_vec(),
                sequence_low: sequence as u32,
            },
            &mut e[s..s + PAGE as usize],
        );
    }
    for (i, (off, len)) in zeros.iter().enumerate() {
        let d = descriptor_at(pages.len() + i);
        encode(
            &Descriptor::Zero {
                reserved: 0,
                zero_length: *len,
                file_offset: *off,
                sequence,
            },
            &mut e[d..d + DESCRIPTOR_SIZE],
        );
    }
    checksum::seal(&mut e);
    e
}

/// Checks that a replayed sequence only targets loggable offsets and yields its operations.
pub fn validate_targets(seq: &LogSequence, log_offset: u64, log_len: u64) -> Result<()> {
    for e in &seq.entries {
        for op in &e.ops {
            let (o, l) = match op {
                LogOp::Data { file_offset, .. } => (*file_offset, PAGE),
                LogOp::Zero { file_offset, len } => (*file_offset, *len),
            };
            let end = o.saturating_add(l);
            if o < RT1_OFFSET
                || (o < log_offset + log_len && end > log_offset)
                || end > MAX_SIZE * 2
            {
                return Err(Error::corrupt(
                    "VHDX log entry",
                    log_offset + e.offset,
                    format!(
                        "sequence {} writes {o:#x}+{l:#x}, which is a header, the log itself or absurdly far",
                        e.sequence
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_then_find() {
        let guid = Guid::from_windows_bytes([7u8; 16]);
        let page = vec![0xabu8; 4096];
        let mut log = vec![0u8; 1 << 20];
        let e1 = build_entry(1, 0, &guid, 0, 0, &[(2 << 20, &page)]);
        log[..e1.len()].copy_from_slice(&e1);
        let e2 = build_entry(2, 0, &guid, 0, 0, &[(3 << 20, &page)]);
        log[e1.len()..e1.len() + e2.len()].copy_from_slice(&e2);
        let s = find_sequence(&log, &guid);
        assert_eq!(s.entries.len(), 2);
        assert_eq!(s.head_sequence(), 2);
        // Wrong guid: nothing.
        assert!(find_sequence(&log, &Guid::from_windows_bytes([1u8; 16]))
            .entries
            .is_empty());
        // Tear entry 2: only entry 1 remains.
        log[e1.len() + 5000] ^= 1;
        let s = find_sequence(&log, &guid);
        assert_eq!(s.entries.len(), 1);
    }
}

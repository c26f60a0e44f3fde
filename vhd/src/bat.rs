//! The block allocation table: one big-endian u32 per block, the sector offset of the block's
//! bitmap, or all ones for a block not allocated (docs/vhd.md, "BAT").

use disk::{Error, Result, Storage};

use crate::io::read_exact;
use crate::limits::SECTOR;

/// The entry of a block that is not allocated.
pub const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// Bytes per entry.
pub const ENTRY_SIZE: u64 = 4;

/// The table in memory.
#[derive(Clone, Debug, Default)]
pub struct Bat {
    /// File offset of the table.
    offset: u64,
    entries: Vec<u32>,
}

impl Bat {
    /// Reads the `len` entries the virtual size uses from the table at `offset`.
    pub fn load(s: &dyn Storage, offset: u64, len: u64) -> Result<Bat> {
        let mut raw = vec![0u8; (len * ENTRY_SIZE) as usize];
        read_exact(s, &mut raw, offset, "VHD BAT")?;
        let entries = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Bat { offset, entries })
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Entries in use (the virtual size in blocks).
    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    /// File offset of entry `i`.
    pub fn entry_offset(&self, i: u64) -> u64 {
        self.offset + ENTRY_SIZE * i
    }

    /// Entry `i`; [`UNALLOCATED`] past the end.
    pub fn get(&self, i: u64) -> Result<u32> {
        Ok(self.entries.get(i as usize).copied().unwrap_or(UNALLOCATED))
    }

    /// Changes entry `i` in memory (the caller wrote it to the file first).
    pub fn set(&mut self, i: u64, e: u32) {
        self.entries[i as usize] = e;
    }

    /// (index, entry) of every allocated block, in table order.
    pub fn allocated(&self) -> Result<Vec<(u64, u32)>> {
        Ok(self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, &e)| e != UNALLOCATED)
            .map(|(i, &e)| (i as u64, e))
            .collect())
    }

    pub fn allocated_count(&self) -> u64 {
        self.entries.iter().filter(|&&e| e != UNALLOCATED).count() as u64
    }

    /// The table now has `len` entries at `offset` (a resize wrote them, all ones past the old
    /// end).
    pub fn grow(&mut self, offset: u64, len: u64) {
        self.offset = offset;
        self.entries.resize(len as usize, UNALLOCATED);
    }
}

/// What a block may not touch: the file's metadata ranges and the end of its data area.
pub struct Layout {
    /// Byte ranges of the footer copy, dynamic header and BAT.
    pub metadata: [(u64, u64); 3],
    /// Where the trailing footer starts.
    pub data_end: u64,
    pub file_len: u64,
    /// Bytes of one block with its bitmap.
    pub slot: u64,
}

/// Entries that put a block outside the data area or on the metadata, as (file offset of the
/// entry, message).
pub fn misplaced_entries(bat: &Bat, layout: &Layout) -> Result<Vec<(u64, String)>> {
    let mut errors = Vec::new();
    for (i, e) in bat.allocated()? {
        let start = e as u64 * SECTOR;
        let end = start + layout.slot;
        let (data_end, len) = (layout.data_end, layout.file_len);
        if end > data_end {
            errors.push((
                bat.entry_offset(i),
                format!("entry {i} = {e:#x} puts block at {start}..{end}, past the data area end {data_end} (file length {len})"),
            ));
        } else if layout.metadata.iter().any(|&(a, b)| start < b && end > a) {
            errors.push((
                bat.entry_offset(i),
                format!("entry {i} = {e:#x} puts block at {start}..{end} on top of the footer copy, dynamic header or BAT"),
            ));
        }
    }
    Ok(errors)
}

/// Two entries sharing (part of) a block: reads are defined, but a write through one would
/// change the other's data, so an open refuses it (check reports it as well).
pub fn refuse_overlaps(bat: &Bat, slot: u64) -> Result<()> {
    let mut starts: Vec<(u32, u64)> = bat.allocated()?.into_iter().map(|(i, e)| (e, i)).collect();
    starts.sort_unstable();
    if let Some(w) = starts
        .windows(2)
        .find(|w| w[0].0 as u64 * SECTOR + slot > w[1].0 as u64 * SECTOR)
    {
        return Err(Error::corrupt(
            "VHD BAT",
            bat.entry_offset(w[1].1),
            format!(
                "entries {} and {} put blocks at sectors {:#x} and {:#x}, which overlap",
                w[0].1, w[1].1, w[0].0, w[1].0
            ),
        ));
    }
    Ok(())
}

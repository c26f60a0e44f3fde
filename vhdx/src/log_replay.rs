//! Replaying a log sequence at open: in place when writable, or as an in-memory overlay for a
//! read-only open (which must never write). See docs/vhdx.md, "Log".

use super::*;

/// In-memory result of replaying a dirty log for a read-only open.
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    pub pages: BTreeMap<u64, (usize, Box<[u8]>)>,
    pub zeros: Vec<(u64, u64, usize)>,
}

impl Overlay {
    /// Every page image and zero range of `seq`, the newest winning where they meet.
    pub(crate) fn from_sequence(seq: &log::LogSequence) -> Overlay {
        let mut overlay = Overlay::default();
        for (i, e) in seq.entries.iter().enumerate() {
            for (j, op) in e.ops.iter().enumerate() {
                let idx = i * 1_000_000 + j;
                match op {
                    log::LogOp::Data { file_offset, page } => {
                        overlay.pages.insert(*file_offset, (idx, page.clone()));
                    }
                    log::LogOp::Zero { file_offset, len } => {
                        overlay.zeros.push((*file_offset, file_offset + len, idx));
                    }
                }
            }
        }
        overlay
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pages.is_empty() && self.zeros.is_empty()
    }
    /// Patches `buf` (read from the file at `off`) with the logged page images.
    pub(crate) fn patch(&self, buf: &mut [u8], off: u64) {
        let end = off + buf.len() as u64;
        let first = off / PAGE * PAGE;
        let mut p = first;
        while p < end {
            let data = self.pages.get(&p);
            let zero = self
                .zeros
                .iter()
                .filter(|(s, e, _)| p >= *s && p < *e)
                .map(|z| z.2)
                .max();
            let newest_data = match (data, zero) {
                (Some((di, img)), Some(zi)) if *di > zi => Some(Some(img)),
                (Some((_, img)), None) => Some(Some(img)),
                (_, Some(_)) => Some(None),
                (None, None) => None,
            };
            if let Some(src) = newest_data {
                let s = p.max(off);
                let e = (p + PAGE).min(end);
                let dst = &mut buf[(s - off) as usize..(e - off) as usize];
                match src {
                    Some(img) => dst.copy_from_slice(&img[(s - p) as usize..(e - p) as usize]),
                    None => dst.fill(0),
                }
            }
            p += PAGE;
        }
    }
}

/// Reads `buf` at `off` from `s`, patched by `ov`.
pub(crate) fn read_via(
    s: &dyn Storage,
    ov: &Overlay,
    buf: &mut [u8],
    off: u64,
    what: &str,
) -> Result<()> {
    s.read_at(buf, off)
        .map_err(|e| Error::io(format!("cannot read {what} at {off:#x}"), e))?;
    if !ov.is_empty() {
        ov.patch(buf, off);
    }
    Ok(())
}

pub(crate) fn replay_in_place(s: &dyn Storage, seq: &log::LogSequence) -> Result<()> {
    for e in &seq.entries {
        for op in &e.ops {
            match op {
                log::LogOp::Data { file_offset, page } => s
                    .write_at(page, *file_offset)
                    .map_err(io_err("cannot replay VHDX log"))?,
                // Punching reads back as zeros and costs no I/O on real files.
                log::LogOp::Zero { file_offset, len } => s
                    .punch_hole(*file_offset, *len)
                    .map_err(io_err("cannot replay VHDX log"))?,
            }
        }
    }
    let len = s.len().map_err(io_err("cannot get file length"))?;
    let want = seq.last_file_offset();
    if want > len {
        s.set_len(want)
            .map_err(io_err("cannot extend file after log replay"))?;
    }
    s.flush().map_err(io_err("cannot flush after log replay"))
}

/// Everything the sequence touches must lie inside the file it describes (`lo`: the log's file
/// offset, for error messages).
pub(crate) fn check_against_file(seq: &log::LogSequence, lo: u64, file_len: u64) -> Result<()> {
    let limit = file_len.max(seq.last_file_offset());
    if seq.last_file_offset() > MAX_SIZE + 64 * MIB * 1024 {
        return Err(Error::corrupt(
            "VHDX log entry",
            lo,
            format!("last file offset {} is absurd", seq.last_file_offset()),
        ));
    }
    for e in &seq.entries {
        for op in &e.ops {
            if let log::LogOp::Zero { file_offset, len } = op {
                if file_offset.saturating_add(*len) > limit {
                    return Err(Error::corrupt(
                        "VHDX log entry",
                        lo + e.offset,
                        format!(
                            "zero descriptor {file_offset:#x}+{len:#x} reaches past the file ({limit})"
                        ),
                    ));
                }
            }
        }
    }
    if seq.flushed_file_offset() > file_len {
        return Err(Error::corrupt(
            "VHDX log entry",
            lo + seq.entries.last().map_or(0, |e| e.offset),
            format!(
                "flushed file offset {} is beyond the file length {file_len}: the file was truncated",
                seq.flushed_file_offset()
            ),
        ));
    }
    Ok(())
}

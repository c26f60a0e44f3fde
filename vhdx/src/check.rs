//! `check`: structure, log state, BAT ranges and overlaps, leaks (qemu-img check semantics).

use std::sync::Arc;

use disk::check::Repair;
use disk::{CheckReport, Error, Result, Storage};

use crate::format::*;
use crate::header::read_headers;
use crate::open::Lenient;
use crate::VhdxDisk;

/// Checks an image. With `repair` other than `None` a dirty log is replayed in place; with
/// `Leaks` or `All` unreferenced space at the end of the file is truncated.
pub fn check(storage: Arc<dyn Storage>, repair: Repair) -> Result<CheckReport> {
    check_with_cache(storage, repair, crate::DEFAULT_BAT_CACHE_BYTES)
}

/// [`check`], keeping at most `bat_cache_bytes` of BAT pages in memory.
pub fn check_with_cache(
    storage: Arc<dyn Storage>,
    repair: Repair,
    bat_cache_bytes: usize,
) -> Result<CheckReport> {
    let mut r = CheckReport {
        filename: storage
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        format: "vhdx".into(),
        ..Default::default()
    };
    if !VhdxDisk::probe(&*storage)? {
        return Err(Error::WrongFormat {
            format: "vhdx",
            detail: "no 'vhdxfile' signature at offset 0".into(),
        });
    }
    let (hs, both) = match read_headers(&*storage) {
        Ok(x) => x,
        Err(e) => {
            r.corruption(e.to_string());
            return Ok(r);
        }
    };
    for (i, h) in both.iter().enumerate() {
        if h.is_none() {
            r.warning(format!(
                "header {} is invalid; the other copy is used",
                i + 1
            ));
        }
    }
    // The log.
    let mut replay_rw = false;
    if !hs.current.log_guid.is_nil() {
        let probe = VhdxDisk::open_inner(
            storage.clone(),
            true,
            Lenient { bat: true },
            bat_cache_bytes,
        );
        match probe {
            Ok(d) if d.dirty_at_open => {
                r.corruption(format!(
                    "the log holds {} entries that need replay",
                    d.replayed
                ));
                if repair != Repair::None {
                    replay_rw = true;
                }
            }
            Ok(_) => r.warning("log GUID set but no valid log entries (image not closed)"),
            Err(e) => {
                r.corruption(e.to_string());
                return Ok(r);
            }
        }
    }
    let d = match VhdxDisk::open_inner(
        storage.clone(),
        !replay_rw,
        Lenient { bat: true },
        bat_cache_bytes,
    ) {
        Ok(d) => d,
        Err(e) => {
            r.corruption(e.to_string());
            return Ok(r);
        }
    };
    // Both region tables should be valid and agree; open used the first good one.
    let file_len0 = storage
        .len()
        .map_err(|e| Error::io("cannot get file length", e))?;
    let mut rts: Vec<(u64, Option<Vec<u8>>)> = Vec::new();
    for at in [RT1_OFFSET, RT2_OFFSET] {
        let mut b = vec![0u8; RT_SIZE];
        let ok = storage.read_at(&mut b, at).is_ok()
            && RegionTable::parse(&b, at, file_len0.max(1 << 40)).is_ok();
        rts.push((at, ok.then_some(b)));
    }
    let good = rts.iter().find_map(|(_, b)| b.clone());
    for (i, (at, b)) in rts.iter().enumerate() {
        let differs = matches!((b, &good), (Some(x), Some(g)) if x != g);
        if b.is_none() || differs {
            r.corruption(format!(
                "region table {} at {at:#x} is {}",
                i + 1,
                if differs {
                    "different from the other copy"
                } else {
                    "invalid"
                }
            ));
            if repair == Repair::All {
                if let Some(g) = &good {
                    if storage.write_at(g, *at).is_ok() && storage.flush().is_ok() {
                        r.corruptions_fixed += 1;
                        if let Some(f) = r.findings.last_mut() {
                            f.fixed = true;
                        }
                    }
                }
            }
        }
    }
    if replay_rw {
        r.corruptions_fixed += 1;
        if let Some(f) = r.findings.iter_mut().find(|f| f.kind == "corruption") {
            f.fixed = true;
        }
    }
    let file_len = storage
        .len()
        .map_err(|e| Error::io("cannot get file length", e))?;
    r.image_end_offset = Some(file_len);
    let bat = crate::rlock(&d.bat);
    let meta = crate::rlock(&d.meta);
    let geo = bat.geo;
    let h = crate::lock(&d.header).current.clone();
    // The fixed structures, checked against one another by name.
    let mut fixed: Vec<(u64, u64, String)> = vec![(0, MIB, "header section".into())];
    if h.log_length > 0 {
        fixed.push((
            h.log_offset,
            h.log_offset + h.log_length as u64,
            "log".into(),
        ));
    }
    for e in &crate::rlock(&d.regions).entries {
        fixed.push((
            e.offset,
            e.offset + e.length as u64,
            format!("region {}", e.guid),
        ));
    }
    for (k, a) in fixed.iter().enumerate() {
        for b in &fixed[k + 1..] {
            if a.0 < b.1 && b.0 < a.1 {
                r.corruption(format!("{} and {} overlap", a.2, b.2));
            }
        }
    }
    // Blocks are whole MiB at MiB offsets: one bit per MiB of the file says what is in use,
    // so memory follows the file's length (8 MiB for a 64 TiB file), not the BAT's entries.
    let mut map = MibMap::new(file_len);
    for (s, e, _) in &fixed {
        map.mark(*s, *e);
    }
    let mut findings = FindingCap::default();
    let mut allocated = 0u64;
    let walked = bat.for_each_nonzero(|i, e| {
        let is_sb = geo.is_bitmap_index(i);
        let st = bat_state(e);
        let len = if is_sb {
            if st != SB_PRESENT || !meta.has_parent {
                return Ok(());
            }
            MIB
        } else {
            if st != PB_FULLY_PRESENT && st != PB_PARTIALLY_PRESENT {
                if bat_offset(e) != 0 {
                    findings.warning(&mut r, format!(
                        "BAT entry {i} in state {st} has a non-zero file offset {}",
                        bat_offset(e)
                    ));
                }
                return Ok(());
            }
            allocated += 1;
            geo.block_size
        };
        let off = bat_offset(e);
        if off >= file_len {
            findings.corruption(&mut r, format!(
                "VHDX BAT entry {i} start offset {off} points after end of file ({file_len}). Image has probably been truncated."
            ));
            return Ok(());
        }
        if off + len > file_len {
            findings.warning(&mut r, format!(
                "VHDX BAT entry {i} block at {off} runs past the end of the file ({file_len}); the tail reads as zeros"
            ));
        }
        if map.mark(off, off + len) {
            findings.corruption(&mut r, format!(
                "BAT entry {i} block at {off:#x} overlaps another block, the headers, the log or a region"
            ));
        }
        Ok(())
    });
    findings.summarize(&mut r);
    if let Err(e) = walked {
        // An entry open did not see (a big table is checked as it is read) is invalid.
        r.corruption(e.to_string());
        return Ok(r);
    }
    // Space in use ends at the last MiB marked; below it, unmarked runs that hold data leak.
    let end = map.end();
    let mut leaked = 0u64;
    for (a, b) in map.gaps(file_len) {
        let mut o = a;
        while o < b {
            let (data, n) = storage
                .data_run(o, b - o)
                .map_err(|e| Error::io("cannot query allocation", e))?;
            if data {
                leaked += n;
            }
            o += n.max(1);
        }
    }
    drop(bat);
    drop(meta);
    if leaked > 0 {
        r.leak(format!(
            "{leaked} bytes of file space are allocated but referenced by nothing"
        ));
        if repair != Repair::None && file_len > round_up_mib(end) {
            drop(d);
            // Only the tail can be returned without moving blocks.
            if storage.set_len(round_up_mib(end)).is_ok() && storage.flush().is_ok() {
                r.leaks_fixed += 1;
            }
        }
    }
    r.total_clusters = Some(geo.data_blocks);
    r.allocated_clusters = Some(allocated);
    Ok(r)
}

fn round_up_mib(v: u64) -> u64 {
    v.div_ceil(MIB) * MIB
}

/// One bit per MiB of the file: in use by a structure or a block.
struct MibMap {
    bits: Vec<u64>,
}

impl MibMap {
    fn new(file_len: u64) -> MibMap {
        MibMap {
            bits: vec![0; round_up_mib(file_len).div_ceil(MIB).div_ceil(64) as usize],
        }
    }

    fn units(&self) -> u64 {
        self.bits.len() as u64 * 64
    }

    /// Marks `start..end` (clipped to the file); returns whether some of it was marked already.
    fn mark(&mut self, start: u64, end: u64) -> bool {
        let mut clash = false;
        for u in start / MIB..end.div_ceil(MIB).min(self.units()) {
            let (w, b) = ((u / 64) as usize, u % 64);
            clash |= self.bits[w] & (1 << b) != 0;
            self.bits[w] |= 1 << b;
        }
        clash
    }

    fn marked(&self, u: u64) -> bool {
        self.bits[(u / 64) as usize] & (1 << (u % 64)) != 0
    }

    /// Where the last marked MiB ends.
    fn end(&self) -> u64 {
        (0..self.units())
            .rev()
            .find(|&u| self.marked(u))
            .map_or(0, |u| (u + 1) * MIB)
    }

    /// Unmarked byte ranges below `file_len`.
    fn gaps(&self, file_len: u64) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        let mut u = 0;
        let last = file_len.div_ceil(MIB);
        while u < last {
            if self.marked(u) {
                u += 1;
                continue;
            }
            let from = u;
            while u < last && !self.marked(u) {
                u += 1;
            }
            gaps.push((from * MIB, (u * MIB).min(file_len)));
        }
        gaps
    }
}

/// Per-entry findings: the first few are reported one by one, the rest counted, so a table of
/// millions of bad entries does not make millions of messages.
#[derive(Default)]
struct FindingCap {
    shown: u64,
    hidden_corruptions: u64,
    hidden_warnings: u64,
}

const SHOWN_FINDINGS: u64 = 100;

impl FindingCap {
    fn corruption(&mut self, r: &mut CheckReport, m: String) {
        if self.shown < SHOWN_FINDINGS {
            self.shown += 1;
            r.corruption(m);
        } else {
            self.hidden_corruptions += 1;
        }
    }

    fn warning(&mut self, r: &mut CheckReport, m: String) {
        if self.shown < SHOWN_FINDINGS {
            self.shown += 1;
            r.warning(m);
        } else {
            self.hidden_warnings += 1;
        }
    }

    fn summarize(self, r: &mut CheckReport) {
        if self.hidden_corruptions > 0 {
            r.corruption(format!(
                "and {} more BAT entries with errors like the above",
                self.hidden_corruptions
            ));
            // One message stands for all of them.
            r.corruptions += self.hidden_corruptions - 1;
        }
        if self.hidden_warnings > 0 {
            r.warning(format!(
                "and {} more BAT entries with warnings like the above",
                self.hidden_warnings
            ));
        }
    }
}

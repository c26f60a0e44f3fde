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
        let probe = VhdxDisk::open_inner(storage.clone(), true, Lenient { bat: true });
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
    let d = match VhdxDisk::open_inner(storage.clone(), !replay_rw, Lenient { bat: true }) {
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
    let mut used: Vec<(u64, u64, String)> = vec![(0, MIB, "header section".into())];
    if h.log_length > 0 {
        used.push((
            h.log_offset,
            h.log_offset + h.log_length as u64,
            "log".into(),
        ));
    }
    for e in &crate::rlock(&d.regions).entries {
        used.push((
            e.offset,
            e.offset + e.length as u64,
            format!("region {}", e.guid),
        ));
    }
    let fixed_n = used.len();
    let mut allocated = 0u64;
    for (i, e) in bat.nonzero() {
        let is_sb = (i as u64 % (geo.chunk_ratio + 1)) == geo.chunk_ratio;
        let st = bat_state(e);
        let len = if is_sb {
            if st != SB_PRESENT || !meta.has_parent {
                continue;
            }
            MIB
        } else {
            if st != PB_FULLY_PRESENT && st != PB_PARTIALLY_PRESENT {
                if bat_offset(e) != 0 {
                    r.warning(format!(
                        "BAT entry {i} in state {st} has a non-zero file offset {}",
                        bat_offset(e)
                    ));
                }
                continue;
            }
            allocated += 1;
            geo.block_size
        };
        let off = bat_offset(e);
        if off >= file_len {
            r.corruption(format!(
                "VHDX BAT entry {i} start offset {off} points after end of file ({file_len}). Image has probably been truncated."
            ));
            continue;
        }
        if off + len > file_len {
            r.warning(format!(
                "VHDX BAT entry {i} block at {off} runs past the end of the file ({file_len}); the tail reads as zeros"
            ));
        }
        used.push((off, off + len, format!("BAT entry {i}")));
    }
    for (a, b) in used.iter().take(fixed_n).enumerate().flat_map(|(i, a)| {
        used.iter()
            .skip(i + 1)
            .take(fixed_n - i - 1)
            .map(move |b| (a, b))
    }) {
        if a.0 < b.1 && b.0 < a.1 {
            r.corruption(format!("{} and {} overlap", a.2, b.2));
        }
    }
    let mut sorted: Vec<&(u64, u64, String)> = used.iter().collect();
    sorted.sort_by_key(|x| (x.0, x.1));
    let mut end = 0u64;
    let mut last_name = String::new();
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    for u in &sorted {
        if u.0 < end {
            r.corruption(format!(
                "{} at {:#x} overlaps {} (ends at {end:#x})",
                u.2, u.0, last_name
            ));
        } else if u.0 > end {
            gaps.push((end, u.0));
        }
        if u.1 > end {
            end = u.1;
            last_name = u.2.clone();
        }
    }
    if file_len > round_up_mib(end) {
        gaps.push((round_up_mib(end), file_len));
    }
    let mut leaked = 0u64;
    for (a, b) in &gaps {
        let mut o = *a;
        while o < *b {
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

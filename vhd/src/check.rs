//! `check`: consistency of footer, header, BAT and file layout, with qemu-img-style repair.

use std::sync::Arc;

use disk::check::Repair;
use disk::{CheckReport, Error, Result, Storage};

use crate::bat::UNALLOCATED;
use crate::dynamic_header::HEADER_SIZE;
use crate::footer::{DiskType, FOOTER_SIZE};
use crate::io::{flush_storage, write_all};
use crate::limits::SECTOR;
use crate::open::load_with;
use crate::SizeRule;

/// Checks a VHD. `Repair::Leaks` trims trailing leaked space (footer moved first, then the file
/// truncated); `Repair::All` also rewrites bad footers/header checksums and the footer copy.
/// Leaked space inside the file (between blocks) is reported but only `compact` reclaims it.
pub fn check(storage: Arc<dyn Storage>, repair: Repair) -> Result<CheckReport> {
    check_with_cache(storage, repair, crate::DEFAULT_BAT_CACHE_BYTES)
}

/// [`check`], keeping at most `bat_cache_bytes` of BAT pages in memory.
pub fn check_with_cache(
    storage: Arc<dyn Storage>,
    repair: Repair,
    bat_cache_bytes: usize,
) -> Result<CheckReport> {
    let s = &*storage;
    let mut r = CheckReport {
        filename: s
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        format: "vhd".into(),
        ..Default::default()
    };
    let meta = match load_with(s, SizeRule::Auto, false, bat_cache_bytes) {
        Ok(m) => m,
        Err(e @ Error::WrongFormat { .. }) | Err(e @ Error::Io { .. }) => return Err(e),
        Err(e) => {
            r.corruption(e.to_string());
            return Ok(r);
        }
    };
    let kind = meta.footer.disk_type().unwrap_or(DiskType::Fixed);
    let fix_all = repair == Repair::All;
    let fix_leaks = repair != Repair::None;

    for w in &meta.warnings {
        if !w.contains("checksum") && !w.contains("footer copy") && !w.contains("no valid footer") {
            r.warning(w.clone());
        }
    }
    let mut footer_bad = false;
    if !meta.trailer_ok {
        r.corruption("no valid footer at end of file (the copy at offset 0 was used)");
        footer_bad = true;
    }
    if !meta.footer_checksum_ok {
        r.corruption(format!(
            "VHD footer checksum mismatch (stored {:#010x})",
            meta.footer.stored_checksum
        ));
        footer_bad = true;
    }
    if !meta.copy_matches {
        r.corruption("footer copy at offset 0 differs from the footer at end of file");
        footer_bad = true;
    }
    for (off, msg) in &meta.errors {
        r.corruption(format!("VHD BAT at offset {off:#x}: {msg}"));
    }

    let mut footer_pos = meta.footer_pos;
    if kind != DiskType::Fixed {
        let Some(h) = meta.header.as_ref() else {
            r.corruption("dynamic header missing");
            return Ok(r);
        };
        let header_bad = !meta.header_checksum_ok;
        if header_bad {
            r.corruption(format!(
                "VHD dynamic header checksum mismatch (stored {:#010x})",
                h.stored_checksum
            ));
        }
        let slot = meta.bitmap + meta.block_size as u64;
        let mut meta_end = meta.header_offset + HEADER_SIZE as u64;
        meta_end = meta_end.max(meta.bat.entry_offset(meta.bat.len()));
        for l in &meta.locators {
            meta_end = meta_end.max(l.data_offset + l.data_length as u64);
        }
        let mut blocks: Vec<(u64, u64)> = meta
            .bat
            .allocated(s)?
            .into_iter()
            .filter(|&(_, e)| e != UNALLOCATED)
            .map(|(i, e)| (e as u64 * SECTOR, i))
            .collect();
        blocks.sort_unstable();
        r.total_clusters = Some(meta.bat.len());
        r.allocated_clusters = Some(blocks.len() as u64);
        let mut frag = 0;
        for w in blocks.windows(2) {
            if w[0].0 + slot > w[1].0 {
                r.corruption(format!(
                    "blocks {} and {} overlap (offsets {} and {})",
                    w[0].1, w[1].1, w[0].0, w[1].0
                ));
            }
            if w[1].1 != w[0].1 + 1 {
                frag += 1;
            }
        }
        r.fragmented_clusters = Some(frag);
        // Sector bitmaps: readable, and (dynamic disks) fully set. qemu and we read an
        // allocated dynamic block whole; a reader honouring the bitmap would see zeros where
        // bits are clear, so partial bitmaps are worth a warning.
        let mut partial = 0u64;
        let mut bm = vec![0u8; meta.bitmap as usize];
        let sectors = meta.block_size as u64 / SECTOR;
        for &(off, i) in &blocks {
            if off + meta.bitmap > meta.file_len {
                continue; // already reported as a BAT error
            }
            if let Err(e) = s.read_at(&mut bm, off) {
                r.check_errors += 1;
                r.warning(format!("cannot read the bitmap of block {i} at {off}: {e}"));
                continue;
            }
            if kind == DiskType::Dynamic {
                let full = (0..sectors).all(|k| bm[(k / 8) as usize] & (0x80 >> (k % 8)) != 0);
                if !full {
                    partial += 1;
                }
            }
        }
        if partial > 0 {
            r.warning(format!(
                "{partial} allocated block(s) of this dynamic disk have partly clear sector bitmaps; their stored data is read as is (like qemu)"
            ));
        }
        // Leaks: gaps of at least one block slot between the metadata, the blocks and the footer.
        let mut prev = meta_end;
        for &(off, i) in &blocks {
            if off > prev && off - prev >= slot {
                r.leak(format!(
                    "{} bytes unreferenced at {prev}..{off} (before block {i})",
                    off - prev
                ));
            }
            prev = prev.max(off + slot);
        }
        let data_end = prev;
        if footer_pos > data_end && footer_pos - data_end >= slot {
            r.leak(format!(
                "{} bytes unreferenced at end of file ({data_end}..{footer_pos})",
                footer_pos - data_end
            ));
            if fix_leaks && meta.errors.is_empty() {
                write_all(s, &meta.footer.to_bytes(), data_end, "VHD footer")?;
                flush_storage(s)?;
                s.set_len(data_end + FOOTER_SIZE as u64)
                    .map_err(|e| Error::io("truncating VHD file", e))?;
                flush_storage(s)?;
                footer_pos = data_end;
                r.leaks_fixed += 1;
                if let Some(f) = r.findings.last_mut() {
                    f.fixed = true;
                }
            }
        }
        if header_bad && fix_all {
            write_all(s, &h.to_bytes(), meta.header_offset, "VHD dynamic header")?;
            flush_storage(s)?;
            r.corruptions_fixed += 1;
            mark_fixed(&mut r, "dynamic header checksum");
        }
    }
    if footer_bad && fix_all {
        let b = meta.footer.to_bytes();
        write_all(s, &b, footer_pos, "VHD footer")?;
        flush_storage(s)?;
        if kind != DiskType::Fixed {
            write_all(s, &b, 0, "VHD footer copy")?;
            flush_storage(s)?;
        }
        for pat in ["no valid footer", "footer checksum", "footer copy"] {
            if mark_fixed(&mut r, pat) {
                r.corruptions_fixed += 1;
            }
        }
    }
    r.image_end_offset = Some(footer_pos + FOOTER_SIZE as u64);
    Ok(r)
}

fn mark_fixed(r: &mut CheckReport, pat: &str) -> bool {
    for f in r.findings.iter_mut() {
        if f.kind == "corruption" && !f.fixed && f.message.contains(pat) {
            f.fixed = true;
            return true;
        }
    }
    false
}

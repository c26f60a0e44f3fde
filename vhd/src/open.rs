//! Opening: probing, then footer, size rule, dynamic header, BAT and parent locators, each a
//! step that checks what it read before the next one trusts it. Tolerances are described in the
//! crate documentation and docs/vhd.md.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use disk::{Access, Error, FileStorage, Result, Storage};
use serde::Serialize;

use crate::bat::{self, Bat, Layout};
use crate::bitmap::bitmap_bytes;
use crate::dynamic_header::{DynHeader, BLOCK_SIZE_FIELD, HEADER_SIZE, MAX_TABLE_ENTRIES_FIELD};
use crate::footer::{fourcc, DiskType, Footer, DATA_OFFSET_FIELD, DISK_TYPE_FIELD, FOOTER_SIZE};
use crate::geometry::chs_sectors;
use crate::io::{io_err, read_exact};
use crate::limits::*;
use crate::locator::{platform_name, LocatorInfo, PLAT_NONE};
use crate::{Meta, VhdDisk};

/// BAT pages a handle keeps in memory by default: 1 MiB of entries (all of a 512 GiB disk
/// with 2 MiB blocks).
pub const DEFAULT_BAT_CACHE_BYTES: usize = bat::DEFAULT_CACHE_BYTES;

/// Which size authority to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SizeRule {
    /// qemu 10 rule: CHS for creators `vpc ` and `qemu` (unless the geometry is the
    /// 65535/16/255 marker), `current_size` for everything else.
    #[default]
    Auto,
    Chs,
    CurrentSize,
}

#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    pub size_rule: SizeRule,
}

/// The footer an open settled on, and what it learned on the way.
struct FoundFooter {
    footer: Footer,
    /// Offset of the trailing footer (the file length when only the copy at 0 was usable).
    pos: u64,
    trailer_ok: bool,
    checksum_ok: bool,
    copy_matches: bool,
    warnings: Vec<String>,
}

fn is_sparse(f: &Footer) -> bool {
    f.disk_type().is_some_and(DiskType::is_sparse)
}

/// Step 1: the footer at the end (512 or 511 bytes), else the copy at offset 0; the valid one of
/// the two when they differ.
fn find_footer(storage: &dyn Storage, len: u64) -> Result<FoundFooter> {
    let mut warnings = Vec::new();
    let mut trailer = [0u8; FOOTER_SIZE];
    read_exact(storage, &mut trailer, len - 512, "VHD footer")?;
    let mut copy = [0u8; FOOTER_SIZE];
    read_exact(storage, &mut copy, 0, "VHD footer copy")?;
    let copy_footer = Footer::parse(&copy).filter(is_sparse);

    let mut trailer_ok = true;
    let (mut raw, mut pos) = (trailer, len - 512);
    if Footer::parse(&trailer).is_none() {
        // Old Virtual PC wrote 511-byte footers (the last reserved byte missing).
        let mut short = [0u8; FOOTER_SIZE];
        let got511 = len >= 511
            && read_exact(storage, &mut short[..511], len - 511, "VHD footer").is_ok()
            && Footer::parse(&short).is_some();
        if got511 {
            warnings.push("511-byte footer at end of file (old Virtual PC); accepted".into());
            raw = short;
            pos = len - 511;
        } else if copy_footer.is_some() {
            trailer_ok = false;
            warnings
                .push("no valid footer at end of file; using the footer copy at offset 0".into());
            raw = copy;
            pos = len;
        } else {
            return Err(Error::WrongFormat {
                format: "vhd",
                detail: "no 'conectix' footer at end of file or at offset 0".into(),
            });
        }
    }
    let Some(mut footer) = Footer::parse(&raw) else {
        return Err(Error::corrupt("VHD footer", pos, "bad cookie"));
    };
    let mut checksum_ok = footer.checksum_ok(&raw);
    let mut copy_matches = true;
    // Only a dynamic/differencing trailer has a copy at 0; on a fixed disk offset 0 is guest
    // data (which may well be another VHD).
    if let Some(copy_footer) = copy_footer.filter(|_| trailer_ok && is_sparse(&footer)) {
        copy_matches = copy == raw;
        if !copy_matches {
            if !checksum_ok && copy_footer.checksum_ok(&copy) {
                warnings.push(
                    "footer at end of file has a bad checksum; using the valid copy at offset 0"
                        .into(),
                );
                raw = copy;
                footer = copy_footer;
                checksum_ok = true;
            } else {
                warnings.push("footer copy at offset 0 differs from the footer at end of file; using the one at end of file".into());
            }
        }
    }
    if !checksum_ok {
        warnings.push(format!(
            "footer checksum mismatch (stored {:#010x}, computed {:#010x}); accepted like older qemu/libvhdi/Windows",
            footer.stored_checksum,
            footer.computed_checksum(&raw)
        ));
    }
    Ok(FoundFooter {
        footer,
        pos,
        trailer_ok,
        checksum_ok,
        copy_matches,
        warnings,
    })
}

/// Step 2: fields that are odd but harmless.
fn footer_warnings(footer: &Footer, warnings: &mut Vec<String>) {
    if footer.features & crate::footer::FEATURES_RESERVED == 0 {
        warnings.push(format!(
            "footer features {:#x} lack the reserved bit 0x2",
            footer.features
        ));
    }
    if footer.saved_state != 0 {
        warnings.push(
            "saved-state flag is set: a virtual machine saved its state with this disk".into(),
        );
    }
    if footer.version != crate::footer::FOOTER_VERSION {
        warnings.push(format!(
            "footer file format version {:#x} (expected 0x10000)",
            footer.version
        ));
    }
}

/// Step 3: the virtual size by the size rule (docs/vhd.md, "CHS geometry and the size rule"):
/// (size, rule name, why).
fn size_by_rule(
    footer: &Footer,
    rule: SizeRule,
    warnings: &mut Vec<String>,
) -> (u64, &'static str, String) {
    let chs_sec = chs_sectors(footer.geometry);
    let is_max = chs_sec == MAX_CHS_SECTORS;
    let app = footer.creator_app;
    let creator_chs = &app == b"vpc " || &app == b"qemu";
    let (mut size, rule_name, reason): (u64, &'static str, String) = match rule {
        SizeRule::CurrentSize => (
            footer.current_size,
            "current_size",
            "forced current_size".into(),
        ),
        SizeRule::Chs if !is_max => (chs_sec * SECTOR, "chs", "forced chs".into()),
        SizeRule::Chs => (
            footer.current_size,
            "current_size",
            "forced chs, but the geometry is the 65535/16/255 marker".into(),
        ),
        SizeRule::Auto if creator_chs && !is_max => (
            chs_sec * SECTOR,
            "chs",
            format!(
                "creator {:?} uses CHS geometry (qemu 10 rule)",
                fourcc(&app)
            ),
        ),
        SizeRule::Auto => (
            footer.current_size,
            "current_size",
            format!("creator {:?}: current_size is the authority", fourcc(&app)),
        ),
    };
    if size % SECTOR != 0 {
        warnings.push(format!(
            "virtual size {size} is not a multiple of 512; rounded down"
        ));
        size -= size % SECTOR;
    }
    (size, rule_name, reason)
}

/// Step 4 (dynamic/differencing): the dynamic header at the footer's data offset, and whether
/// its checksum holds.
fn read_dynamic_header(
    storage: &dyn Storage,
    footer: &Footer,
    footer_pos: u64,
    len: u64,
) -> Result<(DynHeader, bool, u32)> {
    let hoff = footer.data_offset;
    if hoff.checked_add(HEADER_SIZE as u64).is_none_or(|e| e > len) || hoff < 512 {
        return Err(Error::corrupt(
            "VHD footer",
            footer_pos + DATA_OFFSET_FIELD,
            format!("dynamic header offset {hoff:#x} is outside the file (length {len})"),
        ));
    }
    let mut raw = [0u8; HEADER_SIZE];
    read_exact(storage, &mut raw, hoff, "VHD dynamic header")?;
    let Some(header) = DynHeader::parse(&raw) else {
        return Err(Error::corrupt(
            "VHD dynamic header",
            hoff,
            "cookie is not 'cxsparse'",
        ));
    };
    let ok = header.checksum_ok(&raw);
    let computed = header.computed_checksum(&raw);
    Ok((header, ok, computed))
}

/// Step 5: block size and table size agree with the virtual size and fit the file. Returns the
/// number of BAT entries in use.
fn check_table(header: &DynHeader, hoff: u64, size: u64, len: u64) -> Result<u64> {
    let bs = header.block_size;
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(Error::corrupt(
            "VHD dynamic header",
            hoff + BLOCK_SIZE_FIELD,
            format!("block size {bs:#x} is not a power of two between 512 B and 256 MiB"),
        ));
    }
    let needed = size.div_ceil(bs as u64);
    if needed > header.max_table_entries as u64 {
        return Err(Error::corrupt(
            "VHD dynamic header",
            hoff + MAX_TABLE_ENTRIES_FIELD,
            format!(
                "max table entries {} cannot cover virtual size {size} with {bs}-byte blocks (needs {needed})",
                header.max_table_entries
            ),
        ));
    }
    if needed > MAX_BAT_ENTRIES {
        return Err(Error::Unsupported(format!(
            "virtual size {size} with {bs}-byte blocks needs {needed} BAT entries; at most {MAX_BAT_ENTRIES} are supported"
        )));
    }
    let bat_off = header.table_offset;
    let bat_bytes = needed * bat::ENTRY_SIZE;
    // The BAT must be in the file: this bounds what reading it costs by the file size.
    if bat_off.checked_add(bat_bytes).is_none_or(|e| e > len) {
        return Err(Error::corrupt(
            "VHD BAT",
            bat_off,
            format!("{needed} entries ({bat_bytes} bytes) extend past end of file ({len})"),
        ));
    }
    Ok(needed)
}

/// Step 6 (differencing): the parent locators and their payloads.
pub(crate) fn read_locators(
    storage: &dyn Storage,
    header: &DynHeader,
    hoff: u64,
    len: u64,
) -> Result<Vec<LocatorInfo>> {
    let mut locators = Vec::new();
    for (i, l) in header.locators.iter().enumerate() {
        if l.code == PLAT_NONE {
            continue;
        }
        let field = DynHeader::locator_field(hoff, i);
        if l.data_len > MAX_LOCATOR_LEN {
            return Err(Error::corrupt(
                "VHD parent locator",
                field,
                format!(
                    "locator {i} data length {} exceeds {MAX_LOCATOR_LEN}",
                    l.data_len
                ),
            ));
        }
        if l.data_offset
            .checked_add(l.data_len as u64)
            .is_none_or(|e| e > len)
        {
            return Err(Error::corrupt(
                "VHD parent locator",
                field,
                format!(
                    "locator {i} ({}) data at {}+{} is outside the file (length {len})",
                    platform_name(l.code),
                    l.data_offset,
                    l.data_len
                ),
            ));
        }
        let mut data = vec![0u8; l.data_len as usize];
        read_exact(storage, &mut data, l.data_offset, "VHD parent locator data")?;
        locators.push(LocatorInfo::new(i, l, &data));
    }
    Ok(locators)
}

/// Parses footer, header, BAT and locators. `strict` refuses structural problems; otherwise they
/// are collected in `Meta::errors` (for check) and the offending BAT entries are kept as is.
/// [`load`] with a bound on the BAT pages kept in memory.
pub(crate) fn load_with(
    storage: &dyn Storage,
    rule: SizeRule,
    strict: bool,
    bat_cache_bytes: usize,
) -> Result<Meta> {
    let len = storage
        .len()
        .map_err(|e| io_err("reading VHD file length", e))?;
    if len < FOOTER_SIZE as u64 {
        return Err(Error::WrongFormat {
            format: "vhd",
            detail: format!("file is {len} bytes, smaller than a VHD footer"),
        });
    }
    let found = find_footer(storage, len)?;
    let (footer, footer_pos) = (found.footer, found.pos);
    let mut warnings = found.warnings;
    footer_warnings(&footer, &mut warnings);
    let Some(kind) = footer.disk_type() else {
        return Err(Error::corrupt(
            "VHD footer",
            footer_pos + DISK_TYPE_FIELD,
            format!(
                "disk type {} is not fixed (2), dynamic (3) or differencing (4)",
                footer.disk_type_code
            ),
        ));
    };
    let (size, rule_name, reason) = size_by_rule(&footer, rule, &mut warnings);
    let mut meta = Meta {
        footer,
        header: None,
        header_offset: 0,
        size,
        rule: rule_name,
        rule_reason: reason,
        bat: Bat::default(),
        block_size: 0,
        bitmap: 0,
        locators: Vec::new(),
        footer_pos,
        file_len: len,
        warnings,
        errors: Vec::new(),
        trailer_ok: found.trailer_ok,
        footer_checksum_ok: found.checksum_ok,
        copy_matches: found.copy_matches,
        header_checksum_ok: true,
        bitmap_lsb: false,
    };

    if kind == DiskType::Fixed {
        if size > footer_pos {
            return Err(Error::corrupt(
                "VHD fixed disk data",
                0,
                format!(
                    "virtual size {size} needs {size} data bytes but the file holds {footer_pos} before its footer (truncated?)"
                ),
            ));
        }
        return Ok(meta);
    }

    let (header, header_checksum_ok, computed) =
        read_dynamic_header(storage, &meta.footer, footer_pos, len)?;
    let hoff = meta.footer.data_offset;
    if !header_checksum_ok {
        meta.header_checksum_ok = false;
        meta.warnings.push(format!(
            "dynamic header checksum mismatch (stored {:#010x}, computed {computed:#010x}); accepted like qemu (which does not check it)",
            header.stored_checksum,
        ));
    }
    let entries = check_table(&header, hoff, size, len)?;
    let bs = header.block_size;
    let bitmap = bitmap_bytes(bs);
    let bat_off = header.table_offset;
    let layout = Layout {
        metadata: [
            (0u64, 512u64),
            (hoff, hoff + HEADER_SIZE as u64),
            (bat_off, bat_off + entries * bat::ENTRY_SIZE),
        ],
        data_end: footer_pos,
        file_len: len,
        slot: bitmap + bs as u64,
    };
    let (bat, errors) = Bat::open(storage, bat_off, entries, bat_cache_bytes, layout, strict)?;

    if kind == DiskType::Differencing {
        meta.locators = read_locators(storage, &header, hoff, len)?;
        if header
            .parent_name
            .iter()
            .any(|&u| (0xD800..0xE000).contains(&u))
            && String::from_utf16(&header.parent_name).is_err()
        {
            meta.warnings.push(
                "parent name contains unpaired UTF-16 surrogates; shown lossily, kept raw".into(),
            );
        }
    }
    if &meta.footer.creator_app == b"tap\0" && meta.footer.creator_version == 1 {
        meta.bitmap_lsb = true;
        meta.warnings.push(
            "creator blktap version 0x00000001: sector bitmaps read LSB-first like it wrote them"
                .into(),
        );
    }
    meta.errors = errors;
    meta.header = Some(header);
    meta.header_offset = hoff;
    meta.bat = bat;
    meta.block_size = bs;
    meta.bitmap = bitmap;
    Ok(meta)
}

impl VhdDisk {
    /// True when the bytes say VHD by the rules of [`VhdDisk::probe_rule`].
    pub fn probe(storage: &dyn Storage) -> Result<bool> {
        Ok(Self::probe_rule(storage)?.is_some())
    }

    /// Whether the store is a VHD, judged only by what guest data of a raw disk cannot fake
    /// without also matching the file's real layout; returns the rule that matched.
    ///
    /// * A footer cookie at offset 0 (every dynamic VHD has its footer copy there; qemu probes
    ///   VHD by this alone). A raw image opened by us with a probed format refuses writes that
    ///   would create it.
    /// * A trailing footer (last 512 bytes, or 511 for old Virtual PC) with a valid checksum
    ///   that agrees with the file: for a fixed disk, file size == current size + 512 (or +511)
    ///   exactly; for a dynamic/differencing disk, a dynamic header cookie at its data offset.
    ///
    /// A footer with a bad checksum or a size that disagrees is guest data: the file is raw
    /// (open it with an explicit `vhd` format to read it anyway).
    pub fn probe_rule(storage: &dyn Storage) -> Result<Option<&'static str>> {
        let len = storage
            .len()
            .map_err(|e| io_err("reading file length", e))?;
        if len < 511 {
            return Ok(None);
        }
        let read = |buf: &mut [u8], off: u64| -> Result<bool> {
            match storage.read_at(buf, off) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
                Err(e) => Err(io_err("probing for a VHD footer", e)),
            }
        };
        let mut b = [0u8; FOOTER_SIZE];
        if len >= 512 && read(&mut b, 0)? && Footer::parse(&b).is_some() {
            return Ok(Some(
                "VHD footer cookie 'conectix' at offset 0 (a dynamic VHD's footer copy)",
            ));
        }
        for (footer_len, rule_fixed, rule_sparse) in [
            (
                512u64,
                "fixed VHD footer at end of file (valid checksum, file size = current size + 512)",
                "dynamic VHD footer at end of file (valid checksum, dynamic header at its data offset)",
            ),
            (
                511,
                "fixed VHD 511-byte footer at end of file (valid checksum, file size = current size + 511)",
                "dynamic VHD 511-byte footer at end of file (valid checksum, dynamic header at its data offset)",
            ),
        ] {
            let mut b = [0u8; FOOTER_SIZE];
            if len < footer_len || !read(&mut b[..footer_len as usize], len - footer_len)? {
                continue;
            }
            let Some(f) = Footer::parse(&b).filter(|f| f.checksum_ok(&b)) else {
                continue;
            };
            match f.disk_type() {
                Some(DiskType::Fixed) if f.current_size.checked_add(footer_len) == Some(len) => {
                    return Ok(Some(rule_fixed))
                }
                Some(DiskType::Dynamic) | Some(DiskType::Differencing) => {
                    let mut h = [0u8; HEADER_SIZE];
                    if f.data_offset.checked_add(HEADER_SIZE as u64).is_some_and(|e| e <= len)
                        && read(&mut h, f.data_offset)?
                        && DynHeader::parse(&h).is_some()
                    {
                        return Ok(Some(rule_sparse));
                    }
                }
                _ => {}
            }
        }
        Ok(None)
    }

    pub fn open(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<VhdDisk> {
        Self::open_with_cache(storage, opts, DEFAULT_BAT_CACHE_BYTES)
    }

    /// [`VhdDisk::open`], keeping at most `bat_cache_bytes` of BAT pages in memory (4 KiB
    /// each, at least one page is useful; 0 reads every lookup from the file).
    pub fn open_with_cache(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        bat_cache_bytes: usize,
    ) -> Result<VhdDisk> {
        let meta = load_with(&*storage, opts.size_rule, true, bat_cache_bytes)?;
        let kind = meta.kind();
        Ok(VhdDisk {
            path: storage.path().map(Path::to_path_buf),
            storage,
            read_only: opts.read_only,
            kind,
            meta: RwLock::new(meta),
            wlock: Mutex::new(()),
            parent: None,
            failed: disk::FailLatch::new(),
        })
    }

    pub fn open_path(path: &Path, opts: &OpenOptions) -> Result<VhdDisk> {
        Self::open_path_with_cache(path, opts, DEFAULT_BAT_CACHE_BYTES)
    }

    /// [`VhdDisk::open_path`] with a bound on the BAT page cache (see
    /// [`VhdDisk::open_with_cache`]).
    pub fn open_path_with_cache(
        path: &Path,
        opts: &OpenOptions,
        bat_cache_bytes: usize,
    ) -> Result<VhdDisk> {
        let access = if opts.read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        let s = FileStorage::open(path, access, true)?;
        Self::open_with_cache(Arc::new(s), opts, bat_cache_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::Guid;

    fn footer(app: &[u8; 4], geometry: (u16, u8, u8), current: u64) -> Footer {
        let mut f = Footer::new(DiskType::Dynamic, current, Guid::NIL);
        f.creator_app = *app;
        f.geometry = geometry;
        f
    }

    #[test]
    fn size_rule_is_qemu_10s() {
        let chs = (1000, 16, 63);
        let chs_bytes = chs_sectors(chs) * SECTOR;
        let mut w = Vec::new();
        let size = |app: &[u8; 4], g, rule, w: &mut Vec<String>| {
            size_by_rule(&footer(app, g, 1 << 30), rule, w).0
        };
        assert_eq!(size(b"qemu", chs, SizeRule::Auto, &mut w), chs_bytes);
        assert_eq!(size(b"vpc ", chs, SizeRule::Auto, &mut w), chs_bytes);
        assert_eq!(size(b"win ", chs, SizeRule::Auto, &mut w), 1 << 30);
        assert_eq!(size(b"wa\0\0", chs, SizeRule::Auto, &mut w), 1 << 30);
        assert_eq!(size(b"win ", chs, SizeRule::Chs, &mut w), chs_bytes);
        assert_eq!(size(b"qemu", chs, SizeRule::CurrentSize, &mut w), 1 << 30);
        // The 65535/16/255 marker means "use current_size", even when forced.
        let max = (65535, 16, 255);
        assert_eq!(size(b"qemu", max, SizeRule::Chs, &mut w), 1 << 30);
        assert!(w.is_empty());
        let odd = size_by_rule(&footer(b"win ", chs, 1000), SizeRule::Auto, &mut w).0;
        assert_eq!(odd, 512);
        assert_eq!(w.len(), 1, "rounding down is reported");
    }
}

//! Generator of hostile (malformed) VHD and VHDX images, written at test time into a temporary
//! directory (no binaries are committed). Every image is built from a sound image made by our
//! own writers, then damaged at a known structure: truncated at a structure boundary, a field
//! set to a hostile value (checksums recomputed so the structural check is what fires, unless
//! the checksum is the point), or a parent link aimed at something that is not the parent.
//!
//! Each [`Hostile`] must be refused with a typed error by every entry point.

use std::path::{Path, PathBuf};

use disk::BlockDevice;

use vhdx::format::crc32c_skip;

// Little-endian field access for damaging images at known offsets (test code only; the
// library reads and writes these structures as typed structs).
fn rd32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn rd64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
fn rdguid(b: &[u8], o: usize) -> vhdx::format::Guid {
    vhdx::format::Guid::from_windows_bytes(b[o..o + 16].try_into().unwrap())
}
fn wr32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn wr64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

pub struct Hostile {
    pub name: String,
    pub path: PathBuf,
    pub expect: Expect,
}

/// What the entry points must do with an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Every entry point refuses it (check: exit 1..=3).
    Refused,
    /// The damage is in the chain (parent missing, cyclic, not a file, not the parent), not in
    /// the file: a per-file `check` may call the file clean, and plain `info` (which shows the
    /// top image) may succeed with a warning; everything that reads the chain refuses it.
    ChainOnly,
    /// Damage the format tells us to ignore (a log entry with a bad CRC, wrong log GUID, torn
    /// or wrapped: it was never committed, so replay stops before it). Must open or fail
    /// cleanly; never panic. Not counted among the refused images.
    Tolerated,
    /// Not the format its bytes pretend: by the probing rules (a trailing VHD footer counts only
    /// when it agrees with the file's size) it is a raw disk of the file's size, which every
    /// entry point opens as such, and raw has no check (exit 63, as qemu-img). Never read as
    /// the format it pretends.
    ReadAsRaw,
}

fn be32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_be_bytes());
}
fn be64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_be_bytes());
}
/// VHD checksum: one's complement of the byte sum, the 4-byte field taken as zero.
fn vhd_checksum(buf: &[u8], field: usize) -> u32 {
    let mut sum: u32 = 0;
    for (i, &b) in buf.iter().enumerate() {
        if i < field || i >= field + 4 {
            sum = sum.wrapping_add(b as u32);
        }
    }
    !sum
}

fn rbe32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn rbe64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// Recomputes the VHD footer checksums (copy at 0 and trailer) and the dynamic header's.
fn vhd_fix(img: &mut [u8]) {
    let n = img.len();
    if n >= 512 && &img[n - 512..n - 504] == b"conectix" {
        let c = vhd_checksum(&img[n - 512..], 64);
        be32(img, n - 512 + 64, c);
    }
    if n >= 512 && &img[0..8] == b"conectix" {
        let c = vhd_checksum(&img[..512], 64);
        be32(img, 64, c);
    }
    if n >= 1536 && &img[512..520] == b"cxsparse" {
        let c = vhd_checksum(&img[512..1536], 36);
        be32(img, 512 + 36, c);
    }
}

/// Applies `f` to both footers (at 0 and at the end) of a dynamic VHD.
fn vhd_footers(img: &mut [u8], f: impl Fn(&mut [u8])) {
    let n = img.len();
    f(&mut img[n - 512..]);
    if &img[0..8] == b"conectix" {
        f(&mut img[..512]);
    }
}

fn fix_vhdx_crcs(img: &mut [u8]) {
    for (off, len) in [
        (64usize << 10, 4096usize),
        (128 << 10, 4096),
        (192 << 10, 65536),
        (256 << 10, 65536),
    ] {
        if img.len() >= off + len {
            let c = crc32c_skip(&img[off..off + len], 4);
            wr32(&mut img[off..off + len], 4, c);
        }
    }
}

struct VhdxLayout {
    bat: usize,
    bat_len: usize,
    meta: usize,
    log: usize,
    log_len: usize,
}

fn region(img: &[u8], guid: &vhdx::format::Guid) -> (usize, usize, usize) {
    let rt = 192 << 10;
    let n = rd32(img, rt + 8) as usize;
    for i in 0..n {
        let e = rt + 16 + i * 32;
        if &rdguid(img, e) == guid {
            return (e, rd64(img, e + 16) as usize, rd32(img, e + 24) as usize);
        }
    }
    panic!("region missing in generated VHDX");
}

fn vhdx_layout(img: &[u8]) -> VhdxLayout {
    let (_, bat, bat_len) = region(img, &vhdx::format::GUID_BAT);
    let (_, meta, _) = region(img, &vhdx::format::GUID_METADATA);
    // The current header is the one with the larger sequence number.
    let h = if rd64(img, (64 << 10) + 8) >= rd64(img, (128 << 10) + 8) {
        64 << 10
    } else {
        128 << 10
    };
    VhdxLayout {
        bat,
        bat_len,
        meta,
        log: rd64(img, h + 72) as usize,
        log_len: rd32(img, h + 68) as usize,
    }
}

/// Offset (in the file) of a metadata item's data.
fn meta_item(img: &[u8], meta: usize, guid: &vhdx::format::Guid) -> usize {
    let count = u16::from_le_bytes([img[meta + 10], img[meta + 11]]) as usize;
    for i in 0..count {
        let e = meta + 32 + i * 32;
        if &rdguid(img, e) == guid {
            return meta + rd32(img, e + 16) as usize;
        }
    }
    panic!("metadata item missing in generated VHDX");
}

fn meta_entry(img: &[u8], meta: usize, guid: &vhdx::format::Guid) -> usize {
    let count = u16::from_le_bytes([img[meta + 10], img[meta + 11]]) as usize;
    (0..count)
        .map(|i| meta + 32 + i * 32)
        .find(|&e| &rdguid(img, e) == guid)
        .expect("metadata entry")
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8 ^ seed).wrapping_mul(7) | 1)
        .collect()
}

fn make(path: &Path, spec: &chain::CreateSpec, writes: &[(u64, u8)]) {
    let d = chain::create(path, spec).expect("create sound image");
    for &(off, seed) in writes {
        d.write_at(&pattern(65536, seed), off).expect("write");
    }
    d.close().expect("close");
}

/// A dirty VHDX (log entries pending) made by crashing a writer on a fault-injecting store.
pub fn dirty_vhdx(base: &[u8]) -> Option<Vec<u8>> {
    use disk::fault::{FaultPlan, FaultyStorage};
    use std::sync::Arc;
    for crash_at in 1..64 {
        let fs = Arc::new(FaultyStorage::new(
            base.to_vec(),
            FaultPlan {
                crash_at: Some(crash_at),
                ..Default::default()
            },
        ));
        if let Ok(d) = vhdx::VhdxDisk::open(fs.clone(), &vhdx::OpenOptions { read_only: false }) {
            let _ = d.write_at(&pattern(4096, 9), 3 << 20);
            let _ = d.flush();
            std::mem::forget(d);
        }
        let img = fs.durable();
        let m = Arc::new(disk::MemStorage::from_vec(img.clone()));
        if let Ok(d) = vhdx::VhdxDisk::open(m, &vhdx::OpenOptions { read_only: true }) {
            if d.dirty() {
                return Some(img);
            }
        }
    }
    None
}

/// Finds the first valid log entry ("loge") in a dirty image's log region.
fn first_log_entry(img: &[u8], l: &VhdxLayout) -> Option<usize> {
    (0..l.log_len / 4096)
        .map(|i| l.log + i * 4096)
        .find(|&o| &img[o..o + 4] == b"loge")
}

/// Damage done to a copy of a sound image.
type Damage = Box<dyn Fn(&mut Vec<u8>)>;

fn put(out: &mut Vec<Hostile>, dir: &Path, name: &str, img: &[u8], expect: Expect) {
    let path = dir.join(name);
    std::fs::write(&path, img).unwrap();
    out.push(Hostile {
        name: name.to_string(),
        path,
        expect,
    });
}

pub fn generate(dir: &Path) -> Vec<Hostile> {
    let mut out: Vec<Hostile> = Vec::new();
    let src = dir.join("sound");
    std::fs::create_dir_all(&src).unwrap();

    // ---- VHD dynamic: footer copy | header (512) | BAT (1536) | blocks | footer ----
    let dyn_path = src.join("dyn.vhd");
    let mut spec = chain::CreateSpec::new(chain::Format::Vhd, 8 << 20);
    spec.block_size = Some(1 << 20);
    make(&dyn_path, &spec, &[(0, 1), (3 << 20, 2)]);
    let vd = std::fs::read(&dyn_path).unwrap();
    let bat = rbe64(&vd, 512 + 16) as usize;
    let entries = rbe32(&vd, 512 + 28) as usize;
    let first_block = rbe32(&vd, bat) as usize * 512;
    for (name, cut) in [
        ("vhd-trunc-footer-copy-only.vhd", 512),
        ("vhd-trunc-mid-header.vhd", 1024),
        ("vhd-trunc-after-header.vhd", 1536),
        ("vhd-trunc-mid-bat.vhd", bat + 2),
        ("vhd-trunc-after-bat.vhd", bat + entries * 4),
        ("vhd-trunc-mid-bitmap.vhd", first_block + 100),
        ("vhd-trunc-mid-block.vhd", first_block + 4096 + 300 * 1024),
    ] {
        put(&mut out, dir, name, &vd[..cut], Expect::Refused);
    }
    let variants: Vec<(&str, Damage)> = vec![
        (
            "vhd-header-bad-cookie.vhd",
            Box::new(|b: &mut Vec<u8>| b[512..520].copy_from_slice(b"cxbroken")),
        ),
        (
            "vhd-block-size-0.vhd",
            Box::new(|b: &mut Vec<u8>| be32(b, 512 + 32, 0)),
        ),
        (
            "vhd-block-size-not-pow2.vhd",
            Box::new(|b: &mut Vec<u8>| be32(b, 512 + 32, 3 << 19)),
        ),
        (
            "vhd-block-size-huge.vhd",
            Box::new(|b: &mut Vec<u8>| be32(b, 512 + 32, 0x8000_0000)),
        ),
        (
            "vhd-table-entries-too-few.vhd",
            Box::new(|b: &mut Vec<u8>| be32(b, 512 + 28, 1)),
        ),
        (
            "vhd-bat-offset-past-eof.vhd",
            Box::new(|b: &mut Vec<u8>| be64(b, 512 + 16, u64::MAX - 1023)),
        ),
        (
            "vhd-bat-over-header.vhd",
            Box::new(|b: &mut Vec<u8>| be64(b, 512 + 16, 512)),
        ),
        (
            "vhd-header-offset-past-eof.vhd",
            Box::new(|b: &mut Vec<u8>| vhd_footers(b, |f| be64(f, 16, 1 << 40))),
        ),
        (
            "vhd-bat-entry-past-eof.vhd",
            Box::new(move |b: &mut Vec<u8>| be32(b, bat, 0x7fff_0000)),
        ),
        (
            "vhd-bat-entry-on-header.vhd",
            Box::new(move |b: &mut Vec<u8>| be32(b, bat, 1)),
        ),
        (
            "vhd-bat-entries-overlap.vhd",
            Box::new(move |b: &mut Vec<u8>| {
                let first = rbe32(b, bat);
                be32(b, bat + 4, first + 1);
            }),
        ),
        (
            "vhd-size-overflow.vhd",
            Box::new(|b: &mut Vec<u8>| {
                vhd_footers(b, |f| {
                    be64(f, 40, u64::MAX - 511);
                    be64(f, 48, u64::MAX - 511);
                })
            }),
        ),
        (
            "vhd-size-beyond-table.vhd",
            Box::new(|b: &mut Vec<u8>| vhd_footers(b, |f| be64(f, 48, 1 << 40))),
        ),
        (
            "vhd-disk-type-unknown.vhd",
            Box::new(|b: &mut Vec<u8>| vhd_footers(b, |f| be32(f, 60, 7))),
        ),
    ];
    for (name, f) in variants {
        let mut b = vd.clone();
        f(&mut b);
        vhd_fix(&mut b);
        put(&mut out, dir, name, &b, Expect::Refused);
    }
    // Fixed VHD claiming more data than the file holds: its footer disagrees with the file
    // size, so it is not probed as VHD at all (guest data cannot fake a VHD that way).
    let fixed_path = src.join("fixed.vhd");
    let mut fspec = chain::CreateSpec::new(chain::Format::Vhd, 1 << 20);
    fspec.fixed = true;
    make(&fixed_path, &fspec, &[(0, 3)]);
    let mut fx = std::fs::read(&fixed_path).unwrap();
    let fo = fx.len() - 512;
    be64(&mut fx, fo + 48, 1 << 30);
    be64(&mut fx, fo + 40, 1 << 30);
    vhd_fix(&mut fx);
    put(
        &mut out,
        dir,
        "vhd-fixed-size-beyond-file.vhd",
        &fx,
        Expect::ReadAsRaw,
    );

    // ---- VHD differencing: parents that are not parents ----
    let pdir = dir.join("vhdchain");
    std::fs::create_dir_all(&pdir).unwrap();
    let parent = pdir.join("parent.vhd");
    make(&parent, &spec, &[(0, 4)]);
    let mut cspec = chain::CreateSpec::new(chain::Format::Vhd, 0);
    cspec.parent = Some(parent.clone());
    let child = pdir.join("child.vhd");
    make(&child, &cspec, &[(1 << 20, 5)]);
    let child_bytes = std::fs::read(&child).unwrap();
    // Parent replaced by a directory, by a character device, removed, or by another image.
    let mk_chain = |tag: &str| -> (PathBuf, PathBuf) {
        let d = dir.join(format!("chain-{tag}"));
        std::fs::create_dir_all(&d).unwrap();
        (d.join("parent.vhd"), d.join("child.vhd"))
    };
    let mut chain_out = Vec::new();
    {
        let (p, c) = mk_chain("dir");
        std::fs::create_dir_all(&p).unwrap();
        chain_out.push(("vhd-parent-is-directory", c));
        let (p, c) = mk_chain("dev");
        std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        chain_out.push(("vhd-parent-is-device", c));
        let (_, c) = mk_chain("missing");
        chain_out.push(("vhd-parent-missing", c));
        let (p, c) = mk_chain("wrongid");
        make(&p, &spec, &[]);
        chain_out.push(("vhd-parent-wrong-id", c));
        let (p, c) = mk_chain("wrongformat");
        let mut xs = chain::CreateSpec::new(chain::Format::Vhdx, 8 << 20);
        xs.block_size = Some(1 << 20);
        // A VHDX where a VHD parent must be.
        make(&p.with_extension("tmpx"), &xs, &[]);
        std::fs::rename(p.with_extension("tmpx"), &p).unwrap();
        chain_out.push(("vhd-parent-wrong-format", c));
    }
    for (name, c) in chain_out {
        // The child's locators name "parent.vhd" (relative; and an absolute path, when one
        // is written): any absolute one is pointed nowhere, so the relative one (in the
        // child's new directory) is what is found.
        let mut b = child_bytes.clone();
        retarget_vhd_absolute(&mut b);
        std::fs::write(&c, &b).unwrap();
        out.push(Hostile {
            name: name.to_string(),
            path: c,
            expect: Expect::ChainOnly,
        });
    }
    // A child that is its own parent, and two children that are each other's parent.
    {
        let d = dir.join("chain-self");
        std::fs::create_dir_all(&d).unwrap();
        let mut b = child_bytes.clone();
        retarget_vhd_absolute(&mut b);
        let p = d.join("parent.vhd");
        std::fs::write(&p, &b).unwrap();
        out.push(Hostile {
            name: "vhd-parent-cycle-self".into(),
            path: p,
            expect: Expect::ChainOnly,
        });
        // a.vhd (parent.vhd's child) and parent.vhd (a child of a.vhd).
        let d = dir.join("chain-loop");
        std::fs::create_dir_all(&d).unwrap();
        let base = d.join("parent.vhd");
        make(&base, &spec, &[]);
        let a = d.join("a.vhd");
        let mut aspec = chain::CreateSpec::new(chain::Format::Vhd, 0);
        aspec.parent = Some(base.clone());
        make(&a, &aspec, &[]);
        let tmp = d.join("b.vhd");
        let mut bspec = chain::CreateSpec::new(chain::Format::Vhd, 0);
        bspec.parent = Some(a.clone());
        make(&tmp, &bspec, &[]);
        std::fs::rename(&tmp, &base).unwrap();
        out.push(Hostile {
            name: "vhd-parent-cycle-two".into(),
            path: a,
            expect: Expect::ChainOnly,
        });
    }
    // Locator data past the end of the file / absurdly long.
    for (name, field, val) in [
        ("vhd-locator-offset-past-eof.vhd", 16usize, u64::MAX - 4096),
        ("vhd-locator-length-huge.vhd", 8, 0xffff_fff0),
    ] {
        let mut b = child_bytes.clone();
        for i in 0..8 {
            let e = 512 + 576 + i * 24;
            if rbe32(&b, e) != 0 {
                if field == 16 {
                    be64(&mut b, e + 16, val);
                } else {
                    be32(&mut b, e + 4, val as u32);
                    be32(&mut b, e + 8, val as u32);
                }
            }
        }
        vhd_fix(&mut b);
        let d = dir.join(format!("chain-{name}"));
        std::fs::create_dir_all(&d).unwrap();
        let c = d.join("child.vhd");
        std::fs::write(&c, &b).unwrap();
        out.push(Hostile {
            name: name.to_string(),
            path: c,
            expect: Expect::Refused,
        });
    }

    // ---- VHDX dynamic ----
    let x_path = src.join("dyn.vhdx");
    let mut xspec = chain::CreateSpec::new(chain::Format::Vhdx, 8 << 20);
    xspec.block_size = Some(1 << 20);
    make(&x_path, &xspec, &[(0, 6), (5 << 20, 7)]);
    let xd = std::fs::read(&x_path).unwrap();
    let l = vhdx_layout(&xd);
    let first_payload = (rd64(&xd, l.bat) >> 20 << 20) as usize;
    for (name, cut) in [
        ("vhdx-trunc-file-id-only.vhdx", 64 << 10),
        ("vhdx-trunc-one-header.vhdx", 128 << 10),
        ("vhdx-trunc-headers-only.vhdx", 192 << 10),
        ("vhdx-trunc-one-region-table.vhdx", 256 << 10),
        ("vhdx-trunc-before-log.vhdx", l.log),
        ("vhdx-trunc-mid-log.vhdx", l.log + l.log_len / 2),
        ("vhdx-trunc-before-bat.vhdx", l.bat),
        ("vhdx-trunc-before-metadata.vhdx", l.meta),
        ("vhdx-trunc-mid-payload.vhdx", first_payload + 4096),
    ] {
        put(
            &mut out,
            dir,
            name,
            &xd[..cut.min(xd.len())],
            Expect::Refused,
        );
    }
    let (bat_entry_rt, _, _) = region(&xd, &vhdx::format::GUID_BAT);
    let fp = meta_item(&xd, l.meta, &vhdx::format::GUID_FILE_PARAMS);
    let vs = meta_item(&xd, l.meta, &vhdx::format::GUID_VDISK_SIZE);
    let ls = meta_item(&xd, l.meta, &vhdx::format::GUID_LOGICAL_SECTOR);
    let fp_entry = meta_entry(&xd, l.meta, &vhdx::format::GUID_FILE_PARAMS);
    let meta = l.meta;
    let bat = l.bat;
    let bat_len = l.bat_len;
    let xvariants: Vec<(&str, Damage, bool)> = vec![
        (
            "vhdx-both-headers-bad-crc.vhdx",
            Box::new(|b: &mut Vec<u8>| {
                b[(64 << 10) + 200] ^= 1;
                b[(128 << 10) + 200] ^= 1;
            }),
            false,
        ),
        (
            "vhdx-both-region-tables-bad-crc.vhdx",
            Box::new(|b: &mut Vec<u8>| {
                b[(192 << 10) + 9000] ^= 1;
                b[(256 << 10) + 9000] ^= 1;
            }),
            false,
        ),
        (
            "vhdx-header-version-2.vhdx",
            Box::new(|b: &mut Vec<u8>| {
                for h in [64usize << 10, 128 << 10] {
                    b[h + 66] = 2;
                }
            }),
            true,
        ),
        (
            "vhdx-region-count-huge.vhdx",
            Box::new(|b: &mut Vec<u8>| {
                for r in [192usize << 10, 256 << 10] {
                    wr32(b, r + 8, u32::MAX);
                }
            }),
            true,
        ),
        (
            "vhdx-bat-overlaps-metadata.vhdx",
            Box::new(move |b: &mut Vec<u8>| {
                for r in [192usize << 10, 256 << 10] {
                    let e = bat_entry_rt - (192 << 10) + r;
                    wr64(b, e + 16, meta as u64);
                }
            }),
            true,
        ),
        (
            "vhdx-bat-region-past-eof.vhdx",
            Box::new(move |b: &mut Vec<u8>| {
                for r in [192usize << 10, 256 << 10] {
                    let e = bat_entry_rt - (192 << 10) + r;
                    wr64(b, e + 16, 1 << 44);
                }
            }),
            true,
        ),
        (
            "vhdx-region-overlaps-header.vhdx",
            Box::new(move |b: &mut Vec<u8>| {
                for r in [192usize << 10, 256 << 10] {
                    let e = bat_entry_rt - (192 << 10) + r;
                    wr64(b, e + 16, 0);
                }
            }),
            true,
        ),
        (
            "vhdx-unknown-required-region.vhdx",
            Box::new(|b: &mut Vec<u8>| {
                for r in [192usize << 10, 256 << 10] {
                    let n = rd32(b, r + 8) as usize;
                    let e = r + 16 + n * 32;
                    b[e..e + 16].copy_from_slice(&[0x42; 16]);
                    wr64(b, e + 16, 6 << 20);
                    wr32(b, e + 24, 1 << 20);
                    wr32(b, e + 28, 1);
                    wr32(b, r + 8, n as u32 + 1);
                }
            }),
            true,
        ),
        (
            "vhdx-block-size-0.vhdx",
            Box::new(move |b: &mut Vec<u8>| wr32(b, fp, 0)),
            false,
        ),
        (
            "vhdx-block-size-not-pow2.vhdx",
            Box::new(move |b: &mut Vec<u8>| wr32(b, fp, 3 << 20)),
            false,
        ),
        (
            "vhdx-block-size-huge.vhdx",
            Box::new(move |b: &mut Vec<u8>| wr32(b, fp, 1 << 30)),
            false,
        ),
        (
            "vhdx-virtual-size-overflow.vhdx",
            Box::new(move |b: &mut Vec<u8>| wr64(b, vs, u64::MAX - 4095)),
            false,
        ),
        (
            "vhdx-virtual-size-beyond-bat.vhdx",
            Box::new(move |b: &mut Vec<u8>| wr64(b, vs, 60 << 40)),
            false,
        ),
        (
            "vhdx-logical-sector-1000.vhdx",
            Box::new(move |b: &mut Vec<u8>| wr32(b, ls, 1000)),
            false,
        ),
        (
            "vhdx-metadata-item-past-region.vhdx",
            Box::new(move |b: &mut Vec<u8>| wr32(b, fp_entry + 16, 0xfff_0000)),
            false,
        ),
        (
            "vhdx-metadata-bad-signature.vhdx",
            Box::new(move |b: &mut Vec<u8>| b[meta..meta + 8].copy_from_slice(b"metadatx")),
            false,
        ),
        (
            "vhdx-bat-entry-past-eof.vhdx",
            Box::new(move |b: &mut Vec<u8>| wr64(b, bat, (1 << 40) | 6)),
            false,
        ),
        (
            "vhdx-bat-entry-on-headers.vhdx",
            Box::new(move |b: &mut Vec<u8>| wr64(b, bat, 6)),
            false,
        ),
        (
            "vhdx-bat-entry-on-metadata.vhdx",
            Box::new(move |b: &mut Vec<u8>| wr64(b, bat, meta as u64 | 6)),
            false,
        ),
        (
            "vhdx-bat-entries-overlap.vhdx",
            Box::new(move |b: &mut Vec<u8>| {
                let first = rd64(b, bat);
                // Block 5 (the second allocated block) onto block 0's payload.
                wr64(b, bat + 5 * 8, first);
            }),
            false,
        ),
        (
            "vhdx-bat-state-invalid.vhdx",
            Box::new(move |b: &mut Vec<u8>| {
                let e = rd64(b, bat);
                wr64(b, bat, (e & !7) | 4);
            }),
            false,
        ),
        (
            "vhdx-bat-length-too-small.vhdx",
            Box::new(move |b: &mut Vec<u8>| {
                let _ = bat_len;
                for r in [192usize << 10, 256 << 10] {
                    let e = bat_entry_rt - (192 << 10) + r;
                    wr32(b, e + 24, 0);
                }
            }),
            true,
        ),
        (
            "vhdx-log-past-eof.vhdx",
            Box::new(|b: &mut Vec<u8>| {
                for h in [64usize << 10, 128 << 10] {
                    wr64(b, h + 72, 1 << 44);
                    b[h + 48..h + 64].copy_from_slice(&[7; 16]);
                }
            }),
            true,
        ),
        (
            "vhdx-log-overlaps-region-table.vhdx",
            Box::new(|b: &mut Vec<u8>| {
                for h in [64usize << 10, 128 << 10] {
                    wr64(b, h + 72, 192 << 10);
                    b[h + 48..h + 64].copy_from_slice(&[7; 16]);
                }
            }),
            true,
        ),
    ];
    for (name, f, fix) in xvariants {
        let mut b = xd.clone();
        f(&mut b);
        if fix {
            fix_vhdx_crcs(&mut b);
        }
        put(&mut out, dir, name, &b, Expect::Refused);
    }

    // ---- VHDX with a pending log: damage the log ----
    let mut base = chain::CreateSpec::new(chain::Format::Vhdx, 8 << 20);
    base.block_size = Some(1 << 20);
    let bpath = src.join("base.vhdx");
    make(&bpath, &base, &[]);
    if let Some(dirty) = dirty_vhdx(&std::fs::read(&bpath).unwrap()) {
        let dl = vhdx_layout(&dirty);
        if let Some(e) = first_log_entry(&dirty, &dl) {
            let entry_len = rd32(&dirty, e + 8) as usize;
            let logvariants: Vec<(&str, Damage)> = vec![
                (
                    "vhdx-log-entry-bad-crc.vhdx",
                    Box::new(move |b: &mut Vec<u8>| b[e + 100] ^= 0x40),
                ),
                (
                    "vhdx-log-entry-wrong-guid.vhdx",
                    Box::new(move |b: &mut Vec<u8>| {
                        b[e + 32] ^= 0xff;
                        let c = crc32c_skip(&b[e..e + entry_len], 4);
                        wr32(&mut b[e..], 4, c);
                    }),
                ),
                (
                    "vhdx-log-torn-entry.vhdx",
                    Box::new(move |b: &mut Vec<u8>| {
                        let end = e + entry_len;
                        b[end - 4096..end].fill(0);
                    }),
                ),
                (
                    "vhdx-log-wrapped-length.vhdx",
                    Box::new(move |b: &mut Vec<u8>| {
                        wr32(&mut b[e..], 8, !4095u32);
                        let c = crc32c_skip(&b[e..e + entry_len], 4);
                        wr32(&mut b[e..], 4, c);
                    }),
                ),
                (
                    "vhdx-log-target-on-header.vhdx",
                    Box::new(move |b: &mut Vec<u8>| {
                        // The first descriptor's file offset (descriptors start at +64;
                        // signature, trailing, leading bytes, then the file offset at +16).
                        wr64(&mut b[e..], 64 + 16, 64 << 10);
                        let c = crc32c_skip(&b[e..e + entry_len], 4);
                        wr32(&mut b[e..], 4, c);
                    }),
                ),
            ];
            for (name, f) in logvariants {
                let mut b = dirty.clone();
                f(&mut b);
                let expect = if name == "vhdx-log-target-on-header.vhdx" {
                    Expect::Refused
                } else {
                    Expect::Tolerated
                };
                put(&mut out, dir, name, &b, expect);
            }
        }
    }
    out
}

/// Points every absolute parent locator (W2ku, Wi2k, MacX) of a VHD child at a path that does
/// not exist, so only the relative locator (resolved in the child's directory) can match.
fn retarget_vhd_absolute(b: &mut [u8]) {
    for i in 0..8 {
        let e = 512 + 576 + i * 24;
        let code = &b[e..e + 4];
        if code == b"W2ku" || code == b"Wi2k" || code == b"MacX" {
            let off = rbe64(b, e + 16) as usize;
            let len = rbe32(b, e + 8) as usize;
            for x in b[off..off + len].iter_mut() {
                if *x == b'p' {
                    *x = b'q';
                }
            }
        }
    }
    // The parent's Unicode name is used only for messages.
    vhd_fix(b);
}

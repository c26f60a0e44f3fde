//! qemu-img 10 interoperability in both directions.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use disk::{BlockDevice, FileStorage, Storage};
use vhdx::{CreateKind, CreateOptions, OpenOptions, VhdxDisk};

/// Compares our reading of `img` with qemu's raw conversion over `ranges` (or everything).
fn compare_with_raw(img: &Path, raw: &Path, ranges: Option<&[(u64, u64)]>) {
    let d = VhdxDisk::open_path(img, &OpenOptions { read_only: true }).unwrap();
    let r = FileStorage::open(raw, disk::Access::ReadOnly, false).unwrap();
    assert_eq!(d.size(), r.len().unwrap(), "virtual size");
    let whole = [(0, d.size())];
    let ranges = ranges.unwrap_or(&whole);
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    for &(start, len) in ranges {
        let mut o = start;
        while o < start + len {
            let n = (start + len - o).min(a.len() as u64) as usize;
            d.read_at(&mut a[..n], o).unwrap();
            r.read_at(&mut b[..n], o).unwrap();
            assert!(
                a[..n] == b[..n],
                "{} differs from qemu at {o}",
                img.display()
            );
            o += n as u64;
        }
    }
}

#[test]
fn qemu_made_images_read_identically() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // (subformat, block_size option, size, full compare)
    let cases: &[(&str, &str, &str, bool)] = &[
        ("dynamic", "1M", "64M", true),
        ("dynamic", "0", "200M", true),
        ("dynamic", "32M", "100M", true),
        ("fixed", "1M", "24M", true),
        ("fixed", "8M", "20M", true),
        ("dynamic", "256M", "64G", false),
        ("dynamic", "1M", "64G", false),
    ];
    for (i, (sub, bs, size, full)) in cases.iter().enumerate() {
        let img = dir.path().join(format!("q{i}.vhdx"));
        let raw = dir.path().join(format!("q{i}.raw"));
        let imgs = img.to_str().unwrap();
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "vhdx",
                "-o",
                &format!("subformat={sub},block_size={bs}"),
                imgs,
                size,
            ],
        );
        run(
            "qemu-io",
            &[
                "-f",
                "vhdx",
                "-c",
                "write -P 0xa5 0 1M",
                "-c",
                "write -P 0x5c 3M 4k",
                "-c",
                "write -P 0x11 5000k 1536",
                "-c",
                "write -P 0x96 9M 2M",
                "-c",
                "write -z 9M 64k",
                "-c",
                "write -P 0x77 19M 512",
                imgs,
            ],
        );
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "vhdx",
                "-O",
                "raw",
                imgs,
                raw.to_str().unwrap(),
            ],
        );
        let ranges: &[(u64, u64)] = &[
            (0, 24 << 20),
            (40 << 30, 4 << 20),
            ((64 << 30) - (1 << 20), 1 << 20),
        ];
        if *full {
            compare_with_raw(&img, &raw, None);
        } else {
            compare_with_raw(&img, &raw, Some(ranges));
        }
        // Our checker agrees the image is clean.
        let s: Arc<dyn Storage> =
            Arc::new(FileStorage::open(&img, disk::Access::ReadOnly, false).unwrap());
        let rep = vhdx::check(s, disk::check::Repair::None).unwrap();
        assert_eq!(rep.corruptions, 0, "{:?}", rep.findings);
    }
}

fn write_ours(d: &disk::Disk, raw: &std::fs::File, seed: u64) {
    use std::os::unix::fs::FileExt;
    let size = d.size();
    let mut rng = disk::fault::SplitMix(seed);
    for i in 0..40u64 {
        let len = match i % 4 {
            0 => 4096,
            1 => 512,
            2 => 100_000,
            _ => 3 << 20,
        }
        .min(size as usize);
        let mut off = rng.below(size - len as u64 + 1);
        if i % 3 != 2 {
            off &= !511;
        }
        let data = pattern(seed * 1000 + i, len);
        d.write_at(&data, off).unwrap();
        raw.write_all_at(&data, off).unwrap();
        if i % 7 == 0 {
            d.flush().unwrap();
        }
    }
    // A zeroed range and a trimmed range.
    let z = (size / 3) & !((1 << 20) - 1);
    d.write_zeroes(z, 2 << 20, disk::ZeroFlags { may_unmap: true })
        .unwrap();
    raw.write_all_at(&vec![0u8; 2 << 20], z).unwrap();
}

#[test]
fn our_images_pass_qemu_compare_and_check() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(bool, u32, u64)] = &[
        (false, 1 << 20, 48 << 20),
        (false, 2 << 20, 33 << 20),
        (false, 32 << 20, 100 << 20),
        (true, 1 << 20, 16 << 20),
        (true, 8 << 20, 20 << 20),
    ];
    for (i, &(fixed, bs, size)) in cases.iter().enumerate() {
        let img = dir.path().join(format!("o{i}.vhdx"));
        let raw = dir.path().join(format!("o{i}.raw"));
        let kind = if fixed {
            CreateKind::Fixed
        } else {
            CreateKind::Dynamic
        };
        let mut o = CreateOptions::new(kind, size);
        o.block_size = bs;
        o.physical_sector_size = 512;
        let d = disk::Disk::new(Arc::new(VhdxDisk::create(&img, &o).unwrap()));
        let rf = std::fs::File::create(&raw).unwrap();
        rf.set_len(size).unwrap();
        write_ours(&d, &rf, i as u64 + 1);
        d.close().unwrap();
        drop(d);
        let (rc, out) = qemu_check(&img);
        assert_eq!(rc, 0, "qemu-img check {}: {out}", img.display());
        let out = run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "vhdx",
                "-F",
                "raw",
                img.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        assert!(out.contains("identical"), "{out}");
    }
}

#[test]
fn sparse_64g_dynamic_interop() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.vhdx");
    let size = 64u64 << 30;
    let d = disk::Disk::new(Arc::new(
        VhdxDisk::create(&img, &CreateOptions::new(CreateKind::Dynamic, size)).unwrap(),
    ));
    let spots = [0u64, 1 << 30, 33 << 30, size - 4096, (17 << 30) + 12345];
    for (i, &o) in spots.iter().enumerate() {
        let o = o.min(size - 4096);
        d.write_at(&pattern(i as u64, 4096), o).unwrap();
    }
    d.close().unwrap();
    drop(d);
    let (rc, out) = qemu_check(&img);
    assert_eq!(rc, 0, "{out}");
    // The file stays small (sparse).
    assert!(std::fs::metadata(&img).unwrap().len() < 32 << 20);
    for (i, &o) in spots.iter().enumerate() {
        let o = o.min(size - 4096);
        let out = common::qemu_output(
            std::process::Command::new("qemu-io")
                .args(["-f", "vhdx", "-r", "-c", &format!("read -v {o} 16")])
                .arg(&img),
        );
        let s = String::from_utf8_lossy(&out.stdout);
        let want = pattern(i as u64, 16);
        let hex: Vec<String> = want.iter().map(|b| format!("{b:02x}")).collect();
        assert!(s.contains(&hex[..8].join(" ")), "at {o}: {s}");
    }
}

#[test]
fn we_write_into_qemu_made_images() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, sub) in ["dynamic", "fixed"].iter().enumerate() {
        let img = dir.path().join(format!("w{i}.vhdx"));
        let raw = dir.path().join(format!("w{i}.raw"));
        let imgs = img.to_str().unwrap();
        // qemu's default block_state_zero=on: every dynamic block starts in the ZERO state.
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "vhdx",
                "-o",
                &format!("subformat={sub},block_size=2M"),
                imgs,
                "30M",
            ],
        );
        run(
            "qemu-io",
            &["-f", "vhdx", "-c", "write -P 0x33 1M 3M", imgs],
        );
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "vhdx",
                "-O",
                "raw",
                imgs,
                raw.to_str().unwrap(),
            ],
        );
        {
            let d = disk::Disk::new(Arc::new(
                VhdxDisk::open_path(&img, &OpenOptions::default()).unwrap(),
            ));
            let rf = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
            write_ours(&d, &rf, 77 + i as u64);
            d.close().unwrap();
        }
        let (rc, out) = qemu_check(&img);
        assert_eq!(rc, 0, "{out}");
        let out = run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "vhdx",
                "-F",
                "raw",
                imgs,
                raw.to_str().unwrap(),
            ],
        );
        assert!(out.contains("identical"), "{out}");
    }
}

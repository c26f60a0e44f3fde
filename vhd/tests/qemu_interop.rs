//! Round trips with qemu-img/qemu-io 10 in both directions.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use disk::{Access, BlockDevice, FileStorage};
use vhd::{CreateKind, CreateOptions, OpenOptions, SizeRule, VhdDisk};

const MIB: u64 = 1 << 20;

fn have_qemu() -> bool {
    common::have_tool("qemu-img") && common::have_tool("qemu-io")
}

fn qemu_size(p: &Path) -> u64 {
    let out = common::run(
        Command::new("qemu-img")
            .args(["info", "--output", "json", "-f", "vpc"])
            .arg(p),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

fn open_ro(p: &Path) -> VhdDisk {
    let s = FileStorage::open(p, Access::ReadOnly, false).unwrap();
    VhdDisk::open(
        Arc::new(s),
        &OpenOptions {
            read_only: true,
            size_rule: SizeRule::Auto,
        },
    )
    .unwrap()
}

/// Writes done by qemu-io: (pattern byte, offset, len), all 512-aligned.
fn writes_for(size: u64) -> Vec<(u8, u64, u64)> {
    let mut w = vec![(0xab, (size / 2).min(MIB) & !511, 64 << 10)];
    if size >= 4 * MIB {
        w.push((0x5c, 2 * MIB - 4096, 8192)); // spans a block boundary
    }
    w.push((0x77, size - 1536, 1536)); // the last sectors
    if size > 4 << 30 {
        w.push((0xcd, (4 << 30) + MIB, 128 << 10));
    }
    w
}

/// Regions to compare (the whole disk when small).
fn regions(size: u64) -> Vec<(u64, u64)> {
    if size <= 64 * MIB {
        return vec![(0, size)];
    }
    [
        (0, 8 * MIB),
        ((4 << 30) - MIB, 8 * MIB),
        (size - 4 * MIB, 4 * MIB),
    ]
    .into_iter()
    .map(|(o, l)| (o, l.min(size - o)))
    .collect()
}

fn compare_with_raw(d: &VhdDisk, raw: &Path) {
    let f = std::fs::File::open(raw).unwrap();
    assert_eq!(f.metadata().unwrap().len(), d.size(), "raw size");
    for (off, len) in regions(d.size()) {
        let mut a = vec![0u8; len as usize];
        let mut b = vec![0u8; len as usize];
        d.read_at(&mut a, off).unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, off).unwrap();
        if a != b {
            let i = a.iter().zip(&b).position(|(x, y)| x != y).unwrap();
            panic!("differs from qemu's raw at {}", off + i as u64);
        }
    }
}

fn qemu_to_us(subformat: &str, size: u64, force: bool) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.vhd");
    let raw = dir.path().join("q.raw");
    let mut o = format!("subformat={subformat}");
    if force {
        o.push_str(",force_size=on");
    }
    common::run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "vpc", "-o", &o])
            .arg(&img)
            .arg(size.to_string()),
    );
    let qsize = qemu_size(&img);
    for (p, off, len) in writes_for(qsize) {
        common::run(
            Command::new("qemu-io")
                .args(["-f", "vpc", "-c", &format!("write -P {p:#x} {off} {len}")])
                .arg(&img),
        );
    }
    common::run(
        Command::new("qemu-img")
            .args(["convert", "-f", "vpc", "-O", "raw"])
            .arg(&img)
            .arg(&raw),
    );
    let d = open_ro(&img);
    assert_eq!(
        d.size(),
        qsize,
        "size rule disagrees with qemu ({subformat}, {size}, force {force})"
    );
    if !force {
        assert_eq!(d.info().creator_app, "qemu");
    }
    assert_eq!(d.info().disk_type, subformat);
    compare_with_raw(&d, &raw);
}

#[test]
fn qemu_made_images_read_back() {
    if !have_qemu() {
        return;
    }
    for sub in ["fixed", "dynamic"] {
        qemu_to_us(sub, MIB, true);
        qemu_to_us(sub, 10 * MIB + 3 * 512, true);
        qemu_to_us(sub, 10 * MIB + 3 * 512, false); // CHS-rounded, creator qemu
        qemu_to_us(sub, 5 << 30, true);
    }
    qemu_to_us("dynamic", 5 << 30, false);
}

fn us_to_qemu(kind: CreateKind, size: u64, rule: SizeRule) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ours.vhd");
    let raw = dir.path().join("ref.raw");
    let fixed = matches!(kind, CreateKind::Fixed);
    let mut o = CreateOptions::new(kind, size);
    o.size_rule = rule;
    let d = disk::Disk::new(Arc::new(VhdDisk::create(&img, &o).unwrap()));
    let vsize = d.size();
    let rf = std::fs::File::create(&raw).unwrap();
    rf.set_len(vsize).unwrap();
    let mut writes: Vec<(u64, Vec<u8>)> = vec![
        ((vsize / 2).min(MIB) & !511, common::pattern(64 << 10, 1)),
        (vsize - 1536, common::pattern(1536, 2)),
        (3, common::pattern(1000, 3)), // unaligned
    ];
    if vsize >= 4 * MIB {
        writes.push((2 * MIB - 4096 + 7, common::pattern(8192, 4)));
    }
    if vsize > (4 << 30) + 2 * MIB {
        writes.push(((4 << 30) + MIB, common::pattern(128 << 10, 5)));
    }
    for (off, data) in &writes {
        d.write_at(data, *off).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&rf, data, *off).unwrap();
    }
    d.flush().unwrap();
    drop(d);
    drop(rf);
    assert_eq!(qemu_size(&img), vsize, "qemu sees a different size");
    let out = common::qemu_output(
        Command::new("qemu-img")
            .args(["compare", "-f", "vpc", "-F", "raw"])
            .arg(&img)
            .arg(&raw),
    );
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu 10 has no `check` for vpc (exit 63, "does not support checks"): accept that or a
    // clean result; our own check must be clean either way.
    let qc = common::qemu_output(
        Command::new("qemu-img")
            .args(["check", "-f", "vpc"])
            .arg(&img),
    );
    assert!(
        matches!(qc.status.code(), Some(0) | Some(63)),
        "qemu-img check: {}",
        String::from_utf8_lossy(&qc.stderr)
    );
    let s = Arc::new(FileStorage::open(&img, Access::ReadOnly, false).unwrap());
    let r = vhd::check(s, disk::check::Repair::None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    // And we read back what we wrote.
    let d = open_ro(&img);
    assert_eq!(d.size(), vsize);
    if !fixed {
        assert_eq!(d.info().bat_offset, Some(1536));
    }
    compare_with_raw(&d, &raw);
}

#[test]
fn our_images_match_in_qemu() {
    if !have_qemu() {
        return;
    }
    for size in [MIB, 10 * MIB + 3 * 512] {
        us_to_qemu(CreateKind::Fixed, size, SizeRule::CurrentSize);
        us_to_qemu(CreateKind::Dynamic, size, SizeRule::CurrentSize);
        us_to_qemu(CreateKind::Dynamic, size, SizeRule::Chs);
    }
    us_to_qemu(CreateKind::Dynamic, 5 << 30, SizeRule::CurrentSize);
    us_to_qemu(
        CreateKind::Fixed,
        (4 << 30) + 2 * MIB + 512 * 7,
        SizeRule::CurrentSize,
    );
}

#[test]
fn our_dynamic_blocks_use_windows_alignment() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.vhd");
    let d = VhdDisk::create(&img, &CreateOptions::new(CreateKind::Dynamic, 8 * MIB)).unwrap();
    d.write_at(&[1u8; 4096], 5 * MIB).unwrap();
    d.write_at(&[2u8; 512], 0).unwrap();
    for off in [5 * MIB, 0] {
        match d.block_status(off, 512).unwrap().allocation {
            disk::Allocation::Data {
                host_offset: Some(h),
            } => {
                assert_eq!((h - off % (2 * MIB)) % 4096, 0, "payload not 4 KiB aligned")
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(d.info().creator_app, "vrdn");
    assert_eq!(d.info().creator_host_os, "Wi2k");
}

/// Compact a qemu-made dynamic image (qemu's unaligned layout): qemu must still read the same
/// data afterwards.
#[test]
fn compact_qemu_image_keeps_data_for_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.vhd");
    let raw = dir.path().join("c.raw");
    common::run(
        Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                "subformat=dynamic,force_size=on",
            ])
            .arg(&img)
            .arg("16M"),
    );
    for cmd in [
        "write -P 0x11 0 64k",
        "write -P 0x22 2M 64k",
        "write -P 0x33 4M 64k",
        "write -P 0x44 6M 64k",
        "write -P 0x55 10M 4k",
        "write -P 0 2M 64k",
        "write -P 0 6M 64k",
    ] {
        common::run(
            Command::new("qemu-io")
                .args(["-f", "vpc", "-c", cmd])
                .arg(&img),
        );
    }
    common::run(
        Command::new("qemu-img")
            .args(["convert", "-f", "vpc", "-O", "raw"])
            .arg(&img)
            .arg(&raw),
    );
    let before = std::fs::metadata(&img).unwrap().len();
    let d = VhdDisk::open_path(&img, &OpenOptions::default()).unwrap();
    let st = d.compact().unwrap();
    drop(d);
    assert_eq!(st.blocks_freed, 2, "{st:?}");
    assert!(st.blocks_moved >= 1, "{st:?}");
    let after = std::fs::metadata(&img).unwrap().len();
    assert!(after < before && after == st.file_size_after);
    let out = common::qemu_output(
        Command::new("qemu-img")
            .args(["compare", "-f", "vpc", "-F", "raw"])
            .arg(&img)
            .arg(&raw),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let r = vhd::check(
        Arc::new(FileStorage::open(&img, Access::ReadOnly, false).unwrap()),
        disk::check::Repair::None,
    )
    .unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
}

/// Grow a qemu-made dynamic image past what its BAT sector holds (the BAT must move): qemu
/// reads the new size (CHS rule kept) and the old data.
#[test]
fn resize_qemu_image_relocates_bat() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.vhd");
    let raw = dir.path().join("r.raw");
    common::run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "vpc", "-o", "subformat=dynamic"])
            .arg(&img)
            .arg("10M"),
    );
    common::run(
        Command::new("qemu-io")
            .args(["-f", "vpc", "-c", "write -P 0x3c 1M 64k"])
            .arg(&img),
    );
    common::run(
        Command::new("qemu-img")
            .args(["convert", "-f", "vpc", "-O", "raw"])
            .arg(&img)
            .arg(&raw),
    );
    let d = VhdDisk::open_path(&img, &OpenOptions::default()).unwrap();
    assert_eq!(d.info().size_rule, "chs");
    d.resize(300 * MIB).unwrap();
    let new = d.size();
    assert!(new >= 300 * MIB, "{new}");
    assert_ne!(d.info().bat_offset, Some(1536), "BAT should have moved");
    d.write_at(&[0x7e; 4096], new - 4096).unwrap();
    d.flush().unwrap();
    drop(d);
    assert_eq!(qemu_size(&img), new);
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    f.set_len(new).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x7e; 4096], new - 4096).unwrap();
    drop(f);
    let out = common::qemu_output(
        Command::new("qemu-img")
            .args(["compare", "-f", "vpc", "-F", "raw"])
            .arg(&img)
            .arg(&raw),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let r = vhd::check(
        Arc::new(FileStorage::open(&img, Access::ReadOnly, false).unwrap()),
        disk::check::Repair::None,
    )
    .unwrap();
    assert_eq!(r.corruptions, 0, "{r:?}");
}

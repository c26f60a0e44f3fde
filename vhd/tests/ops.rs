//! Differencing disks, resize, compact, set_parent, measure and check/repair.

mod common;

use std::path::Path;
use std::sync::Arc;

use disk::check::Repair;
use disk::{Access, Allocation, BlockDevice, FileStorage, MemStorage, Storage};
use vhd::{CreateKind, CreateOptions, OpenOptions, SizeRule, VhdDisk};

const MIB: u64 = 1 << 20;

fn ro(p: &Path) -> VhdDisk {
    VhdDisk::open_path(
        p,
        &OpenOptions {
            read_only: true,
            size_rule: SizeRule::Auto,
        },
    )
    .unwrap()
}

fn rw(p: &Path) -> VhdDisk {
    VhdDisk::open_path(
        p,
        &OpenOptions {
            read_only: false,
            size_rule: SizeRule::Auto,
        },
    )
    .unwrap()
}

fn read_all(d: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

fn check_file(p: &Path, repair: Repair) -> disk::CheckReport {
    let access = if repair == Repair::None {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    vhd::check(
        Arc::new(FileStorage::open(p, access, false).unwrap()),
        repair,
    )
    .unwrap()
}

#[test]
fn differencing_chain_reads_merged_and_leaves_base_alone() {
    let dir = tempfile::tempdir().unwrap();
    let base_p = dir.path().join("base.vhd");
    let child_p = dir.path().join("child.vhd");
    let size = 8 * MIB;
    let mut expect = vec![0u8; size as usize];
    {
        let b = VhdDisk::create(&base_p, &CreateOptions::new(CreateKind::Dynamic, size)).unwrap();
        let a = common::pattern(3 * MIB as usize, 9);
        b.write_at(&a, 0).unwrap();
        expect[..a.len()].copy_from_slice(&a);
        b.flush().unwrap();
    }
    let base_bytes = std::fs::read(&base_p).unwrap();
    let base: Arc<dyn BlockDevice> = Arc::new(ro(&base_p));
    {
        let kind = CreateKind::Differencing {
            parent_path: base_p.clone(),
            parent: base.clone(),
        };
        let c = Arc::new(VhdDisk::create(&child_p, &CreateOptions::new(kind, 0)).unwrap());
        let io = disk::Disk::new(c.clone());
        assert_eq!(c.size(), size);
        for (off, len, seed) in [
            (MIB + 100, 5000usize, 1u8),
            (6 * MIB, 4096, 2),
            (3 * MIB - 10, 20, 3),
        ] {
            let p = common::pattern(len, seed);
            io.write_at(&p, off).unwrap();
            expect[off as usize..off as usize + len].copy_from_slice(&p);
        }
        c.flush().unwrap();
        assert_eq!(read_all(&c), expect);
        // Layer status: sector 0 comes from the parent, 1 MiB + 512 is ours.
        assert_eq!(
            c.block_status(0, 512).unwrap().allocation,
            Allocation::Unallocated
        );
        assert!(matches!(
            c.block_status(MIB + 512, 512).unwrap().allocation,
            Allocation::Data {
                host_offset: Some(_)
            }
        ));
        assert_eq!(
            c.block_status(4 * MIB, 2 * MIB).unwrap().allocation,
            Allocation::Unallocated
        );
    }
    // Reopen: the link resolves to the base (relative locator first).
    let mut c = ro(&child_p);
    let link = c.parent_link().unwrap();
    let candidates = chain::parent_candidates(Some(&child_p), &link);
    assert_eq!(candidates[0], dir.path().join("base.vhd"));
    // No Windows path was given: only the relative locator, and the header names the bare
    // file (never a POSIX path), which resolves beside the child to the same file.
    assert_eq!(candidates, vec![std::path::absolute(&base_p).unwrap()]);
    assert_eq!(link.name, "base.vhd");
    assert_eq!(Some(link.expected_id), base.unique_id());
    let info = c.info();
    assert_eq!(
        info.locators
            .iter()
            .map(|l| l.platform.as_str())
            .collect::<Vec<_>>(),
        ["W2ru"]
    );
    assert_eq!(info.locators[0].path.as_deref(), Some(".\\base.vhd"));
    c.attach_parent(base.clone()).unwrap();
    assert_eq!(read_all(&c), expect);
    drop(c);
    drop(base);
    assert_eq!(std::fs::read(&base_p).unwrap(), base_bytes, "base changed");
    let r = check_file(&child_p, Repair::None);
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");

    // set_parent onto a copy of the base (same unique id), in a subdirectory.
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let base2 = dir.path().join("sub").join("moved-base.vhd");
    std::fs::copy(&base_p, &base2).unwrap();
    let b2 = ro(&base2);
    rw(&child_p).set_parent(&base2, &b2).unwrap();
    let c = ro(&child_p);
    let link = c.parent_link().unwrap();
    assert_eq!(
        chain::parent_candidates(Some(&child_p), &link)[0],
        dir.path().join("sub/moved-base.vhd")
    );
    assert_eq!(link.name, "moved-base.vhd");
    assert_eq!(
        c.info().locators[0].path.as_deref(),
        Some(".\\sub\\moved-base.vhd")
    );
    drop(c);
    // With a known Windows path: W2ku and the header name carry it.
    let win = disk::ParentWindowsPaths {
        absolute: Some("D:\\VMs\\sub\\moved-base.vhd".into()),
        volume: None,
    };
    rw(&child_p).set_parent_with(&base2, &win, &b2).unwrap();
    let c = ro(&child_p);
    assert_eq!(
        c.parent_link().unwrap().name,
        "D:\\VMs\\sub\\moved-base.vhd"
    );
    let locs = c.info().locators;
    assert_eq!(locs[0].platform, "W2ru");
    assert_eq!(locs[1].platform, "W2ku");
    assert_eq!(
        locs[1].path.as_deref(),
        Some("D:\\VMs\\sub\\moved-base.vhd")
    );
    assert_eq!(
        chain::parent_candidates(Some(&child_p), &c.parent_link().unwrap())[0],
        dir.path().join("sub/moved-base.vhd")
    );
    let r = check_file(&child_p, Repair::None);
    assert_eq!(r.corruptions, 0, "{r:?}");
}

#[test]
fn unattached_child_fails_only_on_parent_sectors() {
    let parent: Arc<dyn BlockDevice> = Arc::new(
        VhdDisk::create_on(
            Arc::new(MemStorage::new()),
            &CreateOptions::new(CreateKind::Dynamic, 4 * MIB),
        )
        .unwrap(),
    );
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let kind = CreateKind::Differencing {
        parent_path: "/nonexistent/p.vhd".into(),
        parent,
    };
    let c = VhdDisk::create_on(s.clone(), &CreateOptions::new(kind, 0)).unwrap();
    c.write_at(&[7u8; 1024], 0).unwrap();
    c.flush().unwrap();
    drop(c);
    let c = VhdDisk::open(s, &OpenOptions::default()).unwrap();
    let mut b = [0u8; 1024];
    c.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [7u8; 1024]);
    let e = c.read_at(&mut b, 2048).unwrap_err();
    assert!(matches!(e, disk::Error::ParentNotFound { .. }), "{e}");
    // Wrong-size parent refused.
    let mut c = c;
    let small: Arc<dyn BlockDevice> = Arc::new(
        VhdDisk::create_on(
            Arc::new(MemStorage::new()),
            &CreateOptions::new(CreateKind::Dynamic, 2 * MIB),
        )
        .unwrap(),
    );
    assert!(c.attach_parent(small).is_err());
}

#[test]
fn resize_grows_fixed_and_dynamic_and_refuses_shrink() {
    let dir = tempfile::tempdir().unwrap();
    // Fixed.
    let p = dir.path().join("f.vhd");
    let d = VhdDisk::create(&p, &CreateOptions::new(CreateKind::Fixed, MIB)).unwrap();
    let pat = common::pattern(MIB as usize, 4);
    d.write_at(&pat, 0).unwrap();
    d.resize(3 * MIB).unwrap();
    assert!(matches!(
        d.resize(2 * MIB),
        Err(disk::Error::InvalidArgument(_))
    ));
    drop(d);
    let d = ro(&p);
    assert_eq!(d.size(), 3 * MIB);
    let all = read_all(&d);
    assert_eq!(&all[..MIB as usize], &pat[..]);
    assert!(
        all[MIB as usize..].iter().all(|&b| b == 0),
        "grown area must read zeros"
    );
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 3 * MIB + 512);

    // Dynamic, BAT grows in place (room in its 512-byte sector).
    let p = dir.path().join("d.vhd");
    let d = VhdDisk::create(&p, &CreateOptions::new(CreateKind::Dynamic, 8 * MIB)).unwrap();
    d.write_at(&pat, 7 * MIB).unwrap();
    d.resize(20 * MIB).unwrap();
    d.write_at(&pat, 19 * MIB).unwrap();
    drop(d);
    let d = ro(&p);
    assert_eq!(d.size(), 20 * MIB);
    assert_eq!(d.info().bat_offset, Some(1536));
    let all = read_all(&d);
    assert_eq!(&all[7 * MIB as usize..8 * MIB as usize], &pat[..]);
    assert_eq!(&all[19 * MIB as usize..], &pat[..]);
    let r = check_file(&p, Repair::None);
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");

    // Dynamic with small blocks: the BAT must move to the end of the file.
    let p = dir.path().join("s.vhd");
    let mut o = CreateOptions::new(CreateKind::Dynamic, 256 << 10);
    o.block_size = 4096;
    let d = VhdDisk::create(&p, &o).unwrap();
    d.write_at(&[5u8; 8192], 4096).unwrap();
    d.resize(8 * MIB).unwrap();
    d.write_at(&[6u8; 4096], 8 * MIB - 4096).unwrap();
    drop(d);
    let d = ro(&p);
    assert_eq!(d.size(), 8 * MIB);
    assert_ne!(d.info().bat_offset, Some(1536));
    let all = read_all(&d);
    assert!(all[4096..12288].iter().all(|&b| b == 5));
    assert!(all[8 * MIB as usize - 4096..].iter().all(|&b| b == 6));
    assert!(all[12288..8 * MIB as usize - 4096].iter().all(|&b| b == 0));
    let r = check_file(&p, Repair::None);
    assert_eq!(r.corruptions, 0, "{r:?}");
    if common::have_tool("qemu-img") {
        let out = common::qemu_output(
            std::process::Command::new("qemu-img")
                .args(["info", "--output", "json", "-f", "vpc"])
                .arg(&p),
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["virtual-size"].as_u64(), Some(8 * MIB));
    }
}

#[test]
fn compact_frees_zero_blocks_and_shrinks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.vhd");
    let d = VhdDisk::create(&p, &CreateOptions::new(CreateKind::Dynamic, 16 * MIB)).unwrap();
    let pat = common::pattern(4096, 8);
    for blk in [0u64, 2, 3, 5, 7] {
        d.write_at(&pat, blk * 2 * MIB + 8192).unwrap();
    }
    // Blocks 2 and 3 become all zero again.
    for blk in [2u64, 3] {
        d.write_at(&[0u8; 4096], blk * 2 * MIB + 8192).unwrap();
    }
    d.flush().unwrap();
    let before = read_all(&d);
    let st = d.compact().unwrap();
    assert_eq!(st.blocks_freed, 2);
    assert!(st.blocks_moved >= 1, "{st:?}");
    assert!(st.file_size_after < st.file_size_before);
    assert_eq!(read_all(&d), before);
    drop(d);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), st.file_size_after);
    let d = ro(&p);
    assert_eq!(read_all(&d), before);
    assert_eq!(d.info().allocated_blocks, 3);
    let r = check_file(&p, Repair::None);
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    // Measure agrees with what we produced for 3 allocated blocks.
    let o = CreateOptions::new(CreateKind::Dynamic, 16 * MIB);
    let (req, full) = vhd::measure(16 * MIB, 3 * 2 * MIB, &o);
    assert_eq!(req, st.file_size_after);
    assert!(full > req);
}

#[test]
fn measure_matches_created_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.vhd");
    let o = CreateOptions::new(CreateKind::Dynamic, 10 * MIB);
    let d = VhdDisk::create(&p, &o).unwrap();
    assert_eq!(
        vhd::measure(10 * MIB, 0, &o).0,
        std::fs::metadata(&p).unwrap().len()
    );
    let buf = vec![1u8; 10 * MIB as usize];
    d.write_at(&buf, 0).unwrap();
    drop(d);
    let (req, full) = vhd::measure(10 * MIB, 10 * MIB, &o);
    assert_eq!(req, full);
    assert_eq!(full, std::fs::metadata(&p).unwrap().len());
    let f = CreateOptions::new(CreateKind::Fixed, 10 * MIB);
    assert_eq!(
        vhd::measure(10 * MIB, 0, &f),
        (10 * MIB + 512, 10 * MIB + 512)
    );
}

#[test]
fn azure_and_chs_create_sizes() {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(CreateKind::Fixed, 20 * MIB + 1);
    o.azure = true;
    let d = VhdDisk::create_on(s.clone(), &o).unwrap();
    assert_eq!(d.size(), 21 * MIB);
    assert_eq!(s.len().unwrap(), 21 * MIB + 512);
    let mut o = CreateOptions::new(CreateKind::Dynamic, 20 * MIB);
    o.azure = true;
    assert!(matches!(
        VhdDisk::create_on(Arc::new(MemStorage::new()), &o),
        Err(disk::Error::InvalidArgument(_))
    ));
    let mut o = CreateOptions::new(CreateKind::Fixed, MIB);
    o.azure = true;
    assert!(VhdDisk::create_on(Arc::new(MemStorage::new()), &o).is_err());
    // CHS rounding like qemu: 4 GiB -> 8 389 584 sectors; both rules then agree.
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(CreateKind::Dynamic, 4 << 30);
    o.size_rule = SizeRule::Chs;
    let d = VhdDisk::create_on(s.clone(), &o).unwrap();
    assert_eq!(d.size(), 8_389_584 * 512);
    let i = d.info();
    assert_eq!(i.chs_size, i.current_size);
    // Exact size keeps current_size; CHS override then reports the smaller geometry size.
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let d =
        VhdDisk::create_on(s.clone(), &CreateOptions::new(CreateKind::Dynamic, 4 << 30)).unwrap();
    assert_eq!(d.size(), 4 << 30);
    drop(d);
    let d = VhdDisk::open(
        s,
        &OpenOptions {
            read_only: true,
            size_rule: SizeRule::Chs,
        },
    )
    .unwrap();
    assert_eq!(d.size(), 8_388_576 * 512);
    assert_eq!(d.info().size_rule, "chs");
    // Bad block sizes refused.
    for bs in [0u32, 3000, 1 << 31] {
        let mut o = CreateOptions::new(CreateKind::Dynamic, MIB);
        o.block_size = bs;
        assert!(VhdDisk::create_on(Arc::new(MemStorage::new()), &o).is_err());
    }
}

#[test]
fn create_refuses_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.vhd");
    std::fs::write(&p, b"keep").unwrap();
    assert!(VhdDisk::create(&p, &CreateOptions::new(CreateKind::Dynamic, MIB)).is_err());
    assert_eq!(std::fs::read(&p).unwrap(), b"keep");
}

#[test]
fn check_repairs_trailing_leak_and_footer_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.vhd");
    let d = VhdDisk::create(&p, &CreateOptions::new(CreateKind::Dynamic, 8 * MIB)).unwrap();
    d.write_at(&[3u8; 4096], 0).unwrap();
    d.flush().unwrap();
    drop(d);
    let good_len = std::fs::metadata(&p).unwrap().len();
    // Leak 3 MiB before the footer (what a crash between allocation steps leaves).
    let mut bytes = std::fs::read(&p).unwrap();
    let footer = bytes.split_off(bytes.len() - 512);
    bytes.resize(bytes.len() + 3 * MIB as usize, 0);
    bytes.extend_from_slice(&footer);
    std::fs::write(&p, &bytes).unwrap();
    let r = check_file(&p, Repair::None);
    assert_eq!((r.corruptions, r.leaks), (0, 1), "{r:?}");
    assert_eq!(r.exit_code(), 3);
    let r = check_file(&p, Repair::Leaks);
    assert_eq!(r.leaks_fixed, 1, "{r:?}");
    assert!(std::fs::metadata(&p).unwrap().len() <= good_len);
    let r = check_file(&p, Repair::None);
    assert_eq!(r.exit_code(), 0, "{r:?}");

    // Damage the trailing footer's checksum: opens with a warning, check -r all fixes it.
    let mut bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    bytes[n - 512 + 64] ^= 0xff;
    std::fs::write(&p, &bytes).unwrap();
    let d = ro(&p);
    assert!(!d.info().warnings.is_empty());
    let mut b = [0u8; 4096];
    d.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [3u8; 4096]);
    drop(d);
    let r = check_file(&p, Repair::None);
    assert!(r.corruptions >= 1, "{r:?}");
    let r = check_file(&p, Repair::All);
    assert_eq!(r.corruptions, r.corruptions_fixed, "{r:?}");
    let r = check_file(&p, Repair::None);
    assert_eq!(r.exit_code(), 0, "{r:?}");
}

#[test]
fn concurrent_readers_and_writer() {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let d = Arc::new(
        VhdDisk::create_on(s, &CreateOptions::new(CreateKind::Dynamic, 16 * MIB)).unwrap(),
    );
    std::thread::scope(|sc| {
        for t in 0..4u8 {
            let d = d.clone();
            sc.spawn(move || {
                for i in 0..32u64 {
                    let off = (t as u64 * 4 + (i % 4)) * MIB;
                    let buf = vec![t + 1; 4096];
                    d.write_at(&buf, off).unwrap();
                    let mut r = vec![0u8; 4096];
                    d.read_at(&mut r, off).unwrap();
                    assert_eq!(r, buf);
                }
            });
        }
    });
    let r = vhd::check(d.storage().clone(), Repair::None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
}

#[test]
fn write_zeroes_and_discard() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ["fixed", "dynamic"] {
        let p = dir.path().join(format!("{kind}.vhd"));
        let k = if kind == "fixed" {
            CreateKind::Fixed
        } else {
            CreateKind::Dynamic
        };
        let d = VhdDisk::create(&p, &CreateOptions::new(k, 4 * MIB)).unwrap();
        d.write_at(&vec![0xee; 3 * MIB as usize], 0).unwrap();
        for unmap in [false, true] {
            d.write_zeroes(
                MIB + 512 * unmap as u64,
                4096,
                disk::ZeroFlags { may_unmap: unmap },
            )
            .unwrap();
        }
        d.discard(2 * MIB, 4096).unwrap();
        // Zeroing unallocated space of a dynamic disk allocates nothing.
        let before = d.info().allocated_blocks;
        d.write_zeroes(3 * MIB, MIB, disk::ZeroFlags::default())
            .unwrap();
        assert_eq!(d.info().allocated_blocks, before);
        let all = read_all(&d);
        assert!(
            all[MIB as usize..MIB as usize + 4608]
                .iter()
                .all(|&b| b == 0),
            "{kind}"
        );
        assert!(all[..MIB as usize].iter().all(|&b| b == 0xee), "{kind}");
        let tail = &all[2 * MIB as usize..2 * MIB as usize + 4096];
        assert!(tail.iter().all(|&b| b == 0xee) || tail.iter().all(|&b| b == 0));
        assert!(all[3 * MIB as usize..].iter().all(|&b| b == 0));
        assert!(matches!(
            d.write_zeroes(4 * MIB, 1, disk::ZeroFlags::default()),
            Err(disk::Error::OutOfRange { .. })
        ));
    }
}

/// Rough throughput numbers (not run by default):
/// `cargo test -p vhd --test ops perf -- --ignored --nocapture`
#[test]
#[ignore]
fn perf_sequential_and_parallel_reads() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("perf.vhd");
    let size = 256 * MIB;
    let d = Arc::new(VhdDisk::create(&p, &CreateOptions::new(CreateKind::Dynamic, size)).unwrap());
    let chunk = common::pattern(MIB as usize, 3);
    let t = std::time::Instant::now();
    for i in 0..size / MIB {
        d.write_at(&chunk, i * MIB).unwrap();
    }
    d.flush().unwrap();
    let w = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..size / MIB {
        d.read_at(&mut buf, i * MIB).unwrap();
    }
    let r = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    std::thread::scope(|s| {
        for k in 0..4u64 {
            let d = d.clone();
            s.spawn(move || {
                let mut b = vec![0u8; 4096];
                let mut rng = disk::fault::SplitMix(k);
                for _ in 0..20_000 {
                    d.read_at(&mut b, rng.below(size / 4096) * 4096).unwrap();
                }
            });
        }
    });
    let pr = t.elapsed().as_secs_f64();
    println!(
        "dynamic 256 MiB: sequential write {:.0} MiB/s (allocating, 2 fsyncs per 2 MiB block), sequential read {:.0} MiB/s, 4 threads x 20000 random 4 KiB reads: {:.0} IOPS",
        256.0 / w,
        256.0 / r,
        80_000.0 / pr
    );
}

#[test]
fn zero_size_images() {
    for k in [CreateKind::Fixed, CreateKind::Dynamic] {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let d = VhdDisk::create_on(s.clone(), &CreateOptions::new(k, 0)).unwrap();
        assert_eq!(d.size(), 0);
        d.read_at(&mut [], 0).unwrap();
        assert!(d.read_at(&mut [0u8; 1], 0).is_err());
        drop(d);
        let d = VhdDisk::open(s.clone(), &OpenOptions::default()).unwrap();
        assert_eq!(d.size(), 0);
        d.resize(MIB).unwrap();
        d.write_at(&[1u8; 512], MIB - 512).unwrap();
        drop(d);
        let d = VhdDisk::open(s.clone(), &OpenOptions::default()).unwrap();
        let all = read_all(&d);
        assert_eq!(all.len() as u64, MIB);
        assert!(all[MIB as usize - 512..].iter().all(|&b| b == 1));
        let r = vhd::check(s, Repair::None).unwrap();
        assert_eq!(r.corruptions, 0, "{r:?}");
    }
}

//! Differencing chains, 4 KiB sectors, trim and block status, resize, compact, re-parenting,
//! measure.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use disk::{Allocation, BlockDevice, ZeroFlags};
use vhdx::format::{bat_state, PB_FULLY_PRESENT, PB_NOT_PRESENT, PB_PARTIALLY_PRESENT, PB_ZERO};
use vhdx::{CreateKind, CreateOptions, OpenOptions, VhdxDisk};

const MIB: u64 = 1 << 20;

fn ro(p: &Path) -> Arc<dyn BlockDevice> {
    Arc::new(VhdxDisk::open_path(p, &OpenOptions { read_only: true }).unwrap())
}

fn read(d: &dyn BlockDevice, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.read_at(&mut b, off).unwrap();
    b
}

#[test]
fn differencing_chain_of_three() {
    let dir = tempfile::tempdir().unwrap();
    let bp = dir.path().join("base.vhdx");
    let cp = dir.path().join("child.vhdx");
    let gp = dir.path().join("sub").join("grand.vhdx");
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let size = 16 * MIB;
    let a = pattern(1, 8 * MIB as usize);
    {
        let b = VhdxDisk::create(&bp, &CreateOptions::new(CreateKind::Dynamic, size)).unwrap();
        b.write_at(&a, 0).unwrap();
        b.close().unwrap();
    }
    let base_bytes = std::fs::read(&bp).unwrap();
    let mut model = vec![0u8; size as usize];
    model[..a.len()].copy_from_slice(&a);

    // Child: partial sectors in a block make it PARTIALLY_PRESENT.
    {
        let parent = ro(&bp);
        let c = VhdxDisk::create(
            &cp,
            &CreateOptions::new(
                CreateKind::Differencing {
                    parent_path: bp.clone(),
                    parent: parent.clone(),
                },
                0,
            ),
        )
        .unwrap();
        let c = Arc::new(c);
        let io = disk::Disk::new(c.clone());
        assert_eq!(c.size(), size);
        let w: &[(u64, usize, u64)] = &[
            (MIB + 4096, 512, 2),
            (3 * MIB, 4096, 3),
            (5 * MIB + 10, 100, 4),
            (10 * MIB, 8192, 5),
        ];
        for &(o, l, s) in w {
            let p = pattern(s, l);
            io.write_at(&p, o).unwrap();
            model[o as usize..o as usize + l].copy_from_slice(&p);
        }
        assert_eq!(bat_state(c.bat_entry(1).unwrap()), PB_PARTIALLY_PRESENT);
        assert_eq!(bat_state(c.bat_entry(2).unwrap()), PB_NOT_PRESENT);
        assert_eq!(read(&c, 0, size as usize), model);
        // Block status: the one present sector, then the parent.
        let e = c.block_status(MIB, MIB).unwrap();
        assert_eq!(e.allocation, Allocation::Unallocated);
        assert_eq!(e.len, 4096);
        let e = c.block_status(MIB + 4096, MIB - 4096).unwrap();
        assert!(matches!(
            e.allocation,
            Allocation::Data {
                host_offset: Some(_)
            }
        ));
        assert_eq!(e.len, 512);
        c.close().unwrap();
    }
    assert!(
        std::fs::read(&bp).unwrap() == base_bytes,
        "child writes touched the base"
    );
    let child_bytes = std::fs::read(&cp).unwrap();

    // Grandchild in another directory.
    {
        let mut child = VhdxDisk::open_path(&cp, &OpenOptions { read_only: true }).unwrap();
        let link = child.parent_link().unwrap();
        assert_eq!(
            chain::parent_candidates(Some(&cp), &link)[0],
            bp,
            "relative path resolves to the base"
        );
        let base = ro(&bp);
        assert_eq!(Some(link.expected_id), base.unique_id());
        assert_eq!(link.format, "vhdx");
        child.attach_parent(base).unwrap();
        let child: Arc<dyn BlockDevice> = Arc::new(child);
        let g = VhdxDisk::create(
            &gp,
            &CreateOptions::new(
                CreateKind::Differencing {
                    parent_path: cp.clone(),
                    parent: child.clone(),
                },
                0,
            ),
        )
        .unwrap();
        let p = pattern(9, 3 * MIB as usize);
        g.write_at(&p, MIB / 2).unwrap();
        model[(MIB / 2) as usize..(MIB / 2) as usize + p.len()].copy_from_slice(&p);
        g.write_zeroes(12 * MIB, MIB, ZeroFlags { may_unmap: true })
            .unwrap();
        model[(12 * MIB) as usize..(13 * MIB) as usize].fill(0);
        assert_eq!(read(&g, 0, size as usize), model);
        assert_eq!(bat_state(g.bat_entry(12).unwrap()), PB_ZERO);
        g.close().unwrap();
    }
    assert!(
        std::fs::read(&cp).unwrap() == child_bytes,
        "grandchild writes touched the child"
    );
    assert!(std::fs::read(&bp).unwrap() == base_bytes);

    // Reopen the whole chain by hand from the locators.
    let mut g = VhdxDisk::open_path(&gp, &OpenOptions { read_only: true }).unwrap();
    // Without a parent, parent-backed reads fail clearly.
    let err = g.read_at(&mut [0u8; 512], 15 * MIB).unwrap_err();
    assert!(matches!(err, disk::Error::ParentNotFound { .. }), "{err}");
    let gl = g.parent_link().unwrap();
    let cpath = chain::parent_candidates(Some(&gp), &gl)
        .iter()
        .find(|p| p.exists())
        .unwrap()
        .clone();
    assert_eq!(cpath.canonicalize().unwrap(), cp.canonicalize().unwrap());
    let mut c = VhdxDisk::open_path(&cpath, &OpenOptions { read_only: true }).unwrap();
    assert_eq!(Some(gl.expected_id), c.unique_id());
    c.attach_parent(ro(&bp)).unwrap();
    g.attach_parent(Arc::new(c)).unwrap();
    assert_eq!(read(&g, 0, size as usize), model);
    assert!(g.format_specific().unwrap()["has_parent"]
        .as_bool()
        .unwrap());

    // A parent of the wrong size is refused.
    let other = dir.path().join("other.vhdx");
    VhdxDisk::create(&other, &CreateOptions::new(CreateKind::Dynamic, 8 * MIB)).unwrap();
    let mut g2 = VhdxDisk::open_path(&gp, &OpenOptions { read_only: true }).unwrap();
    assert!(g2.attach_parent(ro(&other)).is_err());
}

#[test]
fn set_parent_rewrites_the_locator() {
    let dir = tempfile::tempdir().unwrap();
    let bp = dir.path().join("base.vhdx");
    let b2 = dir.path().join("moved").join("base-copy.vhdx");
    std::fs::create_dir(dir.path().join("moved")).unwrap();
    let cp = dir.path().join("child.vhdx");
    VhdxDisk::create(&bp, &CreateOptions::new(CreateKind::Dynamic, 4 * MIB))
        .unwrap()
        .write_at(&[7u8; 4096], 0)
        .unwrap();
    std::fs::copy(&bp, &b2).unwrap();
    {
        let c = VhdxDisk::create(
            &cp,
            &CreateOptions::new(
                CreateKind::Differencing {
                    parent_path: bp.clone(),
                    parent: ro(&bp),
                },
                0,
            ),
        )
        .unwrap();
        c.write_at(&[1u8; 512], 8192).unwrap();
        c.set_parent(&b2, &*ro(&b2)).unwrap();
        c.close().unwrap();
    }
    let (rc, out) = if have_qemu() {
        qemu_check_diff(&cp)
    } else {
        (0, String::new())
    };
    assert_eq!(rc, 0, "{out}");
    let mut c = VhdxDisk::open_path(&cp, &OpenOptions { read_only: true }).unwrap();
    let l = c.parent_link().unwrap();
    assert_eq!(chain::parent_candidates(Some(&cp), &l)[0], b2);
    c.attach_parent(ro(&b2)).unwrap();
    assert_eq!(read(&c, 0, 4096), vec![7u8; 4096]);
    assert_eq!(read(&c, 8192, 512), vec![1u8; 512]);
    let fs = c.format_specific().unwrap();
    assert!(fs["parent_locator"]["relative_path"]
        .as_str()
        .unwrap()
        .contains("moved\\base-copy.vhdx"));
}

/// qemu refuses differencing VHDX; all we can ask is that it says so rather than "corrupt".
fn qemu_check_diff(p: &Path) -> (i32, String) {
    let (rc, out) = qemu_check(p);
    if out.contains("not supported") || out.contains("Operation not supported") {
        return (0, out);
    }
    (rc, out)
}

#[test]
fn four_k_logical_sectors() {
    let dir = tempfile::tempdir().unwrap();
    for fixed in [false, true] {
        let p = dir.path().join(format!("4k-{fixed}.vhdx"));
        let mut o = CreateOptions::new(
            if fixed {
                CreateKind::Fixed
            } else {
                CreateKind::Dynamic
            },
            40 * MIB,
        );
        o.logical_sector_size = 4096;
        o.physical_sector_size = 4096;
        let mut model = vec![0u8; 40 * MIB as usize];
        {
            let d = disk::Disk::new(Arc::new(VhdxDisk::create(&p, &o).unwrap()));
            assert_eq!(d.logical_sector_size(), 4096);
            for (i, &(off, len)) in [
                (0u64, 4096usize),
                (MIB + 4096, 65536),
                (7 * MIB + 100, 5000),
                (39 * MIB, MIB as usize),
            ]
            .iter()
            .enumerate()
            {
                let data = pattern(i as u64 + 40, len);
                d.write_at(&data, off).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            d.flush().unwrap();
            assert_eq!(read(&d, 0, model.len()), model);
            d.close().unwrap();
        }
        let d = VhdxDisk::open_path(&p, &OpenOptions { read_only: true }).unwrap();
        assert_eq!(d.logical_sector_size(), 4096);
        assert_eq!(d.info().chunk_ratio, 32768);
        assert_eq!(read(&d, 0, model.len()), model);
        let rep = vhdx::check(d.storage().clone(), disk::check::Repair::None).unwrap();
        assert_eq!(rep.corruptions, 0, "{:?}", rep.findings);
    }
    // A differencing child of a 4K parent is 4K too.
    let p = dir.path().join("4k-false.vhdx");
    let cp = dir.path().join("4k-child.vhdx");
    let c = VhdxDisk::create(
        &cp,
        &CreateOptions::new(
            CreateKind::Differencing {
                parent_path: p.clone(),
                parent: ro(&p),
            },
            0,
        ),
    )
    .unwrap();
    assert_eq!(c.logical_sector_size(), 4096);
    let c = disk::Disk::new(Arc::new(c));
    c.write_at(&[3u8; 100], 4096 * 3 + 7).unwrap();
    let mut want = read(&*ro(&p), 4096 * 3, 4096);
    want[7..107].fill(3);
    assert_eq!(read(&c, 4096 * 3, 4096), want);
}

#[test]
fn trim_block_status_resize_compact() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.vhdx");
    let d = VhdxDisk::create(&p, &CreateOptions::new(CreateKind::Dynamic, 16 * MIB)).unwrap();
    for b in 0..8u64 {
        d.write_at(&pattern(b, MIB as usize), b * MIB).unwrap();
    }
    // Blocks 2 and 5 get zero data (compact releases them), block 3 is discarded.
    d.write_at(&vec![0u8; MIB as usize], 2 * MIB).unwrap();
    d.write_at(&vec![0u8; MIB as usize], 5 * MIB).unwrap();
    d.discard(3 * MIB, MIB).unwrap();
    d.write_zeroes(6 * MIB + 512, 1024, ZeroFlags::default())
        .unwrap();
    assert_eq!(bat_state(d.bat_entry(3).unwrap()), PB_NOT_PRESENT);
    assert_eq!(read(&d, 3 * MIB, 4096), vec![0u8; 4096]);
    let e = d.block_status(3 * MIB, 13 * MIB).unwrap();
    assert_eq!(
        e,
        disk::Extent {
            len: MIB,
            allocation: Allocation::Unallocated
        }
    );
    let e = d.block_status(0, 16 * MIB).unwrap();
    assert!(matches!(
        e.allocation,
        Allocation::Data {
            host_offset: Some(_)
        }
    ));
    let e = d.block_status(8 * MIB, 8 * MIB).unwrap();
    assert_eq!(
        e,
        disk::Extent {
            len: 8 * MIB,
            allocation: Allocation::Unallocated
        }
    );

    let mut model = read(&d, 0, 16 * MIB as usize);
    let before = std::fs::metadata(&p).unwrap().len();
    let st = d.compact().unwrap();
    assert_eq!(st.blocks_released, 2);
    assert!(st.blocks_moved >= 1, "{st:?}");
    assert!(st.new_len < before, "{st:?} before {before}");
    assert_eq!(read(&d, 0, 16 * MIB as usize), model);

    // Resize: grow, write at the new end, shrink refused below allocated data.
    d.resize(64 * MIB).unwrap();
    assert_eq!(d.size(), 64 * MIB);
    d.write_at(&[9u8; 4096], 64 * MIB - 4096).unwrap();
    model.resize(64 * MIB as usize, 0);
    model[(64 * MIB - 4096) as usize..].fill(9);
    let err = d.resize(8 * MIB).unwrap_err();
    assert!(err.to_string().contains("minimum size"), "{err}");
    d.close().unwrap();
    drop(d);
    let d = VhdxDisk::open_path(&p, &OpenOptions::default()).unwrap();
    assert_eq!(d.size(), 64 * MIB);
    assert_eq!(read(&d, 0, 64 * MIB as usize), model);
    d.discard(63 * MIB, MIB).unwrap();
    d.resize(10 * MIB).unwrap();
    assert_eq!(d.size(), 10 * MIB);
    d.resize(12 * MIB).unwrap();
    assert_eq!(read(&d, 0, 10 * MIB as usize), model[..10 * MIB as usize]);
    assert_eq!(
        read(&d, 10 * MIB, 2 * MIB as usize),
        vec![0u8; 2 * MIB as usize]
    );
    d.close().unwrap();
    drop(d);
    let rep = vhdx::check(
        VhdxDisk::open_path(&p, &OpenOptions { read_only: true })
            .unwrap()
            .storage()
            .clone(),
        disk::check::Repair::None,
    )
    .unwrap();
    assert_eq!(rep.corruptions, 0, "{:?}", rep.findings);
    if have_qemu() {
        let (rc, out) = qemu_check(&p);
        assert_eq!(rc, 0, "{out}");
        let raw = dir.path().join("t.raw");
        let mut m = model[..12 * MIB as usize].to_vec();
        m[10 * MIB as usize..].fill(0);
        std::fs::write(&raw, &m).unwrap();
        let out = run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "vhdx",
                "-F",
                "raw",
                p.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        assert!(out.contains("identical"), "{out}");
    }
}

#[test]
fn fixed_images_stay_allocated_and_measure_matches() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.vhdx");
    let o = CreateOptions::new(CreateKind::Fixed, 10 * MIB);
    let d = VhdxDisk::create(&p, &o).unwrap();
    d.discard(0, 10 * MIB).unwrap();
    d.write_zeroes(0, 2 * MIB, ZeroFlags { may_unmap: true })
        .unwrap();
    for b in 0..10 {
        assert_eq!(bat_state(d.bat_entry(b).unwrap()), PB_FULLY_PRESENT);
    }
    d.close().unwrap();
    let len = std::fs::metadata(&p).unwrap().len();
    let (req, full) = vhdx::measure(10 * MIB, 0, &o);
    assert_eq!(req, len);
    assert_eq!(full, len);
    let od = CreateOptions::new(CreateKind::Dynamic, 10 * MIB);
    let (req, full) = vhdx::measure(10 * MIB, 3 * MIB, &od);
    assert!(req < full && req >= 3 * MIB);
    // Bad create options are refused with InvalidArgument.
    let mut bad = od.clone();
    bad.block_size = 3 << 20;
    assert!(matches!(
        VhdxDisk::create(&dir.path().join("x.vhdx"), &bad),
        Err(disk::Error::InvalidArgument(_))
    ));
    let mut bad = od.clone();
    bad.size = (64u64 << 40) + 4096;
    assert!(VhdxDisk::create(&dir.path().join("y.vhdx"), &bad).is_err());
}

#[test]
fn unique_id_changes_on_first_write_and_close_leaves_log_empty() {
    let s = Arc::new(disk::MemStorage::new());
    let d =
        VhdxDisk::create_on(s.clone(), &CreateOptions::new(CreateKind::Dynamic, 8 * MIB)).unwrap();
    let id0 = d.unique_id();
    d.write_at(&[1u8; 4096], 0).unwrap();
    let id1 = d.unique_id();
    assert_ne!(id0, id1);
    d.flush().unwrap();
    assert!(d.log_entries_written() >= 1);
    drop(d); // drop closes
    let d = VhdxDisk::open(s, &OpenOptions { read_only: true }).unwrap();
    assert!(!d.dirty());
    assert_eq!(d.info().log_guid, "00000000-0000-0000-0000-000000000000");
    assert_eq!(d.unique_id(), id1);
    assert_eq!(read(&d, 0, 4096), vec![1u8; 4096]);
}

#[test]
fn growing_past_the_bat_region_relocates_the_bat() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.vhdx");
    let d = VhdxDisk::create(&p, &CreateOptions::new(CreateKind::Dynamic, 16 * MIB)).unwrap();
    d.write_at(&[4u8; 4096], 5 * MIB).unwrap();
    let old_bat = d.info().bat_offset;
    let big = 200u64 << 30;
    d.resize(big).unwrap();
    assert_ne!(d.info().bat_offset, old_bat);
    d.write_at(&[6u8; 4096], big - 4096).unwrap();
    d.close().unwrap();
    drop(d);
    let d = VhdxDisk::open_path(&p, &OpenOptions { read_only: true }).unwrap();
    assert_eq!(d.size(), big);
    assert_eq!(read(&d, 5 * MIB, 4096), vec![4u8; 4096]);
    assert_eq!(read(&d, big - 4096, 4096), vec![6u8; 4096]);
    assert_eq!(read(&d, 100 << 30, 4096), vec![0u8; 4096]);
    let rep = vhdx::check(d.storage().clone(), disk::check::Repair::None).unwrap();
    assert_eq!(rep.corruptions, 0, "{:?}", rep.findings);
    drop(d);
    if have_qemu() {
        let (rc, out) = qemu_check(&p);
        assert_eq!(rc, 0, "{out}");
        let out = run(
            "qemu-io",
            &[
                "-f",
                "vhdx",
                "-r",
                "-c",
                &format!("read -P 6 {} 4096", big - 4096),
                p.to_str().unwrap(),
            ],
        );
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
}

#[test]
fn a_flush_larger_than_half_the_log_is_split_into_entries() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("wide.vhdx");
    let size = 1u64 << 40;
    let d = VhdxDisk::create(&p, &CreateOptions::new(CreateKind::Dynamic, size)).unwrap();
    // 300 blocks, each on its own BAT page: 300 dirty pages in one flush.
    for i in 0..300u64 {
        d.write_at(&pattern(i, 4096), i * 512 * MIB + 8192).unwrap();
    }
    d.flush().unwrap();
    assert!(d.log_entries_written() >= 3, "{}", d.log_entries_written());
    d.close().unwrap();
    drop(d);
    let d = VhdxDisk::open_path(&p, &OpenOptions { read_only: true }).unwrap();
    for i in 0..300u64 {
        assert_eq!(read(&d, i * 512 * MIB + 8192, 4096), pattern(i, 4096));
    }
    let rep = vhdx::check(d.storage().clone(), disk::check::Repair::None).unwrap();
    assert_eq!(rep.corruptions, 0, "{:?}", rep.findings);
    drop(d);
    if have_qemu() {
        let (rc, out) = qemu_check(&p);
        assert_eq!(rc, 0, "{out}");
    }
}

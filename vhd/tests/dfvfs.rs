//! Real images from dfvfs (qemu-made and Windows-made).

mod common;

use std::sync::Arc;

use disk::{Access, BlockDevice, FileStorage, Storage};
use vhd::{OpenOptions, SizeRule, VhdDisk};

fn open(p: &std::path::Path, rule: SizeRule) -> disk::Result<VhdDisk> {
    let s = FileStorage::open(p, Access::ReadOnly, false)?;
    VhdDisk::open(
        Arc::new(s),
        &OpenOptions {
            read_only: true,
            size_rule: rule,
        },
    )
}

#[test]
fn ext2_qemu_dynamic_uses_chs() {
    let Some(p) = common::dfvfs("ext2.vhd") else {
        return;
    };
    let s = FileStorage::open(&p, Access::ReadOnly, false).unwrap();
    assert!(VhdDisk::probe(&s).unwrap());
    let d = open(&p, SizeRule::Auto).unwrap();
    assert_eq!(d.size(), 4_212_736);
    let i = d.info();
    assert_eq!(i.disk_type, "dynamic");
    assert_eq!(i.creator_app, "qemu");
    assert_eq!(i.size_rule, "chs");
    assert_eq!(i.current_size, 4_212_736);
    assert_eq!((i.cylinders, i.heads, i.sectors_per_track), (121, 4, 17));
    assert_eq!(d.cluster_size(), Some(2 << 20));
    assert!(i.warnings.is_empty(), "{:?}", i.warnings);
    // Same size via current_size here (qemu wrote both equal).
    assert_eq!(open(&p, SizeRule::CurrentSize).unwrap().size(), 4_212_736);
    // ext2 superblock magic 0xEF53 at byte 1024+56.
    let mut b = [0u8; 2];
    d.read_at(&mut b, 1024 + 56).unwrap();
    assert_eq!(b, [0x53, 0xEF]);
    // Block 0 allocated with host offset = 4*512 + 512 (qemu layout), block 1 unallocated.
    let e = d.block_status(0, 4 << 20).unwrap();
    assert_eq!(
        e.allocation,
        disk::Allocation::Data {
            host_offset: Some(2560)
        }
    );
    assert_eq!(e.len, 2 << 20);
    let e = d.block_status(2 << 20, d.size() - (2 << 20)).unwrap();
    assert_eq!(e.allocation, disk::Allocation::Zero);
    assert!(d.parent_link().is_none());
    let fs = d.format_specific().unwrap();
    assert_eq!(fs["size_rule"], "chs");
    assert_eq!(fs["bat_offset"], 1536);
}

#[test]
fn fat_differential_windows_layout() {
    let Some(p) = common::dfvfs("fat-differential.vhd") else {
        return;
    };
    let d = open(&p, SizeRule::Auto).unwrap();
    let i = d.info();
    assert_eq!(i.disk_type, "differencing");
    assert_eq!(i.creator_app, "win ");
    assert_eq!(i.size_rule, "current_size");
    assert_eq!(d.size(), 4 << 20);
    // CHS 120/4/17 is smaller than current_size; Chs override reports that.
    assert_eq!(i.chs_size, 4_177_920);
    assert_eq!(open(&p, SizeRule::Chs).unwrap().size(), 4_177_920);
    assert_eq!(i.bat_offset, Some(8192));
    assert_eq!(i.max_table_entries, Some(2));
    assert_eq!(
        i.parent_name.as_deref(),
        Some("C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd")
    );
    assert_eq!(i.locators.len(), 2);
    let w2ku = &i.locators[0];
    assert_eq!(w2ku.platform, "W2ku");
    assert_eq!(
        (
            w2ku.data_space,
            w2ku.data_space_bytes,
            w2ku.data_length,
            w2ku.data_offset
        ),
        (4096, 4096, 84, 4096)
    );
    assert_eq!(
        w2ku.path.as_deref(),
        Some("C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd")
    );
    let w2ru = &i.locators[1];
    assert_eq!(w2ru.platform, "W2ru");
    assert_eq!(
        (w2ru.data_space, w2ru.data_length, w2ru.data_offset),
        (65536, 32, 12288)
    );
    assert_eq!(w2ru.path.as_deref(), Some(".\\fat-parent.vhd"));

    let link = d.parent_link().unwrap();
    let dir = p.parent().unwrap();
    assert_eq!(link.format, "vhd");
    assert_eq!(
        chain::parent_candidates(Some(&p), &link),
        // The W2ku path is a Windows path, not absolute here: only the relative locator and
        // the name beside the child are tried.
        vec![dir.join("fat-parent.vhd")]
    );
    assert_eq!(
        link.expected_id.to_rfc_bytes(),
        [
            0x5f, 0xa2, 0x1a, 0x55, 0xf3, 0x94, 0xaa, 0x4d, 0x99, 0x58, 0x19, 0x51, 0xa6, 0x7d,
            0x55, 0x40
        ]
    );
    // Windows data layout: bitmap at 0x9f*512 = 81408, payload 4 KiB aligned at 81920.
    let e = d.block_status(0, 512).unwrap();
    match e.allocation {
        disk::Allocation::Data { host_offset } => assert_eq!(host_offset, Some(81920)),
        disk::Allocation::Unallocated => {}
        other => panic!("unexpected {other:?}"),
    }
    // Block 1 unallocated: reading it without a parent fails with a clear error.
    let mut b = vec![0u8; 512];
    let err = d.read_at(&mut b, 3 << 20).unwrap_err();
    assert!(matches!(err, disk::Error::ParentNotFound { .. }), "{err}");
    let fs = d.format_specific().unwrap();
    assert_eq!(fs["locators"][1]["platform"], "W2ru");
}

/// Tolerance decision: image.vhd and image-differential.vhd have bad footer checksums (and the
/// child a bad header checksum) on otherwise sound structures. qemu 10 refuses them; we open
/// them and report warnings; check() reports corruption.
#[test]
fn dfvfs_bad_checksums_are_warnings() {
    let Some(p) = common::dfvfs("image.vhd") else {
        return;
    };
    let d = open(&p, SizeRule::Auto).unwrap();
    let i = d.info();
    assert_eq!(i.disk_type, "dynamic");
    assert_eq!(d.size(), 104_448);
    assert!(
        i.warnings
            .iter()
            .any(|w| w.contains("footer checksum mismatch")),
        "{:?}",
        i.warnings
    );
    let mut buf = vec![0u8; 104_448];
    d.read_at(&mut buf, 0).unwrap();
    let parent: Arc<dyn BlockDevice> = Arc::new(d);

    let Some(c) = common::dfvfs("image-differential.vhd") else {
        return;
    };
    let mut child = open(&c, SizeRule::Auto).unwrap();
    let ci = child.info();
    assert_eq!(ci.disk_type, "differencing");
    assert!(ci.warnings.iter().any(|w| w.contains("footer checksum")));
    assert!(ci
        .warnings
        .iter()
        .any(|w| w.contains("dynamic header checksum")));
    let link = child.parent_link().unwrap();
    assert_eq!(link.name, "image.vhd");
    assert_eq!(
        chain::parent_candidates(Some(&c), &link),
        vec![c.parent().unwrap().join("image.vhd")]
    );
    assert_eq!(Some(link.expected_id), parent.unique_id());
    child.attach_parent(parent).unwrap();
    let mut cb = vec![0u8; 104_448];
    child.read_at(&mut cb, 0).unwrap();
    // Sectors the child's bitmap does not claim read the parent's bytes; claimed ones are
    // read from the child's own block.
    let (mut own, mut inherited) = (0, 0);
    let mut off = 0u64;
    while off < 104_448 {
        let e = child.block_status(off, 104_448 - off).unwrap();
        let r = off as usize..(off + e.len) as usize;
        match e.allocation {
            disk::Allocation::Unallocated => {
                assert_eq!(cb[r.clone()], buf[r], "inherited range at {off}");
                inherited += e.len;
            }
            disk::Allocation::Data {
                host_offset: Some(h),
            } => {
                let mut raw = vec![0u8; e.len as usize];
                std::os::unix::fs::FileExt::read_exact_at(
                    &std::fs::File::open(&c).unwrap(),
                    &mut raw,
                    h,
                )
                .unwrap();
                assert_eq!(cb[r], raw[..], "own range at {off}");
                own += e.len;
            }
            other => panic!("{other:?}"),
        }
        off += e.len;
    }
    assert_eq!(own + inherited, 104_448);
    println!("image-differential.vhd: {own} bytes own, {inherited} inherited");

    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(&c, Access::ReadOnly, false).unwrap());
    let r = vhd::check(s, disk::check::Repair::None).unwrap();
    assert!(r.corruptions >= 2, "{r:?}");
}

#[test]
fn dfvfs_good_images_check_clean() {
    for name in ["ext2.vhd", "fat-differential.vhd"] {
        let Some(p) = common::dfvfs(name) else { return };
        let s: Arc<dyn Storage> = Arc::new(FileStorage::open(&p, Access::ReadOnly, false).unwrap());
        let r = vhd::check(s, disk::check::Repair::None).unwrap();
        assert_eq!(
            (r.corruptions, r.leaks, r.check_errors),
            (0, 0, 0),
            "{name}: {r:?}"
        );
        assert_eq!(r.exit_code(), 0);
    }
}

//! Partition files: a GPT image with an ext4 and a FAT partition, loop-mounted through the FUSE
//! files; an MBR image with logical partitions, checked against sfdisk.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use common::*;
use disk::{Access, BlockDevice, RawDisk};
use mount::{MountOptions, PartitionKind, Scheme};

const MIB: u64 = 1 << 20;

/// Copies `src` into `dst` at `offset`, skipping zero chunks (keeps `dst` sparse).
fn place(dst: &Path, src: &Path, offset: u64) {
    let data = std::fs::read(src).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(dst).unwrap();
    for (i, chunk) in data.chunks(64 * 1024).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            f.write_all_at(chunk, offset + (i * 64 * 1024) as u64)
                .unwrap();
        }
    }
}

/// `sfdisk -d` partitions as (number, start sector, sectors), extended containers included.
fn sfdisk_dump(img: &Path) -> Vec<(u32, u64, u64, String)> {
    let out = run("sfdisk", &["-d", img.to_str().unwrap()]);
    let name = img.to_str().unwrap();
    out.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (num, fields) = rest.split_once(':')?;
            let num: u32 = num.trim().parse().ok()?;
            let get = |key: &str| -> Option<String> {
                fields
                    .split(',')
                    .map(str::trim)
                    .find_map(|f| f.strip_prefix(key).map(|v| v.trim().to_string()))
            };
            Some((
                num,
                get("start=")?.parse().ok()?,
                get("size=")?.parse().ok()?,
                get("type=")?,
            ))
        })
        .collect()
}

/// Lists a directory's entry names, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn gpt_ext4_and_fat_partitions_loop_mount() {
    let tools = [
        "sfdisk",
        "mkfs.ext4",
        "mkfs.vfat",
        "mcopy",
        "fsck.ext4",
        "fsck.vfat",
        "mount",
    ];
    if !prerequisites("gpt_ext4_and_fat_partitions_loop_mount", &tools) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = |n: &str| tmp.path().join(n);

    // Content for both filesystems.
    let content = t("content");
    std::fs::create_dir_all(content.join("sub/dir")).unwrap();
    std::fs::write(content.join("hello.txt"), b"hello from ext4\n").unwrap();
    std::fs::write(content.join("big.bin"), pattern(42, 3 * MIB as usize + 17)).unwrap();
    std::fs::write(content.join("sub/dir/nested.txt"), b"nested\n").unwrap();

    // Partition 1: ext4 with the content; partition 2: FAT with two files.
    let (p1_start, p1_sectors) = (2048u64, 65536u64);
    let (p2_start, p2_sectors) = (p1_start + p1_sectors, 40960u64);
    let ext4 = t("p1.img");
    std::fs::File::create(&ext4)
        .unwrap()
        .set_len(p1_sectors * 512)
        .unwrap();
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            content.to_str().unwrap(),
            ext4.to_str().unwrap(),
        ],
    );
    let fat = t("p2.img");
    std::fs::File::create(&fat)
        .unwrap()
        .set_len(p2_sectors * 512)
        .unwrap();
    run("mkfs.vfat", &["-n", "VIRIDIAN", fat.to_str().unwrap()]);
    let fat_file = t("fat.txt");
    std::fs::write(&fat_file, b"hello from FAT\n").unwrap();
    let fat_big = t("fatbig.bin");
    std::fs::write(&fat_big, pattern(7, 1_500_000)).unwrap();
    run(
        "mcopy",
        &[
            "-i",
            fat.to_str().unwrap(),
            fat_file.to_str().unwrap(),
            fat_big.to_str().unwrap(),
            "::/",
        ],
    );

    let img = t("gpt.raw");
    sparse_raw(&img, 64 * MIB, &[]);
    run_stdin(
        "sfdisk",
        &["-q", "--no-reread", img.to_str().unwrap()],
        &format!(
            "label: gpt\n\
             start={p1_start}, size={p1_sectors}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n\
             start={p2_start}, size={p2_sectors}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=data\n"
        ),
    );
    place(&img, &ext4, p1_start * 512);
    place(&img, &fat, p2_start * 512);

    // The parser agrees with sfdisk.
    let d: Arc<dyn BlockDevice> = Arc::new(RawDisk::open(&img, Access::ReadOnly).unwrap());
    let table = mount::read_table(d.as_ref()).unwrap();
    assert_eq!(table.scheme, Some(Scheme::Gpt));
    let parts = &table.partitions;
    assert_eq!(parts.len(), 2);
    for (p, (num, start, size, _)) in parts.iter().zip(sfdisk_dump(&img)) {
        assert_eq!((p.number, p.start, p.len), (num, start * 512, size * 512));
    }
    assert!(matches!(&parts[0].kind, PartitionKind::Gpt { name, .. } if name == "root"));

    let opts = MountOptions {
        partitions: true,
        ..Default::default()
    };
    let m = Mounted::new(d.clone(), &opts);
    assert_eq!(names(m.dir.path()), vec!["disk", "p1", "p2"]);
    assert_eq!(
        std::fs::metadata(m.path("p1")).unwrap().len(),
        p1_sectors * 512
    );
    assert_same_bytes(&m.path("p1"), &ext4);
    assert_same_bytes(&m.path("p2"), &fat);
    assert_same_bytes(&m.path("disk"), &img);

    // fsck reads through the FUSE files.
    run("fsck.ext4", &["-n", "-f", m.path("p1").to_str().unwrap()]);
    run("fsck.vfat", &["-n", m.path("p2").to_str().unwrap()]);

    {
        let mut l1 = LoopMount::new(&m.path("p1"), "ro");
        assert_eq!(
            std::fs::read(l1.path("hello.txt")).unwrap(),
            b"hello from ext4\n"
        );
        assert!(std::fs::read(l1.path("big.bin")).unwrap() == pattern(42, 3 * MIB as usize + 17));
        assert_eq!(
            std::fs::read(l1.path("sub/dir/nested.txt")).unwrap(),
            b"nested\n"
        );
        l1.unmount();
    }
    // The FAT partition: loop-mount it when the kernel has vfat, else read it with mtools
    // through the FUSE file (the files still come through our partition view).
    let out = t("out.bin");
    if kernel_has_fs("vfat") {
        let mut l2 = LoopMount::new(&m.path("p2"), "ro");
        assert_eq!(
            std::fs::read(l2.path("fat.txt")).unwrap(),
            b"hello from FAT\n"
        );
        std::fs::copy(l2.path("fatbig.bin"), &out).unwrap();
        l2.unmount();
    } else {
        eprintln!("kernel has no vfat: reading the FAT partition with mtools instead");
        let p2 = m.path("p2");
        let txt = run("mtype", &["-i", p2.to_str().unwrap(), "::fat.txt"]);
        assert_eq!(txt, "hello from FAT\n");
        run(
            "mcopy",
            &[
                "-i",
                p2.to_str().unwrap(),
                "::fatbig.bin",
                out.to_str().unwrap(),
            ],
        );
    }
    assert!(std::fs::read(&out).unwrap() == pattern(7, 1_500_000));
}

fn kernel_has_fs(name: &str) -> bool {
    let listed = |n: &str| {
        std::fs::read_to_string("/proc/filesystems")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().last() == Some(n))
    };
    listed(name)
        || (std::process::Command::new("modprobe")
            .arg(name)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            && listed(name))
}

#[test]
fn mbr_extended_logical_partitions() {
    if !prerequisites("mbr_extended_logical_partitions", &["sfdisk"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("mbr.raw");
    sparse_raw(&img, 64 * MIB, &[]);
    run_stdin(
        "sfdisk",
        &["-q", "--no-reread", img.to_str().unwrap()],
        "label: dos\n\
         start=2048, size=8192, type=83, bootable\n\
         start=10240, size=100000, type=5\n\
         start=12288, size=8192, type=83\n\
         start=22528, size=8192, type=7\n\
         start=32768, size=16384, type=c\n\
         start=112640, size=4096, type=82\n",
    );
    let d: Arc<dyn BlockDevice> = Arc::new(RawDisk::open(&img, Access::ReadOnly).unwrap());
    let table = mount::read_table(d.as_ref()).unwrap();
    assert_eq!(table.scheme, Some(Scheme::Mbr));
    assert!(table.dropped.is_empty(), "{:?}", table.dropped);
    let expected: Vec<(u32, u64, u64, String)> = sfdisk_dump(&img)
        .into_iter()
        .filter(|(_, _, _, ty)| ty != "5" && ty != "f")
        .collect();
    assert_eq!(expected.len(), 5);
    let got: Vec<(u32, u64, u64, String)> = table
        .partitions
        .iter()
        .map(|p| match p.kind {
            PartitionKind::Mbr { type_id, .. } => {
                (p.number, p.start / 512, p.len / 512, format!("{type_id:x}"))
            }
            _ => panic!("not MBR"),
        })
        .collect();
    assert_eq!(got, expected);
    assert!(matches!(
        table.partitions[0].kind,
        PartitionKind::Mbr {
            bootable: true,
            logical: false,
            ..
        }
    ));
    assert!(matches!(
        table.partitions[2].kind,
        PartitionKind::Mbr { logical: true, .. }
    ));

    let opts = MountOptions {
        partitions: true,
        ..Default::default()
    };
    let m = Mounted::new(d, &opts);
    assert_eq!(
        names(m.dir.path()),
        vec!["disk", "p1", "p3", "p5", "p6", "p7"]
    );
    assert_eq!(std::fs::metadata(m.path("p6")).unwrap().len(), 8192 * 512);
}

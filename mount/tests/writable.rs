//! Writable mounts: mkfs and file writes through a partition file, unmount, remount, read back.

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use common::*;
use disk::{Access, BlockDevice, RawDisk};
use mount::MountOptions;

const MIB: u64 = 1 << 20;

#[test]
fn mkfs_write_remount_read_back() {
    let tools = ["sfdisk", "mkfs.ext4", "fsck.ext4", "mount", "umount"];
    if !prerequisites("mkfs_write_remount_read_back", &tools) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("rw.raw");
    sparse_raw(&img, 96 * MIB, &[]);
    run_stdin(
        "sfdisk",
        &["-q", "--no-reread", img.to_str().unwrap()],
        "label: gpt\nstart=2048, size=180224, type=linux, name=rw\n",
    );
    let before = {
        let d = RawDisk::open(&img, Access::ReadOnly).unwrap();
        mount::partitions(&d).unwrap()
    };
    assert_eq!(before.len(), 1);

    let big = pattern(99, 5 * MIB as usize + 123);
    {
        let d: Arc<dyn BlockDevice> = Arc::new(RawDisk::open(&img, Access::ReadWrite).unwrap());
        let c = Counting::new(d);
        let opts = MountOptions {
            writable: true,
            partitions: true,
            ..Default::default()
        };
        let mut m = Mounted::new(c.clone(), &opts);
        let p1 = m.path("p1");
        // mkfs discards the partition first (fallocate punch-hole through the mount).
        run(
            "mkfs.ext4",
            &["-q", "-F", "-L", "viridian", p1.to_str().unwrap()],
        );
        let md = std::fs::metadata(&p1).unwrap();
        assert!(
            md.blocks() * 512 < md.len() / 2,
            "st_blocks {} should reflect a mostly empty filesystem",
            md.blocks()
        );
        {
            let mut l = LoopMount::new(&p1, "rw");
            std::fs::create_dir(l.path("dir")).unwrap();
            std::fs::write(l.path("dir/a.txt"), b"written through FUSE\n").unwrap();
            std::fs::write(l.path("big.bin"), &big).unwrap();
            l.unmount();
        }
        m.unmount().unwrap();
        assert_eq!(c.closes(), 1);
        assert!(c.flushes() >= 1);
    }

    // The partition table outside p1 is untouched.
    let d: Arc<dyn BlockDevice> = Arc::new(RawDisk::open(&img, Access::ReadOnly).unwrap());
    assert_eq!(mount::partitions(d.as_ref()).unwrap(), before);

    let opts = MountOptions {
        partitions: true,
        ..Default::default()
    };
    let m = Mounted::new(d, &opts);
    let p1 = m.path("p1");
    run("fsck.ext4", &["-n", "-f", p1.to_str().unwrap()]);
    let mut l = LoopMount::new(&p1, "ro");
    assert_eq!(
        std::fs::read(l.path("dir/a.txt")).unwrap(),
        b"written through FUSE\n"
    );
    assert!(std::fs::read(l.path("big.bin")).unwrap() == big);
    l.unmount();
}

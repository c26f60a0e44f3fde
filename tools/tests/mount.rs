//! `viridian mount` through real FUSE: bytes equal qemu-img's view, writes land, undo discards.

mod common;

use common::*;
use std::path::Path;

fn fuse_ready() -> bool {
    let ok = Path::new("/dev/fuse").exists() && have("fusermount3");
    if !ok {
        if require_all() {
            panic!(
                "FUSE is required (VIRIDIAN_REQUIRE_ALL=1) but /dev/fuse or fusermount3 is missing"
            );
        }
        eprintln!("SKIP: FUSE unavailable");
    }
    ok
}

/// Unmounts on drop so a failing test never leaves a mount behind.
struct Mounted<'a>(&'a Path);
impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = viridian(&["unmount", p(self.0)]);
        let _ = tool("fusermount3", &["-u", "-z", p(self.0)]);
    }
}

fn wait_unmounted(mp: &Path, image: &Path) {
    // The background server closes the image after the unmount; wait for its lock to go.
    for _ in 0..200 {
        if std::fs::read_to_string("/proc/mounts")
            .map(|m| !m.contains(p(mp)))
            .unwrap_or(true)
            && code(&["info", p(image)]) == 0
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
}

#[test]
fn mounted_disk_equals_qemu_raw_view_for_vhd_vhdx_and_chains() {
    if !fuse_ready() || !have("qemu-img") {
        return;
    }
    let d = tmp();
    let src = join(d.path(), "src.raw");
    patterned_raw(&src, 24 << 20, 11);
    let vhd = join(d.path(), "a.vhd");
    let vhdx = join(d.path(), "a.vhdx");
    ok(&["convert", "-O", "vhd", p(&src), p(&vhd)]);
    ok(&["convert", "-O", "vhdx", p(&src), p(&vhdx)]);
    let child = join(d.path(), "child.vhdx");
    ok(&["create", "-f", "vhdx", "-b", p(&vhdx), p(&child)]);
    ok(&["io", "-c", "write -P 0x3c 5M 300k", p(&child)]);
    let mp = join(d.path(), "mnt");
    std::fs::create_dir(&mp).unwrap();
    for (img, qfmt) in [(&vhd, "vpc"), (&vhdx, "vhdx")] {
        let reference = join(d.path(), "ref.raw");
        let _ = std::fs::remove_file(&reference);
        tool_ok(
            "qemu-img",
            &["convert", "-f", qfmt, "-O", "raw", p(img), p(&reference)],
        );
        {
            ok(&["mount", p(img), p(&mp)]);
            let _m = Mounted(&mp);
            tool_ok("cmp", &[p(&mp.join("disk")), p(&reference)]);
        }
        wait_unmounted(&mp, img);
    }
    // The chain: qemu cannot read differencing VHDX, so compare with our flattened copy and
    // check the child's bytes are there.
    let flat = join(d.path(), "flat.raw");
    ok(&["convert", "-O", "raw", p(&child), p(&flat)]);
    {
        ok(&["mount", p(&child), p(&mp)]);
        let _m = Mounted(&mp);
        tool_ok("cmp", &[p(&mp.join("disk")), p(&flat)]);
        let bytes = std::fs::read(mp.join("disk")).unwrap();
        assert!(bytes[5 << 20..(5 << 20) + 300 * 1024]
            .iter()
            .all(|&b| b == 0x3c));
    }
    wait_unmounted(&mp, &child);
}

#[test]
fn rw_mount_writes_land_and_undo_discard_leaves_image_identical() {
    if !fuse_ready() || !have("qemu-img") || !have("mkfs.ext4") {
        return;
    }
    let d = tmp();
    let img = join(d.path(), "fs.vhdx");
    ok(&["create", "-f", "vhdx", p(&img), "64M"]);
    let mp = join(d.path(), "mnt");
    std::fs::create_dir(&mp).unwrap();
    {
        ok(&["mount", "--rw", p(&img), p(&mp)]);
        let _m = Mounted(&mp);
        tool_ok(
            "mkfs.ext4",
            &["-q", "-F", "-E", "lazy_itable_init=0", p(&mp.join("disk"))],
        );
        // Write a file into the file system with debugfs (no kernel mount needed).
        let payload = join(d.path(), "payload.txt");
        std::fs::write(&payload, "hello from viridian\n".repeat(1000)).unwrap();
        tool_ok(
            "debugfs",
            &[
                "-w",
                "-R",
                &format!("write {} hello.txt", p(&payload)),
                p(&mp.join("disk")),
            ],
        );
    }
    wait_unmounted(&mp, &img);
    tool_ok("qemu-img", &["check", "-f", "vhdx", p(&img)]);
    assert_eq!(code(&["check", p(&img)]), 0);
    // Remount read-only and read the file back.
    {
        ok(&["mount", p(&img), p(&mp)]);
        let _m = Mounted(&mp);
        let out = tool_ok("debugfs", &["-R", "cat hello.txt", p(&mp.join("disk"))]);
        assert!(out.starts_with("hello from viridian"), "{out:.80}");
        tool_ok("e2fsck", &["-n", "-f", p(&mp.join("disk"))]);
    }
    wait_unmounted(&mp, &img);
    // Undo: write through the mount, discard at unmount: image byte-identical.
    let before = read_all(&img);
    {
        ok(&["mount", "--undo", "--undo-end", "discard", p(&img), p(&mp)]);
        let _m = Mounted(&mp);
        tool_ok(
            "debugfs",
            &["-w", "-R", "rm hello.txt", p(&mp.join("disk"))],
        );
    }
    wait_unmounted(&mp, &img);
    assert!(read_all(&img) == before, "undo discard changed the image");
    let out = tool_ok("qemu-img", &["info", p(&img)]);
    assert!(out.contains("vhdx"));
}

#[test]
fn mount_errors_are_clear() {
    if !fuse_ready() {
        return;
    }
    let d = tmp();
    let img = join(d.path(), "x.vhd");
    ok(&["create", "-f", "vhd", p(&img), "8M"]);
    let o = viridian(&["mount", p(&img), p(&join(d.path(), "nope"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
}

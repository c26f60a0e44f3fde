//! Running out of space: `serve`, `mount`/`unmount` and `io` exit non-zero and name the image
//! when what a client wrote could not be stored or made durable. The image lives on a small
//! tmpfs mounted by the test (skipped with a message when mounting is not possible; a failure
//! under VIRIDIAN_REQUIRE_ALL=1).

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// A mounted 8 MiB tmpfs, unmounted on drop.
struct SmallFs(PathBuf);
impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = tool("umount", &["-l", p(&self.0)]);
    }
}

fn small_fs(dir: &Path) -> Option<SmallFs> {
    let mp = dir.join("small");
    std::fs::create_dir(&mp).unwrap();
    let o = tool("mount", &["-t", "tmpfs", "-o", "size=8m", "tmpfs", p(&mp)]);
    if !o.status.success() {
        let why = String::from_utf8_lossy(&o.stderr).to_string();
        if require_all() {
            panic!("cannot mount a tmpfs (VIRIDIAN_REQUIRE_ALL=1): {why}");
        }
        eprintln!("SKIP: cannot mount a tmpfs: {why}");
        return None;
    }
    Some(SmallFs(mp))
}

/// A sparse 64 MiB raw image on the 8 MiB file system.
fn image(fs: &SmallFs) -> PathBuf {
    let img = fs.0.join("full.raw");
    ok(&["create", "-q", "-f", "raw", p(&img), "64M"]);
    img
}

#[test]
fn io_on_a_full_file_system_fails_naming_the_image() {
    let d = tmp();
    let Some(fs) = small_fs(d.path()) else { return };
    let img = image(&fs);
    let o = viridian(&["io", "-c", "write -P 0x11 0 16M", "-c", "flush", p(&img)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0), "io succeeded on a full disk");
    assert!(err.contains(p(&img)) || err.contains("full.raw"), "{err}");
}

#[test]
fn serve_on_a_full_file_system_exits_non_zero_naming_the_image() {
    if !have("qemu-io") {
        return;
    }
    let d = tmp();
    let Some(fs) = small_fs(d.path()) else { return };
    let img = image(&fs);
    let sock = d.path().join("s.sock");
    let mut g = serve_start(&["--rw", "-k", p(&sock), p(&img)], &sock)
        .unwrap_or_else(|(c, e)| panic!("serve exited {c}: {e}"));
    let q = tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 16M",
            "-c",
            "flush",
            &format!("nbd+unix:///?socket={}", p(&sock)),
        ],
    );
    let qout = String::from_utf8_lossy(&q.stdout).to_string() + &String::from_utf8_lossy(&q.stderr);
    assert!(
        qout.contains("No space left"),
        "the client was not told: {qout}"
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(g.0.id() as i32, libc::SIGTERM) };
    let st = g.0.wait().unwrap();
    let mut err = String::new();
    use std::io::Read;
    g.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_ne!(
        st.code(),
        Some(0),
        "serve exited 0 after losing writes: {err}"
    );
    assert!(
        err.contains("full.raw"),
        "serve did not name the image: {err}"
    );
}

#[test]
fn unmount_after_a_failed_write_back_exits_non_zero_naming_the_image() {
    if !fuse_usable() {
        return;
    }
    let d = tmp();
    let Some(fs) = small_fs(d.path()) else { return };
    let img = image(&fs);
    let mp = d.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    ok(&["mount", "--rw", p(&img), p(&mp)]);
    let guard = MountGuard(mp.clone());
    // A writer that fsyncs: the kernel must see the error (EIO/ENOSPC), not success.
    let dd = tool(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", p(&mp.join("disk"))),
            "bs=1M",
            "count=16",
            "conv=notrunc,fsync",
        ],
    );
    assert!(!dd.status.success(), "dd + fsync succeeded on a full disk");
    let o = viridian(&["unmount", p(&mp)]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_ne!(
        o.status.code(),
        Some(0),
        "unmount exited 0 after data was lost"
    );
    assert!(
        err.contains("full.raw"),
        "unmount did not name the image: {err}"
    );
    drop(guard);
}

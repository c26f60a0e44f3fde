//! run_foreground: SIGTERM unmounts, flushes and closes (alone in its own test binary because
//! it signals the whole process).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use disk::{BlockDevice, RawDisk};
use mount::MountOptions;

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mounted(p: &Path) -> bool {
    mount::mount_entry(p).is_some()
}

#[test]
fn sigterm_unmounts_and_closes() {
    if !prerequisites("sigterm_unmounts_and_closes", &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let canon = dir.path().canonicalize().unwrap();
    let opts = MountOptions {
        writable: true,
        ..Default::default()
    };

    // 1. Idle mount: SIGTERM unmounts at once.
    let c = Counting::new(Arc::new(RawDisk::memory(1 << 20).unwrap()));
    let disk: Arc<dyn BlockDevice> = c.clone();
    let (p, o) = (canon.clone(), opts.clone());
    let t = std::thread::spawn(move || mount::run_foreground(disk, &p, &o));
    wait_for("mount", 10, || mounted(&canon));
    std::fs::write(canon.join("disk"), b"x").unwrap_err(); // O_TRUNC is refused
                                                           // SAFETY: sends a signal to our own process; run_foreground has a handler installed.
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    let r = t.join().unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert!(!mounted(&canon));
    assert_eq!(c.closes(), 1);

    // 2. A file is held open: SIGTERM detaches lazily, waits a little, then closes the disk
    //    anyway so the image is left clean.
    let c = Counting::new(Arc::new(RawDisk::memory(1 << 20).unwrap()));
    let disk: Arc<dyn BlockDevice> = c.clone();
    let (p, o) = (canon.clone(), opts.clone());
    let t = std::thread::spawn(move || mount::run_foreground(disk, &p, &o));
    wait_for("mount", 10, || mounted(&canon));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(canon.join("disk"))
        .unwrap();
    let start = Instant::now();
    // SAFETY: as above.
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    let r = t.join().unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(15));
    assert!(!mounted(&canon));
    assert!(c.closes() >= 1);
    drop(f);
}

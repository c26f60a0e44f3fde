//! Helpers shared by the vhdx integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Whether qemu-img and qemu-io are installed. Without them the interop tests skip, unless
/// VIRIDIAN_REQUIRE_ALL=1 makes that a failure.
pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
        && Command::new("qemu-io")
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    if !ok {
        if std::env::var("VIRIDIAN_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!("qemu-img/qemu-io missing and VIRIDIAN_REQUIRE_ALL=1");
        }
        eprintln!("skipping: qemu-img/qemu-io not installed");
    }
    ok
}

/// Runs a command, panicking with its output on failure; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let o = qemu_output(Command::new(cmd).args(args));
    if !o.status.success() {
        panic!(
            "{cmd} {args:?} failed ({}):\n{}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a QEMU tool and returns its output. A run refused for a lock is tried again for a
/// moment: a file this test process just closed may still be open in a child that another
/// test thread is starting (between its fork and exec it holds copies of every descriptor,
/// and with them their locks).
pub fn qemu_output(cmd: &mut Command) -> std::process::Output {
    let mut out = cmd.output().expect("spawn");
    for _ in 0..50 {
        if out.status.success() || !String::from_utf8_lossy(&out.stderr).contains("lock") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        out = cmd.output().expect("spawn");
    }
    out
}

/// `qemu-img check` exit status and output.
pub fn qemu_check(path: &Path) -> (i32, String) {
    let o = qemu_output(
        Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(path),
    );
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Deterministic pattern for a 4 KiB-ish chunk.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = disk::fault::SplitMix(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&r.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}

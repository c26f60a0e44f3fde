#![allow(dead_code)]
//! Shared helpers for the vhd integration tests.

use std::path::PathBuf;
use std::process::Command;

/// /work/shared/testdata (workspace root/../shared/testdata).
pub fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata")
}

fn require_all() -> bool {
    std::env::var("VIRIDIAN_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Returns false (and prints why) when a prerequisite is missing; panics instead under
/// VIRIDIAN_REQUIRE_ALL=1.
pub fn available(what: &str, ok: bool) -> bool {
    if !ok {
        if require_all() {
            panic!("{what} is missing and VIRIDIAN_REQUIRE_ALL=1");
        }
        eprintln!("SKIP: {what} not available");
    }
    ok
}

pub fn dfvfs(name: &str) -> Option<PathBuf> {
    let p = testdata().join("dfvfs").join(name);
    available(&p.display().to_string(), p.exists()).then_some(p)
}

pub fn have_tool(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    available(tool, ok)
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

/// Runs a command, panicking with its output on failure; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = qemu_output(cmd);
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic pattern bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2654435761)
                .wrapping_add(seed as u32)
                .to_le_bytes()[1]
                ^ seed
        })
        .collect()
}

//! Helpers for driving the built `viridian` binary and the peer tools in tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn viridian(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(args)
        .output()
        .expect("run viridian")
}

/// Runs viridian and insists on exit code 0.
pub fn ok(args: &[&str]) -> String {
    let o = viridian(args);
    assert!(
        o.status.success(),
        "viridian {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn code(args: &[&str]) -> i32 {
    viridian(args).status.code().unwrap_or(-1)
}

pub fn require_all() -> bool {
    std::env::var("VIRIDIAN_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Whether `tool` is on PATH; when it is not, the test is skipped with a message, or fails
/// under VIRIDIAN_REQUIRE_ALL=1.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if require_all() {
            panic!("{tool} is required (VIRIDIAN_REQUIRE_ALL=1) but not installed");
        }
        eprintln!("SKIP: {tool} not installed");
    }
    found
}

pub fn tool(prog: &str, args: &[&str]) -> Output {
    Command::new(prog).args(args).output().expect("run tool")
}

pub fn tool_ok(prog: &str, args: &[&str]) -> String {
    let o = tool(prog, args);
    assert!(
        o.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// A raw file of `size` bytes with pseudo-random data in some 1 MiB pieces and holes elsewhere.
pub fn patterned_raw(path: &Path, size: u64, seed: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x = seed | 1;
    let mut pos = 0;
    while pos < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(3) {
            let n = (1u64 << 20).min(size - pos);
            let mut buf = vec![0u8; n as usize];
            let mut y = x;
            for b in buf.iter_mut() {
                y = y
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = (y >> 56) as u8;
            }
            // Leave a zero hole inside some data pieces so zero detection is exercised.
            if x.is_multiple_of(2) && n >= 65536 {
                buf[4096..65536].fill(0);
            }
            f.seek(SeekFrom::Start(pos)).unwrap();
            f.write_all(&buf).unwrap();
        }
        pos += 1 << 20;
    }
    f.sync_all().unwrap();
}

pub fn read_all(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn join(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

//! Helpers shared by the VMM's end-to-end tests: skipping rules, tool checks and the guest
//! kernel.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub fn require_all() -> bool {
    std::env::var("VIRIDIAN_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Skips (returns None) or fails, depending on VIRIDIAN_REQUIRE_ALL.
pub fn skip(why: &str) -> Option<()> {
    if require_all() {
        panic!("required test cannot run: {why}");
    }
    eprintln!("skipped: {why}");
    None
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// /dev/kvm and the listed host tools, or a skip (None).
pub fn prerequisites(tools: &[&str]) -> Option<()> {
    if !Path::new("/dev/kvm").exists() {
        return skip("/dev/kvm is absent");
    }
    for tool in tools {
        if !have(tool) {
            return skip(&format!("{tool} is not installed"));
        }
    }
    Some(())
}

/// The test guest's uncompressed ELF kernel: `VIRIDIAN_GUEST_KERNEL`, or built (or reused
/// from the cache) by `vmm/guest/build.sh`.
pub fn guest_kernel() -> Result<PathBuf, String> {
    if let Some(k) = std::env::var_os("VIRIDIAN_GUEST_KERNEL") {
        return Ok(PathBuf::from(k));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()
        .unwrap_or("")
        .to_string();
    eprintln!(
        "guest kernel {path} ready in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(PathBuf::from(path))
}

/// The guest kernel, or a skip (None) when it cannot be had.
pub fn kernel_or_skip() -> Option<PathBuf> {
    match guest_kernel() {
        Ok(k) => Some(k),
        Err(e) => {
            skip(&format!("cannot build the guest kernel: {e}"));
            None
        }
    }
}

/// Deterministic pseudo-random bytes (SplitMix64).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

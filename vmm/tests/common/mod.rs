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

/// A static x86-64 ELF executable (ET_EXEC) with one read+execute PT_LOAD segment: `code`,
/// stored at file offset 0x1000, loaded at `load_addr` (page aligned) and entered there. Serves
/// as a tiny guest "kernel" (load at 1 MiB) or as a user-space `/init` (0x400000).
pub fn elf_executable(load_addr: u64, code: &[u8]) -> Vec<u8> {
    const CODE_OFFSET: u64 = 0x1000;
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\x00"); // 64-bit, little-endian, version 1
    e.extend_from_slice(&[0; 8]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&load_addr.to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // program headers right after this header
    e.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
                                              // header size, phdr size, phdr count, shdr size, shdr count, shstrndx
    for v in [64u16, 56, 1, 0, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    let len = code.len() as u64;
    // offset, vaddr, paddr, file size, memory size, alignment
    for v in [CODE_OFFSET, load_addr, load_addr, len, len, 0x1000] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.resize(CODE_OFFSET as usize, 0);
    e.extend_from_slice(code);
    e
}

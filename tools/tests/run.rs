//! `viridian run` end to end: boot the test guest with a VHDX root disk in undo mode.
//! Discard leaves the image byte-identical; commit brings the guest's writes (the ext4 mount
//! count) into the image. Skips without /dev/kvm (fails under VIRIDIAN_REQUIRE_ALL=1).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Whether /dev/kvm is there; without it the test is skipped, or fails under
/// VIRIDIAN_REQUIRE_ALL=1.
fn kvm_or_skip() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if require_all() {
        panic!("/dev/kvm is required (VIRIDIAN_REQUIRE_ALL=1)");
    }
    eprintln!("SKIP: /dev/kvm absent");
    false
}

/// Whether sfdisk and mkfs.ext4 (for the test disk) are there, with the same skip rule.
fn disk_tools_or_skip() -> bool {
    if have("sfdisk") && have("mkfs.ext4") {
        return true;
    }
    if require_all() {
        panic!("sfdisk and mkfs.ext4 are required (VIRIDIAN_REQUIRE_ALL=1)");
    }
    eprintln!("SKIP: sfdisk or mkfs.ext4 missing");
    false
}

fn guest_kernel() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("VIRIDIAN_GUEST_KERNEL") {
        return Some(PathBuf::from(k));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmm/guest/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
    if !out.status.success() {
        if require_all() {
            panic!("guest kernel build failed");
        }
        eprintln!("SKIP: guest kernel build failed");
        return None;
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()?
        .to_string();
    Some(PathBuf::from(path))
}

/// A static x86-64 ELF that calls exit(0): our nested hosts cannot run guest system calls, so
/// the kernel then says "Attempted to kill init", which ends the run.
fn init_elf() -> Vec<u8> {
    let code = [0xb8u8, 60, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05, 0xeb, 0xfe];
    let base: u64 = 0x40_0000;
    let total = 64 + 56 + code.len() as u64;
    let mut e = b"\x7fELF\x02\x01\x01\x00".to_vec();
    e.extend_from_slice(&[0; 8]);
    e.extend_from_slice(&2u16.to_le_bytes());
    e.extend_from_slice(&0x3eu16.to_le_bytes());
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(base + 120).to_le_bytes());
    e.extend_from_slice(&64u64.to_le_bytes());
    e.extend_from_slice(&0u64.to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 0, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&5u32.to_le_bytes());
    for v in [0u64, base, base, total, total, 0x1000] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&code);
    e
}

const PART_START: u64 = 1 << 20;

/// A 64 MiB raw disk: GPT, one partition from 1 MiB, ext4 holding /sbin/init.
fn make_disk(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("sbin")).unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    std::fs::write(root.join("sbin/init"), init_elf()).unwrap();
    tool_ok("chmod", &["755", p(&root.join("sbin/init"))]);
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut sf = Command::new("sfdisk")
        .args(["-q", p(&disk)])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    sf.stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\nstart=2048, type=L\n")
        .unwrap();
    assert!(sf.wait().unwrap().success());
    let part = dir.join("part.img");
    std::fs::File::create(&part)
        .unwrap()
        .set_len((64 << 20) - PART_START - (1 << 20))
        .unwrap();
    tool_ok("mkfs.ext4", &["-q", "-F", "-d", p(&root), p(&part)]);
    // Copy the file system into the partition.
    let fs_bytes = std::fs::read(&part).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&fs_bytes, PART_START).unwrap();
    disk
}

/// ext4 mount count of the partition, read through our own stack.
fn mount_count(img: &Path, dir: &Path) -> u16 {
    let raw = dir.join("mc.raw");
    let _ = std::fs::remove_file(&raw);
    ok(&["convert", "-O", "raw", p(img), p(&raw)]);
    let b = std::fs::read(&raw).unwrap();
    let sb = (PART_START + 1024) as usize;
    assert_eq!(
        u16::from_le_bytes([b[sb + 0x38], b[sb + 0x39]]),
        0xef53,
        "ext4 magic"
    );
    u16::from_le_bytes([b[sb + 0x34], b[sb + 0x35]])
}

/// Boots `disk` in undo mode, ending with `end`: from flags, or (`vm_file`) from a VM
/// description in the TOML form `viridian migrate` writes.
fn boot(kernel: &Path, disk: &Path, end: &str, console: &Path, vm_file: Option<&Path>) {
    let common_args = [
        "--undo-end",
        end,
        "--stop-on",
        "Attempted to kill init",
        "--timeout",
        "900",
        "--console",
        p(console),
    ];
    let o = match vm_file {
        Some(f) => {
            let toml = format!(
                "name = \"e2e\"\nmemory_mib = 128\ncpus = 1\nkernel = {:?}\n\
                 cmdline = \"root=/dev/sda1 rw rootfstype=ext4\"\n\n\
                 [[disk]]\npath = {:?}\nundo = true\ncontroller = \"ide\"\nchannel = 0\nslot = 0\n",
                p(kernel),
                p(disk)
            );
            std::fs::write(f, toml).unwrap();
            let mut args = vec!["run", p(f)];
            args.extend_from_slice(&common_args);
            viridian(&args)
        }
        None => {
            let disk_arg = format!("{},undo", p(disk));
            let mut args = vec![
                "run",
                "--kernel",
                p(kernel),
                "--memory",
                "128M",
                "--disk",
                &disk_arg,
                "--cmdline",
                "root=/dev/sda1 rw rootfstype=ext4",
            ];
            args.extend_from_slice(&common_args);
            viridian(&args)
        }
    };
    let log = std::fs::read_to_string(console).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    assert!(
        o.status.success(),
        "viridian run failed: {}\nconsole tail:\n{}",
        String::from_utf8_lossy(&o.stderr),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    assert!(
        log.contains("Hyper-V"),
        "no Hyper-V detection in the console"
    );
    assert!(log.contains("sda"), "no sd disk in the console");
    assert!(log.contains("EXT4-fs (sda1): mounted"), "root not mounted");
}

#[test]
fn run_boots_vhdx_root_in_undo_mode_discard_and_commit() {
    if !kvm_or_skip() || !disk_tools_or_skip() {
        return;
    }
    let Some(kernel) = guest_kernel() else { return };
    let d = tmp();
    let raw = make_disk(d.path());
    let img = join(d.path(), "root.vhdx");
    ok(&["convert", "-O", "vhdx", p(&raw), p(&img)]);
    let count0 = mount_count(&img, d.path());
    let before = read_all(&img);
    let console = join(d.path(), "console.log");

    let vm_file = join(d.path(), "guest.toml");
    boot(&kernel, &img, "discard", &console, Some(&vm_file));
    assert!(read_all(&img) == before, "undo + discard changed the image");

    boot(&kernel, &img, "commit", &console, None);
    assert_eq!(
        mount_count(&img, d.path()),
        count0 + 1,
        "the guest's mount did not reach the image"
    );
    assert_eq!(code(&["check", p(&img)]), 0);
    if have("qemu-img") {
        tool_ok("qemu-img", &["check", "-f", "vhdx", p(&img)]);
    }
}

#[test]
fn run_probe_host_reports_what_kvm_can_run() {
    if !kvm_or_skip() {
        return;
    }
    let o = viridian(&["run", "--probe-host"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("guest user mode runs: yes"), "{out}");
    let nested = Path::new("/sys/module/kvm_pvm").exists();
    let want = if nested { "no" } else { "yes" };
    assert!(
        out.contains(&format!("guest system calls (syscall): {want}")),
        "{out}"
    );
}

/// Ctrl-C (SIGINT) while the guest boots: the VM stops within seconds, the run exits 130,
/// and the undo changes are discarded even with `--undo-end commit` (the guest did not end
/// cleanly), leaving the image byte-identical and no throwaway child behind.
#[test]
fn run_stops_on_sigint_and_discards_undo() {
    if !kvm_or_skip() || !disk_tools_or_skip() {
        return;
    }
    let Some(kernel) = guest_kernel() else { return };
    let d = tmp();
    let raw = make_disk(d.path());
    let img = join(d.path(), "root.vhdx");
    ok(&["convert", "-O", "vhdx", p(&raw), p(&img)]);
    std::fs::remove_file(&raw).unwrap();
    let before = read_all(&img);
    let files_before: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let console = join(d.path(), "console.log");
    let disk_arg = format!("{},undo", p(&img));
    let child = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(["run", "--kernel", p(&kernel), "--memory", "128M"])
        .args(["--disk", &disk_arg, "--undo-end", "commit"])
        .args(["--cmdline", "root=/dev/sda1 rw rootfstype=ext4"])
        .args(["--timeout", "600", "--console", p(&console)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("Hypervisor detected")
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "the guest never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let interrupted = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        interrupted.elapsed() < std::time::Duration::from_secs(20),
        "took {:?} to stop",
        interrupted.elapsed()
    );
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(stderr.contains("undo changes discarded"), "{stderr}");
    assert!(read_all(&img) == before, "the image changed");
    let files_after: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "console.log")
        .collect();
    assert_eq!(files_after, files_before, "something was left behind");
}

/// Console input through `viridian run --stdin`: once the guest kernel waits for its root
/// device, Ctrl-A b + `s` (serial BREAK, then SysRq s) makes it sync and Ctrl-A b + `b`
/// reboots it; with `--on-reboot restart` it boots again, and input typed then must reach the
/// new boot (the first boot's stdin reader must not swallow it): Ctrl-A b + `o` powers it off
/// through ACPI, which ends the run successfully.
#[test]
fn run_forwards_stdin_with_break_escape_to_sysrq_across_a_restart() {
    use std::io::Write;
    if !kvm_or_skip() {
        return;
    }
    let Some(kernel) = guest_kernel() else { return };
    let d = tmp();
    let console = join(d.path(), "console.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(["run", "--kernel", p(&kernel), "--memory", "64M", "--stdin"])
        .args(["--cmdline", "root=/dev/viridian-none rootwait"])
        .args(["--on-reboot", "restart"])
        .args(["--timeout", "600", "--console", p(&console)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let wait_for = |what: &str, times: usize| {
        let started = std::time::Instant::now();
        loop {
            let log = std::fs::read_to_string(&console).unwrap_or_default();
            if log.matches(what).count() >= times {
                return;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(300),
                "no {what:?} (x{times}) on the console:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    let mut stdin = child.stdin.take().unwrap();
    let mut type_keys = |keys: &[u8]| {
        stdin.write_all(keys).unwrap();
        stdin.flush().unwrap();
    };
    wait_for("Waiting for root device", 1);
    type_keys(b"\x01bs");
    wait_for("sysrq: Emergency Sync", 1);
    type_keys(b"\x01bb");
    wait_for("Waiting for root device", 2);
    type_keys(b"\x01bo");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(out.status.success(), "{stderr}\n{log}");
    assert!(stderr.contains("starting boot 2"), "{stderr}");
    assert!(stderr.contains("Poweroff"), "{stderr}");
    assert!(log.contains("sysrq: Resetting"), "{log}");
    assert!(log.contains("sysrq: Power Off"), "{log}");
}

/// `--on-reboot restart`: a guest that panics (no root device) reboots through the i8042 and
/// is booted again with the console appended to, until the overall `--timeout` ends the run.
#[test]
fn run_on_reboot_restart_boots_again() {
    if !kvm_or_skip() {
        return;
    }
    let Some(kernel) = guest_kernel() else { return };
    let d = tmp();
    let console = join(d.path(), "console.log");
    let o = viridian(&[
        "run",
        "--kernel",
        p(&kernel),
        "--memory",
        "64M",
        "--cmdline",
        "root=/dev/viridian-none",
        "--on-reboot",
        "restart",
        "--timeout",
        "75",
        "--console",
        p(&console),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(stderr.contains("starting boot 2"), "{stderr}");
    assert!(
        log.matches("Linux version").count() >= 2,
        "one boot only in the console:\n{log}"
    );
    assert!(log.contains("VFS: Unable to mount root fs"), "{log}");
    // The overall time limit ends it (a failure, reported as such).
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("time limit reached"), "{stderr}");
}

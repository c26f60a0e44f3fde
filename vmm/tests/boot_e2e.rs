//! End to end: build (or reuse) the test guest kernel, make a GPT + ext4 disk image on the
//! host, boot it with `root=/dev/sda1 rw`, check the boot milestones on the console, then
//! prove on the host that the guest wrote through our stack (ext4 mount count and last mount
//! time changed) and that `e2fsck -fn` is clean.
//!
//! Skips with a message when /dev/kvm (or the image tools) is missing, and fails instead when
//! VIRIDIAN_REQUIRE_ALL=1. VIRIDIAN_GUEST_KERNEL=PATH uses that kernel instead of building one.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const DISK_SIZE: u64 = 64 << 20;

fn require_all() -> bool {
    std::env::var("VIRIDIAN_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Skips (returns None) or fails, depending on VIRIDIAN_REQUIRE_ALL.
fn skip(why: &str) -> Option<()> {
    if require_all() {
        panic!("required test cannot run: {why}");
    }
    eprintln!("skipped: {why}");
    None
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

fn guest_kernel() -> Result<PathBuf, String> {
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

/// A static x86-64 ELF that calls exit(0). Guest user space cannot make system calls on our
/// nested hosts, so the kernel reports "Attempted to kill init"; elsewhere it exits, which
/// ends the same way.
fn init_elf() -> Vec<u8> {
    elf_with_code(&[0xb8, 60, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05, 0xeb, 0xfe])
}

/// A static ELF whose code is `code`.
fn elf_with_code(code: &[u8]) -> Vec<u8> {
    let base: u64 = 0x40_0000;
    let total = 64 + 56 + code.len() as u64;
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    e.extend_from_slice(&[0; 8]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(base + 120).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [64u16, 56, 1, 0, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [0u64, base, base, total, total, 0x1000] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(code);
    e
}

/// Creates `disk` with a GPT holding one Linux partition with an ext4 file system; returns
/// the partition's (start, length) in bytes.
fn make_disk(dir: &Path, disk: &Path) -> (u64, u64) {
    make_disk_with(dir, disk, DISK_SIZE, &init_elf(), &[])
}

fn make_disk_with(
    dir: &Path,
    disk: &Path,
    disk_size: u64,
    init: &[u8],
    mkfs_args: &[&str],
) -> (u64, u64) {
    let root = dir.join("root");
    fs::create_dir_all(root.join("sbin")).unwrap();
    fs::create_dir_all(root.join("dev")).unwrap();
    fs::create_dir_all(root.join("proc")).unwrap();
    for p in ["init", "sbin/init"] {
        fs::write(root.join(p), init).unwrap();
        Command::new("chmod")
            .arg("755")
            .arg(root.join(p))
            .status()
            .unwrap();
    }
    fs::write(root.join("hello.txt"), b"written on the host\n").unwrap();
    File::create(disk).unwrap().set_len(disk_size).unwrap();
    let mut sf = Command::new("sfdisk")
        .arg("-q")
        .arg(disk)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    sf.stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\nstart=2048, type=L\n")
        .unwrap();
    assert!(sf.wait().unwrap().success(), "sfdisk failed");
    let dump = Command::new("sfdisk").arg("-d").arg(disk).output().unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout).to_string();
    let line = dump
        .lines()
        .find(|l| l.contains("start="))
        .expect("partition line");
    let field = |name: &str| -> u64 {
        let i = line.find(name).unwrap() + name.len();
        line[i..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (start, size) = (field("start=") * 512, field("size=") * 512);
    let part = dir.join("part.img");
    File::create(&part).unwrap().set_len(size).unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "viridian"])
        .args(mkfs_args)
        .arg("-d")
        .arg(&root)
        .arg(&part)
        .status()
        .unwrap();
    assert!(st.success(), "mkfs.ext4 failed");
    copy_range(&part, 0, disk, start, size);
    fs::remove_file(&part).unwrap();
    (start, size)
}

fn copy_range(from: &Path, from_off: u64, to: &Path, to_off: u64, len: u64) {
    let mut src = File::open(from).unwrap();
    let mut dst = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(to)
        .unwrap();
    src.seek(SeekFrom::Start(from_off)).unwrap();
    dst.seek(SeekFrom::Start(to_off)).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        src.read_exact(&mut buf[..n]).unwrap();
        dst.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
}

/// (s_mnt_count, s_mtime) of the ext4 superblock at `part_start`.
fn mount_info(disk: &Path, part_start: u64) -> (u16, u32) {
    let mut f = File::open(disk).unwrap();
    let mut sb = [0u8; 1024];
    f.seek(SeekFrom::Start(part_start + 1024)).unwrap();
    f.read_exact(&mut sb).unwrap();
    assert_eq!(
        u16::from_le_bytes([sb[0x38], sb[0x39]]),
        0xef53,
        "ext4 magic"
    );
    (
        u16::from_le_bytes([sb[0x34], sb[0x35]]),
        u32::from_le_bytes(sb[0x2c..0x30].try_into().unwrap()),
    )
}

/// In the default run: about 40-60 s with the kernel cached (passed 3 of 3 runs in a row with
/// the current fragment, and 4 of 4 with the earlier one); the first run on a machine builds
/// the kernel (11-20 minutes on 2 cores).
#[test]
fn boots_linux_to_ext4_root_on_storvsc() {
    let started = Instant::now();
    if !Path::new("/dev/kvm").exists() {
        skip("/dev/kvm is absent");
        return;
    }
    for tool in ["sfdisk", "mkfs.ext4", "e2fsck"] {
        if !have(tool) {
            skip(&format!("{tool} is not installed"));
            return;
        }
    }
    let kernel = match guest_kernel() {
        Ok(k) => k,
        Err(e) => {
            skip(&format!("cannot build the guest kernel: {e}"));
            return;
        }
    };
    let build_time = started.elapsed();
    let dir = tempfile::tempdir().unwrap();
    let disk_path = dir.path().join("disk.raw");
    let (part_start, part_len) = make_disk(dir.path(), &disk_path);
    let before = mount_info(&disk_path, part_start);

    let disk = disk::RawDisk::open(&disk_path, disk::Access::ReadWrite).unwrap();
    let console = dir.path().join("console.log");
    let mut cfg = vmm::VmConfig::new(&kernel);
    cfg.cmdline = vmm::default_cmdline("root=/dev/sda1 rw rootfstype=ext4");
    cfg.memory = 128 << 20;
    cfg.cpus = 1;
    cfg.disks.push(Arc::new(disk));
    cfg.console = vmm::Console::File(console.clone());
    cfg.timeout = Some(Duration::from_secs(900));
    cfg.stall_timeout = Some(Duration::from_secs(300));
    cfg.stop_on.push("Attempted to kill init".into());
    let status = match vmm::run(cfg) {
        Ok(s) => s,
        Err(vmm::VmmError::KvmUnavailable(why)) => {
            skip(&why);
            return;
        }
        Err(e) => panic!("VM failed:\n{e}"),
    };
    let tail = status.console_tail.join("\n");
    let line_of = |name: &str| -> String {
        status
            .milestones
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.line.clone())
            .unwrap_or_else(|| panic!("milestone {name} missing; console tail:\n{tail}"))
    };
    line_of("hyperv-detected");
    let vmbus = line_of("vmbus-connected");
    assert!(vmbus.contains("Vmbus version:"), "{vmbus}");
    line_of("storvsc-host");
    let sd = line_of("disk-attached");
    let sectors = DISK_SIZE / 512;
    assert!(
        sd.contains(&format!("[sda] {sectors} 512-byte logical blocks")),
        "wrong capacity: {sd}"
    );
    line_of("ext4-mounted");
    let root = line_of("root-mounted");
    assert!(!root.contains("readonly"), "root mounted read-only: {root}");
    line_of("init-started");
    assert_eq!(
        status.reason,
        vmm::ExitReason::Marker("Attempted to kill init".into()),
        "console tail:\n{tail}"
    );

    // The guest's ext4 mount went through storvsc to our file.
    let after = mount_info(&disk_path, part_start);
    assert_eq!(
        after.0,
        before.0 + 1,
        "mount count did not change: {before:?} -> {after:?}"
    );
    assert_ne!(after.1, before.1, "last mount time did not change");
    let part = dir.path().join("check.img");
    copy_range(&disk_path, part_start, &part, 0, part_len);
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&part)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn found problems:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );

    // Numbers for the record.
    let d = status.disk_stats[0];
    let attached = status.milestone("storvsc-host").unwrap_or_default();
    let io_window = status
        .elapsed
        .saturating_sub(attached)
        .as_secs_f64()
        .max(0.001);
    let moved = d.read_bytes + d.write_bytes;
    let dd_started = Instant::now();
    let mut f = File::open(&disk_path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).unwrap() > 0 {}
    let dd_rate = DISK_SIZE as f64 / dd_started.elapsed().as_secs_f64().max(1e-6);
    eprintln!(
        "e2e: kernel ready {:.0}s; boot-to-mount {:.1}s, to init {:.1}s, run {:.1}s; storvsc moved \
         {} bytes in {} reads + {} writes ({:.1} KB/s over {:.1}s since the host attached); host read of \
         the image {:.0} MB/s; {:?}",
        build_time.as_secs_f64(),
        status.milestone("ext4-mounted").unwrap_or_default().as_secs_f64(),
        status.milestone("init-started").unwrap_or_default().as_secs_f64(),
        status.elapsed.as_secs_f64(),
        moved,
        d.reads,
        d.writes,
        moved as f64 / 1000.0 / io_window,
        io_window,
        dd_rate / 1e6,
        status.hv_stats,
    );
}

/// Throughput of storvsc under a kernel-only write workload: ext4's lazy inode-table
/// initialisation (mkfs with nodiscard + lazy_itable_init=1, so no group is marked zeroed;
/// mounted with init_itable=0) zeroes the inode
/// tables of a 512 MiB file system from a kernel thread while /init spins in user mode. The
/// run ends when the console and the disk have been quiet for 200 s. Prints guest-side bytes
/// per second beside a host `dd` of the same image.
#[test]
#[ignore = "benchmark: several minutes; run with --ignored --nocapture"]
fn storvsc_lazyinit_throughput() {
    if !Path::new("/dev/kvm").exists() {
        skip("/dev/kvm is absent");
        return;
    }
    for tool in ["sfdisk", "mkfs.ext4", "dd"] {
        if !have(tool) {
            skip(&format!("{tool} is not installed"));
            return;
        }
    }
    let kernel = match guest_kernel() {
        Ok(k) => k,
        Err(e) => {
            skip(&format!("cannot build the guest kernel: {e}"));
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let disk_path = dir.path().join("disk.raw");
    let size = 512u64 << 20;
    // /init: jmp . (no system calls, so the kernel keeps running its threads).
    let spin = elf_with_code(&[0xeb, 0xfe]);
    make_disk_with(
        dir.path(),
        &disk_path,
        size,
        &spin,
        &["-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"],
    );
    let disk = disk::RawDisk::open(&disk_path, disk::Access::ReadWrite).unwrap();
    let mut cfg = vmm::VmConfig::new(&kernel);
    cfg.cmdline = vmm::default_cmdline("root=/dev/sda1 rw rootfstype=ext4 rootflags=init_itable=0");
    cfg.memory = 128 << 20;
    cfg.disks.push(Arc::new(disk));
    cfg.console = vmm::Console::File(dir.path().join("console.log"));
    cfg.timeout = Some(Duration::from_secs(1200));
    cfg.stall_timeout = Some(Duration::from_secs(200));
    let (d, milestones) = match vmm::run(cfg) {
        Err(vmm::VmmError::Guest(r)) if r.reason == vmm::StopReason::Stalled => {
            (r.disk_stats[0], r.milestones)
        }
        Err(vmm::VmmError::Guest(r)) if r.reason == vmm::StopReason::Timeout => {
            (r.disk_stats[0], r.milestones)
        }
        Err(e) => panic!("VM failed:\n{e}"),
        Ok(s) => (s.disk_stats[0], s.milestones),
    };
    assert!(
        milestones.iter().any(|m| m.name == "init-started"),
        "{milestones:?}"
    );
    let rate = d.bytes_per_second().unwrap_or(0.0);
    let dd = |args: &[&str]| -> String {
        let out = Command::new("dd").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
            .to_string()
    };
    let img = format!("if={}", disk_path.display());
    let host_read = dd(&[&img, "of=/dev/null", "bs=1M"]);
    let host_read_direct = dd(&[&img, "of=/dev/null", "bs=1M", "iflag=direct"]);
    eprintln!(
        "storvsc lazyinit workload: {} bytes read in {} requests, {} bytes written in {} \
         requests, {} flushes, between {:?} and {:?}: {:.1} KB/s through storvsc",
        d.read_bytes,
        d.reads,
        d.write_bytes,
        d.writes,
        d.flushes,
        d.first_io,
        d.last_io,
        rate / 1000.0
    );
    eprintln!("host dd of the same image: {host_read}; with O_DIRECT: {host_read_direct}");
}

/// The same boot with the disk converted to a dynamic VHDX (`qemu-img convert -O vhdx`) and
/// opened through the `chain` crate; afterwards the image is converted back to raw for the
/// mount-count and `e2fsck` checks, and `qemu-img check` must accept the VHDX. In the default
/// run (passed 3 of 3 in a row, about 35-50 s).
#[test]
fn boots_linux_from_vhdx() {
    if !Path::new("/dev/kvm").exists() {
        skip("/dev/kvm is absent");
        return;
    }
    for tool in ["sfdisk", "mkfs.ext4", "e2fsck", "qemu-img"] {
        if !have(tool) {
            skip(&format!("{tool} is not installed"));
            return;
        }
    }
    let kernel = match guest_kernel() {
        Ok(k) => k,
        Err(e) => {
            skip(&format!("cannot build the guest kernel: {e}"));
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let (part_start, part_len) = make_disk(dir.path(), &raw);
    let before = mount_info(&raw, part_start);
    let vhdx = dir.path().join("disk.vhdx");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vhdx"])
        .arg(&raw)
        .arg(&vhdx)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert to vhdx failed");
    let disk = chain::open(&vhdx, &chain::OpenOptions::read_write()).unwrap();
    assert_eq!(disk.format(), "vhdx");
    let mut cfg = vmm::VmConfig::new(&kernel);
    cfg.cmdline = vmm::default_cmdline("root=/dev/sda1 rw rootfstype=ext4");
    cfg.memory = 128 << 20;
    cfg.disks.push(disk.clone());
    cfg.console = vmm::Console::File(dir.path().join("console.log"));
    cfg.timeout = Some(Duration::from_secs(900));
    cfg.stall_timeout = Some(Duration::from_secs(300));
    cfg.stop_on.push("Attempted to kill init".into());
    let status = vmm::run(cfg).unwrap_or_else(|e| panic!("VM failed:\n{e}"));
    disk.close().unwrap();
    drop(disk);
    let tail = status.console_tail.join("\n");
    for m in [
        "vmbus-connected",
        "storvsc-host",
        "disk-attached",
        "ext4-mounted",
        "init-started",
    ] {
        assert!(
            status.milestone(m).is_some(),
            "milestone {m} missing; console:\n{tail}"
        );
    }
    let check = Command::new("qemu-img")
        .arg("check")
        .arg(&vhdx)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let back = dir.path().join("back.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(&vhdx)
        .arg(&back)
        .status()
        .unwrap();
    assert!(st.success());
    let after = mount_info(&back, part_start);
    assert_eq!(after.0, before.0 + 1, "mount count {before:?} -> {after:?}");
    let part = dir.path().join("check.img");
    copy_range(&back, part_start, &part, 0, part_len);
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&part)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    eprintln!(
        "vhdx e2e: boot-to-mount {:.1}s, run {:.1}s, {:?}",
        status
            .milestone("ext4-mounted")
            .unwrap_or_default()
            .as_secs_f64(),
        status.elapsed.as_secs_f64(),
        status.disk_stats[0]
    );
}

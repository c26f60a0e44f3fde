//! End to end: build (or reuse) the test guest kernel, make a GPT + ext4 disk image on the
//! host, boot it with `root=/dev/sda1 rw`, check the boot milestones on the console, then
//! prove on the host that the guest wrote through our stack (ext4 mount count and last mount
//! time changed) and that `e2fsck -fn` is clean.
//!
//! Skips with a message when /dev/kvm (or the image tools) is missing, and fails instead when
//! VIRIDIAN_REQUIRE_ALL=1. VIRIDIAN_GUEST_KERNEL=PATH uses that kernel instead of building one.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{kernel_or_skip, prerequisites};

const DISK_SIZE: u64 = 64 << 20;

/// A static x86-64 ELF that calls exit(0). Guest user space cannot make system calls on our
/// nested hosts, so the kernel reports "Attempted to kill init"; elsewhere it exits, which
/// ends the same way.
fn init_elf() -> Vec<u8> {
    common::elf_executable(
        0x40_0000,
        &[0xb8, 60, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05, 0xeb, 0xfe],
    )
}

/// Creates `disk` with a GPT holding one Linux partition with an ext4 file system; returns
/// the partition's (start, length) in bytes.
fn make_disk(dir: &Path, disk: &Path) -> (u64, u64) {
    make_disk_with(dir, disk, DISK_SIZE, &init_elf(), &[], &[])
}

/// Like [`make_disk`] with a given `/init`, extra mkfs.ext4 arguments and extra executable
/// files (path in the root, contents).
fn make_disk_with(
    dir: &Path,
    disk: &Path,
    disk_size: u64,
    init: &[u8],
    mkfs_args: &[&str],
    extra: &[(&str, Vec<u8>)],
) -> (u64, u64) {
    let root = dir.join("root");
    for d in ["sbin", "bin", "dev", "proc", "sys", "tmp"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    let mut files: Vec<(&str, &[u8])> = vec![("init", init), ("sbin/init", init)];
    files.extend(extra.iter().map(|(p, d)| (*p, d.as_slice())));
    for (p, data) in files {
        fs::write(root.join(p), data).unwrap();
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

/// A newc cpio archive of regular files (path, contents), for initrds.
fn cpio_newc(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut entry = |ino: u32, name: &str, mode: u32, data: &[u8]| {
        let fields = [ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(format!("{:08x}{:08x}", name.len() + 1, 0).as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    for (i, (name, data)) in files.iter().enumerate() {
        entry(i as u32 + 1, name, 0o100644, data);
    }
    entry(0, "TRAILER!!!", 0, &[]);
    out
}

/// The console line of milestone `name`, or a panic with the console tail.
fn milestone_line(status: &vmm::ExitStatus, name: &str) -> String {
    status
        .milestones
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.line.clone())
        .unwrap_or_else(|| {
            panic!(
                "milestone {name} missing; console tail:\n{}",
                status.console_tail.join("\n")
            )
        })
}

/// The acceptance milestones: Hyper-V detected, VMBus version negotiated, the storvsc host
/// and `sd` disk attached with `sectors` 512-byte sectors, the ext4 root mounted read-write,
/// and /init started from it.
fn require_boot_milestones(status: &vmm::ExitStatus, log: &str, sectors: u64) {
    milestone_line(status, "hyperv-detected");
    let vmbus = milestone_line(status, "vmbus-connected");
    assert!(vmbus.contains("Vmbus version:"), "{vmbus}");
    milestone_line(status, "storvsc-host");
    let sd = milestone_line(status, "disk-attached");
    let want = format!("[sda] {sectors} 512-byte logical blocks");
    assert!(
        log.contains(&want),
        "no \"{want}\" on the console; first disk: {sd}"
    );
    milestone_line(status, "ext4-mounted");
    let root = milestone_line(status, "root-mounted");
    assert!(!root.contains("readonly"), "root mounted read-only: {root}");
    milestone_line(status, "init-started");
}

fn fsck_clean(disk: &Path, part_start: u64, part_len: u64, dir: &Path) {
    let part = dir.join("check.img");
    copy_range(disk, part_start, &part, 0, part_len);
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
    fs::remove_file(&part).unwrap();
}

/// Boots the LZ4 bzImage (not the ELF) with an initrd: the kernel unpacks the initrd (it has
/// no /init, so the boot goes on to `root=`), mounts the ext4 root from a raw disk, runs
/// /init, whose first system call kills it here (elsewhere it exits: the same end), panics,
/// and with `panic=-1 reboot=k` resets through the i8042, which ends the VM as a reboot.
/// The host then checks the mount count, the last mount time and `e2fsck -fn`. About 40-60 s
/// with the kernel cached; the first run on a machine builds it (5-20 minutes).
#[test]
fn boots_bzimage_with_initrd_to_ext4_root_then_reboots() {
    let started = Instant::now();
    if prerequisites(&["sfdisk", "mkfs.ext4", "e2fsck"]).is_none() {
        return;
    }
    let Some(vmlinux) = kernel_or_skip() else {
        return;
    };
    let bzimage = vmlinux.with_file_name("bzImage");
    assert!(bzimage.exists(), "{} missing", bzimage.display());
    let build_time = started.elapsed();
    let dir = tempfile::tempdir().unwrap();
    let disk_path = dir.path().join("disk.raw");
    let (part_start, part_len) = make_disk(dir.path(), &disk_path);
    let before = mount_info(&disk_path, part_start);
    let initrd = dir.path().join("initrd.cpio");
    // 100 KiB as the kernel counts it once padded to pages ("Freeing initrd memory: 100K").
    let note = vec![b'v'; 100 * 1024 - 512];
    fs::write(&initrd, cpio_newc(&[("viridian-initrd.txt", &note)])).unwrap();

    let disk = disk::RawDisk::open(&disk_path, disk::Access::ReadWrite).unwrap();
    let mut cfg = vmm::VmConfig::new(&bzimage);
    cfg.initrd = Some(initrd);
    cfg.cmdline = vmm::default_cmdline("root=/dev/sda1 rw rootfstype=ext4");
    cfg.memory = 128 << 20;
    cfg.disks.push(Arc::new(disk).into());
    cfg.console = vmm::Console::File(dir.path().join("console.log"));
    cfg.timeout = Some(Duration::from_secs(900));
    cfg.stall_timeout = Some(Duration::from_secs(300));
    let status = match vmm::run(cfg) {
        Ok(s) => s,
        Err(vmm::VmmError::KvmUnavailable(why)) => {
            common::skip(&why);
            return;
        }
        Err(e) => panic!("VM failed:\n{e}"),
    };
    let tail = status.console_tail.join("\n");
    let log = fs::read_to_string(dir.path().join("console.log")).unwrap();
    require_boot_milestones(&status, &log, DISK_SIZE / 512);
    milestone_line(&status, "kernel-panic");
    assert_eq!(
        status.reason,
        vmm::ExitReason::Reboot,
        "console tail:\n{tail}"
    );
    assert!(
        log.contains("Unpacking initramfs...") && log.contains("Freeing initrd memory: 100K"),
        "the kernel did not unpack the 100 KiB initrd:\n{tail}"
    );
    assert!(
        !log.contains("Initramfs unpacking failed"),
        "initrd rejected:\n{log}"
    );

    // The guest's ext4 mount went through storvsc to our file.
    let after = mount_info(&disk_path, part_start);
    assert_eq!(
        after.0,
        before.0 + 1,
        "mount count did not change: {before:?} -> {after:?}"
    );
    assert_ne!(after.1, before.1, "last mount time did not change");
    fsck_clean(&disk_path, part_start, part_len, dir.path());

    // Numbers for the record.
    let d = status.disk_stats[0];
    let dd_started = Instant::now();
    let mut f = File::open(&disk_path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).unwrap() > 0 {}
    let dd_rate = DISK_SIZE as f64 / dd_started.elapsed().as_secs_f64().max(1e-6);
    eprintln!(
        "bzImage e2e: kernel ready {:.0}s; boot-to-mount {:.1}s, to init {:.1}s, run {:.1}s; \
         storvsc moved {} bytes in {} reads + {} writes; host read of the image {:.0} MB/s; {:?}",
        build_time.as_secs_f64(),
        status
            .milestone("ext4-mounted")
            .unwrap_or_default()
            .as_secs_f64(),
        status
            .milestone("init-started")
            .unwrap_or_default()
            .as_secs_f64(),
        status.elapsed.as_secs_f64(),
        d.read_bytes + d.write_bytes,
        d.reads,
        d.writes,
        dd_rate / 1e6,
        status.hv_stats,
    );
}

/// `/init` for the acceptance boot: a busybox script. Where the host runs guest user space it
/// writes 8 MiB of random data to LUN 1 with O_DIRECT, syncs, reads it back with O_DIRECT,
/// prints the MD5 and powers off; on our nested hosts busybox dies at its first system call.
const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sys /sys
echo "VIRIDIAN-GUEST: user space runs"
$bb dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null
$bb dd if=/tmp/pattern of=/dev/sdb bs=1M oflag=direct 2>/dev/null || echo "VIRIDIAN-GUEST: dd write FAILED"
$bb sync
$bb dd if=/dev/sdb of=/tmp/back bs=1M count=8 iflag=direct 2>/dev/null || echo "VIRIDIAN-GUEST: dd read FAILED"
if $bb cmp /tmp/pattern /tmp/back; then
    echo "VIRIDIAN-GUEST: dd-direct ok md5=$($bb md5sum < /tmp/pattern | $bb cut -d' ' -f1)"
else
    echo "VIRIDIAN-GUEST: dd-direct FAILED (read back differs)"
fi
$bb rm -f /tmp/pattern /tmp/back
$bb sync
$bb poweroff -f
"#;

/// Debian's static busybox (package busybox-static), when installed: /bin/busybox as an
/// x86-64 ELF without a PT_INTERP program header.
fn static_busybox() -> Option<Vec<u8>> {
    let b = fs::read("/bin/busybox").ok()?;
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return None;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    let interp = (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        b.get(at..at + 4) == Some(&3u32.to_le_bytes()[..])
    });
    (!interp).then_some(b)
}

/// The acceptance test: a dynamic VHDX (made by `qemu-img convert -O vhdx`) with a GPT and an
/// ext4 root made on the host, opened through the `chain` crate; a second LUN (raw, 16 MiB)
/// for the user-space script. The boot must show every milestone; afterwards `qemu-img
/// check` accepts the VHDX and the image converted back to raw shows the new mount count and
/// a clean `e2fsck -fn`.
///
/// Guest user space: `vmm::probe_guest_user_space` says whether this host's KVM can run it.
/// Where it can, the busybox /init must report its O_DIRECT round trip and the host must find
/// the same bytes on LUN 1; where it cannot (our nested hosts), the boot must end at init's
/// first system call, and LUN 1 must be untouched. About 35-50 s here.
#[test]
fn boots_linux_from_vhdx() {
    if prerequisites(&["sfdisk", "mkfs.ext4", "e2fsck", "qemu-img", "md5sum"]).is_none() {
        return;
    }
    let Some(busybox) = static_busybox() else {
        common::skip("a static /bin/busybox (Debian package busybox-static) is not installed");
        return;
    };
    let Some(kernel) = kernel_or_skip() else {
        return;
    };
    let probe = vmm::probe_guest_user_space().unwrap_or_else(|e| panic!("probe: {e}"));
    eprintln!("user-space probe: {probe:?}");
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let (part_start, part_len) = make_disk_with(
        dir.path(),
        &raw,
        DISK_SIZE,
        INIT_SCRIPT.as_bytes(),
        &[],
        &[("bin/busybox", busybox)],
    );
    let before = mount_info(&raw, part_start);
    let vhdx = dir.path().join("disk.vhdx");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vhdx"])
        .arg(&raw)
        .arg(&vhdx)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert to vhdx failed");
    let scratch_path = dir.path().join("scratch.raw");
    File::create(&scratch_path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let disk = chain::open(&vhdx, &chain::OpenOptions::read_write()).unwrap();
    assert_eq!(disk.format(), "vhdx");
    let scratch: Arc<dyn disk::BlockDevice> =
        Arc::new(disk::RawDisk::open(&scratch_path, disk::Access::ReadWrite).unwrap());
    let mut cfg = vmm::VmConfig::new(&kernel);
    cfg.cmdline = vmm::default_cmdline("root=/dev/sda1 rw rootfstype=ext4");
    cfg.memory = 128 << 20;
    cfg.disks = vec![disk.clone(), scratch.clone().into()];
    cfg.console = vmm::Console::File(dir.path().join("console.log"));
    cfg.timeout = Some(Duration::from_secs(900));
    cfg.stall_timeout = Some(Duration::from_secs(300));
    let status = vmm::run(cfg).unwrap_or_else(|e| panic!("VM failed:\n{e}"));
    disk.close().unwrap();
    drop(disk);
    let tail = status.console_tail.join("\n");
    let log = fs::read_to_string(dir.path().join("console.log")).unwrap();
    require_boot_milestones(&status, &log, DISK_SIZE / 512);
    let ran_user_space = log.contains("VIRIDIAN-GUEST: user space runs");
    assert_eq!(
        ran_user_space, probe.syscall_works,
        "the Linux guest disagrees with the user-space probe ({probe:?}); console tail:\n{tail}"
    );
    let scratch_now = fs::read(&scratch_path).unwrap();
    if ran_user_space {
        let line = log
            .lines()
            .find(|l| l.contains("VIRIDIAN-GUEST: dd-direct"))
            .unwrap_or_else(|| panic!("the script reported nothing; console tail:\n{tail}"));
        assert!(line.contains("dd-direct ok md5="), "{line}");
        let md5 = line.rsplit("md5=").next().unwrap().trim();
        let mut f = File::create(dir.path().join("lun1.bin")).unwrap();
        f.write_all(&scratch_now[..8 << 20]).unwrap();
        let host = Command::new("md5sum")
            .arg(dir.path().join("lun1.bin"))
            .output()
            .unwrap();
        let host = String::from_utf8_lossy(&host.stdout);
        assert!(
            host.starts_with(md5),
            "LUN 1 on the host ({host}) is not what the guest wrote ({md5})"
        );
        assert_eq!(status.reason, vmm::ExitReason::Poweroff, "{tail}");
    } else {
        // Kernel-only host: init died at its first system call, the panic rebooted.
        assert!(log.contains("Attempted to kill init"), "{tail}");
        assert_eq!(status.reason, vmm::ExitReason::Reboot, "{tail}");
        assert!(
            scratch_now.iter().all(|&b| b == 0),
            "LUN 1 changed without user space"
        );
        eprintln!("host KVM runs no guest user space: busybox script not run ({probe:?})");
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
    assert_ne!(after.1, before.1, "last mount time did not change");
    fsck_clean(&back, part_start, part_len, dir.path());
    eprintln!(
        "vhdx e2e: boot-to-mount {:.1}s, to init {:.1}s, run {:.1}s, LUN 0 {:?}, LUN 1 {:?}",
        status
            .milestone("ext4-mounted")
            .unwrap_or_default()
            .as_secs_f64(),
        status
            .milestone("init-started")
            .unwrap_or_default()
            .as_secs_f64(),
        status.elapsed.as_secs_f64(),
        status.disk_stats[0],
        status.disk_stats[1]
    );
}

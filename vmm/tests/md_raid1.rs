//! Kernel-only write-heavy workload: an md RAID1 over two storvsc LUNs resyncs in a 2-vCPU
//! guest.
//!
//! LUN 0 is a dynamic VHDX holding 32 MiB of pseudo-random data, LUN 1 an empty dynamic VHD;
//! the host writes an md 0.90 superblock marked "not clean" to both, and the guest kernel
//! assembles them at boot (`md=0,/dev/sda,/dev/sdb`). md then copies the whole mirror from
//! LUN 0 to LUN 1 (reads one, writes the other) from a kernel thread, while the boot waits
//! for a root device that never comes (`rootwait`). When the console shows "resync done",
//! the test types Magic SysRq over the serial console (BREAK + `s` sync, BREAK + `o` power
//! off) and the guest powers off through ACPI S5. Afterwards the host reads both images back
//! through our stack: LUN 1's mirror half must equal LUN 0's data, md's own superblock
//! update must have landed, and `qemu-img check` must accept the VHDX.
//!
//! Prints the bytes per second through storvsc during the resync beside a host read of the
//! same VHDX file.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{kernel_or_skip, pattern, prerequisites};
use disk::BlockDevice;
use vmm::{ConsoleStep, SerialInput};

/// Mirror data size.
const DATA: u64 = 32 << 20;
/// Each member: the data plus room for md's reserved 64 KiB superblock area at the end.
const MEMBER: u64 = DATA + (2 << 20);

const MD_MAGIC: u32 = 0xa92b_4efc;
/// md 0.90 reserves the last 64 KiB-aligned 64 KiB of the device for the superblock.
const MD_RESERVED: u64 = 64 << 10;
const MD_SB_BYTES: usize = 4096;

/// Where md 0.90 looks for the superblock on a device of `size` bytes.
fn sb_offset(size: u64) -> u64 {
    (size & !(MD_RESERVED - 1)) - MD_RESERVED
}

/// An md 0.90 RAID1 superblock (Linux `mdp_superblock_s`, little-endian 32-bit words) for
/// member `this` of `disks`, `data_kib` KiB per member, state not clean (so the array resyncs
/// from the start when assembled).
fn md090_superblock(this: u32, disks: u32, data_kib: u32, uuid: [u32; 4], events: u32) -> Vec<u8> {
    let mut w = [0u32; MD_SB_BYTES / 4];
    // Constant generic section (words 0-31).
    w[0] = MD_MAGIC;
    w[1] = 0; // major version
    w[2] = 90; // minor version
    w[5] = uuid[0];
    w[6] = 1_700_000_000; // ctime
    w[7] = 1; // level: RAID1
    w[8] = data_kib; // size used on each member, KiB
    w[9] = disks; // nr_disks
    w[10] = disks; // raid_disks
    w[11] = 0; // md_minor: md0
    w[13] = uuid[1];
    w[14] = uuid[2];
    w[15] = uuid[3];
    // Generic state section (words 32-63).
    w[32] = 1_700_000_000; // utime
    w[33] = 0; // state: no MD_SB_CLEAN bit, so md resyncs
    w[34] = disks; // active
    w[35] = disks; // working
    w[39] = events; // events_lo (checkpoint events stay 0: resync from sector 0)
                    // Personality section (words 64-127): layout 0, chunk 0 for RAID1.
                    // Member descriptors (words 128 + 32*i) and this member's own copy (word 992):
                    // number, major, minor, raid_disk, state = ACTIVE | SYNC.
    let desc = |w: &mut [u32], at: usize, i: u32| {
        w[at] = i;
        w[at + 1] = 8; // sd major
        w[at + 2] = 16 * i; // sda, sdb, ...
        w[at + 3] = i;
        w[at + 4] = (1 << 1) | (1 << 2);
    };
    for i in 0..disks {
        desc(&mut w, 128 + 32 * i as usize, i);
    }
    desc(&mut w, 992, this);
    // Checksum: the 64-bit sum of all words with sb_csum = 0, high half folded into the low.
    let sum: u64 = w.iter().map(|&x| u64::from(x)).sum();
    w[38] = (sum & 0xffff_ffff).wrapping_add(sum >> 32) as u32;
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn word(sb: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(sb[i * 4..i * 4 + 4].try_into().unwrap())
}

/// Reads `len` bytes at `off` in 1 MiB pieces.
fn read_all(d: &dyn BlockDevice, off: u64, len: u64) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
        d.read_at(chunk, off + (i as u64) * (1 << 20)).unwrap();
    }
    out
}

#[test]
fn md_raid1_resync_over_two_luns_then_sysrq_poweroff() {
    if prerequisites(&["qemu-img"]).is_none() {
        return;
    }
    let Some(kernel) = kernel_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("mirror-a.vhdx");
    let dst_path = dir.path().join("mirror-b.vhd");
    let data = pattern(0x5eed_0001, DATA as usize);
    let uuid = [0x7669_7269, 0x6469_616e, 0x6d64_3031, 0x0000_0001];
    let data_kib = (DATA >> 10) as u32;
    let events = 5;
    {
        let a = chain::create(
            &src_path,
            &chain::CreateSpec::new(chain::Format::Vhdx, MEMBER),
        )
        .unwrap();
        let b = chain::create(
            &dst_path,
            &chain::CreateSpec::new(chain::Format::Vhd, MEMBER),
        )
        .unwrap();
        for (i, chunk) in data.chunks(1 << 20).enumerate() {
            a.write_at(chunk, i as u64 * (1 << 20)).unwrap();
        }
        for (i, d) in [&a, &b].into_iter().enumerate() {
            assert!(sb_offset(d.size()) >= DATA);
            d.write_at(
                &md090_superblock(i as u32, 2, data_kib, uuid, events),
                sb_offset(d.size()),
            )
            .unwrap();
            d.close().unwrap();
        }
    }

    let a = chain::open(&src_path, &chain::OpenOptions::read_write()).unwrap();
    let b = chain::open(&dst_path, &chain::OpenOptions::read_write()).unwrap();
    let mut cfg = vmm::VmConfig::new(&kernel);
    // No root file system: the boot assembles md0, then waits for a root that never comes
    // while md resyncs in the background.
    cfg.cmdline = vmm::default_cmdline(
        "md=0,/dev/sda,/dev/sdb raid=noautodetect root=/dev/viridian-none rootwait",
    );
    cfg.memory = 128 << 20;
    cfg.disks = vec![a.clone(), b.clone()];
    // Two vCPUs: the application processor starts through the real-mode trampoline and VMBus
    // channel interrupts may target either CPU.
    cfg.cpus = 2;
    let console = dir.path().join("console.log");
    cfg.console = vmm::Console::File(console.clone());
    cfg.timeout = Some(Duration::from_secs(900));
    cfg.stall_timeout = Some(Duration::from_secs(240));
    cfg.console_script = vec![ConsoleStep {
        after: Some("md: md0: resync done".into()),
        input: vec![
            SerialInput::Pause(Duration::from_millis(500)),
            SerialInput::Break,
            SerialInput::Text(b"s".to_vec()),
            SerialInput::Pause(Duration::from_secs(3)),
            SerialInput::Break,
            SerialInput::Text(b"o".to_vec()),
        ],
    }];
    let status = vmm::run(cfg).unwrap_or_else(|e| panic!("VM failed:\n{e}"));
    a.close().unwrap();
    b.close().unwrap();
    drop((a, b));
    let tail = status.console_tail.join("\n");
    for m in [
        "hyperv-detected",
        "vmbus-connected",
        "storvsc-host",
        "md-resync-started",
        "md-resync-done",
    ] {
        assert!(
            status.milestone(m).is_some(),
            "milestone {m} missing; console tail:\n{tail}"
        );
    }
    let log = std::fs::read_to_string(&console).unwrap();
    assert!(
        log.contains("smp: Brought up 1 node, 2 CPUs"),
        "the second vCPU did not come up; console tail:\n{tail}"
    );
    assert!(
        tail.contains("sysrq: Emergency Sync") || tail.contains("sysrq: Power Off"),
        "SysRq over the serial console did nothing; console tail:\n{tail}"
    );
    assert_eq!(
        status.reason,
        vmm::ExitReason::Poweroff,
        "console tail:\n{tail}"
    );

    // Both halves of the mirror now hold LUN 0's data, read back through our stack.
    let a = chain::open(&src_path, &chain::OpenOptions::read_only()).unwrap();
    let b = chain::open(&dst_path, &chain::OpenOptions::read_only()).unwrap();
    assert!(read_all(&a, 0, DATA) == data, "LUN 0's data changed");
    let mirrored = read_all(&b, 0, DATA);
    if let Some(i) = mirrored.iter().zip(&data).position(|(x, y)| x != y) {
        panic!("LUN 1 differs from LUN 0 at byte {i} after the resync");
    }
    // md wrote its superblocks back (event count up) through storvsc.
    for d in [&a, &b] {
        let sb = read_all(d, sb_offset(d.size()), MD_SB_BYTES as u64);
        assert_eq!(word(&sb, 0), MD_MAGIC);
        assert!(word(&sb, 39) > events, "md superblock not updated");
    }
    let check = Command::new("qemu-img")
        .arg("check")
        .arg(&src_path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let report = vhd_check(&dst_path);
    assert!(report.is_empty(), "VHD check: {report}");

    // Numbers for the record: storvsc traffic while md resynced, beside a host read.
    let (s0, s1) = (status.disk_stats[0], status.disk_stats[1]);
    let started = status.milestone("md-resync-started").unwrap();
    let done = status.milestone("md-resync-done").unwrap();
    let window = done.saturating_sub(started).as_secs_f64().max(1e-3);
    let moved = s0.read_bytes + s1.write_bytes;
    let t = Instant::now();
    let host = read_all(&a, 0, DATA);
    let host_rate = host.len() as f64 / t.elapsed().as_secs_f64().max(1e-6);
    let dd = Command::new("dd")
        .arg(format!("if={}", src_path.display()))
        .args(["of=/dev/null", "bs=1M"])
        .output()
        .unwrap();
    eprintln!(
        "md resync: LUN 0 read {} bytes in {} requests, LUN 1 wrote {} bytes in {} requests; \
         resync {:.1}s (from {:.1}s after start): {:.0} KB/s through storvsc; run {:.1}s; host \
         read of the VHDX through our stack {:.0} MB/s; host dd: {}",
        s0.read_bytes,
        s0.reads,
        s1.write_bytes,
        s1.writes,
        window,
        started.as_secs_f64(),
        moved as f64 / 1000.0 / window,
        status.elapsed.as_secs_f64(),
        host_rate / 1e6,
        String::from_utf8_lossy(&dd.stderr)
            .lines()
            .last()
            .unwrap_or(""),
    );
}

/// Our own consistency check of a VHD (qemu-img has none for VHD): "" when clean.
fn vhd_check(path: &std::path::Path) -> String {
    let storage = disk::FileStorage::open(path, disk::Access::ReadOnly, true).unwrap();
    let r = vhd::check(Arc::new(storage), disk::check::Repair::None).unwrap();
    if r.corruptions == 0 && r.leaks == 0 {
        String::new()
    } else {
        format!("{r:?}")
    }
}

//! A real file system that fills up: a 16 MiB tmpfs, and a 24 MiB ext4 on a loop device, hold
//! a sparse image (VHDX, dynamic VHD) and a filler file. 1 MiB writes go on until the file system refuses one (ENOSPC), the disk
//! is flushed (may fail), the filler is deleted, the disk is flushed again. After reopening:
//! every write acknowledged before a flush that returned Ok reads back, and when the last flush
//! returned Ok, every acknowledged write does (no block lost, no BAT entry dropped); the image
//! checks without corruption.
//!
//! Mounting needs root; without it the test is skipped with a message (it fails instead under
//! VIRIDIAN_REQUIRE_ALL=1).

use std::path::{Path, PathBuf};
use std::process::Command;

use disk::check::Repair;

const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug)]
enum Fs {
    Tmpfs,
    Ext4,
}

/// A small file system mounted on a temporary directory, unmounted on drop.
struct Mounted {
    dir: tempfile::TempDir,
    _backing: Option<tempfile::TempDir>,
}

fn skip(why: &str) -> Option<Mounted> {
    if std::env::var("VIRIDIAN_REQUIRE_ALL").as_deref() == Ok("1") {
        panic!("{why} (VIRIDIAN_REQUIRE_ALL=1 requires it)");
    }
    eprintln!("SKIP: {why}");
    None
}

impl Mounted {
    fn new(fs: Fs) -> Option<Mounted> {
        let dir = tempfile::tempdir().unwrap();
        let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
        match fs {
            Fs::Tmpfs => {
                if !ok(Command::new("mount")
                    .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
                    .arg(dir.path()))
                {
                    return skip("cannot mount a tmpfs (needs root)");
                }
                Some(Mounted {
                    dir,
                    _backing: None,
                })
            }
            Fs::Ext4 => {
                let backing = tempfile::tempdir().unwrap();
                let img = backing.path().join("fs.img");
                std::fs::File::create(&img)
                    .unwrap()
                    .set_len(24 * MIB)
                    .unwrap();
                if !ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img)) {
                    return skip("cannot make an ext4 file system (mkfs.ext4)");
                }
                if !ok(Command::new("mount")
                    .args(["-t", "ext4", "-o", "loop"])
                    .arg(&img)
                    .arg(dir.path()))
                {
                    return skip("cannot mount a loop ext4 (needs root and loop devices)");
                }
                Some(Mounted {
                    dir,
                    _backing: Some(backing),
                })
            }
        }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn pattern(i: u64) -> Vec<u8> {
    let mut r = disk::fault::SplitMix(i + 1);
    (0..MIB / 8)
        .flat_map(|_| r.next_u64().to_le_bytes())
        .collect()
}

/// Writes a file until the file system is full.
fn top_up(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = [0x33u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

struct Outcome {
    acked: Vec<u64>,
    /// Writes acknowledged before the last flush that returned Ok.
    durable: usize,
    final_flush_ok: bool,
    first_flush: String,
}

fn fill(img: &Path, filler: &Path, format: chain::Format) -> Outcome {
    let spec = chain::CreateSpec::new(format, 64 * MIB);
    let d = chain::create(img, &spec).unwrap();
    d.flush().unwrap();
    drop(d);
    let d = chain::open(img, &chain::OpenOptions::read_write()).unwrap();
    let mut acked = Vec::new();
    let mut durable = 0;
    let mut hit_enospc = false;
    for i in 0..64u64 {
        match d.write_at(&pattern(i), i * MIB) {
            Ok(()) => acked.push(i),
            Err(e) => {
                let kind = std::io::Error::from_raw_os_error(e.errno()).kind();
                assert_eq!(kind, std::io::ErrorKind::StorageFull, "write {i}: {e}");
                hit_enospc = true;
                break;
            }
        }
        // One early flush (its log entry takes the first pages of the log); none after, so the
        // flush on the full file system needs fresh log pages, as in the reported failure.
        if i == 1 && d.flush().is_ok() {
            durable = acked.len();
        }
    }
    assert!(hit_enospc, "{format:?}: the file system never filled up");
    // Someone else takes whatever space is left (a failed write may have given some back), so
    // the flush meets a full file system.
    top_up(&filler.with_extension("more"));
    let first = d.flush();
    if first.is_ok() {
        durable = acked.len();
    }
    std::fs::remove_file(filler).unwrap();
    std::fs::remove_file(filler.with_extension("more")).unwrap();
    let second = d.flush();
    if second.is_ok() {
        durable = acked.len();
    }
    // Close explicitly (an error here must not be hidden by Drop).
    let closed = d.close();
    drop(d);
    if second.is_ok() {
        closed.unwrap_or_else(|e| panic!("close after a successful flush failed: {e}"));
    }
    Outcome {
        acked,
        durable,
        final_flush_ok: second.is_ok(),
        first_flush: match first {
            Ok(()) => "ok".into(),
            Err(e) => e.to_string(),
        },
    }
}

fn verify(img: &Path, format: chain::Format, o: &Outcome) {
    let report = match format {
        chain::Format::Vhdx => vhdx::check(
            std::sync::Arc::new(
                disk::FileStorage::open(img, disk::Access::ReadWrite, true).unwrap(),
            ),
            Repair::None,
        ),
        _ => vhd::check(
            std::sync::Arc::new(
                disk::FileStorage::open(img, disk::Access::ReadOnly, true).unwrap(),
            ),
            Repair::None,
        ),
    }
    .unwrap();
    assert_eq!(report.corruptions, 0, "{format:?}: {:?}", report.findings);
    let d = chain::open(img, &chain::OpenOptions::read_only()).unwrap();
    let must = if o.final_flush_ok {
        o.acked.len()
    } else {
        o.durable
    };
    let mut buf = vec![0u8; MIB as usize];
    for &i in &o.acked[..must] {
        d.read_at(&mut buf, i * MIB).unwrap();
        assert!(
            buf == pattern(i),
            "{format:?}: acknowledged and flushed write {i} does not read back"
        );
    }
    println!(
        "{format:?}: {} writes acknowledged before ENOSPC, flush while full: {}, flush after \
         freeing space: {}, {must} verified after reopen, leaks {}",
        o.acked.len(),
        o.first_flush,
        if o.final_flush_ok { "ok" } else { "failed" },
        report.leaks
    );
}

fn run(fs_kind: Fs, format: chain::Format, name: &str) {
    let Some(fs) = Mounted::new(fs_kind) else {
        return;
    };
    let filler: PathBuf = fs.path().join("filler");
    std::fs::write(&filler, vec![0x5a; 4 * MIB as usize]).unwrap();
    // Take the rest of the space but 12 MiB, so the image fills up after about 10 writes.
    let avail = {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(fs.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    if avail > 12 * MIB {
        let f = fs.path().join("ballast");
        std::fs::write(&f, vec![0xa5; (avail - 12 * MIB) as usize]).unwrap();
    }
    let img = fs.path().join(name);
    let o = fill(&img, &filler, format);
    if matches!((fs_kind, format), (Fs::Tmpfs, chain::Format::Vhdx)) {
        // tmpfs allocates on write, so the log entry of the flush on the full file system
        // cannot be written: the case where pending BAT pages used to be dropped.
        assert!(o.first_flush != "ok", "the flush while full did not fail");
    }
    // Space came back, so the last flush must be able to make everything durable.
    assert!(
        o.final_flush_ok,
        "{format:?}: flush after freeing space failed"
    );
    verify(&img, format, &o);
}

/// One test, the cases in turn: a child process forked by a parallel test (mount, mkfs)
/// shares our open files until it execs, and with them their flock, which could make the
/// reopen of an image fail as "locked".
#[test]
fn a_full_file_system_keeps_every_flushed_write() {
    for fs in [Fs::Tmpfs, Fs::Ext4] {
        run(fs, chain::Format::Vhdx, "disk.vhdx");
        run(fs, chain::Format::Vhd, "disk.vhd");
    }
}

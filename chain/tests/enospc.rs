//! A real file system that fills up: a 16 MiB tmpfs holds a sparse image (VHDX, dynamic VHD)
//! and a filler file. 1 MiB writes go on until the file system refuses one (ENOSPC), the disk
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
use disk::BlockDevice;

const MIB: u64 = 1 << 20;

/// A tmpfs mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        if st.map(|s| s.success()).unwrap_or(false) {
            return Some(Tmpfs { dir });
        }
        if std::env::var("VIRIDIAN_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!("cannot mount a tmpfs (VIRIDIAN_REQUIRE_ALL=1 requires it)");
        }
        eprintln!("SKIP: cannot mount a tmpfs (needs root)");
        None
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
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
        // Every few writes a flush, as a guest would.
        if i % 4 == 3 && d.flush().is_ok() {
            durable = acked.len();
        }
    }
    assert!(hit_enospc, "{format:?}: the file system never filled up");
    let first = d.flush();
    if first.is_ok() {
        durable = acked.len();
    }
    std::fs::remove_file(filler).unwrap();
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

fn run(format: chain::Format, name: &str) {
    let Some(fs) = Tmpfs::mount("16m") else {
        return;
    };
    let filler: PathBuf = fs.path().join("filler");
    std::fs::write(&filler, vec![0x5a; 4 * MIB as usize]).unwrap();
    let img = fs.path().join(name);
    let o = fill(&img, &filler, format);
    // Space came back, so the last flush must be able to make everything durable.
    assert!(
        o.final_flush_ok,
        "{format:?}: flush after freeing space failed"
    );
    verify(&img, format, &o);
}

#[test]
fn vhdx_on_a_full_file_system_keeps_every_flushed_write() {
    run(chain::Format::Vhdx, "disk.vhdx");
}

#[test]
fn vhd_on_a_full_file_system_keeps_every_flushed_write() {
    run(chain::Format::Vhd, "disk.vhd");
}

//! The whole-disk file over a raw sparse image: bytes, errors, st_blocks, SEEK_DATA/SEEK_HOLE,
//! unmount paths.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use disk::{Access, BlockDevice, RawDisk};
use mount::{MountError, MountOptions};

const MIB: u64 = 1 << 20;

fn raw(path: &std::path::Path, access: Access) -> Arc<dyn BlockDevice> {
    Arc::new(RawDisk::open(path, access).unwrap())
}

#[test]
fn disk_file_matches_source_bytes() {
    if !prerequisites("disk_file_matches_source_bytes", &["cmp"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("src.raw");
    // 64 MiB + an odd tail, islands at unaligned offsets, one spanning a 1 MiB boundary.
    let size = 64 * MIB + 12_345;
    sparse_raw(
        &img,
        size,
        &[
            (0, 4096),
            (MIB - 100, 300),
            (5 * MIB + 7, 3 << 20),
            (size - 999, 999),
        ],
    );
    let m = Mounted::new(raw(&img, Access::ReadOnly), &MountOptions::default());
    let names: Vec<String> = std::fs::read_dir(m.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["disk"]);
    let file = m.path("disk");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), size);
    assert_same_bytes(&file, &img);

    // Concurrent unaligned reads from several threads, with and without O_DIRECT.
    let src = std::fs::read(&img).unwrap();
    let src = Arc::new(src);
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let file = file.clone();
            let src = src.clone();
            std::thread::spawn(move || {
                let direct = t % 2 == 0;
                let mut opts = std::fs::OpenOptions::new();
                opts.read(true);
                if direct {
                    opts.custom_flags(libc::O_DIRECT);
                }
                let f = opts.open(&file).unwrap();
                let mut x = t + 1;
                for _ in 0..200 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let (off, len) = if direct {
                        // O_DIRECT needs no alignment on FUSE with FOPEN_DIRECT_IO, but keep it
                        // realistic.
                        (((x >> 20) % (size / 4096)) * 4096, 64 * 1024)
                    } else {
                        ((x >> 17) % size, ((x >> 5) % (2 * MIB)) as usize + 1)
                    };
                    let len = len.min((size - off) as usize);
                    let mut buf = vec![0u8; len];
                    let mut done = 0;
                    while done < len {
                        let n = f.read_at(&mut buf[done..], off + done as u64).unwrap();
                        assert!(n > 0, "short read at {off}");
                        done += n;
                    }
                    assert!(
                        buf[..] == src[off as usize..off as usize + len],
                        "at {off}+{len}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    // Read-only: opening for writing fails with EROFS.
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
}

#[test]
fn st_blocks_and_seek_data_hole() {
    if !prerequisites("st_blocks_and_seek_data_hole", &[]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("sparse.raw");
    let size = 32 * MIB;
    sparse_raw(&img, size, &[(MIB, MIB as usize), (8 * MIB, 4096)]);
    let backing_blocks = std::fs::metadata(&img).unwrap().blocks();
    let m = Mounted::new(raw(&img, Access::ReadOnly), &MountOptions::default());
    let file = m.path("disk");
    let md = std::fs::metadata(&file).unwrap();
    assert_eq!(md.blocks(), (MIB + 4096) / 512);
    assert_eq!(md.blocks(), backing_blocks);

    let f = std::fs::File::open(&file).unwrap();
    let seek = |off: u64, whence: i32| -> Result<u64, i32> {
        // SAFETY: lseek on an fd we own; no memory is touched.
        let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        } else {
            Ok(r as u64)
        }
    };
    assert_eq!(seek(0, libc::SEEK_DATA), Ok(MIB));
    assert_eq!(seek(0, libc::SEEK_HOLE), Ok(0));
    assert_eq!(seek(MIB + 5, libc::SEEK_DATA), Ok(MIB + 5));
    assert_eq!(seek(MIB, libc::SEEK_HOLE), Ok(2 * MIB));
    assert_eq!(seek(2 * MIB, libc::SEEK_DATA), Ok(8 * MIB));
    assert_eq!(seek(8 * MIB, libc::SEEK_HOLE), Ok(8 * MIB + 4096));
    assert_eq!(seek(8 * MIB + 4096, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(seek(8 * MIB + 4096, libc::SEEK_HOLE), Ok(8 * MIB + 4096));
    assert_eq!(seek(size, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(seek(size, libc::SEEK_HOLE), Err(libc::ENXIO));

    // A sparse-aware copy reproduces the holes.
    if have_tool("cp") {
        let copy = tmp.path().join("copy.raw");
        run(
            "cp",
            &[
                "--sparse=always",
                file.to_str().unwrap(),
                copy.to_str().unwrap(),
            ],
        );
        assert_same_bytes(&copy, &img);
        assert!(std::fs::metadata(&copy).unwrap().blocks() <= backing_blocks + 8);
    }
}

#[test]
fn mountpoint_errors() {
    if !prerequisites("mountpoint_errors", &[]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d: Arc<dyn BlockDevice> = Arc::new(RawDisk::memory(MIB).unwrap());
    let opts = MountOptions::default();

    let missing = tmp.path().join("nope");
    let e = mount::mount(d.clone(), &missing, &opts).unwrap_err();
    assert!(matches!(e, MountError::MountpointMissing(_)), "{e}");
    assert!(e.to_string().contains("does not exist"));

    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let e = mount::mount(d.clone(), &file, &opts).unwrap_err();
    assert!(matches!(e, MountError::NotADirectory(_)), "{e}");

    let m = Mounted::new(d.clone(), &opts);
    let e = mount::mount(d.clone(), m.dir.path(), &opts).unwrap_err();
    assert!(matches!(e, MountError::AlreadyMounted(_)), "{e}");

    let ro: Arc<dyn BlockDevice> = {
        let img = tmp.path().join("ro.raw");
        sparse_raw(&img, MIB, &[]);
        raw(&img, Access::ReadOnly)
    };
    let dir = tempfile::tempdir().unwrap();
    let w = MountOptions {
        writable: true,
        ..Default::default()
    };
    let e = mount::mount(ro, dir.path(), &w).unwrap_err();
    assert!(matches!(e, MountError::DiskReadOnly), "{e}");

    let e = mount::unmount(dir.path()).unwrap_err();
    assert!(matches!(e, MountError::NotMounted(_)), "{e}");
}

#[test]
fn writes_flush_and_close_on_unmount() {
    if !prerequisites("writes_flush_and_close_on_unmount", &[]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("w.raw");
    sparse_raw(&img, 8 * MIB, &[]);
    let c = Counting::new(raw(&img, Access::ReadWrite));
    let opts = MountOptions {
        writable: true,
        ..Default::default()
    };
    let mut m = Mounted::new(c.clone(), &opts);
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.path("disk"))
            .unwrap();
        f.seek(SeekFrom::Start(3 * MIB + 1)).unwrap();
        f.write_all(&pattern(9, 100_000)).unwrap();
        f.sync_all().unwrap();
        assert!(c.flushes() >= 1, "fsync must flush the disk");
        // Writing past the end fails like a block device; resizing is refused.
        let e = f.write_at(b"x", 8 * MIB).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert!(f.set_len(MIB).is_err());
        let mut back = vec![0u8; 100_000];
        f.seek(SeekFrom::Start(3 * MIB + 1)).unwrap();
        f.read_exact(&mut back).unwrap();
        assert!(back == pattern(9, 100_000));
    }
    assert_eq!(c.closes(), 0);
    m.unmount().unwrap();
    assert_eq!(c.closes(), 1);
    let bytes = std::fs::read(&img).unwrap();
    assert!(bytes[(3 * MIB + 1) as usize..][..100_000] == pattern(9, 100_000)[..]);
}

#[test]
fn lazy_unmount_closes_when_last_file_closes() {
    if !prerequisites(
        "lazy_unmount_closes_when_last_file_closes",
        &["fusermount3"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("l.raw");
    sparse_raw(&img, 4 * MIB, &[]);
    let c = Counting::new(raw(&img, Access::ReadWrite));
    let opts = MountOptions {
        writable: true,
        ..Default::default()
    };
    let mut m = Mounted::new(c.clone(), &opts);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("disk"))
        .unwrap();
    f.write_all_at(b"lazy", 4096).unwrap();
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(m.dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    let h = m.handle.take().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(!h.is_finished(), "session must live while a file is open");
    assert_eq!(c.closes(), 0);
    drop(f);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    h.join().unwrap();
    assert_eq!(c.closes(), 1);
    assert!(c.flushes() >= 1);
    let mut buf = [0u8; 4];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut buf, 4096)
        .unwrap();
    assert_eq!(&buf, b"lazy");
}

#[test]
fn drop_unmounts_and_closes() {
    if !prerequisites("drop_unmounts_and_closes", &[]) {
        return;
    }
    let c = Counting::new(Arc::new(RawDisk::memory(MIB).unwrap()));
    let dir = tempfile::tempdir().unwrap();
    let h = mount::mount(c.clone(), dir.path(), &MountOptions::default()).unwrap();
    let canon = dir.path().canonicalize().unwrap();
    assert!(mount::mount_entry(&canon).is_some());
    drop(h);
    assert!(mount::mount_entry(&canon).is_none());
    assert_eq!(c.closes(), 1);
}

#[test]
fn wait_for_mount_sees_the_mount_or_the_exit() {
    if !prerequisites(
        "wait_for_mount_sees_the_mount_or_the_exit",
        &["sleep", "false"],
    ) {
        return;
    }
    let d: Arc<dyn BlockDevice> = Arc::new(RawDisk::memory(MIB).unwrap());
    let m = Mounted::new(d, &MountOptions::default());
    let canon = m.dir.path().canonicalize().unwrap();
    assert_eq!(mount::mount_entry(&canon).as_deref(), Some(mount::FSTYPE));
    let mut child = Command::new("sleep").arg("5").spawn().unwrap();
    mount::wait_for_mount(m.dir.path(), &mut child, Duration::from_secs(5)).unwrap();
    let _ = child.kill();
    let _ = child.wait();

    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new("false").spawn().unwrap();
    let e = mount::wait_for_mount(dir.path(), &mut child, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(e, MountError::ServerExited { .. }), "{e}");
}

#[test]
fn requests_are_at_least_1_mib() {
    if !prerequisites("requests_are_at_least_1_mib", &[]) {
        return;
    }
    let c = Counting::new(Arc::new(RawDisk::memory(16 * MIB).unwrap()));
    let opts = MountOptions {
        writable: true,
        ..Default::default()
    };
    let m = Mounted::new(c.clone(), &opts);
    // O_DIRECT: each read(2)/write(2) of 4 MiB reaches us in requests of max_pages (1 MiB on
    // current kernels). Buffers must be aligned for O_DIRECT in general; a Vec<u64> is enough
    // for FUSE.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.path("disk"))
        .unwrap();
    let data = pattern(5, 4 * MIB as usize);
    f.write_all_at(&data, 4 * MIB).unwrap();
    let mut back = vec![0u8; 4 * MIB as usize];
    f.read_exact_at(&mut back, 4 * MIB).unwrap();
    assert!(back == data);
    let r = c.max_read.load(std::sync::atomic::Ordering::SeqCst);
    let w = c.max_write.load(std::sync::atomic::Ordering::SeqCst);
    assert!(r >= MIB as usize, "largest read request {r}");
    assert!(w >= MIB as usize, "largest write request {w}");
    // Buffered sequential reads are large too: the mount raises the readahead to 1 MiB (as
    // root; otherwise the kernel's default 128 KiB applies).
    c.max_read.store(0, std::sync::atomic::Ordering::SeqCst);
    let mut fb = std::fs::File::open(m.path("disk")).unwrap();
    let mut sink = Vec::new();
    fb.read_to_end(&mut sink).unwrap();
    assert_eq!(sink.len() as u64, 16 * MIB);
    let r = c.max_read.load(std::sync::atomic::Ordering::SeqCst);
    let dev = std::fs::metadata(m.dir.path()).unwrap().dev();
    let ra = std::fs::read_to_string(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    ))
    .unwrap_or_default();
    if ra.trim() == "1024" {
        assert!(r >= MIB as usize, "largest buffered read request {r}");
    } else {
        eprintln!("readahead not raised (not root or read-only sysfs): buffered reads of {r}");
    }
}

#[test]
fn unmount_by_path_ends_the_session() {
    if !prerequisites("unmount_by_path_ends_the_session", &[]) {
        return;
    }
    let c = Counting::new(Arc::new(RawDisk::memory(MIB).unwrap()));
    let mut m = Mounted::new(c.clone(), &MountOptions::default());
    // What `viridian unmount MOUNTPOINT` does from another process.
    mount::unmount(m.dir.path()).unwrap();
    let h = m.handle.take().unwrap();
    h.join().unwrap();
    assert_eq!(c.closes(), 1);
    let e = mount::unmount(m.dir.path()).unwrap_err();
    assert!(matches!(e, MountError::NotMounted(_)), "{e}");
}

/// Not a test on its own: when VIRIDIAN_STALE_HELPER names a directory, mounts a RAM disk there
/// and sleeps, so `stale_mount_is_reported` can SIGKILL this process and leave a stale mount.
#[test]
fn stale_helper() {
    let Some(dir) = std::env::var_os("VIRIDIAN_STALE_HELPER") else {
        return;
    };
    let d: Arc<dyn BlockDevice> = Arc::new(RawDisk::memory(MIB).unwrap());
    let _h = mount::mount(d, std::path::Path::new(&dir), &MountOptions::default()).unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn stale_mount_is_reported() {
    if !prerequisites("stale_mount_is_reported", &["umount"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let canon = dir.path().canonicalize().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "stale_helper", "--nocapture", "--test-threads=1"])
        .env("VIRIDIAN_STALE_HELPER", &canon)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Cleanup<'a>(&'a std::path::Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            if mount::mount_entry(self.0).is_some() {
                let _ = Command::new("umount").arg("-l").arg(self.0).status();
            }
        }
    }
    let _cleanup = Cleanup(&canon);
    let r = mount::wait_for_mount(&canon, &mut child, Duration::from_secs(20));
    let _ = child.kill(); // SIGKILL: the FUSE connection dies, the mount stays
    let _ = child.wait();
    r.unwrap();
    let d: Arc<dyn BlockDevice> = Arc::new(RawDisk::memory(MIB).unwrap());
    let e = mount::mount(d, &canon, &MountOptions::default()).unwrap_err();
    assert!(matches!(e, MountError::StaleMount(_)), "{e}");
    assert!(e.to_string().contains("fusermount3 -u"), "{e}");
    // unmount() cleans it up.
    mount::unmount(&canon).unwrap();
    assert!(mount::mount_entry(&canon).is_none());
}

/// Not a test on its own: when VIRIDIAN_FG_HELPER names "IMAGE:MOUNTPOINT", serves the raw
/// image writable with run_foreground, like `viridian mount IMAGE MOUNTPOINT --rw --foreground`.
#[test]
fn foreground_helper() {
    let Some(spec) = std::env::var_os("VIRIDIAN_FG_HELPER") else {
        return;
    };
    let spec = spec.to_string_lossy().into_owned();
    let (img, mp) = spec.split_once(':').unwrap();
    let d = raw(std::path::Path::new(img), Access::ReadWrite);
    let opts = MountOptions {
        writable: true,
        ..Default::default()
    };
    if let Err(e) = mount::run_foreground(d, std::path::Path::new(mp), &opts) {
        eprintln!("{e}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

fn foreground_child(img: &std::path::Path) -> ChildMount {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "foreground_helper",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(
        "VIRIDIAN_FG_HELPER",
        format!(
            "{}:{}",
            img.display(),
            dir.path().canonicalize().unwrap().display()
        ),
    )
    .stdout(std::process::Stdio::null());
    ChildMount::spawn(cmd, dir)
}

#[test]
fn server_process_exits_cleanly_on_unmount_and_sigterm() {
    if !prerequisites("server_process_exits_cleanly_on_unmount_and_sigterm", &[]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("fg.raw");
    sparse_raw(&img, 4 * MIB, &[]);

    // `viridian unmount` from another process: the server flushes, closes and exits 0.
    let mut m = foreground_child(&img);
    std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("disk"))
        .unwrap()
        .write_all_at(b"first", 0)
        .unwrap();
    let st = m.unmount().expect("server exits after unmount");
    assert!(st.success(), "{st:?}");

    // SIGTERM to the server: it unmounts, flushes, closes and exits 0.
    let mut m = foreground_child(&img);
    std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("disk"))
        .unwrap()
        .write_all_at(b"second", 100)
        .unwrap();
    // SAFETY: signals a child process we spawned and still own.
    unsafe { libc::kill(m.child.id() as libc::pid_t, libc::SIGTERM) };
    let st = m.wait().expect("server exits after SIGTERM");
    assert!(st.success(), "{st:?}");
    assert!(mount::mount_entry(&m.dir.path().canonicalize().unwrap()).is_none());

    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(&bytes[0..5], b"first");
    assert_eq!(&bytes[100..106], b"second");
}

#[test]
fn mount_entry_resolves_relative_paths() {
    if !prerequisites("mount_entry_resolves_relative_paths", &[]) {
        return;
    }
    let d: Arc<dyn BlockDevice> = Arc::new(RawDisk::memory(MIB).unwrap());
    let m = Mounted::new(d, &MountOptions::default());
    let link_dir = tempfile::tempdir().unwrap();
    let link = link_dir.path().join("link");
    std::os::unix::fs::symlink(m.dir.path(), &link).unwrap();
    assert_eq!(mount::mount_entry(&link).as_deref(), Some(mount::FSTYPE));
    let dotted = m
        .dir
        .path()
        .join("..")
        .join(m.dir.path().file_name().unwrap());
    assert_eq!(mount::mount_entry(&dotted).as_deref(), Some(mount::FSTYPE));
}

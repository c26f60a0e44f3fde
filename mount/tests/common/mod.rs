//! Helpers shared by the FUSE tests (and reusable by tests elsewhere: copy or `#[path]`-include
//! this module). Every mount made here is undone on drop, also when the test panics.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use disk::BlockDevice;
use mount::{MountError, MountHandle, MountOptions};

/// True when every prerequisite must be present (CI): missing ones fail instead of skipping.
pub fn require_all() -> bool {
    std::env::var("VIRIDIAN_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Returns false (after printing why) when the test must be skipped; panics instead under
/// `VIRIDIAN_REQUIRE_ALL=1`.
pub fn prerequisites(test: &str, tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse".to_string());
    }
    for t in tools {
        if !have_tool(t) {
            missing.push(format!("tool {t}"));
        }
    }
    // Loop mounts need root.
    // SAFETY: geteuid has no preconditions and touches no memory.
    if tools.contains(&"mount") && unsafe { libc::geteuid() } != 0 {
        missing.push("root (for loop mounts)".to_string());
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: skipped: missing {}", missing.join(", "));
    if require_all() {
        panic!("{msg} (VIRIDIAN_REQUIRE_ALL=1)");
    }
    eprintln!("{msg}");
    false
}

pub fn have_tool(name: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path)
        .chain(["/sbin".into(), "/usr/sbin".into()])
        .any(|d| d.join(name).is_file())
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed: {text}");
    text
}

/// Runs a command with stdin.
pub fn run_stdin(cmd: &str, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    if let Some(mut s) = child.stdin.take() {
        s.write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed: {text}");
    text
}

/// A FUSE mount of a disk on a fresh temporary directory; unmounted on drop.
pub struct Mounted {
    pub handle: Option<MountHandle>,
    pub dir: tempfile::TempDir,
}

impl Mounted {
    pub fn new(disk: Arc<dyn BlockDevice>, opts: &MountOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let handle = mount::mount(disk, dir.path(), opts).expect("mount");
        Mounted {
            handle: Some(handle),
            dir,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Unmounts (retrying while a loop device lets go of a file) and returns the close result.
    pub fn unmount(&mut self) -> Result<(), MountError> {
        let Some(mut h) = self.handle.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match h.unmount() {
                Err(MountError::Busy(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                r => return r,
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.unmount();
        // Belt and braces: never leave a mount behind.
        if mount::mount_entry(&self.dir.path().canonicalize().unwrap_or_default()).is_some() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// A kernel loop mount of a file (e.g. a partition file of our FUSE mount); unmounted on drop.
pub struct LoopMount {
    pub dir: tempfile::TempDir,
    mounted: bool,
}

impl LoopMount {
    pub fn new(file: &Path, options: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        run(
            "mount",
            &[
                "-o",
                &format!("loop,{options}"),
                file.to_str().unwrap(),
                dir.path().to_str().unwrap(),
            ],
        );
        LoopMount { dir, mounted: true }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn unmount(&mut self) {
        if self.mounted {
            self.mounted = false;
            run("umount", &[self.dir.path().to_str().unwrap()]);
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount")
                .arg(self.dir.path())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(self.dir.path())
                    .status();
            }
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Creates a sparse raw file of `size` bytes with pseudo-random data at each `(offset, len)`.
pub fn sparse_raw(path: &Path, size: u64, islands: &[(u64, usize)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, (off, len)) in islands.iter().enumerate() {
        f.write_all_at(&pattern(i as u64 + 1, *len), *off).unwrap();
    }
    f.sync_all().unwrap();
}

/// Asserts that two files have the same bytes, with `cmp` when available (what users run) and
/// in Rust otherwise.
pub fn assert_same_bytes(a: &Path, b: &Path) {
    if have_tool("cmp") {
        let out = Command::new("cmp").arg(a).arg(b).output().unwrap();
        assert!(
            out.status.success(),
            "cmp {} {}: {}{}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let mut fa = std::fs::File::open(a).unwrap();
    let mut fb = std::fs::File::open(b).unwrap();
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut pos = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        assert_eq!(na, nb, "lengths differ near offset {pos}");
        if let Some(i) = (0..na).find(|&i| ba[i] != bb[i]) {
            panic!("differ at offset {}", pos + i as u64);
        }
        if na == 0 {
            return;
        }
        pos += na as u64;
    }
}

/// Asserts that a file holds exactly the bytes `disk` reads (for images that are not raw: the
/// expectation comes from the BlockDevice itself or from `qemu-img convert -O raw`).
pub fn assert_file_matches_disk(file: &Path, disk: &dyn BlockDevice) {
    let mut f = std::fs::File::open(file).unwrap();
    let size = disk.size();
    assert_eq!(f.metadata().unwrap().len(), size);
    let mut want = vec![0u8; 1 << 20];
    let mut got = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(want.len() as u64) as usize;
        disk.read_at(&mut want[..n], pos).unwrap();
        assert_eq!(read_full(&mut f, &mut got[..n]), n);
        if let Some(i) = (0..n).find(|&i| want[i] != got[i]) {
            panic!("differ at offset {}", pos + i as u64);
        }
        pos += n as u64;
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// Wraps a disk and counts flushes and closes (to check the mount's shutdown path).
#[derive(Debug)]
pub struct Counting {
    pub inner: Arc<dyn BlockDevice>,
    pub flushes: std::sync::atomic::AtomicUsize,
    pub closes: std::sync::atomic::AtomicUsize,
    /// Largest single read_at / write_at seen (request sizes that reached the disk).
    pub max_read: std::sync::atomic::AtomicUsize,
    pub max_write: std::sync::atomic::AtomicUsize,
}

impl Counting {
    pub fn new(inner: Arc<dyn BlockDevice>) -> Arc<Self> {
        Arc::new(Counting {
            inner,
            flushes: Default::default(),
            closes: Default::default(),
            max_read: Default::default(),
            max_write: Default::default(),
        })
    }
    pub fn closes(&self) -> usize {
        self.closes.load(std::sync::atomic::Ordering::SeqCst)
    }
    pub fn flushes(&self) -> usize {
        self.flushes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl BlockDevice for Counting {
    fn format(&self) -> &'static str {
        self.inner.format()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> disk::Result<()> {
        self.max_read
            .fetch_max(buf.len(), std::sync::atomic::Ordering::SeqCst);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> disk::Result<()> {
        self.max_write
            .fetch_max(buf.len(), std::sync::atomic::Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> disk::Result<()> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: disk::ZeroFlags) -> disk::Result<()> {
        self.inner.write_zeroes(offset, len, flags)
    }
    fn discard(&self, offset: u64, len: u64) -> disk::Result<()> {
        self.inner.discard(offset, len)
    }
    fn block_status(&self, offset: u64, len: u64) -> disk::Result<disk::Extent> {
        self.inner.block_status(offset, len)
    }
    fn close(&self) -> disk::Result<()> {
        self.closes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.close()
    }
}

/// A mount served by a child process (e.g. `viridian mount IMAGE MOUNTPOINT --foreground`, or a
/// test helper): waits for the mount, and on drop unmounts and reaps the child (SIGKILL after
/// 10 s, then a lazy umount, so nothing is left behind).
pub struct ChildMount {
    pub child: std::process::Child,
    pub dir: tempfile::TempDir,
    mountpoint: PathBuf,
}

impl ChildMount {
    /// Spawns `cmd` (which must mount on `dir`) and waits until the mount is up.
    pub fn spawn(mut cmd: Command, dir: tempfile::TempDir) -> Self {
        let child = cmd.spawn().expect("spawn mount server");
        let mountpoint = dir.path().canonicalize().unwrap();
        let mut m = ChildMount {
            child,
            dir,
            mountpoint,
        };
        mount::wait_for_mount(&m.mountpoint, &mut m.child, Duration::from_secs(30))
            .expect("mount server did not mount");
        m
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// Waits for the child to exit (after an unmount or a signal), up to 10 s.
    pub fn wait(&mut self) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Unmounts the way `viridian unmount` does and returns the child's exit status.
    pub fn unmount(&mut self) -> Option<std::process::ExitStatus> {
        mount::unmount(&self.mountpoint).expect("unmount");
        self.wait()
    }
}

impl Drop for ChildMount {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = mount::unmount(&self.mountpoint);
            if self.wait().is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if mount::mount_entry(&self.mountpoint).is_some() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

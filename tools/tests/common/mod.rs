//! Helpers for driving the built `viridian` binary and the peer tools in tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn viridian(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(args)
        .output()
        .expect("run viridian")
}

/// Runs viridian and insists on exit code 0.
pub fn ok(args: &[&str]) -> String {
    let o = viridian(args);
    assert!(
        o.status.success(),
        "viridian {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn code(args: &[&str]) -> i32 {
    viridian(args).status.code().unwrap_or(-1)
}

pub fn require_all() -> bool {
    std::env::var("VIRIDIAN_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Whether `tool` is on PATH; when it is not, the test is skipped with a message, or fails
/// under VIRIDIAN_REQUIRE_ALL=1.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if require_all() {
            panic!("{tool} is required (VIRIDIAN_REQUIRE_ALL=1) but not installed");
        }
        eprintln!("SKIP: {tool} not installed");
    }
    found
}

pub fn tool(prog: &str, args: &[&str]) -> Output {
    Command::new(prog).args(args).output().expect("run tool")
}

pub fn tool_ok(prog: &str, args: &[&str]) -> String {
    let o = tool(prog, args);
    assert!(
        o.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// A raw file of `size` bytes with pseudo-random data in some 1 MiB pieces and holes elsewhere.
pub fn patterned_raw(path: &Path, size: u64, seed: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x = seed | 1;
    let mut pos = 0;
    while pos < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(3) {
            let n = (1u64 << 20).min(size - pos);
            let mut buf = vec![0u8; n as usize];
            let mut y = x;
            for b in buf.iter_mut() {
                y = y
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = (y >> 56) as u8;
            }
            // Leave a zero hole inside some data pieces so zero detection is exercised.
            if x.is_multiple_of(2) && n >= 65536 {
                buf[4096..65536].fill(0);
            }
            f.seek(SeekFrom::Start(pos)).unwrap();
            f.write_all(&buf).unwrap();
        }
        pos += 1 << 20;
    }
    f.sync_all().unwrap();
}

pub fn read_all(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn join(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// What one measured run of the binary did.
pub struct Measured {
    pub code: i32,
    pub signal: i32,
    pub stdout: String,
    pub stderr: String,
    /// Peak resident set of the child, KiB (getrusage of the reaped child).
    pub max_rss_kib: u64,
    pub wall: std::time::Duration,
}

impl Measured {
    /// Panicked: Rust's panic exit code 101, a panic message, or death by a signal.
    pub fn panicked(&self) -> bool {
        self.code == 101 || self.signal != 0 || self.stderr.contains("panicked")
    }
}

/// Runs viridian, reaping the child with wait4 to get its own peak RSS; output is read after it
/// exits (runs that may print more than a pipe holds must not use this).
pub fn viridian_measured(args: &[&str]) -> Measured {
    use std::io::Read;
    use std::process::Stdio;
    let start = std::time::Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run viridian");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let mut status = 0i32;
    // SAFETY: plain struct filled by the kernel.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child; status and rusage point to owned memory.
    let rc = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(rc, child.id() as i32, "wait4 failed");
    let wall = start.elapsed();
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    std::mem::forget(child); // already reaped
    let (code, signal) = if libc::WIFEXITED(status) {
        (libc::WEXITSTATUS(status), 0)
    } else {
        (-1, libc::WTERMSIG(status))
    };
    Measured {
        code,
        signal,
        stdout,
        stderr,
        max_rss_kib: ru.ru_maxrss as u64,
        wall,
    }
}

/// FUSE usable here: /dev/fuse and fusermount3; skip with a message, or fail under
/// VIRIDIAN_REQUIRE_ALL=1.
pub fn fuse_usable() -> bool {
    let ok = Path::new("/dev/fuse").exists() && have("fusermount3");
    if !ok {
        if require_all() {
            panic!(
                "FUSE is required (VIRIDIAN_REQUIRE_ALL=1) but /dev/fuse or fusermount3 is missing"
            );
        }
        eprintln!("SKIP: FUSE unavailable (/dev/fuse or fusermount3 missing)");
    }
    ok
}

/// Unmounts (ours, then lazily with fusermount3) on drop so no test leaves a mount behind.
pub struct MountGuard(pub PathBuf);
impl Drop for MountGuard {
    fn drop(&mut self) {
        if mounted(&self.0) {
            let _ = viridian(&["unmount", p(&self.0)]);
            if mounted(&self.0) {
                let _ = tool("fusermount3", &["-u", "-z", p(&self.0)]);
            }
        }
    }
}

pub fn mounted(mp: &Path) -> bool {
    let canon = std::fs::canonicalize(mp).unwrap_or_else(|_| mp.to_path_buf());
    std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines().any(|l| {
                l.split(' ').nth(1) == Some(p(&canon)) || l.split(' ').nth(1) == Some(p(mp))
            })
        })
        .unwrap_or(false)
}

/// A `viridian serve` child, killed and reaped on drop.
pub struct ServeGuard(pub std::process::Child);
impl Drop for ServeGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `viridian serve ARGS` and waits for `socket` to appear (None when the server exited
/// first; its exit code and stderr are then in the error).
pub fn serve_start(args: &[&str], socket: &Path) -> Result<ServeGuard, (i32, String)> {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start viridian serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            let mut e = String::new();
            if let Some(mut s) = child.stderr.take() {
                let _ = s.read_to_string(&mut e);
            }
            return Err((st.code().unwrap_or(-1), e));
        }
        // The file appears at bind(), a moment before listen(): wait until a connection is
        // accepted, or a client started right away can be refused.
        if socket.exists() && std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(ServeGuard(child));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("viridian serve neither started nor exited within 20 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

impl ServeGuard {
    /// Stops the server in order (SIGTERM: it flushes and closes its images) and returns how it
    /// exited; panics (and the drop kills it) when it is not gone within 30 s.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(st) = self.0.try_wait().expect("wait for viridian serve") {
                return st;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "viridian serve did not exit within 30 s of SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Kill loops (crash_commit.rs, crash_writers.rs): rounds per test, VIRIDIAN_KILL_ROUNDS for
/// more (scripts/kill-soak.sh).
pub fn kill_rounds() -> usize {
    std::env::var("VIRIDIAN_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

/// A small xorshift generator for kill delays; the seed comes from the clock (or
/// VIRIDIAN_KILL_SEED) and is printed so a failing round can be replayed.
pub struct KillRng(u64);
impl KillRng {
    pub fn new(test: &str) -> KillRng {
        let seed = std::env::var("VIRIDIAN_KILL_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            })
            | 1;
        eprintln!("{test}: VIRIDIAN_KILL_SEED={seed}");
        KillRng(seed)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

// ---- per-case setup shared by the CLI test files ----

/// `viridian create -q -f FMT PATH SIZE`, insisting on success.
pub fn create(fmt: &str, path: &Path, size: &str) {
    ok(&["create", "-q", "-f", fmt, p(path), size]);
}

/// A new FMT image `name` of `size` in `dir` (made by `viridian create`); its path.
pub fn image_in(dir: &Path, name: &str, fmt: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    create(fmt, &path, size);
    path
}

/// `viridian create -q -f FMT -o OPTIONS PATH SIZE`, insisting on success.
pub fn create_with(fmt: &str, options: &str, path: &Path, size: &str) {
    ok(&["create", "-q", "-f", fmt, "-o", options, p(path), size]);
}

/// Runs viridian with `dir` as its working directory (relative paths resolve there).
pub fn viridian_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_viridian"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run viridian")
}

pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `viridian ARGS` (an `--output json` command), parsed.
pub fn ok_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).expect("viridian printed JSON")
}

/// The path `name` in `dir` with no file at it (a socket or output left by an earlier round).
pub fn fresh_path(dir: &Path, name: &str) -> PathBuf {
    let sock = dir.join(name);
    let _ = std::fs::remove_file(&sock);
    sock
}

/// The directory `name` in `dir`, made if missing, to mount on.
pub fn mount_point(dir: &Path, name: &str) -> PathBuf {
    let mp = dir.join(name);
    std::fs::create_dir_all(&mp).unwrap();
    mp
}

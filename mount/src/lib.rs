//! FUSE view of a virtual disk.
//!
//! [`mount`] exposes any [`disk::BlockDevice`] (raw, VHD, VHDX, a chain, an undo overlay) as a
//! directory holding one file `disk` (the raw virtual disk bytes) and, with
//! [`MountOptions::partitions`], one file per partition (`p1`, `p2`, ..., Linux numbering), each
//! exactly the partition's byte range, so `mount -o loop,ro MOUNTPOINT/p1 /mnt` works.
//!
//! * Read-only unless [`MountOptions::writable`]; writes go straight through to the disk.
//!   `fsync` and `close` of a written file flush the disk; when the mount goes away (unmount,
//!   lazy unmount, SIGTERM in [`run_foreground`], dropping the [`MountHandle`]) the disk is
//!   flushed and [`BlockDevice::close`]d.
//! * `st_blocks` and `lseek(SEEK_DATA/SEEK_HOLE)` come from block status through the chain, so
//!   `du`, `cp --sparse` and sparse-aware copies work.
//! * Requests are served by several threads (each with its own cloned `/dev/fuse` fd); reads
//!   and writes are up to 1 MiB per request (the kernel's `max_pages` limit).
//! * Cache policy: see the `fs` module: `FOPEN_KEEP_CACHE` on read-only mounts,
//!   `FOPEN_DIRECT_IO` for `O_DIRECT` opens.

// unsafe only for getuid/getgid (no std wrapper), with a SAFETY comment.
#![deny(unsafe_op_in_unsafe_fn)]

mod fs;
pub mod partition;

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use disk::{BlockDevice, Disk};
use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};

pub use partition::{
    partitions, read_table, Partition, PartitionError, PartitionKind, PartitionTable, Scheme,
};

/// How to mount.
#[derive(Clone, Debug, Default)]
pub struct MountOptions {
    /// Allow writes (the disk must have been opened writable).
    pub writable: bool,
    /// Also expose one file per partition (`p1`, `p2`, ...).
    pub partitions: bool,
    /// Let other users access the mount (needs `user_allow_other` in /etc/fuse.conf when not
    /// root).
    pub allow_other: bool,
    /// Request-handling threads; 0 picks a default (4).
    pub threads: usize,
    /// Name shown as the mount source in /proc/mounts; defaults to the image path.
    pub fsname: Option<String>,
}

/// Everything that can go wrong when mounting, serving or unmounting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    #[error("mount point {0} does not exist")]
    MountpointMissing(PathBuf),
    #[error("mount point {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("mount point {0} is already a mount point (unmount it first)")]
    AlreadyMounted(PathBuf),
    #[error(
        "mount point {0} is a stale FUSE mount (transport endpoint is not connected); \
         clean it up with `fusermount3 -u {0}`"
    )]
    StaleMount(PathBuf),
    #[error("cannot inspect mount point {path}: {source}")]
    Mountpoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("FUSE is not available: {0}")]
    FuseUnavailable(String),
    #[error("a writable mount needs a disk opened for writing (the disk is read-only)")]
    DiskReadOnly,
    #[error(transparent)]
    PartitionTable(#[from] PartitionError),
    #[error("cannot mount on {path}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is busy (files are open); close them or unmount lazily (fusermount3 -u -z)")]
    Busy(PathBuf),
    #[error("{0} is not mounted")]
    NotMounted(PathBuf),
    #[error("cannot unmount {path}: {detail}")]
    Unmount { path: PathBuf, detail: String },
    #[error("FUSE session failed: {0}")]
    Session(#[source] io::Error),
    #[error("flushing or closing the disk after unmount failed: {0}")]
    Close(#[source] disk::Error),
    #[error("the mount process exited before {path} was mounted ({status})")]
    ServerExited {
        path: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error("{0} was not mounted within the time limit")]
    Timeout(PathBuf),
    #[error("cannot install signal handlers: {0}")]
    Signal(#[source] io::Error),
}

/// A mounted disk served by background threads.
///
/// Dropping it unmounts (lazily when files are still open), then the disk is flushed and closed
/// by the session as it ends.
#[derive(Debug)]
pub struct MountHandle {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    shared: Arc<fs::Shared>,
    disk: Disk,
    writable: bool,
    partitions: Vec<Partition>,
}

impl MountHandle {
    /// The mount point as given (canonicalized).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The partitions exposed as `pN` files (empty without [`MountOptions::partitions`]).
    pub fn partitions(&self) -> &[Partition] {
        &self.partitions
    }

    /// True once the session has ended (unmounted by anyone, including `fusermount3 -u -z`).
    pub fn is_finished(&self) -> bool {
        match &self.session {
            Some(s) => s.guard.is_finished(),
            None => true,
        }
    }

    /// Unmounts (not lazily), waits for the session to end and returns the outcome of flushing
    /// and closing the disk. Fails with [`MountError::Busy`] when files are still open; the
    /// mount then stays up.
    pub fn unmount(&mut self) -> Result<(), MountError> {
        if !self.is_finished() {
            match sys_unmount(&self.mountpoint, false) {
                // Someone else unmounted it first: the session is ending; wait for it.
                Ok(()) | Err(MountError::NotMounted(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.wait()
    }

    /// Waits until the mount goes away (someone unmounts it), then returns the outcome of
    /// flushing and closing the disk.
    pub fn join(mut self) -> Result<(), MountError> {
        self.wait()
    }

    fn wait(&mut self) -> Result<(), MountError> {
        let Some(s) = self.session.take() else {
            return Ok(());
        };
        let joined = s.join();
        let closed = self.shared.take_result();
        match (joined, closed) {
            (_, Some(Err(e))) => Err(MountError::Close(e)),
            // With several reader threads, a thread that had just taken a request when the
            // kernel tore the connection down (at unmount) reads ECONNABORTED instead of
            // ENODEV. The session is over either way; no request was acknowledged by it, and
            // the disk's flush and close are reported above.
            (Err(e), _) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
            (Err(e), _) => Err(MountError::Session(e)),
            (Ok(()), _) => Ok(()),
        }
    }

    /// Last resort when the session cannot end (files held open after a lazy unmount): flush
    /// and close the disk now. Later requests to the mount fail.
    fn force_close(&mut self) -> Result<(), MountError> {
        self.shared.close_once(self.disk.as_ref(), self.writable);
        match self.shared.take_result() {
            Some(Err(e)) => Err(MountError::Close(e)),
            _ => Ok(()),
        }
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if self.session.is_none() {
            return;
        }
        if !self.is_finished() && sys_unmount(&self.mountpoint, false).is_err() {
            let _ = sys_unmount(&self.mountpoint, true);
        }
        // Give the session a moment to see the unmount and close the disk; never hang a drop.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.is_finished() {
            let _ = self.wait();
        } else if let Some(s) = self.session.take() {
            // Lazily unmounted with files still open: let the thread keep serving them; it
            // flushes and closes the disk when the last one is closed. Dropping the session
            // here would try to unmount the path again, which may by then be another mount.
            std::mem::forget(s);
        }
    }
}

/// Mounts `disk` on `mountpoint` and serves it from background threads. When this fails the
/// disk is left open (the caller still owns it); once mounted, the mount closes it when it goes
/// away.
pub fn mount(
    disk: impl Into<Disk>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<MountHandle, MountError> {
    let disk: Disk = disk.into();
    check_mountpoint(mountpoint)?;
    check_fuse()?;
    if opts.writable && disk.read_only() {
        return Err(MountError::DiskReadOnly);
    }
    let parts = if opts.partitions {
        partitions(disk.as_ref())?
    } else {
        Vec::new()
    };
    let mut nodes = vec![fs::Node::new("disk".to_string(), 0, disk.size())];
    for p in &parts {
        nodes.push(fs::Node::new(p.file_name(), p.start, p.len));
    }
    let shared = Arc::new(fs::Shared::default());
    let filesystem = fs::DiskFs::new(disk.clone(), opts.writable, nodes, shared.clone());

    let mut config = Config::default();
    let fsname = opts
        .fsname
        .clone()
        .or_else(|| disk.path().map(|p| p.display().to_string()))
        .unwrap_or_else(|| "viridian".to_string());
    // Mount options are comma separated; keep the name from splitting them.
    let fsname: String = fsname
        .chars()
        .map(|c| {
            if c == ',' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect();
    config.mount_options = vec![
        MountOption::FSName(fsname),
        // As a kernel option (not fuser's Subtype, which only renames the source), so that
        // /proc/mounts lists the type as "fuse.viridian".
        MountOption::CUSTOM("subtype=viridian".to_string()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        if opts.writable {
            MountOption::RW
        } else {
            MountOption::RO
        },
    ];
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(if opts.threads == 0 { 4 } else { opts.threads });
    config.clone_fd = true;

    let mountpoint = mountpoint
        .canonicalize()
        .map_err(|source| MountError::Mountpoint {
            path: mountpoint.to_path_buf(),
            source,
        })?;
    let session = Session::new(filesystem, &mountpoint, &config).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            MountError::FuseUnavailable(format!("{source} (is fusermount3 installed?)"))
        } else {
            MountError::Mount {
                path: mountpoint.clone(),
                source,
            }
        }
    })?;
    let session = session.spawn().map_err(MountError::Session)?;
    raise_readahead(&mountpoint);
    Ok(MountHandle {
        session: Some(session),
        mountpoint,
        shared,
        disk,
        writable: opts.writable,
        partitions: parts,
    })
}

/// Mounts and serves until the mount goes away (`viridian unmount`, `fusermount3 -u [-z]`) or
/// the process gets SIGTERM, SIGINT or SIGHUP; then unmounts (lazily if files are still open),
/// flushes and closes the disk.
pub fn run_foreground(
    disk: impl Into<Disk>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<(), MountError> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut ids = Vec::new();
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ] {
        match signal_hook::flag::register(sig, stop.clone()) {
            Ok(id) => ids.push(id),
            Err(e) => {
                for id in ids {
                    signal_hook::low_level::unregister(id);
                }
                return Err(MountError::Signal(e));
            }
        }
    }
    let result = serve_until(disk.into(), mountpoint, opts, &stop);
    for id in ids {
        signal_hook::low_level::unregister(id);
    }
    result
}

fn serve_until(
    disk: Disk,
    mountpoint: &Path,
    opts: &MountOptions,
    stop: &AtomicBool,
) -> Result<(), MountError> {
    let mut handle = mount(disk, mountpoint, opts)?;
    loop {
        if handle.is_finished() {
            return handle.join();
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match sys_unmount(handle.mountpoint(), false) {
        Ok(()) => return handle.join(),
        // Files are still open, or someone detached the mount already (lazily, with files
        // open): make sure it is detached so no new user can reach it, give the holders a few
        // seconds, then close the disk ourselves so the image is left clean.
        Err(MountError::Busy(_)) | Err(MountError::NotMounted(_)) => {}
        Err(e) => return Err(e),
    }
    match sys_unmount(handle.mountpoint(), true) {
        Ok(()) | Err(MountError::NotMounted(_)) => {}
        Err(e) => return Err(e),
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !handle.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if handle.is_finished() {
        return handle.join();
    }
    let r = handle.force_close();
    // The session thread keeps the FUSE fd; it ends when the process exits.
    if let Some(s) = handle.session.take() {
        std::mem::forget(s);
    }
    r
}

/// The type /proc/mounts shows for our mounts.
pub const FSTYPE: &str = "fuse.viridian";

/// For a CLI that serves in a child process (`viridian mount` without `--foreground` re-runs
/// itself with `--foreground` as a child): waits until `mountpoint` shows a mount of ours, or
/// fails when the child exits first (its stderr carries the reason) or `timeout` passes.
pub fn wait_for_mount(
    mountpoint: &Path,
    child: &mut std::process::Child,
    timeout: Duration,
) -> Result<(), MountError> {
    let path = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_path_buf());
    let deadline = Instant::now() + timeout;
    loop {
        if mount_entry(&path).as_deref() == Some(FSTYPE) {
            return Ok(());
        }
        match child.try_wait() {
            Ok(Some(status)) => return Err(MountError::ServerExited { path, status }),
            Ok(None) => {}
            Err(source) => return Err(MountError::Mountpoint { path, source }),
        }
        if Instant::now() >= deadline {
            return Err(MountError::Timeout(path));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Unmounts a FUSE mount made by this crate (by any process), like `fusermount3 -u`. The
/// serving process then flushes and closes its disk and exits.
pub fn unmount(mountpoint: &Path) -> Result<(), MountError> {
    unmount_with(mountpoint, false)
}

/// [`unmount`], optionally lazy (`fusermount3 -u -z`: detach now, finish when the last open
/// file is closed).
pub fn unmount_with(mountpoint: &Path, lazy: bool) -> Result<(), MountError> {
    let path = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_path_buf());
    match mount_entry(&path) {
        Some(fstype) if fstype.starts_with("fuse") => {}
        Some(fstype) => {
            return Err(MountError::Unmount {
                path,
                detail: format!("it is a {fstype} mount, not a FUSE mount"),
            })
        }
        None => return Err(MountError::NotMounted(path)),
    }
    sys_unmount(&path, lazy)
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn sys_unmount(path: &Path, lazy: bool) -> Result<(), MountError> {
    if is_root() {
        let flags = if lazy {
            nix::mount::MntFlags::MNT_DETACH
        } else {
            nix::mount::MntFlags::empty()
        };
        return match nix::mount::umount2(path, flags) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EBUSY) => Err(MountError::Busy(path.to_path_buf())),
            Err(nix::errno::Errno::EINVAL) => Err(MountError::NotMounted(path.to_path_buf())),
            Err(e) => Err(MountError::Unmount {
                path: path.to_path_buf(),
                detail: e.to_string(),
            }),
        };
    }
    let mut cmd = Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd.arg("--").arg(path).output().map_err(|e| {
        MountError::FuseUnavailable(format!("cannot run fusermount3: {e} (install fuse3)"))
    })?;
    if out.status.success() {
        return Ok(());
    }
    let detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if detail.contains("not found") || detail.contains("not mounted") {
        return Err(MountError::NotMounted(path.to_path_buf()));
    }
    if detail.contains("busy") {
        return Err(MountError::Busy(path.to_path_buf()));
    }
    Err(MountError::Unmount {
        path: path.to_path_buf(),
        detail,
    })
}

/// Checks that `path` is an existing directory that is not already a mount point.
pub fn check_mountpoint(path: &Path) -> Result<(), MountError> {
    let md = match std::fs::metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(MountError::MountpointMissing(path.to_path_buf()))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(MountError::StaleMount(path.to_path_buf()))
        }
        Err(source) => {
            return Err(MountError::Mountpoint {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !md.is_dir() {
        return Err(MountError::NotADirectory(path.to_path_buf()));
    }
    let canon = path
        .canonicalize()
        .map_err(|source| MountError::Mountpoint {
            path: path.to_path_buf(),
            source,
        })?;
    if mount_entry(&canon).is_some() {
        return Err(MountError::AlreadyMounted(path.to_path_buf()));
    }
    Ok(())
}

/// Checks for `/dev/fuse` and, when not root, for `fusermount3`.
pub fn check_fuse() -> Result<(), MountError> {
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::FuseUnavailable(
            "/dev/fuse is missing (load the fuse module; in a container pass --device /dev/fuse \
             and CAP_SYS_ADMIN)"
                .to_string(),
        ));
    }
    if !is_root() && find_in_path("fusermount3").is_none() && find_in_path("fusermount").is_none() {
        return Err(MountError::FuseUnavailable(
            "fusermount3 is not installed (install the fuse3 package)".to_string(),
        ));
    }
    Ok(())
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The filesystem type of the mount whose mount point is `path` (topmost one), from
/// /proc/self/mountinfo. `path` may be relative or contain symlinks; a stale mount point that
/// cannot be resolved is matched as given.
pub fn mount_entry(path: &Path) -> Option<String> {
    let canon = path.canonicalize().ok();
    mountinfo(canon.as_deref().unwrap_or(path)).map(|(_, fstype)| fstype)
}

/// (device "major:minor", fs type) of the topmost mount at exactly `path`.
fn mountinfo(path: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_str()?;
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 5 {
            continue;
        }
        if unescape_mountinfo(fields[4]) != want {
            continue;
        }
        // After the optional fields comes "-", then the fs type.
        if let Some(dash) = fields.iter().position(|f| *f == "-") {
            if let Some(t) = fields.get(dash + 1) {
                found = Some((fields[2].to_string(), (*t).to_string()));
            }
        }
    }
    found
}

/// Readahead for the mount's backing-device info, so that buffered sequential reads (cp, dd,
/// a loop device without direct I/O) reach us as 1 MiB requests instead of the kernel's default
/// 128 KiB. Best effort: needs root (sysfs); failure only costs throughput.
const READAHEAD_KB: u32 = 1024;

fn raise_readahead(mountpoint: &Path) {
    if let Some((dev, _)) = mountinfo(mountpoint) {
        let p = format!("/sys/class/bdi/{dev}/read_ahead_kb");
        let _ = std::fs::write(p, READAHEAD_KB.to_string());
    }
}

/// Mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push((v & 0xFF) as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

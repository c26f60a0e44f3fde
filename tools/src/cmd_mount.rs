//! `viridian mount` / `viridian unmount`: a FUSE view of an image (whole disk and partitions).
//!
//! Without `--foreground` the command starts itself again in the foreground as a detached
//! process (its own process group, so a terminal's Ctrl-C does not reach it), waits until the
//! mount is up, and returns; the server runs until `viridian unmount` (or `fusermount3 -u`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chain::OpenOptions;

use crate::common::{self, SizeRuleArg};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UndoEnd {
    Commit,
    Discard,
    /// Ask on the terminal at unmount (foreground only); otherwise discard.
    Ask,
}

#[derive(clap::Args)]
pub struct Args {
    /// Image format (raw, vhd/vpc or vhdx); probed when absent.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Allow writes (through to the image, or to the undo child with --undo).
    #[arg(long)]
    rw: bool,
    /// Send writes to a throwaway child; commit or discard it at unmount (implies --rw).
    #[arg(long)]
    undo: bool,
    /// What to do with the undo child at unmount.
    #[arg(long = "undo-end", value_enum, default_value_t = UndoEnd::Ask)]
    undo_end: UndoEnd,
    /// Expose one file per partition (p1, p2, ...).
    #[arg(long)]
    partitions: bool,
    /// Stay in the foreground until unmounted (or SIGTERM/SIGINT).
    #[arg(long)]
    foreground: bool,
    /// Request-handling threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Let other users access the mount.
    #[arg(long = "allow-other")]
    allow_other: bool,
    /// Use this file as the parent (moved chains).
    #[arg(long)]
    parent: Option<PathBuf>,
    /// The image file.
    image: PathBuf,
    /// An existing empty directory to mount on.
    mountpoint: PathBuf,
}

/// Where the server of a mount point records its pid, so `unmount` can wait for it to close
/// the image (scripts expect the image to be clean once `viridian unmount` returns).
fn pid_file(mountpoint: &std::path::Path) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let canonical = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    canonical.hash(&mut h);
    std::env::temp_dir().join(format!("viridian-mount-{:016x}.pid", h.finish()))
}

/// Where the server of a mount point leaves its outcome for `unmount`: "ok", or the error
/// (a failed final flush means written data may be lost, and unmount must say so).
fn status_file(mountpoint: &std::path::Path) -> PathBuf {
    pid_file(mountpoint).with_extension("status")
}

/// Tells the background server where its log is, so it can remove it after a clean end.
const LOG_ENV: &str = "VIRIDIAN_MOUNT_LOG";

/// Removes the background server's log when the server ends without an error to keep.
struct LogFile(Option<PathBuf>);
impl Drop for LogFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Removes the pid file when the server ends, however it ends.
struct PidFile(PathBuf);
impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn run(a: Args) -> Result<i32> {
    mount::check_fuse().context("cannot mount")?;
    mount::check_mountpoint(&a.mountpoint).context("cannot mount")?;
    if !a.foreground {
        if a.partitions {
            // Warn here, where the user sees it (the background server's stderr is a log).
            let mut ro = OpenOptions::read_only();
            ro.parent_override = a.parent.clone();
            partitions_parse(&a, &ro, true);
        }
        return spawn_background(&a);
    }
    let pid_path = pid_file(&a.mountpoint);
    let status_path = status_file(&a.mountpoint);
    let _ = std::fs::remove_file(&status_path);
    std::fs::write(&pid_path, std::process::id().to_string())
        .with_context(|| format!("cannot write {}", pid_path.display()))?;
    let _pid = PidFile(pid_path);
    let mut log = LogFile(std::env::var_os(LOG_ENV).map(PathBuf::from));
    let result = serve(&a);
    let status = match &result {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("{}: {}", a.image.display(), common::one_line(e)),
    };
    // Written before the pid file goes away, which is what unmount waits for.
    let _ = std::fs::write(&status_path, status);
    if result.is_err() {
        // Keep the log: it holds the error for whoever looks after a failed mount.
        log.0 = None;
    }
    result
}

/// The line a mount prints once it is up: where, and what happens to writes.
fn ready_line(a: &Args, background: bool) -> String {
    let mode = if a.undo {
        match (a.undo_end, background) {
            (UndoEnd::Commit, _) => "undo mode: writes go to a throwaway child, committed into the image at unmount".to_string(),
            (UndoEnd::Ask, false) => "undo mode: writes go to a throwaway child; you are asked at unmount whether to commit them".to_string(),
            _ => "undo mode: writes go to a throwaway child and are DISCARDED at unmount (use --undo-end commit to keep them)".to_string(),
        }
    } else if a.rw {
        "read-write: writes go to the image".to_string()
    } else {
        "read-only".to_string()
    };
    format!(
        "viridian: mounted {} on {} ({mode})",
        a.image.display(),
        a.mountpoint.display()
    )
}

/// Prints the ready line from a helper thread once the mount shows up (the FUSE loop itself
/// blocks until unmount).
fn announce_when_mounted(a: &Args) {
    let (line, mountpoint) = (ready_line(a, false), a.mountpoint.clone());
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if mount::mount_entry(&mountpoint).is_some() {
                eprintln!("{line}");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
}

fn serve(a: &Args) -> Result<i32> {
    // A background server's stderr is its log; the launching process prints the line.
    if std::env::var_os(LOG_ENV).is_none() {
        announce_when_mounted(a);
    }
    let writable = a.rw || a.undo;
    let mut opts = if writable && !a.undo {
        OpenOptions::read_write()
    } else {
        OpenOptions::read_only()
    };
    opts.parent_override = a.parent.clone();
    if let Some(f) = &a.format {
        opts.format = Some(common::parse_format(f)?);
    }
    let mopts = mount::MountOptions {
        writable,
        partitions: a.partitions && partitions_parse(a, &opts, std::env::var_os(LOG_ENV).is_none()),
        allow_other: a.allow_other,
        threads: a.threads,
        fsname: Some(a.image.display().to_string()),
    };
    if a.undo {
        let undo = chain::UndoDisk::open(&a.image, &opts, None)
            .with_context(|| format!("cannot open {} in undo mode", a.image.display()))?;
        let served = mount::run_foreground(undo.disk(), &a.mountpoint, &mopts);
        let end = match a.undo_end {
            UndoEnd::Ask if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() => {
                eprint!("Commit the changes into {}? [y/N] ", a.image.display());
                let mut line = String::new();
                let _ = std::io::stdin().read_line(&mut line);
                if line.trim().eq_ignore_ascii_case("y") || line.trim().eq_ignore_ascii_case("yes")
                {
                    UndoEnd::Commit
                } else {
                    UndoEnd::Discard
                }
            }
            UndoEnd::Ask => UndoEnd::Discard,
            other => other,
        };
        // Changes from a session that ended in an error are never merged.
        let ok = served.is_ok();
        let end = if end == UndoEnd::Commit {
            common::UndoEnd::Commit
        } else {
            common::UndoEnd::Discard
        };
        let finished = common::finish_undo(undo, end, ok);
        if let Err(e) = &served {
            if let Err(f) = &finished {
                eprintln!("viridian: {}", common::one_line(f));
            }
            bail!("mount failed: {e}");
        }
        finished?;
        return Ok(0);
    }
    let disk = common::open_with(&a.image, None, SizeRuleArg::Auto, opts)?;
    mount::run_foreground(disk, &a.mountpoint, &mopts).context("mount failed")?;
    Ok(0)
}

/// --partitions on a disk whose table does not parse (damaged, or converted to another sector
/// size) still mounts `disk`, with a warning, so the user can repair it through the mount.
fn partitions_parse(a: &Args, opts: &OpenOptions, warn: bool) -> bool {
    let mut ro = opts.clone();
    ro.read_only = true;
    let Ok(d) = common::open_with(&a.image, None, SizeRuleArg::Auto, ro) else {
        return true; // the real open below reports the error
    };
    match mount::read_table(d.as_ref()) {
        Ok(_) => true,
        Err(e) => {
            if warn {
                eprintln!(
                    "viridian: warning: the partition table of {} does not parse ({e}); \
                     exposing only disk",
                    a.image.display()
                );
            }
            false
        }
    }
}

fn spawn_background(a: &Args) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("cannot find our own executable")?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    args.push("--foreground".into());
    if a.undo && a.undo_end == UndoEnd::Ask {
        // Nobody is there to answer at unmount.
        args.push("--undo-end".into());
        args.push("discard".into());
    }
    // The server's messages go to a log file: holding our stderr open would keep anyone who
    // reads our output (a script, a test) waiting until the mount ends.
    let log_path = std::env::temp_dir().join(format!(
        "viridian-mount-{}-{}.log",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    ));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .env(LOG_ENV, &log_path)
        .process_group(0)
        .spawn()
        .context("cannot start the mount process")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if mount::mount_entry(&a.mountpoint).is_some() {
            eprintln!("{}", ready_line(a, true));
            return Ok(0);
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let _ = std::fs::remove_file(&log_path);
            let reason = log
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim_start_matches("viridian: ").to_string())
                .unwrap_or_else(|| format!("the mount process exited ({status})"));
            bail!("{reason}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "timed out waiting for {} to be mounted",
                a.mountpoint.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(clap::Args)]
pub struct UnmountArgs {
    /// Detach now even if files are open (lazy unmount).
    #[arg(short = 'z', long)]
    lazy: bool,
    /// An existing empty directory to mount on.
    mountpoint: PathBuf,
}

pub fn run_unmount(a: UnmountArgs) -> Result<i32> {
    let pid_path = pid_file(&a.mountpoint);
    let server: Option<i32> = std::fs::read_to_string(&pid_path)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    mount::unmount_with(&a.mountpoint, a.lazy)
        .with_context(|| format!("cannot unmount {}", a.mountpoint.display()))?;
    // Wait for the server to flush and close the image (it removes its pid file on exit).
    if let Some(pid) = server {
        let alive = || std::path::Path::new(&format!("/proc/{pid}")).exists();
        let deadline = Instant::now() + Duration::from_secs(30);
        while pid_path.exists() && Instant::now() < deadline {
            if !alive() {
                // A server that died without cleaning up (SIGKILL): nothing to wait for.
                let _ = std::fs::remove_file(&pid_path);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if pid_path.exists() && !a.lazy {
            bail!(
                "{} is unmounted but its server (pid {}) has not finished closing the image",
                a.mountpoint.display(),
                server.unwrap_or(0)
            );
        }
        // The server's outcome: a failed final flush means data may be lost.
        let status_path = status_file(&a.mountpoint);
        if let Ok(status) = std::fs::read_to_string(&status_path) {
            let _ = std::fs::remove_file(&status_path);
            if status.trim() != "ok" {
                bail!(
                    "{} is unmounted, but its server failed: {}",
                    a.mountpoint.display(),
                    status.trim()
                );
            }
        }
    }
    Ok(0)
}

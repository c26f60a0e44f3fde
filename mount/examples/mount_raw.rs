//! Mounts a raw image in the foreground until unmounted or SIGTERM/SIGINT (used by
//! bench/mount/run.sh; the real CLI is `viridian mount`).
//!
//! usage: mount_raw IMAGE MOUNTPOINT [--rw] [--partitions] [--threads N] [--allow-other]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use disk::{Access, BlockDevice, RawDisk};
use mount::MountOptions;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut positional: Vec<PathBuf> = Vec::new();
    let mut opts = MountOptions::default();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rw" => opts.writable = true,
            "--partitions" => opts.partitions = true,
            "--allow-other" => opts.allow_other = true,
            "--threads" => match args.next().and_then(|n| n.parse().ok()) {
                Some(n) => opts.threads = n,
                None => return usage(),
            },
            s if s.starts_with("--") => return usage(),
            _ => positional.push(a.into()),
        }
    }
    let [image, mountpoint] = positional.as_slice() else {
        return usage();
    };
    let access = if opts.writable {
        Access::ReadWrite
    } else {
        Access::ReadOnly
    };
    let disk: Arc<dyn BlockDevice> = match RawDisk::open(image, access) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("mount_raw: {e}");
            return ExitCode::FAILURE;
        }
    };
    match mount::run_foreground(disk, mountpoint, &opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mount_raw: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: mount_raw IMAGE MOUNTPOINT [--rw] [--partitions] [--threads N] [--allow-other]"
    );
    ExitCode::from(2)
}

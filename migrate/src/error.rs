//! The errors of a migration: every message names the file or drive it is about, so the CLI
//! only adds the program name.

use std::path::PathBuf;

use crate::paths::PathMapError;
use crate::vmc::VmcError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Large causes are boxed to keep `Result<T, Error>` small.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}", .path.display())]
    ReadVmc {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a readable .vmc", .path.display())]
    BadVmc {
        path: PathBuf,
        #[source]
        source: VmcError,
    },
    #[error("--path-map {spec:?}")]
    PathMap {
        spec: String,
        #[source]
        problem: PathMapError,
    },
    /// No candidate file exists for a hard disk the `.vmc` names.
    #[error(
        "disk {drive} of VM {vm:?} is missing: the .vmc names {named:?}; tried {}{}",
        tried_list(.tried),
        path_map_hint(*.suggest_path_map)
    )]
    DiskMissing {
        /// `ide 0:0`.
        drive: String,
        vm: String,
        named: String,
        tried: Vec<String>,
        /// The `.vmc` names a Windows path and no `--path-map` was given.
        suggest_path_map: bool,
    },
    #[error("disk {drive} ({}): cannot open it or its parent chain", .path.display())]
    OpenDisk {
        drive: String,
        path: PathBuf,
        #[source]
        source: Box<disk::Error>,
    },
    #[error("cannot read undo disk {}", .path.display())]
    ReadUndo {
        path: PathBuf,
        #[source]
        source: disk::Error,
    },
    #[error("{} is not a differencing VHD", .path.display())]
    NotDifferencing { path: PathBuf },
    #[error(
        "disk {drive} ({source_disk}) has {} undo disks claiming it as parent: {}; move the stale ones out of the way",
        .undo_disks.len(),
        .undo_disks.join(", ")
    )]
    AmbiguousUndo {
        drive: String,
        source_disk: String,
        undo_disks: Vec<String>,
    },
    #[error("undo disk {} does not fit its disk {source_disk}", .path.display())]
    UndoMismatch {
        path: PathBuf,
        source_disk: String,
        #[source]
        source: Box<disk::Error>,
    },
    #[error("cannot read the allocation of {source_disk}")]
    Allocation {
        source_disk: String,
        #[source]
        source: disk::Error,
    },
    #[error("target {} exists and is not a directory", .target.display())]
    TargetNotDirectory { target: PathBuf },
    #[error(
        "target directory {} already has {}: refusing to overwrite; choose another --to or move them",
        .target.display(),
        .existing.join(", ")
    )]
    TargetHasOutputs {
        target: PathBuf,
        existing: Vec<String>,
    },
    #[error(
        "pending undo disk {}: choose --merge-undo (keep the changes) or --discard-undo (drop them)",
        .pending.join(", ")
    )]
    UndoUndecided { pending: Vec<String> },
    #[error("cannot read the free space of {}", .path.display())]
    FreeSpace {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "not enough room in {}: the migration needs about {} ({need} bytes), only {} ({avail} bytes) is free",
        .dir.display(),
        disk::human_size(*.need),
        disk::human_size(*.avail)
    )]
    NoRoom { dir: PathBuf, need: u64, avail: u64 },
    #[error("internal error: the disk has no opened view")]
    NoView,
    #[error("{} would have {size} bytes, not the guest's {guest_size}; nothing converted", .path.display())]
    WrongSize {
        path: PathBuf,
        size: u64,
        guest_size: u64,
    },
    #[error("cannot create {}", .path.display())]
    CreateImage {
        path: PathBuf,
        #[source]
        source: disk::Error,
    },
    #[error("cannot remove {} to retry", .path.display())]
    RemoveRetry {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot convert {source_disk} to {}", .path.display())]
    Convert {
        source_disk: String,
        path: PathBuf,
        #[source]
        source: Box<disk::Error>,
    },
    #[error("cannot finish writing {}", .path.display())]
    Finish {
        path: PathBuf,
        #[source]
        source: disk::Error,
    },
    /// Creating the target directory or a new file in it.
    #[error("cannot create {}", .path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("interrupted")]
    Interrupted,
}

fn tried_list(tried: &[String]) -> String {
    if tried.is_empty() {
        "nothing".into()
    } else {
        tried.join(", ")
    }
}

fn path_map_hint(suggest: bool) -> &'static str {
    if suggest {
        " (map its Windows folder with --path-map 'C:\\dir=/local/dir')"
    } else {
        ""
    }
}

/// An error and its causes on one line, each cause once (for report text, where the CLI's
/// formatting is not at hand).
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(c) = cur {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            match parts.last_mut() {
                Some(last) if s.starts_with(last.as_str()) => *last = s,
                _ => parts.push(s),
            }
        }
        cur = c.source();
    }
    parts.join(": ").replace('\n', " ")
}

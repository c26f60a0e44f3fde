//! The one error type every block device returns.
//!
//! Format crates (vhd, vhdx) return these errors directly so that every consumer (CLI, FUSE, NBD,
//! storvsc) can match on the same variants. Messages name the structure, the field, the file
//! offset and the expected value where that is known.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error, with what we were doing when it happened.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// A guest/caller request outside the virtual disk.
    #[error("request at offset {offset} length {len} is outside the disk (size {size})")]
    OutOfRange { offset: u64, len: u64, size: u64 },

    /// A write to a disk opened read-only.
    #[error("disk is read-only")]
    ReadOnly,

    /// The image uses a feature this implementation does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// The image is malformed. `structure` names the on-disk structure (e.g. "VHD footer"),
    /// `offset` is its file offset.
    #[error("corrupt image: {structure} at offset {offset:#x}: {detail}")]
    Corrupt {
        structure: &'static str,
        offset: u64,
        detail: String,
    },

    /// The file is not in the format we tried to open it as.
    #[error("not a {format} image: {detail}")]
    WrongFormat {
        format: &'static str,
        detail: String,
    },

    /// A differencing disk's parent could not be found.
    #[error(
        "parent of {child} not found (parent name {name:?}); tried: {}{}",
        display_paths(tried),
        display_unusable(unusable)
    )]
    ParentNotFound {
        child: PathBuf,
        name: String,
        tried: Vec<PathBuf>,
        /// Candidates that exist but are not regular files, with what they are (a locator is
        /// data of the child, so it may name only a regular file).
        unusable: Box<[(PathBuf, &'static str)]>,
    },

    /// The file found at the parent path is not the parent this child was made from.
    #[error("{parent} is not the parent of {child}: {detail}")]
    ParentMismatch {
        child: PathBuf,
        parent: PathBuf,
        detail: String,
    },

    /// A chain of parents leads back to a file already in the chain.
    #[error("parent chain of {child} loops back to {parent}")]
    ParentCycle { child: PathBuf, parent: PathBuf },

    /// Someone holds a lock on the image that this open conflicts with: a writer (for any
    /// open), or a reader (for a write). It may be another process or this one (another open
    /// of the same file), so the message claims no more than that.
    #[error("{path} is in use (locked)")]
    Locked { path: PathBuf },

    /// A write to a raw image whose format was probed (not stated) that would make the next
    /// probe see another format (a VHD footer, a VHDX identifier): refused, like qemu does.
    #[error(
        "write at offset {offset} refused: {detail}; the format of this image was probed as raw, \
         so data that would make it probe as another format is not written (state the format \
         explicitly, e.g. -f raw or format=raw, to allow it)"
    )]
    ProbedRawGuard { offset: u64, detail: String },

    /// A bad argument from the caller (size, block size, option value).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

fn display_unusable(found: &[(PathBuf, &'static str)]) -> String {
    found
        .iter()
        .map(|(p, what)| {
            format!(
                "; {} is {what}, and a locator may name only a regular file",
                p.display()
            )
        })
        .collect()
}

fn display_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "(no candidate paths)".to_string();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Error {
    /// Wraps an I/O error with a short description of the operation.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn corrupt(structure: &'static str, offset: u64, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            structure,
            offset,
            detail: detail.into(),
        }
    }

    /// The errno-style code for protocol servers (NBD, SCSI sense mapping, FUSE).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::OutOfRange { .. } => libc::EINVAL,
            Error::ReadOnly => libc::EROFS,
            Error::Unsupported(_) => libc::EOPNOTSUPP,
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::Locked { .. } => libc::EBUSY,
            Error::ParentNotFound { .. } => libc::ENOENT,
            Error::ProbedRawGuard { .. } => libc::EPERM,
            _ => libc::EIO,
        }
    }
}

/// Adds context to `std::io::Result`.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}

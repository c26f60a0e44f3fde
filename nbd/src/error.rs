//! Errors of the server API (configuration, binding, shutdown) and of one connection.

use std::io;
use std::path::PathBuf;

/// What can go wrong setting up, running or stopping a server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `Server::new` was given no exports.
    #[error("no exports to serve")]
    NoExports,

    /// Two exports share a name.
    #[error("export name {0:?} is used twice")]
    DuplicateExport(String),

    /// A name or description over the protocol's 4096-byte string limit, or with a NUL.
    #[error("export {name:?}: {what} must be at most 4096 bytes without NUL characters")]
    BadString { name: String, what: &'static str },

    /// `writable` was asked for an export whose disk was opened read-only.
    #[error("export {0:?} is writable but its disk is read-only (open the image read-write)")]
    ReadOnlyDisk(String),

    /// A configuration value out of range.
    #[error("invalid server configuration: {0}")]
    Config(String),

    /// The Unix socket path is held by a live server, or is not a socket.
    #[error("cannot listen on {path}: {reason}")]
    SocketPath { path: PathBuf, reason: String },

    /// An operating-system error, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// Flushing or closing an export's disk at shutdown failed.
    #[error("closing export {name:?}: {source}")]
    Close {
        name: String,
        #[source]
        source: disk::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Why one connection ended early. Never crosses the public API: connection errors are
/// logged (when verbose) and the connection is closed; other clients are unaffected.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The client broke a MUST of the protocol; we hard-disconnect.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

pub(crate) type ConnResult<T> = Result<T, ConnError>;

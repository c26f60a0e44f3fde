//! An NBD (Network Block Device) server for any [`disk::BlockDevice`].
//!
//! # Protocol
//!
//! Fixed newstyle handshake only (no oldstyle, no TLS). Options: `NBD_OPT_GO`, `NBD_OPT_INFO`
//! (with `NBD_INFO_EXPORT`, `NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`, `NBD_INFO_BLOCK_SIZE`),
//! `NBD_OPT_LIST`, `NBD_OPT_ABORT`, `NBD_OPT_EXPORT_NAME`, `NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` with the `base:allocation` context.
//! Anything else is answered with `NBD_REP_ERR_UNSUP`. Extended headers are not offered.
//!
//! Commands: `READ` (structured replies send `OFFSET_HOLE` chunks for ranges the merged view
//! reports as zero or unallocated), `WRITE`, `FLUSH`, `TRIM`, `CACHE` (a no-op),
//! `WRITE_ZEROES` (`NO_HOLE`, `FAST_ZERO`), `BLOCK_STATUS` and `DISC`. `FUA` flushes the disk
//! after the command and before the reply.
//!
//! Block sizes advertised: minimum 1 (every [`disk::BlockDevice`] accepts unaligned I/O),
//! preferred `max(4096, physical sector)`, maximum payload [`ServerConfig::max_request`]
//! (32 MiB by default).
//!
//! # Exports
//!
//! Each [`Export`] has a name; the empty name selects the export literally named `""` if there
//! is one, else the first export. Exports are read-only unless [`Export::writable`] is set (the
//! disk must then be writable).
//!
//! # Multi-conn
//!
//! `NBD_FLAG_CAN_MULTI_CONN` is advertised (unless [`ServerConfig::multi_conn`] is off) because
//! every connection to an export uses the *same* `disk::Disk`: there is no
//! per-connection cache. A write that has been replied to is in the shared disk object, so any
//! later read on any connection sees it, and `BlockDevice::flush` ("makes all completed writes
//! durable") called for `FLUSH`/`FUA` on one connection covers writes completed on every
//! connection. That is exactly the condition the spec sets for the flag. Turn it off only for a
//! `BlockDevice` that breaks the trait's contract (per-caller caches).
//!
//! # Errors and hostile clients
//!
//! | client does | server answers |
//! |---|---|
//! | bad option or request magic, unknown client flags | hard disconnect (that connection only) |
//! | unknown option; STARTTLS | `NBD_REP_ERR_UNSUP`; `NBD_REP_ERR_POLICY` |
//! | malformed option data | `NBD_REP_ERR_INVALID` |
//! | option data over 64 KiB | `NBD_REP_ERR_TOO_BIG` (data skipped up to 1 MiB, else disconnect) |
//! | unknown export | `NBD_REP_ERR_UNKNOWN` (GO/INFO/meta); disconnect (EXPORT_NAME) |
//! | handshake not done within [`ServerConfig::handshake_timeout`] | disconnect |
//! | READ over [`ServerConfig::max_request`] | `EOVERFLOW` (structured), `EINVAL` (simple) |
//! | WRITE over `max_request` | payload drained, `EINVAL` |
//! | range past the end | `EINVAL` (READ/TRIM/CACHE/BLOCK_STATUS), `ENOSPC` (WRITE/WRITE_ZEROES) |
//! | WRITE/TRIM/WRITE_ZEROES on a read-only export | `EPERM` (payload drained) |
//! | unknown command or command flag; BLOCK_STATUS without a context | `EINVAL` |
//! | FAST_ZERO together with NO_HOLE | `ENOTSUP` at once (zeroing without holes writes zeros) |
//! | connection beyond [`ServerConfig::max_connections`] | closed before the greeting |
//! | disk implementation panics | `EIO` for that request; the connection goes on |
//!
//! `FAST_ZERO` without `NO_HOLE` is served with `write_zeroes(may_unmap)`, i.e. treated as fast
//! because formats deallocate (punch holes, unmap blocks) for it.
//!
//! # Shutdown
//!
//! [`ShutdownHandle::shutdown`] stops the accept loop; every connection's reading side is then
//! closed, so each finishes the requests already read and sends their replies. After
//! [`ServerConfig::shutdown_grace`] stragglers (clients not reading their replies) are cut off.
//! Finally every export's disk gets [`disk::BlockDevice::close`] (which flushes) and
//! [`BoundServer::run`] returns, removing the Unix socket file.
//!
//! # Concurrency model
//!
//! Plain threads, no async runtime: every `BlockDevice` call is synchronous (pread/pwrite and
//! format metadata locks), so an async runtime would only wrap each call in `spawn_blocking`.
//! Per connection there is one reader thread (parses requests, reads write payloads, validates)
//! and a pool of [`ServerConfig::workers_per_connection`] worker threads that do the disk I/O
//! and write each complete reply under a mutex, so requests run concurrently and replies go
//! out in completion order. In-flight requests and bytes per connection are bounded, so a
//! client that pipelines without reading replies gets back-pressure, not unbounded memory use.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! let disk = disk::RawDisk::open("disk.raw".as_ref(), disk::Access::ReadOnly).unwrap();
//! let export = nbd::Export::new("disk", Arc::new(disk));
//! let server = nbd::Server::new(vec![export], nbd::ServerConfig::default()).unwrap();
//! let bound = server.bind(&nbd::Listen::Tcp("127.0.0.1:10809".parse().unwrap())).unwrap();
//! let stop = bound.shutdown_handle();
//! // e.g. from a signal-handling thread: stop.shutdown();
//! bound.run().unwrap(); // returns after shutdown, with in-flight requests finished and disks closed
//! ```

// unsafe only for socket calls std has no wrapper for (poll, setsockopt, send with
// MSG_NOSIGNAL), each with a SAFETY comment.
#![deny(unsafe_op_in_unsafe_fn)]

mod conn;
mod error;
mod handshake;
mod proto;
mod server;
mod stream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use error::Error;
pub use server::{BoundServer, RunningServer, Server, ShutdownHandle};

/// One named disk a client can connect to.
#[derive(Clone, Debug)]
pub struct Export {
    /// Export name as clients give it (`nbd+unix:///NAME?socket=...`). At most 4096 bytes.
    pub name: String,
    /// Free text shown by `nbdinfo` (`NBD_INFO_DESCRIPTION`); may be empty.
    pub description: String,
    pub disk: disk::Disk,
    /// Allow WRITE/TRIM/WRITE_ZEROES. `Server::new` refuses a writable export over a read-only
    /// disk ([`Error::ReadOnlyDisk`]).
    pub writable: bool,
}

impl Export {
    /// A read-only export without description.
    pub fn new(name: impl Into<String>, disk: impl Into<disk::Disk>) -> Self {
        Export {
            name: name.into(),
            description: String::new(),
            disk: disk.into(),
            writable: false,
        }
    }

    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.description = d.into();
        self
    }

    pub fn writable(mut self, w: bool) -> Self {
        self.writable = w;
        self
    }
}

/// Limits and behaviour. `Default` gives sensible values for a local server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Connections served at once; further ones are accepted and closed at once.
    pub max_connections: usize,
    /// Largest READ/WRITE payload accepted (advertised as the maximum block size). 32 MiB.
    pub max_request: u32,
    /// Worker threads per connection doing disk I/O concurrently.
    pub workers_per_connection: usize,
    /// Requests in flight per connection before the reader stops reading new ones.
    pub max_inflight_requests: usize,
    /// Payload bytes (write data and read buffers) in flight per connection. At least
    /// `max_request`.
    pub max_inflight_bytes: u64,
    /// A client must finish option negotiation within this time.
    pub handshake_timeout: Duration,
    /// On shutdown, connections get this long to finish in-flight requests after their reading
    /// side is closed; then their sockets are closed for writing too.
    pub shutdown_grace: Duration,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN` (see the crate documentation for why it is safe).
    pub multi_conn: bool,
    /// Print connection events and errors on stderr.
    pub verbose: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 64,
            max_request: 32 << 20,
            workers_per_connection: 8,
            max_inflight_requests: 128,
            max_inflight_bytes: 64 << 20,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            multi_conn: true,
            verbose: false,
        }
    }
}

/// The IANA port for NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where to listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A Unix-domain socket at this path. A stale socket file (nobody listening) is replaced;
    /// the file is removed when the server stops.
    Unix(PathBuf),
    /// A TCP address; port 0 picks a free port ([`BoundServer::local_addr`] tells which).
    Tcp(SocketAddr),
}

impl Listen {
    /// The NBD URI (as nbdinfo, nbdcopy and qemu-img take it) of `export` on this address:
    /// `nbd://HOST:PORT/NAME` or `nbd+unix:///NAME?socket=PATH`. A wildcard TCP address is
    /// written as loopback.
    pub fn uri(&self, export: &str) -> String {
        match self {
            Listen::Tcp(a) => {
                let ip = match a.ip() {
                    std::net::IpAddr::V4(v) if v.is_unspecified() => "127.0.0.1".to_string(),
                    std::net::IpAddr::V4(v) => v.to_string(),
                    std::net::IpAddr::V6(v) if v.is_unspecified() => "[::1]".to_string(),
                    std::net::IpAddr::V6(v) => format!("[{v}]"),
                };
                format!("nbd://{ip}:{}/{}", a.port(), uri_escape(export.as_bytes()))
            }
            Listen::Unix(p) => {
                use std::os::unix::ffi::OsStrExt;
                format!(
                    "nbd+unix:///{}?socket={}",
                    uri_escape(export.as_bytes()),
                    uri_escape(p.as_os_str().as_bytes())
                )
            }
        }
    }
}

/// Percent-encodes everything but unreserved characters and '/'.
fn uri_escape(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len());
    for &c in b {
        if c.is_ascii_alphanumeric() || b"-._~/".contains(&c) {
            s.push(c as char);
        } else {
            s.push_str(&format!("%{c:02X}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let t = Listen::Tcp("0.0.0.0:10809".parse().unwrap());
        assert_eq!(t.uri("disk"), "nbd://127.0.0.1:10809/disk");
        let u = Listen::Unix("/tmp/a b.sock".into());
        assert_eq!(
            u.uri("my disk"),
            "nbd+unix:///my%20disk?socket=/tmp/a%20b.sock"
        );
        assert_eq!(u.uri(""), "nbd+unix:///?socket=/tmp/a%20b.sock");
    }
}

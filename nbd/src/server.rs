//! Listening, accepting, connection bookkeeping and orderly shutdown.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::stream::Stream;
use crate::{Error, Export, Listen, ServerConfig};

/// An export as the connections see it.
#[derive(Debug)]
pub(crate) struct ExportEntry {
    pub name: String,
    pub description: String,
    pub disk: disk::Disk,
    pub writable: bool,
}

/// State shared by the accept loop, every connection and the shutdown handles.
#[derive(Debug)]
pub(crate) struct Shared {
    pub exports: Vec<ExportEntry>,
    pub config: ServerConfig,
    pub stopping: AtomicBool,
    conns: Mutex<HashMap<u64, Stream>>,
    conns_cv: Condvar,
    /// The first failed write or flush of each export (by index): the server then ends in an
    /// error even if the final flush succeeds (data may be lost or was never stored).
    failures: Mutex<HashMap<usize, String>>,
}

impl Shared {
    /// The export a client's name selects: an exact match, or for "" the first export.
    pub fn find_export(&self, name: &[u8]) -> Option<usize> {
        if let Some(i) = self.exports.iter().position(|e| e.name.as_bytes() == name) {
            return Some(i);
        }
        if name.is_empty() && !self.exports.is_empty() {
            return Some(0);
        }
        None
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Remembers that a write or flush of export `export` failed (the first message is kept).
    pub fn record_failure(&self, export: usize, e: &disk::Error) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.entry(export).or_insert_with(|| e.to_string());
    }

    pub fn log(&self, msg: impl FnOnce() -> String) {
        if self.config.verbose {
            eprintln!("nbd: {}", msg());
        }
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Stream>> {
        // A panic while holding this lock cannot corrupt a HashMap of sockets; keep going.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A configured server, not yet listening.
#[derive(Debug)]
pub struct Server {
    exports: Vec<Export>,
    config: ServerConfig,
}

impl Server {
    /// Checks the exports (unique names, string limits) and the configuration.
    pub fn new(exports: Vec<Export>, config: ServerConfig) -> Result<Self, Error> {
        if exports.is_empty() {
            return Err(Error::NoExports);
        }
        for (i, e) in exports.iter().enumerate() {
            for (what, s) in [("name", &e.name), ("description", &e.description)] {
                if s.len() > 4096 || s.contains('\0') {
                    return Err(Error::BadString {
                        name: e.name.chars().take(64).collect(),
                        what,
                    });
                }
            }
            if e.writable && e.disk.read_only() {
                return Err(Error::ReadOnlyDisk(e.name.clone()));
            }
            if exports[..i].iter().any(|o| o.name == e.name) {
                return Err(Error::DuplicateExport(e.name.clone()));
            }
        }
        if !(4096..=1 << 30).contains(&config.max_request) {
            return Err(Error::Config(
                "max_request must be between 4096 and 1 GiB".into(),
            ));
        }
        if config.max_connections == 0
            || config.workers_per_connection == 0
            || config.max_inflight_requests == 0
        {
            return Err(Error::Config(
                "max_connections, workers_per_connection and max_inflight_requests must be > 0"
                    .into(),
            ));
        }
        if config.max_inflight_bytes < config.max_request as u64 {
            return Err(Error::Config(
                "max_inflight_bytes must be at least max_request".into(),
            ));
        }
        Ok(Server { exports, config })
    }

    /// Starts listening. The returned server accepts nobody until [`BoundServer::run`].
    pub fn bind(&self, listen: &Listen) -> Result<BoundServer, Error> {
        let (listener, bound_to) = match listen {
            Listen::Tcp(addr) => {
                let l = TcpListener::bind(addr)
                    .map_err(|e| Error::io(format!("cannot listen on {addr}"), e))?;
                let a = l
                    .local_addr()
                    .map_err(|e| Error::io("cannot read the bound address", e))?;
                (Listener::Tcp(l), Listen::Tcp(a))
            }
            Listen::Unix(path) => {
                remove_stale_socket(path)?;
                let l = UnixListener::bind(path)
                    .map_err(|e| Error::io(format!("cannot listen on {}", path.display()), e))?;
                (Listener::Unix(l), Listen::Unix(path.clone()))
            }
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("cannot configure the listening socket", e))?;
        let (wake_tx, wake_rx) =
            UnixStream::pair().map_err(|e| Error::io("cannot create a wake-up socket", e))?;
        for s in [&wake_tx, &wake_rx] {
            s.set_nonblocking(true)
                .map_err(|e| Error::io("cannot configure the wake-up socket", e))?;
        }
        let exports = self
            .exports
            .iter()
            .map(|e| ExportEntry {
                name: e.name.clone(),
                description: e.description.clone(),
                disk: e.disk.clone(),
                writable: e.writable,
            })
            .collect();
        let shared = Arc::new(Shared {
            exports,
            config: self.config.clone(),
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            conns_cv: Condvar::new(),
            failures: Mutex::new(HashMap::new()),
        });
        Ok(BoundServer {
            shared,
            listener,
            listen: bound_to,
            wake_tx: Arc::new(wake_tx),
            wake_rx,
        })
    }
}

/// Removes a socket file nobody listens on; refuses to touch anything else.
fn remove_stale_socket(path: &Path) -> Result<(), Error> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("cannot stat {}", path.display()), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::SocketPath {
            path: path.to_path_buf(),
            reason: "the path exists and is not a socket".into(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(Error::SocketPath {
            path: path.to_path_buf(),
            reason: "another server is listening there".into(),
        }),
        Err(_) => std::fs::remove_file(path)
            .map_err(|e| Error::io(format!("cannot remove stale socket {}", path.display()), e)),
    }
}

#[derive(Debug)]
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(nb),
            Listener::Unix(l) => l.set_nonblocking(nb),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                // Small replies (write acks, 4 KiB reads) must not wait for Nagle.
                let _ = s.set_nodelay(true);
                // A peer that vanishes without a FIN would hold its slot forever otherwise.
                crate::stream::enable_keepalive(&s);
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l) => Ok(Stream::Unix(l.accept()?.0)),
        }
    }

    fn fd(&self) -> i32 {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }
}

/// Stops a running server from any thread. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
    wake_tx: Arc<UnixStream>,
}

impl ShutdownHandle {
    /// Asks the server to stop: no new connections, in-flight requests finish, disks are
    /// flushed and closed, then [`BoundServer::run`] returns. Returns at once; idempotent.
    /// Not async-signal-safe: call it from a normal thread (e.g. a signal-handling thread such
    /// as `signal_hook::iterator::Signals` or the `ctrlc` crate's handler).
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        // The accept loop polls the other end; a full buffer already means "wake up".
        let _ = (&*self.wake_tx).write(&[1]);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shared.stopping()
    }
}

/// A server bound to its address. [`BoundServer::run`] serves until shutdown.
#[derive(Debug)]
pub struct BoundServer {
    shared: Arc<Shared>,
    listener: Listener,
    listen: Listen,
    wake_tx: Arc<UnixStream>,
    wake_rx: UnixStream,
}

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

impl BoundServer {
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: self.shared.clone(),
            wake_tx: self.wake_tx.clone(),
        }
    }

    /// The TCP address actually bound (useful with port 0); None for Unix sockets.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self.listen {
            Listen::Tcp(a) => Some(a),
            Listen::Unix(_) => None,
        }
    }

    /// Where this server listens (with the actual port when bound to port 0).
    pub fn listen(&self) -> &Listen {
        &self.listen
    }

    /// The NBD URI of `export` on this server, for messages ("serving on nbd://...").
    pub fn uri(&self, export: &str) -> String {
        self.listen().uri(export)
    }

    /// Number of client connections being served right now.
    pub fn connections(&self) -> usize {
        self.shared.conns().len()
    }

    /// Runs [`BoundServer::run`] on a new thread.
    pub fn spawn(self) -> Result<RunningServer, Error> {
        let handle = self.shutdown_handle();
        let local_addr = self.local_addr();
        let thread = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || self.run())
            .map_err(|e| Error::io("cannot start the server thread", e))?;
        Ok(RunningServer {
            handle,
            thread: Some(thread),
            local_addr,
        })
    }

    /// Accepts and serves clients until [`ShutdownHandle::shutdown`]; then stops accepting,
    /// lets connections finish their in-flight requests, flushes and closes every export's
    /// disk, and returns. Errors from one client never end this loop.
    pub fn run(self) -> Result<(), Error> {
        self.accept_loop();
        let BoundServer {
            shared,
            listener,
            listen,
            ..
        } = self;
        drop(listener);
        if let Listen::Unix(p) = &listen {
            let _ = std::fs::remove_file(p);
        }
        drain_connections(&shared);
        close_disks(&shared)
    }

    fn accept_loop(&self) {
        let mut fds = [
            libc::pollfd {
                fd: self.listener.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake_rx.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        while !self.shared.stopping() {
            // SAFETY: `fds` is a valid array of two pollfd structs that outlives the call, and
            // both descriptors stay open (owned by self) for the duration.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    self.shared.log(|| format!("poll failed: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
            if self.shared.stopping() {
                break;
            }
            if fds[0].revents != 0 {
                self.accept_ready();
            }
            if fds[1].revents != 0 {
                let mut b = [0u8; 64];
                let _ = std::io::Read::read(&mut &self.wake_rx, &mut b);
            }
        }
    }

    fn accept_ready(&self) {
        loop {
            let stream = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE, ENOBUFS...: back off a little instead of spinning; keep serving.
                    self.shared.log(|| format!("accept failed: {e}"));
                    std::thread::sleep(Duration::from_millis(20));
                    return;
                }
            };
            if stream.set_nonblocking(false).is_err() {
                continue;
            }
            let id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
            {
                let mut conns = self.shared.conns();
                if conns.len() >= self.shared.config.max_connections {
                    self.shared
                        .log(|| format!("refusing {}: connection limit reached", stream.peer()));
                    stream.shutdown(Shutdown::Both);
                    continue;
                }
                match stream.try_clone() {
                    Ok(c) => {
                        conns.insert(id, c);
                    }
                    Err(_) => continue,
                }
            }
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    // Deregisters even if the connection code panics (a buggy disk), so the
                    // slot comes back and shutdown does not wait for it forever.
                    let _slot = ConnSlot {
                        shared: &shared,
                        id,
                    };
                    let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        crate::conn::serve(&shared, stream)
                    }));
                    if r.is_err() {
                        shared.log(|| format!("connection {id} ended by a panic"));
                    }
                });
            if let Err(e) = spawned {
                self.shared
                    .log(|| format!("cannot start a connection thread: {e}"));
                if let Some(s) = self.shared.conns().remove(&id) {
                    s.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

/// Removes a connection from the registry when its thread ends, however it ends.
struct ConnSlot<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for ConnSlot<'_> {
    fn drop(&mut self) {
        let mut conns = self.shared.conns();
        if let Some(s) = conns.remove(&self.id) {
            s.shutdown(Shutdown::Both);
        }
        self.shared.conns_cv.notify_all();
    }
}

/// Closes the reading side of every connection (so readers stop after their current request),
/// waits for them to finish, and after the grace period closes the sockets entirely.
fn drain_connections(shared: &Shared) {
    for s in shared.conns().values() {
        s.shutdown(Shutdown::Read);
    }
    let deadline = Instant::now() + shared.config.shutdown_grace;
    let mut conns = shared.conns();
    while !conns.is_empty() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        conns = shared
            .conns_cv
            .wait_timeout(conns, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    for s in conns.values() {
        s.shutdown(Shutdown::Both);
    }
    while !conns.is_empty() {
        conns = shared
            .conns_cv
            .wait(conns)
            .unwrap_or_else(|e| e.into_inner());
    }
}

fn close_disks(shared: &Shared) -> Result<(), Error> {
    let mut first_err = None;
    let mut seen: Vec<&disk::Disk> = Vec::new();
    let failures = std::mem::take(&mut *shared.failures.lock().unwrap_or_else(|p| p.into_inner()));
    for (i, e) in shared.exports.iter().enumerate() {
        if seen.iter().any(|d| d.same_disk(&e.disk)) {
            continue;
        }
        seen.push(&e.disk);
        let closed = e.disk.close().and_then(|()| match failures.get(&i) {
            Some(msg) => Err(disk::Error::io(
                format!("a write or flush failed while serving ({msg})"),
                io::Error::from_raw_os_error(libc::EIO),
            )),
            None => Ok(()),
        });
        if let Err(err) = closed {
            if first_err.is_none() {
                first_err = Some(Error::Close {
                    name: e.name.clone(),
                    source: err,
                });
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// A server running on its own thread (from [`BoundServer::spawn`]).
#[derive(Debug)]
pub struct RunningServer {
    handle: ShutdownHandle,
    thread: Option<JoinHandle<Result<(), Error>>>,
    local_addr: Option<SocketAddr>,
}

impl RunningServer {
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Shuts down and waits for the server thread.
    pub fn stop(mut self) -> Result<(), Error> {
        self.handle.shutdown();
        self.join_thread()
    }

    /// Waits for the server to end (after someone calls shutdown on a handle).
    pub fn wait(mut self) -> Result<(), Error> {
        self.join_thread()
    }

    fn join_thread(&mut self) -> Result<(), Error> {
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| {
                Err(Error::io(
                    "server thread",
                    io::Error::other("the server thread panicked"),
                ))
            }),
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.handle.shutdown();
            let _ = self.join_thread();
        }
    }
}

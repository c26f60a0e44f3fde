//! The control socket: a QMP-shaped protocol (JSON lines over a Unix socket) so existing QMP
//! clients can drive a running VM. The schema is in docs/qmp.md.
//!
//! This module is the protocol only: greeting, capability negotiation, request parsing and
//! argument checking into a typed [`Command`], replies, errors and events. What a command does
//! is up to the [`Machine`] it is given (the VMM's is in `control.rs`).
//!
//! One client at a time; a second one gets an error and is closed. A request line longer than
//! [`MAX_LINE`] is answered with an error and skipped. Nothing a client sends stops the VM
//! except `quit`.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::strict_json::StrictValue;

/// Longest request line accepted (bytes, without the newline).
pub const MAX_LINE: usize = 64 * 1024;
/// How often the server looks for events, new clients and the end of the VM.
const POLL: Duration = Duration::from_millis(20);

/// A QMP error: `{"error": {"class", "desc"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: &'static str,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }
    pub fn not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: "DeviceNotFound",
            desc: desc.into(),
        }
    }
    fn command_not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: "CommandNotFound",
            desc: desc.into(),
        }
    }
    fn to_json(&self) -> Value {
        json!({"error": {"class": self.class, "desc": self.desc}})
    }
}

/// The kind of SCSI LUN `device_add` creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// A disk (`scsi-hd`).
    Disk,
    /// A DVD drive (`scsi-cd`).
    Cdrom,
}

/// `device_add` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAdd {
    pub driver: Driver,
    pub id: String,
    pub lun: u8,
    /// Required for a disk; a DVD drive without one starts empty.
    pub file: Option<PathBuf>,
    pub format: Option<String>,
    pub read_only: bool,
    /// Open a disk in undo mode: the guest's writes go to a child; `device_del` (or the end of
    /// the VM) discards, commits or keeps them.
    pub undo: bool,
}

/// How a hot-plugged undo LUN's session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UndoEnd {
    /// Throw the guest's writes away (the image is as before).
    #[default]
    Discard,
    /// Merge them into the image.
    Commit,
    /// Leave the child file for a later `viridian undo commit|discard`.
    Keep,
}

impl UndoEnd {
    pub fn parse(s: &str) -> Option<UndoEnd> {
        match s {
            "discard" => Some(UndoEnd::Discard),
            "commit" => Some(UndoEnd::Commit),
            "keep" => Some(UndoEnd::Keep),
            _ => None,
        }
    }
}

/// A request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    QueryStatus,
    QueryBlock,
    QueryVersion,
    QueryCommands,
    DeviceAdd(DeviceAdd),
    DeviceDel {
        id: String,
        /// For an undo LUN: what happens to the guest's writes (default discard).
        undo_end: Option<UndoEnd>,
    },
    ChangeMedium {
        id: String,
        file: PathBuf,
        format: Option<String>,
        force: bool,
    },
    Eject {
        id: String,
        force: bool,
    },
    Stop,
    Cont,
    SystemPowerdown,
    Quit,
}

/// Every command name, for `query-commands` and for the CLI client.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-status",
    "query-block",
    "query-version",
    "query-commands",
    "device_add",
    "device_del",
    "blockdev-change-medium",
    "eject",
    "stop",
    "cont",
    "system_powerdown",
    "quit",
];

/// What the protocol drives.
pub trait Machine: Send + Sync {
    /// Carries out one command; the value is the reply's `return`.
    fn run(&self, cmd: Command) -> Result<Value, QmpError>;
    /// Called every few tens of milliseconds while a client listens: emit events for what
    /// happened meanwhile (tray moved by the guest, I/O errors).
    fn tick(&self) {}
}

/// Arguments of one request, taken one by one so that leftovers are reported.
struct Args(Map<String, Value>);

impl Args {
    fn str(&mut self, key: &str) -> Result<Option<String>, QmpError> {
        match self.0.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{key}', expected: string"
            ))),
        }
    }
    fn req_str(&mut self, key: &str) -> Result<String, QmpError> {
        self.str(key)?
            .ok_or_else(|| QmpError::generic(format!("Parameter '{key}' is missing")))
    }
    fn bool(&mut self, key: &str) -> Result<bool, QmpError> {
        match self.0.remove(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(b),
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{key}', expected: boolean"
            ))),
        }
    }
    fn lun(&mut self) -> Result<u8, QmpError> {
        match self.0.remove("lun") {
            // 3.0 is a JSON number but not an integer: a type error, as for "3".
            Some(Value::Number(n)) if n.is_f64() => Err(QmpError::generic(
                "Invalid parameter type for 'lun', expected: integer",
            )),
            Some(Value::Number(n)) => n
                .as_u64()
                .filter(|&l| l <= u64::from(storvsc_backend::scsi::MAX_LUN))
                .map(|l| l as u8)
                .ok_or_else(|| {
                    QmpError::generic(format!(
                        "Parameter 'lun' must be 0..={}",
                        storvsc_backend::scsi::MAX_LUN
                    ))
                }),
            None => Err(QmpError::generic("Parameter 'lun' is missing")),
            Some(_) => Err(QmpError::generic(
                "Invalid parameter type for 'lun', expected: integer",
            )),
        }
    }
    /// The device id: `id`, or `device` as older QMP clients name it.
    fn id(&mut self) -> Result<String, QmpError> {
        let id = self.str("id")?;
        let device = self.str("device")?;
        match (id, device) {
            (Some(i), None) | (None, Some(i)) => Ok(i),
            (Some(_), Some(_)) => Err(QmpError::generic("give 'id' or 'device', not both")),
            (None, None) => Err(QmpError::generic("Parameter 'id' is missing")),
        }
    }
    fn done(self) -> Result<(), QmpError> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
        }
    }
}

fn check_id(id: &str) -> Result<(), QmpError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if ok {
        Ok(())
    } else {
        Err(QmpError::generic(format!(
            "Parameter 'id' expects an identifier (a letter, then letters, digits, '-', '.', '_'; at most 64): {id:?}"
        )))
    }
}

/// Parses one command with its arguments.
pub fn parse_command(name: &str, args: Map<String, Value>) -> Result<Command, QmpError> {
    let mut a = Args(args);
    let cmd = match name {
        "query-status" => Command::QueryStatus,
        "query-block" => Command::QueryBlock,
        "query-version" => Command::QueryVersion,
        "query-commands" => Command::QueryCommands,
        "stop" => Command::Stop,
        "cont" => Command::Cont,
        "system_powerdown" => Command::SystemPowerdown,
        "quit" => Command::Quit,
        "device_add" => {
            let driver = match a.req_str("driver")?.as_str() {
                "scsi-hd" => Driver::Disk,
                "scsi-cd" => Driver::Cdrom,
                other => {
                    return Err(QmpError::generic(format!(
                        "'driver' must be 'scsi-hd' or 'scsi-cd', not {other:?}"
                    )))
                }
            };
            let id = a.req_str("id")?;
            check_id(&id)?;
            let lun = a.lun()?;
            let file = a.str("file")?.map(PathBuf::from);
            let format = a.str("format")?;
            let read_only = a.bool("read-only")?;
            let undo = a.bool("undo")?;
            if driver == Driver::Disk && file.is_none() {
                return Err(QmpError::generic("Parameter 'file' is missing"));
            }
            if undo && (driver == Driver::Cdrom || read_only) {
                return Err(QmpError::generic(
                    "'undo' is for writable disks (scsi-hd without read-only)",
                ));
            }
            Command::DeviceAdd(DeviceAdd {
                driver,
                id,
                lun,
                file,
                format,
                read_only: read_only || driver == Driver::Cdrom,
                undo,
            })
        }
        "device_del" => {
            let id = a.id()?;
            let undo_end = match a.str("undo-end")? {
                None => None,
                Some(s) => Some(UndoEnd::parse(&s).ok_or_else(|| {
                    QmpError::generic(format!(
                        "'undo-end' must be 'discard', 'commit' or 'keep', not {s:?}"
                    ))
                })?),
            };
            Command::DeviceDel { id, undo_end }
        }
        "blockdev-change-medium" => {
            let id = a.id()?;
            let file = PathBuf::from(a.req_str("filename")?);
            let format = a.str("format")?;
            let force = a.bool("force")?;
            Command::ChangeMedium {
                id,
                file,
                format,
                force,
            }
        }
        "eject" => {
            let id = a.id()?;
            let force = a.bool("force")?;
            Command::Eject { id, force }
        }
        other => {
            return Err(QmpError::command_not_found(format!(
                "The command {other} has not been found"
            )))
        }
    };
    a.done()?;
    Ok(cmd)
}

/// The greeting sent to each client.
pub fn greeting() -> Value {
    let (major, minor, micro) = version();
    json!({"QMP": {
        "version": {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": format!("viridian {}", env!("CARGO_PKG_VERSION")),
        },
        "capabilities": [],
    }})
}

fn version() -> (u64, u64, u64) {
    let mut v = env!("CARGO_PKG_VERSION")
        .split('.')
        .map(|p| p.parse::<u64>().unwrap_or(0));
    (
        v.next().unwrap_or(0),
        v.next().unwrap_or(0),
        v.next().unwrap_or(0),
    )
}

/// Microseconds-resolution event timestamp.
fn timestamp() -> Value {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({"seconds": t.as_secs(), "microseconds": t.subsec_micros()})
}

/// One client's protocol state.
#[derive(Debug, Default)]
pub struct Session {
    negotiated: bool,
}

impl Session {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `qmp_capabilities` was accepted (events flow only then).
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Answers one request line.
    pub fn handle_line(&mut self, line: &[u8], machine: &dyn Machine) -> Value {
        // Parsed strictly: a key given twice (at any depth) is refused, as QEMU does, rather
        // than the last one silently winning.
        let req: Value = match serde_json::from_slice::<StrictValue>(line) {
            Ok(v) => v.0,
            Err(e) if e.classify() == serde_json::error::Category::Data => {
                return QmpError::generic(e.to_string()).to_json()
            }
            Err(e) => return QmpError::generic(format!("JSON parse error, {e}")).to_json(),
        };
        let Value::Object(mut req) = req else {
            return QmpError::generic("QMP input must be a JSON object").to_json();
        };
        let id = req.remove("id");
        let reply = |r: Result<Value, QmpError>| -> Value {
            let mut v = match r {
                Ok(ret) => json!({ "return": ret }),
                Err(e) => e.to_json(),
            };
            if let Some(id) = &id {
                v["id"] = id.clone();
            }
            v
        };
        let name = match req.remove("execute") {
            Some(Value::String(s)) => s,
            Some(_) => {
                return reply(Err(QmpError::generic(
                    "QMP input member 'execute' must be a string",
                )))
            }
            None => return reply(Err(QmpError::generic("QMP input lacks member 'execute'"))),
        };
        let args = match req.remove("arguments") {
            None => Map::new(),
            Some(Value::Object(m)) => m,
            Some(_) => {
                return reply(Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                )))
            }
        };
        if let Some(k) = req.keys().next() {
            return reply(Err(QmpError::generic(format!(
                "QMP input member '{k}' is unexpected"
            ))));
        }
        if name == "qmp_capabilities" {
            if self.negotiated {
                return reply(Err(QmpError::command_not_found(
                    "Capabilities negotiation is already complete, command ignored",
                )));
            }
            if let Err(e) = check_capabilities(args) {
                return reply(Err(e));
            }
            self.negotiated = true;
            return reply(Ok(json!({})));
        }
        if !self.negotiated {
            return reply(Err(QmpError::command_not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            )));
        }
        let r = parse_command(&name, args).and_then(|c| match c {
            Command::QueryCommands => Ok(Value::Array(
                COMMANDS.iter().map(|n| json!({ "name": n })).collect(),
            )),
            Command::QueryVersion => Ok(greeting()["QMP"]["version"].clone()),
            c => machine.run(c),
        });
        reply(r)
    }
}

/// `qmp_capabilities` arguments: QEMU's optional `enable`, a list of capabilities to turn on.
/// The greeting offers none, so any name in it is refused (QEMU: `oob` is known but not
/// available here; other names are not capabilities at all).
fn check_capabilities(args: Map<String, Value>) -> Result<(), QmpError> {
    let mut a = Args(args);
    let enable = a.0.remove("enable");
    a.done()?;
    match enable {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(names)) => match names.first() {
            None => Ok(()),
            Some(Value::String(n)) if n == "oob" => {
                Err(QmpError::generic("Capability 'oob' not available"))
            }
            Some(Value::String(n)) => Err(QmpError::generic(format!(
                "Parameter 'enable' does not accept value '{n}'"
            ))),
            Some(_) => Err(QmpError::generic(
                "Invalid parameter type for 'enable[0]', expected: string",
            )),
        },
        Some(_) => Err(QmpError::generic(
            "Invalid parameter type for 'enable', expected: array",
        )),
    }
}

/// Asynchronous events waiting for the client (dropped when no client is connected, as QMP
/// does; bounded so a stuck client cannot grow it without limit).
#[derive(Debug, Default)]
pub struct Events {
    queue: Mutex<VecDeque<Value>>,
    listening: AtomicBool,
}

const MAX_QUEUED_EVENTS: usize = 1024;

impl Events {
    pub fn emit(&self, event: &str, data: Value) {
        if !self.listening.load(Ordering::Acquire) {
            return;
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= MAX_QUEUED_EVENTS {
            q.pop_front();
        }
        q.push_back(json!({"event": event, "data": data, "timestamp": timestamp()}));
    }

    fn take(&self) -> Vec<Value> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.drain(..).collect()
    }
}

/// A running control socket.
pub struct QmpServer {
    path: PathBuf,
    /// (device, inode) of our socket, so that the end removes only ours.
    ident: (u64, u64),
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl QmpServer {
    /// Listens on `path`. A socket already there that answers belongs to a running VM and is
    /// an error; a stale one (nobody listening) is replaced; any other file is an error. The
    /// socket has mode 0600 from the moment it appears at `path`.
    pub fn start(
        path: &Path,
        machine: Arc<dyn Machine>,
        events: Arc<Events>,
    ) -> std::io::Result<QmpServer> {
        check_path(path)?;
        let (listener, ident) = bind_private(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("qmp".into())
            .spawn(move || serve(listener, machine, events, s))?;
        Ok(QmpServer {
            path: path.to_path_buf(),
            ident,
            stop,
            thread: Some(thread),
        })
    }

    /// Sends what is queued (final events), closes the client and removes the socket if it
    /// is still ours (another VM may have replaced it after ours went stale).
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.ident) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Checks `path` before the VM starts, so a bad `--qmp` is refused up front: its directory
/// exists, the socket's name fits (with the private directory it is bound in first), and the
/// path is free or a stale socket.
pub fn check_path(path: &Path) -> std::io::Result<()> {
    let dir = parent_dir(path);
    if path.file_name().is_none() {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            format!("{}: not a socket file name", path.display()),
        ));
    }
    if !std::fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
        return Err(std::io::Error::new(
            ErrorKind::NotFound,
            format!(
                "{}: directory {} does not exist",
                path.display(),
                dir.display()
            ),
        ));
    }
    // sun_path holds 108 bytes with the final NUL.
    let longest = private_dir(dir, u64::MAX).join("s").as_os_str().len();
    if longest.max(path.as_os_str().len()) > 107 {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{}: path too long for a socket (keep it, and its directory plus 40 bytes, \
                 within 107 bytes)",
                path.display()
            ),
        ));
    }
    check_socket_path(path)
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn private_dir(dir: &Path, serial: u64) -> PathBuf {
    dir.join(format!(".qmp-{}-{serial}", std::process::id()))
}

/// Whether `path` may be taken for a new socket: free, or a socket nobody listens on.
fn check_socket_path(path: &Path) -> std::io::Result<()> {
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !m.file_type().is_socket() {
        return Err(std::io::Error::new(
            ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(std::io::Error::new(
            ErrorKind::AddrInUse,
            format!("{} is in use by a running VM", path.display()),
        )),
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound) => Ok(()),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("{}: cannot tell whether it is in use: {e}", path.display()),
        )),
    }
}

/// Binds the socket in a private directory (mode 0700) beside `path`, sets its mode there,
/// and renames it into place: nobody else can reach it, or swap the name chmod acts on,
/// before it has mode 0600, and a stale socket at `path` is replaced in one step. Returns
/// the listener and the socket's (device, inode).
fn bind_private(path: &Path) -> std::io::Result<(UnixListener, (u64, u64))> {
    let private = private_dir(parent_dir(path), next_serial());
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let tmp = private.join("s");
    let r = (|| {
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        let m = std::fs::symlink_metadata(&tmp)?;
        std::fs::rename(&tmp, path)?;
        Ok((listener, (m.dev(), m.ino())))
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    r
}

fn next_serial() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

struct Client {
    stream: UnixStream,
    session: Session,
    buf: Vec<u8>,
    /// Discarding the rest of an over-long line.
    skipping: bool,
    /// A reply or event could not be written (the client closed, or stopped reading): what
    /// it already sent is still carried out, as QEMU does, but nothing more is written.
    mute: bool,
}

impl Client {
    fn send(&mut self, v: &Value) {
        if !self.mute && send(&mut self.stream, v).is_err() {
            self.mute = true;
        }
    }
}

fn send(stream: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut line = v.to_string();
    line.push_str("\r\n");
    stream.write_all(line.as_bytes())
}

fn serve(
    listener: UnixListener,
    machine: Arc<dyn Machine>,
    events: Arc<Events>,
    stop: Arc<AtomicBool>,
) {
    let mut client: Option<Client> = None;
    loop {
        let stopping = stop.load(Ordering::Acquire);
        // The client first, so that one which has left is noticed before the next connects.
        if let Some(c) = client.as_mut() {
            events
                .listening
                .store(c.session.negotiated(), Ordering::Release);
            if c.session.negotiated() {
                machine.tick();
            }
            let mut alive = true;
            for ev in events.take() {
                c.send(&ev);
            }
            if stopping {
                return;
            }
            // Read until nothing more is there (at most one POLL of waiting).
            let mut chunk = [0u8; 4096];
            while alive {
                match c.stream.read(&mut chunk) {
                    Ok(0) => alive = false,
                    Ok(n) => {
                        feed(c, &chunk[..n], machine.as_ref());
                        events
                            .listening
                            .store(c.session.negotiated(), Ordering::Release);
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        break
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => alive = false,
                }
            }
            // A mute client is let go once what it sent is read and carried out.
            if !alive || c.mute {
                client = None;
                events.listening.store(false, Ordering::Release);
                events.take();
            }
        } else if stopping {
            return;
        }
        // New connections: the first becomes the client, others are told and closed.
        loop {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    if client.is_some() {
                        let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                        let _ = send(
                            &mut s,
                            &QmpError::generic("another QMP client is connected").to_json(),
                        );
                        continue;
                    }
                    let _ = s.set_read_timeout(Some(POLL));
                    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                    // A client that already left still gets its requests carried out.
                    let mut c = Client {
                        stream: s,
                        session: Session::new(),
                        buf: Vec::new(),
                        skipping: false,
                        mute: false,
                    };
                    c.send(&greeting());
                    client = Some(c);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
        if client.is_none() {
            std::thread::sleep(POLL);
        }
    }
}

/// Takes the JSON requests out of what arrived and answers each (every complete request is
/// carried out, even when its reply cannot be written). Requests are a stream of JSON objects, as QEMU reads them: a newline after each is
/// usual but not needed (QEMU's own Python client, `qemu.qmp`, sends none). After a syntax
/// error the rest of that line is dropped; a request still incomplete after [`MAX_LINE`]
/// bytes is refused and skipped up to its newline.
fn feed(c: &mut Client, mut data: &[u8], machine: &dyn Machine) {
    if c.skipping {
        match data.iter().position(|&b| b == b'\n') {
            Some(i) => {
                c.skipping = false;
                data = &data[i + 1..];
            }
            None => return,
        }
    }
    c.buf.extend_from_slice(data);
    loop {
        let start = c
            .buf
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(c.buf.len());
        c.buf.drain(..start);
        if c.buf.is_empty() {
            return;
        }
        let mut values = serde_json::Deserializer::from_slice(&c.buf).into_iter::<Value>();
        // (reply, bytes used; None = a bad request, dropped to the end of its line)
        let (reply, consumed) = match values.next() {
            Some(Ok(_)) if values.byte_offset() > MAX_LINE => {
                let e = QmpError::generic(format!("request longer than {MAX_LINE} bytes"));
                (e.to_json(), Some(values.byte_offset()))
            }
            Some(Ok(_)) => {
                let end = values.byte_offset();
                (c.session.handle_line(&c.buf[..end], machine), Some(end))
            }
            Some(Err(e)) if e.is_eof() => {
                if c.buf.len() <= MAX_LINE {
                    return; // wait for the rest
                }
                let e = QmpError::generic(format!("request longer than {MAX_LINE} bytes"));
                (e.to_json(), None)
            }
            Some(Err(e)) => {
                let e = QmpError::generic(format!("JSON parse error, {e}"));
                (e.to_json(), None)
            }
            None => return,
        };
        match consumed {
            Some(n) => {
                c.buf.drain(..n);
            }
            None => match c.buf.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    c.buf.drain(..=i);
                }
                None => {
                    c.buf.clear();
                    c.skipping = true;
                }
            },
        }
        c.send(&reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what it is asked and answers with the command's debug form.
    struct Echo(Mutex<Vec<Command>>);

    impl Machine for Echo {
        fn run(&self, cmd: Command) -> Result<Value, QmpError> {
            let s = format!("{cmd:?}");
            self.0.lock().unwrap().push(cmd);
            Ok(json!(s))
        }
    }

    fn ask(s: &mut Session, m: &Echo, line: &str) -> Value {
        s.handle_line(line.as_bytes(), m)
    }

    #[test]
    fn negotiation_and_replies() {
        let m = Echo(Mutex::new(Vec::new()));
        let mut s = Session::new();
        let r = ask(&mut s, &m, r#"{"execute":"query-status","id":1}"#);
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(r["id"], 1);
        let r = ask(&mut s, &m, r#"{"execute":"qmp_capabilities","id":"a"}"#);
        assert_eq!(r, json!({"return": {}, "id": "a"}));
        let r = ask(&mut s, &m, r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(r["error"]["class"], "CommandNotFound");
        let r = ask(&mut s, &m, r#"{"execute":"query-status","id":{"x":[1]}}"#);
        assert_eq!(r["id"], json!({"x":[1]}));
        assert!(r["return"].is_string());
        assert_eq!(m.0.lock().unwrap().as_slice(), &[Command::QueryStatus]);
    }

    #[test]
    fn bad_requests_are_errors() {
        let m = Echo(Mutex::new(Vec::new()));
        let mut s = Session::new();
        ask(&mut s, &m, r#"{"execute":"qmp_capabilities"}"#);
        for (line, class, needle) in [
            ("{not json", "GenericError", "JSON parse error"),
            ("[1,2]", "GenericError", "JSON object"),
            (
                r#"{"arguments":{}}"#,
                "GenericError",
                "lacks member 'execute'",
            ),
            (r#"{"execute":7}"#, "GenericError", "must be a string"),
            (
                r#"{"execute":"stop","arguments":[]}"#,
                "GenericError",
                "must be an object",
            ),
            (
                r#"{"execute":"stop","extra":1}"#,
                "GenericError",
                "'extra' is unexpected",
            ),
            (
                r#"{"execute":"frobnicate"}"#,
                "CommandNotFound",
                "frobnicate",
            ),
            (
                r#"{"execute":"stop","arguments":{"now":true}}"#,
                "GenericError",
                "'now' is unexpected",
            ),
            (
                r#"{"execute":"device_add","arguments":{"driver":"virtio-blk","id":"d","lun":1,"file":"x"}}"#,
                "GenericError",
                "driver",
            ),
            (
                r#"{"execute":"device_add","arguments":{"driver":"scsi-hd","id":"d","lun":64,"file":"x"}}"#,
                "GenericError",
                "'lun'",
            ),
            (
                r#"{"execute":"device_add","arguments":{"driver":"scsi-hd","id":"d","lun":-1,"file":"x"}}"#,
                "GenericError",
                "'lun'",
            ),
            (
                r#"{"execute":"device_add","arguments":{"driver":"scsi-hd","id":"d","lun":"1","file":"x"}}"#,
                "GenericError",
                "'lun'",
            ),
            (
                r#"{"execute":"device_add","arguments":{"driver":"scsi-hd","id":"d","lun":1}}"#,
                "GenericError",
                "'file' is missing",
            ),
            (
                r#"{"execute":"device_add","arguments":{"driver":"scsi-hd","id":"9bad","lun":1,"file":"x"}}"#,
                "GenericError",
                "identifier",
            ),
            (
                r#"{"execute":"device_add","arguments":{"driver":"scsi-hd","id":"d","lun":1,"file":"x","read-only":"yes"}}"#,
                "GenericError",
                "boolean",
            ),
            (
                r#"{"execute":"device_add","arguments":{"driver":"scsi-cd","id":"d","lun":1,"undo":true}}"#,
                "GenericError",
                "'undo' is for writable disks",
            ),
            (
                r#"{"execute":"device_del","arguments":{"id":"d","undo-end":"maybe"}}"#,
                "GenericError",
                "'undo-end' must be",
            ),
            (
                r#"{"execute":"eject","arguments":{}}"#,
                "GenericError",
                "'id' is missing",
            ),
            (
                r#"{"execute":"eject","arguments":{"id":"a","device":"b"}}"#,
                "GenericError",
                "not both",
            ),
            (
                r#"{"execute":"blockdev-change-medium","arguments":{"id":"cd0"}}"#,
                "GenericError",
                "'filename' is missing",
            ),
        ] {
            let r = ask(&mut s, &m, line);
            assert_eq!(r["error"]["class"], class, "{line}: {r}");
            let desc = r["error"]["desc"].as_str().unwrap();
            assert!(desc.contains(needle), "{line}: {desc}");
        }
        assert!(
            m.0.lock().unwrap().is_empty(),
            "nothing reached the machine"
        );
        let r = ask(
            &mut s,
            &m,
            r#"{"execute":"device_add","arguments":{"driver":"scsi-cd","id":"cd1","lun":2}}"#,
        );
        assert!(r.get("return").is_some(), "{r}");
        assert_eq!(
            m.0.lock().unwrap()[0],
            Command::DeviceAdd(DeviceAdd {
                driver: Driver::Cdrom,
                id: "cd1".into(),
                lun: 2,
                file: None,
                format: None,
                read_only: true,
                undo: false,
            })
        );
    }

    fn connect(path: &Path) -> (UnixStream, std::io::BufReader<UnixStream>) {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let r = std::io::BufReader::new(s.try_clone().unwrap());
        (s, r)
    }

    fn recv(r: &mut std::io::BufReader<UnixStream>) -> Value {
        let mut line = String::new();
        std::io::BufRead::read_line(r, &mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    #[test]
    fn socket_one_client_long_lines_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let events = Arc::new(Events::default());
        let m = Arc::new(Echo(Mutex::new(Vec::new())));
        let srv = QmpServer::start(&path, m.clone(), events.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (mut w, mut r) = connect(&path);
        assert!(recv(&mut r)["QMP"]["capabilities"].is_array());
        // A second client is refused with an error, the first keeps working.
        let (_w2, mut r2) = connect(&path);
        assert_eq!(recv(&mut r2)["error"]["class"], "GenericError");
        // Events before negotiation are not delivered.
        events.emit("STOP", json!({}));
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .unwrap();
        assert_eq!(recv(&mut r), json!({"return": {}}));
        // An over-long request: one error, then the next request is served.
        let mut big = b"{\"execute\":\"stop\",\"arguments\":{\"x\":\"".to_vec();
        big.resize(MAX_LINE + 10, b'a');
        big.extend_from_slice(b"\"}}\n{\"execute\":\"stop\",\"id\":2}\n");
        w.write_all(&big).unwrap();
        let e = recv(&mut r);
        assert!(
            e["error"]["desc"].as_str().unwrap().contains("longer"),
            "{e}"
        );
        assert_eq!(recv(&mut r)["id"], 2);
        // Requests without newlines (as qemu.qmp sends them), and a syntax error that drops
        // the rest of its line only.
        w.write_all(b"{\"execute\":\"stop\",\"id\":3}{\"execute\":\"stop\",\"id\":4}")
            .unwrap();
        assert_eq!(recv(&mut r)["id"], 3);
        assert_eq!(recv(&mut r)["id"], 4);
        w.write_all(b"{oops} {\"execute\":\"stop\",\"id\":5}\n{\"execute\":\"stop\",\"id\":6}")
            .unwrap();
        assert!(recv(&mut r)["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("JSON parse error"));
        assert_eq!(recv(&mut r)["id"], 6);
        events.emit("RESUME", json!({}));
        let ev = recv(&mut r);
        assert_eq!(ev["event"], "RESUME");
        assert!(ev["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(ev["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
        // The client goes; a new one can connect.
        drop((w, r));
        std::thread::sleep(Duration::from_millis(100));
        let (_w3, mut r3) = connect(&path);
        assert!(recv(&mut r3).get("QMP").is_some());
        srv.shutdown();
        assert!(!path.exists());
        // ids 2, 3, 4 and 6; neither the over-long request nor the broken line ran.
        assert_eq!(*m.0.lock().unwrap(), vec![Command::Stop; 4]);
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let m = Echo(Mutex::new(Vec::new()));
        let mut s = Session::new();
        ask(&mut s, &m, r#"{"execute":"qmp_capabilities"}"#);
        for line in [
            r#"{"execute":"query-status","execute":"stop"}"#,
            r#"{"execute":"eject","arguments":{"id":"a","id":"b"}}"#,
            r#"{"execute":"stop","id":{"x":1,"x":2}}"#,
        ] {
            let r = ask(&mut s, &m, line);
            assert_eq!(r["error"]["class"], "GenericError", "{line}: {r}");
            let desc = r["error"]["desc"].as_str().unwrap();
            assert!(desc.starts_with("duplicate key '"), "{line}: {desc}");
        }
        assert!(m.0.lock().unwrap().is_empty(), "nothing ran");
    }

    #[test]
    fn capabilities_enable_and_lun_types() {
        let m = Echo(Mutex::new(Vec::new()));
        let mut s = Session::new();
        for (args, needle) in [
            (r#"{"enable":["oob"]}"#, "'oob' not available"),
            (r#"{"enable":["frob"]}"#, "does not accept value 'frob'"),
            (r#"{"enable":"oob"}"#, "expected: array"),
            (r#"{"other":1}"#, "'other' is unexpected"),
        ] {
            let line = format!(r#"{{"execute":"qmp_capabilities","arguments":{args}}}"#);
            let r = ask(&mut s, &m, &line);
            let desc = r["error"]["desc"].as_str().unwrap_or_default();
            assert!(desc.contains(needle), "{line}: {r}");
            assert!(!s.negotiated());
        }
        let r = ask(
            &mut s,
            &m,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":[]}}"#,
        );
        assert_eq!(r, json!({"return": {}}));
        for lun in ["3.0", r#""3""#, "true"] {
            let line = format!(
                r#"{{"execute":"device_add","arguments":{{"driver":"scsi-hd","id":"d","lun":{lun},"file":"x"}}}}"#
            );
            let r = ask(&mut s, &m, &line);
            assert_eq!(
                r["error"]["desc"], "Invalid parameter type for 'lun', expected: integer",
                "{line}"
            );
        }
        let r = ask(
            &mut s,
            &m,
            r#"{"execute":"device_add","arguments":{"driver":"scsi-hd","id":"d","lun":64,"file":"x"}}"#,
        );
        assert!(
            r["error"]["desc"].as_str().unwrap().contains("0..=63"),
            "{r}"
        );
    }

    fn start(path: &Path) -> (QmpServer, Arc<Echo>) {
        let m = Arc::new(Echo(Mutex::new(Vec::new())));
        let srv = QmpServer::start(path, m.clone(), Arc::new(Events::default())).unwrap();
        (srv, m)
    }

    #[test]
    fn live_socket_is_not_taken_over_and_only_ours_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        // A stale socket (nobody listens) is replaced.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (first, _) = start(&path);
        // A second server on the same path is refused and the first keeps its socket.
        let Err(e) = QmpServer::start(
            &path,
            Arc::new(Echo(Mutex::new(Vec::new()))),
            Arc::new(Events::default()),
        ) else {
            panic!("a second server took a live socket");
        };
        assert!(e.to_string().contains("is in use by a running VM"), "{e}");
        // (The probe was a client for a moment; let the server see it leave.)
        std::thread::sleep(Duration::from_millis(100));
        let (_w, mut r) = connect(&path);
        assert!(recv(&mut r).get("QMP").is_some());
        // No private directory is left beside the socket.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // Someone else's socket now at the path (ours was removed behind our back): the end
        // of the first server leaves it alone.
        std::fs::remove_file(&path).unwrap();
        let other = UnixListener::bind(&path).unwrap();
        first.shutdown();
        assert!(
            path.exists(),
            "the first server removed a socket that was not its own"
        );
        drop(other);
        // A regular file is never replaced.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"data").unwrap();
        let Err(e) = QmpServer::start(
            &path,
            Arc::new(Echo(Mutex::new(Vec::new()))),
            Arc::new(Events::default()),
        ) else {
            panic!("a regular file was replaced");
        };
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }

    #[test]
    fn requests_sent_before_closing_are_carried_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let (srv, m) = start(&path);
        // Sent and closed before the server even greets: the writes of the greeting and the
        // replies fail, the requests must run all the same.
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(
            b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"stop\"}\n{\"execute\":\"quit\"}\n",
        )
        .unwrap();
        drop(s);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while m.0.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(*m.0.lock().unwrap(), vec![Command::Stop, Command::Quit]);
        // The server is free for the next client.
        let (_w, mut r) = connect(&path);
        assert!(recv(&mut r).get("QMP").is_some());
        srv.shutdown();
        assert!(!path.exists());
    }

    #[test]
    fn bad_paths_are_refused_up_front() {
        let dir = tempfile::tempdir().unwrap();
        for (path, needle) in [
            (dir.path().join("no/such/dir/q.sock"), "does not exist"),
            (dir.path().join("x".repeat(100)), "too long"),
        ] {
            let e = check_path(&path).unwrap_err().to_string();
            assert!(e.contains(needle), "{}: {e}", path.display());
        }
        assert!(check_path(&dir.path().join("q.sock")).is_ok());
    }
}

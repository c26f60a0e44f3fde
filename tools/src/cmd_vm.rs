//! `viridian vm SOCKET COMMAND [ARGS]`: a client for the control socket of `viridian run
//! --qmp SOCKET` (docs/qmp.md). ARGS are `key=value` pairs, `key:=JSON` pairs, or one JSON
//! object (see [`parse_args`]).
//!
//! The client trusts nothing the socket sends: a line is capped at [`MAX_REPLY_LINE`] bytes,
//! `--timeout` is one deadline for the whole call (connect, greeting, negotiation, reply), and
//! only a reply carrying the id of our request is taken as its answer.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::common::{self, SizeRuleArg};

#[derive(clap::Args)]
pub struct Args {
    /// The control socket (`viridian run --qmp SOCKET`).
    socket: PathBuf,
    /// A QMP command: query-status, query-block, device_add, device_del,
    /// blockdev-change-medium, eject, stop, cont, system_powerdown, quit, ...
    command: String,
    /// Arguments: key=value ... (e.g. driver=scsi-hd id=d1 lun=1 file=a.vhdx), key:=JSON
    /// (e.g. read-only:=true, file:='"123"'), or one JSON object.
    args: Vec<String>,
    /// Print the reply as JSON (the `return` value, or the whole error).
    #[arg(long)]
    json: bool,
    /// Give up after this many seconds, for the whole call (connect to reply).
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

/// Longest line accepted from the server (bytes, without the newline). The server caps
/// requests at `vmm::qmp::MAX_LINE` (64 KiB); replies can be longer than any request:
/// `query-block` lists up to 64 LUNs, each with its image path (up to 4096 bytes), about
/// 300 KiB at worst. 16 times the request cap leaves room for that and bounds what a broken or
/// hostile server can make us hold.
pub const MAX_REPLY_LINE: usize = 16 * vmm::qmp::MAX_LINE;

/// Argument keys whose schema type is a string (docs/qmp.md, "Commands"): `key=value` keeps
/// their value a string even when it looks like a number or a boolean (`file=123`).
const STRING_KEYS: &[&str] = &[
    "driver", "id", "device", "file", "filename", "format", "undo-end",
];

/// Arguments from the command line:
/// * one JSON object, taken as it is;
/// * `key=value`: a string for the keys in [`STRING_KEYS`]; for other keys a value that
///   parses as a JSON number, boolean or null is taken as that, anything else is a string;
/// * `key:=JSON`: the value is that JSON, whatever the key (`lun:=3`, `file:='"123"'`).
///
/// A key given twice is an error.
fn parse_args(args: &[String]) -> Result<Map<String, Value>> {
    if let [one] = args {
        if one.trim_start().starts_with('{') {
            return match serde_json::from_str(one) {
                Ok(Value::Object(m)) => Ok(m),
                _ => bail!("arguments {one:?} are not a JSON object"),
            };
        }
    }
    let mut m = Map::new();
    for a in args {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| anyhow!("argument {a:?}: expected key=value or key:=JSON"))?;
        let (k, v) = match k.strip_suffix(':') {
            Some(k) => {
                let j = serde_json::from_str::<Value>(v)
                    .map_err(|e| anyhow!("argument {a:?}: the value after := is not JSON: {e}"))?;
                (k, j)
            }
            None if STRING_KEYS.contains(&k) => (k, Value::String(v.to_string())),
            None => match serde_json::from_str::<Value>(v) {
                Ok(j @ (Value::Number(_) | Value::Bool(_) | Value::Null)) => (k, j),
                _ => (k, Value::String(v.to_string())),
            },
        };
        if k.is_empty() {
            bail!("argument {a:?}: empty key");
        }
        if m.insert(k.to_string(), v).is_some() {
            bail!("argument {k:?} given twice");
        }
    }
    Ok(m)
}

/// One connection to the control socket, with the call's deadline.
struct Conn<'a> {
    socket: &'a Path,
    r: BufReader<UnixStream>,
    w: UnixStream,
    deadline: Instant,
    timeout: Duration,
}

impl Conn<'_> {
    fn timed_out(&self) -> anyhow::Error {
        anyhow!(
            "timed out after {} s waiting for {}",
            self.timeout.as_secs_f64(),
            self.socket.display()
        )
    }

    /// Time left before the deadline, or the timeout error.
    fn remaining(&self) -> Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timed_out());
        }
        Ok(left)
    }

    /// One line, at most [`MAX_REPLY_LINE`] bytes, before the deadline.
    fn read_line(&mut self) -> Result<Vec<u8>> {
        let mut line = Vec::new();
        loop {
            if self.r.buffer().is_empty() {
                // Reads block at most until the deadline, however slowly bytes trickle in.
                let left = self.remaining()?;
                self.r.get_ref().set_read_timeout(Some(left))?;
            }
            let avail = match self.r.fill_buf() {
                Ok(b) => b,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(self.timed_out())
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("reading from {}", self.socket.display()))
                }
            };
            if avail.is_empty() {
                bail!("{} closed the connection", self.socket.display());
            }
            let (part, used, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (&avail[..i], i + 1, true),
                None => (avail, avail.len(), false),
            };
            if line.len() + part.len() > MAX_REPLY_LINE {
                bail!(
                    "reply too long from {}: a line of more than {MAX_REPLY_LINE} bytes",
                    self.socket.display()
                );
            }
            line.extend_from_slice(part);
            self.r.consume(used);
            if done {
                return Ok(line);
            }
        }
    }

    /// The next JSON object the server sends.
    fn recv(&mut self) -> Result<Value> {
        let line = self.read_line()?;
        match serde_json::from_slice(&line) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => bail!(
                "{} sent something that is not a JSON object: {:?}",
                self.socket.display(),
                String::from_utf8_lossy(&line[..line.len().min(200)])
            ),
        }
    }

    fn send(&mut self, req: &Value) -> Result<()> {
        let mut line = req.to_string();
        // The server refuses longer requests with an error that cannot carry our id.
        if line.len() > vmm::qmp::MAX_LINE {
            bail!(
                "request too long: {} bytes, the server takes at most {}",
                line.len(),
                vmm::qmp::MAX_LINE
            );
        }
        line.push('\n');
        let left = self.remaining()?;
        self.w.set_write_timeout(Some(left))?;
        match self.w.write_all(line.as_bytes()) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(self.timed_out())
            }
            Err(e) => Err(e).with_context(|| format!("writing to {}", self.socket.display())),
        }
    }

    /// Sends one request with `id` and returns the reply carrying that id. Events, replies
    /// with other ids and replies without one are skipped; they count against the deadline
    /// and each against the line cap.
    fn call(&mut self, execute: &str, args: Map<String, Value>, id: &Value) -> Result<Value> {
        let mut req = json!({"execute": execute, "id": id});
        if !args.is_empty() {
            req["arguments"] = Value::Object(args);
        }
        self.send(&req)?;
        loop {
            let v = self.recv()?;
            if v.get("event").is_none() && v.get("id") == Some(id) {
                return Ok(v);
            }
        }
    }
}

/// Connects, giving up at the deadline (a connect to a listener whose backlog is full blocks).
fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = socket.to_path_buf();
    // Left behind when it times out; the process ends soon after.
    std::thread::spawn(move || {
        let _ = tx.send(UnixStream::connect(&path));
    });
    match rx.recv_timeout(timeout) {
        Ok(r) => r.with_context(|| format!("cannot connect to {}", socket.display())),
        Err(_) => bail!(
            "timed out after {} s waiting for {}",
            timeout.as_secs_f64(),
            socket.display()
        ),
    }
}

/// One request/response exchange, with negotiation, all within `timeout`.
pub fn exchange(
    socket: &Path,
    command: &str,
    args: Map<String, Value>,
    timeout: Duration,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    let s = connect(socket, timeout)?;
    let w = s.try_clone()?;
    let mut c = Conn {
        socket,
        r: BufReader::new(s),
        w,
        deadline,
        timeout,
    };
    let hello = c.recv()?;
    if let Some(e) = hello.get("error") {
        bail!(
            "{}: {}",
            socket.display(),
            e["desc"].as_str().unwrap_or("refused")
        );
    }
    if hello.get("QMP").is_none() {
        bail!("{} did not greet like a QMP server", socket.display());
    }
    // Ids unique to this call, so that no stray reply is taken for ours.
    let tag = format!("viridian-vm-{}", std::process::id());
    let neg = c.call("qmp_capabilities", Map::new(), &json!(format!("{tag}-0")))?;
    if neg.get("return").is_none() {
        bail!("capabilities negotiation failed: {neg}");
    }
    c.call(command, args, &json!(format!("{tag}-1")))
}

fn human(command: &str, ret: &Value) -> String {
    match command {
        "query-status" => ret["status"].as_str().unwrap_or("?").to_string(),
        "query-block" => {
            let mut out = String::new();
            for d in ret.as_array().into_iter().flatten() {
                let medium = match d.get("inserted") {
                    Some(i) => format!(
                        "{} ({}, {}, {} bytes)",
                        i["file"].as_str().unwrap_or("-"),
                        i["format"].as_str().unwrap_or("?"),
                        if i["ro"] == true { "ro" } else { "rw" },
                        i["virtual-size"]
                    ),
                    None if d["tray_open"] == true => "[tray open, no medium]".into(),
                    None => "[no medium]".into(),
                };
                let io = match d.get("stats") {
                    Some(s) => format!(
                        " rd {} B/{} ops, wr {} B/{} ops, {} flushes",
                        s["rd_bytes"],
                        s["rd_operations"],
                        s["wr_bytes"],
                        s["wr_operations"],
                        s["flush_operations"]
                    ),
                    None => String::new(),
                };
                let locked = if d["locked"] == true { " locked" } else { "" };
                out.push_str(&format!(
                    "{} (LUN {}, {}{locked}): {medium}{io}\n",
                    d["device"].as_str().unwrap_or("?"),
                    d["lun"],
                    d["type"].as_str().unwrap_or("?"),
                ));
            }
            out.trim_end().to_string()
        }
        _ if ret == &json!({}) => "OK".into(),
        _ => serde_json::to_string_pretty(ret).unwrap_or_default(),
    }
}

pub fn run(a: Args) -> Result<i32> {
    let args = parse_args(&a.args)?;
    let reply = exchange(
        &a.socket,
        &a.command,
        args,
        Duration::from_secs(a.timeout.max(1)),
    )?;
    if let Some(e) = reply.get("error") {
        if a.json {
            println!("{reply}");
        }
        eprintln!(
            "viridian: {}: {} ({})",
            a.command,
            e["desc"].as_str().unwrap_or("failed"),
            e["class"].as_str().unwrap_or("?")
        );
        return Ok(1);
    }
    let ret = &reply["return"];
    if a.json {
        println!("{ret}");
    } else {
        println!("{}", human(&a.command, ret));
    }
    Ok(0)
}

/// The VMM's image opener for `device_add` and medium changes: every format `chain` opens.
pub fn open_image(
    path: &Path,
    format: Option<&str>,
    read_only: bool,
) -> Result<disk::Disk, String> {
    let opts = if read_only {
        chain::OpenOptions::read_only()
    } else {
        chain::OpenOptions::read_write()
    };
    common::open_with(path, format, SizeRuleArg::Auto, opts).map_err(|e| common::one_line(&e))
}

/// An undo session of a hot-plugged LUN (`device_add ... undo=true`).
#[derive(Debug)]
struct HotUndo(chain::UndoDisk);

impl vmm::control::UndoSession for HotUndo {
    fn end(self: Box<Self>, how: vmm::qmp::UndoEnd) -> Result<String, String> {
        let child = self.0.child_path().display().to_string();
        let parent = self.0.parent_path().display().to_string();
        let r = match how {
            vmm::qmp::UndoEnd::Discard => self.0.discard().map(|()| format!("discarded {child}")),
            vmm::qmp::UndoEnd::Commit => self
                .0
                .commit(&mut |_| {})
                .map(|n| format!("committed {n} bytes into {parent}")),
            vmm::qmp::UndoEnd::Keep => self.0.keep().map(|p| format!("kept {}", p.display())),
        };
        r.map_err(|e| format!("ending the undo session of {parent} (changes in {child}): {e}"))
    }
}

/// The VMM's opener for `device_add ... undo=true`: the image read-only under a fresh child.
pub fn open_undo(
    path: &Path,
    format: Option<&str>,
) -> Result<(disk::Disk, Box<dyn vmm::control::UndoSession>), String> {
    let mut opts = chain::OpenOptions::read_only();
    opts.format = format
        .map(common::parse_format)
        .transpose()
        .map_err(|e| common::one_line(&e))?;
    let u = chain::UndoDisk::open(path, &opts, None)
        .map_err(|e| format!("cannot open {} in undo mode: {e}", path.display()))?;
    Ok((u.disk(), Box::new(HotUndo(u))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_and_json_args() {
        let m = parse_args(&[
            "lun=1".into(),
            "file=a b.vhdx".into(),
            "read-only=true".into(),
            "id=007".into(),
        ])
        .unwrap();
        assert_eq!(m["lun"], 1);
        assert_eq!(m["file"], "a b.vhdx");
        assert_eq!(m["read-only"], true);
        assert_eq!(m["id"], "007", "not JSON, so a string");
        let m = parse_args(&[r#"{"id":"cd0","force":true}"#.into()]).unwrap();
        assert_eq!(m["force"], true);
        assert!(parse_args(&["novalue".into()]).is_err());
        // Schema strings stay strings; := gives JSON for any key.
        let m = parse_args(&[
            "file=123".into(),
            "id=true".into(),
            "format=null".into(),
            "lun:=3".into(),
            "force:=false".into(),
            "filename:=\"7\"".into(),
        ])
        .unwrap();
        assert_eq!(m["file"], "123");
        assert_eq!(m["id"], "true");
        assert_eq!(m["format"], "null");
        assert_eq!(m["lun"], 3);
        assert_eq!(m["force"], false);
        assert_eq!(m["filename"], "7");
        assert!(parse_args(&["lun:=x".into()]).is_err(), "not JSON after :=");
        assert!(parse_args(&["=1".into()]).is_err(), "empty key");
        let e = parse_args(&["id=n7".into(), "id=n8".into()]).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        assert!(parse_args(&["lun=1".into(), "lun:=2".into()]).is_err());
        assert!(parse_args(&["{bad".into()]).is_err());
    }
}

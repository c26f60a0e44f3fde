//! `viridian vm SOCKET COMMAND [ARGS]`: a client for the control socket of `viridian run
//! --qmp SOCKET` (docs/qmp.md). ARGS are `key=value` pairs (a value that parses as JSON, such as
//! a number or `true`, is taken as that; anything else is a string) or one JSON object.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// Arguments: key=value ... (e.g. driver=scsi-hd id=d1 lun=1 file=a.vhdx), or one JSON
    /// object.
    args: Vec<String>,
    /// Print the reply as JSON (the `return` value, or the whole error).
    #[arg(long)]
    json: bool,
    /// Give up waiting for the reply after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

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
            .ok_or_else(|| anyhow!("argument {a:?}: expected key=value"))?;
        let v = match serde_json::from_str::<Value>(v) {
            Ok(j @ (Value::Number(_) | Value::Bool(_) | Value::Null)) => j,
            _ => Value::String(v.to_string()),
        };
        m.insert(k.to_string(), v);
    }
    Ok(m)
}

fn recv(r: &mut BufReader<UnixStream>, socket: &Path) -> Result<Value> {
    loop {
        let mut line = String::new();
        let n = r
            .read_line(&mut line)
            .with_context(|| format!("reading from {}", socket.display()))?;
        if n == 0 {
            bail!("{} closed the connection", socket.display());
        }
        let v: Value = serde_json::from_str(&line)
            .with_context(|| format!("{} sent something that is not JSON", socket.display()))?;
        // Events may arrive between requests; the client skips them.
        if v.get("event").is_none() {
            return Ok(v);
        }
    }
}

/// One request/response exchange, with negotiation.
pub fn exchange(
    socket: &Path,
    command: &str,
    args: Map<String, Value>,
    timeout: Duration,
) -> Result<Value> {
    let s = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    s.set_read_timeout(Some(timeout))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let hello = recv(&mut r, socket)?;
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
    writeln!(w, "{}", json!({"execute": "qmp_capabilities"}))?;
    let neg = recv(&mut r, socket)?;
    if neg.get("return").is_none() {
        bail!("capabilities negotiation failed: {neg}");
    }
    let mut req = json!({"execute": command, "id": 1});
    if !args.is_empty() {
        req["arguments"] = Value::Object(args);
    }
    writeln!(w, "{req}")?;
    recv(&mut r, socket)
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
        assert!(parse_args(&["{bad".into()]).is_err());
    }
}

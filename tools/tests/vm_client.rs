//! `viridian vm` against fake control sockets (a Unix socket served by a thread here, no VM):
//! bounded memory against endless lines, one deadline for the whole call, replies matched on
//! their id, and typed `key=value` arguments.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{viridian_measured, Measured};
use serde_json::{json, Value};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"major": 9, "minor": 0, "micro": 0}, "package": "fake"}, "capabilities": []}}"#;

/// A fake server at DIR/qmp.sock: `serve` gets the first connection.
fn fake(dir: &Path, serve: impl FnOnce(UnixStream) + Send + 'static) -> (PathBuf, JoinHandle<()>) {
    let sock = dir.join("qmp.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        serve(s)
    });
    (sock, t)
}

fn line(s: &mut UnixStream, v: &str) -> std::io::Result<()> {
    s.write_all(v.as_bytes())?;
    s.write_all(b"\r\n")
}

fn read_req(r: &mut BufReader<UnixStream>) -> Value {
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    serde_json::from_str(&l).unwrap_or(Value::Null)
}

/// Greets and answers `qmp_capabilities` properly; returns the reader for what follows.
fn negotiate(mut s: UnixStream) -> (UnixStream, BufReader<UnixStream>) {
    line(&mut s, GREETING).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let neg = read_req(&mut r);
    assert_eq!(neg["execute"], "qmp_capabilities");
    line(&mut s, &json!({"return": {}, "id": neg["id"]}).to_string()).unwrap();
    (s, r)
}

/// Writes `a` without a newline until the client leaves (or 20 s, or 1 GiB: a bound for the
/// test itself should the client keep reading).
fn endless(s: &mut UnixStream) {
    let chunk = vec![b'a'; 64 * 1024];
    let start = Instant::now();
    for _ in 0..16 * 1024 {
        if s.write_all(&chunk).is_err() || start.elapsed() > Duration::from_secs(20) {
            return;
        }
    }
}

fn vm(sock: &Path, args: &[&str]) -> Measured {
    let mut all = vec!["vm", sock.to_str().unwrap()];
    all.extend_from_slice(args);
    viridian_measured(&all)
}

fn assert_too_long(m: &Measured, sock: &Path) {
    assert_eq!(m.code, 1, "stderr: {}", m.stderr);
    assert!(!m.panicked(), "{}", m.stderr);
    assert!(m.stderr.contains("reply too long"), "{}", m.stderr);
    assert!(m.stderr.contains(sock.to_str().unwrap()), "{}", m.stderr);
    assert!(m.wall < Duration::from_secs(10), "took {:?}", m.wall);
    // The cap is 1 MiB a line; the binary itself takes a few MiB.
    assert!(m.max_rss_kib < 32 * 1024, "peak RSS {} KiB", m.max_rss_kib);
}

#[test]
fn endless_greeting_is_cut_at_the_line_cap() {
    let d = tempfile::tempdir().unwrap();
    let (sock, t) = fake(d.path(), |mut s| endless(&mut s));
    let m = vm(&sock, &["query-status", "--timeout", "30"]);
    eprintln!(
        "endless greeting: {:?}, peak RSS {} KiB",
        m.wall, m.max_rss_kib
    );
    assert_too_long(&m, &sock);
    t.join().unwrap();
}

#[test]
fn endless_reply_is_cut_at_the_line_cap() {
    let d = tempfile::tempdir().unwrap();
    let (sock, t) = fake(d.path(), |s| {
        let (mut s, mut r) = negotiate(s);
        read_req(&mut r);
        endless(&mut s);
    });
    let m = vm(&sock, &["query-status", "--timeout", "30"]);
    eprintln!(
        "endless reply: {:?}, peak RSS {} KiB",
        m.wall, m.max_rss_kib
    );
    assert_too_long(&m, &sock);
    t.join().unwrap();
}

#[test]
fn a_reply_just_under_the_cap_is_taken() {
    // query-block with many LUNs and long paths is longer than a request may be.
    let d = tempfile::tempdir().unwrap();
    let (sock, t) = fake(d.path(), |s| {
        let (mut s, mut r) = negotiate(s);
        let req = read_req(&mut r);
        let big = "x".repeat(900 * 1024);
        line(
            &mut s,
            &json!({"return": {"big": big}, "id": req["id"]}).to_string(),
        )
        .unwrap();
    });
    let m = vm(&sock, &["query-status", "--json", "--timeout", "30"]);
    assert_eq!(m.code, 0, "{}", m.stderr);
    let v: Value = serde_json::from_str(m.stdout.trim()).unwrap();
    assert_eq!(v["big"].as_str().unwrap().len(), 900 * 1024);
    t.join().unwrap();
}

/// Sends events to the client every millisecond (so that no single read waits long) until it
/// leaves or 20 s pass.
fn flood(s: &mut UnixStream) {
    let ev = r#"{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}}"#;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if line(s, ev).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn assert_timed_out(m: &Measured, sock: &Path, secs: u64) {
    assert_eq!(m.code, 1, "stderr: {}", m.stderr);
    let want = format!("timed out after {secs} s waiting for {}", sock.display());
    assert!(m.stderr.contains(&want), "{}", m.stderr);
    assert!(!m.stderr.contains("os error"), "{}", m.stderr);
    assert!(
        m.wall >= Duration::from_secs(secs) && m.wall < Duration::from_secs(secs + 5),
        "took {:?} with --timeout {secs}",
        m.wall
    );
}

#[test]
fn event_flood_ends_at_the_deadline_of_the_whole_call() {
    let d = tempfile::tempdir().unwrap();
    let (sock, t) = fake(d.path(), |s| {
        let (mut s, mut r) = negotiate(s);
        read_req(&mut r);
        flood(&mut s);
    });
    let m = vm(&sock, &["query-status", "--timeout", "2"]);
    eprintln!("event flood, --timeout 2: {:?}", m.wall);
    assert_timed_out(&m, &sock, 2);
    t.join().unwrap();
}

#[test]
fn slow_greeting_counts_against_the_deadline() {
    // One byte of the greeting every 200 ms: each read succeeds, the call must still end.
    let d = tempfile::tempdir().unwrap();
    let (sock, t) = fake(d.path(), |mut s| {
        for b in GREETING.bytes() {
            if s.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let m = vm(&sock, &["query-status", "--timeout", "2"]);
    assert_timed_out(&m, &sock, 2);
    t.join().unwrap();
}

#[test]
fn silent_server_times_out_with_a_clear_message() {
    let d = tempfile::tempdir().unwrap();
    let (tx, rx) = mpsc::channel::<()>();
    let (sock, t) = fake(d.path(), move |_s| {
        // Hold the connection open without a word until the client is done.
        let _ = rx.recv_timeout(Duration::from_secs(20));
    });
    let m = vm(&sock, &["query-status", "--timeout", "1"]);
    tx.send(()).unwrap();
    assert_timed_out(&m, &sock, 1);
    t.join().unwrap();
}

#[test]
fn only_the_reply_with_our_id_is_taken() {
    let d = tempfile::tempdir().unwrap();
    let (tx, rx) = mpsc::channel();
    let (sock, t) = fake(d.path(), move |mut s| {
        line(&mut s, GREETING).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let neg = read_req(&mut r);
        // A stray error with another id must not fail the negotiation.
        line(
            &mut s,
            r#"{"error": {"class": "GenericError", "desc": "stray"}, "id": 999}"#,
        )
        .unwrap();
        line(&mut s, &json!({"return": {}, "id": neg["id"]}).to_string()).unwrap();
        let req = read_req(&mut r);
        for stray in [
            r#"{"return": {"status": "wrong-id", "running": false}, "id": 999}"#,
            r#"{"event": "STOP", "data": {}, "id": 1}"#,
            r#"{"return": {"status": "no-id", "running": false}}"#,
        ] {
            line(&mut s, stray).unwrap();
        }
        let ok = json!({"return": {"status": "running", "running": true}, "id": req["id"]});
        line(&mut s, &ok.to_string()).unwrap();
        tx.send((neg, req)).unwrap();
    });
    let m = vm(&sock, &["query-status", "--timeout", "10"]);
    let (neg, req) = rx.recv().unwrap();
    assert_eq!(m.code, 0, "{}", m.stderr);
    assert_eq!(m.stdout.trim(), "running");
    assert!(neg["id"].is_string() && req["id"].is_string());
    assert_ne!(neg["id"], req["id"], "each request has its own id");
    t.join().unwrap();
}

#[test]
fn replies_with_other_ids_only_end_in_a_timeout() {
    let d = tempfile::tempdir().unwrap();
    let (sock, t) = fake(d.path(), |s| {
        let (mut s, mut r) = negotiate(s);
        read_req(&mut r);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if line(&mut s, r#"{"return": {"status": "running"}, "id": 999}"#).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let m = vm(&sock, &["query-status", "--timeout", "1"]);
    assert_timed_out(&m, &sock, 1);
    t.join().unwrap();
}

/// A server that returns the arguments of the request it gets.
fn echo_args(dir: &Path) -> (PathBuf, JoinHandle<()>) {
    fake(dir, |s| {
        let (mut s, mut r) = negotiate(s);
        let req = read_req(&mut r);
        let ret = json!({"return": req["arguments"], "id": req["id"]});
        line(&mut s, &ret.to_string()).unwrap();
    })
}

#[test]
fn string_keys_stay_strings() {
    let d = tempfile::tempdir().unwrap();
    let (sock, t) = echo_args(d.path());
    let m = vm(
        &sock,
        &[
            "device_add",
            "driver=scsi-hd",
            "id=n7",
            "lun=1",
            "file=123",
            "format=true",
            "read-only=true",
            "--json",
        ],
    );
    assert_eq!(m.code, 0, "{}", m.stderr);
    let v: Value = serde_json::from_str(m.stdout.trim()).unwrap();
    assert_eq!(
        v,
        json!({"driver": "scsi-hd", "id": "n7", "lun": 1, "file": "123", "format": "true",
               "read-only": true})
    );
    t.join().unwrap();
}

#[test]
fn json_values_with_colon_equals() {
    let d = tempfile::tempdir().unwrap();
    let (sock, t) = echo_args(d.path());
    let m = vm(
        &sock,
        &[
            "device_add",
            "id:=\"42\"",
            "lun:=3",
            "undo:=false",
            "x-list:=[1,\"a\"]",
            "--json",
        ],
    );
    assert_eq!(m.code, 0, "{}", m.stderr);
    let v: Value = serde_json::from_str(m.stdout.trim()).unwrap();
    assert_eq!(
        v,
        json!({"id": "42", "lun": 3, "undo": false, "x-list": [1, "a"]})
    );
    t.join().unwrap();
}

#[test]
fn duplicate_keys_are_an_error() {
    // No server: the arguments are refused before connecting.
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("none.sock");
    let m = vm(&sock, &["device_del", "id=n7", "id=n8"]);
    assert_eq!(m.code, 1, "{}", m.stderr);
    assert!(m.stderr.contains("\"id\" given twice"), "{}", m.stderr);
    let m = vm(&sock, &["device_add", "lun:=x"]);
    assert_eq!(m.code, 1, "{}", m.stderr);
    assert!(m.stderr.contains("not JSON"), "{}", m.stderr);
}

//! `viridian run --qmp` with a real guest (the project's test kernel, vmm/guest/build.sh): one
//! boot, root file system on a SCSI DVD drive, then the control socket driven by QEMU's own
//! QMP client library (`qemu.qmp`, from the venv scripts/setup.sh makes) and by `viridian vm`.
//!
//! The guest boots with `root=/dev/sr0 rootfstype=iso9660 ro` (without `ro` this kernel tries
//! a writable mount first, which the CD-ROM layer refuses with EROFS and the kernel panics) from an ISO 9660 image made here
//! with genisoimage. Its /sbin/init only spins in user mode (our nested hosts cannot run guest
//! system calls, see `viridian run --probe-host`), so the kernel keeps running and everything
//! the test observes in the guest is what the kernel prints on the console, or what the guest's
//! SCSI commands did to the device (the DVD drive counts the media events the guest fetched).
//!
//! Skips without /dev/kvm, genisoimage or the venv (fails under VIRIDIAN_REQUIRE_ALL=1).

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn skip(why: &str) {
    if require_all() {
        panic!("required test cannot run (VIRIDIAN_REQUIRE_ALL=1): {why}");
    }
    eprintln!("SKIP: {why}");
}

fn guest_kernel() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("VIRIDIAN_GUEST_KERNEL") {
        return Some(PathBuf::from(k));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmm/guest/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
    if !out.status.success() {
        skip("guest kernel build failed");
        return None;
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()?
        .to_string();
    Some(PathBuf::from(path))
}

/// The project venv's python with `qemu.qmp` (scripts/setup.sh installs it).
fn qmp_python() -> Option<PathBuf> {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/peer-venv/bin/python");
    let ok = py.exists()
        && Command::new(&py)
            .args(["-c", "import qemu.qmp"])
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        skip("no qemu.qmp in target/peer-venv (run scripts/setup.sh)");
        return None;
    }
    Some(py)
}

/// A static x86-64 ELF `/sbin/init` that spins in user mode (`pause; jmp` back), making no
/// system call: the guest kernel stays up with nothing else to do.
fn spinning_init() -> Vec<u8> {
    let code = [0xf3u8, 0x90, 0xeb, 0xfc];
    let base: u64 = 0x40_0000;
    let total = 64 + 56 + code.len() as u64;
    let mut e = b"\x7fELF\x02\x01\x01\x00".to_vec();
    e.extend_from_slice(&[0; 8]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(base + 120).to_le_bytes()); // entry: the code after the headers
    e.extend_from_slice(&64u64.to_le_bytes());
    e.extend_from_slice(&0u64.to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 0, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [0u64, base, base, total, total, 0x1000] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&code);
    e
}

/// Waits (at most 60 s) for the VM to end after `quit`.
fn wait_for_exit_after_quit(child: &mut Child) -> std::process::ExitStatus {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < end, "the VM did not end after quit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn make_iso(dir: &Path, name: &str, label: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let root = dir.join(format!("{name}.d"));
    for sub in ["dev", "proc", "sys", "sbin"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    for (f, data) in files {
        std::fs::write(root.join(f), data).unwrap();
    }
    tool_ok("chmod", &["-R", "a+rX", p(&root)]);
    if root.join("sbin/init").exists() {
        tool_ok("chmod", &["755", p(&root.join("sbin/init"))]);
    }
    let iso = dir.join(format!("{name}.iso"));
    tool_ok(
        "genisoimage",
        &["-quiet", "-R", "-V", label, "-o", p(&iso), p(&root)],
    );
    std::fs::remove_dir_all(&root).unwrap();
    iso
}

/// The guest console file, read as the VMM writes it.
struct Console(PathBuf);

impl Console {
    fn text(&self) -> String {
        // Lossy: a stray non-UTF-8 byte on the serial line must not hide the rest.
        String::from_utf8_lossy(&std::fs::read(&self.0).unwrap_or_default()).into_owned()
    }
    fn len(&self) -> usize {
        self.text().len()
    }
    /// Waits for a line containing `needle` at or after byte `from`; returns when it was seen
    /// (polled every 5 ms) and the line.
    fn wait(&self, needle: &str, from: usize, timeout: Duration) -> Option<(Instant, String)> {
        let end = Instant::now() + timeout;
        loop {
            let t = self.text();
            if let Some(i) = t.get(from..).and_then(|s| s.find(needle)) {
                let seen = Instant::now();
                let start = t[..from + i].rfind('\n').map_or(0, |n| n + 1);
                let stop = t[from + i..].find('\n').map_or(t.len(), |n| from + i + n);
                return Some((seen, t[start..stop].trim_end().to_string()));
            }
            if Instant::now() >= end || t.contains("Kernel panic") {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    fn tail(&self) -> String {
        let t = self.text();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// The `viridian run` child; killed if the test fails before `quit`.
struct Vm(Option<Child>);

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `viridian vm SOCKET ARGS... --json`: (exit code, parsed stdout or null, stderr).
fn vm(sock: &Path, args: &[&str]) -> (i32, Value, String) {
    let mut all = vec!["vm", p(sock)];
    all.extend_from_slice(args);
    all.push("--json");
    let o = viridian(&all);
    let out = String::from_utf8_lossy(&o.stdout);
    let v = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
    (
        o.status.code().unwrap_or(-1),
        v,
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn vm_ok(sock: &Path, args: &[&str]) -> Value {
    let (code, v, err) = vm(sock, args);
    assert_eq!(code, 0, "viridian vm {args:?}: {err} {v}");
    v
}

/// Runs steps through qemu.qmp over one connection; returns the greeting and the results.
fn qemu_qmp(py: &Path, sock: &Path, steps: Value) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qmp_client.py");
    let o = Command::new(py)
        .arg(&script)
        .arg(sock)
        .arg(steps.to_string())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu.qmp client failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array().unwrap().clone()
}

fn block<'a>(q: &'a Value, id: &str) -> &'a Value {
    q.as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == id)
        .unwrap_or_else(|| panic!("no {id} in {q}"))
}

/// Waits until `query-block` (through `viridian vm`) satisfies `ok`.
fn wait_block(sock: &Path, timeout: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + timeout;
    loop {
        let q = vm_ok(sock, &["query-block"]);
        if ok(&q) || Instant::now() >= end {
            return q;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn undo_children(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".undo-"))
        .collect()
}

fn check_clean(img: &Path) {
    let o = viridian(&["check", p(img)]);
    assert!(
        o.status.success(),
        "viridian check {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A raw socket client, for requests no well-behaved client sends.
struct Raw {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Raw {
    fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Raw {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        };
        assert!(c.reply().get("QMP").is_some());
        c
    }
    fn reply(&mut self) -> Value {
        loop {
            let mut l = String::new();
            self.r.read_line(&mut l).unwrap();
            let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            if v.get("event").is_none() {
                return v;
            }
        }
    }
    fn send(&mut self, bytes: &[u8]) -> Value {
        self.w.write_all(bytes).unwrap();
        self.reply()
    }
}

const HOT_SIZE: u64 = 24 << 20;

#[test]
fn dvd_root_then_hotplug_media_pause_and_hostile_requests_over_qmp() {
    if !Path::new("/dev/kvm").exists() {
        return skip("/dev/kvm absent");
    }
    if !have("genisoimage") {
        return;
    }
    let Some(py) = qmp_python() else { return };
    let Some(kernel) = guest_kernel() else { return };

    let dir = tmp();
    let d = dir.path();
    let root_iso = make_iso(
        d,
        "root",
        "VIRIDIAN_ROOT",
        &[("sbin/init", &spinning_init()), ("hello", b"root\n")],
    );
    let media_iso = make_iso(d, "media", "VIRIDIAN_MEDIA", &[("data", &[0x5a; 300_000])]);
    let disk0 = d.join("disk0.vhdx");
    let hot = d.join("hot.vhdx");
    let undo = d.join("undo.vhdx");
    ok(&["create", "-f", "vhdx", p(&disk0), "8M"]);
    ok(&["create", "-f", "vhdx", p(&hot), &HOT_SIZE.to_string()]);
    ok(&["create", "-f", "vhdx", p(&undo), "16M"]);
    let corrupt = d.join("corrupt.vhdx");
    let mut junk = b"vhdxfile".to_vec();
    junk.resize(1 << 20, 0xEE);
    std::fs::write(&corrupt, junk).unwrap();
    let undo_before = std::fs::read(&undo).unwrap();

    // The VM: disk0 at LUN 0 (sda), the root DVD at LUN 1 (sr0), an empty DVD drive at LUN 2.
    let toml = d.join("vm.toml");
    std::fs::write(
        &toml,
        format!(
            "name = \"dvd\"\nmemory_mib = 128\ncpus = 1\nkernel = {:?}\n\
             cmdline = \"root=/dev/sr0 rootfstype=iso9660 ro block.events_dfl_poll_msecs=100\"\n\n\
             [[disk]]\npath = {:?}\n\n[[dvd]]\npath = {:?}\n\n[[dvd]]\n",
            p(&kernel),
            p(&disk0),
            p(&root_iso)
        ),
    )
    .unwrap();
    let sock = d.join("qmp.sock");
    let console = Console(d.join("console.log"));
    let boot_started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(["run", p(&toml), "--qmp", p(&sock), "--no-stdin"])
        .args(["--console", p(&console.0), "--timeout", "600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vmp = Vm(Some(child));

    // 1. The root file system comes from the DVD drive.
    let mounted = console.wait(
        "VFS: Mounted root (iso9660 filesystem) readonly",
        0,
        Duration::from_secs(240),
    );
    assert!(
        mounted.is_some(),
        "no iso9660 root; console:\n{}",
        console.tail()
    );
    let (_, init) = console
        .wait("Run /sbin/init", 0, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("init not started; console:\n{}", console.tail()));
    eprintln!(
        "boot to init: {:.1}s ({init})",
        boot_started.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(2));
    let log = console.text();
    assert!(
        !log.contains("Kernel panic"),
        "the guest died; console:\n{}",
        console.tail()
    );
    for sr in ["sr0", "sr1"] {
        let caps = log
            .lines()
            .find(|l| l.contains(&format!("[{sr}] scsi3-mmc drive:")))
            .unwrap_or_else(|| panic!("{sr}: no MMC capabilities line; console:\n{log}"));
        eprintln!("{caps}");
        assert!(caps.contains("tray"), "{caps}");
    }
    assert!(!log.contains("scsi-1 drive"), "a drive fell back to scsi-1");
    assert!(
        log.contains("Msft     Virtual DVD-ROM"),
        "no DVD-ROM INQUIRY line"
    );

    // 2. qemu.qmp: state, the DVD drives, hostile requests; the VM keeps running.
    let r = qemu_qmp(
        &py,
        &sock,
        json!([
            {"execute": "query-status"},
            {"execute": "query-block"},
            {"execute": "no-such-command"},
            {"execute": "device_add", "arguments":
                {"driver": "scsi-hd", "id": "x", "lun": 9, "file": p(&hot), "bogus": 1}},
            {"execute": "device_del", "arguments": {"id": "nothing-here"}},
            {"execute": "device_add", "arguments":
                {"driver": "scsi-hd", "id": "x", "lun": 1, "file": p(&hot)}},
            {"execute": "device_add", "arguments":
                {"driver": "scsi-hd", "id": "x", "lun": 9, "file": p(&disk0)}},
            {"execute": "device_add", "arguments":
                {"driver": "scsi-hd", "id": "x", "lun": 9, "file": p(&corrupt), "format": "vhdx"}},
            {"execute": "eject", "arguments": {"id": "cd0"}},
            {"execute": "blockdev-change-medium", "event": "DEVICE_TRAY_MOVED",
             "arguments": {"id": "cd1", "filename": p(&media_iso)}},
            {"execute": "query-status"},
        ]),
    );
    assert_eq!(r[0]["greeting"]["QMP"]["version"]["qemu"]["major"], 0);
    assert_eq!(r[1]["return"]["status"], "running", "{}", r[1]);
    let q = &r[2]["return"];
    assert_eq!(block(q, "disk0")["type"], "hd");
    assert_eq!(block(q, "cd0")["lun"], 1);
    assert_eq!(
        block(q, "cd0")["locked"],
        true,
        "the guest locks the tray of its mounted root: {q}"
    );
    assert_eq!(block(q, "cd0")["inserted"]["file"], p(&root_iso), "{q}");
    assert!(block(q, "cd1").get("inserted").is_none(), "{q}");
    let errs = [
        (3, "CommandNotFound", "no-such-command"),
        (4, "GenericError", "'bogus' is unexpected"),
        (5, "DeviceNotFound", "nothing-here"),
        (6, "GenericError", "LUN 1 is busy"),
        (7, "GenericError", "Could not open"),
        (8, "GenericError", "Could not open"),
        (9, "GenericError", "is locked"),
    ];
    for (i, class, needle) in errs {
        assert_eq!(r[i]["error"]["class"], class, "step {i}: {}", r[i]);
        let desc = r[i]["error"]["desc"].as_str().unwrap();
        assert!(desc.contains(needle), "step {i}: {desc}");
    }
    eprintln!("locked image: {}", r[7]["error"]["desc"]);
    eprintln!("corrupt image: {}", r[8]["error"]["desc"]);
    assert_eq!(r[10]["return"], json!({}), "{}", r[10]);
    // The tray opens for the old medium, then closes on the new one: the first of the two.
    assert_eq!(
        r[10]["event"]["data"],
        json!({"device": "cd1", "id": "cd1", "tray-open": true}),
        "{}",
        r[10]
    );
    assert_eq!(r[11]["return"]["status"], "running");

    // The guest polls its drives: it fetches the new-media event of cd1 and the eject request
    // of cd0 (sent because its tray was locked).
    let q = wait_block(&sock, Duration::from_secs(30), |q| {
        block(q, "cd1")["media-events-fetched"]["new-media"] == 1
            && block(q, "cd0")["media-events-fetched"]["eject-request"] == 1
    });
    assert_eq!(
        block(&q, "cd1")["media-events-fetched"]["new-media"],
        1,
        "{q}"
    );
    assert_eq!(
        block(&q, "cd0")["media-events-fetched"]["eject-request"],
        1,
        "{q}"
    );
    assert_eq!(block(&q, "cd1")["tray_open"], false);
    assert_eq!(block(&q, "cd1")["inserted"]["file"], p(&media_iso));

    // 3. `viridian vm`: hot-add a VHDX disk; the guest attaches sdb with its capacity.
    let from = console.len();
    let sent = Instant::now();
    vm_ok(
        &sock,
        &[
            "device_add",
            "driver=scsi-hd",
            "id=hot",
            "lun=3",
            &format!("file={}", p(&hot)),
            "format=vhdx",
        ],
    );
    let (seen, line) = console
        .wait("[sdb] Attached SCSI disk", from, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("sdb not attached; console:\n{}", console.tail()));
    let attach_ms = seen.duration_since(sent).as_millis();
    eprintln!("device_add -> guest attach line: {attach_ms} ms ({line})");
    let blocks = format!("[sdb] {} 512-byte logical blocks", HOT_SIZE / 512);
    assert!(
        console.text()[from..].contains(&blocks),
        "capacity of sdb; console:\n{}",
        console.tail()
    );
    let q = vm_ok(&sock, &["query-block"]);
    assert_eq!(block(&q, "hot")["inserted"]["virtual-size"], HOT_SIZE);
    assert_eq!(block(&q, "hot")["inserted"]["format"], "vhdx");
    assert!(block(&q, "hot")["stats"]["rd_operations"].as_u64().unwrap() > 0);

    // 4. qemu.qmp: hot-remove it; the guest deletes sdb, the image checks clean.
    let from = console.len();
    let r = qemu_qmp(
        &py,
        &sock,
        json!([{"execute": "device_del", "arguments": {"id": "hot"}, "event": "DEVICE_DELETED"}]),
    );
    assert_eq!(r[1]["return"], json!({}), "{}", r[1]);
    assert_eq!(r[1]["event"]["data"]["device"], "hot");
    let (_, gone) = console
        .wait(
            "[sdb] Synchronizing SCSI cache",
            from,
            Duration::from_secs(60),
        )
        .unwrap_or_else(|| panic!("sdb not deleted; console:\n{}", console.tail()));
    eprintln!("removal: {gone}");
    check_clean(&hot);

    // 5. stop really stops the vCPUs: a disk added while paused is not attached until cont.
    let r = qemu_qmp(
        &py,
        &sock,
        json!([{"execute": "stop", "event": "STOP"}, {"execute": "query-status"}]),
    );
    assert_eq!(r[1]["event"]["event"], "STOP");
    assert_eq!(r[2]["return"]["status"], "paused");
    let from = console.len();
    vm_ok(
        &sock,
        &[
            "device_add",
            "driver=scsi-hd",
            "id=late",
            "lun=5",
            &format!("file={}", p(&hot)),
        ],
    );
    assert!(
        console
            .wait("Attached SCSI disk", from, Duration::from_secs(3))
            .is_none(),
        "the guest ran while paused"
    );
    assert_eq!(console.len(), from, "console output while paused");
    assert_eq!(vm_ok(&sock, &["cont"]), json!({}));
    assert_eq!(vm_ok(&sock, &["query-status"])["status"], "running");
    console
        .wait("Attached SCSI disk", from, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("not attached after cont; console:\n{}", console.tail()));

    // 6. Undo LUNs: discard leaves the image as it was; commit merges (and removes the child).
    // The commit round puts a new unit at LUN 4 right after the discard round removed the
    // old one there: the guest must drop the old device and attach the new one.
    for (end, client) in [("discard", "vm"), ("commit", "qemu.qmp")] {
        let from = console.len();
        vm_ok(
            &sock,
            &[
                "device_add",
                "driver=scsi-hd",
                "id=u",
                "lun=4",
                &format!("file={}", p(&undo)),
                "undo=true",
            ],
        );
        console
            .wait("Attached SCSI disk", from, Duration::from_secs(60))
            .unwrap_or_else(|| {
                panic!(
                    "undo LUN not attached ({end}); console:\n{}",
                    console.tail()
                )
            });
        assert_eq!(undo_children(d).len(), 1, "one undo child while attached");
        let from = console.len();
        if client == "vm" {
            vm_ok(&sock, &["device_del", "id=u", &format!("undo-end={end}")]);
        } else {
            let r = qemu_qmp(
                &py,
                &sock,
                json!([{"execute": "device_del", "arguments": {"id": "u", "undo-end": end}}]),
            );
            assert_eq!(r[1]["return"], json!({}), "{}", r[1]);
        }
        assert!(undo_children(d).is_empty(), "{end}: the child is gone");
        if end == "commit" {
            console
                .wait("Synchronizing SCSI cache", from, Duration::from_secs(60))
                .unwrap_or_else(|| panic!("undo LUN not deleted; console:\n{}", console.tail()));
        }
        check_clean(&undo);
        if end == "discard" {
            assert!(
                std::fs::read(&undo).unwrap() == undo_before,
                "discard wrote"
            );
        }
    }

    // 7. Eject the medium of cd1 (`viridian vm`): the guest fetches the removal event.
    vm_ok(&sock, &["eject", "id=cd1"]);
    let q = wait_block(&sock, Duration::from_secs(30), |q| {
        block(q, "cd1")["media-events-fetched"]["media-removal"] == 1
    });
    assert_eq!(
        block(&q, "cd1")["media-events-fetched"]["media-removal"],
        1,
        "{q}"
    );
    assert_eq!(block(&q, "cd1")["tray_open"], true);
    assert!(block(&q, "cd1").get("inserted").is_none());

    // 8. Hostile bytes on a raw connection; a second client meanwhile is refused.
    let mut raw = Raw::connect(&sock);
    let (code, _, err) = vm(&sock, &["query-status"]);
    assert_ne!(code, 0);
    assert!(err.contains("another QMP client"), "{err}");
    let r = raw.send(b"{\"execute\": \"qmp_capabilities\"}\n");
    assert_eq!(r["return"], json!({}));
    let r = raw.send(b"{not json\n");
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    let mut huge = vec![b'{'; 1 << 20];
    huge.push(b'\n');
    let r = raw.send(&huge);
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    let r = raw.send(b"[1, 2, 3]\n");
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    let r = raw.send(b"{\"execute\": \"query-status\", \"id\": {\"n\": 7}}\n");
    assert_eq!(r["return"]["status"], "running", "{r}");
    assert_eq!(r["id"], json!({"n": 7}));
    // A key given twice is refused, not "last one wins" (this one would have stopped the VM).
    let r = raw.send(b"{\"execute\": \"query-status\", \"execute\": \"stop\"}\n");
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap_or_default()
            .starts_with("duplicate key"),
        "{r}"
    );
    // A second VM on the same socket path is refused before it starts, and this VM keeps its
    // socket; so is a path in a directory that does not exist (no boot, no register dump).
    for (path, needle) in [
        (sock.clone(), "is in use by a running VM"),
        (d.join("no/such/dir/q.sock"), "does not exist"),
    ] {
        let started = Instant::now();
        let o = Command::new(env!("CARGO_BIN_EXE_viridian"))
            .args([
                "run",
                "--kernel",
                p(&kernel),
                "--memory",
                "64M",
                "--no-stdin",
            ])
            .args(["--qmp", p(&path), "--timeout", "30"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "{err}");
        assert!(!err.contains("guest failed"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10), "{err}");
    }
    let r = raw.send(b"{\"execute\": \"query-status\"}\n");
    assert_eq!(r["return"]["status"], "running", "{r}");
    drop(raw);

    // 9. quit: the VM ends the orderly way; the disk added while paused is flushed and closed.
    let r = qemu_qmp(&py, &sock, json!([{"execute": "quit"}]));
    assert_eq!(r[1]["return"], json!({}), "{}", r[1]);
    let mut child = vmp.0.take().unwrap();
    let status = wait_for_exit_after_quit(&mut child);
    let out = child.wait_with_output().unwrap();
    eprintln!(
        "run ended: {status}; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(status.success(), "quit is a normal end");
    assert!(!sock.exists(), "the socket is removed");
    check_clean(&hot);
    check_clean(&disk0);
    assert!(undo_children(d).is_empty());
}

/// `system_powerdown` goes to the guest over the VMBus shutdown integration service; Linux's
/// hv_utils negotiates, accepts and powers the VM off (ACPI S5). A kernel-only boot: the root
/// device never comes (`rootwait`), the kernel idles.
#[test]
fn system_powerdown_shuts_the_guest_down_through_the_shutdown_ic() {
    if !Path::new("/dev/kvm").exists() {
        return skip("/dev/kvm absent");
    }
    let Some(py) = qmp_python() else { return };
    let Some(kernel) = guest_kernel() else { return };
    let dir = tmp();
    let sock = dir.path().join("qmp.sock");
    let console = Console(dir.path().join("console.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(["run", "--kernel", p(&kernel), "--memory", "128M"])
        .args(["--cmdline", "root=/dev/viridian-none rootwait"])
        .args(["--qmp", p(&sock), "--no-stdin", "--timeout", "300"])
        .args(["--console", p(&console.0)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vmp = Vm(Some(child));
    console
        .wait("Waiting for root device", 0, Duration::from_secs(240))
        .unwrap_or_else(|| panic!("boot did not settle; console:\n{}", console.tail()));
    let r = qemu_qmp(&py, &sock, json!([{"execute": "system_powerdown"}]));
    assert_eq!(r[1]["return"], json!({}), "{}", r[1]);
    let (_, line) = console
        .wait("Shutdown request received", 0, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no shutdown request seen; console:\n{}", console.tail()));
    eprintln!("{line}");
    assert!(console.text().contains("Shutdown IC version 3.0"));
    let mut child = vmp.0.take().unwrap();
    let end = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < end,
            "the guest did not power off; console:\n{}",
            console.tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("run ended: {status}; stderr:\n{err}");
    assert!(status.success(), "{err}\nconsole:\n{}", console.tail());
}

/// The guest's name for the disk in an "[sdX] Attached SCSI disk" line.
fn disk_name(line: &str) -> String {
    let end = line.find("] Attached SCSI disk").expect("an attach line");
    let start = line[..end].rfind('[').expect("a [sdX] tag") + 1;
    line[start..end].to_string()
}

/// One boot, many LUN hot-plug cycles: after removals (one alone, two back to back) the guest
/// still attaches disks added later, also at a LUN number that was just removed. Each step is
/// checked on the guest console with a bounded wait. A kernel-only boot (the root device never
/// comes, `rootwait`): the kernel's SCSI scanning is all that runs.
#[test]
fn hotplug_cycles_keep_the_guest_scanning() {
    if !Path::new("/dev/kvm").exists() {
        return skip("/dev/kvm absent");
    }
    let Some(kernel) = guest_kernel() else { return };
    let dir = tmp();
    let d = dir.path();
    let disk0 = d.join("disk0.vhdx");
    ok(&["create", "-f", "vhdx", p(&disk0), "8M"]);
    let images: Vec<PathBuf> = (0..3)
        .map(|i| {
            let img = d.join(format!("hot{i}.vhdx"));
            ok(&["create", "-f", "vhdx", p(&img), "16M"]);
            img
        })
        .collect();
    let sock = d.join("qmp.sock");
    let console = Console(d.join("console.log"));
    let stderr = std::fs::File::create(d.join("vmm.log")).unwrap();
    // disk0 at LUN 0 (sda) and an empty DVD drive at LUN 1 (sr0) that the guest polls for
    // media events every 100 ms, so commands to other LUNs run during every scan.
    let toml = d.join("vm.toml");
    std::fs::write(
        &toml,
        format!(
            "name = \"hotplug\"\nmemory_mib = 128\ncpus = 1\nkernel = {:?}\n\
             cmdline = \"root=/dev/viridian-none rootwait block.events_dfl_poll_msecs=100\"\n\n\
             [[disk]]\npath = {:?}\n\n[[dvd]]\n",
            p(&kernel),
            p(&disk0),
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(["run", p(&toml)])
        .args(["--qmp", p(&sock), "--no-stdin", "--timeout", "300"])
        .args(["--console", p(&console.0)])
        .args(if std::env::var_os("VIRIDIAN_STORVSC_TRACE").is_some() {
            &["-v"][..]
        } else {
            &[][..]
        })
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut vmp = Vm(Some(child));
    let boot = Instant::now();
    console
        .wait("Waiting for root device", 0, Duration::from_secs(240))
        .unwrap_or_else(|| panic!("boot did not settle; console:\n{}", console.tail()));
    console
        .wait("[sda] Attached SCSI disk", 0, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no sda; console:\n{}", console.tail()));
    eprintln!("boot: {:.1}s", boot.elapsed().as_secs_f64());

    let step = Duration::from_secs(60);
    let fail = |what: &str| -> ! {
        let log = std::fs::read_to_string(d.join("vmm.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(80).collect();
        panic!(
            "{what}; console:\n{}\nvmm log (last lines, newest first):\n{}",
            console.tail(),
            tail.join("\n")
        )
    };
    let mut attach_ms = Vec::new();
    // device_add, then the guest's attach line; returns the guest's name for the disk.
    let mut add = |id: &str, lun: u8, img: &Path| -> (String, u8) {
        let from = console.len();
        let sent = Instant::now();
        vm_ok(
            &sock,
            &[
                "device_add",
                "driver=scsi-hd",
                &format!("id={id}"),
                &format!("lun={lun}"),
                &format!("file={}", p(img)),
                "format=vhdx",
            ],
        );
        let Some((seen, line)) = console.wait("Attached SCSI disk", from, step) else {
            fail(&format!("'{id}' at LUN {lun} not attached"))
        };
        let ms = seen.duration_since(sent).as_millis();
        eprintln!("device_add {id} (LUN {lun}) -> guest attach line: {ms} ms ({line})");
        assert!(
            line.contains(&format!(":{lun}: [")),
            "attached at the wrong LUN: {line}"
        );
        attach_ms.push(ms);
        (disk_name(&line), lun)
    };
    let del = |ids: &[&str]| {
        let from = console.len();
        for id in ids {
            vm_ok(&sock, &["device_del", &format!("id={id}")]);
        }
        from
    };
    let removed = |(name, lun): &(String, u8), from: usize| {
        let needle = format!(":{lun}: [{name}] Synchronizing SCSI cache");
        if console.wait(&needle, from, step).is_none() {
            fail(&format!("{name} (LUN {lun}) not deleted by the guest"));
        }
        eprintln!("{name} (LUN {lun}) deleted");
    };

    // 1. One disk in, out.
    let a = add("a", 2, &images[0]);
    let from = del(&["a"]);
    removed(&a, from);
    // 2. Two disks in, both out back to back.
    let b = add("b", 3, &images[1]);
    let c = add("c", 4, &images[2]);
    let from = del(&["b", "c"]);
    removed(&b, from);
    removed(&c, from);
    // 3. After those three removals: re-add at a removed LUN number, and out again.
    let dd = add("d", 3, &images[0]);
    let from = del(&["d"]);
    removed(&dd, from);
    // 4. Out and straight back in at the same LUN (another image) without waiting for the
    // guest: it must still delete the old disk and attach the new one.
    let e = add("e", 4, &images[1]);
    let from = del(&["e"]);
    let f = add("f", 4, &images[2]);
    removed(&e, from);
    // 5. Out and straight in at another LUN; out; a last disk left attached until quit.
    let from = del(&["f"]);
    let g = add("g", 2, &images[0]);
    removed(&f, from);
    let from = del(&["g"]);
    removed(&g, from);
    add("h", 4, &images[1]);

    let mut sorted = attach_ms.clone();
    sorted.sort_unstable();
    eprintln!(
        "{} adds attached and 7 removals deleted by the guest (7 add/remove cycles); \
         device_add -> attach line: min {} ms, median {} ms, max {} ms",
        sorted.len(),
        sorted[0],
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
    assert_eq!(vm_ok(&sock, &["quit"]), json!({}));
    let mut child = vmp.0.take().unwrap();
    let status = wait_for_exit_after_quit(&mut child);
    assert!(status.success(), "quit is a normal end");
    for img in &images {
        check_clean(img);
    }
}

//! `viridian serve` with real NBD clients (libnbd's nbdinfo/nbdcopy, qemu-img, qemu-io).

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `viridian serve`, stopped (SIGTERM, then waited for) on drop.
struct Server {
    child: Child,
}

impl Server {
    fn start(args: &[&str], socket: &Path) -> Server {
        let child = Command::new(env!("CARGO_BIN_EXE_viridian"))
            .arg("serve")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start viridian serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(Instant::now() < deadline, "server socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child }
    }

    fn stop(mut self) -> i32 {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status.code().unwrap_or(-1)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn uri(socket: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", p(socket))
}

fn ready() -> bool {
    have("nbdinfo") && have("nbdcopy") && have("qemu-img") && have("qemu-io")
}

#[test]
fn exports_vhd_vhdx_and_chain_to_real_clients() {
    if !ready() {
        return;
    }
    let d = tmp();
    let src = join(d.path(), "src.raw");
    patterned_raw(&src, 24 << 20, 21);
    let vhd = join(d.path(), "a.vhd");
    let vhdx = join(d.path(), "a.vhdx");
    let child = join(d.path(), "child.vhdx");
    ok(&["convert", "-O", "vhd", p(&src), p(&vhd)]);
    ok(&["convert", "-O", "vhdx", p(&src), p(&vhdx)]);
    ok(&["create", "-f", "vhdx", "-b", p(&vhdx), p(&child)]);
    ok(&["io", "-c", "write -P 0x6a 3M 1M", p(&child)]);
    let flat = join(d.path(), "flat.raw");
    ok(&["convert", "-O", "raw", p(&child), p(&flat)]);
    let sock = join(d.path(), "nbd.sock");
    let server = Server::start(
        &[
            "--socket",
            p(&sock),
            "--export",
            &format!("vhd={}", p(&vhd)),
            "--export",
            &format!("vhdx={}", p(&vhdx)),
            "--export",
            &format!("chain={}", p(&child)),
        ],
        &sock,
    );
    for (name, reference, qfmt) in [
        ("vhd", &vhd, Some("vpc")),
        ("vhdx", &vhdx, Some("vhdx")),
        ("chain", &child, None),
    ] {
        let info: Value =
            serde_json::from_str(&tool_ok("nbdinfo", &["--json", &uri(&sock, name)])).unwrap();
        let export = &info["exports"][0];
        assert_eq!(export["export-size"], 24 << 20, "{name}");
        assert_eq!(export["is_read_only"], true, "{name}");
        assert!(export["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "base:allocation"));
        // nbdinfo --map: the data extents add up to what our map says.
        let map = tool_ok("nbdinfo", &["--map", &uri(&sock, name)]);
        let nbd_data: u64 = map
            .lines()
            .filter(|l| l.trim_end().ends_with("data"))
            .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
            .sum();
        let ours: Value =
            serde_json::from_str(&ok(&["map", "--output", "json", p(reference)])).unwrap();
        let our_data: u64 = ours
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true)
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        assert_eq!(nbd_data, our_data, "{name}: allocation through NBD");
        // nbdcopy of the export equals qemu-img's (or, for the chain, our flattened) raw view.
        let copy = join(d.path(), &format!("{name}.copy"));
        tool_ok("nbdcopy", &[&uri(&sock, name), p(&copy)]);
        let expect = match qfmt {
            Some(q) => {
                let r = join(d.path(), &format!("{name}.ref"));
                tool_ok(
                    "qemu-img",
                    &["convert", "-f", q, "-O", "raw", p(reference), p(&r)],
                );
                r
            }
            None => flat.clone(),
        };
        assert!(
            read_all(&copy) == read_all(&expect),
            "{name}: nbdcopy bytes"
        );
        let cmp = tool(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                &uri(&sock, name),
                p(&expect),
            ],
        );
        assert!(
            cmp.status.success(),
            "{name}: qemu-img compare: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
    }
    assert_eq!(server.stop(), 0);
}

#[test]
fn writes_through_nbd_land_and_image_checks_clean() {
    if !ready() {
        return;
    }
    let d = tmp();
    let img = join(d.path(), "w.vhdx");
    ok(&["create", "-f", "vhdx", p(&img), "32M"]);
    let sock = join(d.path(), "w.sock");
    let server = Server::start(&["--socket", p(&sock), "--rw", p(&img)], &sock);
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x42 1M 2M",
            "-c",
            "write -z 2M 64k",
            "-c",
            "flush",
            &uri(&sock, ""),
        ],
    );
    assert_eq!(server.stop(), 0);
    tool_ok("qemu-img", &["check", "-f", "vhdx", p(&img)]);
    assert_eq!(code(&["check", p(&img)]), 0);
    ok(&[
        "io",
        "-r",
        "-c",
        "read -P 0x42 1M 1M",
        "-c",
        "read -P 0 2M 64k",
        "-c",
        "read -P 0x42 2162688 983040",
        p(&img),
    ]);

    // --snapshot: writable, but the image is unchanged afterwards.
    let before = read_all(&img);
    let server = Server::start(&["--socket", p(&sock), "--snapshot", p(&img)], &sock);
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 4M",
            "-c",
            "read -P 0x77 0 4M",
            &uri(&sock, ""),
        ],
    );
    assert_eq!(server.stop(), 0);
    assert!(read_all(&img) == before, "--snapshot changed the image");
}

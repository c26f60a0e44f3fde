//! Viridian and QEMU see each other's image locks: a VM or qemu-io writing an image keeps
//! viridian out, and `viridian serve --rw` keeps qemu-img and qemu-io out, while readers share.

mod common;

use common::*;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// qemu-io kept open on `img` (interactive, waiting on its stdin) until dropped.
struct QemuHolder(Child);

impl QemuHolder {
    fn start(img: &Path, read_only: bool) -> QemuHolder {
        let mut args = vec!["-f", "vhdx"];
        if read_only {
            args.push("-r");
        }
        args.push(p(img));
        let child = Command::new("qemu-io")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io");
        // Ready once the image is among its open files.
        let fd_dir = format!("/proc/{}/fd", child.id());
        let want = std::fs::canonicalize(img).unwrap();
        let t = Instant::now();
        while !std::fs::read_dir(&fd_dir)
            .map(|d| {
                d.flatten()
                    .any(|e| std::fs::read_link(e.path()).ok() == Some(want.clone()))
            })
            .unwrap_or(false)
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "qemu-io did not open the image"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // qemu takes its locks right after opening; give it that moment.
        std::thread::sleep(Duration::from_millis(200));
        QemuHolder(child)
    }
}

impl Drop for QemuHolder {
    fn drop(&mut self) {
        if let Some(mut i) = self.0.stdin.take() {
            let _ = i.write_all(b"quit\n");
        }
        let _ = self.0.wait();
    }
}

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_qemu_writer_keeps_viridian_out_and_readers_share() {
    let d = tmp();
    let img = join(d.path(), "a.vhdx");
    ok(&["create", "-q", "-f", "vhdx", p(&img), "8M"]);
    {
        let _qemu = QemuHolder::start(&img, false);
        for args in [
            vec!["io", "-c", "write -P 0x11 0 4k", p(&img)],
            vec!["info", p(&img)],
            vec!["serve", "--rw", "--socket", "/nonexistent/s", p(&img)],
        ] {
            let o = viridian(&args);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr_of(&o));
            assert!(
                stderr_of(&o).contains("locked"),
                "{args:?}: {}",
                stderr_of(&o)
            );
        }
        // -U (force share) reads anyway, as qemu-img -U does.
        ok(&["info", "-U", p(&img)]);
    }
    // Readers share: a read-only qemu-io and viridian's reader both get in.
    let _qemu = QemuHolder::start(&img, true);
    ok(&["info", p(&img)]);
    ok(&["io", "-r", "-c", "read -P 0 0 4k", p(&img)]);
    let o = viridian(&["io", "-c", "write 0 4k", p(&img)]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a writer got in beside a qemu reader"
    );
}

#[test]
fn a_viridian_writer_keeps_qemu_out() {
    let d = tmp();
    let img = join(d.path(), "a.vhdx");
    let sock = join(d.path(), "s.sock");
    ok(&["create", "-q", "-f", "vhdx", p(&img), "8M"]);
    let _server = serve_start(&["--socket", p(&sock), "--rw", p(&img)], &sock)
        .unwrap_or_else(|(c, e)| panic!("serve --rw: exit {c}: {e}"));
    let o = tool("qemu-img", &["info", "-f", "vhdx", p(&img)]);
    assert!(!o.status.success(), "qemu-img info got in beside a writer");
    assert!(stderr_of(&o).contains("lock"), "{}", stderr_of(&o));
    let o = tool("qemu-io", &["-f", "vhdx", "-c", "write 0 4k", p(&img)]);
    assert!(
        !o.status.success() || stderr_of(&o).contains("lock"),
        "qemu-io wrote beside a writer: {}",
        stderr_of(&o)
    );
    // qemu's own escape hatch still reads.
    tool_ok("qemu-img", &["info", "-U", "-f", "vhdx", p(&img)]);
}

#[test]
fn a_viridian_reader_lets_qemu_readers_in_but_not_writers() {
    let d = tmp();
    let img = join(d.path(), "a.vhdx");
    let sock = join(d.path(), "s.sock");
    ok(&["create", "-q", "-f", "vhdx", p(&img), "8M"]);
    let _server = serve_start(&["--socket", p(&sock), p(&img)], &sock)
        .unwrap_or_else(|(c, e)| panic!("serve: exit {c}: {e}"));
    tool_ok("qemu-img", &["info", "-f", "vhdx", p(&img)]);
    let o = tool("qemu-io", &["-f", "vhdx", "-c", "write 0 4k", p(&img)]);
    assert!(
        !o.status.success() || stderr_of(&o).contains("lock"),
        "qemu-io wrote beside a reader: {}",
        stderr_of(&o)
    );
}

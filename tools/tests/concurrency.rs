//! Concurrency between processes: a writer (`viridian serve --rw`) holds an exclusive advisory
//! lock, so a second writer (`io`, another `serve --rw`, `check -r`, `mount --rw`) is refused
//! with a clear "locked" error; readers started meanwhile get that clear error or a consistent
//! view, never garbage and never a panic; NBD readers of the live server see, per sector,
//! either the old or the new data while another client rewrites the disk.

mod common;

use common::*;
use std::path::Path;

const SIZE: usize = 8 << 20;

/// Sector-distinct patterns: every 512-byte sector of A differs from B's.
fn pat(seed: u8) -> Vec<u8> {
    (0..SIZE)
        .map(|i| ((i / 512) as u8).wrapping_mul(31) ^ (i as u8) ^ seed)
        .collect()
}

fn make_image(dir: &Path, fmt: &str) -> std::path::PathBuf {
    let raw = dir.join(format!("a-{fmt}.raw"));
    std::fs::write(&raw, pat(0xA5)).unwrap();
    let img = dir.join(format!("a.{fmt}"));
    ok(&["convert", "-O", fmt, p(&raw), p(&img)]);
    img
}

fn refused_as_locked(args: &[&str]) {
    let m = viridian_measured(args);
    assert!(!m.panicked(), "{args:?} panicked: {}", m.stderr);
    assert_ne!(
        m.code, 0,
        "{args:?} was allowed while another process writes"
    );
    assert!(
        m.stderr.contains("locked"),
        "{args:?}: unclear error: {}",
        m.stderr
    );
}

#[test]
fn second_writer_is_refused_while_serve_rw_holds_the_image() {
    let d = tmp();
    for fmt in ["vhd", "vhdx"] {
        let img = make_image(d.path(), fmt);
        let sock = d.path().join(format!("{fmt}.sock"));
        let _server = serve_start(&["--socket", p(&sock), "--rw", p(&img)], &sock)
            .unwrap_or_else(|(c, e)| panic!("serve --rw: exit {c}: {e}"));
        refused_as_locked(&["io", "-c", "write -P 0x11 0 4k", p(&img)]);
        refused_as_locked(&["check", "-r", "all", p(&img)]);
        refused_as_locked(&["resize", p(&img), "16M"]);
        let sock2 = d.path().join(format!("{fmt}-2.sock"));
        match serve_start(&["--socket", p(&sock2), "--rw", p(&img)], &sock2) {
            Ok(_) => panic!("a second serve --rw of {fmt} started"),
            Err((c, e)) => assert!(c != 0 && c != 101 && e.contains("locked"), "{c}: {e}"),
        }
        if Path::new("/dev/fuse").exists() && have("fusermount3") {
            let mp = d.path().join("mnt");
            std::fs::create_dir_all(&mp).unwrap();
            let _g = MountGuard(mp.clone());
            refused_as_locked(&["mount", "--rw", p(&img), p(&mp)]);
        }
    }
}

#[test]
fn readers_during_a_writer_get_a_clear_error_or_a_consistent_view() {
    if !have("nbdcopy") {
        return;
    }
    let d = tmp();
    for fmt in ["vhd", "vhdx"] {
        let img = make_image(d.path(), fmt);
        let a = pat(0xA5);
        let b = pat(0x5A);
        let braw = d.path().join("b.raw");
        std::fs::write(&braw, &b).unwrap();
        let sock = d.path().join(format!("{fmt}.sock"));
        let server = serve_start(&["--socket", p(&sock), "--rw", p(&img)], &sock)
            .unwrap_or_else(|(c, e)| panic!("serve --rw: exit {c}: {e}"));
        let uri = format!("nbd+unix:///?socket={}", p(&sock));

        // One client rewrites the whole disk A -> B while others read it.
        let writer = {
            let (uri, braw) = (uri.clone(), braw.clone());
            std::thread::spawn(move || tool("nbdcopy", &[p(&braw), &uri]))
        };
        let mut reads = Vec::new();
        for k in 0..3 {
            let out = d.path().join(format!("{fmt}-read{k}.raw"));
            let o = tool("nbdcopy", &[&uri, p(&out)]);
            assert!(o.status.success(), "nbdcopy read: {:?}", o);
            reads.push(std::fs::read(&out).unwrap());
            // CLI readers meanwhile: locked, or a clean success.
            for args in [
                vec!["info", p(&img)],
                vec!["map", p(&img)],
                vec!["check", p(&img)],
            ] {
                let m = viridian_measured(&args);
                assert!(!m.panicked(), "{args:?} panicked: {}", m.stderr);
                assert!(
                    m.code == 0 || m.stderr.contains("locked"),
                    "{args:?}: exit {} without a clear error: {}",
                    m.code,
                    m.stderr
                );
            }
            let flat = d.path().join(format!("{fmt}-flat{k}.raw"));
            let m = viridian_measured(&["convert", "-O", "raw", p(&img), p(&flat)]);
            assert!(!m.panicked(), "convert panicked: {}", m.stderr);
            if m.code == 0 {
                reads.push(std::fs::read(&flat).unwrap());
            } else {
                assert!(m.stderr.contains("locked"), "convert: {}", m.stderr);
            }
        }
        let w = writer.join().unwrap();
        assert!(w.status.success(), "nbdcopy write: {:?}", w);
        for (k, r) in reads.iter().enumerate() {
            assert_eq!(r.len(), SIZE, "read {k} has the wrong size");
            for (i, s) in r.chunks(512).enumerate() {
                let rg = i * 512..(i + 1) * 512;
                assert!(
                    s == &a[rg.clone()] || s == &b[rg],
                    "{fmt}: read {k}: sector {i} is neither the old nor the new data"
                );
            }
        }
        // After the writer: everyone sees B.
        let out = d.path().join(format!("{fmt}-final.raw"));
        tool_ok("nbdcopy", &[&uri, p(&out)]);
        assert!(std::fs::read(&out).unwrap() == b, "{fmt}: final contents");
        drop(server);
        std::fs::remove_file(&braw).unwrap();
    }
}

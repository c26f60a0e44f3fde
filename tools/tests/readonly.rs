//! Read-only guarantee: `info`, `check` (no -r), `compare`, `map`, `measure`, a read-only
//! `mount` (reading every byte) and a read-only `serve` (nbdcopy reading every byte) change no
//! byte and no mtime of any image, for VHD fixed/dynamic/differencing, VHDX
//! fixed/dynamic/differencing and a dirty VHDX whose log still holds unapplied entries (made
//! by crashing a writer on a fault-injecting store; a read-only open must replay it in memory
//! only).

mod common;
#[allow(dead_code)]
#[path = "hostile/gen.rs"]
mod gen;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Every file's bytes, size and mtime (nanoseconds) in a directory.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, i64, i64)> {
    let mut v = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    for p in names {
        let m = std::fs::metadata(&p).unwrap();
        v.push((
            p.clone(),
            std::fs::read(&p).unwrap(),
            m.mtime(),
            m.mtime_nsec(),
        ));
    }
    v
}

fn assert_unchanged(before: &[(PathBuf, Vec<u8>, i64, i64)], dir: &Path, what: &str) {
    let after = snapshot(dir);
    assert_eq!(
        before.len(),
        after.len(),
        "{what}: files appeared or vanished"
    );
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.0, a.0, "{what}: file set changed");
        assert!(b.1 == a.1, "{what}: bytes of {} changed", b.0.display());
        assert_eq!(
            (b.2, b.3),
            (a.2, a.3),
            "{what}: mtime of {} changed",
            b.0.display()
        );
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(13) ^ seed).collect()
}

fn make(path: &Path, spec: &chain::CreateSpec, writes: &[(u64, u8)]) {
    let d = chain::create(path, spec).expect("create");
    for &(off, seed) in writes {
        d.write_at(&pattern(65536, seed), off).expect("write");
    }
    d.close().expect("close");
}

/// (name, directory holding the image and its parents, the image).
fn images(root: &Path) -> Vec<(String, PathBuf, PathBuf)> {
    let mut out = Vec::new();
    for (fmt, ext) in [(chain::Format::Vhd, "vhd"), (chain::Format::Vhdx, "vhdx")] {
        for kind in ["fixed", "dynamic", "diff"] {
            let dir = root.join(format!("{ext}-{kind}"));
            std::fs::create_dir_all(&dir).unwrap();
            let mut spec = chain::CreateSpec::new(fmt, 8 << 20);
            spec.fixed = kind == "fixed";
            spec.block_size = Some(1 << 20);
            let base = dir.join(format!("base.{ext}"));
            make(&base, &spec, &[(0, 1), (5 << 20, 2)]);
            let img = if kind == "diff" {
                let mut c = chain::CreateSpec::new(fmt, 0);
                c.parent = Some(base.clone());
                let child = dir.join(format!("child.{ext}"));
                make(&child, &c, &[(1 << 20, 3)]);
                child
            } else {
                base
            };
            out.push((format!("{ext}-{kind}"), dir, img));
        }
    }
    let dir = root.join("vhdx-dirty");
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join("base.vhdx");
    let mut spec = chain::CreateSpec::new(chain::Format::Vhdx, 8 << 20);
    spec.block_size = Some(1 << 20);
    make(&base, &spec, &[]);
    let dirty = gen::dirty_vhdx(&std::fs::read(&base).unwrap()).expect("a dirty VHDX");
    std::fs::remove_file(&base).unwrap();
    let img = dir.join("dirty.vhdx");
    std::fs::write(&img, dirty).unwrap();
    out.push(("vhdx-dirty".into(), dir, img));
    out
}

#[test]
fn read_only_commands_change_no_byte_and_no_mtime() {
    let root = tmp();
    let imgs = images(root.path());
    // mtimes are nanosecond-resolution here; make sure a write would show.
    std::thread::sleep(std::time::Duration::from_millis(20));
    for (name, dir, img) in &imgs {
        let before = snapshot(dir);
        let i = p(img);
        let info = ok(&["info", "--output", "json", i]);
        if name == "vhdx-dirty" {
            assert!(info.contains("dirty") || info.contains("log"), "{info}");
        }
        ok(&["info", "--backing-chain", i]);
        assert_unchanged(&before, dir, &format!("info {name}"));
        let o = viridian(&["check", i]);
        let c = o.status.code().unwrap_or(-1);
        // A pending log is reported as an error needing replay (exit 2), as qemu-img does;
        // check without -r must not replay it.
        let allowed = if name == "vhdx-dirty" {
            &[2, 3][..]
        } else {
            &[0, 3][..]
        };
        assert!(
            allowed.contains(&c),
            "check {name}: exit {c}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let cj = code(&["check", "--output", "json", i]);
        assert_eq!(c, cj, "check {name}: human and json exit codes differ");
        assert_unchanged(&before, dir, &format!("check {name}"));
        ok(&["compare", i, i]);
        assert_unchanged(&before, dir, &format!("compare {name}"));
        ok(&["map", i]);
        ok(&["map", "--output", "json", i]);
        assert_unchanged(&before, dir, &format!("map {name}"));
        ok(&["measure", "-O", "vhdx", i]);
        ok(&["measure", "-O", "vhd", i]);
        assert_unchanged(&before, dir, &format!("measure {name}"));
    }
}

#[test]
fn read_only_mount_and_serve_change_no_byte_and_no_mtime() {
    let root = tmp();
    let imgs = images(root.path());
    std::thread::sleep(std::time::Duration::from_millis(20));
    let fuse = fuse_usable();
    let nbd = have("nbdcopy");
    let mp = root.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    for (name, dir, img) in &imgs {
        let before = snapshot(dir);
        let flat = root.path().join(format!("{name}.raw"));
        ok(&["convert", "-O", "raw", p(img), p(&flat)]);
        let want = std::fs::read(&flat).unwrap();
        std::fs::remove_file(&flat).unwrap();
        if fuse {
            {
                let _g = MountGuard(mp.clone());
                ok(&["mount", p(img), p(&mp)]);
                let got = std::fs::read(mp.join("disk")).expect("read the mounted disk");
                assert!(got == want, "mount {name}: contents differ");
                // The kernel may still be releasing the file just read: retry while busy.
                let mut tries = 0;
                while code(&["unmount", p(&mp)]) != 0 {
                    tries += 1;
                    assert!(tries < 100, "unmount {name}: still busy after 5 s");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
            // The background server closes the image after the unmount.
            for _ in 0..200 {
                if !mounted(&mp) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            assert_unchanged(&before, dir, &format!("read-only mount {name}"));
        }
        if nbd {
            let sock = root.path().join(format!("{name}.sock"));
            let out = root.path().join(format!("{name}.nbd.raw"));
            {
                let _s = serve_start(&["--socket", p(&sock), p(img)], &sock)
                    .unwrap_or_else(|(c, e)| panic!("serve {name}: exit {c}: {e}"));
                let uri = format!("nbd+unix:///?socket={}", p(&sock));
                tool_ok("nbdcopy", &[&uri, p(&out)]);
            }
            let got = std::fs::read(&out).unwrap();
            std::fs::remove_file(&out).unwrap();
            assert!(got == want, "serve {name}: contents differ");
            assert_unchanged(&before, dir, &format!("read-only serve {name}"));
        }
    }
}

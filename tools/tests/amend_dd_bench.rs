//! The qemu-img verbs amend, dd and bench, and qemu-io's result lines in `io`, checked against
//! qemu-img/qemu-io on real images.

mod common;

use common::*;

fn stderr(args: &[&str]) -> (i32, String) {
    let o = viridian(args);
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn info_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&ok(&["info", "--output", "json", p(path)])).unwrap()
}

fn fmt_specific<'a>(v: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    &v["format-specific"]["data"][key]
}

/// subformat and block_size rewrite the base; its child keeps opening and reading through it.
#[test]
fn amend_rewrites_a_base_and_its_children_still_open() {
    let d = tmp();
    for (fmt, name, child) in [("vhdx", "b.vhdx", "c.vhdx"), ("vhd", "b.vhd", "c.vhd")] {
        let base = join(d.path(), name);
        let kid = join(d.path(), child);
        ok(&["create", "-q", "-f", fmt, p(&base), "8M"]);
        ok(&["io", "-c", "write -P 0x5a 0x100000 64k", p(&base)]);
        ok(&["create", "-q", "-f", fmt, "-b", p(&base), p(&kid)]);
        ok(&["io", "-c", "write -P 0x33 0 4k", p(&kid)]);
        let id_before = fmt_specific(&info_json(&base), "disk-identifier").clone();
        assert!(id_before.is_string(), "{fmt}: {id_before}");
        ok(&["amend", "-q", "-o", "subformat=fixed", p(&base)]);
        assert_eq!(
            fmt_specific(&info_json(&base), "disk-identifier"),
            &id_before,
            "{fmt}"
        );
        assert_eq!(
            fmt_specific(&info_json(&base), "vhd-type"),
            "fixed",
            "{fmt}"
        );
        ok(&[
            "io",
            "-c",
            "read -P 0x33 0 4k",
            "-c",
            "read -P 0x5a 1M 64k",
            p(&kid),
        ]);
        ok(&[
            "amend",
            "-q",
            "-o",
            "subformat=dynamic,block_size=2M",
            p(&base),
        ]);
        let j = info_json(&base);
        assert_eq!(fmt_specific(&j, "vhd-type"), "dynamic", "{fmt}");
        assert_eq!(fmt_specific(&j, "block-size"), 2 << 20, "{fmt}");
        ok(&["io", "-c", "read -P 0x5a 1M 64k", p(&kid)]);
        ok(&["check", p(&base)]);
        // A differencing image cannot be rewritten: it would lose its parent link.
        let (c, e) = stderr(&["amend", "-o", "subformat=fixed", p(&kid)]);
        assert_eq!(c, 1, "{e}");
        assert!(e.contains("differencing image is not supported"), "{e}");
        // No temporary file is left beside the images.
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

#[test]
fn amend_changes_the_vhdx_physical_sector_size_in_place() {
    let d = tmp();
    let a = join(d.path(), "a.vhdx");
    ok(&["create", "-q", "-f", "vhdx", p(&a), "8M"]);
    ok(&["io", "-c", "write -P 7 0 4k", p(&a)]);
    assert_eq!(fmt_specific(&info_json(&a), "physical-sector-size"), 4096);
    ok(&["amend", "-o", "physical_sector_size=512", p(&a)]);
    assert_eq!(fmt_specific(&info_json(&a), "physical-sector-size"), 512);
    ok(&["io", "-c", "read -P 7 0 4k", p(&a)]);
    if have("qemu-img") {
        tool_ok("qemu-img", &["check", p(&a)]);
    }
}

#[test]
fn amend_refuses_what_it_cannot_change_like_qemu_img() {
    let d = tmp();
    let a = join(d.path(), "a.vhdx");
    let r = join(d.path(), "a.raw");
    ok(&["create", "-q", "-f", "vhdx", p(&a), "8M"]);
    ok(&["create", "-q", "-f", "raw", p(&r), "8M"]);
    let before = read_all(&a);
    for (args, want) in [
        (vec!["amend", p(&a)], "Must specify options (-o)"),
        (
            vec!["amend", "-o", "log_size=4M", p(&a)],
            "only supported for image creation",
        ),
        (
            vec!["amend", "-o", "nosuch=1", p(&a)],
            "Invalid parameter 'nosuch'",
        ),
        (
            vec!["amend", "-o", "subformat=fixed", p(&r)],
            "does not support option amendment",
        ),
    ] {
        let (c, e) = stderr(&args);
        assert_eq!(c, 1, "{args:?}: {e}");
        assert!(e.contains(want), "{args:?}: {e}");
    }
    assert_eq!(read_all(&a), before, "a refused amend changed the image");
    let help = ok(&["amend", "-o", "help", p(&a)]);
    for key in ["physical_sector_size", "subformat", "block_size"] {
        assert!(help.contains(key), "{help}");
    }
}

/// dd's output is byte-identical to qemu-img dd's for the same operands.
#[test]
fn dd_writes_what_qemu_img_dd_writes() {
    if !have("qemu-img") {
        return;
    }
    let d = tmp();
    let src = join(d.path(), "s.raw");
    patterned_raw(&src, 8 << 20, 3);
    for ops in [
        "bs=1M skip=2 count=3",
        "bs=1M skip=1 count=5",
        "bs=64k count=7",
        "bs=3 count=1000",
        "bs=1M skip=9",
        "bs=1M",
    ] {
        let q = join(d.path(), "q.raw");
        let v = join(d.path(), "v.raw");
        let qi = format!("if={}", p(&src));
        let qo = format!("of={}", p(&q));
        let vo = format!("of={}", p(&v));
        let mut qa = vec!["dd", "-f", "raw", qi.as_str(), qo.as_str()];
        let mut va = vec!["dd", "-f", "raw", qi.as_str(), vo.as_str()];
        qa.extend(ops.split(' '));
        va.extend(ops.split(' '));
        let qc = tool("qemu-img", &qa).status.code();
        let vc = viridian(&va).status.code();
        assert_eq!(qc, vc, "{ops}");
        assert!(read_all(&q) == read_all(&v), "{ops}: outputs differ");
    }
    // An existing output is replaced, in the -O format.
    let out = join(d.path(), "o.vhdx");
    std::fs::write(&out, b"old").unwrap();
    let i = format!("if={}", p(&src));
    let o = format!("of={}", p(&out));
    ok(&["dd", "-O", "vhdx", &i, &o, "bs=1M", "count=2"]);
    let r = join(d.path(), "back.raw");
    tool_ok("qemu-img", &["convert", "-O", "raw", p(&out), p(&r)]);
    assert!(
        read_all(&r) == read_all(&src)[..2 << 20],
        "dd -O vhdx wrote other bytes"
    );
}

#[test]
fn bench_prints_qemu_img_lines_and_fails_past_the_end() {
    let d = tmp();
    let a = join(d.path(), "a.vhdx");
    ok(&["create", "-q", "-f", "vhdx", p(&a), "8M"]);
    let out = ok(&[
        "bench",
        "-w",
        "-c",
        "200",
        "-d",
        "4",
        "-s",
        "4k",
        "-o",
        "1M",
        "-S",
        "8k",
        "--pattern",
        "0x5a",
        "--flush-interval",
        "50",
        p(&a),
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "Sending 200 write requests, 4096 bytes each, 4 in parallel \
         (starting at offset 1048576, step size 8192)"
    );
    assert_eq!(lines[1], "Sending flush every 50 requests");
    assert!(lines[2].starts_with("Run completed in ") && lines[2].ends_with(" seconds."));
    // The writes landed where qemu-img bench puts them: every other 4 KiB from 1 MiB.
    ok(&[
        "io",
        "-c",
        "read -P 0x5a 1M 4k",
        "-c",
        "read -P 0 0x101000 4k",
        p(&a),
    ]);
    // 0, 2M, 4M, 6M: the last 3 MiB request crosses the end.
    assert_eq!(
        code(&["bench", "-c", "4", "-d", "1", "-s", "3M", "-S", "2M", p(&a)]),
        1
    );
    assert_eq!(
        code(&["bench", "-c", "4", "--flush-interval", "3", p(&a)]),
        1
    );
    assert_eq!(code(&["bench", "-c", "4", "-d", "0", p(&a)]), 1);
    // As qemu-img: no request is no benchmark; a step of 0 is the default step (the size).
    let (c, e) = stderr(&["bench", "-c", "0", p(&a)]);
    assert_eq!(c, 1, "{e}");
    assert!(e.contains("Invalid request count"), "{e}");
    let out = ok(&["bench", "-c", "3", "-d", "1", "-s", "4k", "-S", "0", p(&a)]);
    assert!(out.contains("step size 4096"), "{out}");
}

/// `-t writethrough` makes every write durable before the next (one flush each, counted with
/// strace, which scripts/setup.sh installs); the O_DIRECT modes are refused, not measured as
/// page-cache numbers.
#[test]
fn bench_cache_modes_do_what_they_say_or_are_refused() {
    let d = tmp();
    let a = join(d.path(), "a.raw");
    ok(&["create", "-q", "-f", "raw", p(&a), "8M"]);
    for mode in ["none", "directsync"] {
        let (c, e) = stderr(&["bench", "-w", "-t", mode, "-c", "4", p(&a)]);
        assert_eq!(c, 1, "{mode}: {e}");
        assert!(e.contains("O_DIRECT"), "{mode}: {e}");
    }
    let syncs = |mode: &str| -> usize {
        let out = std::process::Command::new("strace")
            .args(["-f", "-e", "trace=fsync,fdatasync", "-o"])
            .arg(d.path().join("trace"))
            .arg(env!("CARGO_BIN_EXE_viridian"))
            .args([
                "bench",
                "-q",
                "-w",
                "-t",
                mode,
                "-c",
                "40",
                "-d",
                "2",
                p(&a),
            ])
            .output()
            .expect("strace (scripts/setup.sh installs it)");
        assert!(out.status.success(), "{mode}: {out:?}");
        std::fs::read_to_string(d.path().join("trace"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("sync(")) // a call started (strace -f may split it)
            .count()
    };
    let through = syncs("writethrough");
    let back = syncs("writeback");
    assert!(through >= 40, "writethrough: {through} syncs for 40 writes");
    assert!(back < 5, "writeback: {back} syncs for 40 writes");
}

/// qemu-io's limit on one command (2 GiB less a sector) holds before any I/O: a huge length
/// fails at once instead of running in pieces for hours.
#[test]
fn io_refuses_a_command_longer_than_qemu_io_allows() {
    let d = tmp();
    let a = join(d.path(), "a.vhdx");
    ok(&["create", "-q", "-f", "vhdx", p(&a), "8T"]);
    let t = std::time::Instant::now();
    for cmd in ["read 0 2G", "write 0 0x7ffffe01", "read 0 4T"] {
        let (c, e) = stderr(&["io", "-c", cmd, p(&a)]);
        assert_eq!(c, 1, "{cmd}: {e}");
        assert!(e.contains("cannot exceed 2147483136"), "{cmd}: {e}");
    }
    assert!(
        t.elapsed().as_secs() < 20,
        "refusing took {:?}",
        t.elapsed()
    );
    // The largest allowed length itself is accepted (as a zero write: no buffer to fill).
    ok(&["io", "-c", "write -z 0 0x7ffffe00", p(&a)]);
}

/// Sizes follow qemu-img: a fraction needs a unit, anything but plain decimal is refused.
#[test]
fn sizes_with_a_fraction_need_a_unit() {
    let d = tmp();
    let a = join(d.path(), "a.raw");
    for bad in ["1.5", "1e6", "0x1.8"] {
        let (c, e) = stderr(&["create", "-q", "-f", "raw", p(&a), bad]);
        assert_eq!(c, 1, "{bad}: {e}");
        assert!(!a.exists(), "{bad}: an image was made");
    }
    ok(&["create", "-q", "-f", "raw", p(&a), "1.5k"]);
    assert_eq!(std::fs::metadata(&a).unwrap().len(), 1536);
}

#[test]
fn io_prints_qemu_io_lines() {
    let d = tmp();
    let a = join(d.path(), "a.vhdx");
    ok(&["create", "-q", "-f", "vhdx", p(&a), "8M"]);
    let o = viridian(&[
        "io",
        "-c",
        "write -P 0x41 0x100000 0x14",
        "-c",
        "read -v 0x100000 20",
        "-c",
        "write -z 0x100000 4k",
        "-c",
        "read -P 0x41 0x100000 4k",
        p(&a),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "wrote 20/20 bytes at offset 1048576");
    assert!(lines[1].starts_with("20 bytes, 1 ops; ") && lines[1].ends_with(" ops/sec)"));
    assert_eq!(
        lines[2],
        "00100000:  41 41 41 41 41 41 41 41 41 41 41 41 41 41 41 41  AAAAAAAAAAAAAAAA"
    );
    assert_eq!(lines[3], "00100010:  41 41 41 41  AAAA");
    assert_eq!(lines[4], "read 20/20 bytes at offset 1048576");
    assert_eq!(lines[6], "wrote 4096/4096 bytes at offset 1048576");
    assert_eq!(
        lines[8],
        "Pattern verification failed at offset 1048576, 4096 bytes"
    );
    if have("qemu-io") {
        let q = tool(
            "qemu-io",
            &["-f", "vhdx", "-c", "read -P 0 0x100000 4k", p(&a)],
        );
        assert_eq!(q.status.code(), Some(0), "qemu-io does not read the zeroes");
    }
}

/// A rewrite that cannot finish (the file system fills up) leaves the original byte for byte
/// and no temporary file; needs a small tmpfs (root).
#[test]
fn a_failed_amend_rewrite_leaves_the_original() {
    let d = tmp();
    let mnt = join(d.path(), "small");
    std::fs::create_dir(&mnt).unwrap();
    let m = tool(
        "mount",
        &["-t", "tmpfs", "-o", "size=12m", "tmpfs", p(&mnt)],
    );
    if !m.status.success() {
        assert!(
            !require_all(),
            "cannot mount a tmpfs (VIRIDIAN_REQUIRE_ALL=1)"
        );
        eprintln!(
            "SKIP: cannot mount a tmpfs: {}",
            String::from_utf8_lossy(&m.stderr)
        );
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(mnt.clone());
    let a = join(&mnt, "a.vhdx");
    ok(&["create", "-q", "-f", "vhdx", p(&a), "8M"]);
    ok(&["io", "-c", "write -P 0x77 0 5M", p(&a)]);
    let before = read_all(&a);
    // A fixed 8 MiB copy does not fit beside the 5 MiB of data in 12 MiB.
    let o = viridian(&["amend", "-o", "subformat=fixed", p(&a)]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("it is unchanged"), "{e}");
    assert!(read_all(&a) == before, "the original changed");
    let names: Vec<_> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["a.vhdx".to_string()]);
    ok(&["io", "-c", "read -P 0x77 0 5M", p(&a)]);
}

/// A rewrite through a symbolic link rewrites the link's target and keeps the link; the owner
/// and mode survive; a file with several hard links is refused; a temporary file left by a
/// killed amend is cleaned up by the next one.
#[test]
fn amend_rewrites_the_real_file_and_keeps_its_names() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let d = tmp();
    let real = join(d.path(), "real.vhdx");
    let link = join(d.path(), "link.vhdx");
    ok(&["create", "-q", "-f", "vhdx", p(&real), "8M"]);
    ok(&["io", "-c", "write -P 0x33 1M 64k", p(&real)]);
    std::os::unix::fs::symlink("real.vhdx", &link).unwrap();
    std::os::unix::fs::chown(&real, Some(4321), Some(8765)).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();
    let stale = join(d.path(), ".real.vhdx.amend-2147483646");
    std::fs::write(&stale, b"left by a killed amend").unwrap();

    ok(&["amend", "-q", "-o", "subformat=fixed", p(&link)]);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        std::path::Path::new("real.vhdx")
    );
    let m = std::fs::metadata(&real).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (4321, 8765, 0o640));
    assert_eq!(fmt_specific(&info_json(&real), "vhd-type"), "fixed");
    ok(&[
        "io",
        "-c",
        "read -P 0x33 1M 64k",
        "-c",
        "read -P 0 0 1M",
        p(&link),
    ]);
    assert!(!stale.exists(), "the stale temporary file is still there");
    let names = std::fs::read_dir(d.path()).unwrap().count();
    assert_eq!(names, 2, "a temporary file was left");

    let hard = join(d.path(), "hard.vhdx");
    std::fs::hard_link(&real, &hard).unwrap();
    let before = read_all(&real);
    let (c, e) = stderr(&["amend", "-o", "subformat=dynamic", p(&hard)]);
    assert_eq!(c, 1, "{e}");
    assert!(e.contains("hard links"), "{e}");
    assert!(read_all(&real) == before, "the image changed");
    assert_eq!(
        std::fs::metadata(&real).unwrap().ino(),
        std::fs::metadata(&hard).unwrap().ino()
    );
}

/// An image another process holds for writing is not amended, neither rewritten nor changed
/// in place.
#[test]
fn amend_refuses_an_image_held_for_writing() {
    let d = tmp();
    let a = join(d.path(), "a.vhdx");
    let sock = join(d.path(), "s.sock");
    ok(&["create", "-q", "-f", "vhdx", p(&a), "8M"]);
    let _server = serve_start(&["--socket", p(&sock), "--rw", p(&a)], &sock)
        .unwrap_or_else(|(c, e)| panic!("serve --rw: exit {c}: {e}"));
    for o in ["subformat=fixed", "physical_sector_size=512"] {
        let (c, e) = stderr(&["amend", "-o", o, p(&a)]);
        assert_eq!(c, 1, "{o}: {e}");
        assert!(e.contains("locked"), "{o}: {e}");
    }
    let names = std::fs::read_dir(d.path()).unwrap().count();
    assert_eq!(names, 2, "a temporary file was left");
}

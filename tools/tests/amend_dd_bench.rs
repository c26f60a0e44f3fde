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

//! End-to-end tests of the `viridian` binary against qemu-img 10 as the reference.

mod common;

use common::*;
use serde_json::Value;

fn json(args: &[&str]) -> Value {
    serde_json::from_str(&ok(args)).expect("valid JSON")
}

fn qemu_json(args: &[&str]) -> Value {
    serde_json::from_str(&tool_ok("qemu-img", args)).expect("valid JSON from qemu-img")
}

/// Our `info --output json` agrees with qemu-img's on the keys both have.
fn assert_info_matches_qemu(path: &str, qemu_fmt: &str) {
    let ours = json(&["info", "--output", "json", path]);
    let theirs = qemu_json(&["info", "-f", qemu_fmt, "--output", "json", path]);
    for key in ["virtual-size", "format", "dirty-flag"] {
        assert_eq!(ours[key], theirs[key], "{key} differs for {path}");
    }
    if theirs.get("cluster-size").is_some() {
        assert_eq!(
            ours["cluster-size"], theirs["cluster-size"],
            "cluster-size for {path}"
        );
    }
}

#[test]
fn create_info_matches_qemu_for_every_format() {
    if !have("qemu-img") {
        return;
    }
    let d = tmp();
    let cases: &[(&str, &[&str], &str)] = &[
        ("dyn.vhdx", &["-f", "vhdx"], "vhdx"),
        ("fix.vhdx", &["-f", "vhdx", "-o", "subformat=fixed"], "vhdx"),
        ("bs.vhdx", &["-f", "vhdx", "-o", "block_size=8M"], "vhdx"),
        ("dyn.vhd", &["-f", "vhd"], "vpc"),
        ("fix.vhd", &["-f", "vpc", "-o", "subformat=fixed"], "vpc"),
        ("r.raw", &["-f", "raw"], "raw"),
    ];
    for (name, fmt_args, qfmt) in cases {
        let path = join(d.path(), name);
        let mut args = vec!["create"];
        args.extend_from_slice(fmt_args);
        args.push(p(&path));
        args.push("64M");
        ok(&args);
        assert_info_matches_qemu(p(&path), qfmt);
        let info = json(&["info", "--output", "json", p(&path)]);
        assert_eq!(info["virtual-size"], 64 << 20, "{name}");
        if *qfmt != "raw" {
            let check = tool("qemu-img", &["check", "-f", qfmt, p(&path)]);
            // qemu has no check for vpc (exit 63); everything else must be clean.
            let c = check.status.code().unwrap();
            assert!(
                c == 0 || (c == 63 && *qfmt == "vpc"),
                "qemu-img check {name}: {c}"
            );
            assert_eq!(code(&["check", p(&path)]), 0, "our check of {name}");
        }
    }
}

#[test]
fn convert_round_trips_match_qemu() {
    if !have("qemu-img") {
        return;
    }
    let d = tmp();
    let src = join(d.path(), "src.raw");
    patterned_raw(&src, 40 << 20, 7);
    for (fmt, qfmt, opts) in [
        ("vhdx", "vhdx", ""),
        ("vhdx", "vhdx", "subformat=fixed"),
        ("vhd", "vpc", ""),
        ("vhd", "vpc", "subformat=fixed"),
    ] {
        let img = join(d.path(), &format!("out-{fmt}-{}.img", opts.len()));
        let back = join(d.path(), &format!("back-{fmt}-{}.raw", opts.len()));
        let mut args = vec!["convert", "-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([p(&src), p(&img)]);
        ok(&args);
        // qemu reads our image identically to the source.
        let cmp = tool(
            "qemu-img",
            &["compare", "-f", qfmt, "-F", "raw", p(&img), p(&src)],
        );
        assert!(
            cmp.status.success(),
            "qemu-img compare {fmt} {opts}: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
        if qfmt == "vhdx" {
            tool_ok("qemu-img", &["check", "-f", "vhdx", p(&img)]);
        }
        assert_eq!(code(&["check", p(&img)]), 0);
        // And back to raw: byte-identical.
        ok(&["convert", "-O", "raw", p(&img), p(&back)]);
        assert!(read_all(&back) == read_all(&src), "{fmt} {opts} round trip");
        // qemu-made image of the same data reads the same through us.
        let qimg = join(d.path(), &format!("q-{fmt}-{}.img", opts.len()));
        let mut qargs = vec!["convert", "-O", qfmt];
        if !opts.is_empty() {
            qargs.extend(["-o", opts]);
        }
        if qfmt == "vpc" {
            qargs.extend(["-o", "force_size=on"]);
        }
        qargs.extend([p(&src), p(&qimg)]);
        tool_ok("qemu-img", &qargs);
        assert_eq!(
            code(&["compare", p(&qimg), p(&src)]),
            0,
            "ours reads qemu's {fmt} {opts}"
        );
    }
}

#[test]
fn sparse_convert_keeps_holes() {
    let d = tmp();
    let src = join(d.path(), "s.raw");
    patterned_raw(&src, 64 << 20, 3);
    let out = join(d.path(), "s.vhdx");
    ok(&["convert", "-O", "vhdx", p(&src), p(&out)]);
    let map: Value = json(&["map", "--output", "json", p(&out)]);
    let items = map.as_array().unwrap();
    let data: u64 = items
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        data > 0 && data < 60 << 20,
        "data bytes {data} should be a part of 64 MiB"
    );
    let file_len = std::fs::metadata(&out).unwrap().len();
    assert!(
        file_len < 60 << 20,
        "file {file_len} should be sparse-sized"
    );
}

#[test]
fn compare_exit_codes_follow_qemu() {
    let d = tmp();
    let a = join(d.path(), "a.raw");
    let b = join(d.path(), "b.raw");
    patterned_raw(&a, 4 << 20, 5);
    std::fs::copy(&a, &b).unwrap();
    assert_eq!(code(&["compare", p(&a), p(&b)]), 0);
    ok(&["io", "-c", "write -P 0x11 1M 512", p(&b)]);
    let o = viridian(&["compare", p(&a), p(&b)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Content mismatch at offset 1048576!"));
    assert_eq!(code(&["compare", p(&a), p(&join(d.path(), "missing"))]), 2);
}

#[test]
fn vhd_map_matches_qemu() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tmp();
    let img = join(d.path(), "m.vhd");
    tool_ok(
        "qemu-img",
        &["create", "-f", "vpc", "-o", "force_size=on", p(&img), "64M"],
    );
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "vpc",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0x5b 10M 2M",
            p(&img),
        ],
    );
    let ours = json(&["map", "--output", "json", p(&img)]);
    let theirs = qemu_json(&["map", "-f", "vpc", "--output", "json", p(&img)]);
    let strip = |v: &Value| -> Vec<(u64, u64, bool, bool, bool, Option<u64>)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["present"].as_bool().unwrap(),
                    e["zero"].as_bool().unwrap(),
                    e["data"].as_bool().unwrap(),
                    e.get("offset").and_then(Value::as_u64),
                )
            })
            .collect()
    };
    assert_eq!(strip(&ours), strip(&theirs));
}

/// base -> child -> grandchild, in both formats: commit, rebase, and flattening convert all
/// keep the merged view.
#[test]
fn chains_commit_rebase_and_flatten() {
    for fmt in ["vhd", "vhdx"] {
        let d = tmp();
        let base = join(d.path(), &format!("base.{fmt}"));
        let child = join(d.path(), &format!("child.{fmt}"));
        let grand = join(d.path(), &format!("grand.{fmt}"));
        ok(&["create", "-f", fmt, p(&base), "32M"]);
        ok(&[
            "io",
            "-c",
            "write -P 0x01 0 4M",
            "-c",
            "write -P 0x02 8M 1M",
            p(&base),
        ]);
        let base_before = read_all(&base);
        ok(&["create", "-f", fmt, "-b", p(&base), p(&child)]);
        ok(&[
            "io",
            "-c",
            "write -P 0x03 1M 512",
            "-c",
            "write -P 0x04 20M 3M",
            p(&child),
        ]);
        assert_eq!(
            read_all(&base),
            base_before,
            "{fmt}: writing the child touched the base"
        );
        ok(&["snapshot", "-c", p(&grand), p(&child)]);
        ok(&["io", "-c", "write -P 0x05 2M 4096", p(&grand)]);
        ok(&[
            "io",
            "-r",
            "-c",
            "read -P 0x01 0 1M",
            "-c",
            "read -P 0x03 1M 512",
            "-c",
            "read -P 0x05 2M 4096",
            "-c",
            "read -P 0x02 8M 1M",
            "-c",
            "read -P 0x04 20M 3M",
            "-c",
            "read -P 0 30M 1M",
            p(&grand),
        ]);

        // Flatten the chain.
        let flat = join(d.path(), "flat.raw");
        ok(&["convert", "-O", "raw", p(&grand), p(&flat)]);
        assert_eq!(code(&["compare", p(&grand), p(&flat)]), 0);

        // Unsafe-free rebase of grand onto base: the view must not change.
        ok(&["rebase", "-b", p(&base), p(&grand)]);
        assert_eq!(
            code(&["compare", p(&grand), p(&flat)]),
            0,
            "{fmt}: rebase changed contents"
        );
        let info = json(&["info", "--output", "json", p(&grand)]);
        assert!(info["full-backing-filename"]
            .as_str()
            .unwrap()
            .ends_with(&format!("base.{fmt}")));

        // Commit grand into base: base now reads as the flattened view.
        ok(&["commit", p(&grand)]);
        assert_eq!(
            code(&["compare", p(&base), p(&flat)]),
            0,
            "{fmt}: commit result"
        );
        assert_eq!(code(&["check", p(&base)]), 0);
        // The chain still opens (re-linked) and reads the same.
        assert_eq!(code(&["compare", p(&grand), p(&flat)]), 0);
    }
}

#[test]
fn commit_to_chosen_base_and_unsafe_rebase() {
    for fmt in ["vhd", "vhdx"] {
        let d = tmp();
        let base = join(d.path(), &format!("b.{fmt}"));
        let mid = join(d.path(), &format!("m.{fmt}"));
        let top = join(d.path(), &format!("t.{fmt}"));
        ok(&["create", "-f", fmt, p(&base), "16M"]);
        ok(&["io", "-c", "write -P 0x0a 0 2M", p(&base)]);
        ok(&["create", "-f", fmt, "-b", p(&base), p(&mid)]);
        ok(&["io", "-c", "write -P 0x0b 1M 1M", p(&mid)]);
        ok(&["create", "-f", fmt, "-b", p(&mid), p(&top)]);
        ok(&["io", "-c", "write -P 0x0c 3M 1M", p(&top)]);
        let flat = join(d.path(), "flat.raw");
        ok(&["convert", "-O", "raw", p(&top), p(&flat)]);
        ok(&["commit", "-b", p(&base), "--remove", p(&top)]);
        assert!(
            !top.exists() && !mid.exists(),
            "--remove deletes merged layers"
        );
        assert_eq!(code(&["compare", p(&base), p(&flat)]), 0);

        // -u rebase: a copy of the parent under another name is accepted as-is.
        let child = join(d.path(), &format!("c.{fmt}"));
        ok(&["create", "-f", fmt, "-b", p(&base), p(&child)]);
        let moved = join(d.path(), &format!("moved.{fmt}"));
        std::fs::rename(&base, &moved).unwrap();
        assert_ne!(
            code(&["io", "-r", "-c", "read 0 512", p(&child)]),
            0,
            "parent gone"
        );
        ok(&["rebase", "-u", "-b", p(&moved), p(&child)]);
        ok(&["io", "-r", "-c", "read -P 0x0a 0 1M", p(&child)]);
    }
}

#[test]
fn resize_and_compact_keep_contents() {
    for fmt in ["vhd", "vhdx"] {
        let d = tmp();
        let img = join(d.path(), &format!("r.{fmt}"));
        ok(&["create", "-f", fmt, p(&img), "16M"]);
        ok(&["io", "-c", "write -P 0x77 0 8M", p(&img)]);
        let before = join(d.path(), "before.raw");
        ok(&["convert", "-O", "raw", p(&img), p(&before)]);
        ok(&["resize", p(&img), "+16M"]);
        let info = json(&["info", "--output", "json", p(&img)]);
        assert_eq!(info["virtual-size"], 32 << 20);
        // Grown tail reads zero; old contents unchanged.
        assert_eq!(code(&["compare", p(&img), p(&before)]), 0);
        assert_eq!(
            code(&["resize", p(&img), "8M"]),
            1,
            "shrink without --shrink refused"
        );

        // Zero most of the data, then compact: contents equal, file smaller.
        ok(&["io", "-c", "write -P 0 0 6M", p(&img)]);
        let zeroed = join(d.path(), "zeroed.raw");
        ok(&["convert", "-O", "raw", p(&img), p(&zeroed)]);
        let len_before = std::fs::metadata(&img).unwrap().len();
        ok(&["compact", p(&img)]);
        let len_after = std::fs::metadata(&img).unwrap().len();
        assert!(
            len_after < len_before,
            "{fmt}: compact {len_before} -> {len_after}"
        );
        assert_eq!(code(&["compare", p(&img), p(&zeroed)]), 0);
        assert_eq!(code(&["check", p(&img)]), 0);
    }
}

#[test]
fn check_exit_codes() {
    let d = tmp();
    let raw = join(d.path(), "x.raw");
    ok(&["create", "-f", "raw", p(&raw), "1M"]);
    assert_eq!(code(&["check", p(&raw)]), 63);
    let img = join(d.path(), "t.vhdx");
    ok(&["create", "-f", "vhdx", p(&img), "64M"]);
    ok(&["io", "-c", "write -P 1 0 32M", p(&img)]);
    assert_eq!(code(&["check", p(&img)]), 0);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(8 << 20).unwrap();
    drop(f);
    let o = viridian(&["check", "--output", "json", p(&img)]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["corruptions"].as_u64().unwrap() > 0);
    assert_eq!(v["check-errors"], 0);
}

#[test]
fn errors_are_one_line_and_exit_1() {
    let d = tmp();
    let o = viridian(&["info", p(&join(d.path(), "nope.vhdx"))]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("viridian: ") && err.contains("nope.vhdx"),
        "{err}"
    );
    let o = viridian(&["create", "-f", "vhdx", p(&join(d.path(), "a.vhdx")), "12Q"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
}

#[test]
fn dfvfs_differencing_reports_missing_parent() {
    let img = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/testdata/dfvfs/fat-differential.vhd");
    if !img.exists() {
        if require_all() {
            panic!("shared test data missing: {}", img.display());
        }
        eprintln!("SKIP: {} not present", img.display());
        return;
    }
    // info shows the image's own metadata and succeeds, as qemu-img info does, warning about
    // the missing parent and naming what it tried; following the chain fails.
    assert_eq!(code(&["info", "--backing-chain", p(&img)]), 1);
    let o = viridian(&["info", "--output", "json", p(&img)]);
    assert_eq!(o.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format"], "vpc");
    assert!(v["backing-filename"].is_string());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not found") && err.contains("tried"), "{err}");
    // Reading it fails clearly, naming the paths tried.
    let o = viridian(&[
        "convert",
        "-O",
        "raw",
        p(&img),
        "/tmp/viridian-never-written.raw",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("parent") && err.contains("tried"), "{err}");
    assert!(!std::path::Path::new("/tmp/viridian-never-written.raw").exists());
}

#[test]
fn run_reports_bad_vm_descriptions_clearly() {
    let d = tmp();
    let toml = join(d.path(), "vm.toml");
    std::fs::write(
        &toml,
        "name = \"x\"\nmemory_mib = 64\n[[disk]]\npath = \"a.vhdx\"\n",
    )
    .unwrap();
    let o = viridian(&["run", p(&toml)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no kernel"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::write(&toml, "name = \"x\"\nbogus = 1\n").unwrap();
    let o = viridian(&["run", "--kernel", "/nonexistent", p(&toml)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a valid VM description"));
    let o = viridian(&["run", "--kernel", "/nonexistent", "--disk", "x.vhdx,bogus"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown option"));
}

#[test]
fn measure_predicts_converted_sizes() {
    let d = tmp();
    let src = join(d.path(), "m.raw");
    patterned_raw(&src, 48 << 20, 9);
    for fmt in ["vhd", "vhdx"] {
        let m = json(&["measure", "--output", "json", "-O", fmt, p(&src)]);
        let required = m["required"].as_u64().unwrap();
        let full = m["fully-allocated"].as_u64().unwrap();
        assert!(full >= required && full >= 48 << 20, "{fmt}: {m}");
        let out = join(d.path(), &format!("m.{fmt}"));
        ok(&["convert", "-O", fmt, p(&src), p(&out)]);
        let actual = std::fs::metadata(&out).unwrap().len();
        assert!(
            actual <= required,
            "{fmt}: file {actual} > required {required}"
        );
        assert!(
            required - actual < 16 << 20,
            "{fmt}: estimate {required} far above {actual}"
        );
        let empty = json(&["measure", "--output", "json", "-O", fmt, "--size", "1G"]);
        assert!(
            empty["required"].as_u64().unwrap() < 8 << 20,
            "{fmt}: empty image {empty}"
        );
        assert!(empty["fully-allocated"].as_u64().unwrap() >= 1 << 30);
    }
}

#[test]
fn info_backing_chain_lists_every_layer() {
    let d = tmp();
    let base = join(d.path(), "b.vhdx");
    let mid = join(d.path(), "m.vhdx");
    let top = join(d.path(), "t.vhdx");
    ok(&["create", "-f", "vhdx", p(&base), "16M"]);
    ok(&["create", "-f", "vhdx", "-b", p(&base), p(&mid)]);
    ok(&["create", "-f", "vhdx", "-b", p(&mid), p(&top)]);
    ok(&["io", "-c", "write -P 1 0 1M", p(&top)]);
    let v = json(&["info", "--backing-chain", "--output", "json", p(&top)]);
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 3);
    assert!(arr[0]["backing-filename"]
        .as_str()
        .unwrap()
        .contains("m.vhdx"));
    assert!(arr[1]["full-backing-filename"]
        .as_str()
        .unwrap()
        .ends_with("b.vhdx"));
    assert!(arr[2].get("backing-filename").is_none());
    let data = &arr[0]["format-specific"]["data"];
    assert_eq!(data["allocated-bytes"], 1 << 20);
    let human = ok(&["info", p(&top)]);
    assert!(
        human.contains("virtual size: 16 MiB (16777216 bytes)") && human.contains("backing file:"),
        "{human}"
    );
}

#[test]
fn interrupted_convert_removes_the_target_and_keeps_the_source() {
    use std::time::{Duration, Instant};
    let d = tmp();
    let src = join(d.path(), "big.raw");
    // A sparse 2 GiB source written out in full (-S 0): seconds of work, so SIGINT lands mid-copy.
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(2 << 30).unwrap();
    drop(f);
    ok(&["io", "-c", "write -P 0x33 0 1M", p(&src)]);
    let before = std::fs::metadata(&src).unwrap().modified().unwrap();
    let out = join(d.path(), "out.vhdx");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args([
            "convert",
            "-S",
            "0",
            "-m",
            "1",
            "-t",
            "writeback",
            "-O",
            "vhdx",
            p(&src),
            p(&out),
        ])
        .spawn()
        .unwrap();
    // The target is written under a temporary name beside it until it is complete.
    let partial_len = || {
        std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".out.vhdx.convert-")
            })
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .max()
    };
    let start = Instant::now();
    while partial_len().unwrap_or(0) < 64 << 20 && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "convert should stop with 130 (128 + SIGINT) when interrupted"
    );
    assert!(!out.exists(), "half-written target left behind");
    assert_eq!(
        partial_len(),
        None,
        "half-written temporary file left behind"
    );
    assert_eq!(std::fs::metadata(&src).unwrap().modified().unwrap(), before);
    ok(&["io", "-r", "-c", "read -P 0x33 0 1M", p(&src)]);
}

#[test]
fn convert_allocates_target_blocks_in_order() {
    let d = tmp();
    let src = join(d.path(), "f.raw");
    patterned_raw(&src, 64 << 20, 13);
    for fmt in ["vhd", "vhdx"] {
        let out = join(d.path(), &format!("f.{fmt}"));
        ok(&["convert", "-m", "8", "-O", fmt, p(&src), p(&out)]);
        let info = json(&["info", "--output", "json", p(&out)]);
        let frag = &info["format-specific"]["data"]["fragmentation-percent"];
        assert_eq!(
            frag.as_f64(),
            Some(0.0),
            "{fmt}: blocks allocated out of order: {info}"
        );
        assert_eq!(code(&["compare", p(&out), p(&src)]), 0);
    }
}

/// `convert -C` (copy offloading): VHDX -> raw and raw -> raw through copy_file_range give the
/// source's bytes, leave the source's holes as holes, and `-C` with `-S` is refused as qemu-img
/// refuses it.
#[test]
fn convert_copy_offloading_keeps_bytes_and_holes() {
    let d = tmp();
    let src = join(d.path(), "src.raw");
    patterned_raw(&src, 32 << 20, 11);
    let vhdx = join(d.path(), "src.vhdx");
    ok(&["convert", "-O", "vhdx", p(&src), p(&vhdx)]);
    let on_disk = |path: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).expect("stat").blocks() * 512
    };
    for (from, name) in [(&vhdx, "from-vhdx.raw"), (&src, "from-raw.raw")] {
        let out = join(d.path(), name);
        ok(&["convert", "-C", "-O", "raw", p(from), p(&out)]);
        assert!(
            read_all(&out) == read_all(&src),
            "{name} differs from the source"
        );
        assert!(
            on_disk(&out) <= on_disk(&src) + (1 << 20),
            "{name} occupies {} bytes, the source {}",
            on_disk(&out),
            on_disk(&src)
        );
    }
    let refused = join(d.path(), "refused.raw");
    assert_ne!(
        code(&[
            "convert",
            "-C",
            "-S",
            "4k",
            "-O",
            "raw",
            p(&src),
            p(&refused)
        ]),
        0
    );
}

/// Sources whose allocated blocks are partly file holes (qemu-img writes only the non-zero
/// parts of a block, and a fixed image is one sparse file): convert reads nothing for the holes
/// (they read as zeros) and neither fills nor scans them, and the result must still be the
/// source's bytes, with the holes kept holes in every target format, with and without -C.
#[test]
fn convert_from_blocks_with_file_holes_keeps_bytes_and_holes() {
    if !have("qemu-img") {
        return;
    }
    let d = tmp();
    let src = join(d.path(), "src.raw");
    patterned_raw(&src, 48 << 20, 5);
    let on_disk = |path: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).expect("stat").blocks() * 512
    };
    for (name, qfmt, opts) in [
        ("dyn.vhd", "vpc", "subformat=dynamic,force_size=on"),
        ("fixed.vhd", "vpc", "subformat=fixed,force_size=on"),
        ("dyn.vhdx", "vhdx", "block_size=8M"),
        ("fixed.vhdx", "vhdx", "subformat=fixed"),
    ] {
        let img = join(d.path(), name);
        tool_ok(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                qfmt,
                "-o",
                opts,
                p(&src),
                p(&img),
            ],
        );
        for (out_fmt, extra) in [("raw", ""), ("raw", "-C"), ("vhdx", ""), ("vhd", "")] {
            let out = join(d.path(), &format!("out-{name}{extra}.{out_fmt}"));
            let mut args = vec!["convert", "-O", out_fmt];
            if !extra.is_empty() {
                args.push(extra);
            }
            args.extend([p(&img), p(&out)]);
            ok(&args);
            assert_eq!(
                code(&["compare", "-F", out_fmt, p(&src), p(&out)]),
                0,
                "{name} -> {out_fmt} {extra}: bytes differ"
            );
            let qf = if out_fmt == "vhd" { "vpc" } else { out_fmt };
            let cmp = tool(
                "qemu-img",
                &["compare", "-f", "raw", "-F", qf, p(&src), p(&out)],
            );
            assert!(cmp.status.success(), "qemu-img compare {name} -> {out_fmt}");
            // Holes stay holes: no more allocated than the source's data plus metadata.
            assert!(
                on_disk(&out) <= on_disk(&src) + (4 << 20),
                "{name} -> {out_fmt} {extra}: {} bytes allocated, the source {}",
                on_disk(&out),
                on_disk(&src)
            );
            std::fs::remove_file(&out).unwrap();
        }
    }
}

/// A source's file holes are zeros even where the backing file of a `-B` target has data:
/// the target must then hold zeros there, not skip the range (and not write stale bytes).
#[test]
fn convert_with_backing_writes_zeros_over_source_holes() {
    let d = tmp();
    let base = join(d.path(), "base.vhdx");
    ok(&["create", "-f", "vhdx", p(&base), "8M"]);
    ok(&["io", "-c", "write -P 0x55 0 8M", p(&base)]);
    // A sparse raw source: data in the first and third MiB, holes elsewhere.
    let src = join(d.path(), "src.raw");
    std::fs::File::create(&src)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    ok(&[
        "io",
        "-c",
        "write -P 0x66 0 1M",
        "-c",
        "write -P 0x55 2M 1M",
        p(&src),
    ]);
    for extra in ["", "-S0"] {
        let out = join(d.path(), &format!("out{extra}.vhdx"));
        let mut args = vec!["convert", "-O", "vhdx", "-B", p(&base), "-F", "vhdx"];
        if !extra.is_empty() {
            args.push(extra);
        }
        args.extend([p(&src), p(&out)]);
        ok(&args);
        assert_eq!(
            code(&["compare", "-F", "vhdx", p(&src), p(&out)]),
            0,
            "convert -B {extra}: the target does not read as the source"
        );
    }
}

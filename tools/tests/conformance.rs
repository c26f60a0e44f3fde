//! Table-driven conformance against qemu-img: the same command line run by both tools must
//! end with the same exit code, and where the row says so, print the same stdout.
//! Images are made by qemu-img itself, so our reading is checked against its writing.

mod common;

use common::*;

/// What must match between qemu-img and viridian for one row.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Same {
    /// Exit code only (the messages are ours).
    Code,
    /// Exit code and stdout, byte for byte.
    CodeAndStdout,
    /// Exit code and the same JSON value on stdout (key order and indentation aside).
    CodeAndJson,
}

/// (command line with {a} {raw} {big} {other} {missing} {dir} placeholders, what must match)
const ROWS: &[(&str, Same)] = &[
    ("info {missing}", Same::Code),
    ("info --output yaml {a}", Same::Code),
    ("check {missing}", Same::Code),
    ("check --bogus {a}", Same::Code),
    ("check -r leaks {a}", Same::Code),
    ("check -r sideways {a}", Same::Code),
    ("create -f raw {dir}/x.raw 12X", Same::Code),
    ("create -f raw {dir}/y.raw", Same::Code),
    ("compare {missing} {a}", Same::Code),
    ("compare {a} {raw}", Same::CodeAndStdout),
    ("compare -q {a} {raw}", Same::CodeAndStdout),
    ("compare {a} {big}", Same::CodeAndStdout),
    ("compare -s {a} {big}", Same::CodeAndStdout),
    ("compare {a} {other}", Same::CodeAndStdout),
    ("compare -f vhdx -F raw {a} {raw}", Same::CodeAndStdout),
    ("measure --size 1G -O raw", Same::CodeAndStdout),
    ("measure --size 1G -O raw --output json", Same::CodeAndJson),
    ("measure -O raw --output json {a}", Same::CodeAndJson),
    ("measure -O raw {raw}", Same::CodeAndStdout),
    ("measure {raw}", Same::CodeAndStdout),
    ("map {missing}", Same::Code),
    ("resize {missing} 1G", Same::Code),
    ("resize {dir}/r.raw 8M", Same::Code),
    ("resize -f raw {dir}/r.raw 2M", Same::Code),
    ("resize --shrink -f raw {dir}/r.raw 2M", Same::Code),
    ("resize -f raw {dir}/r.raw +1M", Same::Code),
    ("resize -f raw {dir}/r.raw 12X", Same::Code),
    ("amend {a}", Same::Code),
    ("amend -o help -f raw {raw}", Same::Code),
    ("amend -o subformat=fixed -f raw {raw}", Same::Code),
    ("amend -o nosuch=1 {missing}", Same::Code),
    ("dd if={a} of={dir}/dd.raw bs=1M count=2", Same::Code),
    ("dd if={a} of={dir}/dd.raw bs=64k skip=200", Same::Code),
    ("dd if={a} of={dir}/dd.raw bs=0", Same::Code),
    ("dd if={a} of={dir}/dd.raw bs=foo", Same::Code),
    ("dd if={a} of={dir}/dd.raw count=1k", Same::Code),
    ("dd if={a} of={dir}/dd.raw skip=-1", Same::Code),
    ("dd if={a} of={dir}/dd.raw bogus=1", Same::Code),
    ("dd if={a}", Same::Code),
    ("dd if={missing} of={dir}/dd.raw", Same::Code),
    ("dd -O nosuchformat if={a} of={dir}/dd.raw", Same::Code),
    ("commit {missing}", Same::Code),
    ("rebase -b {a} {missing}", Same::Code),
    ("convert {missing} {dir}/out.raw", Same::Code),
    ("convert -O raw {a} {dir}/out2.raw", Same::Code),
    ("convert -O nosuchformat {a} {dir}/out3.raw", Same::Code),
];

fn run(prog: &str, line: &str) -> (i32, String) {
    let args: Vec<&str> = line.split_whitespace().collect();
    let o = std::process::Command::new(prog)
        .args(&args)
        .output()
        .expect("run");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
fn viridian_answers_like_qemu_img() {
    if !have("qemu-img") {
        return;
    }
    let d = tmp();
    let dir = d.path();
    let a = join(dir, "a.vhdx");
    let raw = join(dir, "a.raw");
    let big = join(dir, "big.raw");
    let other = join(dir, "other.raw");
    tool_ok("qemu-img", &["create", "-q", "-f", "vhdx", p(&a), "8M"]);
    tool_ok(
        "qemu-io",
        &[
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            "write -P 7 5M 4k",
            p(&a),
        ],
    );
    tool_ok("qemu-img", &["convert", "-O", "raw", p(&a), p(&raw)]);
    // Same content, 16 MiB: equal under the non-strict rule, a size mismatch under -s.
    tool_ok("qemu-img", &["convert", "-O", "raw", p(&a), p(&big)]);
    tool_ok("qemu-img", &["resize", "-q", "-f", "raw", p(&big), "16M"]);
    tool_ok("qemu-img", &["convert", "-O", "raw", p(&a), p(&other)]);
    tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 5M 512", p(&other)],
    );
    tool_ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", p(&join(dir, "r.raw")), "4M"],
    );

    let mut failures = Vec::new();
    for (row, same) in ROWS {
        let line = row
            .replace("{a}", p(&a))
            .replace("{raw}", p(&raw))
            .replace("{big}", p(&big))
            .replace("{other}", p(&other))
            .replace("{missing}", p(&join(dir, "missing.vhdx")))
            .replace("{dir}", p(dir));
        // Each tool gets a fresh target name where the row creates one.
        let (qc, qout) = run("qemu-img", &line);
        for made in [
            "x.raw", "y.raw", "out.raw", "out2.raw", "out3.raw", "dd.raw",
        ] {
            let _ = std::fs::remove_file(join(dir, made));
        }
        // The resize row changes r.raw: put it back for our turn.
        tool_ok(
            "qemu-img",
            &[
                "resize",
                "-q",
                "-f",
                "raw",
                "--shrink",
                p(&join(dir, "r.raw")),
                "4M",
            ],
        );
        let (vc, vout) = run(env!("CARGO_BIN_EXE_viridian"), &line);
        for made in [
            "x.raw", "y.raw", "out.raw", "out2.raw", "out3.raw", "dd.raw",
        ] {
            let _ = std::fs::remove_file(join(dir, made));
        }
        if qc != vc {
            failures.push(format!("{row}: exit qemu-img {qc}, viridian {vc}"));
        } else if *same == Same::CodeAndJson
            && serde_json::from_str::<serde_json::Value>(&qout).ok()
                != serde_json::from_str::<serde_json::Value>(&vout).ok()
        {
            failures.push(format!(
                "{row}: JSON differs\n  qemu-img: {qout}\n  viridian: {vout}"
            ));
        } else if *same == Same::CodeAndStdout && qout != vout {
            failures.push(format!(
                "{row}: stdout differs\n  qemu-img: {qout:?}\n  viridian: {vout:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

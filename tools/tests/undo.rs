//! Undo mode: the parent is untouched until commit, whatever happens to the process.

mod common;

use common::*;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

fn make(fmt: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let img = join(dir, &format!("base.{fmt}"));
    ok(&["create", "-f", fmt, p(&img), "32M"]);
    ok(&[
        "io",
        "-c",
        "write -P 0x41 0 8M",
        "-c",
        "write -P 0x42 16M 1M",
        p(&img),
    ]);
    img
}

#[test]
fn discard_leaves_parent_byte_identical() {
    for fmt in ["raw", "vhd", "vhdx"] {
        let d = tmp();
        let img = make(fmt, d.path());
        let before = read_all(&img);
        ok(&[
            "io",
            "--undo",
            "discard",
            "-c",
            "write -P 0x99 1M 3M",
            "-c",
            "read -P 0x99 2M 1M",
            "-c",
            "zero 16M 64k",
            p(&img),
        ]);
        assert!(
            read_all(&img) == before,
            "{fmt}: parent changed by a discarded undo session"
        );
        let leftovers: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .collect();
        assert_eq!(
            leftovers.len(),
            1,
            "{fmt}: undo child left behind: {leftovers:?}"
        );
    }
}

#[test]
fn commit_makes_parent_equal_the_undo_view() {
    for fmt in ["raw", "vhd", "vhdx"] {
        let d = tmp();
        let img = make(fmt, d.path());
        let expect = join(d.path(), "expect.raw");
        ok(&["convert", "-O", "raw", p(&img), p(&expect)]);
        let cmds = [
            "write -P 0x99 1M 3M",
            "write -P 0x98 20M 100",
            "zero 16M 64k",
        ];
        let mut args = vec!["io"];
        for c in &cmds {
            args.extend(["-c", c]);
        }
        args.push(p(&expect));
        ok(&args);
        let mut args = vec!["io", "--undo", "commit"];
        for c in &cmds {
            args.extend(["-c", c]);
        }
        args.push(p(&img));
        ok(&args);
        assert_eq!(
            code(&["compare", p(&img), p(&expect)]),
            0,
            "{fmt}: committed parent differs"
        );
        if fmt != "raw" {
            assert_eq!(
                code(&["check", p(&img)]),
                0,
                "{fmt}: parent not clean after commit"
            );
        }
    }
}

#[test]
fn killed_undo_session_leaves_parent_byte_identical() {
    for fmt in ["raw", "vhd", "vhdx"] {
        let d = tmp();
        let img = make(fmt, d.path());
        let before = read_all(&img);
        let mut args: Vec<String> = vec!["io".into(), "--undo".into(), "commit".into()];
        for i in 0..4000u64 {
            args.push("-c".into());
            args.push(format!(
                "write -P 0x{:02x} {} 64k",
                (i % 200) + 1,
                (i * 65536) % (31 << 20)
            ));
            args.push("-c".into());
            args.push("flush".into());
        }
        args.push(p(&img).to_string());
        let mut child = Command::new(env!("CARGO_BIN_EXE_viridian"))
            .args(&args)
            .spawn()
            .unwrap();
        // Kill once the undo child holds some data, i.e. in the middle of the write phase.
        let started = std::time::Instant::now();
        loop {
            let grown = std::fs::read_dir(d.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .any(|e| {
                    e.file_name().to_string_lossy().contains(".undo-")
                        && e.metadata().map(|m| m.len() > 4 << 20).unwrap_or(false)
                });
            if grown || started.elapsed() > Duration::from_secs(20) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "{fmt}: the writer finished before it was killed; make the workload longer"
        );
        assert!(
            read_all(&img) == before,
            "{fmt}: parent changed by a killed undo session"
        );
        // The image still opens and reads its old data.
        ok(&["io", "-r", "-c", "read -P 0x41 0 8M", p(&img)]);
    }
}

#[test]
fn vud_style_undo_disks_can_be_listed_shown_committed_and_discarded() {
    let d = tmp();
    let img = make("vhd", d.path());
    let vud = join(d.path(), "VirtualPCUndo_test_0_0_1.vud");
    ok(&["create", "-f", "vhd", "-b", p(&img), p(&vud)]);
    ok(&["io", "-f", "vhd", "-c", "write -P 0x55 4M 1M", p(&vud)]);
    let list = ok(&["undo", "list", "--output", "json", p(d.path())]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["changed-bytes"], 1 << 20);
    let before = read_all(&img);
    let vud2 = join(d.path(), "second.vud");
    std::fs::copy(&vud, &vud2).unwrap();
    ok(&["undo", "discard", p(&vud2)]);
    assert!(!vud2.exists());
    assert!(read_all(&img) == before);
    ok(&["undo", "commit", p(&vud)]);
    assert!(!vud.exists());
    ok(&[
        "io",
        "-r",
        "-c",
        "read -P 0x55 4M 1M",
        "-c",
        "read -P 0x41 0 4M",
        p(&img),
    ]);
    // Refuses to "discard" a base image.
    assert_eq!(code(&["undo", "discard", p(&img)]), 1);
    assert!(img.exists());
}

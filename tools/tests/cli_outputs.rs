//! Where the CLI's results go: output files that replace a name (`dd`, `amend`), standard
//! output that cannot be written, and numbers and images nobody could make (`measure`,
//! `create`). Each case is one an outside tester found wrong.

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// The names in `dir` that start with `prefix` (temporary files left beside a target).
fn names_starting(dir: &std::path::Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn stderr(args: &[&str]) -> (i32, String) {
    let o = viridian(args);
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// dd never turns a device node or FIFO into a regular file, never overwrites its own input,
/// writes through a symbolic link into its target, and keeps the target's owner and mode.
#[test]
fn dd_replaces_only_the_regular_file_it_names() {
    let d = tmp();
    let src = join(d.path(), "s.vhdx");
    ok(&["create", "-q", "-f", "vhdx", p(&src), "8M"]);
    ok(&["io", "-c", "write -P 0x42 0 8M", p(&src)]);

    let fifo = join(d.path(), "fifo");
    assert!(tool("mkfifo", &[p(&fifo)]).status.success());
    let null = join(d.path(), "mynull");
    assert!(tool("mknod", &[p(&null), "c", "1", "3"]).status.success());
    for dev in [&fifo, &null] {
        let of = format!("of={}", p(dev));
        let (c, e) = stderr(&["dd", &format!("if={}", p(&src)), &of, "bs=1M", "count=1"]);
        assert_eq!(c, 1, "{e}");
        assert!(e.contains("not a regular file"), "{e}");
        let t = std::fs::symlink_metadata(dev).unwrap().file_type();
        assert!(!t.is_file(), "{} became a regular file", dev.display());
    }

    // Its own input, by name and through a symbolic link.
    let before = read_all(&src);
    let alias = join(d.path(), "alias.vhdx");
    std::os::unix::fs::symlink("s.vhdx", &alias).unwrap();
    for of in [&src, &alias] {
        let (c, e) = stderr(&[
            "dd",
            &format!("if={}", p(&src)),
            &format!("of={}", p(of)),
            "bs=1M",
            "count=3",
        ]);
        assert_eq!(c, 1, "{e}");
        assert!(e.contains("also the input"), "{e}");
    }
    assert!(read_all(&src) == before, "dd changed its own input");

    // A symbolic link to an older output: the target is replaced, the link stays.
    let out = join(d.path(), "out.raw");
    std::fs::write(&out, b"old").unwrap();
    std::os::unix::fs::chown(&out, Some(4321), Some(8765)).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o640)).unwrap();
    let link = join(d.path(), "link.raw");
    std::os::unix::fs::symlink("out.raw", &link).unwrap();
    ok(&[
        "dd",
        &format!("if={}", p(&src)),
        &format!("of={}", p(&link)),
        "bs=1M",
        "count=2",
    ]);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let m = std::fs::metadata(&out).unwrap();
    assert_eq!(m.len(), 2 << 20);
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (4321, 8765, 0o640));
    assert!(read_all(&out).iter().all(|&b| b == 0x42));
    // Nothing temporary left beside it.
    let hidden = names_starting(d.path(), ".");
    assert!(hidden.is_empty(), "left behind: {hidden:?}");
}

/// An output the user may not write is refused, as writing it in place would be (run as an
/// unprivileged user; skipped when `setpriv` is missing).
#[test]
fn dd_and_amend_respect_a_read_only_file() {
    if !have("setpriv") {
        assert!(!require_all(), "setpriv missing (VIRIDIAN_REQUIRE_ALL=1)");
        eprintln!("SKIP: setpriv missing");
        return;
    }
    let d = tmp();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let src = join(d.path(), "s.vhdx");
    let img = join(d.path(), "u.vhdx");
    let out = join(d.path(), "ro.raw");
    ok(&["create", "-q", "-f", "vhdx", p(&src), "4M"]);
    ok(&["create", "-q", "-f", "vhdx", p(&img), "4M"]);
    std::fs::write(&out, b"keep").unwrap();
    for f in [&src, &img, &out] {
        std::os::unix::fs::chown(f, Some(65534), Some(65534)).unwrap();
    }
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o444)).unwrap();
    let as_nobody = |args: &[&str]| {
        let mut all = vec![
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_viridian"),
        ];
        all.extend_from_slice(args);
        tool("setpriv", &all)
    };
    let o = as_nobody(&[
        "dd",
        &format!("if={}", p(&src)),
        &format!("of={}", p(&out)),
        "bs=1M",
        "count=1",
    ]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
    let before = read_all(&img);
    let o = as_nobody(&["amend", "-o", "subformat=fixed", p(&img)]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(read_all(&img) == before, "amend rewrote a read-only image");
}

/// A full standard output is one line and exit 1, never a panic.
#[test]
fn a_full_standard_output_is_an_error_not_a_panic() {
    let d = tmp();
    let img = join(d.path(), "a.vhdx");
    ok(&["create", "-q", "-f", "vhdx", p(&img), "8M"]);
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    for args in [
        vec!["info", p(&img)],
        vec!["info", "--output", "json", p(&img)],
        vec!["map", p(&img)],
        vec!["check", p(&img)],
        vec!["measure", "-O", "vhdx", "--size", "1G"],
    ] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_viridian"))
            .args(&args)
            .stdout(full.try_clone().unwrap())
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
        assert_eq!(e.lines().count(), 1, "{args:?}: {e}");
        assert!(e.contains("standard output"), "{args:?}: {e}");
    }
}

/// measure and create refuse what the format cannot hold, and options that contradict each
/// other or the backing file.
#[test]
fn impossible_images_are_refused_by_measure_and_create() {
    let d = tmp();
    for args in [
        vec!["measure", "-O", "vhdx", "--size", "65T"],
        vec!["measure", "-O", "vhdx", "--size", "8E"],
        vec!["measure", "-O", "vpc", "--size", "3T"],
        vec![
            "measure",
            "-O",
            "vpc",
            "-o",
            "subformat=fixed",
            "--size",
            "33T",
        ],
    ] {
        let (c, e) = stderr(&args);
        assert_eq!(c, 1, "{args:?}: {e}");
        assert!(e.contains("exceeds"), "{args:?}: {e}");
    }
    ok(&[
        "measure",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed",
        "--size",
        "3T",
    ]);

    let base = join(d.path(), "b.vhdx");
    ok(&["create", "-q", "-f", "vhdx", p(&base), "8M"]);
    let odd = join(d.path(), "a\\b.vhdx");
    std::fs::copy(&base, &odd).unwrap();
    let kid = join(d.path(), "k.vhdx");
    for (opts, backing, why) in [
        ("log_size=0", None, "log size"),
        (
            "physical_sector_size=512,logical_sector_size=4096",
            None,
            "smaller",
        ),
        ("subformat=fixed", Some(&base), "never fixed"),
        ("logical_sector_size=4096", Some(&base), "parent's logical"),
        ("subformat=dynamic", Some(&odd), "separator"),
    ] {
        let mut args = vec!["create", "-f", "vhdx", "-o", opts];
        if let Some(b) = backing {
            args.extend(["-b", p(b)]);
        }
        args.push(p(&kid));
        if backing.is_none() {
            args.push("8M");
        }
        let (c, e) = stderr(&args);
        assert_eq!(c, 1, "{opts}: {e}");
        assert!(e.contains(why), "{opts}: {e}");
        assert!(!kid.exists(), "{opts}: an image was made");
    }
}

/// SIGTERM during a long convert exits 143 (128 + SIGTERM) and removes the partial target.
#[test]
fn sigterm_exits_143_and_cleans_up() {
    let d = tmp();
    let src = join(d.path(), "s.raw");
    let dst = join(d.path(), "d.vhdx");
    std::fs::write(&src, vec![0x5a; 256 << 20]).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-t",
            "writeback",
            p(&src),
            p(&dst),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the target's temporary file exists the copy is under way.
    let started = || !names_starting(d.path(), ".d.vhdx.convert-").is_empty();
    let t = std::time::Instant::now();
    while !started() && t.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = tool("kill", &["-TERM", &child.id().to_string()]);
    let o = child.wait_with_output().unwrap();
    if o.status.code() == Some(0) {
        eprintln!("convert finished before SIGTERM arrived; nothing to check");
        return;
    }
    assert_eq!(
        o.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!dst.exists(), "the partial target was left");
    assert!(!started(), "the temporary file was left");
}

/// Refusals an outside tester found missing or misleading: each is refused with a message
/// that says what is wrong, and leaves nothing behind.
#[test]
fn odd_requests_get_the_right_refusal() {
    let d = tmp();
    let a = join(d.path(), "a.vhdx");
    let b = join(d.path(), "b.vhdx");
    ok(&["create", "-q", "-f", "vhdx", p(&a), "8M"]);
    ok(&["create", "-q", "-f", "vhdx", "-b", p(&a), p(&b)]);
    for (args, why) in [
        (vec!["amend", "-o", "", p(&a)], "Invalid option list"),
        (vec!["amend", "-o", ",", p(&a)], "Invalid option list"),
        (
            vec!["amend", "-o", "subformat=fixed,", p(&a)],
            "Invalid option list",
        ),
        (vec!["rebase", "-b", p(&b), p(&a)], "loop"),
        (vec!["rebase", "-u", "-b", p(&b), p(&a)], "loop"),
        (vec!["rebase", "-b", "", p(&b)], "standalone"),
        (
            vec!["convert", "-m", "0", p(&a), "/nonexistent/x.raw"],
            "coroutines",
        ),
        (
            vec!["convert", "-m", "17", p(&a), "/nonexistent/x.raw"],
            "coroutines",
        ),
        (
            vec!["convert", "-T", "bogus", p(&a), "/nonexistent/x.raw"],
            "source cache",
        ),
    ] {
        let (c, e) = stderr(&args);
        assert_eq!(c, 1, "{args:?}: {e}");
        assert!(e.contains(why), "{args:?}: {e}");
        assert!(!e.contains("locked"), "{args:?}: {e}");
    }
    let wrong = join(d.path(), "s.vhd");
    let (c, e) = stderr(&["snapshot", "-c", p(&wrong), p(&a)]);
    assert_eq!(c, 1, "{e}");
    assert!(e.contains(".vhdx extension"), "{e}");
    assert!(!wrong.exists());
    // check -q: the exit code is the answer, nothing is printed, in either output form.
    let o = viridian(&["check", "-q", "--output", "json", p(&a)]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// A convert killed with SIGKILL leaves no image under the name asked for (a partial image
/// there would open as valid with data missing); the next convert to that name removes the
/// temporary file the killed one left.
#[test]
fn a_killed_convert_leaves_no_partial_target() {
    let d = tmp();
    let src = join(d.path(), "s.raw");
    let dst = join(d.path(), "d.vhdx");
    std::fs::write(&src, vec![0x5a; 256 << 20]).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(["convert", "-f", "raw", "-O", "vhdx", p(&src), p(&dst)])
        .spawn()
        .unwrap();
    let hidden = || names_starting(d.path(), ".d.vhdx.convert-").len();
    let t = std::time::Instant::now();
    while hidden() == 0 && t.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    if status.success() {
        eprintln!("convert finished before the kill; nothing to check");
        return;
    }
    assert!(!dst.exists(), "a killed convert left {}", dst.display());
    assert_eq!(hidden(), 1, "the killed convert's temporary file");
    ok(&["convert", "-q", "-f", "raw", "-O", "vhdx", p(&src), p(&dst)]);
    assert_eq!(hidden(), 0, "the stale temporary file was not removed");
    ok(&["compare", "-f", "raw", "-F", "vhdx", p(&src), p(&dst)]);
}

/// Growing a fixed image allocates the new space, as `create` allocates a fixed image;
/// `--preallocation=off` keeps it sparse, and a dynamic image refuses falloc.
#[test]
fn growing_a_fixed_image_allocates_the_new_space() {
    let d = tmp();
    for fmt in ["vhd", "vhdx"] {
        let f = join(d.path(), &format!("f.{fmt}"));
        ok(&[
            "create",
            "-q",
            "-f",
            fmt,
            "-o",
            "subformat=fixed",
            p(&f),
            "16M",
        ]);
        ok(&["resize", "-q", p(&f), "32M"]);
        let m = std::fs::metadata(&f).unwrap();
        assert!(
            m.blocks() * 512 >= 32 << 20,
            "{fmt}: {} of {} bytes allocated",
            m.blocks() * 512,
            m.len()
        );
        ok(&["check", p(&f)]);
        let s = join(d.path(), &format!("s.{fmt}"));
        ok(&[
            "create",
            "-q",
            "-f",
            fmt,
            "-o",
            "subformat=fixed",
            p(&s),
            "16M",
        ]);
        ok(&["resize", "-q", "--preallocation=off", p(&s), "64M"]);
        assert!(
            std::fs::metadata(&s).unwrap().blocks() * 512 < 40 << 20,
            "{fmt}: off"
        );
        let g = join(d.path(), &format!("g.{fmt}"));
        ok(&["create", "-q", "-f", fmt, p(&g), "16M"]);
        let (c, e) = stderr(&["resize", "--preallocation=falloc", p(&g), "32M"]);
        assert_eq!(c, 1, "{fmt}: {e}");
    }
}

/// A file another process has open is not replaced: a writer's acknowledged writes would go to
/// the replaced file and be lost, a reader would go on reading the old one.
#[test]
fn an_image_in_use_is_not_replaced() {
    let d = tmp();
    let src = join(d.path(), "src.raw");
    std::fs::write(&src, vec![7u8; 1 << 20]).unwrap();
    let img = join(d.path(), "a.vhdx");
    let sock = join(d.path(), "s.sock");
    ok(&["create", "-q", "-f", "vhdx", p(&img), "8M"]);
    let server = serve_start(&["--socket", p(&sock), "--rw", p(&img)], &sock)
        .unwrap_or_else(|(c, e)| panic!("serve --rw: exit {c}: {e}"));
    let ino = std::fs::metadata(&img).unwrap().ino();
    for args in [
        vec!["dd", "-O", "vhdx"],
        vec!["amend", "-o", "subformat=fixed"],
    ] {
        let mut args = args.clone();
        let ifarg = format!("if={}", p(&src));
        let ofarg = format!("of={}", p(&img));
        if args[0] == "dd" {
            args.extend([ifarg.as_str(), ofarg.as_str()]);
        } else {
            args.push(p(&img));
        }
        let (c, e) = stderr(&args);
        assert_eq!(c, 1, "{args:?}: {e}");
        assert!(
            e.contains("in use") || e.contains("locked"),
            "{args:?}: {e}"
        );
        assert_eq!(
            std::fs::metadata(&img).unwrap().ino(),
            ino,
            "{args:?} replaced it"
        );
    }
    drop(server);
}

/// Every verb that records a parent refuses a parent name with '\', which the child's
/// Windows locators would read as a folder separator (the child would never open).
#[test]
fn parent_names_with_a_backslash_are_refused_everywhere() {
    let d = tmp();
    let odd = join(d.path(), "a\\b.vhdx");
    ok(&["create", "-q", "-f", "vhdx", p(&odd), "8M"]);
    let plain = join(d.path(), "p.vhdx");
    ok(&["create", "-q", "-f", "vhdx", p(&plain), "8M"]);
    let kid = join(d.path(), "k.vhdx");
    ok(&["create", "-q", "-f", "vhdx", "-b", p(&plain), p(&kid)]);
    let out = join(d.path(), "o.vhdx");
    for args in [
        vec!["snapshot", "-c", p(&out), p(&odd)],
        vec!["convert", "-O", "vhdx", "-B", p(&odd), p(&plain), p(&out)],
        vec!["rebase", "-u", "-b", p(&odd), p(&kid)],
    ] {
        let (c, e) = stderr(&args);
        assert_eq!(c, 1, "{args:?}: {e}");
        assert!(e.contains("separator"), "{args:?}: {e}");
        assert!(!out.exists(), "{args:?}: made {}", out.display());
    }
    ok(&["info", "--backing-chain", p(&kid)]);
}

/// With stderr or stdout full, nothing panics and the exit code still tells; a create whose
/// report cannot be written leaves no image behind.
#[test]
fn full_stderr_and_stdout_never_panic_and_create_leaves_nothing() {
    let d = tmp();
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let run = |args: &[&str], out_full: bool| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_viridian"));
        c.args(args).stderr(full());
        if out_full {
            c.stdout(full());
        }
        c.output().unwrap()
    };
    let missing = join(d.path(), "missing.vhdx");
    for out_full in [false, true] {
        let o = run(&["info", p(&missing)], out_full);
        assert_eq!(o.status.code(), Some(1), "stdout full {out_full}");
    }
    let img = join(d.path(), "new.vhdx");
    let o = run(&["create", "-f", "vhdx", p(&img), "1M"], true);
    assert_eq!(o.status.code(), Some(1));
    assert!(!img.exists(), "create left its image although it failed");
}

/// `undo commit` and `undo discard` delete their file: an ordinary differencing image (which
/// may have children of its own) is refused unless forced.
#[test]
fn undo_verbs_refuse_an_ordinary_differencing_image() {
    let d = tmp();
    let base = join(d.path(), "b.vhdx");
    let mid = join(d.path(), "m.vhdx");
    let top = join(d.path(), "t.vhdx");
    ok(&["create", "-q", "-f", "vhdx", p(&base), "8M"]);
    ok(&["create", "-q", "-f", "vhdx", "-b", p(&base), p(&mid)]);
    ok(&["io", "-c", "write -P 9 0 64k", p(&mid)]);
    ok(&["create", "-q", "-f", "vhdx", "-b", p(&mid), p(&top)]);
    for verb in ["discard", "commit"] {
        let (c, e) = stderr(&["undo", verb, p(&mid)]);
        assert_eq!(c, 1, "{verb}: {e}");
        assert!(e.contains("not an undo disk"), "{verb}: {e}");
        assert!(mid.exists());
    }
    ok(&["io", "-c", "read -P 9 0 64k", p(&top)]);
}

/// `man --dir` replaces what has a page's name (a symbolic link, a FIFO) instead of writing
/// through it or blocking on it.
#[test]
fn man_pages_replace_links_and_fifos_by_name() {
    let d = tmp();
    let dir = join(d.path(), "man");
    std::fs::create_dir(&dir).unwrap();
    let victim = join(d.path(), "victim");
    std::fs::write(&victim, b"keep").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("viridian.1")).unwrap();
    assert!(tool("mkfifo", &[p(&dir.join("viridian-dd.1"))])
        .status
        .success());
    let o = tool(
        "timeout",
        &[
            "30",
            env!("CARGO_BIN_EXE_viridian"),
            "man",
            "--dir",
            p(&dir),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    for page in ["viridian.1", "viridian-dd.1"] {
        assert!(
            std::fs::symlink_metadata(dir.join(page)).unwrap().is_file(),
            "{page}"
        );
    }
}

/// Compacting a parent keeps every byte it reads, and a same-size resize changes nothing: the
/// children still open on it and read the same.
#[test]
fn compacting_or_same_size_resizing_a_parent_keeps_its_children() {
    let d = tmp();
    for fmt in ["vhdx", "vhd"] {
        let base = join(d.path(), &format!("b.{fmt}"));
        let kid = join(d.path(), &format!("k.{fmt}"));
        ok(&["create", "-q", "-f", fmt, p(&base), "64M"]);
        ok(&[
            "io",
            "-c",
            "write -P 1 0 4M",
            "-c",
            "write -P 0 8M 4M",
            p(&base),
        ]);
        ok(&["create", "-q", "-f", fmt, "-b", p(&base), p(&kid)]);
        let said = ok(&["compact", p(&base)]);
        assert!(said.contains("released"), "{fmt}: {said}");
        ok(&["resize", "-q", p(&base), "64M"]);
        ok(&["info", "--backing-chain", p(&kid)]);
        ok(&[
            "io",
            "-c",
            "read -P 1 0 4M",
            "-c",
            "read -P 0 8M 4M",
            p(&kid),
        ]);
    }
}

/// A comma in a file name is written `,,` in option lists, as in qemu: `-o backing_file=` and
/// `run --disk` both take it.
#[test]
fn a_doubled_comma_names_a_file_with_a_comma() {
    let d = tmp();
    let parent = join(d.path(), "base,1.vhdx");
    ok(&["create", "-f", "vhdx", p(&parent), "8M"]);
    let child = join(d.path(), "child.vhdx");
    let opt = format!(
        "backing_file={},,1.vhdx,backing_fmt=vhdx",
        join(d.path(), "base").display()
    );
    ok(&["create", "-f", "vhdx", "-o", &opt, p(&child)]);
    let info = ok(&["info", "--output", "json", p(&child)]);
    assert!(info.contains("base,1.vhdx"), "{info}");
    let disk = format!(
        "{},,1.vhdx,ro,format=vhdx",
        join(d.path(), "base").display()
    );
    let out = ok(&["run", "--dry-run", "--disk", &disk]);
    assert!(out.contains("format=vhdx") && out.contains(" ro"), "{out}");
}

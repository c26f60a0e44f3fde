//! SIGKILL at random points of `commit`, `undo commit` and `rebase`: afterwards the chain
//! opens with no manual step, reads what it read before, and the checkers are clean. Running
//! the same command again then finishes the job.
//!
//! Each test does a few rounds with random delays (the seed is printed; set
//! VIRIDIAN_KILL_ROUNDS for more, as scripts/kill-soak.sh does).

mod common;

use common::*;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs viridian ARGS and SIGKILLs it after `delay` unless it finished first. Returns whether
/// it was killed (false: it ended on its own, which must then be success).
fn run_and_kill(args: &[&str], delay: Duration) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < delay {
        if let Some(st) = child.try_wait().unwrap() {
            let mut e = String::new();
            if let Some(mut s) = child.stderr.take() {
                use std::io::Read;
                let _ = s.read_to_string(&mut e);
            }
            assert!(st.success(), "viridian {args:?} failed on its own: {e}");
            return false;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    child.kill().unwrap();
    let st = child.wait().unwrap();
    st.signal() == Some(9)
}

/// When to kill in round `round` of a command that took `dur` once: the first round early
/// (so at least one kill lands mid-run even when `dur` was measured on a cold cache), the
/// others anywhere in it.
fn kill_delay(rng: &mut KillRng, dur: Duration, round: usize) -> Duration {
    if round == 0 {
        dur / 4
    } else {
        Duration::from_micros(rng.below(dur.as_micros() as u64))
    }
}

/// How long `viridian ARGS` takes on a copy of the files, to spread kill points over it.
fn timed(args: &[&str]) -> Duration {
    let t = Instant::now();
    ok(args);
    t.elapsed()
}

/// Our check must be clean (exit 0); leaks (exit 3) are allowed only when our check calls
/// them leaks. For VHDX without a parent, qemu-img check must agree (qemu cannot open
/// differencing VHDX files at all).
///
/// A VHDX whose writer was killed between writing a log entry and applying it holds a log
/// that needs replay: both checkers report that (qemu-img even refuses to open it read-only).
/// That is the write-ahead log doing its job, not damage: every open replays it. So when it
/// is the only complaint, the image is opened read-write once (what its next user does) and
/// must then be clean.
fn assert_clean(img: &Path, what: &str) {
    let check = || {
        let o = viridian(&["check", p(img)]);
        let out =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        (o.status.code().unwrap_or(-1), out)
    };
    let (mut c, mut out) = check();
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("ERROR")).collect();
    if c == 2 && errors.len() == 1 && errors[0].contains("need replay") {
        eprintln!("{what}: {} had a log to replay", img.display());
        ok(&["io", "-c", "flush", p(img)]);
        (c, out) = check();
    }
    assert!(
        c == 0 || (c == 3 && out.contains("leak")),
        "{what}: viridian check {} exited {c}: {out}",
        img.display()
    );
    let differencing = ok(&["info", p(img)]).contains("backing file:");
    if img.extension().is_some_and(|e| e == "vhdx") && !differencing && have("qemu-img") {
        let q = tool("qemu-img", &["check", "-f", "vhdx", p(img)]);
        let qc = q.status.code().unwrap_or(-1);
        assert!(
            qc == 0 || qc == 3,
            "{what}: qemu-img check {} exited {qc}: {}{}",
            img.display(),
            String::from_utf8_lossy(&q.stdout),
            String::from_utf8_lossy(&q.stderr)
        );
    }
}

/// base (32 MiB of 0x41 in 64 MiB) and a child on it that writes 40 MiB of 0x42 from 8 MiB;
/// returns (base, child, reference raw of the child's view).
fn chain(dir: &Path, fmt: &str) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join(format!("base.{fmt}"));
    let child = dir.join(format!("child.{fmt}"));
    ok(&["create", "-q", "-f", fmt, p(&base), "64M"]);
    ok(&["io", "-c", "write -P 0x41 0 32M", p(&base)]);
    ok(&["create", "-q", "-f", fmt, "-b", p(&base), p(&child)]);
    ok(&[
        "io",
        "-c",
        "write -P 0x42 8M 40M",
        "-c",
        "zero 60M 1M",
        p(&child),
    ]);
    let reference = dir.join("child-view.raw");
    ok(&["convert", "-O", "raw", p(&child), p(&reference)]);
    (base, child, reference)
}

fn assert_reads(img: &Path, reference: &Path, what: &str) {
    let o = viridian(&["compare", p(img), p(reference)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{what}: {} no longer reads as before: {}{}",
        img.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn commit_killed_anywhere_leaves_a_chain_that_opens_and_reads_the_same() {
    let mut rng = KillRng::new("commit");
    for fmt in ["vhdx", "vhd"] {
        let d = tmp();
        let (_, child, reference) = chain(d.path(), fmt);
        let dur = timed(&["commit", "-q", p(&child)]);
        let mut killed = 0;
        for round in 0..kill_rounds() {
            let d = tmp();
            let (base, child, reference) = chain(d.path(), fmt);
            let delay = kill_delay(&mut rng, dur, round);
            let what = format!("{fmt} round {round} (kill after {delay:?})");
            killed += run_and_kill(&["commit", "-q", p(&child)], delay) as usize;
            // No manual step: the chain opens and reads the pre-commit view (the child's view
            // never changes during a commit).
            assert_reads(&child, &reference, &what);
            assert_clean(&child, &what);
            assert_clean(&base, &what);
            // Finishing the commit makes the base read as the child did.
            ok(&["commit", "-q", p(&child)]);
            assert_reads(&base, &reference, &what);
            assert_reads(&child, &reference, &what);
            assert_clean(&base, &what);
        }
        let _ = reference;
        eprintln!(
            "{fmt}: {killed} of {} rounds killed mid-commit",
            kill_rounds()
        );
        assert!(killed > 0, "{fmt}: no round was killed mid-commit");
    }
}

#[test]
fn undo_commit_killed_anywhere_leaves_an_undo_disk_that_commits_later() {
    let mut rng = KillRng::new("undo commit");
    for fmt in ["vhdx", "vhd"] {
        let d = tmp();
        let (_, child, _) = chain(d.path(), fmt);
        let dur = timed(&["undo", "commit", "--force", "-q", p(&child)]);
        let mut killed = 0;
        for round in 0..kill_rounds() {
            let d = tmp();
            let (base, child, reference) = chain(d.path(), fmt);
            let delay = kill_delay(&mut rng, dur, round);
            let what = format!("{fmt} round {round} (kill after {delay:?})");
            killed += run_and_kill(&["undo", "commit", "--force", "-q", p(&child)], delay) as usize;
            assert_clean(&base, &what);
            if child.exists() {
                assert_reads(&child, &reference, &what);
                assert_clean(&child, &what);
                ok(&["undo", "commit", "--force", "-q", p(&child)]);
            }
            assert!(!child.exists(), "{what}: undo disk not removed");
            assert_reads(&base, &reference, &what);
            assert_clean(&base, &what);
        }
        eprintln!(
            "{fmt}: {killed} of {} rounds killed mid-commit",
            kill_rounds()
        );
        assert!(killed > 0, "{fmt}: no round was killed mid-commit");
    }
}

/// A raw image and a raw undo file holding the same changes as `chain`'s child: made by an
/// `io --undo commit` session whose last command fails, which keeps the undo file.
fn raw_undo(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    let undo = dir.join("base.raw.undo");
    ok(&["create", "-q", "-f", "raw", p(&base), "64M"]);
    ok(&["io", "-c", "write -P 0x41 0 32M", p(&base)]);
    let reference = dir.join("view.raw");
    std::fs::copy(&base, &reference).unwrap();
    let writes = ["write -P 0x42 8M 40M", "zero 60M 1M"];
    let mut args = vec!["io", "--undo", "commit", "--undo-file", p(&undo)];
    for w in &writes {
        args.extend(["-c", w]);
    }
    args.extend(["-c", "write -P 1 200M 1M", p(&base)]);
    assert_ne!(code(&args), 0, "the failing session must fail");
    assert!(
        undo.exists(),
        "the failed session did not keep its undo file"
    );
    let mut args = vec!["io"];
    for w in &writes {
        args.extend(["-c", w]);
    }
    args.push(p(&reference));
    ok(&args);
    (base, undo, reference)
}

#[test]
fn raw_undo_commit_killed_anywhere_can_be_run_again() {
    let mut rng = KillRng::new("raw undo commit");
    let d = tmp();
    let (_, undo, _) = raw_undo(d.path());
    let dur = timed(&["undo", "commit", "-q", p(&undo)]);
    let mut killed = 0;
    for round in 0..kill_rounds() {
        let d = tmp();
        let (base, undo, reference) = raw_undo(d.path());
        let listed = ok(&["undo", "show", p(&undo)]);
        let delay = kill_delay(&mut rng, dur, round);
        let what = format!("raw round {round} (kill after {delay:?})");
        killed += run_and_kill(&["undo", "commit", "-q", p(&undo)], delay) as usize;
        if undo.exists() {
            // Still whole: it shows the same changes (and, once the commit had begun, says
            // it was interrupted) and commits now.
            let shown = ok(&["undo", "show", p(&undo)]);
            let changes: String = shown
                .lines()
                .filter(|l| !l.starts_with("state: "))
                .map(|l| format!("{l}\n"))
                .collect();
            assert_eq!(changes, listed, "{what}");
            assert_eq!(
                shown.contains("commit was interrupted"),
                chain::undo::commit_interrupted(&undo),
                "{what}"
            );
            ok(&["undo", "commit", "-q", p(&undo)]);
        }
        assert!(!undo.exists(), "{what}: undo file not removed");
        assert!(
            read_all(&base) == read_all(&reference),
            "{what}: base differs"
        );
    }
    eprintln!(
        "raw: {killed} of {} rounds killed mid-commit",
        kill_rounds()
    );
    assert!(killed > 0, "raw: no round was killed mid-commit");
}

#[test]
fn rebase_killed_anywhere_leaves_a_chain_that_reads_the_same() {
    let mut rng = KillRng::new("rebase");
    for fmt in ["vhdx", "vhd"] {
        let setup = |dir: &Path| {
            let (_, child, reference) = chain(dir, fmt);
            let other = dir.join(format!("other.{fmt}"));
            ok(&["create", "-q", "-f", fmt, p(&other), "64M"]);
            ok(&["io", "-c", "write -P 0x77 0 64M", p(&other)]);
            (child, other, reference)
        };
        let d = tmp();
        let (child, other, _) = setup(d.path());
        let dur = timed(&["rebase", "-q", "-b", p(&other), p(&child)]);
        let mut killed = 0;
        for round in 0..kill_rounds() {
            let d = tmp();
            let (child, other, reference) = setup(d.path());
            let delay = kill_delay(&mut rng, dur, round);
            let what = format!("{fmt} round {round} (kill after {delay:?})");
            killed += run_and_kill(&["rebase", "-q", "-b", p(&other), p(&child)], delay) as usize;
            assert_reads(&child, &reference, &what);
            assert_clean(&child, &what);
            ok(&["rebase", "-q", "-b", p(&other), p(&child)]);
            assert_reads(&child, &reference, &what);
            let info = ok(&["info", "--output", "json", p(&child)]);
            assert!(info.contains("other."), "{what}: not re-parented: {info}");
        }
        eprintln!(
            "{fmt}: {killed} of {} rounds killed mid-rebase",
            kill_rounds()
        );
        assert!(killed > 0, "{fmt}: no round was killed mid-rebase");
    }
}

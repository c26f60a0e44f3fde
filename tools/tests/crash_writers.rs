//! SIGKILL of `viridian serve --rw` and `viridian mount --rw` under a writer that flushes after
//! every write: afterwards the image opens with no manual step, every write whose flush was
//! acknowledged is there, every other written 4 KiB piece is old or new (nothing else), and
//! the checkers are clean.
//!
//! A few rounds with random delays; VIRIDIAN_KILL_ROUNDS / VIRIDIAN_KILL_SEED as in
//! crash_commit.rs (scripts/kill-soak.sh runs more).

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHUNK: u64 = 64 << 10;
const CHUNKS: u64 = 128;
const OLD: u8 = 0x41;

/// The byte chunk `i` is written with (never OLD).
fn pattern(i: u64) -> u8 {
    0x80 | (i % 100) as u8
}

fn image(dir: &Path, fmt: &str) -> PathBuf {
    let img = dir.join(format!("disk.{fmt}"));
    ok(&["create", "-q", "-f", fmt, p(&img), "16M"]);
    ok(&[
        "io",
        "-c",
        &format!("write -P {OLD} 0 {}", CHUNK * CHUNKS),
        p(&img),
    ]);
    img
}

/// Opens the image as its next user would (read-only, no repair) and checks every chunk:
/// chunks below `acked` hold their pattern; the rest hold, per 4 KiB, old or new bytes.
fn assert_durable(img: &Path, acked: u64, what: &str) {
    let dir = img.parent().unwrap();
    let out = dir.join("after.raw");
    let _ = std::fs::remove_file(&out);
    ok(&["convert", "-O", "raw", p(img), p(&out)]);
    let data = read_all(&out);
    for i in 0..CHUNKS {
        let c = &data[(i * CHUNK) as usize..((i + 1) * CHUNK) as usize];
        if i < acked {
            assert!(
                c.iter().all(|&b| b == pattern(i)),
                "{what}: chunk {i} was flushed and acknowledged but is not there"
            );
        } else {
            for (k, piece) in c.chunks(4096).enumerate() {
                assert!(
                    piece.iter().all(|&b| b == OLD) || piece.iter().all(|&b| b == pattern(i)),
                    "{what}: chunk {i} piece {k} is neither old nor new"
                );
            }
        }
    }
    // Past the written area nothing was touched.
    assert!(
        data[(CHUNKS * CHUNK) as usize..].iter().all(|&b| b == 0),
        "{what}: tail changed"
    );
}

/// Clean checks; a VHDX log that needs replay is the write-ahead log doing its job (see
/// crash_commit.rs): one read-write open replays it, then it must be clean.
fn assert_clean(img: &Path, what: &str) {
    if img.extension().is_some_and(|e| e == "raw") {
        return;
    }
    let check = || {
        let o = viridian(&["check", p(img)]);
        let out =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        (o.status.code().unwrap_or(-1), out)
    };
    let (mut c, mut out) = check();
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("ERROR")).collect();
    if c == 2 && errors.len() == 1 && errors[0].contains("need replay") {
        ok(&["io", "-c", "flush", p(img)]);
        (c, out) = check();
    }
    assert!(
        c == 0 || (c == 3 && out.contains("leak")),
        "{what}: viridian check exited {c}: {out}"
    );
    if img.extension().is_some_and(|e| e == "vhdx") && have("qemu-img") {
        let q = tool("qemu-img", &["check", "-f", "vhdx", p(img)]);
        let qc = q.status.code().unwrap_or(-1);
        assert!(
            qc == 0 || qc == 3,
            "{what}: qemu-img check exited {qc}: {}{}",
            String::from_utf8_lossy(&q.stdout),
            String::from_utf8_lossy(&q.stderr)
        );
    }
}

/// qemu-io over NBD: write chunk i, flush, for every chunk. Returns the child.
fn nbd_writer(sock: &Path) -> std::process::Child {
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for i in 0..CHUNKS {
        args.push("-c".into());
        args.push(format!("write -P {} {} {CHUNK}", pattern(i), i * CHUNK));
        args.push("-c".into());
        args.push("flush".into());
    }
    args.push(format!("nbd+unix:///?socket={}", p(sock)));
    Command::new("qemu-io")
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Chunks whose flush was acknowledged: qemu-io runs the commands in order, so when write
/// k+1 succeeded, the flush after write k had succeeded.
fn acked_from(stdout: &str) -> u64 {
    let wrote = stdout.lines().filter(|l| l.starts_with("wrote ")).count() as u64;
    wrote.saturating_sub(1)
}

#[test]
fn serve_killed_under_a_flushing_writer_keeps_every_acknowledged_write() {
    if !have("qemu-io") {
        return;
    }
    let mut rng = KillRng::new("serve");
    for fmt in ["raw", "vhd", "vhdx"] {
        // How long a whole run takes, to spread the kills over it.
        let d = tmp();
        let img = image(d.path(), fmt);
        let sock = d.path().join("s.sock");
        let g = serve_start(&["--rw", "-k", p(&sock), p(&img)], &sock).unwrap();
        let t = Instant::now();
        let w = nbd_writer(&sock).wait_with_output().unwrap();
        let dur = t.elapsed();
        assert_eq!(acked_from(&String::from_utf8_lossy(&w.stdout)), CHUNKS - 1);
        drop(g);
        let mut partial = 0;
        for round in 0..kill_rounds() {
            let d = tmp();
            let img = image(d.path(), fmt);
            let sock = d.path().join("s.sock");
            let mut g = serve_start(&["--rw", "-k", p(&sock), p(&img)], &sock).unwrap();
            let writer = nbd_writer(&sock);
            let delay = Duration::from_micros(rng.below(dur.as_micros() as u64));
            std::thread::sleep(delay);
            g.0.kill().unwrap();
            g.0.wait().unwrap();
            let out = writer.wait_with_output().unwrap();
            let acked = acked_from(&String::from_utf8_lossy(&out.stdout));
            partial += (acked < CHUNKS - 1) as usize;
            let what = format!("{fmt} round {round} (kill after {delay:?}, {acked} acked)");
            assert_durable(&img, acked, &what);
            assert_clean(&img, &what);
        }
        eprintln!(
            "{fmt}: {partial} of {} rounds killed mid-write",
            kill_rounds()
        );
        assert!(partial > 0, "{fmt}: no round was killed mid-write");
    }
}

#[test]
fn mount_killed_under_an_fsyncing_writer_keeps_every_acknowledged_write() {
    if !fuse_usable() {
        return;
    }
    let mut rng = KillRng::new("mount");
    for fmt in ["raw", "vhd", "vhdx"] {
        let mut partial = 0;
        for round in 0..kill_rounds() {
            let d = tmp();
            let img = image(d.path(), fmt);
            let mp = d.path().join("mp");
            std::fs::create_dir(&mp).unwrap();
            let mut server = Command::new(env!("CARGO_BIN_EXE_viridian"))
                .args(["mount", "--rw", "--foreground", p(&img), p(&mp)])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let guard = MountGuard(mp.clone());
            let t = Instant::now();
            while !mounted(&mp) {
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "mount did not come up"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            // The writer: pwrite + fsync per chunk; `acked` counts the fsyncs that succeeded.
            let acked = Arc::new(AtomicUsize::new(0));
            let writer = {
                let acked = acked.clone();
                let file = mp.join("disk");
                std::thread::spawn(move || {
                    let Ok(f) = std::fs::OpenOptions::new().write(true).open(&file) else {
                        return;
                    };
                    for i in 0..CHUNKS {
                        let buf = vec![pattern(i); CHUNK as usize];
                        if f.write_all_at(&buf, i * CHUNK).is_err() || f.sync_data().is_err() {
                            return;
                        }
                        acked.store(i as usize + 1, Ordering::SeqCst);
                    }
                })
            };
            // Kill once the writer has a random number of chunks acknowledged.
            let target = rng.below(CHUNKS) as usize;
            let t = Instant::now();
            while acked.load(Ordering::SeqCst) < target
                && !writer.is_finished()
                && t.elapsed() < Duration::from_secs(20)
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            let delay = t.elapsed();
            server.kill().unwrap();
            server.wait().unwrap();
            writer.join().unwrap();
            drop(guard);
            let acked = acked.load(Ordering::SeqCst) as u64;
            partial += (acked < CHUNKS) as usize;
            let what = format!(
                "{fmt} round {round} (kill at {target} acked, after {delay:?}; {acked} acked)"
            );
            assert_durable(&img, acked, &what);
            assert_clean(&img, &what);
        }
        eprintln!(
            "{fmt}: {partial} of {} rounds killed mid-write",
            kill_rounds()
        );
        assert!(partial > 0, "{fmt}: no round was killed mid-write");
    }
}

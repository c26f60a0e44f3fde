//! Concurrency stress against a model, for every format and every front end: threads in one
//! process, several NBD connections to `viridian serve --rw`, several processes writing through
//! `viridian mount --rw`. Concurrent requests touch disjoint bytes of the same sectors (1 byte
//! to 1 MiB, straddling block boundaries), overlap, flush, discard and zero; afterwards the image
//! is reopened and every byte is compared with the model (see common/stress_model.rs).
//!
//! `VIRIDIAN_STRESS_SEED` repeats a run, `VIRIDIAN_STRESS_ROUNDS` makes it longer
//! (scripts/soak-concurrency.sh loops over seeds for a given time).

mod common;
#[path = "common/stress_model.rs"]
mod stress_model;

use common::*;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use stress_model::*;

use disk::{Disk, ZeroFlags};

// ---------------------------------------------------------------------------------------------
// Threads in one process, through the request layer (`disk::Disk`, what `chain::open` returns).

const THREADS: usize = 6;

fn run_piece(d: &Disk, p: &Piece) -> disk::Result<()> {
    match p.op {
        Op::Write => d.write_at(&payload(p.id, p.off, p.len), p.off),
        Op::Zero { unmap } => d.write_zeroes(p.off, p.len, ZeroFlags { may_unmap: unmap }),
        Op::Discard => d.discard(p.off, p.len),
        Op::Flush => d.flush(),
    }
}

fn threads(kind: Kind) {
    let seed = seed();
    let ctx = format!("{} (VIRIDIAN_STRESS_SEED={seed})", kind.name());
    eprintln!("stress threads: {ctx}");
    let dir = tmp();
    let chunks = initial_chunks(seed);
    let img = make_image(dir.path(), kind, &chunks);
    let mut model = Model::new(chunks);
    let mix = Mix {
        workers: THREADS,
        rounds: rounds(300),
        overlap_percent: 30,
        discard: true,
        zeroes: true,
        max_window: 2 * MIB,
        first_id: 2,
    };
    let plan = Arc::new(mix.plan(seed, kind));
    let dev: Disk = chain::open(&img, &chain::OpenOptions::read_write()).unwrap();
    let start = Arc::new(Barrier::new(THREADS + 1));
    let end = Arc::new(Barrier::new(THREADS + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..THREADS)
        .map(|w| {
            let (dev, plan, start, end, stop, errors) = (
                dev.clone(),
                plan.clone(),
                start.clone(),
                end.clone(),
                stop.clone(),
                errors.clone(),
            );
            std::thread::spawn(move || {
                for round in plan.iter() {
                    start.wait();
                    for p in round.pieces.iter().filter(|p| p.worker == w) {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if let Err(e) = run_piece(&dev, p) {
                            errors.lock().unwrap().push(format!("{p:?}: {e}"));
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    end.wait();
                }
            })
        })
        .collect();
    let mut failure = None;
    for (r, round) in plan.iter().enumerate() {
        start.wait();
        end.wait();
        if failure.is_some() || stop.load(Ordering::Relaxed) {
            stop.store(true, Ordering::Relaxed);
            continue;
        }
        let (lo, hi) = round.window;
        let mut got = vec![0u8; (hi - lo) as usize];
        dev.read_at(&mut got, lo).unwrap();
        let verdict = if round.overlap {
            model.check_overlap(&round.pieces, &got, lo)
        } else {
            model.apply(&round.pieces);
            model.check(&got, lo)
        };
        if let Err(e) = verdict {
            failure = Some(format!(
                "{ctx}: round {r} ({} window {lo:#x}..{hi:#x}, {} requests): {e}",
                if round.overlap { "overlap" } else { "disjoint" },
                round.pieces.len()
            ));
            stop.store(true, Ordering::Relaxed);
        }
    }
    for w in workers {
        w.join().unwrap();
    }
    let errors = errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "{ctx}: requests failed: {errors:?}");
    if let Some(f) = failure {
        panic!("{f}");
    }
    dev.close().unwrap();
    drop(dev);
    if let Err(e) = check_image(&img, &model) {
        panic!("{ctx}: after close and reopen: {e}");
    }
    if kind != Kind::Raw {
        let o = viridian(&["check", p(&img)]);
        assert!(
            o.status.success(),
            "{ctx}: viridian check after the run: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Out-of-process front ends: NBD connections and FUSE writers run a written plan.

const CONNECTIONS: usize = 4;
const PROCESSES: usize = 4;

fn driver(name: &str) -> String {
    format!("{}/tests/common/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A Python 3 that has libnbd's bindings (`import nbd`); None (skipped, or a failure under
/// VIRIDIAN_REQUIRE_ALL=1) when there is none.
fn python_with_nbd() -> Option<&'static str> {
    let found = ["/usr/bin/python3", "python3"].into_iter().find(|py| {
        std::process::Command::new(py)
            .args(["-c", "import nbd; nbd.NBD"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        assert!(
            !require_all(),
            "python3 with libnbd bindings (python3-libnbd) is required (VIRIDIAN_REQUIRE_ALL=1)"
        );
        eprintln!("SKIP: no python3 with libnbd bindings (python3-libnbd)");
    }
    found
}

/// FUSE as root needs only /dev/fuse (`viridian mount` mounts itself); others need fusermount3.
fn fuse_here() -> bool {
    let root = unsafe { libc::geteuid() } == 0; // SAFETY: geteuid has no preconditions.
    let ok = Path::new("/dev/fuse").exists() && (root || have("fusermount3"));
    if !ok {
        assert!(!require_all(), "FUSE is required (VIRIDIAN_REQUIRE_ALL=1)");
        eprintln!("SKIP: FUSE unavailable");
    }
    ok
}

/// A plan for a front end, written to `dir`.
fn front_end_plan(
    dir: &Path,
    kind: Kind,
    seed: u64,
    workers: usize,
    discard: bool,
    first_id: u32,
    default_rounds: usize,
) -> Vec<Round> {
    std::fs::create_dir_all(dir).unwrap();
    let mix = Mix {
        first_id,
        workers,
        rounds: rounds(default_rounds),
        overlap_percent: 0,
        discard,
        zeroes: true,
        max_window: 2 * MIB,
    };
    let plan = mix.plan(seed, kind);
    let (ones, straddles) = coverage(&plan, kind);
    assert!(
        ones > 0 && straddles > 0,
        "plan lacks 1-byte ({ones}) or block-straddling ({straddles}) writes"
    );
    write_plan(dir, &plan, workers);
    plan
}

fn run_driver(ctx: &str, prog: &str, args: &[&str]) {
    let o = tool(prog, args);
    assert!(
        o.status.success(),
        "{ctx}: {prog} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn verify(ctx: &str, kind: Kind, img: &Path, chunks: Vec<bool>, plans: &[&[Round]]) {
    let mut model = Model::new(chunks);
    for round in plans.iter().copied().flatten() {
        model.apply(&round.pieces);
    }
    if let Err(e) = check_image(img, &model) {
        panic!("{ctx}: {e}");
    }
    if kind != Kind::Raw {
        let o = viridian(&["check", p(img)]);
        assert!(o.status.success(), "{ctx}: viridian check: {o:?}");
    }
}

/// Several connections, each with all its requests of a round in flight.
fn nbd(kind: Kind) {
    nbd_with(kind, CONNECTIONS)
}

/// One connection pipelining every request of a round (the server runs them concurrently).
fn nbd_one(kind: Kind) {
    nbd_with(kind, 1)
}

fn nbd_with(kind: Kind, connections: usize) {
    let Some(py) = python_with_nbd() else {
        return;
    };
    let seed = seed();
    let ctx = format!(
        "nbd {} with {connections} connection(s) (VIRIDIAN_STRESS_SEED={seed})",
        kind.name()
    );
    eprintln!("stress {ctx}");
    let dir = tmp();
    let chunks = initial_chunks(seed);
    let img = make_image(dir.path(), kind, &chunks);
    let plan_dir = dir.path().join("plan");
    let plan = front_end_plan(&plan_dir, kind, seed, connections, true, 2, 120);
    let sock = dir.path().join("nbd.sock");
    let server = serve_start(&["--socket", p(&sock), "--rw", p(&img)], &sock)
        .unwrap_or_else(|(c, e)| panic!("{ctx}: serve --rw: exit {c}: {e}"));
    let uri = format!("nbd+unix:///?socket={}", p(&sock));
    run_driver(
        &ctx,
        py,
        &[
            &driver("stress_nbd.py"),
            &uri,
            p(&plan_dir),
            &connections.to_string(),
        ],
    );
    // An orderly stop (SIGTERM) flushes and closes the image.
    let st = server.stop();
    assert!(st.success(), "{ctx}: serve exited with {st:?}");
    verify(&ctx, kind, &img, chunks, &[&plan]);
}

fn fuse(kind: Kind) {
    if !fuse_here() || !have("python3") {
        return;
    }
    let seed = seed();
    let ctx = format!("fuse {} (VIRIDIAN_STRESS_SEED={seed})", kind.name());
    eprintln!("stress {ctx}");
    let dir = tmp();
    let chunks = initial_chunks(seed);
    let img = make_image(dir.path(), kind, &chunks);
    // FUSE has no discard that may keep old data: fallocate punches (zeros) or zeroes a range.
    // First every process writes with O_DIRECT (parallel direct writes reach the image
    // concurrently), then every process with buffered pwrite; one file opened for the page
    // cache makes the kernel serialise direct writes too, so the two are not mixed.
    let direct_dir = dir.path().join("direct");
    let direct = front_end_plan(&direct_dir, kind, seed, PROCESSES, false, 2, 120);
    let buffered_dir = dir.path().join("buffered");
    let buffered = front_end_plan(
        &buffered_dir,
        kind,
        seed ^ 0xB0F,
        PROCESSES,
        false,
        1 << 24,
        60,
    );
    let mp = dir.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    {
        ok(&["mount", "--rw", p(&img), p(&mp)]);
        let _guard = MountGuard(mp.clone());
        for (plan_dir, mode) in [(&direct_dir, "direct"), (&buffered_dir, "buffered")] {
            run_driver(
                &ctx,
                "python3",
                &[
                    &driver("stress_fuse.py"),
                    p(&mp.join("disk")),
                    p(plan_dir),
                    &PROCESSES.to_string(),
                    mode,
                ],
            );
        }
        ok(&["unmount", p(&mp)]);
    }
    // The serving process flushes and closes after the unmount; wait for its lock to go.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while code(&["info", p(&img)]) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{ctx}: image still locked 20 s after unmount"
        );
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    verify(&ctx, kind, &img, chunks, &[&direct, &buffered]);
}

macro_rules! per_kind {
    ($run:ident: $($name:ident = $kind:expr),* $(,)?) => {
        mod $run {
            use super::*;
            $(#[test] fn $name() { super::$run($kind) })*
        }
    };
}

per_kind!(threads:
    raw = Kind::Raw,
    vhd_fixed = Kind::VhdFixed,
    vhd_dynamic = Kind::VhdDynamic,
    vhd_diff = Kind::VhdDiff,
    vhdx_fixed_512 = Kind::VhdxFixed(512),
    vhdx_dynamic_512 = Kind::VhdxDynamic(512),
    vhdx_diff_512 = Kind::VhdxDiff(512),
    vhdx_fixed_4096 = Kind::VhdxFixed(4096),
    vhdx_dynamic_4096 = Kind::VhdxDynamic(4096),
    vhdx_diff_4096 = Kind::VhdxDiff(4096),
);

per_kind!(nbd:
    raw = Kind::Raw,
    vhd_fixed = Kind::VhdFixed,
    vhd_dynamic = Kind::VhdDynamic,
    vhd_diff = Kind::VhdDiff,
    vhdx_fixed_512 = Kind::VhdxFixed(512),
    vhdx_dynamic_512 = Kind::VhdxDynamic(512),
    vhdx_diff_512 = Kind::VhdxDiff(512),
    vhdx_fixed_4096 = Kind::VhdxFixed(4096),
    vhdx_dynamic_4096 = Kind::VhdxDynamic(4096),
    vhdx_diff_4096 = Kind::VhdxDiff(4096),
);

per_kind!(fuse:
    raw = Kind::Raw,
    vhd_fixed = Kind::VhdFixed,
    vhd_dynamic = Kind::VhdDynamic,
    vhd_diff = Kind::VhdDiff,
    vhdx_fixed_512 = Kind::VhdxFixed(512),
    vhdx_dynamic_512 = Kind::VhdxDynamic(512),
    vhdx_diff_512 = Kind::VhdxDiff(512),
    vhdx_fixed_4096 = Kind::VhdxFixed(4096),
    vhdx_dynamic_4096 = Kind::VhdxDynamic(4096),
    vhdx_diff_4096 = Kind::VhdxDiff(4096),
);

per_kind!(nbd_one:
    raw = Kind::Raw,
    vhd_fixed = Kind::VhdFixed,
    vhd_dynamic = Kind::VhdDynamic,
    vhd_diff = Kind::VhdDiff,
    vhdx_fixed_512 = Kind::VhdxFixed(512),
    vhdx_dynamic_512 = Kind::VhdxDynamic(512),
    vhdx_diff_512 = Kind::VhdxDiff(512),
    vhdx_fixed_4096 = Kind::VhdxFixed(4096),
    vhdx_dynamic_4096 = Kind::VhdxDynamic(4096),
    vhdx_diff_4096 = Kind::VhdxDiff(4096),
);

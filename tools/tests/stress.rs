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

use disk::{BlockDevice, ZeroFlags};

// ---------------------------------------------------------------------------------------------
// Threads in one process.

const THREADS: usize = 6;

fn run_piece(d: &dyn BlockDevice, p: &Piece) -> disk::Result<()> {
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
        rounds: rounds(150),
        overlap_percent: 30,
        discard: true,
        zeroes: true,
        max_window: 2 * MIB,
    };
    let plan = Arc::new(mix.plan(seed, kind));
    let dev = chain::open(&img, &chain::OpenOptions::read_write()).unwrap();
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
                        if let Err(e) = run_piece(&*dev, p) {
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


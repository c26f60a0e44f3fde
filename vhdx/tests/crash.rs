//! Crash consistency: a crash at every operation of allocating-write workloads, with unflushed
//! writes dropped or torn (disk::fault::FaultyStorage::crash_image). After each crash the image
//! opens (replaying its log), passes our check, and every write acknowledged by a completed
//! flush reads back; a sample is also checked (and replayed) by qemu-img.
//!
//! VHDX_CRASH_POINTS=N raises the number of crash points (soak mode).

mod common;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use common::*;
use disk::fault::{FaultPlan, FaultyStorage, SplitMix};
use disk::{BlockDevice, MemStorage, Storage, ZeroFlags};
use vhdx::{CreateKind, CreateOptions, OpenOptions, VhdxDisk};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;
const SECTOR: u64 = 512;

#[derive(Clone)]
struct Op {
    offset: u64,
    data: Option<Vec<u8>>, // None: zeros (write_zeroes)
    len: u64,
}

/// The image under test, and for differencing runs the parent it sits on.
fn base_image(block_size: u32, diff: bool) -> (Vec<u8>, Option<Arc<dyn BlockDevice>>) {
    let parent: Option<Arc<dyn BlockDevice>> = if diff {
        let ps = Arc::new(MemStorage::new());
        let mut o = CreateOptions::new(CreateKind::Dynamic, SIZE);
        o.block_size = block_size;
        let p = VhdxDisk::create_on(ps.clone(), &o).unwrap();
        p.write_at(&pattern(8, SIZE as usize), 0).unwrap();
        p.close().unwrap();
        drop(p);
        Some(Arc::new(
            VhdxDisk::open(ps, &OpenOptions { read_only: true }).unwrap(),
        ))
    } else {
        None
    };
    let s = Arc::new(MemStorage::new());
    let kind = match &parent {
        Some(p) => CreateKind::Differencing {
            parent_path: "parent.vhdx".into(),
            parent: p.clone(),
        },
        None => CreateKind::Dynamic,
    };
    let mut o = CreateOptions::new(kind, SIZE);
    o.block_size = block_size;
    let d = VhdxDisk::create_on(s.clone(), &o).unwrap();
    // Some pre-existing data so that torn states could expose stale bytes.
    d.write_at(&pattern(7, MIB as usize), MIB).unwrap();
    d.close().unwrap();
    drop(d);
    (s.to_vec(), parent)
}

fn open(s: Arc<dyn Storage>, read_only: bool, parent: &Option<Arc<dyn BlockDevice>>) -> VhdxDisk {
    let mut d = VhdxDisk::open(s, &OpenOptions { read_only }).unwrap();
    if let Some(p) = parent {
        d.attach_parent(p.clone()).unwrap();
    }
    d
}

/// Runs the workload until the storage fails. Returns the ops and how many were acknowledged
/// by a completed flush.
fn workload(d: &VhdxDisk, seed: u64) -> (Vec<Op>, usize) {
    let mut rng = SplitMix(seed);
    let mut ops = Vec::new();
    let mut acked = 0;
    for i in 0..24u64 {
        let kind = rng.below(10);
        let op = if kind == 0 {
            let b = rng.below(SIZE / MIB);
            Op {
                offset: b * MIB,
                data: None,
                len: MIB,
            }
        } else {
            let len = if kind == 1 { SECTOR } else { 4096 };
            let offset = rng.below((SIZE - len) / SECTOR) * SECTOR;
            Op {
                offset,
                data: Some(pattern(seed * 100 + i, len as usize)),
                len,
            }
        };
        ops.push(op.clone());
        let r = match &op.data {
            Some(data) => d.write_at(data, op.offset),
            None => d.write_zeroes(op.offset, op.len, ZeroFlags { may_unmap: true }),
        };
        if r.is_err() {
            return (ops, acked);
        }
        if i % 4 == 3 {
            if d.flush().is_err() {
                return (ops, acked);
            }
            acked = ops.len();
        }
    }
    if d.close().is_ok() {
        acked = ops.len();
    }
    (ops, acked)
}

/// Every sector must hold its acknowledged value or a value from a later (unacknowledged) op.
#[allow(clippy::needless_range_loop)] // s indexes two arrays and is an offset
fn verify(d: &VhdxDisk, base: &VhdxDisk, ops: &[Op], acked: usize, ctx: &str) {
    let sectors = (SIZE / SECTOR) as usize;
    let mut touched = vec![false; sectors];
    for op in ops {
        for s in op.offset / SECTOR..(op.offset + op.len) / SECTOR {
            touched[s as usize] = true;
        }
    }
    let mut all = vec![0u8; SIZE as usize];
    d.read_at(&mut all, 0).unwrap();
    let mut base_all = vec![0u8; SIZE as usize];
    base.read_at(&mut base_all, 0).unwrap();
    let mut want = vec![0u8; SECTOR as usize];
    for s in 0..sectors {
        let off = s as u64 * SECTOR;
        if !touched[s] && s % 97 != 0 {
            continue;
        }
        let got = &all[off as usize..(off + SECTOR) as usize];
        let value_of = |op: &Op, buf: &mut Vec<u8>| match &op.data {
            Some(data) => {
                let a = (off - op.offset) as usize;
                buf.copy_from_slice(&data[a..a + SECTOR as usize]);
            }
            None => buf.fill(0),
        };
        let covers = |op: &Op| op.offset <= off && off < op.offset + op.len;
        // Acknowledged value.
        match ops[..acked].iter().rev().find(|o| covers(o)) {
            Some(op) => value_of(op, &mut want),
            None => want.copy_from_slice(&base_all[off as usize..(off + SECTOR) as usize]),
        }
        if got == &want[..] {
            continue;
        }
        let mut ok = false;
        for op in ops[acked..].iter().filter(|o| covers(o)) {
            value_of(op, &mut want);
            if got == &want[..] {
                ok = true;
                break;
            }
        }
        assert!(
            ok,
            "{ctx}: sector {s} holds neither its acknowledged nor a later value"
        );
    }
}

#[test]
fn crash_at_every_operation() {
    let target: usize = std::env::var("VHDX_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let qemu = std::env::var("VHDX_CRASH_NO_QEMU").is_err() && have_qemu();
    let dir = tempfile::tempdir().unwrap();
    let mut points = 0usize;
    let mut qemu_checked = 0usize;
    let mut seed = 0u64;
    let mut rng = SplitMix(0xc0ffee);
    while points < target {
        seed += 1;
        let bs = if seed.is_multiple_of(3) {
            2 * MIB as u32
        } else {
            MIB as u32
        };
        // Every other workload runs on a differencing child (sector bitmaps through the log).
        let diff = seed.is_multiple_of(2);
        let (img0, parent) = base_image(bs, diff);
        let base = open(Arc::new(MemStorage::from_vec(img0.clone())), true, &parent);
        // Count the operations of a clean run.
        let fs = Arc::new(FaultyStorage::new(img0.clone(), FaultPlan::default()));
        {
            let d = open(fs.clone(), false, &parent);
            let (_, acked) = workload(&d, seed);
            assert_eq!(acked, 24);
        }
        let total = fs.ops();
        for n in 0..total {
            if points >= target {
                break;
            }
            let fs = Arc::new(FaultyStorage::new(
                img0.clone(),
                FaultPlan {
                    crash_at: Some(n),
                    ..Default::default()
                },
            ));
            let (ops, acked) = {
                let d = open(fs.clone(), false, &parent);
                let r = workload(&d, seed);
                // Dropping the handle must not touch the crashed store (it fails anyway).
                drop(d);
                r
            };
            // Several possible disk states per crash instant.
            for _ in 0..3 {
                let img = fs.crash_image(&mut rng);
                points += 1;
                let ctx = format!("seed {seed} crash at op {n}/{total}");
                let s = Arc::new(MemStorage::from_vec(img.clone()));
                let mut d = VhdxDisk::open(s.clone(), &OpenOptions::default())
                    .unwrap_or_else(|e| panic!("{ctx}: open failed: {e}"));
                if let Some(p) = &parent {
                    d.attach_parent(p.clone()).unwrap();
                }
                verify(&d, &base, &ops, acked, &ctx);
                // Still writable after recovery.
                if points.is_multiple_of(10) {
                    d.write_at(&[0x5a; 4096], 0).unwrap();
                }
                d.close().unwrap();
                drop(d);
                let rep = vhdx::check(s.clone(), disk::check::Repair::None).unwrap();
                assert_eq!(rep.corruptions, 0, "{ctx}: {:?}", rep.findings);
                assert_eq!(rep.check_errors, 0, "{ctx}");
                // qemu refuses differencing VHDX, so it checks the base-image runs.
                if qemu && !diff && points.is_multiple_of(25) {
                    // Our recovered image passes qemu-img check ...
                    let p = dir.path().join("recovered.vhdx");
                    std::fs::write(&p, s.to_vec()).unwrap();
                    let (rc, out) = qemu_check(&p);
                    assert_eq!(rc, 0, "{ctx}: {out}");
                    // ... and qemu replays the raw crash image to the same contents as we do.
                    let p2 = dir.path().join("crashed.vhdx");
                    std::fs::write(&p2, &img).unwrap();
                    run(
                        "qemu-img",
                        &[
                            "check",
                            "-q",
                            "-r",
                            "all",
                            "-f",
                            "vhdx",
                            p2.to_str().unwrap(),
                        ],
                    );
                    let raw = dir.path().join("crashed.raw");
                    let _ = std::fs::remove_file(&raw);
                    run(
                        "qemu-img",
                        &[
                            "convert",
                            "-f",
                            "vhdx",
                            "-O",
                            "raw",
                            p2.to_str().unwrap(),
                            raw.to_str().unwrap(),
                        ],
                    );
                    let theirs = std::fs::read(&raw).unwrap();
                    let ours = VhdxDisk::open(
                        Arc::new(MemStorage::from_vec(img.clone())),
                        &OpenOptions { read_only: true },
                    )
                    .unwrap();
                    let mut buf = vec![0u8; SIZE as usize];
                    ours.read_at(&mut buf, 0).unwrap();
                    assert!(buf == theirs, "{ctx}: qemu's replay differs from ours");
                    qemu_checked += 1;
                }
            }
        }
    }
    eprintln!("crash points: {points}, qemu-checked: {qemu_checked}, seeds: {seed}");
    assert!(points >= target);
}

#[test]
fn failed_writes_and_flushes_are_reported_not_fatal() {
    let (img0, _) = base_image(MIB as u32, false);
    for n in 0..40 {
        for plan in [
            FaultPlan {
                fail_write: Some(n),
                ..Default::default()
            },
            FaultPlan {
                fail_flush: Some(n),
                ..Default::default()
            },
            FaultPlan {
                short_write: Some(n),
                ..Default::default()
            },
        ] {
            let fs = Arc::new(FaultyStorage::new(img0.clone(), plan));
            let d = VhdxDisk::open(fs.clone(), &OpenOptions::default()).unwrap();
            let _ = workload(&d, 5);
            drop(d);
            // Whatever happened, the volatile and durable states both open.
            for bytes in [fs.volatile(), fs.durable()] {
                let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes));
                VhdxDisk::open(s.clone(), &OpenOptions { read_only: true }).unwrap();
                let rep = vhdx::check(s, disk::check::Repair::None).unwrap();
                assert_eq!(rep.check_errors, 0);
            }
        }
    }
}

/// Crashes during compact (blocks moved, file truncated) and during a resize that relocates
/// the BAT: afterwards the image opens, is clean, and reads exactly as before.
#[test]
fn crash_during_compact_and_resize() {
    let size = 12 * MIB;
    let s = Arc::new(MemStorage::new());
    let d = VhdxDisk::create_on(s.clone(), &CreateOptions::new(CreateKind::Dynamic, size)).unwrap();
    for b in 0..12u64 {
        let data = if b % 3 == 1 {
            vec![0u8; MIB as usize]
        } else {
            pattern(b, MIB as usize)
        };
        d.write_at(&data, b * MIB).unwrap();
    }
    d.discard(4 * MIB, MIB).unwrap();
    d.close().unwrap();
    let mut model = vec![0u8; size as usize];
    d.read_at(&mut model, 0).unwrap();
    drop(d);
    let img0 = s.to_vec();
    let mut rng = SplitMix(5);
    for op in ["compact", "resize"] {
        let total = {
            let fs = Arc::new(FaultyStorage::new(img0.clone(), FaultPlan::default()));
            let d = VhdxDisk::open(fs.clone(), &OpenOptions::default()).unwrap();
            match op {
                "compact" => {
                    d.compact().unwrap();
                }
                _ => d.resize(300 << 30).unwrap(),
            }
            d.close().unwrap();
            fs.ops()
        };
        for n in 0..total {
            let fs = Arc::new(FaultyStorage::new(
                img0.clone(),
                FaultPlan {
                    crash_at: Some(n),
                    ..Default::default()
                },
            ));
            {
                let d = VhdxDisk::open(fs.clone(), &OpenOptions::default()).unwrap();
                let _ = match op {
                    "compact" => d.compact().map(|_| ()),
                    _ => d.resize(300 << 30),
                };
            }
            for _ in 0..2 {
                let img = fs.crash_image(&mut rng);
                let ctx = format!("{op}: crash at op {n}/{total}");
                let s = Arc::new(MemStorage::from_vec(img));
                let d = VhdxDisk::open(s.clone(), &OpenOptions::default())
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert!(
                    d.size() == size || (op == "resize" && d.size() == 300 << 30),
                    "{ctx}"
                );
                let mut got = vec![0u8; size as usize];
                d.read_at(&mut got, 0).unwrap();
                assert!(got == model, "{ctx}: contents changed");
                d.close().unwrap();
                drop(d);
                let rep = vhdx::check(s, disk::check::Repair::None).unwrap();
                assert_eq!(rep.corruptions, 0, "{ctx}: {:?}", rep.findings);
            }
        }
    }
}

/// A failed resize or closing header update never turns into a later success that lies: for
/// a fault at every storage operation of `resize` and of `close`, the handle either refuses
/// every later write and flush, or a later flush that returns Ok has made exactly the state it
/// reports durable (an unacknowledged resize is not committed behind the caller's back, and a
/// write after a failed close reads back after reopening).
#[test]
fn failed_resize_and_close_are_sticky_or_honest() {
    let (img0, _) = base_image(MIB as u32, false);
    let big = 64 * MIB;
    for op in ["resize", "close"] {
        let total = {
            let fs = Arc::new(FaultyStorage::new(img0.clone(), FaultPlan::default()));
            let d = VhdxDisk::open(fs.clone(), &OpenOptions::default()).unwrap();
            d.write_at(&pattern(21, MIB as usize), 0).unwrap();
            d.flush().unwrap();
            let before = fs.ops();
            match op {
                "resize" => d.resize(big).unwrap(),
                _ => d.close().unwrap(),
            }
            fs.ops() - before
        };
        let mut sticky = 0;
        for k in 0..total {
            for fail_write in [false, true] {
                let fs = Arc::new(FaultyStorage::new(img0.clone(), FaultPlan::default()));
                let d = VhdxDisk::open(fs.clone(), &OpenOptions::default()).unwrap();
                d.write_at(&pattern(21, MIB as usize), 0).unwrap();
                d.flush().unwrap();
                let n = fs.ops() + k;
                fs.set_plan(FaultPlan {
                    fail_write: fail_write.then_some(n),
                    fail_flush: (!fail_write).then_some(n),
                    ..Default::default()
                });
                let ctx = format!("{op}: fault (write={fail_write}) at op {k}/{total}");
                let r = match op {
                    "resize" => d.resize(big),
                    _ => d.close(),
                };
                if r.is_ok() {
                    continue;
                }
                // After the failure: a new write and a flush.
                let w = d.write_at(&pattern(22, MIB as usize), 2 * MIB);
                let f = d.flush();
                if w.is_err() || f.is_err() {
                    // Refused: it must stay refused and name why.
                    let e = d.flush().unwrap_err().to_string();
                    assert!(!e.is_empty(), "{ctx}");
                    sticky += 1;
                    continue;
                }
                drop(d);
                let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(fs.durable()));
                let d = VhdxDisk::open(s.clone(), &OpenOptions::default())
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                if op == "resize" {
                    assert_eq!(d.size(), SIZE, "{ctx}: failed resize committed later");
                }
                let mut got = vec![0u8; MIB as usize];
                d.read_at(&mut got, 2 * MIB).unwrap();
                assert!(
                    got == pattern(22, MIB as usize),
                    "{ctx}: flushed write lost"
                );
                d.read_at(&mut got, 0).unwrap();
                assert!(
                    got == pattern(21, MIB as usize),
                    "{ctx}: flushed write lost"
                );
                d.close().unwrap();
                drop(d);
                let rep = vhdx::check(s, disk::check::Repair::None).unwrap();
                assert_eq!(rep.corruptions, 0, "{ctx}: {:?}", rep.findings);
            }
        }
        eprintln!("{op}: {total} operations, {sticky} faults left the handle refusing");
        assert!(sticky > 0, "{op}: no fault made the handle sticky");
    }
}

/// A fresh block whose data write fails (a short write leaves part of it behind) is not
/// referenced by anything. Its place may be reused, but the next block put there must still
/// read zeros wherever it was not written: never the failed write's leftovers.
#[test]
fn failed_fresh_block_write_leaves_nothing_visible() {
    let (img0, _) = base_image(MIB as u32, false);
    let mut hit = 0;
    for k in 0..10 {
        for short in [false, true] {
            let fs = Arc::new(FaultyStorage::new(img0.clone(), FaultPlan::default()));
            let d = VhdxDisk::open(fs.clone(), &OpenOptions::default()).unwrap();
            let n = fs.ops() + k;
            fs.set_plan(FaultPlan {
                short_write: short.then_some(n),
                fail_write: (!short).then_some(n),
                ..Default::default()
            });
            let ctx = format!("fault (short={short}) at op {k}");
            // Block 2 (fresh), written from its start.
            if d.write_at(&pattern(31, 256 << 10), 2 * MIB).is_ok() {
                continue;
            }
            hit += 1;
            // Block 3 (fresh), written only in its second half.
            d.write_at(&pattern(32, 4096), 3 * MIB + MIB / 2).unwrap();
            d.flush().unwrap();
            for img in [fs.volatile(), fs.durable()] {
                let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img));
                let d = VhdxDisk::open(s, &OpenOptions { read_only: true }).unwrap();
                let mut got = vec![0u8; (MIB / 2) as usize];
                d.read_at(&mut got, 3 * MIB).unwrap();
                assert!(got.iter().all(|&b| b == 0), "{ctx}: leftovers visible");
            }
        }
    }
    assert!(hit > 0);
}

/// Fails the `n`th write or flush (counted together from the last `arm`) once: a transient
/// fault over a real file.
#[derive(Debug)]
struct FailOnce {
    inner: disk::FileStorage,
    ops: AtomicU64,
    fail_at: AtomicU64,
    fail_flush: bool,
    /// Which operations since `arm` were flushes.
    kinds: std::sync::Mutex<Vec<bool>>,
}

impl FailOnce {
    fn arm(&self, at: u64) {
        self.ops.store(0, SeqCst);
        self.kinds.lock().unwrap().clear();
        self.fail_at.store(at, SeqCst);
    }
    fn tick(&self, is_flush: bool) -> std::io::Result<()> {
        let n = self.ops.fetch_add(1, SeqCst);
        self.kinds.lock().unwrap().push(is_flush);
        if n == self.fail_at.load(SeqCst) && is_flush == self.fail_flush {
            return Err(std::io::Error::other("injected transient fault"));
        }
        Ok(())
    }
}

impl Storage for FailOnce {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.tick(false)?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.tick(true)?;
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

/// A flush too large for one log entry is split into several; a transient failure at any of
/// its writes or flushes (in a group, between groups, while applying) leaves every page
/// pending, so the retried flush makes all of them durable.
#[test]
fn split_flush_failure_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = 200u64; // one BAT page each: two log entries of at most 126 pages
                         // Returns the flush's operation kinds, whether the first flush succeeded, and entries.
    let run = |name: &str, fail_at: u64, fail_flush: bool| -> (Vec<bool>, bool, u64) {
        let p = dir.path().join(name);
        let _ = std::fs::remove_file(&p);
        drop(VhdxDisk::create(&p, &CreateOptions::new(CreateKind::Dynamic, 1 << 38)).unwrap());
        let s = Arc::new(FailOnce {
            inner: disk::FileStorage::open(&p, disk::Access::ReadWrite, true).unwrap(),
            ops: AtomicU64::new(0),
            fail_at: AtomicU64::new(u64::MAX),
            fail_flush,
            kinds: Default::default(),
        });
        let d = VhdxDisk::open(s.clone(), &OpenOptions::default()).unwrap();
        for i in 0..blocks {
            d.write_at(&pattern(i + 10, 4096), i * 512 * MIB + 8192)
                .unwrap();
        }
        s.arm(fail_at);
        let first = d.flush().is_ok();
        let ops = s.kinds.lock().unwrap().clone();
        let ctx = format!("fault (flush={fail_flush}) at op {fail_at}");
        d.flush()
            .unwrap_or_else(|e| panic!("{ctx}: retried flush: {e}"));
        let entries = d.log_entries_written();
        d.close().unwrap();
        drop(d);
        drop(s);
        let d = VhdxDisk::open_path(&p, &OpenOptions { read_only: true }).unwrap();
        for i in 0..blocks {
            let mut got = vec![0u8; 4096];
            d.read_at(&mut got, i * 512 * MIB + 8192).unwrap();
            assert!(got == pattern(i + 10, 4096), "{ctx}: block {i} lost");
        }
        let rep = vhdx::check(d.storage().clone(), disk::check::Repair::None).unwrap();
        assert_eq!(rep.corruptions, 0, "{ctx}: {:?}", rep.findings);
        (ops, first, entries)
    };
    let (kinds, ok, entries) = run("clean.vhdx", u64::MAX, false);
    assert!(
        ok && entries >= 2,
        "the flush was not split ({entries} entries)"
    );
    let total = kinds.len();
    // Every flush of the sequence; writes next to each flush (log entry writes, the first and
    // last page applied) and spread over the rest.
    let mut points: Vec<(u64, bool)> = Vec::new();
    for (k, &is_flush) in kinds.iter().enumerate() {
        let near_flush = kinds[k.saturating_sub(1)..(k + 2).min(total)].contains(&true);
        if is_flush || near_flush || k % 25 == 0 {
            points.push((k as u64, is_flush));
        }
    }
    let mut failed = 0;
    for &(k, is_flush) in &points {
        let (_, ok, _) = run("t.vhdx", k, is_flush);
        failed += !ok as usize;
    }
    eprintln!(
        "split flush: {total} operations, {} faults, {failed} first flushes failed and were \
         retried",
        points.len()
    );
    assert_eq!(failed, points.len(), "a fault did not fail the flush");
}

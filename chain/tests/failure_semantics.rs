//! Failure semantics at every storage operation: raw, VHD (dynamic, differencing) and VHDX
//! (fixed, dynamic, differencing; 512 and 4096-byte logical sectors) run a write/flush/trim
//! workload on `disk::fault::FaultyStorage` with one fault planned at storage operation N, for
//! every N, in five modes:
//!
//! * `flush-retry`: flush N fails once (transient); the workload goes on and flushes again;
//! * `write-retry`: write N fails once (changing nothing); the workload goes on and flushes;
//! * `short-write-retry`: write N stores half its bytes and fails; the same;
//! * `crash-after-failed-flush`: flush N fails, the machine dies right after the call that saw
//!   it, and random crash images (2 per point, 1 in the other modes; unflushed writes dropped or torn) are examined;
//! * `lossy-flush`: flush N fails the Linux way (each pending write kept or dropped for good)
//!   under `disk::StickyFlush`, the workload goes on.
//!
//! Invariants, per 512-byte unit: after a flush that returned Ok, the durable image reopens
//! (our check finds no corruption, only leaks; `qemu-img check` too for a sample of VHDX points)
//! and reads exactly what the disk read at that flush; a crash image reads, per unit, the value
//! of the last Ok flush or a value written after it (acknowledged or not). So a flush that
//! returns Ok after losing acknowledged data fails the test.
//!
//! `VIRIDIAN_FAULT_STRIDE=k` tests every k-th point only (default 1: all). Points and time are
//! printed with `--nocapture`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use disk::check::Repair;
use disk::fault::{FaultPlan, FaultyStorage, SplitMix};
use disk::{BlockDevice, MemStorage, StickyFlush, Storage, ZeroFlags};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 2 * MIB;
const UNIT: usize = 512;
const CRASH_SAMPLES: u64 = 2;
/// qemu-img check on every Nth examined VHDX image.
const QEMU_EVERY: u64 = 40;

static EXAMINED: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Raw,
    VhdDynamic,
    VhdDiff,
    VhdxFixed(u32),
    VhdxDynamic(u32),
    VhdxDiff(u32),
}

impl Kind {
    fn sector(self) -> u64 {
        match self {
            Kind::VhdxFixed(s) | Kind::VhdxDynamic(s) | Kind::VhdxDiff(s) => s as u64,
            _ => 512,
        }
    }
    fn is_vhdx(self) -> bool {
        matches!(
            self,
            Kind::VhdxFixed(_) | Kind::VhdxDynamic(_) | Kind::VhdxDiff(_)
        )
    }
    fn is_diff(self) -> bool {
        matches!(self, Kind::VhdDiff | Kind::VhdxDiff(_))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    FlushRetry,
    WriteRetry,
    ShortWriteRetry,
    CrashAfterFailedFlush,
    LossyFlush,
}

fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut r = SplitMix(seed);
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        v.extend_from_slice(&r.next_u64().to_le_bytes());
    }
    v.truncate(n);
    v
}

fn hash(b: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in b.chunks(8) {
        let mut x = [0u8; 8];
        x[..w.len()].copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(x)).wrapping_mul(0x1000_0000_01b3);
    }
    h
}

/// The parent of a differencing image (read-only, on memory), with pattern content.
fn parent(kind: Kind) -> Option<Arc<dyn BlockDevice>> {
    let s = Arc::new(MemStorage::new());
    match kind {
        Kind::VhdDiff => {
            let mut o = vhd::CreateOptions::new(vhd::CreateKind::Dynamic, SIZE);
            o.block_size = 512 << 10;
            let p = vhd::VhdDisk::create_on(s.clone(), &o).unwrap();
            p.write_at(&pattern(1, SIZE as usize), 0).unwrap();
            p.flush().unwrap();
            drop(p);
            let ro = vhd::OpenOptions {
                read_only: true,
                size_rule: vhd::SizeRule::Auto,
            };
            Some(Arc::new(vhd::VhdDisk::open(s, &ro).unwrap()))
        }
        Kind::VhdxDiff(ls) => {
            let mut o = vhdx::CreateOptions::new(vhdx::CreateKind::Dynamic, SIZE);
            o.logical_sector_size = ls;
            let p = vhdx::VhdxDisk::create_on(s.clone(), &o).unwrap();
            p.write_at(&pattern(1, SIZE as usize), 0).unwrap();
            p.close().unwrap();
            drop(p);
            let ro = vhdx::OpenOptions { read_only: true };
            Some(Arc::new(vhdx::VhdxDisk::open(s, &ro).unwrap()))
        }
        _ => None,
    }
}

/// Opens `kind` on `s` (read-write), attaching `parent`.
fn open(
    kind: Kind,
    s: Arc<dyn Storage>,
    parent: &Option<Arc<dyn BlockDevice>>,
) -> disk::Result<Arc<dyn BlockDevice>> {
    Ok(match kind {
        Kind::Raw => Arc::new(disk::RawDisk::new(s, false)?),
        Kind::VhdDynamic | Kind::VhdDiff => {
            let o = vhd::OpenOptions {
                read_only: false,
                size_rule: vhd::SizeRule::Auto,
            };
            let mut d = vhd::VhdDisk::open(s, &o)?;
            if let Some(p) = parent {
                d.attach_parent(p.clone())?;
            }
            Arc::new(d)
        }
        _ => {
            let mut d = vhdx::VhdxDisk::open(s, &vhdx::OpenOptions { read_only: false })?;
            if let Some(p) = parent {
                d.attach_parent(p.clone())?;
            }
            Arc::new(d)
        }
    })
}

/// A closed image of `kind` with some data, as bytes.
fn initial_image(kind: Kind, parent: &Option<Arc<dyn BlockDevice>>) -> Vec<u8> {
    if kind == Kind::Raw {
        return pattern(2, SIZE as usize);
    }
    let s = Arc::new(MemStorage::new());
    let d: Arc<dyn BlockDevice> = match kind {
        Kind::VhdDynamic | Kind::VhdDiff => {
            let k = match parent {
                Some(p) => vhd::CreateKind::Differencing {
                    parent_path: "/nonexistent/parent.vhd".into(),
                    parent: p.clone(),
                },
                None => vhd::CreateKind::Dynamic,
            };
            let mut o = vhd::CreateOptions::new(k, SIZE);
            o.block_size = 512 << 10;
            Arc::new(vhd::VhdDisk::create_on(s.clone(), &o).unwrap())
        }
        Kind::VhdxFixed(ls) | Kind::VhdxDynamic(ls) | Kind::VhdxDiff(ls) => {
            let k = match (kind, parent) {
                (_, Some(p)) => vhdx::CreateKind::Differencing {
                    parent_path: "/nonexistent/parent.vhdx".into(),
                    parent: p.clone(),
                },
                (Kind::VhdxFixed(_), None) => vhdx::CreateKind::Fixed,
                _ => vhdx::CreateKind::Dynamic,
            };
            let mut o = vhdx::CreateOptions::new(k, SIZE);
            o.logical_sector_size = ls;
            Arc::new(vhdx::VhdxDisk::create_on(s.clone(), &o).unwrap())
        }
        Kind::Raw => unreachable!(),
    };
    d.write_at(&pattern(3, MIB as usize / 2), MIB / 4).unwrap();
    d.close().unwrap();
    drop(d);
    s.to_vec()
}

/// Any content: a failed write leaves its range undefined (a short write can even stop in the
/// middle of a sector) until the range is written again.
const ANY: u64 = 0;

/// What each 512-byte unit may read: `now` (the live disk) and `after_crash`.
struct Model {
    now: Vec<Vec<u64>>,
    after_crash: Vec<Vec<u64>>,
}

impl Model {
    fn new(content: &[u8]) -> Self {
        let now: Vec<Vec<u64>> = content.chunks(UNIT).map(|c| vec![hash(c)]).collect();
        Model {
            after_crash: now.clone(),
            now,
        }
    }
    fn write(&mut self, off: u64, data: &[u8], ok: bool) {
        for (i, c) in data.chunks(UNIT).enumerate() {
            let u = off as usize / UNIT + i;
            let h = if ok { hash(c) } else { ANY };
            if ok {
                self.now[u] = vec![h];
            } else if !self.now[u].contains(&h) {
                self.now[u].push(h);
            }
            if !self.after_crash[u].contains(&h) {
                self.after_crash[u].push(h);
            }
        }
    }
    fn flushed(&mut self) {
        self.after_crash = self.now.clone();
    }
    /// Units of `content` outside their allowed sets.
    fn violations(&self, content: &[u8], crash: bool) -> Vec<usize> {
        let allowed = if crash { &self.after_crash } else { &self.now };
        content
            .chunks(UNIT)
            .enumerate()
            .filter(|(u, c)| !allowed[*u].contains(&ANY) && !allowed[*u].contains(&hash(c)))
            .map(|(u, _)| u)
            .collect()
    }
}

enum Step {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Flush,
}

/// The workload: writes (some crossing blocks), whole-block trims, flushes.
fn workload(kind: Kind, seed: u64) -> Vec<Step> {
    let ls = kind.sector();
    let mut r = SplitMix(seed);
    let mut steps = Vec::new();
    for i in 0..10u64 {
        match r.below(6) {
            0 => steps.push(Step::Flush),
            1 => {
                let b = r.below(SIZE / (512 << 10));
                steps.push(Step::Zero(b * (512 << 10), 512 << 10));
            }
            _ => {
                let len = (1 + r.below(24)) * ls;
                let off = r.below((SIZE - len) / ls) * ls;
                steps.push(Step::Write(off, pattern(seed * 100 + i, len as usize)));
            }
        }
    }
    steps.push(Step::Flush);
    steps
}

fn read_all(d: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).expect("read back");
    v
}

/// Opens an image the way a user would (log replayed, closed), checks it (no corruption),
/// and returns its contents.
fn examine(kind: Kind, img: Vec<u8>, parent: &Option<Arc<dyn BlockDevice>>, what: &str) -> Vec<u8> {
    let n = EXAMINED.fetch_add(1, Ordering::Relaxed);
    let s = Arc::new(MemStorage::from_vec(img));
    let d = open(kind, s.clone(), parent).unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let content = read_all(&*d);
    d.close().unwrap_or_else(|e| panic!("{what}: close: {e}"));
    drop(d);
    let report = match kind {
        Kind::Raw => return content,
        Kind::VhdDynamic | Kind::VhdDiff => vhd::check(s.clone(), Repair::None),
        _ => vhdx::check(s.clone(), Repair::None),
    }
    .unwrap_or_else(|e| panic!("{what}: check: {e}"));
    assert_eq!(
        report.corruptions, 0,
        "{what}: corrupt: {:?}",
        report.findings
    );
    // qemu-img opens no VHDX with 4096-byte logical sectors.
    if kind.is_vhdx() && !kind.is_diff() && kind.sector() == 512 && n.is_multiple_of(QEMU_EVERY) {
        qemu_check(&s.to_vec(), what);
    }
    content
}

/// `qemu-img check` on an image: clean (0) or leaks only (3). Skipped without qemu-img.
fn qemu_check(img: &[u8], what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.vhdx");
    std::fs::write(&p, img).unwrap();
    let out = match std::process::Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(&p)
        .output()
    {
        Ok(o) => o,
        Err(_) if std::env::var("VIRIDIAN_REQUIRE_ALL").as_deref() != Ok("1") => return,
        Err(e) => panic!("qemu-img missing and VIRIDIAN_REQUIRE_ALL=1: {e}"),
    };
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "{what}: qemu-img check exit {code}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Setup {
    kind: Kind,
    parent: Option<Arc<dyn BlockDevice>>,
    initial: Vec<u8>,
    content: Vec<u8>,
}

fn setup(kind: Kind) -> Setup {
    let parent = parent(kind);
    let initial = initial_image(kind, &parent);
    let content = {
        let d = open(
            kind,
            Arc::new(MemStorage::from_vec(initial.clone())),
            &parent,
        )
        .unwrap();
        let c = read_all(&*d);
        drop(d);
        c
    };
    Setup {
        kind,
        parent,
        initial,
        content,
    }
}

/// Storage operations the workload makes without faults (the points to plan faults at).
fn count_ops(st: &Setup, seed: u64) -> u64 {
    let fs = Arc::new(FaultyStorage::new(st.initial.clone(), FaultPlan::default()));
    let d = open(st.kind, fs.clone(), &st.parent).unwrap();
    let mut m = Model::new(&st.content);
    run_steps(&*d, &workload(st.kind, seed), &mut m, false);
    drop(d);
    fs.ops()
}

/// Runs `steps`, updating the model. With `stop_at_error` returns at the first error.
/// Returns whether any call failed.
fn run_steps(d: &dyn BlockDevice, steps: &[Step], m: &mut Model, stop_at_error: bool) -> bool {
    let mut failed = false;
    for s in steps {
        let ok = match s {
            Step::Write(off, data) => {
                let ok = d.write_at(data, *off).is_ok();
                m.write(*off, data, ok);
                ok
            }
            Step::Zero(off, len) => {
                let ok = d
                    .write_zeroes(*off, *len, ZeroFlags { may_unmap: true })
                    .is_ok();
                m.write(*off, &vec![0u8; *len as usize], ok);
                ok
            }
            Step::Flush => {
                let ok = d.flush().is_ok();
                if ok {
                    m.flushed();
                }
                ok
            }
        };
        failed |= !ok;
        if !ok && stop_at_error {
            return true;
        }
    }
    failed
}

/// One fault point. Returns the number of violations found (0 expected), panicking with
/// details unless `count_only`.
fn one_point(st: &Setup, seed: u64, mode: Mode, n: u64, sticky: bool, count_only: bool) -> usize {
    let kind = st.kind;
    let what = format!("{kind:?} {mode:?} fault at op {n} (seed {seed})");
    let mut plan = FaultPlan::default();
    match mode {
        Mode::WriteRetry => plan.fail_write = Some(n),
        Mode::ShortWriteRetry => plan.short_write = Some(n),
        Mode::FlushRetry | Mode::CrashAfterFailedFlush => plan.fail_flush = Some(n),
        Mode::LossyFlush => {
            plan.fail_flush = Some(n);
            plan.lossy_failed_flush = Some(seed ^ n);
        }
    }
    let fs = Arc::new(FaultyStorage::new(st.initial.clone(), plan));
    let store: Arc<dyn Storage> = if sticky {
        Arc::new(StickyFlush::new(fs.clone()))
    } else {
        fs.clone()
    };
    let d = open(kind, store, &st.parent).unwrap();
    let mut m = Model::new(&st.content);
    let steps = workload(kind, seed);
    let crash_now = mode == Mode::CrashAfterFailedFlush;
    run_steps(&*d, &steps, &mut m, crash_now);
    let mut bad = 0;
    if !crash_now {
        // The live disk reads what the model says, the more so after a final flush.
        let ok = d.flush().is_ok();
        if ok {
            m.flushed();
        }
        let live = read_all(&*d);
        bad += m.violations(&live, false).len();
        if ok {
            // Durable now: reopen the durable bytes (no crash image needed).
            let got = examine(kind, fs.durable(), &st.parent, &what);
            let v = m.violations(&got, false);
            if !count_only {
                assert!(
                    v.is_empty(),
                    "{what}: flush returned Ok but units {:?} do not read back",
                    &v[..v.len().min(8)]
                );
            }
            bad += v.len();
        }
    }
    // Crash now: what the platter may hold.
    let mut rng = SplitMix(seed ^ (n << 20));
    let samples = if crash_now { CRASH_SAMPLES } else { 1 };
    for i in 0..samples {
        let img = fs.crash_image(&mut rng);
        let got = examine(kind, img, &st.parent, &format!("{what}, crash image {i}"));
        let v = m.violations(&got, true);
        if !count_only {
            assert!(
                v.is_empty(),
                "{what}, crash image {i}: units {:?} read neither the last flushed nor a later \
                 written value",
                &v[..v.len().min(8)]
            );
        }
        bad += v.len();
    }
    drop(d);
    bad
}

fn stride() -> u64 {
    std::env::var("VIRIDIAN_FAULT_STRIDE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

fn sweep(kind: Kind) {
    let t = Instant::now();
    let st = setup(kind);
    let mut points = 0u64;
    for seed in [11u64] {
        let ops = count_ops(&st, seed);
        for mode in [
            Mode::FlushRetry,
            Mode::WriteRetry,
            Mode::ShortWriteRetry,
            Mode::CrashAfterFailedFlush,
            Mode::LossyFlush,
        ] {
            let mut n = 0;
            while n < ops {
                one_point(&st, seed, mode, n, mode == Mode::LossyFlush, false);
                points += 1;
                n += stride();
            }
        }
        assert!(
            ops > 10,
            "{kind:?}: workload made only {ops} storage operations"
        );
    }
    println!(
        "{kind:?}: {points} fault points, {} images examined so far, {:.1}s",
        EXAMINED.load(Ordering::Relaxed),
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn raw_every_fault_point() {
    sweep(Kind::Raw);
}

#[test]
fn vhd_dynamic_every_fault_point() {
    sweep(Kind::VhdDynamic);
}

#[test]
fn vhd_differencing_every_fault_point() {
    sweep(Kind::VhdDiff);
}

#[test]
fn vhdx_fixed_every_fault_point() {
    sweep(Kind::VhdxFixed(512));
    sweep(Kind::VhdxFixed(4096));
}

#[test]
fn vhdx_dynamic_every_fault_point() {
    sweep(Kind::VhdxDynamic(512));
    sweep(Kind::VhdxDynamic(4096));
}

#[test]
fn vhdx_differencing_every_fault_point() {
    sweep(Kind::VhdxDiff(512));
    sweep(Kind::VhdxDiff(4096));
}

/// The harness can fail: over storage with Linux fsync semantics but without `StickyFlush`,
/// a VHD flush retried after a lossy failure returns Ok although writes were dropped, and the
/// checks above catch it at some point.
#[test]
fn lossy_flush_without_sticky_storage_is_caught() {
    let st = setup(Kind::VhdDynamic);
    let seed = 11;
    let ops = count_ops(&st, seed);
    let caught = (0..ops)
        .filter(|&n| one_point(&st, seed, Mode::LossyFlush, n, false, true) > 0)
        .count();
    assert!(
        caught > 0,
        "no lossy fault point was detected without StickyFlush"
    );
    println!("lossy without StickyFlush: {caught} of {ops} points lose acknowledged data");
}

//! Cross-cutting fault injection: the writers and the higher-level operations (convert into a
//! new VHD/VHDX, commit = `chain::merge` into the parent, compact) run on
//! `disk::fault::FaultyStorage` with one fault planned per run, at every storage operation:
//! a failed write, a failed flush, a short write, or a crash (after which the durable image
//! plus random subsets of the pending writes, possibly torn, are examined).
//!
//! After every fault:
//! * the source is unchanged (byte for byte);
//! * the target either does not open (only before its creation was acknowledged) or opens,
//!   checks without corruption (leaks allowed) and reads, sector by sector, as either its
//!   acknowledged (last flushed) content or the content being written;
//! * nothing acknowledged is lost: a run whose final flush succeeded reads back exactly, in
//!   every crash image.
//!
//! The number of fault points exercised is printed (`cargo test -p chain --test faults --
//! --nocapture`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use disk::check::Repair;
use disk::fault::{FaultPlan, FaultyStorage, SplitMix};
use disk::{BlockDevice, MemStorage, Storage};

const SECTOR: usize = 512;
/// Crash images examined per crash point.
const CRASH_SAMPLES: usize = 3;

static FAULT_POINTS: AtomicU64 = AtomicU64::new(0);
static IMAGES_CHECKED: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fmt {
    Vhd,
    Vhdx,
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    let mut x = seed as u64 | 0x100;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

fn mem(b: Vec<u8>) -> Arc<dyn Storage> {
    Arc::new(MemStorage::from_vec(b))
}

fn open_on(fmt: Fmt, s: Arc<dyn Storage>, read_only: bool) -> disk::Result<Arc<dyn BlockDevice>> {
    Ok(match fmt {
        Fmt::Vhd => Arc::new(vhd::VhdDisk::open(
            s,
            &vhd::OpenOptions {
                read_only,
                size_rule: vhd::SizeRule::Auto,
            },
        )?),
        Fmt::Vhdx => Arc::new(vhdx::VhdxDisk::open(s, &vhdx::OpenOptions { read_only })?),
    })
}

fn create_on(
    fmt: Fmt,
    s: Arc<dyn Storage>,
    size: u64,
    parent: Option<Arc<dyn BlockDevice>>,
) -> disk::Result<Arc<dyn BlockDevice>> {
    Ok(match fmt {
        Fmt::Vhd => {
            let kind = match parent {
                Some(parent) => vhd::CreateKind::Differencing {
                    parent_path: "/nonexistent/parent.vhd".into(),
                    parent,
                },
                None => vhd::CreateKind::Dynamic,
            };
            let mut o = vhd::CreateOptions::new(kind, size);
            o.block_size = 64 << 10;
            Arc::new(vhd::VhdDisk::create_on(s, &o)?)
        }
        Fmt::Vhdx => {
            let kind = match parent {
                Some(parent) => vhdx::CreateKind::Differencing {
                    parent_path: "/nonexistent/parent.vhdx".into(),
                    parent,
                },
                None => vhdx::CreateKind::Dynamic,
            };
            let mut o = vhdx::CreateOptions::new(kind, size);
            o.block_size = 1 << 20;
            Arc::new(vhdx::VhdxDisk::create_on(s, &o)?)
        }
    })
}

fn read_all(d: &dyn BlockDevice) -> disk::Result<Vec<u8>> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0)?;
    Ok(v)
}

/// Opens a crash image the way a user would (a VHDX log is replayed by a read-write open),
/// checks it (no corruption allowed), and returns its contents. Err: it does not open.
fn examine(
    fmt: Fmt,
    img: &[u8],
    _parent: Option<&Arc<dyn BlockDevice>>,
) -> Result<Vec<u8>, String> {
    let (content, corruptions) = examine_lenient(fmt, img)?;
    assert!(
        corruptions.is_empty(),
        "{fmt:?} image after a fault checks corrupt: {corruptions:?}"
    );
    Ok(content)
}

/// Like [`examine`], but returns the corruption findings instead of failing on them.
fn examine_lenient(fmt: Fmt, img: &[u8]) -> Result<(Vec<u8>, Vec<String>), String> {
    IMAGES_CHECKED.fetch_add(1, Ordering::Relaxed);
    let s = Arc::new(MemStorage::from_vec(img.to_vec()));
    let d = open_on(fmt, s.clone(), false).map_err(|e| e.to_string())?;
    d.close().map_err(|e| format!("close after replay: {e}"))?;
    drop(d);
    let replayed = s.to_vec();
    let report = match fmt {
        Fmt::Vhd => vhd::check(mem(replayed.clone()), Repair::None),
        Fmt::Vhdx => vhdx::check(mem(replayed.clone()), Repair::None),
    }
    .map_err(|e| format!("check could not run: {e}"))?;
    let corruptions: Vec<String> = report
        .findings
        .iter()
        .filter(|f| f.kind == "corruption")
        .map(|f| f.message.clone())
        .collect();
    let d = open_on(fmt, mem(replayed), true).map_err(|e| e.to_string())?;
    let content = read_all(&*d).map_err(|e| format!("read: {e}"))?;
    Ok((content, corruptions))
}

/// For each sector, `got` must equal `old` or `new`.
fn sectors_old_or_new(got: &[u8], old: &[u8], new: &[u8], what: &str) {
    assert_eq!(got.len(), new.len(), "{what}: size changed");
    for (i, g) in got.chunks(SECTOR).enumerate() {
        let r = i * SECTOR..(i * SECTOR + g.len());
        assert!(
            g == &old[r.clone()] || g == &new[r.clone()],
            "{what}: sector {i} is neither the old nor the new content"
        );
    }
}

/// Forwards to a store and records, per counted operation (write, set_len, flush, in the order
/// FaultyStorage counts them), the length of writes.
#[derive(Debug)]
struct Tap {
    inner: Arc<FaultyStorage>,
    ops: std::sync::Mutex<Vec<Option<usize>>>,
}

impl Tap {
    fn new(inner: Arc<FaultyStorage>) -> Arc<Tap> {
        Arc::new(Tap {
            inner,
            ops: std::sync::Mutex::new(Vec::new()),
        })
    }
    fn writes(&self) -> Vec<Option<usize>> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn note(&self, w: Option<usize>) {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).push(w);
    }
}

impl Storage for Tap {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.note(Some(buf.len()));
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.note(None);
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.note(None);
        self.inner.set_len(len)
    }
}

/// One plan per operation and fault kind; a short write only where the operation is a write
/// (short writes are kept to their first half, down to a couple of bytes of a BAT entry).
fn plans_for(writes: &[Option<usize>]) -> Vec<(&'static str, FaultPlan)> {
    let mut v = plans(writes.len() as u64);
    v.retain(|(kind, plan)| {
        *kind != "short write"
            || matches!(
                writes.get(plan.short_write.unwrap_or(0) as usize),
                Some(Some(_))
            )
    });
    v
}

fn plans(n: u64) -> Vec<(&'static str, FaultPlan)> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push((
            "fail write",
            FaultPlan {
                fail_write: Some(i),
                ..Default::default()
            },
        ));
        v.push((
            "fail flush",
            FaultPlan {
                fail_flush: Some(i),
                ..Default::default()
            },
        ));
        v.push((
            "short write",
            FaultPlan {
                short_write: Some(i),
                ..Default::default()
            },
        ));
        v.push((
            "crash",
            FaultPlan {
                crash_at: Some(i),
                ..Default::default()
            },
        ));
    }
    v
}

/// After a fault: the durable image and a few crash images, each examined with `judge`.
fn after_fault(fs: &FaultyStorage, seed: u64, judge: &mut dyn FnMut(&[u8], &str)) {
    judge(&fs.durable(), "durable image");
    let mut rng = SplitMix(seed);
    for k in 0..CRASH_SAMPLES {
        judge(&fs.crash_image(&mut rng), &format!("crash image {k}"));
    }
    if !fs.crashed() {
        judge(&fs.volatile(), "volatile image");
    }
}

// ---- convert: a source disk copied into a new image on faulty storage ----

/// What `viridian convert` does with the target: create, copy the data extents (zeros
/// skipped), flush, close.
fn convert_into(
    fmt: Fmt,
    src: &[u8],
    fs: Arc<dyn Storage>,
    created: &mut bool,
) -> disk::Result<()> {
    let t = create_on(fmt, fs, src.len() as u64, None)?;
    *created = true;
    for (i, c) in src.chunks(64 << 10).enumerate() {
        if c.iter().any(|&b| b != 0) {
            t.write_at(c, (i * (64 << 10)) as u64)?;
        }
    }
    t.flush()?;
    t.close()
}

fn source_disk() -> Vec<u8> {
    let mut src = vec![0u8; 4 << 20];
    src[..100 << 10].copy_from_slice(&pattern(100 << 10, 1));
    src[(2 << 20) + 4096..(2 << 20) + 4096 + (64 << 10)].copy_from_slice(&pattern(64 << 10, 2));
    src[(4 << 20) - 512..].copy_from_slice(&pattern(512, 3));
    src
}

fn convert_case(fmt: Fmt) {
    let src = source_disk();
    let src_before = src.clone();
    // A clean run: the operation count, and the result.
    let fs = Arc::new(FaultyStorage::new(Vec::new(), FaultPlan::default()));
    let tap = Tap::new(fs.clone());
    let mut created = false;
    convert_into(fmt, &src, tap.clone(), &mut created).expect("clean convert");
    let writes = tap.writes();
    assert_eq!(writes.len() as u64, fs.ops());
    assert_eq!(
        examine(fmt, &fs.durable(), None).expect("clean target"),
        src
    );

    for (seed, (kind, plan)) in plans_for(&writes).into_iter().enumerate() {
        let fs = Arc::new(FaultyStorage::new(Vec::new(), plan));
        let mut created = false;
        let res = convert_into(fmt, &src, fs.clone(), &mut created);
        if fs.faults_hit() == 0 {
            continue;
        }
        FAULT_POINTS.fetch_add(1, Ordering::Relaxed);
        assert_eq!(src, src_before, "source changed");
        let done = res.is_ok();
        after_fault(&fs, seed as u64, &mut |img, what| {
            if done {
                // Acknowledged (the final flush returned): must open, check clean and read back.
                let got = examine(fmt, img, None).unwrap_or_else(|e| {
                    panic!("{fmt:?} convert, {kind} at {seed}: {what} lost after success: {e}")
                });
                assert_eq!(
                    got, src,
                    "{fmt:?} convert, {kind}: {what} differs after success"
                );
            } else {
                // Never acknowledged: `viridian convert` deletes such a target
                // (RemoveOnFailure), so it need not open or check clean (a dynamic VHD cut
                // before its trailing footer is rewritten reports that as corruption); if it
                // opens, no sector may hold anything but zeros or the source's bytes.
                if let Ok((got, _)) = examine_lenient(fmt, img) {
                    sectors_old_or_new(
                        &got,
                        &vec![0; src.len()],
                        &src,
                        &format!("{fmt:?} convert, {kind}, {what}"),
                    );
                }
            }
        });
        let _ = created;
    }
}

#[test]
fn convert_into_vhd_survives_every_fault() {
    convert_case(Fmt::Vhd);
    report("convert -> vhd");
}

#[test]
fn convert_into_vhdx_survives_every_fault() {
    convert_case(Fmt::Vhdx);
    report("convert -> vhdx");
}

// ---- commit: chain::merge of a child into its parent on faulty storage ----

fn commit_case(fmt: Fmt) {
    // The parent, made and flushed on memory: that is its acknowledged state.
    let size = 2u64 << 20;
    let base_img = {
        let s = Arc::new(MemStorage::new());
        let p = create_on(fmt, s.clone(), size, None).expect("parent");
        p.write_at(&pattern(256 << 10, 4), 0).expect("parent data");
        p.write_at(&pattern(4096, 5), 1 << 20).expect("parent data");
        p.close().expect("close parent");
        drop(p);
        s.to_vec()
    };
    let parent_before = examine(fmt, &base_img, None).expect("parent opens");

    // Writes the child holds (on memory, never faulted), made against the parent.
    let child_writes: Vec<(u64, Vec<u8>)> = vec![
        (4096, pattern(8192, 6)),
        ((1 << 20) + 512, pattern(1024, 7)),
        (size - 65536, pattern(65536, 8)),
    ];
    let run = |fs: Arc<dyn Storage>| -> (disk::Result<u64>, Vec<u8>, Vec<u8>) {
        let parent = match open_on(fmt, fs.clone(), false) {
            Ok(p) => p,
            Err(e) => return (Err(e), Vec::new(), Vec::new()),
        };
        let cs = Arc::new(MemStorage::new());
        let child = {
            // The child is made against a read-only view of the same bytes so that its
            // creation does not touch the faulty store.
            let ro = open_on(fmt, mem(base_img.clone()), true).expect("ro parent");
            let c = create_on(fmt, cs.clone(), 0, Some(ro)).expect("child");
            for (o, d) in &child_writes {
                c.write_at(d, *o).expect("child write");
            }
            c.close().expect("close child");
            drop(c);
            let mut c: Box<dyn BlockDeviceAttach> = match fmt {
                Fmt::Vhd => Box::new(
                    vhd::VhdDisk::open(
                        cs.clone(),
                        &vhd::OpenOptions {
                            read_only: true,
                            size_rule: vhd::SizeRule::Auto,
                        },
                    )
                    .expect("child opens"),
                ),
                Fmt::Vhdx => Box::new(
                    vhdx::VhdxDisk::open(cs.clone(), &vhdx::OpenOptions { read_only: true })
                        .expect("child opens"),
                ),
            };
            c.attach(parent.clone()).expect("attach parent");
            c.into_dev()
        };
        let child_bytes = cs.to_vec();
        let expected = read_all(&*child).expect("merged view");
        let r = chain::merge(&*child, 1, &*parent, &mut |_| Ok(()));
        let r = r.and_then(|n| parent.close().map(|_| n));
        let after = cs.to_vec();
        assert_eq!(
            child_bytes, after,
            "the child (source) changed during commit"
        );
        (r, expected, after)
    };
    let fs = Arc::new(FaultyStorage::new(base_img.clone(), FaultPlan::default()));
    let tap = Tap::new(fs.clone());
    let (r, expected, _) = run(tap.clone());
    r.expect("clean commit");
    let writes = tap.writes();
    assert_eq!(writes.len() as u64, fs.ops());
    assert_eq!(
        examine(fmt, &fs.durable(), None).expect("committed"),
        expected
    );

    for (seed, (kind, plan)) in plans_for(&writes).into_iter().enumerate() {
        let fs = Arc::new(FaultyStorage::new(base_img.clone(), plan));
        let (r, expected, _) = run(fs.clone());
        if fs.faults_hit() == 0 {
            continue;
        }
        FAULT_POINTS.fetch_add(1, Ordering::Relaxed);
        let done = r.is_ok();
        after_fault(&fs, 1000 + seed as u64, &mut |img, what| {
            let got = examine(fmt, img, None).unwrap_or_else(|e| {
                panic!("{fmt:?} commit, {kind} at {seed}: the parent no longer opens ({what}): {e}")
            });
            if done {
                assert_eq!(
                    got, expected,
                    "{fmt:?} commit, {kind}: {what} lost the commit"
                );
            } else {
                sectors_old_or_new(
                    &got,
                    &parent_before,
                    &expected,
                    &format!("{fmt:?} commit, {kind}, {what}"),
                );
            }
        });
    }
}

/// `attach_parent` lives on the concrete types; this lets one code path drive both.
trait BlockDeviceAttach {
    fn attach(&mut self, p: Arc<dyn BlockDevice>) -> disk::Result<()>;
    fn into_dev(self: Box<Self>) -> Arc<dyn BlockDevice>;
}
impl BlockDeviceAttach for vhd::VhdDisk {
    fn attach(&mut self, p: Arc<dyn BlockDevice>) -> disk::Result<()> {
        self.attach_parent(p)
    }
    fn into_dev(self: Box<Self>) -> Arc<dyn BlockDevice> {
        Arc::new(*self)
    }
}
impl BlockDeviceAttach for vhdx::VhdxDisk {
    fn attach(&mut self, p: Arc<dyn BlockDevice>) -> disk::Result<()> {
        self.attach_parent(p)
    }
    fn into_dev(self: Box<Self>) -> Arc<dyn BlockDevice> {
        Arc::new(*self)
    }
}

#[test]
fn commit_into_vhd_parent_survives_every_fault() {
    commit_case(Fmt::Vhd);
    report("commit vhd");
}

#[test]
fn commit_into_vhdx_parent_survives_every_fault() {
    commit_case(Fmt::Vhdx);
    report("commit vhdx");
}

// ---- compact: never changes what the disk reads ----

fn compact_case(fmt: Fmt) {
    let size = 4u64 << 20;
    let img = {
        let s = Arc::new(MemStorage::new());
        let d = create_on(fmt, s.clone(), size, None).expect("image");
        // Allocate blocks, then zero or trim some so compaction has work to do.
        for i in 0..4u64 {
            d.write_at(&pattern(4096, 10 + i as u8), i << 20)
                .expect("write");
        }
        d.write_at(&vec![0u8; 4096], 1 << 20)
            .expect("zero a block's data");
        d.discard(2 << 20, 1 << 20).expect("trim a block");
        d.close().expect("close");
        drop(d);
        s.to_vec()
    };
    let before = examine(fmt, &img, None).expect("image opens");
    let run = |fs: Arc<dyn Storage>| -> disk::Result<()> {
        match fmt {
            Fmt::Vhd => {
                let d = vhd::VhdDisk::open(
                    fs,
                    &vhd::OpenOptions {
                        read_only: false,
                        size_rule: vhd::SizeRule::Auto,
                    },
                )?;
                d.compact()?;
                d.close()
            }
            Fmt::Vhdx => {
                let d = vhdx::VhdxDisk::open(fs, &vhdx::OpenOptions { read_only: false })?;
                d.compact()?;
                d.close()
            }
        }
    };
    let fs = Arc::new(FaultyStorage::new(img.clone(), FaultPlan::default()));
    let tap = Tap::new(fs.clone());
    run(tap.clone()).expect("clean compact");
    let writes = tap.writes();
    assert_eq!(writes.len() as u64, fs.ops());
    assert_eq!(
        examine(fmt, &fs.durable(), None).expect("compacted"),
        before
    );
    for (seed, (kind, plan)) in plans_for(&writes).into_iter().enumerate() {
        let fs = Arc::new(FaultyStorage::new(img.clone(), plan));
        let _ = run(fs.clone());
        if fs.faults_hit() == 0 {
            continue;
        }
        FAULT_POINTS.fetch_add(1, Ordering::Relaxed);
        after_fault(&fs, 2000 + seed as u64, &mut |img, what| {
            let got = examine(fmt, img, None).unwrap_or_else(|e| {
                panic!("{fmt:?} compact, {kind} at {seed}: the image no longer opens ({what}): {e}")
            });
            assert!(
                got == before,
                "{fmt:?} compact, {kind} at {seed}: {what} reads differently"
            );
        });
    }
}

#[test]
fn compact_vhd_survives_every_fault() {
    compact_case(Fmt::Vhd);
    report("compact vhd");
}

#[test]
fn compact_vhdx_survives_every_fault() {
    compact_case(Fmt::Vhdx);
    report("compact vhdx");
}

fn report(what: &str) {
    eprintln!(
        "{what}: {} fault points exercised so far (all tests in this process), {} images examined",
        FAULT_POINTS.load(Ordering::Relaxed),
        IMAGES_CHECKED.load(Ordering::Relaxed)
    );
}

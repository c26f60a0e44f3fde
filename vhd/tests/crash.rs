//! Crash ordering: crash at every storage operation during allocating writes with flushes.
//! Every crash image must open, every write acknowledged by a completed flush must read back,
//! and check() may report leaks but never corruption.

mod common;

use std::sync::Arc;

use disk::check::Repair;
use disk::fault::{FaultPlan, FaultyStorage, SplitMix};
use disk::{BlockDevice, MemStorage, Storage};
use vhd::{CreateKind, CreateOptions, OpenOptions, VhdDisk};

const SIZE: u64 = 1 << 20;
const SECTOR: usize = 512;

enum Op {
    Write(u64, Vec<u8>),
    Flush,
}

fn script() -> Vec<Op> {
    let mut rng = SplitMix(42);
    let mut ops = Vec::new();
    for i in 0..14u64 {
        // Sector-aligned writes, many of them allocating (64 KiB blocks, 16 blocks).
        let off = rng.below(SIZE / 512 - 16) * 512;
        let len = (1 + rng.below(12)) as usize * SECTOR;
        ops.push(Op::Write(off, common::pattern(len, i as u8 + 1)));
        if i % 2 == 1 {
            ops.push(Op::Flush);
        }
    }
    ops
}

/// Per sector: the acknowledged content plus every later (unacknowledged) version.
struct Model {
    allowed: Vec<Vec<Vec<u8>>>,
}

impl Model {
    fn new(initial: &[u8]) -> Self {
        Model {
            allowed: initial.chunks(SECTOR).map(|c| vec![c.to_vec()]).collect(),
        }
    }
    fn write(&mut self, off: u64, data: &[u8]) {
        for (i, c) in data.chunks(SECTOR).enumerate() {
            self.allowed[off as usize / SECTOR + i].push(c.to_vec());
        }
    }
    fn flush(&mut self) {
        for a in &mut self.allowed {
            let last = a.pop().unwrap_or_default();
            *a = vec![last];
        }
    }
    fn verify(&self, got: &[u8], what: &str) {
        for (i, c) in got.chunks(SECTOR).enumerate() {
            assert!(
                self.allowed[i].iter().any(|a| a == c),
                "{what}: sector {i} holds neither its acknowledged content nor a later write"
            );
        }
    }
}

fn run_crash_suite(base: Vec<u8>, parent: Option<Arc<dyn BlockDevice>>) -> u64 {
    let ops = script();
    let opts = OpenOptions::default();
    let initial_view = {
        let mut d = VhdDisk::open(Arc::new(MemStorage::from_vec(base.clone())), &opts).unwrap();
        if let Some(p) = &parent {
            d.attach_parent(p.clone()).unwrap();
        }
        let mut v = vec![0u8; SIZE as usize];
        d.read_at(&mut v, 0).unwrap();
        v
    };
    // Count operations of a clean run.
    let total = {
        let fs = Arc::new(FaultyStorage::new(base.clone(), FaultPlan::default()));
        let mut d = VhdDisk::open(fs.clone(), &opts).unwrap();
        if let Some(p) = &parent {
            d.attach_parent(p.clone()).unwrap();
        }
        for op in &ops {
            match op {
                Op::Write(o, b) => d.write_at(b, *o).unwrap(),
                Op::Flush => d.flush().unwrap(),
            }
        }
        d.flush().unwrap();
        fs.ops()
    };
    assert!(total > 20, "script too small: {total} ops");
    let mut rng = SplitMix(7);
    let mut images = 0;
    for crash_at in 0..=total {
        let fs = Arc::new(FaultyStorage::new(
            base.clone(),
            FaultPlan {
                crash_at: Some(crash_at),
                ..Default::default()
            },
        ));
        let mut d = VhdDisk::open(fs.clone(), &opts).unwrap();
        if let Some(p) = &parent {
            d.attach_parent(p.clone()).unwrap();
        }
        let mut model = Model::new(&initial_view);
        for op in &ops {
            let r = match op {
                Op::Write(o, b) => {
                    model.write(*o, b);
                    d.write_at(b, *o)
                }
                Op::Flush => d.flush().map(|_| model.flush()),
            };
            if r.is_err() {
                break;
            }
        }
        drop(d);
        for _ in 0..4 {
            let img = fs.crash_image(&mut rng);
            let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img));
            let mut d = VhdDisk::open(s.clone(), &opts)
                .unwrap_or_else(|e| panic!("crash at op {crash_at}: image does not open: {e}"));
            if let Some(p) = &parent {
                d.attach_parent(p.clone()).unwrap();
            }
            let mut got = vec![0u8; SIZE as usize];
            d.read_at(&mut got, 0).unwrap();
            model.verify(&got, &format!("crash at op {crash_at}"));
            drop(d);
            let r = vhd::check(s, Repair::None).unwrap();
            assert_eq!(r.corruptions, 0, "crash at op {crash_at}: {r:?}");
            images += 1;
        }
    }
    images
}

fn dynamic_base() -> Vec<u8> {
    let s = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(CreateKind::Dynamic, SIZE);
    o.block_size = 64 << 10;
    drop(VhdDisk::create_on(s.clone(), &o).unwrap());
    s.to_vec()
}

#[test]
fn dynamic_crash_at_every_operation() {
    let n = run_crash_suite(dynamic_base(), None);
    assert!(n > 80);
}

#[test]
fn differencing_crash_at_every_operation() {
    let ps = Arc::new(MemStorage::new());
    let p = VhdDisk::create_on(ps.clone(), &CreateOptions::new(CreateKind::Dynamic, SIZE)).unwrap();
    p.write_at(&common::pattern(SIZE as usize, 77), 0).unwrap();
    p.flush().unwrap();
    let parent: Arc<dyn BlockDevice> = Arc::new(p);
    let s = Arc::new(MemStorage::new());
    let kind = CreateKind::Differencing {
        parent_path: "/x/parent.vhd".into(),
        parent: parent.clone(),
    };
    let mut o = CreateOptions::new(kind, 0);
    o.block_size = 64 << 10;
    drop(VhdDisk::create_on(s.clone(), &o).unwrap());
    let n = run_crash_suite(s.to_vec(), Some(parent));
    assert!(n > 80);
}

#[test]
fn failed_and_short_writes_leave_a_usable_image() {
    let base = dynamic_base();
    for n in 0..40u64 {
        for plan in [
            FaultPlan {
                fail_write: Some(n),
                ..Default::default()
            },
            FaultPlan {
                short_write: Some(n),
                ..Default::default()
            },
            FaultPlan {
                fail_flush: Some(n),
                ..Default::default()
            },
        ] {
            let fs = Arc::new(FaultyStorage::new(base.clone(), plan));
            let d = VhdDisk::open(fs.clone(), &OpenOptions::default()).unwrap();
            for op in script() {
                let _ = match op {
                    Op::Write(o, b) => d.write_at(&b, o),
                    Op::Flush => d.flush(),
                };
            }
            let _ = d.flush();
            drop(d);
            let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(fs.volatile()));
            let d = VhdDisk::open(s.clone(), &OpenOptions::default())
                .unwrap_or_else(|e| panic!("{plan:?}: {e}"));
            let mut got = vec![0u8; SIZE as usize];
            d.read_at(&mut got, 0).unwrap();
            let r = vhd::check(s, Repair::None).unwrap();
            assert_eq!(r.corruptions, 0, "{plan:?}: {r:?}");
        }
    }
}

/// A BAT entry write that tears (short write) and whose repair fails too leaves the entry
/// unknown on disk. The handle must then refuse further writes and flushes; if anything keeps
/// succeeding, a flush that returns Ok must have made every acknowledged write durable in a
/// clean image (a later allocation reusing the block would break both).
#[test]
fn unrepairable_bat_entry_write_is_sticky() {
    let base = dynamic_base();
    let mut sticky = 0;
    for n in 0..60u64 {
        let plan = FaultPlan {
            short_write: Some(n),
            fail_write: Some(n + 1),
            ..Default::default()
        };
        let fs = Arc::new(FaultyStorage::new(base.clone(), plan));
        let d = VhdDisk::open(fs.clone(), &OpenOptions::default()).unwrap();
        // Per sector: what it must read, None once a failed write made it unknown.
        let mut expect: Vec<Option<Vec<u8>>> =
            vec![Some(vec![0u8; SECTOR]); SIZE as usize / SECTOR];
        let mut refused = false;
        for op in script() {
            if let Op::Write(o, b) = op {
                let r = d.write_at(&b, o);
                for (i, c) in b.chunks(SECTOR).enumerate() {
                    expect[o as usize / SECTOR + i] = r.is_ok().then(|| c.to_vec());
                }
                if let Err(e) = r {
                    refused |= e.to_string().contains("earlier failure");
                }
            }
        }
        if refused {
            sticky += 1;
            let e = d.flush().expect_err("refusing writes but flushing");
            assert!(
                e.to_string().contains("earlier failure"),
                "fault at {n}: {e}"
            );
            continue;
        }
        if d.flush().is_err() {
            continue;
        }
        drop(d);
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(fs.durable()));
        let d = VhdDisk::open(s.clone(), &OpenOptions::default())
            .unwrap_or_else(|e| panic!("fault at {n}: {e}"));
        let mut got = vec![0u8; SIZE as usize];
        d.read_at(&mut got, 0).unwrap();
        for (i, c) in got.chunks(SECTOR).enumerate() {
            if let Some(want) = &expect[i] {
                assert!(c == &want[..], "fault at {n}: acknowledged sector {i} lost");
            }
        }
        let r = vhd::check(s, Repair::None).unwrap();
        assert_eq!(r.corruptions, 0, "fault at {n}: {r:?}");
    }
    assert!(sticky > 0, "no double fault hit a BAT entry");
}

/// Compact never changes what the disk reads, so every crash image taken during it must read
/// exactly the pre-compact content and check without corruption.
#[test]
fn compact_crash_at_every_operation() {
    let s = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(CreateKind::Dynamic, SIZE);
    o.block_size = 64 << 10;
    let d = VhdDisk::create_on(s.clone(), &o).unwrap();
    for blk in 0..16u64 {
        d.write_at(
            &common::pattern(4096, blk as u8 + 1),
            blk * (64 << 10) + 512,
        )
        .unwrap();
    }
    for blk in [1u64, 4, 5, 9] {
        d.write_at(&[0u8; 4096], blk * (64 << 10) + 512).unwrap();
    }
    d.flush().unwrap();
    let mut want = vec![0u8; SIZE as usize];
    d.read_at(&mut want, 0).unwrap();
    drop(d);
    let base = s.to_vec();
    let total = {
        let fs = Arc::new(FaultyStorage::new(base.clone(), FaultPlan::default()));
        let d = VhdDisk::open(fs.clone(), &OpenOptions::default()).unwrap();
        let st = d.compact().unwrap();
        assert_eq!(st.blocks_freed, 4);
        assert!(st.blocks_moved >= 3);
        fs.ops()
    };
    let mut rng = SplitMix(99);
    for crash_at in 0..=total {
        let fs = Arc::new(FaultyStorage::new(
            base.clone(),
            FaultPlan {
                crash_at: Some(crash_at),
                ..Default::default()
            },
        ));
        let d = VhdDisk::open(fs.clone(), &OpenOptions::default()).unwrap();
        let _ = d.compact();
        drop(d);
        for _ in 0..4 {
            let img: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(fs.crash_image(&mut rng)));
            let d = VhdDisk::open(img.clone(), &OpenOptions::default())
                .unwrap_or_else(|e| panic!("compact crash at {crash_at}: {e}"));
            let mut got = vec![0u8; SIZE as usize];
            d.read_at(&mut got, 0).unwrap();
            assert!(got == want, "compact crash at {crash_at}: content changed");
            drop(d);
            let r = vhd::check(img, Repair::None).unwrap();
            assert_eq!(r.corruptions, 0, "compact crash at {crash_at}: {r:?}");
        }
    }
}

/// set_parent: every crash image opens; unless the two-sector header write tore (reported as
/// a header checksum warning), the parent id and the locators name the same parent.
#[test]
fn set_parent_crash_at_every_operation() {
    let mk = || -> Arc<dyn BlockDevice> {
        Arc::new(
            VhdDisk::create_on(
                Arc::new(MemStorage::new()),
                &CreateOptions::new(CreateKind::Dynamic, SIZE),
            )
            .unwrap(),
        )
    };
    let (a, b) = (mk(), mk());
    let s = Arc::new(MemStorage::new());
    let kind = CreateKind::Differencing {
        parent_path: "/vm/a.vhd".into(),
        parent: a.clone(),
    };
    let d = VhdDisk::create_on(s.clone(), &CreateOptions::new(kind, 0)).unwrap();
    d.write_at(&[1u8; 4096], 0).unwrap();
    d.flush().unwrap();
    drop(d);
    let base = s.to_vec();
    let total = {
        let fs = Arc::new(FaultyStorage::new(base.clone(), FaultPlan::default()));
        let d = VhdDisk::open(fs.clone(), &OpenOptions::default()).unwrap();
        d.set_parent(std::path::Path::new("/vm/b.vhd"), &*b)
            .unwrap();
        let l = d.parent_link().unwrap();
        assert_eq!(Some(l.expected_id), b.unique_id());
        fs.ops()
    };
    let mut rng = SplitMix(5);
    let (ia, ib) = (a.unique_id().unwrap(), b.unique_id().unwrap());
    let mut seen = [false; 2];
    for crash_at in 0..=total {
        let fs = Arc::new(FaultyStorage::new(
            base.clone(),
            FaultPlan {
                crash_at: Some(crash_at),
                ..Default::default()
            },
        ));
        let d = VhdDisk::open(fs.clone(), &OpenOptions::default()).unwrap();
        let _ = d.set_parent(std::path::Path::new("/vm/b.vhd"), &*b);
        drop(d);
        for _ in 0..6 {
            let img: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(fs.crash_image(&mut rng)));
            let d = VhdDisk::open(img.clone(), &OpenOptions::default())
                .unwrap_or_else(|e| panic!("set_parent crash at {crash_at}: {e}"));
            let torn = d
                .info()
                .warnings
                .iter()
                .any(|w| w.contains("header checksum"));
            let l = d.parent_link().unwrap();
            let first = chain::parent_candidates(None, &l)[0]
                .to_string_lossy()
                .into_owned();
            if !torn {
                if l.expected_id == ia {
                    assert_eq!(first, "a.vhd", "crash at {crash_at}");
                    seen[0] = true;
                } else {
                    assert_eq!(l.expected_id, ib, "crash at {crash_at}");
                    assert_eq!(first, "b.vhd", "crash at {crash_at}");
                    seen[1] = true;
                }
                let r = vhd::check(img, Repair::None).unwrap();
                assert_eq!(r.corruptions, 0, "crash at {crash_at}: {r:?}");
            }
            let mut buf = [0u8; 4096];
            d.read_at(&mut buf, 0).unwrap();
            assert_eq!(buf, [1u8; 4096]);
        }
    }
    assert!(seen[0] && seen[1]);
}

/// Resize (BAT relocation): every crash image opens with the old or the new size and the old
/// data. The only inconsistency a crash may leave is the footer copy at offset 0 lagging the
/// trailer (reported by check, fixed by `check -r all`).
#[test]
fn resize_crash_at_every_operation() {
    let s = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(CreateKind::Dynamic, 256 << 10);
    o.block_size = 4096;
    let d = VhdDisk::create_on(s.clone(), &o).unwrap();
    d.write_at(&common::pattern(256 << 10, 3), 0).unwrap();
    d.flush().unwrap();
    let mut want = vec![0u8; 256 << 10];
    d.read_at(&mut want, 0).unwrap();
    drop(d);
    let base = s.to_vec();
    let new_size = 4 << 20;
    let total = {
        let fs = Arc::new(FaultyStorage::new(base.clone(), FaultPlan::default()));
        let d = VhdDisk::open(fs.clone(), &OpenOptions::default()).unwrap();
        d.resize(new_size).unwrap();
        assert_ne!(d.info().bat_offset, Some(1536));
        fs.ops()
    };
    let mut rng = SplitMix(11);
    for crash_at in 0..=total {
        let fs = Arc::new(FaultyStorage::new(
            base.clone(),
            FaultPlan {
                crash_at: Some(crash_at),
                ..Default::default()
            },
        ));
        let d = VhdDisk::open(fs.clone(), &OpenOptions::default()).unwrap();
        let _ = d.resize(new_size);
        drop(d);
        for _ in 0..4 {
            let img: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(fs.crash_image(&mut rng)));
            let d = VhdDisk::open(img.clone(), &OpenOptions::default())
                .unwrap_or_else(|e| panic!("resize crash at {crash_at}: {e}"));
            assert!(
                d.size() == 256 << 10 || d.size() == new_size,
                "crash at {crash_at}"
            );
            let mut got = vec![0u8; d.size() as usize];
            d.read_at(&mut got, 0).unwrap();
            assert!(
                got[..256 << 10] == want[..],
                "crash at {crash_at}: old data changed"
            );
            assert!(got[256 << 10..].iter().all(|&b| b == 0));
            drop(d);
            let r = vhd::check(img.clone(), Repair::None).unwrap();
            for f in r.findings.iter().filter(|f| f.kind == "corruption") {
                assert!(
                    f.message.contains("footer copy"),
                    "crash at {crash_at}: {r:?}"
                );
            }
            if r.corruptions > 0 {
                let r = vhd::check(img.clone(), Repair::All).unwrap();
                assert_eq!(r.corruptions, r.corruptions_fixed);
                let r = vhd::check(img, Repair::None).unwrap();
                assert_eq!(r.corruptions, 0);
            }
        }
    }
}

//! Regression (reliability work, chain/tests/faults.rs): a failed or short write of a BAT
//! entry during `compact` left a torn entry (e.g. `0xffff008f`) and the image no longer
//! opened. Compact now restores the old entry, as allocation already did, so after a failed or
//! short write at any operation the image opens, reads exactly as before and checks clean.

mod common;

use std::sync::Arc;

use disk::check::Repair;
use disk::fault::{FaultPlan, FaultyStorage};
use disk::{BlockDevice, MemStorage, Storage};
use vhd::{CreateKind, CreateOptions, OpenOptions, VhdDisk};

const SIZE: u64 = 1 << 20;

#[test]
fn failed_and_short_writes_during_compact_leave_the_image_intact() {
    let s = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(CreateKind::Dynamic, SIZE);
    o.block_size = 64 << 10;
    let d = VhdDisk::create_on(s.clone(), &o).unwrap();
    for blk in 0..16u64 {
        d.write_at(&common::pattern(4096, blk as u8 + 1), blk * (64 << 10))
            .unwrap();
    }
    for blk in [1u64, 4, 5, 9] {
        d.write_at(&[0u8; 4096], blk * (64 << 10)).unwrap();
    }
    d.flush().unwrap();
    let mut want = vec![0u8; SIZE as usize];
    d.read_at(&mut want, 0).unwrap();
    drop(d);
    let base = s.to_vec();
    let total = {
        let fs = Arc::new(FaultyStorage::new(base.clone(), FaultPlan::default()));
        let d = VhdDisk::open(fs.clone(), &OpenOptions::default()).unwrap();
        d.compact().unwrap();
        fs.ops()
    };
    let mut hit = 0;
    for n in 0..total {
        for plan in [
            FaultPlan {
                short_write: Some(n),
                ..Default::default()
            },
            FaultPlan {
                fail_write: Some(n),
                ..Default::default()
            },
        ] {
            let fs = Arc::new(FaultyStorage::new(base.clone(), plan));
            let d = VhdDisk::open(fs.clone(), &OpenOptions::default()).unwrap();
            let _ = d.compact();
            drop(d);
            if fs.faults_hit() == 0 {
                continue;
            }
            hit += 1;
            for img in [fs.volatile(), fs.durable()] {
                let st: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(img));
                let d = VhdDisk::open(st.clone(), &OpenOptions::default())
                    .unwrap_or_else(|e| panic!("{plan:?}: no longer opens: {e}"));
                let mut got = vec![0u8; SIZE as usize];
                d.read_at(&mut got, 0).unwrap();
                assert!(got == want, "{plan:?}: content changed");
                drop(d);
                let r = vhd::check(st, Repair::None).unwrap();
                assert_eq!(r.corruptions, 0, "{plan:?}: {r:?}");
            }
        }
    }
    assert!(hit > 10, "only {hit} faults fired");
}

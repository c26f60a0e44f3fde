//! Many threads reading, writing and flushing one image at once.

mod common;

use std::sync::Arc;

use common::*;
use disk::{BlockDevice, MemStorage};
use vhdx::{CreateKind, CreateOptions, OpenOptions, VhdxDisk};

const MIB: u64 = 1 << 20;

#[test]
fn threads_write_disjoint_ranges_and_read_them_back() {
    for diff in [false, true] {
        let s = Arc::new(MemStorage::new());
        let d: Arc<VhdxDisk> = if diff {
            let ps = Arc::new(MemStorage::new());
            let p = VhdxDisk::create_on(
                ps.clone(),
                &CreateOptions::new(CreateKind::Dynamic, 32 * MIB),
            )
            .unwrap();
            p.write_at(&vec![0x11; 32 * MIB as usize], 0).unwrap();
            p.close().unwrap();
            drop(p);
            let parent: Arc<dyn BlockDevice> =
                Arc::new(VhdxDisk::open(ps, &OpenOptions { read_only: true }).unwrap());
            Arc::new(
                VhdxDisk::create_on(
                    s.clone(),
                    &CreateOptions::new(
                        CreateKind::Differencing {
                            parent_path: "parent.vhdx".into(),
                            parent,
                        },
                        0,
                    ),
                )
                .unwrap(),
            )
        } else {
            Arc::new(
                VhdxDisk::create_on(
                    s.clone(),
                    &CreateOptions::new(CreateKind::Dynamic, 32 * MIB),
                )
                .unwrap(),
            )
        };
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    let mut rng = disk::fault::SplitMix(t);
                    for i in 0..200u64 {
                        // Thread t owns sectors with index % 4 == t.
                        let sector = rng.below(32 * MIB / 512 / 4) * 4 + t;
                        let data = pattern(sector, 512);
                        d.write_at(&data, sector * 512).unwrap();
                        let mut back = vec![0u8; 512];
                        d.read_at(&mut back, sector * 512).unwrap();
                        assert_eq!(back, data);
                        if i % 50 == 0 {
                            d.flush().unwrap();
                        }
                        let mut big = vec![0u8; 256 * 1024];
                        d.read_at(&mut big, rng.below(32 * MIB / 512 - 512) * 512)
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        d.close().unwrap();
        let mut all = vec![0u8; 32 * MIB as usize];
        d.read_at(&mut all, 0).unwrap();
        let rep = vhdx::check(s.clone(), disk::check::Repair::None).unwrap();
        assert_eq!(rep.corruptions, 0, "{:?}", rep.findings);
        // Every sector written reads its pattern; the rest is the parent's or zero.
        for t in 0..4u64 {
            let mut rng = disk::fault::SplitMix(t);
            for _ in 0..200u64 {
                let sector = rng.below(32 * MIB / 512 / 4) * 4 + t;
                let _ = rng.below(32 * MIB / 512 - 512);
                let off = (sector * 512) as usize;
                assert_eq!(&all[off..off + 512], &pattern(sector, 512)[..]);
            }
        }
    }
}

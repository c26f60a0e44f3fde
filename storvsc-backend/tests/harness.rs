//! Acceptance: a Linux-like guest brings up VMBus + storvsc, scans, and runs thousands of
//! queued mixed requests checked byte for byte.

mod common;

use std::sync::Arc;

use common::guest::*;
use common::workload::{self, Mix};
use disk::{BlockDevice, RawDisk};

fn disks() -> Vec<Arc<dyn BlockDevice>> {
    vec![
        Arc::new(RawDisk::memory(16 << 20).unwrap()),
        Arc::new(
            RawDisk::memory(8 << 20)
                .unwrap()
                .with_logical_sector_size(4096),
        ),
    ]
}

/// Generic over the backend: any BlockDevice set (VHDX can be dropped in here).
fn mixed_workload(
    disks: Vec<Arc<dyn BlockDevice>>,
    ops: u64,
    qd: usize,
    rings: (usize, usize),
    seed: u64,
) -> workload::RunStats {
    let mut models = workload::models_from(&disks);
    let mut g = Guest::new(server_with(&disks), 96 << 20, seed);
    g.bring_up(rings.0, rings.1);
    let luns = workload::scan(&mut g);
    assert_eq!(luns.len(), disks.len());
    for (l, d) in luns.iter().zip(&disks) {
        assert_eq!(l.block_size, d.logical_sector_size());
        assert_eq!(l.blocks * l.block_size as u64, d.size());
        assert!(l.lbpme && l.lbprz);
    }
    let st = workload::run(&mut g, &luns, &mut models, ops, qd, Mix::mixed());
    assert_eq!(st.reads + st.writes + st.unmaps + st.syncs, ops);
    assert!(st.reads > 0 && st.writes > 0 && st.unmaps > 0 && st.syncs > 0);
    assert!(
        st.max_inflight >= qd.min(32),
        "queue depth reached {}",
        st.max_inflight
    );
    workload::verify_all(&mut g, &luns, &models);
    // And the disks themselves hold the model.
    for (d, m) in disks.iter().zip(&models) {
        let mut v = vec![0u8; d.size() as usize];
        d.read_at(&mut v, 0).unwrap();
        assert!(&v == m);
    }
    assert!(g.failures.is_empty());
    let dev = g.server.device(g.relid).expect("storvsc device");
    let stats = dev.stats();
    assert_eq!(stats.failed, 0);
    assert!(stats.srbs > ops);
    assert_eq!(dev.protocol_version(), 0x0600);
    eprintln!("{st:?} {stats:?}");
    st
}

#[test]
fn linux_like_guest_mixed_io_qd32() {
    let st = mixed_workload(disks(), 4000, 32, (32, 32), 1);
    assert_eq!(st.max_inflight, 32);
}

#[test]
fn small_rings_wrap_and_fill() {
    // 2 data pages out, 1 data page in, up to 64 requests queued: the guest→host ring fills
    // (the guest waits for the host), the host→guest ring fills (pending_send_sz path) and both
    // rings wrap constantly.
    let st = mixed_workload(disks(), 1500, 64, (3, 2), 7);
    assert!(st.ring_full > 0, "{st:?}");
    let st = mixed_workload(disks(), 1500, 64, (6, 2), 8);
    assert!(st.pending_wakeups > 0, "{st:?}");
}

#[test]
fn many_luns_on_one_controller() {
    let disks: Vec<Arc<dyn BlockDevice>> = (0..5)
        .map(|i| {
            let d = RawDisk::memory(2 << 20).unwrap();
            let d = if i % 2 == 1 {
                d.with_logical_sector_size(4096)
            } else {
                d
            };
            Arc::new(d) as Arc<dyn BlockDevice>
        })
        .collect();
    mixed_workload(disks, 1000, 32, (32, 32), 3);
}

#[test]
fn max_transfer_is_reported_consistently() {
    let d: Vec<Arc<dyn BlockDevice>> = vec![Arc::new(RawDisk::memory(8 << 20).unwrap())];
    let mut g = Guest::new(server_with_max(&d, Some(1 << 20)), 32 << 20, 5);
    assert_eq!(g.bring_up(8, 8), 1 << 20);
    let (p, b) = g.scsi(0, &[0x12, 1, 0xB0, 0, 64, 0], 1, 64, None);
    assert_good(&p);
    assert_eq!(u32::from_be_bytes(b[8..12].try_into().unwrap()), 2048);
    // A full 1 MiB transfer, its pages scattered over guest memory.
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i ^ (i >> 9)) as u8).collect();
    let (p, _) = g.scsi(0, &cdb_rw16(0x8A, 100, 2048, true), 0, 1 << 20, Some(&data));
    assert_good(&p);
    let (p, back) = g.scsi(0, &cdb_rw16(0x88, 100, 2048, false), 1, 1 << 20, None);
    assert_good(&p);
    assert!(back == data);
}

/// The same guest workload against VHDX disks (dynamic, 512- and 4096-byte logical sectors),
/// so allocation, trims (UNMAP → write_zeroes) and flushes go through the VHDX log.
#[test]
fn linux_like_guest_mixed_io_on_vhdx() {
    let stores: Vec<Arc<disk::MemStorage>> =
        (0..2).map(|_| Arc::new(disk::MemStorage::new())).collect();
    let make = |store: &Arc<disk::MemStorage>, size: u64, logical: u32| -> Arc<dyn BlockDevice> {
        let mut o = vhdx::CreateOptions::new(vhdx::CreateKind::Dynamic, size);
        o.logical_sector_size = logical;
        Arc::new(vhdx::VhdxDisk::create_on(store.clone(), &o).unwrap())
    };
    let disks = vec![
        make(&stores[0], 16 << 20, 512),
        make(&stores[1], 8 << 20, 4096),
    ];
    let st = mixed_workload(disks.clone(), 3000, 32, (32, 32), 11);
    assert_eq!(st.max_inflight, 32);
    for d in &disks {
        d.close().unwrap();
    }
    drop(disks);
    // What the guest wrote is a consistent VHDX: no corruption after its log is applied.
    for s in stores {
        let r = vhdx::check(s, disk::check::Repair::None).unwrap();
        assert_eq!(r.corruptions, 0, "{r:?}");
    }
}

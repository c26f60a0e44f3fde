//! LUN hot-plug through the whole VMBus path: the host adds and removes LUNs while a
//! Linux-like guest is connected; the guest gets the bus-change notice (unsolicited
//! ENUMERATE_BUS), a removed LUN answers as invalid, and REPORT LUNS shows the new set.

mod common;

use std::sync::Arc;

use common::guest::*;
use disk::{BlockDevice, Disk, RawDisk};
use storvsc_backend::scsi::opcode;
use storvsc_backend::vstor::{direction, op, srb};
use storvsc_backend::{Lun, ScsiCdrom, ScsiController, ScsiDisk};

fn controller(g: &mut Guest) -> &mut ScsiController {
    // The one device (the guest may not have learned its relid yet).
    let relid = g.server.relids()[0];
    g.server
        .device_mut(relid)
        .expect("storvsc device")
        .controller_mut()
}

fn bus_notices(g: &Guest) -> u64 {
    g.server.device(g.relid).unwrap().stats().bus_notices
}

/// Lets the device tell the guest about host changes, then takes the guest's interrupts.
fn host_poll(g: &mut Guest) {
    g.server.poll(&*g.mem);
    g.process_actions();
    g.drain();
}

fn report_luns(g: &mut Guest) -> Vec<u8> {
    let mut rl = [0u8; 12];
    rl[0] = opcode::REPORT_LUNS;
    rl[6..10].copy_from_slice(&1024u32.to_be_bytes());
    let (p, d) = g.scsi(0, &rl, direction::READ, 1024, None);
    assert_good(&p);
    let n = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize / 8;
    (0..n).map(|i| d[8 + 8 * i + 1]).collect()
}

/// ENUMERATE_BUS packets the guest received since the last call.
fn take_enumerate_notices(g: &mut Guest) -> usize {
    let n = g
        .unsolicited
        .iter()
        .filter(|d| {
            assert_eq!(d.trans_id, 0);
            assert_eq!(
                d.packet_len, 80,
                "16-byte descriptor + 64-byte vstor packet"
            );
            d.vstor.operation() == op::ENUMERATE_BUS
        })
        .count();
    assert_eq!(
        n,
        g.unsolicited.len(),
        "only bus notices arrive unsolicited"
    );
    g.unsolicited.clear();
    n
}

fn mem_disk(size: u64, fill: u8) -> Arc<RawDisk> {
    let d = RawDisk::memory(size).unwrap();
    d.write_at(&vec![fill; size as usize], 0).unwrap();
    Arc::new(d)
}

#[test]
fn add_and_remove_luns_while_connected() {
    let lun0: Arc<dyn BlockDevice> = mem_disk(4 << 20, 0x11);
    let mut g = Guest::new(server_with(&[lun0]), 32 << 20, 7);
    // A change before the guest is initialised is not announced: the guest scans anyway.
    controller(&mut g)
        .add_lun(
            3,
            ScsiCdrom::new(Disk::new(mem_disk(1 << 20, 0x33))).unwrap(),
        )
        .unwrap();
    g.bring_up(8, 8);
    host_poll(&mut g);
    assert_eq!(take_enumerate_notices(&mut g), 0);
    assert_eq!(report_luns(&mut g), [0, 3]);

    // Hot add a disk at LUN 1: one notice, and the guest finds it.
    let hot = mem_disk(2 << 20, 0x22);
    controller(&mut g)
        .add_lun(
            1,
            ScsiDisk::new(Disk::new(hot.clone()))
                .unwrap()
                .with_serial("hot"),
        )
        .unwrap();
    host_poll(&mut g);
    assert_eq!(take_enumerate_notices(&mut g), 1);
    assert_eq!(bus_notices(&g), 1);
    host_poll(&mut g);
    assert_eq!(take_enumerate_notices(&mut g), 0, "one notice per change");
    assert_eq!(report_luns(&mut g), [0, 1, 3]);
    let (p, d) = g.scsi(1, &[0x12, 0, 0, 0, 36, 0], direction::READ, 36, None);
    assert_good(&p);
    assert_eq!(d[0], 0x00);
    let (p, d) = g.scsi(
        1,
        &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        direction::READ,
        8,
        None,
    );
    assert_good(&p);
    assert_eq!(
        u32::from_be_bytes(d[0..4].try_into().unwrap()),
        (2 << 20) / 512 - 1
    );
    let (p, _) = g.scsi(
        1,
        &cdb_rw10(opcode::WRITE_10, 0, 1, false),
        direction::WRITE,
        512,
        Some(&[0x5A; 512]),
    );
    assert_good(&p);

    // Hot remove it: the unit comes back to the host to be flushed and closed.
    let unit = controller(&mut g).remove_lun(1).expect("LUN 1");
    match &unit {
        Lun::Disk(d) => d.disk().flush().unwrap(),
        other => panic!("{other:?}"),
    }
    drop(unit);
    let mut b = [0u8; 512];
    hot.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x5A; 512], "the guest's write reached the image");
    assert_eq!(
        Arc::strong_count(&hot),
        1,
        "nothing holds the removed image"
    );
    host_poll(&mut g);
    assert_eq!(take_enumerate_notices(&mut g), 1);
    // The guest's rescan: TEST UNIT READY to the LUN it knew fails as an invalid LUN...
    let (p, _) = g.scsi(1, &[0, 0, 0, 0, 0, 0], direction::NONE, 0, None);
    assert_eq!(p.srb_status(), srb::INVALID_LUN);
    // ...INQUIRY says nothing is there, REQUEST SENSE says why...
    let (p, d) = g.scsi(1, &[0x12, 0, 0, 0, 36, 0], direction::READ, 36, None);
    assert_good(&p);
    assert_eq!(d[0], 0x7F, "peripheral qualifier 3, type 0x1F");
    let (p, d) = g.scsi(1, &[0x03, 0, 0, 0, 18, 0], direction::READ, 18, None);
    assert_good(&p);
    assert_eq!((d[2], d[12]), (0x05, 0x25), "logical unit not supported");
    // ...and REPORT LUNS no longer lists it.
    assert_eq!(report_luns(&mut g), [0, 3]);

    // Remove and re-add in one go still gives a notice; the old LUN 0 data is untouched.
    let old0 = controller(&mut g).remove_lun(0).unwrap();
    controller(&mut g).add_lun(0, old0).unwrap();
    host_poll(&mut g);
    assert_eq!(take_enumerate_notices(&mut g), 1);
    let (p, d) = g.scsi(
        0,
        &cdb_rw10(opcode::READ_10, 0, 1, false),
        direction::READ,
        512,
        None,
    );
    assert_good(&p);
    assert!(d.iter().all(|&x| x == 0x11));
    assert!(g.failures.is_empty(), "{:?}", g.failures);
    assert_eq!(bus_notices(&g), 3);
}

#[test]
fn lun_numbers_checked() {
    let mut c = ScsiController::new();
    let d = || ScsiDisk::new(Disk::new(mem_disk(1 << 20, 0))).unwrap();
    assert!(c.add_lun(64, d()).is_err());
    c.add_lun(63, d()).unwrap();
    assert!(c.add_lun(63, d()).is_err());
    assert!(c.remove_lun(5).is_none());
    assert!(c.take_bus_changed());
    assert!(!c.take_bus_changed());
}

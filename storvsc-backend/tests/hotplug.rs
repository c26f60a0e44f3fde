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

/// What a Linux guest's hv_storvsc + SCSI midlayer does with the bus-change notice, reduced to
/// the commands it sends: one ordered work queue holding host scans and LUN removals; a host
/// scan sends TEST UNIT READY to every device it holds (an INVALID_LUN answer queues that
/// device's removal), then REPORT LUNS, and probes (standard INQUIRY, serial, capacity) only
/// LUN numbers where it holds no device. A removal sends SYNCHRONIZE CACHE, then drops the
/// device. A notice queues a host scan unless one is queued and not started.
struct LinuxScsi {
    /// LUN -> serial (VPD page 0x80) of the device the guest holds there.
    devices: std::collections::BTreeMap<u8, String>,
    work: std::collections::VecDeque<Work>,
    notices: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    HostScan,
    RemoveLun(u8),
}

impl LinuxScsi {
    fn new() -> Self {
        LinuxScsi {
            devices: Default::default(),
            work: Default::default(),
            notices: 0,
        }
    }

    /// The channel callback: completions were taken by `g.scsi`; notices queue a scan.
    fn interrupt(&mut self, g: &mut Guest) {
        host_poll(g);
        for _ in 0..take_enumerate_notices(g) {
            self.notices += 1;
            if !self.work.contains(&Work::HostScan) {
                self.work.push_back(Work::HostScan);
            }
        }
    }

    fn tur(&mut self, g: &mut Guest, lun: u8) {
        let (p, _) = g.scsi(lun, &[0, 0, 0, 0, 0, 0], direction::NONE, 0, None);
        if p.srb_status() == srb::INVALID_LUN {
            self.work.push_back(Work::RemoveLun(lun));
        }
        self.interrupt(g);
    }

    /// Probes `lun`; holds a device there when INQUIRY says one is present.
    fn probe(&mut self, g: &mut Guest, lun: u8) {
        let (p, d) = g.scsi(lun, &[0x12, 0, 0, 0, 36, 0], direction::READ, 36, None);
        assert_good(&p);
        self.interrupt(g);
        if d[0] >> 5 != 0 {
            return; // peripheral qualifier: nothing here
        }
        let (p, d) = g.scsi(lun, &[0x12, 1, 0x80, 0, 64, 0], direction::READ, 64, None);
        assert_good(&p);
        let serial = String::from_utf8(d[4..4 + d[3] as usize].to_vec()).unwrap();
        let (p, _) = g.scsi(
            lun,
            &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            direction::READ,
            8,
            None,
        );
        assert_good(&p);
        self.devices.insert(lun, serial);
        self.interrupt(g);
    }

    /// Runs one queued work item; `between` runs in a host scan after `after` of its TEST UNIT
    /// READY commands (a host change racing the guest's scan; `usize::MAX`: before REPORT
    /// LUNS).
    fn step(&mut self, g: &mut Guest, after: usize, between: &mut dyn FnMut(&mut Guest)) -> bool {
        let Some(w) = self.work.pop_front() else {
            return false;
        };
        match w {
            Work::HostScan => {
                let known: Vec<u8> = self.devices.keys().copied().collect();
                let mut hook = Some(between);
                for (i, lun) in known.into_iter().enumerate() {
                    if i == after {
                        (hook.take().unwrap())(g);
                        self.interrupt(g);
                    }
                    self.tur(g, lun);
                }
                if let Some(h) = hook {
                    h(g);
                }
                self.interrupt(g);
                for lun in report_luns(g) {
                    if !self.devices.contains_key(&lun) {
                        self.probe(g, lun);
                    }
                }
            }
            Work::RemoveLun(lun) => {
                if self.devices.contains_key(&lun) {
                    let sync = [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                    g.scsi(lun, &sync, direction::NONE, 0, None);
                    self.devices.remove(&lun);
                    self.interrupt(g);
                }
            }
        }
        true
    }

    /// Runs work until none is left (bounded: a guest that never settles fails).
    fn settle(&mut self, g: &mut Guest) {
        self.interrupt(g);
        for _ in 0..50 {
            if !self.step(g, 0, &mut |_| {}) {
                return;
            }
        }
        panic!("the guest never settled: {:?}", self.work);
    }

    fn settle_with(&mut self, g: &mut Guest, after: usize, mut between: impl FnMut(&mut Guest)) {
        self.interrupt(g);
        assert!(self.step(g, after, &mut between), "a notice queued a scan");
        self.settle(g);
    }
}

fn serial_disk(serial: &str) -> ScsiDisk {
    ScsiDisk::new(Disk::new(mem_disk(1 << 20, 0)))
        .unwrap()
        .with_serial(serial)
}

/// The serials the host has on the bus, by LUN.
fn host_view(g: &mut Guest) -> Vec<(u8, String)> {
    controller(g)
        .luns()
        .map(|(l, u)| match u {
            Lun::Disk(d) => (l, d.serial().to_string()),
            Lun::Cdrom(_) => (l, "cdrom".into()),
        })
        .collect()
}

fn guest_view(linux: &LinuxScsi) -> Vec<(u8, String)> {
    linux.devices.iter().map(|(l, s)| (*l, s.clone())).collect()
}

/// Hot-plug cycles as the VM test does them, at the protocol level: after every change and
/// the guest's reaction the guest holds exactly the host's LUNs, each with the right image
/// (serial): also after a LUN is removed and re-added at once (the guest must not keep the
/// old device), after two removals back to back, and when the host changes a LUN while the
/// guest's scan runs. Every request gets exactly one completion (the harness checks).
#[test]
fn guest_follows_remove_and_readd_at_one_lun_number() {
    let lun0: Arc<dyn BlockDevice> = mem_disk(1 << 20, 0);
    let mut g = Guest::new(server_with(&[lun0]), 32 << 20, 11);
    g.bring_up(8, 8);
    let relid = g.relid;
    g.server.device_mut(relid).unwrap().set_trace(true);
    let mut linux = LinuxScsi::new();
    linux.work.push_back(Work::HostScan); // the scan at driver load
    linux.settle(&mut g);
    let serial0 = host_view(&mut g)[0].1.clone();
    assert_eq!(guest_view(&linux), [(0, serial0.clone())]);

    let check = |g: &mut Guest, linux: &LinuxScsi, what: &str| {
        assert_eq!(guest_view(linux), host_view(g), "{what}");
        assert!(g.failures.is_empty(), "{:?}", g.failures);
    };

    // 1. One in, one out.
    controller(&mut g).add_lun(2, serial_disk("a")).unwrap();
    linux.settle(&mut g);
    check(&mut g, &linux, "a added");
    controller(&mut g).remove_lun(2).unwrap();
    linux.settle(&mut g);
    check(&mut g, &linux, "a removed");

    // 2. Two in, both out back to back.
    controller(&mut g).add_lun(3, serial_disk("b")).unwrap();
    controller(&mut g).add_lun(4, serial_disk("c")).unwrap();
    linux.settle(&mut g);
    check(&mut g, &linux, "b, c added");
    controller(&mut g).remove_lun(3).unwrap();
    controller(&mut g).remove_lun(4).unwrap();
    linux.settle(&mut g);
    check(&mut g, &linux, "b, c removed");

    // 3. Out and straight back in at the same number, another image: the guest's rescan must
    // see the old device gone (not a GOOD answer from the new image) and then find the new one.
    controller(&mut g).add_lun(4, serial_disk("d")).unwrap();
    linux.settle(&mut g);
    check(&mut g, &linux, "d added");
    controller(&mut g).remove_lun(4).unwrap();
    controller(&mut g).add_lun(4, serial_disk("e")).unwrap();
    linux.settle(&mut g);
    check(&mut g, &linux, "d replaced by e at LUN 4");

    // 4. The same while the guest's scan runs: after its TEST UNIT READY round (LUN 4 still
    // answered GOOD), before its REPORT LUNS.
    controller(&mut g).add_lun(5, serial_disk("f")).unwrap();
    linux.settle_with(&mut g, usize::MAX, |g| {
        controller(g).remove_lun(4).unwrap();
        controller(g).add_lun(4, serial_disk("g")).unwrap();
    });
    check(&mut g, &linux, "e replaced by g during a scan");

    // 4b. As the VM test caught it: the removal's notice starts a scan, and the add's notice
    // comes while that scan runs, after its TEST UNIT READY to LUN 0 and before the one to
    // LUN 4. The add's scan is then queued ahead of the old device's removal, so it must not
    // be the last: the old device's "no such LUN" answers keep asking for scans.
    controller(&mut g).remove_lun(4).unwrap();
    linux.settle_with(&mut g, 1, |g| {
        controller(g).add_lun(4, serial_disk("g2")).unwrap();
    });
    check(
        &mut g,
        &linux,
        "g replaced by g2, the add during the removal's scan",
    );

    // 5. I/O of the guest's old device after the swap (before it has seen the notice) must not
    // reach the new image: it fails as an invalid LUN until the guest probes LUN 4 afresh.
    let fresh = mem_disk(1 << 20, 0x77);
    controller(&mut g).remove_lun(4).unwrap();
    controller(&mut g)
        .add_lun(
            4,
            ScsiDisk::new(Disk::new(fresh.clone()))
                .unwrap()
                .with_serial("h"),
        )
        .unwrap();
    let (p, _) = g.scsi(
        4,
        &cdb_rw10(opcode::WRITE_10, 0, 1, false),
        direction::WRITE,
        512,
        Some(&[0xAB; 512]),
    );
    assert_eq!(p.srb_status(), srb::INVALID_LUN, "old device's write");
    linux.work.push_back(Work::RemoveLun(4)); // what Linux queues on that answer
    let mut b = [0u8; 512];
    fresh.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x77; 512], "the new image is untouched");
    linux.settle(&mut g);
    check(&mut g, &linux, "g replaced by h after old I/O");
    let (p, _) = g.scsi(
        4,
        &cdb_rw10(opcode::WRITE_10, 0, 1, false),
        direction::WRITE,
        512,
        Some(&[0xCD; 512]),
    );
    assert_good(&p);
    fresh.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0xCD; 512], "the new device writes to the new image");

    // 6. A unit the guest never saw leaves no fence: remove and re-add before any scan.
    controller(&mut g).add_lun(6, serial_disk("i")).unwrap();
    controller(&mut g).remove_lun(6).unwrap();
    controller(&mut g).add_lun(6, serial_disk("j")).unwrap();
    assert!(!controller(&mut g).is_fenced(6));
    linux.settle(&mut g);
    check(&mut g, &linux, "j at LUN 6");
    eprintln!("bus notices sent: {}", bus_notices(&g));

    // The trace (VIRIDIAN_STORVSC_TRACE=1 in a VMM) showed every request, completion, notice
    // and fence change: one "in" and one "out" line per request.
    let count = |what: &str| g.log.iter().filter(|l| l.contains(what)).count();
    assert!(count("storvsc in: ") > 50);
    assert_eq!(count("storvsc in: "), count("storvsc out: "));
    assert_eq!(count("storvsc notice: ") as u64, bus_notices(&g));
    assert!(count("fence lifted by INQUIRY") >= 4);
    assert!(count("notice again for the new unit") >= 4);
}

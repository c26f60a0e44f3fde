//! Guest and host on different threads, as in the VMM (vCPU thread writes requests and issues
//! HvSignalEvent; an I/O thread runs the server and raises interrupts). Checks that no wakeup
//! is lost under real concurrency and that every byte read matches the model.

mod common;

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::guest::*;
use disk::{BlockDevice, RawDisk};
use storvsc_backend::vstor::direction;
use storvsc_backend::VstorPacket;
use vmbus::{Action, VmbusServer};

#[test]
fn guest_and_host_threads_qd32() {
    let disk: Arc<dyn BlockDevice> = Arc::new(RawDisk::memory(16 << 20).unwrap());
    let mut model = vec![0u8; 16 << 20];
    let mut g = Guest::new(server_with(std::slice::from_ref(&disk)), 64 << 20, 11);
    g.bring_up(9, 9); // 32 KiB rings: they fill and wrap
    let server = Arc::new(Mutex::new(std::mem::take(&mut g.server)));
    let mem = g.mem.clone();
    let conn = 0x2000 + g.relid;
    let (kick_tx, kick_rx) = mpsc::channel::<bool>();
    let (irq_tx, irq_rx) = mpsc::channel::<()>();

    // The I/O thread: HvSignalEvent arrives as a message (an ioeventfd in the VMM).
    let host = {
        let server = server.clone();
        let mem = mem.clone();
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            while let Ok(true) = kick_rx.recv() {
                let mut s: std::sync::MutexGuard<'_, VmbusServer<storvsc_backend::StorvscDevice>> =
                    server.lock().unwrap();
                s.signal_event(&*mem, conn);
                for a in s.take_actions() {
                    match a {
                        Action::SignalGuest { .. } => {
                            let _ = irq_tx.send(());
                        }
                        Action::ChannelFailed { reason, .. } => failures.push(reason),
                        Action::DeliverMessage { .. } => {}
                    }
                }
            }
            failures
        })
    };

    struct Req {
        read: bool,
        off: usize,
        len: usize,
        sg: Sg,
    }
    let mut inflight: HashMap<u64, Req> = HashMap::new();
    let total = 3000u64;
    let (mut submitted, mut completed) = (0u64, 0u64);
    let out = g.out_ring.take().unwrap();
    let inr = g.in_ring.take().unwrap();
    while completed < total {
        // Submit up to 32, signalling exactly when Linux would.
        while inflight.len() < 32 && submitted < total {
            let blocks = 1 + g.rng.below(128) as usize;
            let len = blocks * 512;
            let mut off = g.rng.below((16 << 20) as u64 / 512 - blocks as u64) as usize * 512;
            while inflight
                .values()
                .any(|r| off < r.off + r.len && r.off < off + len)
            {
                off = g.rng.below((16 << 20) as u64 / 512 - blocks as u64) as usize * 512;
            }
            let read = g.rng.below(2) == 0;
            let first = (g.rng.below(512) * 8) as u32;
            let sg = g.alloc_sg(first, len as u32);
            let data: Vec<u8> = (0..len).map(|i| (i as u64 ^ submitted) as u8).collect();
            if !read {
                g.sg_write(&sg, &data);
            }
            let lba = (off / 512) as u64;
            let cdb = cdb_rw16(if read { 0x88 } else { 0x8A }, lba, blocks as u32, false);
            let dir = if read {
                direction::READ
            } else {
                direction::WRITE
            };
            let p = VstorPacket::scsi_request((0, 0, 0), &cdb, dir, len as u32);
            let tag = g.new_tag();
            let pkt = Guest::packet(9, 1, tag, &Guest::gpa_header(&sg), &p.0);
            match out.write_packet(&g.mem, &pkt) {
                None => {
                    g.free_pages(sg.pfns);
                    break;
                }
                Some(sig) => {
                    if !read {
                        model[off..off + len].copy_from_slice(&data);
                    }
                    submitted += 1;
                    inflight.insert(tag, Req { read, off, len, sg });
                    if sig {
                        kick_tx.send(true).unwrap();
                    }
                }
            }
        }
        // Wait for an interrupt; a lost wakeup shows up as a timeout.
        irq_rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no interrupt with {} requests in flight", inflight.len()));
        // The channel callback (Linux HV_CALL_BATCHED): mask, drain, unmask, re-check.
        loop {
            inr.set(&g.mem, 8, 1);
            let mut wake_host = false;
            while let Some((b, sig)) = inr.read_packet(&g.mem) {
                wake_host |= sig;
                let tag = le64(&b, 8);
                let vs = VstorPacket::from_bytes(&b[16..]).unwrap();
                assert_good(&vs);
                let r = inflight
                    .remove(&tag)
                    .expect("completion for an unknown tag");
                assert_eq!(vs.data_transfer_length() as usize, r.len);
                if r.read {
                    let got = g.sg_read(&r.sg, r.len);
                    assert!(
                        got == model[r.off..r.off + r.len],
                        "read at {} differs",
                        r.off
                    );
                }
                g.free_pages(r.sg.pfns);
                completed += 1;
            }
            inr.set(&g.mem, 8, 0);
            if wake_host {
                kick_tx.send(true).unwrap();
            }
            if inr.get(&g.mem, 0) == inr.get(&g.mem, 4) {
                break;
            }
        }
        // Interrupts that arrived during the drain stay queued: the next wait returns at once
        // and finds an empty ring (a spurious interrupt, harmless, as on real hardware).
    }
    kick_tx.send(false).unwrap();
    let failures = host.join().unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    let mut all = vec![0u8; 16 << 20];
    disk.read_at(&mut all, 0).unwrap();
    assert!(all == model);
}

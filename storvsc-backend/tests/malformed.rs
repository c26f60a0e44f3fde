//! Malformed guest input: the host fails the request or stops the channel with a logged
//! reason, and never panics.

mod common;

use std::sync::Arc;

use common::guest::*;
use disk::fault::SplitMix;
use disk::{BlockDevice, RawDisk};
use storvsc_backend::vstor::{self, direction, op, status, VstorPacket};
use vmbus::protocol::{GpadlHeader, Message, OpenChannel};
use vmbus::{ChannelState, GuestMemory};

fn disk() -> Vec<Arc<dyn BlockDevice>> {
    vec![Arc::new(RawDisk::memory(4 << 20).unwrap())]
}

fn ready_guest(seed: u64) -> Guest {
    let mut g = Guest::new(server_with(&disk()), 16 << 20, seed);
    g.bring_up(8, 8);
    g
}

fn logged(g: &Guest, what: &str) -> bool {
    g.log.iter().any(|l| l.contains(what))
}

#[test]
fn bad_channel_management_messages() {
    let mut g = Guest::new(server_with(&disk()), 16 << 20, 1);
    // Before contact: dropped with a log line.
    assert_eq!(g.post(1, &Message::RequestOffers), 0);
    assert!(g.messages.is_empty());
    assert!(logged(&g, "before INITIATE_CONTACT"));
    // Wrong connection id, wrong SynIC message type, oversized payload.
    assert_eq!(g.post_raw(9, &Message::RequestOffers.encode()), 0x12);
    assert_eq!(
        g.server
            .post_message(&*g.mem, 1, 2, &Message::RequestOffers.encode()),
        5
    );
    assert_eq!(g.post_raw(1, &[0u8; 241]), 5);
    // Truncated, unknown type, tiny.
    let mut trunc = Message::Unload.encode();
    trunc[0] = 14; // INITIATE_CONTACT with 8 bytes
    assert_eq!(g.post_raw(4, &trunc), 0);
    assert_eq!(g.post_raw(1, &[77, 0, 0, 0, 0, 0, 0, 0]), 0);
    assert_eq!(g.post_raw(1, &[1, 2]), 0);
    g.process_actions();
    assert!(g.messages.is_empty());
    assert!(logged(&g, "needs 40 bytes"));
    assert!(logged(&g, "unknown message type 77"));
    // An unsupported version is refused, then a good one accepted.
    g.post(
        4,
        &Message::InitiateContact(vmbus::protocol::InitiateContact {
            version_requested: 0x60000,
            target_vcpu: 0,
            interrupt_page_or_sint: 2,
            monitor_page1: 0,
            monitor_page2: 0,
        }),
    );
    assert!(matches!(
        g.next_message(),
        Message::VersionResponse {
            supported: false,
            ..
        }
    ));
    g.connect();
    // Host-to-guest message types sent by the guest are ignored.
    g.post(1, &Message::AllOffersDelivered);
    assert!(logged(&g, "unexpected message type 4"));
    // GPADL for an unknown relid, with two ranges, with a bad buflen.
    let mut h = GpadlHeader {
        child_relid: 99,
        gpadl: 5,
        range_buflen: 16,
        range_count: 1,
        byte_count: 4096,
        byte_offset: 0,
        pfns: vec![20],
    };
    g.post(1, &Message::GpadlHeader(h.clone()));
    assert!(matches!(g.next_message(), Message::GpadlCreated { status, .. } if status != 0));
    h.child_relid = g.relid;
    h.range_count = 2;
    g.post(1, &Message::GpadlHeader(h.clone()));
    assert!(matches!(g.next_message(), Message::GpadlCreated { status, .. } if status != 0));
    h.range_count = 1;
    h.range_buflen = 9;
    g.post(1, &Message::GpadlHeader(h.clone()));
    assert!(matches!(g.next_message(), Message::GpadlCreated { status, .. } if status != 0));
    // Body for an unknown GPADL.
    g.post(
        1,
        &Message::GpadlBody {
            msg_number: 1,
            gpadl: 1234,
            pfns: vec![1],
        },
    );
    assert!(matches!(g.next_message(), Message::GpadlCreated { status, .. } if status != 0));
    // Duplicate GPADL id.
    let (id, st) = g.create_gpadl(&[30, 31], 8192);
    assert_eq!(st, 0);
    h.gpadl = id;
    h.range_buflen = 16;
    g.post(1, &Message::GpadlHeader(h));
    assert!(matches!(g.next_message(), Message::GpadlCreated { status, .. } if status != 0));
    // Teardown of an unknown GPADL still answers (Linux waits for it).
    g.post(
        1,
        &Message::GpadlTeardown {
            child_relid: g.relid,
            gpadl: 4321,
        },
    );
    assert_eq!(g.next_message(), Message::GpadlTorndown { gpadl: 4321 });
    // Close of a channel that is not open, signal to a bad connection id.
    g.post(1, &Message::CloseChannel { child_relid: 55 });
    assert_eq!(g.server.signal_event(&*g.mem, 0x2000 + 55), 0x12);
    assert_eq!(g.server.signal_event(&*g.mem, 7), 0x12);
    // Everything still works afterwards.
    assert_eq!(g.open(4, 4), 0);
    g.storvsc_init();
}

#[test]
fn bad_open_requests_fail() {
    let mut g = Guest::new(server_with(&disk()), 16 << 20, 2);
    g.connect();
    let relid = g.relid;
    let open = |g: &mut Guest, gpadl: u32, split: u32| {
        g.post(
            1,
            &Message::OpenChannel(Box::new(OpenChannel {
                child_relid: relid,
                open_id: 7,
                ring_gpadl: gpadl,
                target_vp: 0,
                downstream_page_offset: split,
                user_data: [0; 120],
            })),
        );
        match g.next_message() {
            Message::OpenChannelResult { status, .. } => status,
            m => panic!("{m:?}"),
        }
    };
    // Unknown GPADL.
    assert_ne!(open(&mut g, 999, 2), 0);
    // Pages outside guest memory (16 MiB = 4096 pages).
    let (bad, st) = g.create_gpadl(&[20, 21, 5000, 5001], 4 * 4096);
    assert_eq!(st, 0);
    assert_ne!(open(&mut g, bad, 2), 0);
    assert!(logged(&g, "outside guest memory"));
    // Split leaving no data pages.
    let (ok, _) = g.create_gpadl(&[40, 41, 42, 43], 4 * 4096);
    assert_ne!(open(&mut g, ok, 1), 0);
    assert_ne!(open(&mut g, ok, 3), 0);
    assert_ne!(open(&mut g, ok, 100), 0);
    // Ring indices out of range at open.
    g.mem.write_u32(40 * 4096, 8192).unwrap();
    assert_ne!(open(&mut g, ok, 2), 0);
    assert!(logged(&g, "index"));
    g.mem.write_u32(40 * 4096, 0).unwrap();
    assert_eq!(open(&mut g, ok, 2), 0);
    assert_ne!(open(&mut g, ok, 2), 0, "already open");
}

#[test]
fn ring_index_out_of_range_stops_the_channel() {
    let mut g = ready_guest(3);
    let ring = g.out_ring.as_ref().unwrap();
    let size = ring.size;
    ring.set(&g.mem, 0, size + 8);
    g.signal_host();
    assert_eq!(g.failures.len(), 1);
    assert!(g.failures[0].1.contains("write index"), "{:?}", g.failures);
    assert!(logged(&g, "channel stopped"));
    assert!(matches!(
        g.server.channel_state(g.relid),
        Some(ChannelState::Failed(_))
    ));
    // Further signals are ignored (no repeated failure, no panic).
    g.signal_host();
    assert_eq!(g.failures.len(), 1);
    // The guest closes and reopens: the channel works again.
    g.post(
        1,
        &Message::CloseChannel {
            child_relid: g.relid,
        },
    );
    assert_eq!(g.server.channel_state(g.relid), Some(ChannelState::Closed));
    assert_eq!(g.open(4, 4), 0);
    g.storvsc_init();
    let (p, _) = g.scsi(0, &[0, 0, 0, 0, 0, 0], direction::NONE, 0, None);
    assert_good(&p);
}

#[test]
fn bad_read_index_of_the_host_to_guest_ring_stops_the_channel() {
    let mut g = ready_guest(33);
    let ring = g.in_ring.as_ref().unwrap();
    ring.set(&g.mem, 4, 12); // not 8-byte aligned
    let p = VstorPacket::scsi_request((0, 0, 0), &[0, 0, 0, 0, 0, 0], direction::NONE, 0);
    assert!(g.send_vstor(90, &p, None));
    assert_eq!(g.failures.len(), 1);
    assert!(g.failures[0].1.contains("read index"), "{:?}", g.failures);
}

#[test]
fn packet_longer_than_the_ring_data_stops_the_channel() {
    let mut g = ready_guest(4);
    // A descriptor that claims 4000 bytes when only 24 were written.
    let mut pkt = Guest::packet(6, 1, 5, &[], &[0u8; 8]);
    pkt[4..6].copy_from_slice(&500u16.to_le_bytes());
    let ring = g.out_ring.as_ref().unwrap();
    let w = ring.get(&g.mem, 0);
    g.mem.write(ring.pages[1] * 4096 + w as u64, &pkt).unwrap();
    ring.set(&g.mem, 0, w + 32);
    g.signal_host();
    assert_eq!(g.failures.len(), 1);
    assert!(g.failures[0].1.contains("packet length"));
}

#[test]
fn bad_descriptor_offset_stops_the_channel() {
    let mut g = ready_guest(5);
    let mut pkt = Guest::packet(6, 1, 5, &[], &[0u8; 64]);
    pkt[2..4].copy_from_slice(&1u16.to_le_bytes()); // offset8 below the descriptor
    g.write_raw(&pkt).unwrap();
    g.signal_host();
    assert_eq!(g.failures.len(), 1);
    // GPA-direct with more pages than the header area holds.
    let mut g = ready_guest(6);
    let sg = Sg {
        offset: 0,
        len: 8192,
        pfns: vec![100],
    };
    let pkt = Guest::packet(9, 1, 5, &Guest::gpa_header(&sg), &[0u8; 64]);
    g.write_raw(&pkt).unwrap();
    g.signal_host();
    assert_eq!(g.failures.len(), 1);
    assert!(g.failures[0].1.contains("GPA range"));
}

fn read_cdb() -> Vec<u8> {
    cdb_rw10(0x28, 0, 8, false)
}

#[test]
fn gpa_ranges_outside_guest_memory_fail_the_request() {
    let mut g = ready_guest(7);
    let p = VstorPacket::scsi_request((0, 0, 0), &read_cdb(), direction::READ, 4096);
    for pfns in [vec![4096u64], vec![u64::MAX / 4096], vec![u64::MAX]] {
        let sg = Sg {
            offset: 0,
            len: 4096,
            pfns,
        };
        let tag = g.new_tag();
        assert!(g.send_vstor(tag, &p, Some(&sg)));
        let d = g.wait(tag);
        assert_eq!(d.packet_len, 80);
        assert_eq!(d.vstor.srb_status(), vstor::srb::INVALID_REQUEST);
        assert_eq!(d.vstor.status(), status::INVALID_PARAMETER);
        assert_eq!(d.vstor.data_transfer_length(), 0);
    }
    assert!(logged(&g, "outside guest memory"));
    // Ranges shorter than data_transfer_length.
    let sg = g.alloc_sg(0, 512);
    let tag = g.new_tag();
    assert!(g.send_vstor(tag, &p, Some(&sg)));
    assert_eq!(g.wait(tag).vstor.srb_status(), vstor::srb::INVALID_REQUEST);
    assert!(logged(&g, "GPA ranges hold 512"));
    // Data transfer in an in-band packet (no ranges).
    let tag = g.new_tag();
    assert!(g.send_vstor(tag, &p, None));
    assert_eq!(g.wait(tag).vstor.srb_status(), vstor::srb::INVALID_REQUEST);
    // Huge data_transfer_length.
    let big = VstorPacket::scsi_request((0, 0, 0), &read_cdb(), direction::READ, u32::MAX);
    let tag = g.new_tag();
    assert!(g.send_vstor(tag, &big, Some(&sg)));
    assert_eq!(g.wait(tag).vstor.srb_status(), vstor::srb::INVALID_REQUEST);
    // Channel still healthy.
    assert!(g.failures.is_empty());
    let (p, _) = g.scsi(0, &read_cdb(), direction::READ, 4096, None);
    assert_good(&p);
}

#[test]
fn bad_vstor_packets_fail_the_request() {
    let mut g = Guest::new(server_with(&disk()), 16 << 20, 8);
    g.connect();
    assert_eq!(g.open(8, 8), 0);
    // EXECUTE_SRB before the init sequence.
    let p = VstorPacket::scsi_request((0, 0, 0), &[0, 0, 0, 0, 0, 0], direction::NONE, 0);
    assert!(g.send_vstor(77, &p, None));
    let d = g.wait(77);
    assert_eq!(d.vstor.status(), status::INVALID_DEVICE_STATE);
    // END before a version was agreed.
    let r = g.init_step(VstorPacket::new(op::BEGIN_INITIALIZATION, 1));
    assert_eq!(r.status(), 0);
    let r = g.init_step(VstorPacket::new(op::END_INITIALIZATION, 1));
    assert_eq!(r.status(), status::INVALID_DEVICE_STATE);
    // Old protocol versions are refused.
    let mut q = VstorPacket::new(op::QUERY_PROTOCOL_VERSION, 1);
    q.set_u16(12, vstor::version::WIN7);
    assert_eq!(g.init_step(q).status(), status::REVISION_MISMATCH);
    g.storvsc_init();
    // Short vstor packet: completed with INVALID_PARAMETER, still 64 bytes.
    let pkt = Guest::packet(6, 1, 78, &[], &[3, 0, 0, 0, 1, 0, 0, 0]);
    assert!(g.write_raw(&pkt).unwrap());
    g.signal_host();
    let d = g.wait(78);
    assert_eq!(d.packet_len, 80);
    assert_eq!(d.vstor.status(), status::INVALID_PARAMETER);
    assert!(logged(&g, "vstor packet of 8 bytes"));
    // A pre-Win8 sized (52-byte) packet is accepted and its size echoed.
    let p = VstorPacket::scsi_request((0, 0, 0), &[0, 0, 0, 0, 0, 0], direction::NONE, 0);
    let pkt = Guest::packet(6, 1, 82, &[], &p.0[..52]);
    assert!(g.write_raw(&pkt).unwrap());
    g.signal_host();
    let d = g.wait(82);
    assert_eq!(d.packet_len, 16 + 56, "52 bytes padded to 8");
    assert_good(&d.vstor);
    // Unknown operation and unsupported packet type.
    assert!(g.send_vstor(79, &VstorPacket::new(200, 1), None));
    assert_eq!(g.wait(79).vstor.status(), status::INVALID_DEVICE_REQUEST);
    assert!(g.send_vstor(80, &VstorPacket::new(op::CREATE_SUB_CHANNELS, 1), None));
    assert_eq!(g.wait(80).vstor.status(), status::INVALID_DEVICE_REQUEST);
    let pkt = Guest::packet(8, 1, 81, &[0u8; 8], &VstorPacket::new(op::EXECUTE_SRB, 1).0);
    let sig = g.write_raw(&pkt).unwrap();
    assert!(sig);
    g.signal_host();
    assert_eq!(g.wait(81).vstor.status(), status::INVALID_DEVICE_REQUEST);
    // Bad CDB lengths and data direction.
    let mut p = VstorPacket::scsi_request((0, 0, 0), &[0, 0, 0, 0, 0, 0], direction::NONE, 0);
    for (cdb_len, dir) in [(0u8, 2u8), (17, 2), (6, 3)] {
        p.0[20] = cdb_len;
        p.0[22] = dir;
        let tag = g.new_tag();
        assert!(g.send_vstor(tag, &p, None));
        assert_eq!(g.wait(tag).vstor.srb_status(), vstor::srb::INVALID_REQUEST);
    }
    // A CDB length too short for its opcode: CHECK CONDITION, invalid field.
    let mut p = VstorPacket::scsi_request((0, 0, 0), &cdb_rw16(0x88, 0, 1, false), 1, 512);
    p.0[20] = 10;
    let sg = g.alloc_sg(0, 512);
    let tag = g.new_tag();
    assert!(g.send_vstor(tag, &p, Some(&sg)));
    assert_eq!(sense_of(&g.wait(tag).vstor), (5, 0x24));
    // Unknown SCSI opcode, PERSISTENT RESERVE, LBA out of range: sense data.
    let (p, _) = g.scsi(
        0,
        &[0xC1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        direction::NONE,
        0,
        None,
    );
    assert_eq!(sense_of(&p), (5, 0x20));
    let (p, _) = g.scsi(
        0,
        &[0x5E, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        direction::READ,
        24,
        None,
    );
    assert_eq!(sense_of(&p), (5, 0x20));
    let (p, _) = g.scsi(
        0,
        &cdb_rw16(0x88, 8192, 1, false),
        direction::READ,
        512,
        None,
    );
    assert_eq!(sense_of(&p), (5, 0x21));
    // Absent LUN.
    let (p, _) = g.scsi(4, &cdb_rw16(0x88, 0, 1, false), direction::READ, 512, None);
    assert_eq!(p.srb_status(), vstor::srb::INVALID_LUN);
    // Resets complete.
    assert!(g.send_vstor(
        0xFFFF_FFFF_FFFF_FFFC,
        &VstorPacket::new(op::RESET_BUS, 1),
        None
    ));
    assert_eq!(g.wait(0xFFFF_FFFF_FFFF_FFFC).vstor.status(), 0);
    assert!(g.failures.is_empty());
}

#[test]
fn read_only_disk_write_protect_through_the_ring() {
    let ro: Arc<dyn BlockDevice> =
        Arc::new(RawDisk::new(RawDisk::memory(1 << 20).unwrap().storage().clone(), true).unwrap());
    let mut g = Guest::new(server_with(&[ro]), 16 << 20, 9);
    g.bring_up(8, 8);
    let (p, _) = g.scsi(
        0,
        &cdb_rw10(0x2A, 0, 1, false),
        direction::WRITE,
        512,
        Some(&[1; 512]),
    );
    assert_eq!(sense_of(&p), (7, 0x27));
    let (p, d) = g.scsi(0, &[0x1A, 0, 0x3F, 0, 255, 0], direction::READ, 255, None);
    assert_good(&p);
    assert_eq!(d[2] & 0x80, 0x80);
}

#[test]
fn unload_and_reconnect() {
    let mut g = ready_guest(10);
    g.post(1, &Message::Unload);
    assert_eq!(g.next_message(), Message::UnloadResponse);
    assert_eq!(g.server.channel_state(g.relid), Some(ChannelState::Closed));
    // Signals to the old channel are harmless.
    g.server.signal_event(&*g.mem, 0x2000 + g.relid);
    g.bring_up(4, 4);
    let (p, _) = g.scsi(0, &[0, 0, 0, 0, 0, 0], direction::NONE, 0, None);
    assert_good(&p);
    // A second INITIATE_CONTACT resets too (kexec).
    g.bring_up(4, 4);
    // GPADL teardown of the open ring closes the channel first.
    let id = 0xE1E10 + 2; // third GPADL: the one now in use
    g.post(
        1,
        &Message::GpadlTeardown {
            child_relid: g.relid,
            gpadl: id,
        },
    );
    assert_eq!(g.next_message(), Message::GpadlTorndown { gpadl: id });
    assert_eq!(g.server.channel_state(g.relid), Some(ChannelState::Closed));
    assert!(logged(&g, "torn down while channel"));
}

#[test]
fn random_garbage_never_panics() {
    let mut reached = 0;
    for seed in 0..40u64 {
        let mut rng = SplitMix(seed);
        let mut g = ready_guest(100 + seed);
        for _ in 0..60 {
            if g.server.channel_state(g.relid) == Some(ChannelState::Open) {
                reached += 1;
            }
            match rng.below(4) {
                0 => {
                    // Random bytes as a packet body with a plausible descriptor.
                    let n = 16 + rng.below(200) as usize;
                    let mut b: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                    b.resize(n.next_multiple_of(8), 0);
                    let len8 = (b.len() / 8) as u16;
                    b[4..6].copy_from_slice(&len8.to_le_bytes());
                    if rng.below(2) == 0 {
                        b[2..4].copy_from_slice(&2u16.to_le_bytes());
                        b[0] = [6u8, 9, 11, 8][rng.below(4) as usize];
                        b[1] = 0;
                    }
                    let _ = g.write_raw(&b);
                    let _ = g.server.signal_event(&*g.mem, 0x2000 + g.relid);
                }
                1 => {
                    // A random vstor packet (random op and SRB fields).
                    let mut p = VstorPacket::default();
                    for x in p.0.iter_mut() {
                        *x = rng.next_u64() as u8;
                    }
                    p.0[0] = if rng.below(2) == 0 {
                        3
                    } else {
                        rng.below(16) as u8
                    };
                    p.0[1..4].fill(0);
                    p.0[20] = rng.below(18) as u8; // cdb length
                    p.0[28] = [0x28u8, 0x2A, 0x88, 0x8A, 0x12, 0x42, 0x93, 0x1A, 0xA0, 0x9E]
                        [rng.below(10) as usize];
                    p.0[22] = rng.below(4) as u8;
                    p.0[17..20].fill(0);
                    p.set_u32(24, rng.below(70000) as u32);
                    if rng.below(2) == 0 {
                        // Send it with a (possibly bogus) GPA range.
                        let sg = Sg {
                            offset: rng.below(4096) as u32,
                            len: rng.below(70000) as u32,
                            pfns: (0..18).map(|_| rng.below(5000)).collect(),
                        };
                        let pkt = Guest::packet(9, 1, 9, &Guest::gpa_header(&sg), &p.0);
                        let _ = g.write_raw(&pkt);
                        let _ = g.server.signal_event(&*g.mem, 0x2000 + g.relid);
                        continue;
                    }
                    let _ = g.write_raw(&Guest::packet(6, 1, 9, &[], &p.0));
                    let _ = g.server.signal_event(&*g.mem, 0x2000 + g.relid);
                }
                2 => {
                    // A random channel-management message.
                    let n = rng.below(241) as usize;
                    let mut b: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                    if n >= 4 {
                        b[0] = rng.below(25) as u8;
                        b[1..4].fill(0);
                    }
                    let _ = g.server.post_message(&*g.mem, 1, 1, &b);
                }
                _ => {
                    // Scribble on ring control words.
                    let ring = if rng.below(2) == 0 {
                        g.out_ring.as_ref().unwrap()
                    } else {
                        g.in_ring.as_ref().unwrap()
                    };
                    let field = [0u64, 4, 8, 12][rng.below(4) as usize];
                    ring.set(&g.mem, field, rng.next_u64() as u32);
                    let _ = g.server.signal_event(&*g.mem, 0x2000 + g.relid);
                }
            }
            let _ = g.server.take_actions();
            let _ = g.server.take_log();
            g.server.poll(&*g.mem);
            if g.server.channel_state(g.relid) != Some(ChannelState::Open) {
                reopen_same_rings(&mut g);
            }
        }
    }
    assert!(
        reached > 1000,
        "fuzzing reached open channels {reached} times"
    );
}

/// Closes the channel and opens it again on the same GPADL with clean ring indices, so the
/// fuzzing keeps reaching the data path (harmless if the garbage tore the GPADL down).
fn reopen_same_rings(g: &mut Guest) {
    g.post(
        1,
        &Message::CloseChannel {
            child_relid: g.relid,
        },
    );
    for r in [g.out_ring.as_ref().unwrap(), g.in_ring.as_ref().unwrap()] {
        for f in [0u64, 4, 8, 12] {
            r.set(&g.mem, f, 0);
        }
    }
    let split = g.out_ring.as_ref().unwrap().pages.len() as u32;
    g.post(
        1,
        &Message::OpenChannel(Box::new(OpenChannel {
            child_relid: g.relid,
            open_id: 2,
            ring_gpadl: g.ring_gpadl,
            target_vp: 0,
            downstream_page_offset: split,
            user_data: [0; 120],
        })),
    );
    g.messages.clear();
    let _ = g.server.take_actions();
    // Run the init sequence without waiting, so random SRBs reach the SCSI layer.
    let mut q = VstorPacket::new(op::QUERY_PROTOCOL_VERSION, 1);
    q.set_u16(12, vstor::version::WIN8_1);
    for p in [
        VstorPacket::new(op::BEGIN_INITIALIZATION, 1),
        q,
        VstorPacket::new(op::END_INITIALIZATION, 1),
    ] {
        let _ = g.write_raw(&Guest::packet(6, 1, VMBUS_RQST_INIT, &[], &p.0));
    }
    let _ = g.server.signal_event(&*g.mem, 0x2000 + g.relid);
    let _ = g.server.take_actions();
}

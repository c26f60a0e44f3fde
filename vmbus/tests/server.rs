//! The channel server with a small echo device, driven like a VMM would.

use vmbus::protocol::{self, GpadlHeader, InitiateContact, Message, OpenChannel};
use vmbus::ring::packet_type;
use vmbus::{
    Action, ChannelIo, ChannelState, DeviceError, GuestMemory, Guid, IncomingPacket, PacketKind,
    VecMemory, VmbusDevice, VmbusServer,
};

/// Echoes in-band packets as completions; a payload starting with 0xFF is a fatal error.
struct Echo {
    opened: u32,
}

impl VmbusDevice for Echo {
    fn interface_type(&self) -> Guid {
        Guid::parse("11111111-2222-3333-4444-555555555555").unwrap()
    }
    fn interface_instance(&self) -> Guid {
        Guid::parse("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee").unwrap()
    }
    fn open(&mut self) -> Result<(), DeviceError> {
        self.opened += 1;
        Ok(())
    }
    fn close(&mut self) {}
    fn packet(&mut self, io: &mut ChannelIo<'_>, p: &IncomingPacket) -> Result<(), DeviceError> {
        if p.payload.first() == Some(&0xFF) {
            return Err(DeviceError::Protocol("poison".into()));
        }
        assert_eq!(p.kind, PacketKind::InBand);
        io.send_completion(p.trans_id, &p.payload);
        Ok(())
    }
}

fn contact(s: &mut VmbusServer, mem: &VecMemory, version: u32) -> Vec<Action> {
    let m = Message::InitiateContact(InitiateContact {
        version_requested: version,
        target_vcpu: 3,
        interrupt_page_or_sint: 2,
        monitor_page1: 0,
        monitor_page2: 0,
    });
    assert_eq!(s.post_message(mem, 4, 1, &m.encode()), 0);
    s.take_actions()
}

fn msg(a: &Action) -> Message {
    match a {
        Action::DeliverMessage { payload, .. } => Message::parse(payload).unwrap(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn versions_offers_hot_add_and_rescind() {
    let mem = VecMemory::new(1 << 20);
    let mut s = VmbusServer::new();
    let r1 = s.add_device(Box::new(Echo { opened: 0 })).unwrap();
    // Version 4.0: accepted, message connection id 0, SINT 2.
    let a = contact(&mut s, &mem, protocol::version::WIN10);
    assert_eq!(
        a,
        vec![Action::DeliverMessage {
            vp: 3,
            sint: 2,
            message_type: 1,
            payload: Message::VersionResponse {
                supported: true,
                connection_state: 0,
                msg_conn_id: 0
            }
            .encode()
        }]
    );
    assert_eq!(s.version(), Some(0x40000));
    s.post_message(&mem, 1, 1, &Message::RequestOffers.encode());
    let a = s.take_actions();
    assert_eq!(a.len(), 2);
    match msg(&a[0]) {
        Message::OfferChannel(o) => {
            assert_eq!(o.child_relid, r1);
            assert_eq!(o.connection_id, 0x2000 + r1);
            assert!(o.is_dedicated_interrupt && !o.monitor_allocated);
        }
        m => panic!("{m:?}"),
    }
    assert_eq!(msg(&a[1]), Message::AllOffersDelivered);
    // MODIFYCHANNEL: no response before 5.3.
    s.post_message(
        &mem,
        1,
        1,
        &Message::ModifyChannel {
            child_relid: r1,
            target_vp: 1,
        }
        .encode(),
    );
    assert!(s.take_actions().is_empty());
    // Hot add: offered at once.
    let r2 = s.add_device(Box::new(Echo { opened: 0 })).unwrap();
    let a = s.take_actions();
    assert!(matches!(msg(&a[0]), Message::OfferChannel(o) if o.child_relid == r2));
    s.rescind(r2);
    assert_eq!(
        msg(&s.take_actions()[0]),
        Message::RescindChannelOffer { child_relid: r2 }
    );
    // Reconnect at 5.3: messages go to the SINT the guest named; MODIFYCHANNEL answered.
    let a = contact(&mut s, &mem, protocol::version::WIN10_V5_3);
    assert!(matches!(
        msg(&a[0]),
        Message::VersionResponse {
            supported: true,
            msg_conn_id: 1,
            ..
        }
    ));
    s.post_message(
        &mem,
        1,
        1,
        &Message::ModifyChannel {
            child_relid: r1,
            target_vp: 1,
        }
        .encode(),
    );
    assert_eq!(
        msg(&s.take_actions()[0]),
        Message::ModifyChannelResponse {
            child_relid: r1,
            status: 0
        }
    );
    // Unsupported version.
    let a = contact(&mut s, &mem, 0x0003_0001);
    assert!(matches!(
        msg(&a[0]),
        Message::VersionResponse {
            supported: false,
            ..
        }
    ));
    assert_eq!(s.version(), None);
}

/// Guest-side ring write (Linux rule); returns whether to signal.
fn guest_write(mem: &VecMemory, ctl: u64, data: u64, size: u32, pkt: &[u8]) -> bool {
    let w = mem.read_u32(ctl).unwrap();
    let mut all = pkt.to_vec();
    all.extend_from_slice(&((w as u64) << 32).to_le_bytes());
    for (i, b) in all.iter().enumerate() {
        mem.write(data + (w as u64 + i as u64) % size as u64, &[*b])
            .unwrap();
    }
    mem.write_u32(ctl, (w + all.len() as u32) % size).unwrap();
    mem.read_u32(ctl + 8).unwrap() == 0 && mem.read_u32(ctl + 4).unwrap() == w
}

#[test]
fn echo_channel_signalling_and_failure() {
    let mem = VecMemory::new(1 << 20);
    let mut s = VmbusServer::new();
    let relid = s.add_device(Box::new(Echo { opened: 0 })).unwrap();
    contact(&mut s, &mem, protocol::version::WIN10_V5_3);
    s.post_message(&mem, 1, 1, &Message::RequestOffers.encode());
    s.take_actions();
    // 40-page GPADL (header + 1 body): pages 100..140, rings of 20 pages each.
    let pfns: Vec<u64> = (100..140).collect();
    let h = GpadlHeader {
        child_relid: relid,
        gpadl: 9,
        range_buflen: (8 + 8 * 40) as u16,
        range_count: 1,
        byte_count: 40 * 4096,
        byte_offset: 0,
        pfns: pfns[..26].to_vec(),
    };
    s.post_message(&mem, 1, 1, &Message::GpadlHeader(h).encode());
    assert!(s.take_actions().is_empty(), "waits for the body");
    let body = Message::GpadlBody {
        msg_number: 1,
        gpadl: 9,
        pfns: pfns[26..].to_vec(),
    };
    s.post_message(&mem, 1, 1, &body.encode());
    assert_eq!(
        msg(&s.take_actions()[0]),
        Message::GpadlCreated {
            child_relid: relid,
            gpadl: 9,
            status: 0
        }
    );
    let open = Message::OpenChannel(Box::new(OpenChannel {
        child_relid: relid,
        open_id: 5,
        ring_gpadl: 9,
        target_vp: 2,
        downstream_page_offset: 20,
        user_data: [0; 120],
    }));
    s.post_message(&mem, 1, 1, &open.encode());
    assert_eq!(
        msg(&s.take_actions()[0]),
        Message::OpenChannelResult {
            child_relid: relid,
            open_id: 5,
            status: 0
        }
    );
    assert_eq!(s.channel_state(relid), Some(ChannelState::Open));
    let (out_ctl, out_data, size) = (100 * 4096, 101 * 4096, 19 * 4096);
    let (in_ctl, in_data) = (120 * 4096u64, 121 * 4096u64);
    let pkt = vmbus::ring::build_packet(packet_type::DATA_INBAND, 1, 42, &[], &[7u8; 24]);
    assert!(guest_write(&mem, out_ctl, out_data, size, &pkt));
    assert_eq!(s.signal_event(&mem, 0x2000 + relid), 0);
    assert_eq!(
        s.take_actions(),
        vec![Action::SignalGuest {
            vp: 2,
            sint: 2,
            relid
        }]
    );
    // The completion: type 11, echoed id, payload.
    let mut c = [0u8; 40];
    mem.read(in_data, &mut c).unwrap();
    assert_eq!(u16::from_le_bytes([c[0], c[1]]), 11);
    assert_eq!(u64::from_le_bytes(c[8..16].try_into().unwrap()), 42);
    assert_eq!(&c[16..40], &[7u8; 24]);
    assert_eq!(mem.read_u32(in_ctl).unwrap(), 48);
    // The host left the guest→host ring unmasked and consumed.
    assert_eq!(mem.read_u32(out_ctl + 8).unwrap(), 0);
    assert_eq!(
        mem.read_u32(out_ctl + 4).unwrap(),
        mem.read_u32(out_ctl).unwrap()
    );
    // The guest has not read the completion yet: the next one does not signal.
    assert!(guest_write(&mem, out_ctl, out_data, size, &pkt));
    s.signal_event(&mem, 0x2000 + relid);
    assert!(s.take_actions().is_empty());
    // Guest reads everything and masks its interrupts: still no signal.
    let w = mem.read_u32(in_ctl).unwrap();
    mem.write_u32(in_ctl + 4, w).unwrap();
    mem.write_u32(in_ctl + 8, 1).unwrap();
    assert!(guest_write(&mem, out_ctl, out_data, size, &pkt));
    s.signal_event(&mem, 0x2000 + relid);
    assert!(s.take_actions().is_empty());
    // A fatal device error stops the channel with the reason.
    let bad = vmbus::ring::build_packet(packet_type::DATA_INBAND, 1, 43, &[], &[0xFF; 8]);
    assert!(guest_write(&mem, out_ctl, out_data, size, &bad));
    s.signal_event(&mem, 0x2000 + relid);
    let a = s.take_actions();
    assert!(
        matches!(&a[..], [Action::ChannelFailed { relid: r, reason }] if *r == relid && reason.contains("poison"))
    );
    assert!(s.take_log().iter().any(|l| l.contains("poison")));
    // Close, tear down, and the GPADL is gone.
    s.post_message(
        &mem,
        1,
        1,
        &Message::CloseChannel { child_relid: relid }.encode(),
    );
    s.post_message(
        &mem,
        1,
        1,
        &Message::GpadlTeardown {
            child_relid: relid,
            gpadl: 9,
        }
        .encode(),
    );
    assert_eq!(
        msg(&s.take_actions()[0]),
        Message::GpadlTorndown { gpadl: 9 }
    );
    s.post_message(&mem, 1, 1, &open.encode());
    assert!(matches!(
        msg(&s.take_actions()[0]),
        Message::OpenChannelResult { status, .. } if status != 0
    ));
}

#[test]
fn hypercall_entry_points() {
    let mem = VecMemory::new(1 << 20);
    let mut s = VmbusServer::new();
    s.add_device(Box::new(Echo { opened: 0 })).unwrap();
    // hv_input_post_message at 0x3000: conn 4, type 1, INITIATE_CONTACT.
    let m = Message::InitiateContact(InitiateContact {
        version_requested: protocol::version::WIN10_V5_3,
        target_vcpu: 0,
        interrupt_page_or_sint: 2,
        monitor_page1: 0,
        monitor_page2: 0,
    })
    .encode();
    let mut input = vec![0u8; 256];
    input[0..4].copy_from_slice(&4u32.to_le_bytes());
    input[8..12].copy_from_slice(&1u32.to_le_bytes());
    input[12..16].copy_from_slice(&(m.len() as u32).to_le_bytes());
    input[16..16 + m.len()].copy_from_slice(&m);
    mem.write(0x3000, &input).unwrap();
    assert_eq!(s.hv_post_message(&mem, 0x3000), 0);
    assert!(matches!(
        msg(&s.take_actions()[0]),
        Message::VersionResponse {
            supported: true,
            ..
        }
    ));
    assert_eq!(s.hv_post_message(&mem, 0x3004), 4, "alignment");
    assert_eq!(s.hv_post_message(&mem, (1 << 20) - 8), 5, "outside memory");
    input[12..16].copy_from_slice(&241u32.to_le_bytes());
    mem.write(0x3000, &input).unwrap();
    assert_eq!(s.hv_post_message(&mem, 0x3000), 5, "payload size");
    // HvSignalEvent for a channel that is offered but not open: accepted, nothing happens.
    assert_eq!(s.hv_signal_event(&mem, 0x2001), 0);
    assert_eq!(s.hv_signal_event(&mem, 0x2005 | (1 << 32)), 0x12);
    assert!(s.take_actions().is_empty());
}

#[test]
fn server_can_move_between_threads() {
    fn is_send<T: Send>() {}
    is_send::<VmbusServer>();
    is_send::<VecMemory>();
}

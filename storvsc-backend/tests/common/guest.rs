//! A simulated Linux guest for the storvsc back end: it owns guest memory, talks to the
//! VMBus server through HvPostMessage/HvSignalEvent entry points, and behaves like Linux's
//! hv_vmbus + hv_storvsc (GPADLs, ring buffers with Linux's signalling rules, the vstor init
//! sequence, SCSI scan, queued I/O with GPA-direct scatter/gather lists).
//!
//! The guest side of the ring buffer is written here independently of the host's code, from
//! the layout in docs/vmm.md, "VMBus ring buffers".
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use disk::fault::SplitMix;
use disk::BlockDevice;
use storvsc_backend::vstor::{self, direction, op, VstorPacket};
use storvsc_backend::{ScsiController, ScsiDisk, StorvscDevice};
use vmbus::protocol::{self, GpadlHeader, InitiateContact, Message, OpenChannel};
use vmbus::{Action, GuestMemory, Guid, VecMemory, VmbusServer};

pub const PAGE: u64 = 4096;
pub const VMBUS_RQST_INIT: u64 = 0xFFFF_FFFF_FFFF_FFFD;

pub fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
pub fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// One ring as the guest sees it: the pages (control first) and the data size.
pub struct GuestRing {
    pub pages: Vec<u64>,
    pub size: u32,
}

impl GuestRing {
    pub fn ctl(&self) -> u64 {
        self.pages[0] * PAGE
    }
    fn gpa(&self, pos: u32) -> u64 {
        let pos = pos as u64 % self.size as u64;
        self.pages[1 + (pos / PAGE) as usize] * PAGE + pos % PAGE
    }
    pub fn get(&self, mem: &VecMemory, field: u64) -> u32 {
        mem.read_u32(self.ctl() + field).unwrap()
    }
    pub fn set(&self, mem: &VecMemory, field: u64, v: u32) {
        mem.write_u32(self.ctl() + field, v).unwrap()
    }
    fn copy_in(&self, mem: &VecMemory, mut pos: u32, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let within = (pos as u64 % self.size as u64) % PAGE;
            let n = ((PAGE - within) as usize).min(data.len() - done);
            mem.write(self.gpa(pos), &data[done..done + n]).unwrap();
            done += n;
            pos = ((pos as u64 + n as u64) % self.size as u64) as u32;
        }
    }
    fn copy_out(&self, mem: &VecMemory, mut pos: u32, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            let within = (pos as u64 % self.size as u64) % PAGE;
            let n = ((PAGE - within) as usize).min(out.len() - done);
            mem.read(self.gpa(pos), &mut out[done..done + n]).unwrap();
            done += n;
            pos = ((pos as u64 + n as u64) % self.size as u64) as u32;
        }
    }
    fn writable(&self, w: u32, r: u32) -> u32 {
        if w >= r {
            self.size - (w - r)
        } else {
            r - w
        }
    }

    /// Linux hv_ringbuffer_write: returns None when full, else Some(need_to_signal).
    pub fn write_packet(&self, mem: &VecMemory, pkt: &[u8]) -> Option<bool> {
        let w = self.get(mem, 0);
        let r = self.get(mem, 4);
        let total = pkt.len() as u32 + 8;
        if w >= self.size || r >= self.size || self.writable(w, r) <= total {
            return None;
        }
        self.copy_in(mem, w, pkt);
        self.copy_in(
            mem,
            (w + pkt.len() as u32) % self.size,
            &((w as u64) << 32).to_le_bytes(),
        );
        self.set(mem, 0, (w + total) % self.size);
        // hv_need_to_signal
        let masked = self.get(mem, 8) != 0;
        Some(!masked && self.get(mem, 4) == w)
    }

    /// Reads one packet (descriptor + body, trailer skipped). Returns (bytes, signal_host)
    /// where signal_host follows Linux's hv_pkt_iter_close pending_send_sz rule.
    pub fn read_packet(&self, mem: &VecMemory) -> Option<(Vec<u8>, bool)> {
        let w = self.get(mem, 0);
        let r = self.get(mem, 4);
        assert!(
            w < self.size && w & 7 == 0,
            "host wrote bad write index {w}"
        );
        if w == r {
            return None;
        }
        let mut d = [0u8; 16];
        self.copy_out(mem, r, &mut d);
        let len = le16(&d, 4) as u32 * 8;
        let avail = (w + self.size - r) % self.size;
        assert!(
            len >= 16 && len + 8 <= avail,
            "bad host packet len {len} avail {avail}"
        );
        let mut b = vec![0u8; len as usize];
        self.copy_out(mem, r, &mut b);
        let before = self.writable(w, r);
        let nr = (r + len + 8) % self.size;
        self.set(mem, 4, nr);
        let pending = self.get(mem, 12);
        let mut signal = false;
        if pending != 0 && self.get(mem, 64) & 1 != 0 {
            let after = self.writable(self.get(mem, 0), nr);
            signal = before <= pending && after > pending;
        }
        Some((b, signal))
    }
}

/// A completed request.
#[derive(Debug, Clone)]
pub struct Done {
    pub trans_id: u64,
    pub packet_len: usize,
    pub vstor: VstorPacket,
}

/// Data buffer placement of a request: one GPA range over scattered pages.
#[derive(Debug, Clone)]
pub struct Sg {
    pub offset: u32,
    pub len: u32,
    pub pfns: Vec<u64>,
}

pub struct Guest {
    pub mem: Arc<VecMemory>,
    pub server: VmbusServer<storvsc_backend::StorvscDevice>,
    pub rng: SplitMix,
    free: Vec<u64>,
    pub messages: VecDeque<Vec<u8>>,
    pub interrupts: u64,
    pub host_signals_sent: u64,
    /// Times the guest woke the host because it waited for room (pending_send_sz).
    pub pending_wakeups: u64,
    pub failures: Vec<(u32, String)>,
    pub log: Vec<String>,
    pub relid: u32,
    pub out_ring: Option<GuestRing>,
    pub in_ring: Option<GuestRing>,
    pub gpadl_pages: Vec<u64>,
    pub ring_gpadl: u32,
    next_gpadl: u32,
    next_tag: u64,
    pub done: HashMap<u64, Done>,
    pub unsolicited: Vec<Done>,
    pub mem_pages: u64,
    /// Time spent inside the host's signal_event (the host side of the I/O path).
    pub host_time: std::time::Duration,
}

pub fn instance_guid() -> Guid {
    Guid::parse("5a1b2c3d-0001-4e5f-8a9b-0c1d2e3f4a5b").unwrap()
}

/// A server with one storvsc controller whose LUN i is `disks[i]`.
pub fn server_with(disks: &[Arc<dyn BlockDevice>]) -> VmbusServer<storvsc_backend::StorvscDevice> {
    server_with_max(disks, None)
}

/// Same, with a max transfer size other than the default.
pub fn server_with_max(
    disks: &[Arc<dyn BlockDevice>],
    max: Option<u32>,
) -> VmbusServer<storvsc_backend::StorvscDevice> {
    let mut ctl = ScsiController::new();
    for (i, d) in disks.iter().enumerate() {
        ctl.add_lun(
            i as u8,
            ScsiDisk::new(d.clone())
                .unwrap()
                .with_serial(&format!("lun{i}")),
        )
        .unwrap();
    }
    let mut dev = StorvscDevice::new(instance_guid(), ctl);
    if let Some(m) = max {
        dev = dev.with_max_transfer(m);
    }
    let mut server = VmbusServer::with_device_type();
    server.add_device(dev).unwrap();
    server
}

impl Guest {
    pub fn new(
        server: VmbusServer<storvsc_backend::StorvscDevice>,
        mem_bytes: usize,
        seed: u64,
    ) -> Guest {
        let mem = Arc::new(VecMemory::new(mem_bytes));
        let mut rng = SplitMix(seed);
        let pages = mem_bytes as u64 / PAGE;
        // Page 0..16 reserved; the rest handed out in random order so buffers are scattered.
        let mut free: Vec<u64> = (16..pages).collect();
        for i in (1..free.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            free.swap(i, j);
        }
        Guest {
            mem,
            server,
            rng,
            free,
            messages: VecDeque::new(),
            interrupts: 0,
            host_signals_sent: 0,
            pending_wakeups: 0,
            failures: Vec::new(),
            log: Vec::new(),
            relid: 0,
            out_ring: None,
            in_ring: None,
            gpadl_pages: Vec::new(),
            ring_gpadl: 0,
            next_gpadl: 0xE1E10,
            next_tag: 1,
            done: HashMap::new(),
            unsolicited: Vec::new(),
            mem_pages: pages,
            host_time: std::time::Duration::ZERO,
        }
    }

    pub fn alloc_pages(&mut self, n: usize) -> Vec<u64> {
        assert!(self.free.len() >= n, "guest out of pages");
        let at = self.free.len() - n;
        self.free.split_off(at)
    }

    pub fn free_pages(&mut self, pages: Vec<u64>) {
        // Put them back at random positions so later buffers stay scattered.
        for p in pages {
            self.free.push(p);
            let last = self.free.len() - 1;
            let i = self.rng.below(self.free.len() as u64) as usize;
            self.free.swap(i, last);
        }
    }

    /// Carries out the server's actions like a VMM + the guest's interrupt handler.
    pub fn process_actions(&mut self) {
        for a in self.server.take_actions() {
            match a {
                Action::DeliverMessage {
                    vp,
                    sint,
                    message_type,
                    payload,
                } => {
                    assert_eq!((vp, sint, message_type), (0, 2, 1));
                    assert!(payload.len() <= 240);
                    self.messages.push_back(payload);
                }
                Action::SignalGuest { vp, sint, relid } => {
                    assert_eq!((vp, sint, relid), (0, 2, self.relid));
                    self.interrupts += 1;
                }
                Action::ChannelFailed { relid, reason } => self.failures.push((relid, reason)),
            }
        }
        self.log.extend(self.server.take_log());
    }

    pub fn post(&mut self, conn: u32, m: &Message) -> u16 {
        self.post_raw(conn, &m.encode())
    }

    pub fn post_raw(&mut self, conn: u32, payload: &[u8]) -> u16 {
        let st = self.server.post_message(&*self.mem, conn, 1, payload);
        self.process_actions();
        st
    }

    pub fn next_message(&mut self) -> Message {
        let b = self.messages.pop_front().expect("expected a host message");
        Message::parse(&b).expect("host sent a malformed message")
    }

    /// INITIATE_CONTACT (5.3) + REQUESTOFFERS. Returns the SCSI offer.
    pub fn connect(&mut self) -> protocol::OfferChannel {
        let st = self.post(
            4,
            &Message::InitiateContact(InitiateContact {
                version_requested: protocol::version::WIN10_V5_3,
                target_vcpu: 0,
                interrupt_page_or_sint: 2,
                monitor_page1: 0x1000,
                monitor_page2: 0x2000,
            }),
        );
        assert_eq!(st, 0);
        assert_eq!(
            self.next_message(),
            Message::VersionResponse {
                supported: true,
                connection_state: 0,
                msg_conn_id: 1
            }
        );
        assert_eq!(self.post(1, &Message::RequestOffers), 0);
        let mut offer = None;
        loop {
            match self.next_message() {
                Message::OfferChannel(o) => {
                    if o.interface_type == vstor::SCSI_CLASS_ID {
                        offer = Some(*o);
                    }
                }
                Message::AllOffersDelivered => break,
                m => panic!("unexpected {m:?}"),
            }
        }
        let o = offer.expect("no SCSI offer");
        assert!(!o.monitor_allocated && o.is_dedicated_interrupt);
        assert_eq!(o.connection_id, 0x2000 + o.child_relid);
        assert_eq!(o.interface_instance, instance_guid());
        self.relid = o.child_relid;
        o
    }

    /// Sends a GPADL over `pages` the way Linux does (header + bodies); returns its id and the
    /// host's creation status.
    pub fn create_gpadl(&mut self, pages: &[u64], byte_count: u32) -> (u32, u32) {
        let id = self.next_gpadl;
        self.next_gpadl += 1;
        let first = pages.len().min(26);
        self.post(
            1,
            &Message::GpadlHeader(GpadlHeader {
                child_relid: self.relid,
                gpadl: id,
                range_buflen: (8 + 8 * pages.len()) as u16,
                range_count: 1,
                byte_count,
                byte_offset: 0,
                pfns: pages[..first].to_vec(),
            }),
        );
        let mut at = first;
        let mut n = 1;
        while at < pages.len() {
            let k = (pages.len() - at).min(28);
            self.post(
                1,
                &Message::GpadlBody {
                    msg_number: n,
                    gpadl: id,
                    pfns: pages[at..at + k].to_vec(),
                },
            );
            at += k;
            n += 1;
        }
        match self.next_message() {
            Message::GpadlCreated {
                child_relid: _,
                gpadl,
                status,
            } => {
                assert_eq!(gpadl, id);
                (id, status)
            }
            m => panic!("expected GPADL_CREATED, got {m:?}"),
        }
    }

    /// Allocates rings (`send_pages`/`recv_pages` including control pages), builds the GPADL and
    /// opens the channel. Returns the OPENCHANNEL_RESULT status.
    pub fn open(&mut self, send_pages: usize, recv_pages: usize) -> u32 {
        let pages = self.alloc_pages(send_pages + recv_pages);
        for &p in &pages {
            self.mem.write(p * PAGE, &[0u8; PAGE as usize]).unwrap();
        }
        let out = GuestRing {
            pages: pages[..send_pages].to_vec(),
            size: ((send_pages - 1) as u64 * PAGE) as u32,
        };
        let inr = GuestRing {
            pages: pages[send_pages..].to_vec(),
            size: ((recv_pages - 1) as u64 * PAGE) as u32,
        };
        // feat_pending_send_sz on both rings, as Linux sets.
        out.set(&self.mem, 64, 1);
        inr.set(&self.mem, 64, 1);
        let (gpadl, st) = self.create_gpadl(&pages, (pages.len() as u64 * PAGE) as u32);
        assert_eq!(st, 0);
        self.post(
            1,
            &Message::OpenChannel(Box::new(OpenChannel {
                child_relid: self.relid,
                open_id: 1,
                ring_gpadl: gpadl,
                target_vp: 0,
                downstream_page_offset: send_pages as u32,
                user_data: [0; 120],
            })),
        );
        self.out_ring = Some(out);
        self.in_ring = Some(inr);
        self.gpadl_pages = pages;
        self.ring_gpadl = gpadl;
        match self.next_message() {
            Message::OpenChannelResult {
                child_relid,
                open_id,
                status,
            } => {
                assert_eq!((child_relid, open_id), (self.relid, 1));
                status
            }
            m => panic!("expected OPENCHANNEL_RESULT, got {m:?}"),
        }
    }

    pub fn signal_host(&mut self) {
        self.host_signals_sent += 1;
        let t = std::time::Instant::now();
        let st = self.server.signal_event(&*self.mem, 0x2000 + self.relid);
        self.host_time += t.elapsed();
        assert_eq!(st, 0);
        self.process_actions();
    }

    /// Writes a raw packet into the guest→host ring. Returns None when full, else whether the
    /// guest would signal (Linux's rule); does not signal.
    pub fn write_raw(&mut self, pkt: &[u8]) -> Option<bool> {
        let ring = self.out_ring.as_ref().unwrap();
        ring.write_packet(&self.mem, pkt)
    }

    /// Builds a packet (descriptor + header + payload, padded).
    pub fn packet(ty: u16, flags: u16, trans_id: u64, header: &[u8], payload: &[u8]) -> Vec<u8> {
        let off = (16 + header.len()).next_multiple_of(8);
        let len = (off + payload.len()).next_multiple_of(8);
        let mut b = vec![0u8; len];
        b[0..2].copy_from_slice(&ty.to_le_bytes());
        b[2..4].copy_from_slice(&((off / 8) as u16).to_le_bytes());
        b[4..6].copy_from_slice(&((len / 8) as u16).to_le_bytes());
        b[6..8].copy_from_slice(&flags.to_le_bytes());
        b[8..16].copy_from_slice(&trans_id.to_le_bytes());
        b[16..16 + header.len()].copy_from_slice(header);
        b[off..off + payload.len()].copy_from_slice(payload);
        b
    }

    /// The GPA-direct header for one range.
    pub fn gpa_header(sg: &Sg) -> Vec<u8> {
        let mut h = vec![0u8; 16 + 8 * sg.pfns.len()];
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        h[8..12].copy_from_slice(&sg.len.to_le_bytes());
        h[12..16].copy_from_slice(&sg.offset.to_le_bytes());
        for (i, p) in sg.pfns.iter().enumerate() {
            h[16 + 8 * i..24 + 8 * i].copy_from_slice(&p.to_le_bytes());
        }
        h
    }

    /// Sends a vstor packet (in-band, or GPA direct with `sg`); returns false if the ring is
    /// full. Signals the host when Linux would.
    pub fn send_vstor(&mut self, trans_id: u64, p: &VstorPacket, sg: Option<&Sg>) -> bool {
        let pkt = match sg {
            Some(sg) => Self::packet(9, 1, trans_id, &Self::gpa_header(sg), &p.0),
            None => Self::packet(6, 1, trans_id, &[], &p.0),
        };
        match self.write_raw(&pkt) {
            None => false,
            Some(sig) => {
                if sig {
                    self.signal_host();
                }
                true
            }
        }
    }

    /// The guest's channel callback: mask, drain completions, unmask, re-check (Linux
    /// HV_CALL_BATCHED). Signals the host when pending_send_sz says so.
    pub fn drain(&mut self) -> usize {
        let mut n = 0;
        loop {
            let ring = self.in_ring.as_ref().unwrap();
            ring.set(&self.mem, 8, 1);
            let mut to_signal = false;
            while let Some((b, sig)) = ring.read_packet(&self.mem) {
                to_signal |= sig;
                n += 1;
                assert_eq!(le16(&b, 0), 11, "host sent packet type {}", le16(&b, 0));
                assert_eq!(le16(&b, 2), 2, "offset8");
                let tid = le64(&b, 8);
                let body = &b[16..];
                let vstor = VstorPacket::from_bytes(body).expect("completion shorter than 64");
                let d = Done {
                    trans_id: tid,
                    packet_len: b.len(),
                    vstor,
                };
                if tid == 0 {
                    self.unsolicited.push(d);
                } else {
                    assert!(
                        self.done.insert(tid, d).is_none(),
                        "duplicate completion {tid}"
                    );
                }
            }
            let ring = self.in_ring.as_ref().unwrap();
            ring.set(&self.mem, 8, 0);
            let empty = ring.get(&self.mem, 0) == ring.get(&self.mem, 4);
            if to_signal {
                self.pending_wakeups += 1;
                self.signal_host();
            }
            if empty {
                return n;
            }
        }
    }

    /// Handles interrupts until `tid` completes.
    pub fn wait(&mut self, tid: u64) -> Done {
        for _ in 0..1000 {
            if let Some(d) = self.done.remove(&tid) {
                return d;
            }
            let before = self.interrupts;
            self.drain();
            if let Some(d) = self.done.remove(&tid) {
                return d;
            }
            if self.interrupts == before {
                let ring = self.in_ring.as_ref().unwrap();
                assert_eq!(
                    ring.get(&self.mem, 0),
                    ring.get(&self.mem, 4),
                    "completions in the ring but no interrupt (lost wakeup)"
                );
                panic!(
                    "request {tid:#x} never completed; host log: {:?}; failures {:?}",
                    self.log, self.failures
                );
            }
        }
        panic!("request {tid:#x} never completed");
    }

    /// One init-sequence step (trans_id VMBUS_RQST_INIT).
    pub fn init_step(&mut self, p: VstorPacket) -> VstorPacket {
        assert!(self.send_vstor(VMBUS_RQST_INIT, &p, None));
        let d = self.wait(VMBUS_RQST_INIT);
        assert_eq!(d.packet_len, 80, "completion must be 16 + 64 bytes");
        assert_eq!(d.vstor.operation(), op::COMPLETE_IO);
        d.vstor
    }

    /// The storvsc init sequence as Linux 6.x runs it; returns max_transfer_bytes.
    pub fn storvsc_init(&mut self) -> u32 {
        let r = self.init_step(VstorPacket::new(op::BEGIN_INITIALIZATION, 1));
        assert_eq!(r.status(), 0);
        let mut q = VstorPacket::new(op::QUERY_PROTOCOL_VERSION, 1);
        q.set_u16(12, vstor::version::WIN10);
        let r = self.init_step(q);
        assert_eq!(r.status(), vstor::status::REVISION_MISMATCH);
        assert_eq!(r.u16(12), vstor::version::WIN10, "version echoed");
        q.set_u16(12, vstor::version::WIN8_1);
        let r = self.init_step(q);
        assert_eq!(r.status(), 0);
        assert_eq!(r.u16(12), vstor::version::WIN8_1);
        let r = self.init_step(VstorPacket::new(op::QUERY_PROPERTIES, 1));
        assert_eq!(r.status(), 0);
        assert_eq!(r.u32(20) & 1, 0, "no multi-channel");
        let max = r.u32(24);
        assert!(max > 0 && max & 4095 == 0);
        let r = self.init_step(VstorPacket::new(op::END_INITIALIZATION, 1));
        assert_eq!(r.status(), 0);
        max
    }

    /// Full bring-up: contact, offers, GPADL, open, init.
    pub fn bring_up(&mut self, send_pages: usize, recv_pages: usize) -> u32 {
        self.connect();
        assert_eq!(self.open(send_pages, recv_pages), 0);
        self.storvsc_init()
    }

    pub fn new_tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        t
    }

    /// A scattered buffer of `len` bytes starting `offset` bytes into its first page.
    pub fn alloc_sg(&mut self, offset: u32, len: u32) -> Sg {
        let n = (offset as u64 + len as u64).div_ceil(PAGE) as usize;
        Sg {
            offset,
            len,
            pfns: self.alloc_pages(n),
        }
    }

    pub fn sg_write(&self, sg: &Sg, data: &[u8]) {
        let mut pos = 0usize;
        let mut within = sg.offset as u64;
        for &p in &sg.pfns {
            if pos >= data.len() {
                break;
            }
            let n = ((PAGE - within) as usize).min(data.len() - pos);
            self.mem
                .write(p * PAGE + within, &data[pos..pos + n])
                .unwrap();
            pos += n;
            within = 0;
        }
    }

    pub fn sg_read(&self, sg: &Sg, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let mut pos = 0usize;
        let mut within = sg.offset as u64;
        for &p in &sg.pfns {
            if pos >= len {
                break;
            }
            let n = ((PAGE - within) as usize).min(len - pos);
            self.mem
                .read(p * PAGE + within, &mut out[pos..pos + n])
                .unwrap();
            pos += n;
            within = 0;
        }
        out
    }

    /// Runs one SCSI command synchronously. `data` is the data-out buffer for writes; for
    /// reads `len` bytes are returned.
    pub fn scsi(
        &mut self,
        lun: u8,
        cdb: &[u8],
        dir: u8,
        len: u32,
        data: Option<&[u8]>,
    ) -> (VstorPacket, Vec<u8>) {
        self.scsi_at((0, 0, lun), cdb, dir, len, data)
    }

    pub fn scsi_at(
        &mut self,
        addr: (u8, u8, u8),
        cdb: &[u8],
        dir: u8,
        len: u32,
        data: Option<&[u8]>,
    ) -> (VstorPacket, Vec<u8>) {
        let tag = self.new_tag();
        let p = VstorPacket::scsi_request(addr, cdb, dir, len);
        let sg = if len > 0 {
            let off = (self.rng.below(8) * 512) as u32;
            let sg = self.alloc_sg(off, len);
            if let Some(d) = data {
                self.sg_write(&sg, d);
            }
            Some(sg)
        } else {
            None
        };
        assert!(self.send_vstor(tag, &p, sg.as_ref()));
        let d = self.wait(tag);
        assert_eq!(d.packet_len, 80);
        let out = match &sg {
            Some(sg) if dir == direction::READ => self.sg_read(sg, len as usize),
            _ => Vec::new(),
        };
        if let Some(sg) = sg {
            self.free_pages(sg.pfns);
        }
        (d.vstor, out)
    }
}

pub fn cdb_rw16(op: u8, lba: u64, blocks: u32, fua: bool) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = op;
    if fua {
        c[1] = 0x08;
    }
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

pub fn cdb_rw10(op: u8, lba: u32, blocks: u16, fua: bool) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = op;
    if fua {
        c[1] = 0x08;
    }
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// Sense key / ASC of a CHECK CONDITION completion.
pub fn sense_of(p: &VstorPacket) -> (u8, u8) {
    assert_eq!(p.scsi_status(), 2, "expected CHECK CONDITION, got {p:?}");
    assert_eq!(p.srb_status(), 0x84);
    let s = p.sense();
    assert!(s.len() >= 14 && s[0] == 0x70);
    (s[2] & 0x0F, s[12])
}

pub fn assert_good(p: &VstorPacket) {
    assert_eq!(
        (p.srb_status(), p.scsi_status(), p.status()),
        (1, 0, 0),
        "expected GOOD, sense {:x?}",
        p.sense()
    );
}

//! The VMBus channel server: a pure state machine driven by the VMM.
//!
//! Inputs: [`VmbusServer::post_message`] (HvPostMessage), [`VmbusServer::signal_event`]
//! (HvSignalEvent), [`VmbusServer::poll`] (device progress). Outputs: [`Action`]s taken with
//! [`VmbusServer::take_actions`], and log lines taken with [`VmbusServer::take_log`].

use std::collections::{BTreeMap, VecDeque};

use crate::gpadl::{GpaRange, GpadlError, GpadlTable, PageBuffer};
use crate::guid::Guid;
use crate::memory::GuestMemory;
use crate::protocol::{self, version, Message, OfferChannel};
use crate::ring::{
    build_packet, packet_type, IncomingPacket, Ring, RingError, RingReader, RingWriter,
    WriteOutcome,
};

/// Hypervisor status codes returned to HvPostMessage / HvSignalEvent.
pub mod hv_status {
    pub const SUCCESS: u16 = 0;
    pub const INVALID_ALIGNMENT: u16 = 4;
    pub const INVALID_PARAMETER: u16 = 5;
    pub const INVALID_CONNECTION_ID: u16 = 0x12;
    pub const INSUFFICIENT_BUFFERS: u16 = 0x13;
}

/// NTSTATUS used in OPENCHANNEL_RESULT / GPADL_CREATED failures.
const STATUS_UNSUCCESSFUL: u32 = 0xC000_0001;
/// Packets a channel may queue for a full host→guest ring before it stops reading requests.
const MAX_QUEUED_OUT: usize = 4096;
/// Log lines kept until [`VmbusServer::take_log`].
const MAX_LOG: usize = 1024;

/// What the VMM must do on the server's behalf, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Deliver a SynIC message (type `message_type`, ≤ 240 bytes) to slot `sint` of VP `vp`'s
    /// SIMP page and raise the SINT. Keep FIFO order per (vp, sint); when the slot is busy set
    /// msg_pending and retry on EOM (docs/vmm.md, "SynIC messages").
    DeliverMessage {
        vp: u32,
        sint: u8,
        message_type: u32,
        payload: Vec<u8>,
    },
    /// Set bit `relid` in VP `vp`'s SIEFP page for `sint` and raise the SINT (docs/vmm.md, "Event flags").
    SignalGuest { vp: u32, sint: u8, relid: u32 },
    /// The channel stopped because of a guest error; the reason is also logged. It stays
    /// stopped until the guest closes and reopens it.
    ChannelFailed { relid: u32, reason: String },
}

/// A fatal device error: the channel is stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("ring: {0}")]
    Ring(#[from] RingError),
}

/// A device behind a VMBus channel (storvsc, ...).
pub trait VmbusDevice: Send {
    /// The class GUID offered as `if_type`.
    fn interface_type(&self) -> Guid;
    /// The instance GUID offered as `if_instance`.
    fn interface_instance(&self) -> Guid;
    /// The offer's 120 user-defined bytes.
    fn user_defined(&self) -> [u8; 120] {
        [0; 120]
    }
    /// Smallest data area (bytes) accepted for each ring direction.
    fn min_ring_size(&self) -> u32 {
        4096
    }
    /// The guest opened the channel: reset protocol state.
    fn open(&mut self) -> Result<(), DeviceError>;
    /// The guest closed the channel (or it was reset).
    fn close(&mut self);
    /// One packet from the guest. Requests the device cannot serve should be completed with an
    /// error; return `Err` only when the channel cannot go on.
    fn packet(
        &mut self,
        io: &mut ChannelIo<'_>,
        packet: &IncomingPacket,
    ) -> Result<(), DeviceError>;
    /// Called after each batch and from [`VmbusServer::poll`]: complete asynchronous work.
    fn poll(&mut self, io: &mut ChannelIo<'_>) -> Result<(), DeviceError> {
        let _ = io;
        Ok(())
    }
}

/// What a device sees of its channel while handling packets.
pub struct ChannelIo<'a> {
    mem: &'a dyn GuestMemory,
    out: &'a mut VecDeque<Vec<u8>>,
    log: &'a mut Vec<String>,
    relid: u32,
}

impl<'a> ChannelIo<'a> {
    /// Guest memory (for GPA-direct data).
    pub fn memory(&self) -> &'a dyn GuestMemory {
        self.mem
    }

    /// The data buffer of a GPA-direct packet.
    pub fn page_buffer<'b>(&self, ranges: &'b [GpaRange]) -> Result<PageBuffer<'b>, String>
    where
        'a: 'b,
    {
        PageBuffer::new(self.mem, ranges)
    }

    /// Queues a completion packet echoing `trans_id`.
    pub fn send_completion(&mut self, trans_id: u64, payload: &[u8]) {
        self.send_packet(packet_type::COMPLETION, 0, trans_id, payload);
    }

    /// Queues any in-band style packet.
    pub fn send_packet(&mut self, ty: u16, flags: u16, trans_id: u64, payload: &[u8]) {
        self.out
            .push_back(build_packet(ty, flags, trans_id, &[], payload));
    }

    /// Packets waiting for room in the host→guest ring.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// Records a log line (tagged with the relid).
    pub fn log(&mut self, msg: impl AsRef<str>) {
        push_log(
            self.log,
            format!("vmbus relid {}: {}", self.relid, msg.as_ref()),
        );
    }
}

fn push_log(log: &mut Vec<String>, line: String) {
    if log.len() < MAX_LOG {
        log.push(line);
    }
}

#[derive(Debug, Clone, Copy)]
struct Connection {
    version: u32,
    target_vp: u32,
    sint: u8,
}

struct OpenState {
    gpadl: u32,
    reader: RingReader,
    writer: RingWriter,
    out: VecDeque<Vec<u8>>,
    failed: Option<String>,
}

struct Channel<D> {
    device: D,
    offered: bool,
    target_vp: u32,
    open: Option<OpenState>,
}

/// The state of one channel as seen from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelState {
    Closed,
    Open,
    Failed(String),
}

/// The host side of one VMBus connection, over devices of type `D`: any device boxed (the
/// default), or a host's own enum of the devices it offers, which it then reaches through
/// [`VmbusServer::device_mut`] with a `match` instead of a downcast.
pub struct VmbusServer<D = Box<dyn VmbusDevice>> {
    conn: Option<Connection>,
    offers_requested: bool,
    channels: BTreeMap<u32, Channel<D>>,
    gpadls: GpadlTable,
    actions: Vec<Action>,
    log: Vec<String>,
    next_relid: u32,
}

impl<T: VmbusDevice + ?Sized> VmbusDevice for Box<T> {
    fn interface_type(&self) -> Guid {
        (**self).interface_type()
    }
    fn interface_instance(&self) -> Guid {
        (**self).interface_instance()
    }
    fn user_defined(&self) -> [u8; 120] {
        (**self).user_defined()
    }
    fn min_ring_size(&self) -> u32 {
        (**self).min_ring_size()
    }
    fn open(&mut self) -> Result<(), DeviceError> {
        (**self).open()
    }
    fn close(&mut self) {
        (**self).close()
    }
    fn packet(
        &mut self,
        io: &mut ChannelIo<'_>,
        packet: &IncomingPacket,
    ) -> Result<(), DeviceError> {
        (**self).packet(io, packet)
    }
    fn poll(&mut self, io: &mut ChannelIo<'_>) -> Result<(), DeviceError> {
        (**self).poll(io)
    }
}

impl<D: VmbusDevice> Default for VmbusServer<D> {
    fn default() -> Self {
        Self::with_device_type()
    }
}

/// The connection id the guest signals for `relid` (HvSignalEvent).
pub fn channel_connection_id(relid: u32) -> u32 {
    protocol::CHANNEL_CONNECTION_BASE + relid
}

const SUPPORTED_VERSIONS: [u32; 8] = [
    version::WIN10_V5_3,
    version::WIN10_V5_2,
    version::WIN10_V5_1,
    version::WIN10_V5,
    version::WIN10_V4_1,
    version::WIN10,
    version::WIN8_1,
    version::WIN8,
];

impl VmbusServer {
    /// A server over boxed devices of any kind.
    pub fn new() -> Self {
        Self::with_device_type()
    }
}

impl<D: VmbusDevice> VmbusServer<D> {
    /// A server over devices of type `D`.
    pub fn with_device_type() -> Self {
        VmbusServer {
            conn: None,
            offers_requested: false,
            channels: BTreeMap::new(),
            gpadls: GpadlTable::new(),
            actions: Vec::new(),
            log: Vec::new(),
            next_relid: 1,
        }
    }

    /// Adds a device and returns its relid. If the guest already asked for offers, the offer
    /// is sent at once (hot add).
    pub fn add_device(&mut self, device: D) -> Option<u32> {
        if self.next_relid >= protocol::MAX_CHANNEL_RELIDS {
            return None;
        }
        let relid = self.next_relid;
        self.next_relid += 1;
        self.channels.insert(
            relid,
            Channel {
                device,
                offered: false,
                target_vp: 0,
                open: None,
            },
        );
        if self.offers_requested {
            self.send_offer(relid);
        }
        Some(relid)
    }

    /// Withdraws a device (RESCIND_CHANNELOFFER); the guest answers with RELID_RELEASED.
    pub fn rescind(&mut self, relid: u32) {
        if let Some(mut ch) = self.channels.remove(&relid) {
            if ch.open.take().is_some() {
                ch.device.close();
            }
            self.gpadls.remove_channel(relid);
            if ch.offered {
                self.send(Message::RescindChannelOffer { child_relid: relid });
            }
        }
    }

    /// The device behind `relid`.
    pub fn device(&self, relid: u32) -> Option<&D> {
        self.channels.get(&relid).map(|c| &c.device)
    }

    /// The device behind `relid`, mutable (host-side changes such as hot-plug; call
    /// [`VmbusServer::poll`] afterwards so the device can tell the guest).
    pub fn device_mut(&mut self, relid: u32) -> Option<&mut D> {
        self.channels.get_mut(&relid).map(|c| &mut c.device)
    }

    /// The relids of every device, in order.
    pub fn relids(&self) -> Vec<u32> {
        self.channels.keys().copied().collect()
    }

    /// The negotiated VMBus version, once connected.
    pub fn version(&self) -> Option<u32> {
        self.conn.map(|c| c.version)
    }

    pub fn channel_state(&self, relid: u32) -> Option<ChannelState> {
        let ch = self.channels.get(&relid)?;
        Some(match &ch.open {
            None => ChannelState::Closed,
            Some(o) => match &o.failed {
                Some(r) => ChannelState::Failed(r.clone()),
                None => ChannelState::Open,
            },
        })
    }

    /// Takes the actions produced so far, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Takes the log lines produced so far (guest errors and protocol events).
    pub fn take_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }

    fn logf(&mut self, line: String) {
        push_log(&mut self.log, line);
    }

    fn send(&mut self, m: Message) {
        let (vp, sint) = match self.conn {
            Some(c) => (c.target_vp, c.sint),
            None => (0, protocol::VMBUS_MESSAGE_SINT),
        };
        self.actions.push(Action::DeliverMessage {
            vp,
            sint,
            message_type: protocol::HV_MESSAGE_TYPE_VMBUS,
            payload: m.encode(),
        });
    }

    fn send_offer(&mut self, relid: u32) {
        let Some(ch) = self.channels.get_mut(&relid) else {
            return;
        };
        ch.offered = true;
        let offer = OfferChannel {
            interface_type: ch.device.interface_type(),
            interface_instance: ch.device.interface_instance(),
            chn_flags: 0,
            mmio_megabytes: 0,
            user_defined: ch.device.user_defined(),
            sub_channel_index: 0,
            child_relid: relid,
            monitor_id: 0,
            monitor_allocated: false,
            is_dedicated_interrupt: true,
            connection_id: channel_connection_id(relid),
        };
        self.send(Message::OfferChannel(Box::new(offer)));
    }

    /// Closes every channel and forgets GPADLs (UNLOAD, new INITIATE_CONTACT).
    fn reset(&mut self) {
        for ch in self.channels.values_mut() {
            if ch.open.take().is_some() {
                ch.device.close();
            }
            ch.offered = false;
        }
        self.gpadls.clear();
        self.offers_requested = false;
        self.conn = None;
    }

    /// HvPostMessage (hypercall 0x5C) with its input at guest physical `input_gpa`: reads the
    /// 256-byte `hv_input_post_message` (`{u32 connection_id, u32 reserved, u32 message_type,
    /// u32 payload_size, u8 payload[240]}`) and calls [`Self::post_message`]. Returns the
    /// hypercall status for RAX bits 0-15.
    pub fn hv_post_message(&mut self, mem: &dyn GuestMemory, input_gpa: u64) -> u16 {
        if input_gpa & 7 != 0 {
            self.logf(format!(
                "HvPostMessage input {input_gpa:#x} not 8-byte aligned"
            ));
            return hv_status::INVALID_ALIGNMENT;
        }
        let mut input = [0u8; 16 + protocol::MAX_MESSAGE_PAYLOAD];
        if let Err(e) = mem.read(input_gpa, &mut input) {
            self.logf(format!("HvPostMessage input: {e}"));
            return hv_status::INVALID_PARAMETER;
        }
        let conn = protocol::rd32(&input, 0);
        let ty = protocol::rd32(&input, 8);
        let size = protocol::rd32(&input, 12) as usize;
        if size > protocol::MAX_MESSAGE_PAYLOAD {
            self.logf(format!("HvPostMessage payload size {size}"));
            return hv_status::INVALID_PARAMETER;
        }
        self.post_message(mem, conn, ty, &input[16..16 + size])
    }

    /// HvSignalEvent (hypercall 0x5D, fast) with its input register RDX
    /// (`connection_id | flag_number << 32`). See [`Self::signal_event`].
    pub fn hv_signal_event(&mut self, mem: &dyn GuestMemory, rdx: u64) -> u16 {
        self.signal_event(mem, rdx as u32)
    }

    /// HvPostMessage from the guest: `connection_id` (low 24 bits used), SynIC message type and
    /// payload. Returns the hypercall status. Replies appear in [`Self::take_actions`].
    pub fn post_message(
        &mut self,
        mem: &dyn GuestMemory,
        connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> u16 {
        let conn_id = connection_id & 0xFF_FFFF;
        if conn_id != protocol::VMBUS_MESSAGE_CONNECTION_ID
            && conn_id != protocol::VMBUS_MESSAGE_CONNECTION_ID_4
        {
            self.logf(format!(
                "HvPostMessage to unknown connection id {conn_id:#x}"
            ));
            return hv_status::INVALID_CONNECTION_ID;
        }
        if message_type != protocol::HV_MESSAGE_TYPE_VMBUS
            || payload.len() > protocol::MAX_MESSAGE_PAYLOAD
        {
            self.logf(format!(
                "HvPostMessage with message type {message_type}, {} bytes",
                payload.len()
            ));
            return hv_status::INVALID_PARAMETER;
        }
        let msg = match Message::parse(payload) {
            Ok(m) => m,
            Err(e) => {
                self.logf(format!("dropped guest message: {e}"));
                return hv_status::SUCCESS;
            }
        };
        self.handle_message(mem, msg);
        hv_status::SUCCESS
    }

    fn handle_message(&mut self, mem: &dyn GuestMemory, msg: Message) {
        if let Message::InitiateContact(c) = &msg {
            if self.conn.is_some() {
                self.logf("INITIATE_CONTACT while connected: resetting".into());
                self.reset();
            }
            let ok = SUPPORTED_VERSIONS.contains(&c.version_requested);
            let sint = c.message_sint();
            if ok {
                self.conn = Some(Connection {
                    version: c.version_requested,
                    target_vp: c.target_vcpu,
                    sint,
                });
            } else {
                self.logf(format!("refusing VMBus version {:#x}", c.version_requested));
            }
            self.actions.push(Action::DeliverMessage {
                vp: c.target_vcpu,
                sint,
                message_type: protocol::HV_MESSAGE_TYPE_VMBUS,
                payload: Message::VersionResponse {
                    supported: ok,
                    connection_state: 0,
                    msg_conn_id: if ok && c.version_requested >= version::WIN10_V5 {
                        protocol::VMBUS_MESSAGE_CONNECTION_ID
                    } else {
                        0
                    },
                }
                .encode(),
            });
            return;
        }
        let Some(conn) = self.conn else {
            self.logf(format!(
                "message type {} before INITIATE_CONTACT dropped",
                msg.msgtype()
            ));
            return;
        };
        match msg {
            Message::RequestOffers => {
                self.offers_requested = true;
                let relids: Vec<u32> = self.channels.keys().copied().collect();
                for relid in relids {
                    self.send_offer(relid);
                }
                self.send(Message::AllOffersDelivered);
            }
            Message::GpadlHeader(h) => {
                let (relid, id) = (h.child_relid, h.gpadl);
                if !self.channels.get(&relid).is_some_and(|c| c.offered) {
                    self.logf(format!("GPADL {id:#x} for unknown relid {relid}"));
                    self.gpadl_created(relid, id, STATUS_UNSUCCESSFUL);
                    return;
                }
                let r = self.gpadls.header(&h).map(|g| g.is_some());
                self.gpadl_result(relid, id, r);
            }
            Message::GpadlBody {
                msg_number,
                gpadl,
                pfns,
            } => {
                let r = self
                    .gpadls
                    .body(msg_number, gpadl, &pfns)
                    .map(|g| g.map(|g| g.child_relid));
                match r {
                    Ok(Some(relid)) => self.gpadl_created(relid, gpadl, 0),
                    Ok(None) => {}
                    Err(e) => {
                        self.logf(format!("GPADL_BODY: {e}"));
                        if !matches!(e, GpadlError::Unknown(_)) {
                            self.gpadls.remove(gpadl);
                        }
                        self.gpadl_created(0, gpadl, STATUS_UNSUCCESSFUL);
                    }
                }
            }
            Message::GpadlTeardown { child_relid, gpadl } => {
                // A GPADL still used as a ring: stop the channel first.
                let users: Vec<u32> = self
                    .channels
                    .iter()
                    .filter(|(_, c)| c.open.as_ref().is_some_and(|o| o.gpadl == gpadl))
                    .map(|(r, _)| *r)
                    .collect();
                for relid in users {
                    self.logf(format!(
                        "GPADL {gpadl:#x} torn down while channel {relid} is open: closing"
                    ));
                    self.close_channel(relid);
                }
                if self.gpadls.remove(gpadl).is_none() {
                    self.logf(format!(
                        "GPADL_TEARDOWN of unknown GPADL {gpadl:#x} (relid {child_relid})"
                    ));
                }
                self.send(Message::GpadlTorndown { gpadl });
            }
            Message::OpenChannel(o) => {
                let status = match self.open_channel(mem, &o) {
                    Ok(()) => 0,
                    Err(e) => {
                        self.logf(format!("OPENCHANNEL relid {}: {e}", o.child_relid));
                        STATUS_UNSUCCESSFUL
                    }
                };
                self.send(Message::OpenChannelResult {
                    child_relid: o.child_relid,
                    open_id: o.open_id,
                    status,
                });
            }
            Message::CloseChannel { child_relid } => {
                if !self.close_channel(child_relid) {
                    self.logf(format!("CLOSECHANNEL of relid {child_relid} not open"));
                }
            }
            Message::RelidReleased { child_relid } => {
                self.logf(format!("relid {child_relid} released"));
            }
            Message::ModifyChannel {
                child_relid,
                target_vp,
            } => {
                let status = match self.channels.get_mut(&child_relid) {
                    Some(ch) => {
                        ch.target_vp = target_vp;
                        0
                    }
                    None => STATUS_UNSUCCESSFUL,
                };
                if conn.version >= version::WIN10_V5_3 {
                    self.send(Message::ModifyChannelResponse {
                        child_relid,
                        status,
                    });
                }
            }
            Message::Unload => {
                self.reset();
                // Reply on the SINT/VP the guest used while connected.
                self.actions.push(Action::DeliverMessage {
                    vp: conn.target_vp,
                    sint: conn.sint,
                    message_type: protocol::HV_MESSAGE_TYPE_VMBUS,
                    payload: Message::UnloadResponse.encode(),
                });
            }
            other => {
                self.logf(format!(
                    "unexpected message type {} from the guest",
                    other.msgtype()
                ));
            }
        }
    }

    fn gpadl_result(&mut self, relid: u32, id: u32, r: Result<bool, GpadlError>) {
        match r {
            Ok(true) => self.gpadl_created(relid, id, 0),
            Ok(false) => {}
            Err(e) => {
                self.logf(format!("GPADL_HEADER: {e}"));
                self.gpadl_created(relid, id, STATUS_UNSUCCESSFUL);
            }
        }
    }

    fn gpadl_created(&mut self, relid: u32, gpadl: u32, status: u32) {
        self.send(Message::GpadlCreated {
            child_relid: relid,
            gpadl,
            status,
        });
    }

    fn open_channel(
        &mut self,
        mem: &dyn GuestMemory,
        o: &protocol::OpenChannel,
    ) -> Result<(), String> {
        let relid = o.child_relid;
        let ch = self
            .channels
            .get_mut(&relid)
            .filter(|c| c.offered)
            .ok_or_else(|| "no such channel".to_string())?;
        if ch.open.is_some() {
            return Err("already open".into());
        }
        let g = self
            .gpadls
            .get(o.ring_gpadl)
            .ok_or_else(|| format!("unknown GPADL {:#x}", o.ring_gpadl))?;
        if g.child_relid != relid {
            return Err(format!(
                "GPADL {:#x} belongs to relid {}",
                o.ring_gpadl, g.child_relid
            ));
        }
        if g.range.byte_offset != 0 {
            return Err("ring GPADL does not start on a page".into());
        }
        let pages = g.range.pfns.len();
        let split = o.downstream_page_offset as usize;
        if split < 2 || split + 2 > pages {
            return Err(format!(
                "ring split at page {split} of a {pages}-page GPADL"
            ));
        }
        let (send, recv) = g.range.pfns.split_at(split);
        let min = ch.device.min_ring_size() as u64;
        if ((send.len() - 1) as u64) * 4096 < min || ((recv.len() - 1) as u64) * 4096 < min {
            return Err(format!("rings smaller than the device's minimum {min}"));
        }
        let reader = Ring::new(mem, send)
            .and_then(|r| RingReader::new(mem, r))
            .map_err(|e| format!("guest→host ring: {e}"))?;
        let writer = Ring::new(mem, recv)
            .and_then(|r| RingWriter::new(mem, r))
            .map_err(|e| format!("host→guest ring: {e}"))?;
        ch.device.open().map_err(|e| e.to_string())?;
        ch.target_vp = o.target_vp;
        ch.open = Some(OpenState {
            gpadl: o.ring_gpadl,
            reader,
            writer,
            out: VecDeque::new(),
            failed: None,
        });
        Ok(())
    }

    fn close_channel(&mut self, relid: u32) -> bool {
        match self.channels.get_mut(&relid) {
            Some(ch) if ch.open.is_some() => {
                ch.open = None;
                ch.device.close();
                true
            }
            _ => false,
        }
    }

    /// HvSignalEvent from the guest (fast hypercall; RDX low 24 bits = connection id). Runs the
    /// channel's device until its ring is drained (or its host→guest ring is full).
    pub fn signal_event(&mut self, mem: &dyn GuestMemory, connection_id: u32) -> u16 {
        let conn_id = connection_id & 0xFF_FFFF;
        let relid = conn_id.wrapping_sub(protocol::CHANNEL_CONNECTION_BASE);
        if conn_id < protocol::CHANNEL_CONNECTION_BASE || !self.channels.contains_key(&relid) {
            self.logf(format!(
                "HvSignalEvent to unknown connection id {conn_id:#x}"
            ));
            return hv_status::INVALID_CONNECTION_ID;
        }
        self.service(mem, relid);
        hv_status::SUCCESS
    }

    /// Gives every open channel a chance to make progress (flush queued completions, device
    /// `poll`). Call it when a device's asynchronous work finished.
    pub fn poll(&mut self, mem: &dyn GuestMemory) {
        let relids: Vec<u32> = self.channels.keys().copied().collect();
        for relid in relids {
            self.service(mem, relid);
        }
    }

    fn service(&mut self, mem: &dyn GuestMemory, relid: u32) {
        let sint = self
            .conn
            .map(|c| c.sint)
            .unwrap_or(protocol::VMBUS_MESSAGE_SINT);
        let Some(ch) = self.channels.get_mut(&relid) else {
            return;
        };
        let target_vp = ch.target_vp;
        let Some(open) = ch.open.as_mut() else {
            return;
        };
        if open.failed.is_some() {
            return;
        }
        let mut signal = false;
        let r = run_channel(mem, relid, &mut ch.device, open, &mut self.log, &mut signal);
        if signal {
            self.actions.push(Action::SignalGuest {
                vp: target_vp,
                sint,
                relid,
            });
        }
        if let Err(e) = r {
            let reason = e.to_string();
            push_log(
                &mut self.log,
                format!("vmbus relid {relid}: channel stopped: {reason}"),
            );
            open.failed = Some(reason.clone());
            self.actions.push(Action::ChannelFailed { relid, reason });
        }
    }
}

/// Writes queued packets; returns false when the ring is full.
fn flush(
    mem: &dyn GuestMemory,
    open: &mut OpenState,
    signal: &mut bool,
) -> Result<bool, RingError> {
    while let Some(p) = open.out.front() {
        match open.writer.write(mem, p)? {
            WriteOutcome::Written { signal: s } => {
                *signal |= s;
                open.out.pop_front();
            }
            WriteOutcome::Full => return Ok(false),
        }
    }
    Ok(true)
}

fn run_channel(
    mem: &dyn GuestMemory,
    relid: u32,
    device: &mut dyn VmbusDevice,
    open: &mut OpenState,
    log: &mut Vec<String>,
    signal: &mut bool,
) -> Result<(), DeviceError> {
    loop {
        if !flush(mem, open, signal)? && open.out.len() >= MAX_QUEUED_OUT {
            return Ok(());
        }
        open.reader.set_interrupt_mask(mem, true)?;
        while open.out.len() < MAX_QUEUED_OUT {
            let Some(pkt) = open.reader.read_packet(mem)? else {
                break;
            };
            {
                let mut io = ChannelIo {
                    mem,
                    out: &mut open.out,
                    log,
                    relid,
                };
                device.packet(&mut io, &pkt)?;
            }
            *signal |= open.reader.commit(mem)?;
            if !flush(mem, open, signal)? {
                // The guest must read completions before we take more requests; it will
                // signal us (pending_send_sz) when it has.
                break;
            }
        }
        {
            let mut io = ChannelIo {
                mem,
                out: &mut open.out,
                log,
                relid,
            };
            device.poll(&mut io)?;
        }
        let drained = flush(mem, open, signal)?;
        open.reader.set_interrupt_mask(mem, false)?;
        if !drained {
            // The guest reads our completions, sees pending_send_sz and signals us again.
            return Ok(());
        }
        if open.reader.is_empty(mem)? {
            return Ok(());
        }
    }
}

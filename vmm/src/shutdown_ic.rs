//! The Hyper-V shutdown integration service: a VMBus channel over which the host asks the
//! guest to shut down (QMP `system_powerdown`). Hyper-V guests are powered down this way, not
//! through an ACPI power button; Linux serves it in its `hv_utils` driver. The wire format is
//! in docs/qmp.md ("The shutdown integration service").
//!
//! The host speaks first: once the guest has opened the channel, the first request is a
//! version negotiation; after the guest's answer the shutdown request goes out. Both are
//! in-band packets whose payload starts with a pipe header and an IC message header; the guest
//! answers each with the same buffer, the response flag set and a status.

use vmbus::{ChannelIo, DeviceError, Guid, IncomingPacket, VmbusDevice};

/// Class GUID of the shutdown integration service.
pub const SHUTDOWN_IC_CLASS: &str = "0e0b6031-5213-4934-818b-38d90ced39db";
/// Instance GUID of our one shutdown channel.
pub const SHUTDOWN_IC_INSTANCE: &str = "3a0c4f3e-4cb5-4b0a-9c3e-8f2a6d0c7e51";

/// Pipe header (flags u32, size u32) + IC message header (20 bytes).
const HDR: usize = 8 + 20;
const MSG_NEGOTIATE: u16 = 0;
const MSG_SHUTDOWN: u16 = 3;
/// IC header flags.
const FLAG_TRANSACTION: u8 = 1;
const FLAG_REQUEST: u8 = 2;
const FLAG_RESPONSE: u8 = 4;
/// Framework and shutdown-message version offered (major, minor).
const FRAMEWORK_VERSION: (u16, u16) = (3, 0);
const SHUTDOWN_VERSION: (u16, u16) = (3, 0);
/// Shutdown request body: reason code, timeout (s), flags, then a 2048-byte message.
const SHUTDOWN_BODY: usize = 12 + 2048;
/// Flags of a shutdown request: 0 = shut down (1 would add "forced").
const SHUTDOWN_FLAGS: u32 = 0;
/// The in-band packet type (VMBus data packet without external data).
const DATA_INBAND: u16 = 6;

/// Where the exchange with the guest stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcState {
    /// The guest has not opened the channel (no driver, or not yet).
    Closed,
    /// Open; versions not negotiated yet.
    Open,
    /// Our negotiation request is out.
    Negotiating,
    /// Versions agreed.
    Ready,
    /// The guest refused our versions.
    Failed,
}

/// The shutdown integration service device.
#[derive(Debug)]
pub struct ShutdownIc {
    instance: Guid,
    state: IcState,
    /// A shutdown was asked for and is not sent yet.
    pending: bool,
    next_trans: u64,
    /// The guest's answers, for the host (`Ok(())` = it accepted a shutdown request).
    answers: Vec<Result<(), String>>,
}

impl ShutdownIc {
    pub fn new(instance: Guid) -> Self {
        ShutdownIc {
            instance,
            state: IcState::Closed,
            pending: false,
            next_trans: 1,
            answers: Vec::new(),
        }
    }

    pub fn state(&self) -> IcState {
        self.state
    }

    /// Asks the guest to shut down (sent at the next poll, after negotiation if needed).
    /// Fails when the guest has not opened the channel or refused our versions.
    pub fn request_shutdown(&mut self) -> Result<(), String> {
        match self.state {
            IcState::Closed => Err(
                "the guest has not opened the VMBus shutdown integration service (no hv_utils \
                 driver?)"
                    .into(),
            ),
            IcState::Failed => {
                Err("the guest refused the shutdown integration service's versions".into())
            }
            _ => {
                self.pending = true;
                Ok(())
            }
        }
    }

    /// The guest's answers to shutdown requests since the last call.
    pub fn take_answers(&mut self) -> Vec<Result<(), String>> {
        std::mem::take(&mut self.answers)
    }

    fn message(&mut self, io: &mut ChannelIo<'_>, ty: u16, version: (u16, u16), body: &[u8]) {
        let mut p = vec![0u8; HDR + body.len()];
        // Pipe header: flags 0, size of what follows.
        let size = (p.len() - 8) as u32;
        p[4..8].copy_from_slice(&size.to_le_bytes());
        let h = &mut p[8..HDR];
        h[0..2].copy_from_slice(&FRAMEWORK_VERSION.0.to_le_bytes());
        h[2..4].copy_from_slice(&FRAMEWORK_VERSION.1.to_le_bytes());
        h[4..6].copy_from_slice(&ty.to_le_bytes());
        h[6..8].copy_from_slice(&version.0.to_le_bytes());
        h[8..10].copy_from_slice(&version.1.to_le_bytes());
        h[10..12].copy_from_slice(&(body.len() as u16).to_le_bytes());
        // status (12..16) 0, transaction id (16) 0
        h[17] = FLAG_TRANSACTION | FLAG_REQUEST;
        p[HDR..].copy_from_slice(body);
        let trans = self.next_trans;
        self.next_trans += 1;
        io.send_packet(DATA_INBAND, 0, trans, &p);
    }

    fn send_negotiate(&mut self, io: &mut ChannelIo<'_>) {
        // One framework version, then one message version.
        let mut body = vec![0u8; 8 + 8];
        body[0..2].copy_from_slice(&1u16.to_le_bytes());
        body[2..4].copy_from_slice(&1u16.to_le_bytes());
        body[8..10].copy_from_slice(&FRAMEWORK_VERSION.0.to_le_bytes());
        body[10..12].copy_from_slice(&FRAMEWORK_VERSION.1.to_le_bytes());
        body[12..14].copy_from_slice(&SHUTDOWN_VERSION.0.to_le_bytes());
        body[14..16].copy_from_slice(&SHUTDOWN_VERSION.1.to_le_bytes());
        self.message(io, MSG_NEGOTIATE, (1, 0), &body);
        self.state = IcState::Negotiating;
    }

    fn send_shutdown(&mut self, io: &mut ChannelIo<'_>) {
        let mut body = vec![0u8; SHUTDOWN_BODY];
        body[8..12].copy_from_slice(&SHUTDOWN_FLAGS.to_le_bytes());
        let text = b"viridian: system_powerdown";
        body[12..12 + text.len()].copy_from_slice(text);
        self.message(io, MSG_SHUTDOWN, SHUTDOWN_VERSION, &body);
        self.pending = false;
    }

    /// Sends what is due: the negotiation once open, a pending shutdown once negotiated.
    fn progress(&mut self, io: &mut ChannelIo<'_>) {
        match self.state {
            IcState::Open if self.pending => self.send_negotiate(io),
            IcState::Ready if self.pending => self.send_shutdown(io),
            _ => {}
        }
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

impl VmbusDevice for ShutdownIc {
    fn interface_type(&self) -> Guid {
        Guid::parse(SHUTDOWN_IC_CLASS).expect("constant GUID")
    }

    fn interface_instance(&self) -> Guid {
        self.instance
    }

    fn open(&mut self) -> Result<(), DeviceError> {
        self.state = IcState::Open;
        Ok(())
    }

    fn close(&mut self) {
        self.state = IcState::Closed;
    }

    fn packet(
        &mut self,
        io: &mut ChannelIo<'_>,
        packet: &IncomingPacket,
    ) -> Result<(), DeviceError> {
        let p = &packet.payload;
        if p.len() < HDR || p[8 + 17] & FLAG_RESPONSE == 0 {
            io.log(format!(
                "shutdown IC: ignored a {}-byte packet that is not a response",
                p.len()
            ));
            return Ok(());
        }
        let ty = u16_at(p, 8 + 4);
        let status = u32::from_le_bytes(p[8 + 12..8 + 16].try_into().expect("4 bytes"));
        match ty {
            MSG_NEGOTIATE if self.state == IcState::Negotiating => {
                // The guest leaves one framework and one message version (counts 1, 1), or
                // zero counts when none of ours suits it.
                let agreed = p.len() >= HDR + 16 && u16_at(p, HDR) == 1 && u16_at(p, HDR + 2) == 1;
                if agreed {
                    self.state = IcState::Ready;
                } else {
                    self.state = IcState::Failed;
                    if self.pending {
                        self.pending = false;
                        self.answers
                            .push(Err("the guest refused our IC versions".into()));
                    }
                }
            }
            MSG_SHUTDOWN => self.answers.push(if status == 0 {
                Ok(())
            } else {
                Err(format!(
                    "the guest refused to shut down (status {status:#x})"
                ))
            }),
            _ => io.log(format!("shutdown IC: unexpected response type {ty}")),
        }
        self.progress(io);
        Ok(())
    }

    fn poll(&mut self, io: &mut ChannelIo<'_>) -> Result<(), DeviceError> {
        self.progress(io);
        Ok(())
    }
}

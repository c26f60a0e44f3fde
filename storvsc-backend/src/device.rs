//! The storvsc device: the vstor protocol on a VMBus channel, in front of a [`ScsiController`].

use vmbus::{ChannelIo, DeviceError, Guid, IncomingPacket, PacketKind, PageBuffer, VmbusDevice};

use crate::scsi::{BufferError, Completion, DataBuffer, ScsiController, DEFAULT_MAX_TRANSFER};
use crate::vstor::{self, direction, off, op, srb, status, VstorPacket, VSTOR_PACKET_SIZE};

/// Hard cap on one request's data (bytes), whatever the guest asks.
pub const MAX_REQUEST_BYTES: u32 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InitState {
    /// Channel open, waiting for BEGIN_INITIALIZATION.
    Initial,
    /// BEGIN_INITIALIZATION seen; negotiating a version.
    Begun,
    /// A version was accepted.
    Negotiated,
    /// END_INITIALIZATION seen: SRBs accepted.
    Ready,
}

/// Counters, for tests and statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorvscStats {
    pub requests: u64,
    pub srbs: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub failed: u64,
    /// Bus-change notices (ENUMERATE_BUS) sent to the guest.
    pub bus_notices: u64,
}

/// A Hyper-V synthetic SCSI controller on one VMBus channel.
pub struct StorvscDevice {
    instance: Guid,
    controller: ScsiController,
    max_transfer: u32,
    state: InitState,
    version: u16,
    stats: StorvscStats,
    /// Log every request, completion and notice (`VIRIDIAN_STORVSC_TRACE=1`; off by default).
    trace: bool,
}

impl StorvscDevice {
    /// A controller offered with `instance` as its instance GUID.
    pub fn new(instance: Guid, controller: ScsiController) -> Self {
        let trace = std::env::var_os("VIRIDIAN_STORVSC_TRACE").is_some_and(|v| v == "1");
        let mut d = StorvscDevice {
            instance,
            controller,
            max_transfer: DEFAULT_MAX_TRANSFER,
            state: InitState::Initial,
            version: 0,
            stats: StorvscStats::default(),
            trace,
        };
        d.set_trace(trace);
        d
    }

    /// Sets max_transfer_bytes for QUERY_PROPERTIES (rounded to a non-zero multiple of 4096,
    /// at most [`MAX_REQUEST_BYTES`]) and the matching VPD B0 limit of every LUN.
    pub fn with_max_transfer(mut self, bytes: u32) -> Self {
        self.max_transfer = (bytes.min(MAX_REQUEST_BYTES) / 4096).max(1) * 4096;
        self.controller.set_max_transfer(self.max_transfer);
        self
    }

    pub fn controller(&self) -> &ScsiController {
        &self.controller
    }

    /// The controller, for host-side changes: LUN hot-plug, medium changes. A changed LUN set
    /// is announced to the guest from [`VmbusDevice::poll`] (call [`vmbus::VmbusServer::poll`]).
    pub fn controller_mut(&mut self) -> &mut ScsiController {
        &mut self.controller
    }

    pub fn stats(&self) -> StorvscStats {
        self.stats
    }

    /// The negotiated protocol version (0 before negotiation).
    pub fn protocol_version(&self) -> u16 {
        self.version
    }

    /// Turns tracing of requests, completions, notices and fence changes on or off (the
    /// default comes from `VIRIDIAN_STORVSC_TRACE=1`); lines go to the channel log.
    pub fn set_trace(&mut self, on: bool) {
        self.trace = on;
        self.controller.set_trace(on);
    }

    /// Completes `pkt` with `resp`, echoing the request's size: 64 bytes (Linux 6.x always
    /// sends 64), or 52..64 for an older guest's pre-Win8 packet.
    fn complete(
        &self,
        io: &mut ChannelIo<'_>,
        pkt: &IncomingPacket,
        mut resp: VstorPacket,
        st: u32,
    ) {
        resp.set_u32(off::OPERATION, op::COMPLETE_IO);
        resp.set_u32(off::FLAGS, 0);
        resp.set_u32(off::STATUS, st);
        let n = if pkt.payload.len() < vstor::VSTOR_PACKET_SIZE_PRE_WIN8 {
            VSTOR_PACKET_SIZE
        } else {
            pkt.payload.len().min(VSTOR_PACKET_SIZE)
        };
        if self.trace {
            io.log(format!(
                "storvsc out: trans_id {:#x} op {} status {st:#x} srb {:#x} scsi {:#x} sense {} len {}{}",
                pkt.trans_id,
                resp.operation(),
                resp.srb_status(),
                resp.scsi_status(),
                resp.0[off::SENSE_INFO_LENGTH],
                resp.data_transfer_length(),
                if pkt.completion_requested() { "" } else { " (not requested: dropped)" }
            ));
        }
        if pkt.completion_requested() {
            io.send_completion(pkt.trans_id, &resp.0[..n]);
        }
    }

    fn srb_fail(
        &mut self,
        io: &mut ChannelIo<'_>,
        pkt: &IncomingPacket,
        mut resp: VstorPacket,
        why: &str,
    ) {
        io.log(format!("SRB trans_id {:#x} failed: {why}", pkt.trans_id));
        self.stats.failed += 1;
        resp.0[off::SRB_STATUS] = srb::INVALID_REQUEST;
        resp.0[off::SCSI_STATUS] = 0;
        resp.0[off::SENSE_INFO_LENGTH] = 0;
        resp.set_u32(off::DATA_TRANSFER_LENGTH, 0);
        self.complete(io, pkt, resp, status::INVALID_PARAMETER);
    }

    fn execute_srb(&mut self, io: &mut ChannelIo<'_>, pkt: &IncomingPacket, req: VstorPacket) {
        let mut resp = req;
        if self.state != InitState::Ready {
            io.log("EXECUTE_SRB before END_INITIALIZATION");
            self.stats.failed += 1;
            resp.0[off::SRB_STATUS] = srb::ERROR;
            resp.set_u32(off::DATA_TRANSFER_LENGTH, 0);
            self.complete(io, pkt, resp, status::INVALID_DEVICE_STATE);
            return;
        }
        self.stats.srbs += 1;
        let cdb_len = req.0[off::CDB_LENGTH] as usize;
        if cdb_len == 0 || cdb_len > vstor::MAX_CDB {
            return self.srb_fail(io, pkt, resp, &format!("CDB length {cdb_len}"));
        }
        let data_in = req.0[off::DATA_IN];
        if data_in > direction::NONE {
            return self.srb_fail(io, pkt, resp, &format!("data_in {data_in}"));
        }
        let dtl = req.data_transfer_length();
        if dtl > MAX_REQUEST_BYTES {
            return self.srb_fail(io, pkt, resp, &format!("data_transfer_length {dtl}"));
        }
        let mut cdb = [0u8; vstor::MAX_CDB];
        cdb[..cdb_len].copy_from_slice(&req.0[off::CDB..off::CDB + cdb_len]);
        // Commands are decoded from a full 16-byte CDB; the length was checked above.
        let (path, target, lun) = (req.0[off::PATH_ID], req.0[off::TARGET_ID], req.0[off::LUN]);
        let outcome = if dtl == 0 || data_in == direction::NONE {
            let mut empty = Vec::new();
            self.controller
                .execute(path, target, lun, &cdb[..cdb_len.max(6)], &mut empty)
        } else {
            if pkt.kind != PacketKind::GpaDirect {
                return self.srb_fail(io, pkt, resp, "data transfer without GPA ranges");
            }
            let pb = match io.page_buffer(&pkt.ranges) {
                Ok(pb) => pb,
                Err(e) => return self.srb_fail(io, pkt, resp, &format!("GPA ranges: {e}")),
            };
            if pb.len() < dtl as u64 {
                return self.srb_fail(
                    io,
                    pkt,
                    resp,
                    &format!("{dtl} bytes requested, GPA ranges hold {}", pb.len()),
                );
            }
            if let Err(e) = pb.check() {
                return self.srb_fail(io, pkt, resp, &format!("GPA ranges: {e}"));
            }
            let mut buf = GuestBuffer {
                pb,
                len: dtl as usize,
            };
            self.controller
                .execute(path, target, lun, &cdb[..cdb_len.max(6)], &mut buf)
        };
        for line in self.controller.take_trace() {
            io.log(format!("storvsc {line}"));
        }
        // Clear the sense area before filling it.
        resp.0[off::CDB..off::CDB + vstor::SENSE_BUFFER_SIZE].fill(0);
        match outcome {
            Completion::Good { transferred } => {
                resp.0[off::SRB_STATUS] = srb::SUCCESS;
                resp.0[off::SCSI_STATUS] = 0;
                resp.0[off::SENSE_INFO_LENGTH] = 0;
                resp.set_u32(off::DATA_TRANSFER_LENGTH, transferred as u32);
                if data_in == direction::READ {
                    self.stats.bytes_read += transferred as u64;
                } else if data_in == direction::WRITE {
                    self.stats.bytes_written += transferred as u64;
                }
            }
            Completion::Check { sense, transferred } => {
                resp.0[off::SRB_STATUS] = srb::ERROR | srb::AUTOSENSE_VALID;
                resp.0[off::SCSI_STATUS] = 2;
                let s = sense.fixed();
                resp.0[off::SENSE_INFO_LENGTH] = s.len() as u8;
                resp.0[off::CDB..off::CDB + s.len()].copy_from_slice(&s);
                resp.set_u32(off::DATA_TRANSFER_LENGTH, transferred as u32);
            }
            Completion::NoLun => {
                resp.0[off::SRB_STATUS] = srb::INVALID_LUN;
                resp.0[off::SCSI_STATUS] = 2;
                resp.0[off::SENSE_INFO_LENGTH] = 0;
                resp.set_u32(off::DATA_TRANSFER_LENGTH, 0);
            }
            Completion::HostError(e) => {
                return self.srb_fail(io, pkt, resp, &e);
            }
        }
        self.complete(io, pkt, resp, status::SUCCESS);
    }
}

/// The guest pages of one request, limited to data_transfer_length.
struct GuestBuffer<'a> {
    pb: PageBuffer<'a>,
    len: usize,
}

impl DataBuffer for GuestBuffer<'_> {
    fn len(&self) -> usize {
        self.len
    }
    fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), BufferError> {
        if offset + buf.len() > self.len {
            return Err(BufferError(format!("read past {} bytes", self.len)));
        }
        self.pb
            .read_at(offset as u64, buf)
            .map_err(|e| BufferError(e.to_string()))
    }
    fn write_at(&mut self, offset: usize, data: &[u8]) -> Result<(), BufferError> {
        if offset + data.len() > self.len {
            return Err(BufferError(format!("write past {} bytes", self.len)));
        }
        self.pb
            .write_at(offset as u64, data)
            .map_err(|e| BufferError(e.to_string()))
    }
}

impl VmbusDevice for StorvscDevice {
    fn interface_type(&self) -> Guid {
        vstor::SCSI_CLASS_ID
    }

    fn interface_instance(&self) -> Guid {
        self.instance
    }

    fn min_ring_size(&self) -> u32 {
        4096
    }

    fn poll(&mut self, io: &mut ChannelIo<'_>) -> Result<(), DeviceError> {
        // LUNs were added or removed: tell the guest to rescan the bus (an unsolicited packet,
        // trans_id 0). The guest re-probes the LUNs it knows (a removed one now answers
        // INVALID_LUN and is deleted) and REPORT LUNS finds the new ones.
        if self.controller.take_bus_changed() && self.state == InitState::Ready {
            let p = VstorPacket::new(op::ENUMERATE_BUS, 0);
            io.send_completion(0, &p.0);
            self.stats.bus_notices += 1;
            if self.trace {
                io.log(format!(
                    "storvsc notice: ENUMERATE_BUS #{}",
                    self.stats.bus_notices
                ));
            }
        }
        Ok(())
    }

    fn open(&mut self) -> Result<(), DeviceError> {
        self.state = InitState::Initial;
        self.version = 0;
        self.controller.guest_reset();
        Ok(())
    }

    fn close(&mut self) {
        self.state = InitState::Initial;
        self.version = 0;
        self.controller.guest_reset();
        for (_, unit) in self.controller.luns() {
            // Best effort: a close is an orderly point to make writes durable.
            if let Some(d) = unit.image() {
                let _ = d.flush();
            }
        }
    }

    fn packet(&mut self, io: &mut ChannelIo<'_>, pkt: &IncomingPacket) -> Result<(), DeviceError> {
        match pkt.kind {
            PacketKind::InBand | PacketKind::GpaDirect => {}
            // We never send requests, so completions from the guest carry nothing for us.
            PacketKind::Completion => return Ok(()),
            PacketKind::Other(t) => {
                io.log(format!("packet type {t} not supported"));
                self.stats.failed += 1;
                self.complete(
                    io,
                    pkt,
                    VstorPacket::default(),
                    status::INVALID_DEVICE_REQUEST,
                );
                return Ok(());
            }
        }
        self.stats.requests += 1;
        let Some(req) = VstorPacket::from_bytes(&pkt.payload) else {
            io.log(format!(
                "vstor packet of {} bytes (need {})",
                pkt.payload.len(),
                vstor::VSTOR_PACKET_SIZE_PRE_WIN8
            ));
            self.stats.failed += 1;
            let mut resp = VstorPacket::default();
            let n = pkt.payload.len().min(VSTOR_PACKET_SIZE);
            resp.0[..n].copy_from_slice(&pkt.payload[..n]);
            self.complete(io, pkt, resp, status::INVALID_PARAMETER);
            return Ok(());
        };
        if self.trace {
            io.log(format!(
                "storvsc in: trans_id {:#x} kind {:?} flags {:#x} op {} lun {} cdb {:02x?} data_in {} len {}",
                pkt.trans_id,
                pkt.kind,
                pkt.flags,
                req.operation(),
                req.0[off::LUN],
                &req.0[off::CDB..off::CDB + (req.0[off::CDB_LENGTH] as usize).min(vstor::MAX_CDB)],
                req.0[off::DATA_IN],
                req.data_transfer_length()
            ));
        }
        let mut resp = req;
        match req.operation() {
            op::EXECUTE_SRB => self.execute_srb(io, pkt, req),
            op::BEGIN_INITIALIZATION => {
                self.state = InitState::Begun;
                self.version = 0;
                self.complete(io, pkt, resp, status::SUCCESS);
            }
            op::QUERY_PROTOCOL_VERSION => {
                let v = req.u16(off::VERSION);
                // 6.0 (WIN8_1) keeps Linux off WRITE SAME; 5.1 has the same packet layout.
                let ok = self.state != InitState::Initial
                    && (v == vstor::version::WIN8_1 || v == vstor::version::WIN8);
                let st = if ok {
                    self.version = v;
                    self.state = InitState::Negotiated;
                    status::SUCCESS
                } else {
                    status::REVISION_MISMATCH
                };
                self.complete(io, pkt, resp, st);
            }
            op::QUERY_PROPERTIES => {
                resp.0[12..].fill(0);
                resp.set_u16(off::MAX_CHANNEL_CNT, 0);
                resp.set_u32(off::PROP_FLAGS, 0); // no sub-channels
                resp.set_u32(off::MAX_TRANSFER_BYTES, self.max_transfer);
                self.complete(io, pkt, resp, status::SUCCESS);
            }
            op::END_INITIALIZATION => {
                let st = if self.state == InitState::Negotiated || self.state == InitState::Ready {
                    self.state = InitState::Ready;
                    // The guest scans the bus next, holding no devices yet: no notice needed
                    // for changes until now, and nothing to fence.
                    self.controller.take_bus_changed();
                    self.controller.guest_reset();
                    status::SUCCESS
                } else {
                    io.log("END_INITIALIZATION before a protocol version was agreed");
                    status::INVALID_DEVICE_STATE
                };
                self.complete(io, pkt, resp, st);
            }
            op::RESET_LUN | op::RESET_ADAPTER | op::RESET_BUS => {
                // Requests complete synchronously, so nothing is outstanding to abort.
                self.complete(io, pkt, resp, status::SUCCESS);
            }
            other => {
                io.log(format!("vstor operation {other} not supported"));
                self.stats.failed += 1;
                self.complete(io, pkt, resp, status::INVALID_DEVICE_REQUEST);
            }
        }
        Ok(())
    }
}

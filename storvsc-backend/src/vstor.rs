//! The storvsc/storvsp wire protocol (`vstor_packet`, docs/vmm.md, "Storvsc (vstor) protocol").
//!
//! Every packet is 64 bytes for the protocol versions we accept (WIN8 5.1 and WIN8_1 6.0):
//! `{u32 operation; u32 flags; u32 status; union[0x34]}`.

use vmbus::Guid;

/// Size of a `vstor_packet` for protocol ≥ 5.1 (Linux always sends this many bytes).
pub const VSTOR_PACKET_SIZE: usize = 64;
/// Size of a pre-Win8 `vstor_packet` (its SCSI request lacks the 12-byte Win8 extension).
/// Accepted and echoed for the init operations of older guests.
pub const VSTOR_PACKET_SIZE_PRE_WIN8: usize = 52;
/// Size of the `vmscsi_request` area for protocol ≥ 5.1.
pub const SCSI_REQUEST_SIZE: u16 = 0x34;
/// Sense bytes that fit in the request.
pub const SENSE_BUFFER_SIZE: usize = 20;
/// Largest CDB.
pub const MAX_CDB: usize = 16;

/// The SCSI controller class GUID ba6163d9-04a1-4d29-b605-72e2ffb1dc7f.
pub const SCSI_CLASS_ID: Guid = Guid::from_fields(
    0xba6163d9,
    0x04a1,
    0x4d29,
    [0xb6, 0x05, 0x72, 0xe2, 0xff, 0xb1, 0xdc, 0x7f],
);

/// vstor operations.
pub mod op {
    pub const COMPLETE_IO: u32 = 1;
    pub const REMOVE_DEVICE: u32 = 2;
    pub const EXECUTE_SRB: u32 = 3;
    pub const RESET_LUN: u32 = 4;
    pub const RESET_ADAPTER: u32 = 5;
    pub const RESET_BUS: u32 = 6;
    pub const BEGIN_INITIALIZATION: u32 = 7;
    pub const END_INITIALIZATION: u32 = 8;
    pub const QUERY_PROTOCOL_VERSION: u32 = 9;
    pub const QUERY_PROPERTIES: u32 = 10;
    pub const ENUMERATE_BUS: u32 = 11;
    pub const FCHBA_DATA: u32 = 12;
    pub const CREATE_SUB_CHANNELS: u32 = 13;
    pub const EVENT_NOTIFICATION: u32 = 14;
}

/// Protocol versions (major << 8 | minor).
pub mod version {
    pub const WIN6: u16 = 0x0200;
    pub const WIN7: u16 = 0x0402;
    pub const WIN8: u16 = 0x0501;
    pub const WIN8_1: u16 = 0x0600;
    pub const WIN10: u16 = 0x0602;
}

/// NTSTATUS values.
pub mod status {
    pub const SUCCESS: u32 = 0;
    pub const UNSUCCESSFUL: u32 = 0xC000_0001;
    pub const INVALID_PARAMETER: u32 = 0xC000_000D;
    pub const INVALID_DEVICE_REQUEST: u32 = 0xC000_0010;
    pub const REVISION_MISMATCH: u32 = 0xC000_0059;
    pub const INVALID_DEVICE_STATE: u32 = 0xC000_0184;
    pub const IO_DEVICE_ERROR: u32 = 0xC000_0185;
}

/// SRB status values.
pub mod srb {
    pub const SUCCESS: u8 = 0x01;
    pub const ERROR: u8 = 0x04;
    pub const INVALID_REQUEST: u8 = 0x06;
    pub const DATA_OVERRUN: u8 = 0x12;
    pub const INVALID_LUN: u8 = 0x20;
    pub const AUTOSENSE_VALID: u8 = 0x80;
}

/// `data_in` values of the SCSI request.
pub mod direction {
    pub const WRITE: u8 = 0;
    pub const READ: u8 = 1;
    pub const NONE: u8 = 2;
}

/// Field offsets inside the 64-byte packet.
pub mod off {
    pub const OPERATION: usize = 0;
    pub const FLAGS: usize = 4;
    pub const STATUS: usize = 8;
    // vmscsi_request
    pub const SRB_LENGTH: usize = 12;
    pub const SRB_STATUS: usize = 14;
    pub const SCSI_STATUS: usize = 15;
    pub const PORT: usize = 16;
    pub const PATH_ID: usize = 17;
    pub const TARGET_ID: usize = 18;
    pub const LUN: usize = 19;
    pub const CDB_LENGTH: usize = 20;
    pub const SENSE_INFO_LENGTH: usize = 21;
    pub const DATA_IN: usize = 22;
    pub const DATA_TRANSFER_LENGTH: usize = 24;
    pub const CDB: usize = 28;
    pub const SRB_FLAGS: usize = 52;
    // vmstorage_protocol_version
    pub const VERSION: usize = 12;
    pub const REVISION: usize = 14;
    // vmstorage_channel_properties
    pub const MAX_CHANNEL_CNT: usize = 16;
    pub const PROP_FLAGS: usize = 20;
    pub const MAX_TRANSFER_BYTES: usize = 24;
}

/// A 64-byte vstor packet with typed accessors.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct VstorPacket(pub [u8; VSTOR_PACKET_SIZE]);

impl std::fmt::Debug for VstorPacket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VstorPacket {{ op: {}, flags: {:#x}, status: {:#x} }}",
            self.operation(),
            self.u32(off::FLAGS),
            self.status()
        )
    }
}

impl Default for VstorPacket {
    fn default() -> Self {
        VstorPacket([0; VSTOR_PACKET_SIZE])
    }
}

impl VstorPacket {
    /// The first 64 bytes of `b`; a pre-Win8 packet (52..64 bytes) is zero-padded. None when
    /// shorter.
    pub fn from_bytes(b: &[u8]) -> Option<VstorPacket> {
        if b.len() < VSTOR_PACKET_SIZE_PRE_WIN8 {
            return None;
        }
        let n = b.len().min(VSTOR_PACKET_SIZE);
        let mut p = [0u8; VSTOR_PACKET_SIZE];
        p[..n].copy_from_slice(&b[..n]);
        Some(VstorPacket(p))
    }

    pub fn new(operation: u32, flags: u32) -> VstorPacket {
        let mut p = VstorPacket::default();
        p.set_u32(off::OPERATION, operation);
        p.set_u32(off::FLAGS, flags);
        p
    }

    pub fn u16(&self, o: usize) -> u16 {
        u16::from_le_bytes([self.0[o], self.0[o + 1]])
    }
    pub fn u32(&self, o: usize) -> u32 {
        u32::from_le_bytes([self.0[o], self.0[o + 1], self.0[o + 2], self.0[o + 3]])
    }
    pub fn set_u16(&mut self, o: usize, v: u16) {
        self.0[o..o + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_u32(&mut self, o: usize, v: u32) {
        self.0[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn operation(&self) -> u32 {
        self.u32(off::OPERATION)
    }
    pub fn status(&self) -> u32 {
        self.u32(off::STATUS)
    }
    pub fn srb_status(&self) -> u8 {
        self.0[off::SRB_STATUS]
    }
    pub fn scsi_status(&self) -> u8 {
        self.0[off::SCSI_STATUS]
    }
    pub fn data_transfer_length(&self) -> u32 {
        self.u32(off::DATA_TRANSFER_LENGTH)
    }
    /// Sense bytes (valid with AUTOSENSE_VALID).
    pub fn sense(&self) -> &[u8] {
        let n = (self.0[off::SENSE_INFO_LENGTH] as usize).min(SENSE_BUFFER_SIZE);
        &self.0[off::CDB..off::CDB + n]
    }

    /// A SCSI request (EXECUTE_SRB) as Linux builds it.
    pub fn scsi_request(
        target: (u8, u8, u8),
        cdb: &[u8],
        data_in: u8,
        data_transfer_length: u32,
    ) -> VstorPacket {
        let mut p = VstorPacket::new(op::EXECUTE_SRB, 1);
        p.set_u16(off::SRB_LENGTH, SCSI_REQUEST_SIZE);
        p.0[off::PATH_ID] = target.0;
        p.0[off::TARGET_ID] = target.1;
        p.0[off::LUN] = target.2;
        let n = cdb.len().min(MAX_CDB);
        p.0[off::CDB_LENGTH] = n as u8;
        p.0[off::CDB..off::CDB + n].copy_from_slice(&cdb[..n]);
        p.0[off::SENSE_INFO_LENGTH] = SENSE_BUFFER_SIZE as u8;
        p.0[off::DATA_IN] = data_in;
        p.set_u32(off::DATA_TRANSFER_LENGTH, data_transfer_length);
        let flags = match data_in {
            direction::READ => 0x40,
            direction::WRITE => 0x80,
            _ => 0,
        } | 0x2
            | 0x100
            | 0x8;
        p.set_u32(off::SRB_FLAGS, flags);
        p.set_u32(56, 60);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let p = VstorPacket::scsi_request((0, 1, 2), &[0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0], 1, 512);
        assert_eq!(p.0.len(), 64);
        assert_eq!(p.operation(), 3);
        assert_eq!(p.u16(12), 0x34);
        assert_eq!((p.0[17], p.0[18], p.0[19]), (0, 1, 2));
        assert_eq!(p.0[20], 10);
        assert_eq!(p.0[21], 20);
        assert_eq!(p.0[22], 1);
        assert_eq!(p.u32(24), 512);
        assert_eq!(p.0[28], 0x28);
        assert_eq!(p.u32(52) & 0x40, 0x40);
        assert_eq!(
            SCSI_CLASS_ID.to_windows_bytes()[..4],
            [0xd9, 0x63, 0x61, 0xba],
            "GUID in wire order"
        );
    }
}

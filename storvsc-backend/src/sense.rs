//! SCSI sense data: every sense code a LUN of this crate reports, in one place, and the helpers
//! that turn them into answers (REQUEST SENSE data, the sense for a failed disk I/O).

use crate::scsi::{respond, Completion, DataBuffer};

/// Sense key and additional sense code/qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    pub const NO_SENSE: Sense = Sense::new(0, 0, 0);
    pub const INVALID_OPCODE: Sense = Sense::new(5, 0x20, 0);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(5, 0x21, 0);
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(5, 0x24, 0);
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(5, 0x25, 0);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Sense = Sense::new(5, 0x26, 0);
    pub const PARAMETER_LIST_LENGTH_ERROR: Sense = Sense::new(5, 0x1A, 0);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Sense = Sense::new(5, 0x39, 0);
    pub const WRITE_PROTECTED: Sense = Sense::new(7, 0x27, 0);
    pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(3, 0x11, 0);
    pub const WRITE_ERROR: Sense = Sense::new(3, 0x0C, 0);

    // Removable media (the DVD drive).
    /// 02/3A/01: no medium, tray open.
    pub const MEDIUM_NOT_PRESENT_TRAY_OPEN: Sense = Sense::new(2, 0x3A, 0x01);
    /// 02/3A/02: no medium, tray closed.
    pub const MEDIUM_NOT_PRESENT_TRAY_CLOSED: Sense = Sense::new(2, 0x3A, 0x02);
    /// 06/28/00: not ready to ready change, medium may have changed.
    pub const MEDIUM_CHANGED: Sense = Sense::new(6, 0x28, 0x00);
    /// 05/53/02: medium removal prevented.
    pub const MEDIUM_REMOVAL_PREVENTED: Sense = Sense::new(5, 0x53, 0x02);
    /// 05/30/02: cannot read medium, incompatible format (a medium of fewer than one block).
    pub const INCOMPATIBLE_MEDIUM: Sense = Sense::new(5, 0x30, 0x02);

    pub const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense { key, asc, ascq }
    }

    /// Fixed-format sense data (response code 0x70), 18 bytes.
    pub fn fixed(&self) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = 0x70;
        s[2] = self.key & 0x0F;
        s[7] = 10;
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }

    /// The sense for a failed disk read (`write` false) or write.
    pub fn of_disk_error(e: &disk::Error, write: bool) -> Sense {
        match e {
            disk::Error::ReadOnly => Sense::WRITE_PROTECTED,
            disk::Error::OutOfRange { .. } => Sense::LBA_OUT_OF_RANGE,
            _ if write => Sense::WRITE_ERROR,
            _ => Sense::UNRECOVERED_READ_ERROR,
        }
    }

    /// Answers REQUEST SENSE (`cdb` of at least 6 bytes) with this sense, fixed format, cut to
    /// the allocation length the CDB gives.
    pub(crate) fn respond_to_request(&self, cdb: &[u8], buf: &mut dyn DataBuffer) -> Completion {
        respond(buf, &self.fixed(), cdb[4] as usize)
    }
}

//! A SCSI block target (SBC-3 subset) over any [`disk::BlockDevice`], independent of the
//! transport. [`ScsiController`] holds several LUNs; [`ScsiDisk`] answers one LUN.
//!
//! A command is a CDB plus a [`DataBuffer`] (data-out for writes, data-in for reads); the
//! result is a [`Completion`]: GOOD, CHECK CONDITION with fixed-format sense, no such LUN, or a
//! host-side failure of the data buffer (guest memory).

use std::collections::BTreeMap;

use disk::{Disk, ZeroFlags};

use crate::cdrom::ScsiCdrom;

/// Largest chunk moved between the disk and the data buffer at once.
const CHUNK: usize = 1 << 20;
/// Most blocks one UNMAP descriptor or WRITE SAME may cover.
pub const MAX_UNMAP_BLOCKS: u32 = 0x0040_0000;
/// Most descriptors in one UNMAP parameter list.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 64;
/// Highest LUN number a controller accepts (Hyper-V's limit per synthetic controller is 64
/// LUNs; REPORT LUNS uses single-level peripheral addressing up to 255).
pub const MAX_LUN: u8 = 63;
/// Default maximum transfer size in bytes (QUERY_PROPERTIES, VPD B0).
pub const DEFAULT_MAX_TRANSFER: u32 = 0x40000;

/// Operation codes handled here.
pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const VERIFY_10: u8 = 0x2F;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8A;
    pub const VERIFY_16: u8 = 0x8F;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    /// SERVICE ACTION IN(16) service action READ CAPACITY(16).
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
}
use opcode::*;

pub use crate::sense::Sense;

/// The result of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// GOOD; `transferred` bytes of data moved.
    Good { transferred: usize },
    /// CHECK CONDITION with sense data.
    Check { sense: Sense, transferred: usize },
    /// No logical unit at this address.
    NoLun,
    /// The data buffer could not be accessed (bad guest memory).
    HostError(String),
}

impl Completion {
    pub(crate) fn check(sense: Sense) -> Completion {
        Completion::Check {
            sense,
            transferred: 0,
        }
    }
}

/// A failed access to the data buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("data buffer: {0}")]
pub struct BufferError(pub String);

/// The command's data buffer (guest memory in storvsc; a `Vec` in tests).
pub trait DataBuffer {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), BufferError>;
    fn write_at(&mut self, offset: usize, data: &[u8]) -> Result<(), BufferError>;
}

impl DataBuffer for Vec<u8> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), BufferError> {
        let src = offset
            .checked_add(buf.len())
            .and_then(|end| self.get(offset..end))
            .ok_or_else(|| BufferError(format!("read at {offset} past {}", self.len())))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&mut self, offset: usize, data: &[u8]) -> Result<(), BufferError> {
        let n = self.as_slice().len();
        let dst = offset
            .checked_add(data.len())
            .and_then(|end| self.get_mut(offset..end))
            .ok_or_else(|| BufferError(format!("write at {offset} past {n}")))?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScsiError {
    #[error("unsupported logical sector size {0}")]
    SectorSize(u32),
    #[error("disk of {0} bytes is smaller than one sector")]
    TooSmall(u64),
    #[error("LUN {0} already exists")]
    DuplicateLun(u8),
    #[error("LUN {0} is outside 0..={max}", max = MAX_LUN)]
    LunOutOfRange(u8),
}

pub(crate) fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
pub(crate) fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// Minimum CDB length for an operation code (by its group).
pub fn cdb_length(op: u8) -> usize {
    match op >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 6,
    }
}

/// Copies `data` (truncated to `alloc` and to the buffer) into the data-in buffer.
pub(crate) fn respond(buf: &mut dyn DataBuffer, data: &[u8], alloc: usize) -> Completion {
    let n = data.len().min(alloc).min(buf.len());
    match buf.write_at(0, &data[..n]) {
        Ok(()) => Completion::Good { transferred: n },
        Err(e) => Completion::HostError(e.to_string()),
    }
}

/// Reads `len` bytes at byte offset `off` of `disk` into the data buffer, in chunks of at most
/// 1 MiB through `scratch`. A failed read is CHECK CONDITION with its sense
/// ([`Sense::of_disk_error`]) and the bytes moved before it.
pub(crate) fn read_to_buffer(
    disk: &Disk,
    off: u64,
    len: usize,
    scratch: &mut Vec<u8>,
    buf: &mut dyn DataBuffer,
) -> Completion {
    scratch.resize(len.min(CHUNK), 0);
    let mut done = 0;
    while done < len {
        let k = (len - done).min(CHUNK);
        if let Err(e) = disk.read_at(&mut scratch[..k], off + done as u64) {
            return Completion::Check {
                sense: Sense::of_disk_error(&e, false),
                transferred: done,
            };
        }
        if let Err(e) = buf.write_at(done, &scratch[..k]) {
            return Completion::HostError(e.to_string());
        }
        done += k;
    }
    Completion::Good { transferred: len }
}

/// One logical unit backed by a block device.
#[derive(Debug)]
pub struct ScsiDisk {
    disk: Disk,
    block_size: u32,
    blocks: u64,
    phys_exp: u8,
    read_only: bool,
    serial: String,
    naa: [u8; 16],
    max_transfer: u32,
    write_cache: bool,
    scratch: Vec<u8>,
}

impl ScsiDisk {
    /// Wraps a disk; the logical/physical sector sizes come from the disk.
    pub fn new(disk: impl Into<Disk>) -> Result<Self, ScsiError> {
        let disk: Disk = disk.into();
        let bs = disk.logical_sector_size();
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
            return Err(ScsiError::SectorSize(bs));
        }
        let size = disk.size();
        if size < bs as u64 {
            return Err(ScsiError::TooSmall(size));
        }
        let phys = disk.physical_sector_size().max(bs);
        let phys_exp = if phys.is_power_of_two() {
            (phys / bs).trailing_zeros().min(15) as u8
        } else {
            0
        };
        let read_only = disk.read_only();
        Ok(ScsiDisk {
            block_size: bs,
            blocks: size / bs as u64,
            phys_exp,
            read_only,
            serial: "VIRIDIAN0000".into(),
            naa: [0x60, 0x02, 0x24, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            max_transfer: DEFAULT_MAX_TRANSFER,
            write_cache: true,
            disk,
            scratch: Vec::new(),
        })
    }

    /// Sets the serial number (VPD 0x80) and derives the NAA identifier (VPD 0x83) from it.
    pub fn with_serial(mut self, serial: &str) -> Self {
        self.serial = serial
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(32)
            .collect();
        // FNV-1a over the serial fills the vendor-specific part of an NAA-6 identifier.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.serial.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        let h2 = h.rotate_left(29).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.naa = [0; 16];
        self.naa[0] = 0x60; // NAA 6, then an OUI-like prefix and the hash
        self.naa[1] = 0x02;
        self.naa[2] = 0x24;
        self.naa[3] = 0x80;
        self.naa[4..12].copy_from_slice(&h.to_be_bytes());
        self.naa[12..16].copy_from_slice(&h2.to_be_bytes()[..4]);
        self
    }

    /// Sets the maximum transfer size reported in VPD B0 (bytes, rounded to blocks).
    pub fn with_max_transfer(mut self, bytes: u32) -> Self {
        self.max_transfer = bytes.max(self.block_size);
        self
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
    }
    /// The serial number (VPD page 0x80).
    pub fn serial(&self) -> &str {
        &self.serial
    }
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    fn unmap_supported(&self) -> bool {
        !self.read_only
    }

    fn range(&self, lba: u64, n: u64) -> Result<(u64, u64), Sense> {
        match lba.checked_add(n) {
            Some(end) if end <= self.blocks => {
                Ok((lba * self.block_size as u64, n * self.block_size as u64))
            }
            _ => Err(Sense::LBA_OUT_OF_RANGE),
        }
    }

    /// Executes one command addressed to this LUN.
    pub fn execute(&mut self, cdb: &[u8], buf: &mut dyn DataBuffer) -> Completion {
        let Some(&op) = cdb.first() else {
            return Completion::check(Sense::INVALID_OPCODE);
        };
        if cdb.len() < cdb_length(op) {
            return Completion::check(Sense::INVALID_FIELD_IN_CDB);
        }
        match op {
            TEST_UNIT_READY | START_STOP_UNIT | PREVENT_ALLOW => {
                Completion::Good { transferred: 0 }
            }
            REQUEST_SENSE => Sense::NO_SENSE.respond_to_request(cdb, buf),
            INQUIRY => self.inquiry(cdb, buf),
            MODE_SENSE_6 | MODE_SENSE_10 => self.mode_sense(cdb, buf),
            READ_CAPACITY_10 => {
                let last = (self.blocks - 1).min(0xFFFF_FFFF) as u32;
                let mut d = [0u8; 8];
                d[0..4].copy_from_slice(&last.to_be_bytes());
                d[4..8].copy_from_slice(&self.block_size.to_be_bytes());
                respond(buf, &d, 8)
            }
            SERVICE_ACTION_IN_16 if cdb[1] & 0x1F == SA_READ_CAPACITY_16 => {
                let mut d = [0u8; 32];
                d[0..8].copy_from_slice(&(self.blocks - 1).to_be_bytes());
                d[8..12].copy_from_slice(&self.block_size.to_be_bytes());
                d[13] = self.phys_exp & 0x0F;
                if self.unmap_supported() {
                    // LBPME, LBPRZ: UNMAP is done as write-zeroes with may_unmap, whose
                    // contract is that the range reads as zeros afterwards, whatever the
                    // format (a differencing layer hides its parent there).
                    d[14] = 0x80 | 0x40;
                }
                respond(buf, &d, be32(cdb, 10) as usize)
            }
            READ_6 | READ_10 | READ_12 | READ_16 => match self.rw_params(cdb) {
                Ok((lba, n, _)) => self.read(lba, n, buf),
                Err(s) => Completion::check(s),
            },
            WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16 => match self.rw_params(cdb) {
                Ok((lba, n, fua)) => self.write(lba, n, fua, buf),
                Err(s) => Completion::check(s),
            },
            VERIFY_10 | VERIFY_16 => {
                let (lba, n) = if op == VERIFY_10 {
                    (be32(cdb, 2) as u64, be16(cdb, 7) as u64)
                } else {
                    (be64(cdb, 2), be32(cdb, 10) as u64)
                };
                match self.range(lba, n) {
                    Ok(_) => Completion::Good { transferred: 0 },
                    Err(s) => Completion::check(s),
                }
            }
            SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 => match self.disk.flush() {
                Ok(()) => Completion::Good { transferred: 0 },
                Err(e) => Completion::check(Sense::of_disk_error(&e, true)),
            },
            UNMAP => self.unmap(cdb, buf),
            WRITE_SAME_10 | WRITE_SAME_16 => self.write_same(cdb, buf),
            PERSISTENT_RESERVE_IN | PERSISTENT_RESERVE_OUT => {
                Completion::check(Sense::INVALID_OPCODE)
            }
            _ => Completion::check(Sense::INVALID_OPCODE),
        }
    }

    /// (lba, blocks, fua) of a READ/WRITE CDB.
    fn rw_params(&self, cdb: &[u8]) -> Result<(u64, u64, bool), Sense> {
        let fua = cdb[1] & 0x08 != 0;
        Ok(match cdb[0] {
            READ_6 | WRITE_6 => {
                let lba = ((cdb[1] as u64 & 0x1F) << 16) | be16(cdb, 2) as u64;
                let n = if cdb[4] == 0 { 256 } else { cdb[4] as u64 };
                (lba, n, false)
            }
            READ_10 | WRITE_10 => (be32(cdb, 2) as u64, be16(cdb, 7) as u64, fua),
            READ_12 | WRITE_12 => (be32(cdb, 2) as u64, be32(cdb, 6) as u64, fua),
            _ => (be64(cdb, 2), be32(cdb, 10) as u64, fua),
        })
    }

    fn transfer_len(&self, lba: u64, n: u64, buf: &dyn DataBuffer) -> Result<(u64, usize), Sense> {
        let (off, len) = self.range(lba, n)?;
        if len > buf.len() as u64 {
            // The CDB asks for more than the initiator's buffer holds.
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        Ok((off, len as usize))
    }

    fn read(&mut self, lba: u64, n: u64, buf: &mut dyn DataBuffer) -> Completion {
        let (off, len) = match self.transfer_len(lba, n, buf) {
            Ok(x) => x,
            Err(s) => return Completion::check(s),
        };
        read_to_buffer(&self.disk, off, len, &mut self.scratch, buf)
    }

    fn write(&mut self, lba: u64, n: u64, fua: bool, buf: &mut dyn DataBuffer) -> Completion {
        if self.read_only {
            return Completion::check(Sense::WRITE_PROTECTED);
        }
        let (off, len) = match self.transfer_len(lba, n, buf) {
            Ok(x) => x,
            Err(s) => return Completion::check(s),
        };
        self.scratch.resize(len.min(CHUNK), 0);
        let mut done = 0;
        while done < len {
            let k = (len - done).min(CHUNK);
            if let Err(e) = buf.read_at(done, &mut self.scratch[..k]) {
                return Completion::HostError(e.to_string());
            }
            if let Err(e) = self.disk.write_at(&self.scratch[..k], off + done as u64) {
                return Completion::Check {
                    sense: Sense::of_disk_error(&e, true),
                    transferred: done,
                };
            }
            done += k;
        }
        if fua {
            if let Err(e) = self.disk.flush() {
                return Completion::check(Sense::of_disk_error(&e, true));
            }
        }
        Completion::Good { transferred: len }
    }

    fn unmap(&mut self, cdb: &[u8], buf: &mut dyn DataBuffer) -> Completion {
        if self.read_only {
            return Completion::check(Sense::WRITE_PROTECTED);
        }
        let plen = be16(cdb, 7) as usize;
        if plen == 0 {
            return Completion::Good { transferred: 0 };
        }
        if plen < 8 {
            return Completion::check(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        if plen > buf.len() {
            return Completion::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let mut list = vec![0u8; plen];
        if let Err(e) = buf.read_at(0, &mut list) {
            return Completion::HostError(e.to_string());
        }
        let bd_len = be16(&list, 2) as usize;
        let count = bd_len.min(plen - 8) / 16;
        if count > MAX_UNMAP_DESCRIPTORS as usize {
            return Completion::check(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        // Check every descriptor before changing anything.
        let mut ranges = Vec::with_capacity(count);
        for i in 0..count {
            let d = &list[8 + 16 * i..8 + 16 * (i + 1)];
            let (lba, n) = (be64(d, 0), be32(d, 8));
            if n > MAX_UNMAP_BLOCKS {
                return Completion::check(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
            }
            match self.range(lba, n as u64) {
                Ok(r) => ranges.push(r),
                Err(s) => return Completion::check(s),
            }
        }
        for (off, len) in ranges {
            if len == 0 {
                continue;
            }
            // may_unmap keeps LBPRZ true: the range reads as zeros afterwards.
            if let Err(e) = self
                .disk
                .write_zeroes(off, len, ZeroFlags { may_unmap: true })
            {
                return Completion::check(Sense::of_disk_error(&e, true));
            }
        }
        Completion::Good { transferred: plen }
    }

    fn write_same(&mut self, cdb: &[u8], buf: &mut dyn DataBuffer) -> Completion {
        if self.read_only {
            return Completion::check(Sense::WRITE_PROTECTED);
        }
        let unmap = cdb[1] & 0x08 != 0;
        let (lba, n, ndob) = if cdb[0] == WRITE_SAME_10 {
            (be32(cdb, 2) as u64, be16(cdb, 7) as u64, false)
        } else {
            (be64(cdb, 2), be32(cdb, 10) as u64, cdb[1] & 0x01 != 0)
        };
        if n == 0 || n > MAX_UNMAP_BLOCKS as u64 {
            return Completion::check(Sense::INVALID_FIELD_IN_CDB); // WSNZ = 1
        }
        let (off, len) = match self.range(lba, n) {
            Ok(r) => r,
            Err(s) => return Completion::check(s),
        };
        let bs = self.block_size as usize;
        let mut block = vec![0u8; bs];
        if !ndob {
            if buf.len() < bs {
                return Completion::check(Sense::INVALID_FIELD_IN_CDB);
            }
            if let Err(e) = buf.read_at(0, &mut block) {
                return Completion::HostError(e.to_string());
            }
        }
        let transferred = if ndob { 0 } else { bs };
        let r = if disk::is_zero(&block) {
            self.disk
                .write_zeroes(off, len, ZeroFlags { may_unmap: unmap })
        } else {
            let per = (CHUNK / bs).max(1);
            let pattern: Vec<u8> = block.repeat(per.min(n as usize));
            let mut done = 0u64;
            let mut r = Ok(());
            while done < len && r.is_ok() {
                let k = (len - done).min(pattern.len() as u64) as usize;
                r = self.disk.write_at(&pattern[..k], off + done);
                done += k as u64;
            }
            r
        };
        match r {
            Ok(()) => Completion::Good { transferred },
            Err(e) => Completion::check(Sense::of_disk_error(&e, true)),
        }
    }

    fn inquiry(&self, cdb: &[u8], buf: &mut dyn DataBuffer) -> Completion {
        let evpd = cdb[1] & 1 != 0;
        let page = cdb[2];
        let alloc = be16(cdb, 3) as usize;
        if cdb[1] & 0xFE != 0 || (!evpd && page != 0) {
            return Completion::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if !evpd {
            return respond(buf, &standard_inquiry(0x00, true), alloc);
        }
        let mut d = vec![0u8; 4];
        d[1] = page;
        match page {
            0x00 => d.extend_from_slice(&[0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]),
            0x80 => d.extend_from_slice(self.serial.as_bytes()),
            0x83 => {
                d.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
                d.extend_from_slice(&self.naa);
                let mut t10 = b"Msft    ".to_vec();
                t10.extend_from_slice(self.serial.as_bytes());
                d.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
                d.extend_from_slice(&t10);
            }
            0xB0 => {
                d.resize(64, 0);
                d[4] = 0x01; // WSNZ
                let per_phys = 1u16 << self.phys_exp;
                d[6..8].copy_from_slice(&per_phys.to_be_bytes());
                let max_blocks = self.max_transfer / self.block_size;
                d[8..12].copy_from_slice(&max_blocks.to_be_bytes());
                if self.unmap_supported() {
                    d[20..24].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
                    d[24..28].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                    d[28..32].copy_from_slice(&(per_phys as u32).to_be_bytes());
                    d[32..36].copy_from_slice(&0x8000_0000u32.to_be_bytes());
                }
                d[36..44].copy_from_slice(&(MAX_UNMAP_BLOCKS as u64).to_be_bytes());
            }
            0xB1 => {
                d.resize(64, 0);
                d[4..6].copy_from_slice(&1u16.to_be_bytes()); // non-rotating
            }
            0xB2 => {
                d.resize(8, 0);
                if self.unmap_supported() {
                    // LBPU, LBPWS, LBPWS10, LBPRZ; thin provisioned.
                    d[5] = 0x80 | 0x40 | 0x20 | 0x04;
                    d[6] = 0x02;
                }
            }
            _ => return Completion::check(Sense::INVALID_FIELD_IN_CDB),
        }
        let n = (d.len() - 4) as u16;
        d[2..4].copy_from_slice(&n.to_be_bytes());
        respond(buf, &d, alloc)
    }

    fn mode_sense(&self, cdb: &[u8], buf: &mut dyn DataBuffer) -> Completion {
        let ten = cdb[0] == MODE_SENSE_10;
        let pc = cdb[2] >> 6;
        let page = cdb[2] & 0x3F;
        let subpage = cdb[3];
        let alloc = if ten {
            be16(cdb, 7) as usize
        } else {
            cdb[4] as usize
        };
        if pc == 3 {
            return Completion::check(Sense::SAVING_PARAMETERS_NOT_SUPPORTED);
        }
        let changeable = pc == 1;
        let caching = {
            let mut p = [0u8; 20];
            p[0] = 0x08;
            p[1] = 0x12;
            if self.write_cache && !changeable {
                p[2] = 0x04; // WCE
            }
            p
        };
        let control = {
            let mut p = [0u8; 12];
            p[0] = 0x0A;
            p[1] = 0x0A;
            p
        };
        let mut pages = Vec::new();
        match (page, subpage) {
            (0x08, 0) => pages.extend_from_slice(&caching),
            (0x0A, 0) => pages.extend_from_slice(&control),
            (0x3F, 0) | (0x3F, 0xFF) => {
                pages.extend_from_slice(&caching);
                pages.extend_from_slice(&control);
            }
            _ => return Completion::check(Sense::INVALID_FIELD_IN_CDB),
        }
        let dev_specific = if self.read_only { 0x80 } else { 0 } | 0x10; // WP, DPOFUA
        let mut d = Vec::with_capacity(8 + pages.len());
        if ten {
            let len = (6 + pages.len()) as u16;
            d.extend_from_slice(&len.to_be_bytes());
            d.extend_from_slice(&[0, dev_specific, 0, 0, 0, 0]);
        } else {
            d.extend_from_slice(&[(3 + pages.len()) as u8, 0, dev_specific, 0]);
        }
        d.extend_from_slice(&pages);
        respond(buf, &d, alloc)
    }
}

/// Standard INQUIRY data. `present = false` gives the "no device here" answer (PQ 3).
fn standard_inquiry(peripheral: u8, ids: bool) -> [u8; 74] {
    let mut d = [0u8; 74];
    d[0] = peripheral;
    d[2] = 0x05; // SPC-3
    d[3] = 0x02; // response data format 2
    d[4] = (d.len() - 5) as u8;
    d[7] = 0x02; // CmdQue
    if ids {
        d[8..16].copy_from_slice(b"Msft    ");
        d[16..32].copy_from_slice(b"Virtual Disk    ");
        d[32..36].copy_from_slice(b"1.0 ");
    }
    // Version descriptors: SAM-4, SPC-3, SBC-3.
    d[58..60].copy_from_slice(&0x0080u16.to_be_bytes());
    d[60..62].copy_from_slice(&0x0300u16.to_be_bytes());
    d[62..64].copy_from_slice(&0x04C0u16.to_be_bytes());
    d
}

/// One logical unit of a controller: a disk or a DVD drive.
#[derive(Debug)]
pub enum Lun {
    Disk(ScsiDisk),
    Cdrom(ScsiCdrom),
}

impl From<ScsiDisk> for Lun {
    fn from(d: ScsiDisk) -> Lun {
        Lun::Disk(d)
    }
}

impl From<ScsiCdrom> for Lun {
    fn from(d: ScsiCdrom) -> Lun {
        Lun::Cdrom(d)
    }
}

impl Lun {
    /// The image behind the LUN (a DVD drive's medium, when it holds one).
    pub fn image(&self) -> Option<&Disk> {
        match self {
            Lun::Disk(d) => Some(d.disk()),
            Lun::Cdrom(c) => c.medium(),
        }
    }

    pub fn execute(&mut self, cdb: &[u8], buf: &mut dyn DataBuffer) -> Completion {
        match self {
            Lun::Disk(d) => d.execute(cdb, buf),
            Lun::Cdrom(c) => c.execute(cdb, buf),
        }
    }

    pub fn as_cdrom_mut(&mut self) -> Option<&mut ScsiCdrom> {
        match self {
            Lun::Cdrom(c) => Some(c),
            Lun::Disk(_) => None,
        }
    }
}

/// A SCSI controller: LUNs at path 0, target 0 (as Hyper-V places them for Linux).
///
/// LUNs can be added and removed at any time (hot-plug); each change sets a flag that the
/// transport turns into a bus-change notice to the guest ([`Self::take_bus_changed`]).
///
/// A guest learns of a removal only by asking the LUN (Linux: TEST UNIT READY to every device
/// it knows when the notice comes) and getting "no such LUN". So a LUN number the guest knew
/// is *fenced* when its unit is removed: until the guest probes that number afresh (a standard
/// INQUIRY, which Linux sends only where it holds no device), every other command to it
/// answers "no such LUN", even if the host has put a new unit there meanwhile. Without the
/// fence a quick remove and re-add at one number looks to the guest like nothing happened: it
/// keeps the old device (and would send its I/O to the new image) and never attaches the new
/// one. While a new unit waits behind a fence, every "no such LUN" answer there raises the
/// notice again: the guest queues the removal of its old device on that answer and a scan on
/// the notice, so one of its scans runs after the removal and finds the new unit (a scan
/// queued earlier asks the old device again, which repeats this).
#[derive(Debug, Default)]
pub struct ScsiController {
    luns: BTreeMap<u8, Lun>,
    bus_changed: bool,
    /// LUN numbers (bit n = LUN n) whose current unit answered the guest.
    known: u64,
    /// LUN numbers fenced after the removal of a unit the guest knew.
    fenced: u64,
    /// Fence changes not yet taken, recorded only while tracing is on.
    trace: Option<Vec<String>>,
}

fn bit(lun: u8) -> u64 {
    1u64 << (lun & 63)
}

impl ScsiController {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_lun(&mut self, lun: u8, unit: impl Into<Lun>) -> Result<(), ScsiError> {
        if lun > MAX_LUN {
            return Err(ScsiError::LunOutOfRange(lun));
        }
        if self.luns.contains_key(&lun) {
            return Err(ScsiError::DuplicateLun(lun));
        }
        self.luns.insert(lun, unit.into());
        self.known &= !bit(lun);
        self.bus_changed = true;
        Ok(())
    }

    /// Takes a LUN off the bus. From now on it answers as a LUN that does not exist, so the
    /// guest deletes its device on its next command or rescan. The caller flushes and closes
    /// the returned unit's image.
    pub fn remove_lun(&mut self, lun: u8) -> Option<Lun> {
        let unit = self.luns.remove(&lun)?;
        if self.known & bit(lun) != 0 {
            self.fenced |= bit(lun);
        }
        self.known &= !bit(lun);
        self.bus_changed = true;
        Some(unit)
    }

    /// Whether LUNs were added or removed since the last call (or a fenced LUN number became
    /// free for the unit waiting there, see the type's documentation).
    pub fn take_bus_changed(&mut self) -> bool {
        std::mem::take(&mut self.bus_changed)
    }

    /// The guest (re)initialised the controller: it holds no devices, so nothing is fenced.
    pub fn guest_reset(&mut self) {
        self.known = 0;
        self.fenced = 0;
    }

    /// Whether LUN `lun` is fenced: its old unit was removed and the guest has not probed the
    /// number afresh yet.
    pub fn is_fenced(&self, lun: u8) -> bool {
        lun <= MAX_LUN && self.fenced & bit(lun) != 0
    }

    /// Records fence changes for [`Self::take_trace`] (off by default).
    pub fn set_trace(&mut self, on: bool) {
        self.trace = on.then(Vec::new);
    }

    /// Lines describing fence changes since the last call (empty unless tracing is on).
    pub fn take_trace(&mut self) -> Vec<String> {
        self.trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn note(&mut self, line: impl FnOnce() -> String) {
        if let Some(t) = &mut self.trace {
            t.push(line());
        }
    }

    /// Sets the maximum transfer size (VPD B0) of every disk LUN.
    pub fn set_max_transfer(&mut self, bytes: u32) {
        for d in self.luns.values_mut() {
            if let Lun::Disk(d) = d {
                d.max_transfer = bytes.max(d.block_size);
            }
        }
    }

    pub fn lun(&self, lun: u8) -> Option<&Lun> {
        self.luns.get(&lun)
    }

    pub fn lun_mut(&mut self, lun: u8) -> Option<&mut Lun> {
        self.luns.get_mut(&lun)
    }

    pub fn luns(&self) -> impl Iterator<Item = (u8, &Lun)> {
        self.luns.iter().map(|(l, d)| (*l, d))
    }

    pub fn luns_mut(&mut self) -> impl Iterator<Item = (u8, &mut Lun)> {
        self.luns.iter_mut().map(|(l, d)| (*l, d))
    }

    /// Executes one command for (path, target, lun).
    pub fn execute(
        &mut self,
        path: u8,
        target: u8,
        lun: u8,
        cdb: &[u8],
        buf: &mut dyn DataBuffer,
    ) -> Completion {
        let target_present = path == 0 && target == 0;
        if cdb.first() == Some(&REPORT_LUNS) && cdb.len() >= cdb_length(REPORT_LUNS) {
            // Every LUN of the target, whichever LUN the command is addressed to.
            let luns: Vec<u8> = if target_present {
                self.luns.keys().copied().collect()
            } else {
                Vec::new()
            };
            return self.report_luns(cdb, buf, &luns);
        }
        let standard_inquiry = cdb.first() == Some(&INQUIRY) && cdb.len() >= 6 && cdb[1] & 1 == 0;
        if target_present && self.is_fenced(lun) && standard_inquiry {
            // A fresh probe: the guest holds no device at this number any more.
            self.fenced &= !bit(lun);
            self.note(|| format!("LUN {lun}: fence lifted by INQUIRY"));
        }
        if target_present && !self.is_fenced(lun) {
            if let Some(d) = self.luns.get_mut(&lun) {
                self.known |= bit(lun);
                return d.execute(cdb, buf);
            }
        }
        let outcome = Self::no_lun(lun, cdb, buf);
        if target_present
            && outcome == Completion::NoLun
            && self.is_fenced(lun)
            && self.luns.contains_key(&lun)
        {
            // The guest drops its old device here; the notice makes it scan again after that
            // and find the unit waiting behind the fence.
            self.bus_changed = true;
            self.note(|| {
                format!(
                    "LUN {lun}: old device answered 'no such LUN', notice again for the new unit"
                )
            });
        }
        outcome
    }

    /// The answer of a LUN with nothing (visible) behind it.
    fn no_lun(lun: u8, cdb: &[u8], buf: &mut dyn DataBuffer) -> Completion {
        let Some(&op) = cdb.first() else {
            return Completion::NoLun;
        };
        if cdb.len() < cdb_length(op) {
            return Completion::check(Sense::INVALID_FIELD_IN_CDB);
        }
        match op {
            INQUIRY if cdb[1] & 1 == 0 => {
                // Peripheral qualifier 3, type 0x1F: nothing here. Vendor strings only at LUN 0.
                respond(
                    buf,
                    &standard_inquiry(0x7F, lun == 0),
                    be16(cdb, 3) as usize,
                )
            }
            INQUIRY => Completion::check(Sense::INVALID_FIELD_IN_CDB),
            REQUEST_SENSE => Sense::LUN_NOT_SUPPORTED.respond_to_request(cdb, buf),
            _ => Completion::NoLun,
        }
    }

    fn report_luns(&self, cdb: &[u8], buf: &mut dyn DataBuffer, luns: &[u8]) -> Completion {
        let alloc = be32(cdb, 6) as usize;
        if alloc < 16 || cdb[2] > 2 {
            return Completion::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let mut d = vec![0u8; 8 + 8 * luns.len()];
        d[0..4].copy_from_slice(&((8 * luns.len()) as u32).to_be_bytes());
        for (i, l) in luns.iter().enumerate() {
            d[8 + 8 * i + 1] = *l; // peripheral device addressing, bus 0
        }
        respond(buf, &d, alloc)
    }
}

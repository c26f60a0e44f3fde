//! A SCSI DVD-ROM drive (peripheral device type 5, MMC subset) over any read-only image.
//!
//! Hyper-V gives Generation 2 guests their DVD drives as LUNs of the synthetic SCSI controller;
//! this is that LUN. The medium is any [`Disk`] (an ISO file, or a VHD/VHDX holding one) seen as
//! 2048-byte blocks. The drive keeps a tray/medium state machine driven from both sides:
//!
//! * the guest: START STOP UNIT (eject, load), PREVENT ALLOW MEDIUM REMOVAL;
//! * the host: [`ScsiCdrom::host_eject`], [`ScsiCdrom::host_insert`] (a control socket).
//!
//! Medium changes reach the guest the two ways MMC guests look for them: a UNIT ATTENTION
//! (06/28/00, "not ready to ready change, medium may have changed") on the next command, and a
//! media-class event for polled GET EVENT STATUS NOTIFICATION. The commands answered are those
//! Linux's sr driver and Windows' cdrom class driver issue; see docs/scsi-dvd-hotplug.md.

use disk::Disk;

use crate::scsi::{be16, be32, opcode::*, read_to_buffer, respond, Completion, DataBuffer, Sense};

/// Block size of the optical medium.
pub const CD_BLOCK: u32 = 2048;

/// MMC operation codes handled here beyond the SPC/SBC ones in [`crate::scsi::opcode`].
pub mod mmc {
    pub const READ_TOC: u8 = 0x43;
    pub const GET_CONFIGURATION: u8 = 0x46;
    pub const GET_EVENT_STATUS_NOTIFICATION: u8 = 0x4A;
    pub const READ_DISC_INFORMATION: u8 = 0x51;
    pub const READ_TRACK_INFORMATION: u8 = 0x52;
    /// DVD-ROM profile (GET CONFIGURATION).
    pub const PROFILE_DVD_ROM: u16 = 0x0010;
    /// CD-ROM profile (listed, never current: the medium is presented as a DVD).
    pub const PROFILE_CD_ROM: u16 = 0x0008;
}
use mmc::*;

/// Media-class event codes of GET EVENT STATUS NOTIFICATION.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaEvent {
    /// The host asked for the medium to be ejected (the guest holds it locked).
    EjectRequest = 1,
    /// A medium was loaded.
    NewMedia = 2,
    /// The medium was taken out.
    MediaRemoval = 3,
}

/// How many media events of each kind the guest has fetched (each is delivered once): shows
/// the host that the guest saw a medium change or an eject request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MediaEventCounts {
    pub eject_request: u64,
    pub new_media: u64,
    pub media_removal: u64,
}

/// Why a host-side medium operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CdromError {
    #[error("the guest has locked the tray (an eject request was sent to it)")]
    Locked,
    #[error("the medium is {0} bytes, less than one 2048-byte block")]
    TooSmall(u64),
}

/// One DVD-ROM drive.
#[derive(Debug)]
pub struct ScsiCdrom {
    medium: Option<Disk>,
    tray_open: bool,
    prevent: bool,
    unit_attention: Option<Sense>,
    event: Option<MediaEvent>,
    /// Tray movements the guest made (true = opened), for the host to report.
    tray_moves: Vec<bool>,
    /// Media events the guest has fetched with GET EVENT STATUS NOTIFICATION, by kind.
    fetched: MediaEventCounts,
    serial: String,
    scratch: Vec<u8>,
}

impl Default for ScsiCdrom {
    fn default() -> Self {
        Self::empty()
    }
}

impl ScsiCdrom {
    /// A drive with its tray closed and no medium.
    pub fn empty() -> Self {
        ScsiCdrom {
            medium: None,
            tray_open: false,
            prevent: false,
            unit_attention: None,
            event: None,
            tray_moves: Vec::new(),
            fetched: MediaEventCounts::default(),
            serial: "VIRIDIANDVD0".into(),
            scratch: Vec::new(),
        }
    }

    /// A drive holding `medium` (tray closed). The medium is read through its request layer;
    /// a writable one is not written (no write command is accepted).
    pub fn new(medium: impl Into<Disk>) -> Result<Self, CdromError> {
        let medium = medium.into();
        check_medium(&medium)?;
        let mut d = Self::empty();
        d.medium = Some(medium);
        Ok(d)
    }

    pub fn with_serial(mut self, serial: &str) -> Self {
        self.serial = serial
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(32)
            .collect();
        self
    }

    /// The medium, loaded or in an open tray.
    pub fn medium(&self) -> Option<&Disk> {
        self.medium.as_ref()
    }
    pub fn tray_open(&self) -> bool {
        self.tray_open
    }
    /// The guest prevents medium removal.
    pub fn locked(&self) -> bool {
        self.prevent
    }
    /// Blocks of the loaded medium (0 when none is loaded).
    pub fn blocks(&self) -> u64 {
        self.loaded().map_or(0, |d| d.size() / CD_BLOCK as u64)
    }

    /// The media events the guest has fetched so far.
    pub fn media_events_fetched(&self) -> MediaEventCounts {
        self.fetched
    }

    /// Tray movements made by the guest since the last call (true = opened).
    pub fn take_tray_moves(&mut self) -> Vec<bool> {
        std::mem::take(&mut self.tray_moves)
    }

    fn loaded(&self) -> Option<&Disk> {
        if self.tray_open {
            None
        } else {
            self.medium.as_ref()
        }
    }

    fn not_present(&self) -> Sense {
        if self.tray_open {
            Sense::MEDIUM_NOT_PRESENT_TRAY_OPEN
        } else {
            Sense::MEDIUM_NOT_PRESENT_TRAY_CLOSED
        }
    }

    /// The host ejects the medium: the tray opens and the medium is taken out and returned
    /// (flush and close it). With the tray locked by the guest and `force` false, nothing
    /// changes: the guest gets an eject-request event and the call fails.
    pub fn host_eject(&mut self, force: bool) -> Result<Option<Disk>, CdromError> {
        if self.prevent && !force {
            self.event = Some(MediaEvent::EjectRequest);
            return Err(CdromError::Locked);
        }
        let old = self.medium.take();
        self.tray_open = true;
        if old.is_some() {
            self.event = Some(MediaEvent::MediaRemoval);
        }
        Ok(old)
    }

    /// The host puts `medium` in and closes the tray; the guest sees a UNIT ATTENTION and a
    /// new-media event. A medium already in the drive is taken out first (same lock rule as
    /// [`Self::host_eject`]) and returned. An open tray takes a medium whatever the lock says
    /// (as QEMU's: the lock only keeps a closed tray closed).
    pub fn host_insert(&mut self, medium: Disk, force: bool) -> Result<Option<Disk>, CdromError> {
        check_medium(&medium)?;
        let old = if self.tray_open {
            self.medium.take()
        } else {
            self.host_eject(force)?
        };
        self.medium = Some(medium);
        self.tray_open = false;
        self.unit_attention = Some(Sense::MEDIUM_CHANGED);
        self.event = Some(MediaEvent::NewMedia);
        Ok(old)
    }

    /// Executes one command addressed to this LUN.
    pub fn execute(&mut self, cdb: &[u8], buf: &mut dyn DataBuffer) -> Completion {
        let Some(&op) = cdb.first() else {
            return Completion::check(Sense::INVALID_OPCODE);
        };
        if cdb.len() < crate::scsi::cdb_length(op) {
            return Completion::check(Sense::INVALID_FIELD_IN_CDB);
        }
        // A pending unit attention answers any command but these, and is then cleared.
        if !matches!(op, INQUIRY | REQUEST_SENSE | GET_EVENT_STATUS_NOTIFICATION) {
            if let Some(s) = self.unit_attention.take() {
                return Completion::check(s);
            }
        }
        match op {
            TEST_UNIT_READY => match self.loaded() {
                Some(_) => Completion::Good { transferred: 0 },
                None => Completion::check(self.not_present()),
            },
            REQUEST_SENSE => {
                let s = self.unit_attention.take().unwrap_or(match self.loaded() {
                    Some(_) => Sense::NO_SENSE,
                    None => self.not_present(),
                });
                s.respond_to_request(cdb, buf)
            }
            INQUIRY => self.inquiry(cdb, buf),
            MODE_SENSE_6 | MODE_SENSE_10 => self.mode_sense(cdb, buf),
            START_STOP_UNIT => self.start_stop(cdb),
            PREVENT_ALLOW => {
                self.prevent = cdb[4] & 0x01 != 0;
                Completion::Good { transferred: 0 }
            }
            READ_CAPACITY_10 => match self.loaded() {
                Some(_) => {
                    let last = (self.blocks() - 1).min(0xFFFF_FFFF) as u32;
                    let mut d = [0u8; 8];
                    d[0..4].copy_from_slice(&last.to_be_bytes());
                    d[4..8].copy_from_slice(&CD_BLOCK.to_be_bytes());
                    respond(buf, &d, 8)
                }
                None => Completion::check(self.not_present()),
            },
            READ_10 | READ_12 => {
                let lba = be32(cdb, 2) as u64;
                let n = if op == READ_10 {
                    be16(cdb, 7) as u64
                } else {
                    be32(cdb, 6) as u64
                };
                self.read(lba, n, buf)
            }
            READ_TOC => self.read_toc(cdb, buf),
            READ_DISC_INFORMATION => self.disc_information(cdb, buf),
            READ_TRACK_INFORMATION => self.track_information(cdb, buf),
            GET_CONFIGURATION => self.get_configuration(cdb, buf),
            GET_EVENT_STATUS_NOTIFICATION => self.event_status(cdb, buf),
            SYNCHRONIZE_CACHE_10 => Completion::Good { transferred: 0 },
            WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16 => Completion::check(Sense::WRITE_PROTECTED),
            _ => Completion::check(Sense::INVALID_OPCODE),
        }
    }

    fn read(&mut self, lba: u64, n: u64, buf: &mut dyn DataBuffer) -> Completion {
        let Some(disk) = self.loaded() else {
            return Completion::check(self.not_present());
        };
        let blocks = disk.size() / CD_BLOCK as u64;
        match lba.checked_add(n) {
            Some(end) if end <= blocks => {}
            _ => return Completion::check(Sense::LBA_OUT_OF_RANGE),
        }
        let len = n * CD_BLOCK as u64;
        if len > buf.len() as u64 {
            return Completion::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let (off, len) = (lba * CD_BLOCK as u64, len as usize);
        let disk = disk.clone();
        read_to_buffer(&disk, off, len, &mut self.scratch, buf)
    }

    fn start_stop(&mut self, cdb: &[u8]) -> Completion {
        let (loej, start) = (cdb[4] & 0x02 != 0, cdb[4] & 0x01 != 0);
        if !loej {
            // Spin up/down: nothing to do for an image.
            return Completion::Good { transferred: 0 };
        }
        if start {
            if self.tray_open {
                self.tray_open = false;
                self.tray_moves.push(false);
                if self.medium.is_some() {
                    self.event = Some(MediaEvent::NewMedia);
                }
            }
        } else {
            if self.prevent {
                return Completion::check(Sense::MEDIUM_REMOVAL_PREVENTED);
            }
            if !self.tray_open {
                self.tray_open = true;
                self.tray_moves.push(true);
                if self.medium.is_some() {
                    self.event = Some(MediaEvent::MediaRemoval);
                }
            }
        }
        Completion::Good { transferred: 0 }
    }

    fn inquiry(&self, cdb: &[u8], buf: &mut dyn DataBuffer) -> Completion {
        let evpd = cdb[1] & 1 != 0;
        let page = cdb[2];
        let alloc = be16(cdb, 3) as usize;
        if cdb[1] & 0xFE != 0 || (!evpd && page != 0) {
            return Completion::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if !evpd {
            let mut d = [0u8; 74];
            d[0] = 0x05; // CD/DVD device
            d[1] = 0x80; // RMB: removable medium
            d[2] = 0x05; // SPC-3
            d[3] = 0x02;
            d[4] = (d.len() - 5) as u8;
            d[8..16].copy_from_slice(b"Msft    ");
            d[16..32].copy_from_slice(b"Virtual DVD-ROM ");
            d[32..36].copy_from_slice(b"1.0 ");
            // Version descriptors: SAM-4, SPC-3, MMC-5.
            d[58..60].copy_from_slice(&0x0080u16.to_be_bytes());
            d[60..62].copy_from_slice(&0x0300u16.to_be_bytes());
            d[62..64].copy_from_slice(&0x02A0u16.to_be_bytes());
            return respond(buf, &d, alloc);
        }
        let mut d = vec![0u8; 4];
        d[0] = 0x05;
        d[1] = page;
        match page {
            0x00 => d.extend_from_slice(&[0x00, 0x80]),
            0x80 => d.extend_from_slice(self.serial.as_bytes()),
            _ => return Completion::check(Sense::INVALID_FIELD_IN_CDB),
        }
        let n = (d.len() - 4) as u16;
        d[2..4].copy_from_slice(&n.to_be_bytes());
        respond(buf, &d, alloc)
    }

    /// The CD/DVD capabilities and mechanical status page (0x2A). Without it Linux calls the
    /// drive "scsi-1" and gives it no DVD capability.
    fn capabilities_page(&self, changeable: bool) -> [u8; 22] {
        let mut p = [0u8; 22];
        p[0] = 0x2A;
        p[1] = 0x14;
        if changeable {
            return p;
        }
        p[2] = 0x08 | 0x02 | 0x01; // reads DVD-ROM, CD-RW, CD-R media
        p[3] = 0x00; // writes nothing
        p[4] = 0x40 | 0x20 | 0x10; // multi-session, mode 2 form 2, mode 2 form 1
        p[5] = 0x00;
        // Tray loading mechanism, eject supported, lock supported, current lock state.
        p[6] = 0x20 | 0x08 | 0x01 | if self.prevent { 0x02 } else { 0 };
        let speed = 24u16 * 176; // kB/s, the 24x CD figure Linux prints
        p[8..10].copy_from_slice(&speed.to_be_bytes());
        p[14..16].copy_from_slice(&speed.to_be_bytes());
        p
    }

    fn mode_sense(&self, cdb: &[u8], buf: &mut dyn DataBuffer) -> Completion {
        let ten = cdb[0] == MODE_SENSE_10;
        let pc = cdb[2] >> 6;
        let page = cdb[2] & 0x3F;
        let alloc = if ten {
            be16(cdb, 7) as usize
        } else {
            cdb[4] as usize
        };
        if pc == 3 {
            return Completion::check(Sense::SAVING_PARAMETERS_NOT_SUPPORTED);
        }
        let pages = match (page, cdb[3]) {
            (0x2A, 0) | (0x3F, 0) | (0x3F, 0xFF) => self.capabilities_page(pc == 1),
            _ => return Completion::check(Sense::INVALID_FIELD_IN_CDB),
        };
        // Medium type 0x70 = "door closed, no disc"; 0 otherwise (MMC leaves it to the drive).
        let medium_type = if self.loaded().is_some() { 0x00 } else { 0x70 };
        let mut d = Vec::with_capacity(8 + pages.len());
        if ten {
            d.extend_from_slice(&((6 + pages.len()) as u16).to_be_bytes());
            d.extend_from_slice(&[medium_type, 0, 0, 0, 0, 0]);
        } else {
            d.extend_from_slice(&[(3 + pages.len()) as u8, medium_type, 0, 0]);
        }
        d.extend_from_slice(&pages);
        respond(buf, &d, alloc)
    }

    fn read_toc(&self, cdb: &[u8], buf: &mut dyn DataBuffer) -> Completion {
        if self.loaded().is_none() {
            return Completion::check(self.not_present());
        }
        let msf = cdb[1] & 0x02 != 0;
        // The format is in byte 2; older initiators put it in the top bits of byte 9.
        let format = match (cdb[2] & 0x0F, cdb[9] >> 6) {
            (0, old) => old,
            (f, _) => f,
        };
        let track = cdb[6];
        let alloc = be16(cdb, 7) as usize;
        let addr = |lba: u64| -> [u8; 4] {
            if msf {
                let f = lba + 150;
                [0, (f / 4500) as u8, (f / 75 % 60) as u8, (f % 75) as u8]
            } else {
                (lba as u32).to_be_bytes()
            }
        };
        let mut d = vec![0u8; 4];
        match format {
            0 => {
                d[2] = 1; // first track
                d[3] = 1; // last track
                if track > 1 && track != 0xAA {
                    return Completion::check(Sense::INVALID_FIELD_IN_CDB);
                }
                if track <= 1 {
                    // Track 1: ADR 1 (Q sub-channel position), control 4 (data track).
                    d.extend_from_slice(&[0, 0x14, 1, 0]);
                    d.extend_from_slice(&addr(0));
                }
                d.extend_from_slice(&[0, 0x14, 0xAA, 0]);
                d.extend_from_slice(&addr(self.blocks()));
            }
            1 => {
                // Session information: one session, whose first track starts at 0.
                d[2] = 1;
                d[3] = 1;
                d.extend_from_slice(&[0, 0x14, 1, 0]);
                d.extend_from_slice(&addr(0));
            }
            _ => return Completion::check(Sense::INVALID_FIELD_IN_CDB),
        }
        let n = (d.len() - 2) as u16;
        d[0..2].copy_from_slice(&n.to_be_bytes());
        respond(buf, &d, alloc)
    }

    /// READ DISC INFORMATION (standard disc information, data type 0): a finalized disc with
    /// one complete session holding track 1. Linux's cdrom layer asks on every open.
    fn disc_information(&self, cdb: &[u8], buf: &mut dyn DataBuffer) -> Completion {
        if cdb[1] & 0x07 != 0 {
            return Completion::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if self.loaded().is_none() {
            return Completion::check(self.not_present());
        }
        let alloc = be16(cdb, 7) as usize;
        let mut d = [0u8; 34];
        d[0..2].copy_from_slice(&32u16.to_be_bytes()); // length after these two bytes
        d[2] = 0x0C | 0x02; // last session complete, disc complete (finalized, not erasable)
        d[3] = 1; // first track on the disc
        d[4] = 1; // sessions (LSB)
        d[5] = 1; // first track in the last session (LSB)
        d[6] = 1; // last track in the last session (LSB)
        d[8] = 0x00; // disc type: CD-DA or CD-ROM (DVD media report 0 too)
                     // Last session lead-in start and last possible lead-out start: not recorded (FFh).
        d[16..24].fill(0xFF);
        respond(buf, &d, alloc)
    }

    /// READ TRACK INFORMATION: the disc has one track, track 1 of session 1, a complete data
    /// track over the whole medium. It can be named by an LBA inside it (address type 0), by
    /// its number (type 1) or by its session (type 2); anything else is an invalid field.
    fn track_information(&self, cdb: &[u8], buf: &mut dyn DataBuffer) -> Completion {
        let open_bit = cdb[1] & 0x04 != 0;
        let address_type = cdb[1] & 0x03;
        let number = be32(cdb, 2) as u64;
        if open_bit || address_type == 3 {
            return Completion::check(Sense::INVALID_FIELD_IN_CDB);
        }
        if self.loaded().is_none() {
            return Completion::check(self.not_present());
        }
        let blocks = self.blocks();
        match address_type {
            0 if number >= blocks => return Completion::check(Sense::LBA_OUT_OF_RANGE),
            0 => {}
            _ if number != 1 => return Completion::check(Sense::INVALID_FIELD_IN_CDB),
            _ => {}
        }
        let alloc = be16(cdb, 7) as usize;
        let size = blocks.min(0xFFFF_FFFF) as u32;
        let mut d = [0u8; 48];
        d[0..2].copy_from_slice(&46u16.to_be_bytes()); // length after these two bytes
        d[2] = 1; // track number (LSB)
        d[3] = 1; // session number (LSB)
        d[5] = 0x04; // track mode 4: a data track, recorded uninterrupted
        d[6] = 0x01; // not blank, not packet written; data mode 1
        d[7] = 0; // no valid next writable / last recorded address flags: read-only medium
                  // Logical track start 0 (bytes 8..12), next writable address and free blocks 0.
        d[20..24].copy_from_slice(&16u32.to_be_bytes()); // blocking factor of a DVD: 16
        d[24..28].copy_from_slice(&size.to_be_bytes()); // track size in blocks
        d[28..32].copy_from_slice(&size.saturating_sub(1).to_be_bytes()); // last recorded
        respond(buf, &d, alloc)
    }

    fn get_configuration(&self, cdb: &[u8], buf: &mut dyn DataBuffer) -> Completion {
        let rt = cdb[1] & 0x03;
        let start = be16(cdb, 2);
        let alloc = be16(cdb, 7) as usize;
        if rt == 3 {
            return Completion::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let present = self.loaded().is_some();
        let feature = |code: u16, version: u8, current: bool, data: &[u8]| -> Vec<u8> {
            let mut f = code.to_be_bytes().to_vec();
            // Version, persistent (these features never come and go), current.
            let persistent = code <= 0x0003;
            f.push(version << 2 | (persistent as u8) << 1 | current as u8);
            f.push(data.len() as u8);
            f.extend_from_slice(data);
            f
        };
        let mut profiles = Vec::new();
        for p in [PROFILE_DVD_ROM, PROFILE_CD_ROM] {
            profiles.extend_from_slice(&p.to_be_bytes());
            profiles.push((present && p == PROFILE_DVD_ROM) as u8);
            profiles.push(0);
        }
        let mut removable = [0u8; 4];
        // Tray mechanism, eject, lock; the lock state.
        removable[0] = 0x20 | 0x08 | 0x01 | if self.prevent { 0x04 } else { 0 };
        let mut random = [0u8; 8];
        random[0..4].copy_from_slice(&CD_BLOCK.to_be_bytes());
        random[4..6].copy_from_slice(&16u16.to_be_bytes()); // blocking: 16 blocks (ECC block)
        let features: [(u16, Vec<u8>); 6] = [
            (0x0000, feature(0x0000, 0, true, &profiles)),
            // Core: physical interface 1 (SCSI), DBE.
            (
                0x0001,
                feature(0x0001, 1, true, &[0, 0, 0, 1, 0x01, 0, 0, 0]),
            ),
            (0x0002, feature(0x0002, 1, true, &[0, 0, 0, 0])), // morphing (polled events)
            (0x0003, feature(0x0003, 0, true, &removable)),
            (0x0010, feature(0x0010, 0, present, &random)),
            (0x001F, feature(0x001F, 0, present, &[0, 0, 0, 0])), // DVD read
        ];
        let mut d = vec![0u8; 8];
        let current = if present { PROFILE_DVD_ROM } else { 0 };
        d[6..8].copy_from_slice(&current.to_be_bytes());
        for (code, bytes) in &features {
            let take = match rt {
                0 => *code >= start,
                1 => *code >= start && bytes[2] & 1 != 0,
                _ => *code == start,
            };
            if take {
                d.extend_from_slice(bytes);
            }
        }
        let n = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&n.to_be_bytes());
        respond(buf, &d, alloc)
    }

    fn event_status(&mut self, cdb: &[u8], buf: &mut dyn DataBuffer) -> Completion {
        if cdb[1] & 0x01 == 0 {
            // Asynchronous notification is not supported.
            return Completion::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let classes = cdb[4];
        let alloc = be16(cdb, 7) as usize;
        const MEDIA_CLASS: u8 = 0x10;
        let mut d = vec![0u8; 4];
        d[3] = MEDIA_CLASS; // supported classes
        if classes & MEDIA_CLASS == 0 {
            d[2] = 0x80; // NEA: no event available in the requested classes
            d[1] = 2;
            return respond(buf, &d, alloc);
        }
        d[1] = 6;
        d[2] = 4; // media class
        let event = self.event.take();
        match event {
            Some(MediaEvent::EjectRequest) => self.fetched.eject_request += 1,
            Some(MediaEvent::NewMedia) => self.fetched.new_media += 1,
            Some(MediaEvent::MediaRemoval) => self.fetched.media_removal += 1,
            None => {}
        }
        let code = event.map_or(0, |e| e as u8);
        let status = (self.tray_open as u8) | ((self.loaded().is_some() as u8) << 1);
        d.extend_from_slice(&[code, status, 0, 0]);
        respond(buf, &d, alloc)
    }
}

fn check_medium(d: &Disk) -> Result<(), CdromError> {
    if d.size() < CD_BLOCK as u64 {
        return Err(CdromError::TooSmall(d.size()));
    }
    Ok(())
}

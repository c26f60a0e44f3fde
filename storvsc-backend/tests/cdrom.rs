//! The SCSI DVD-ROM LUN on its own (no VMBus): every MMC command it answers, the tray/medium
//! state machine from both sides, and the unit attention after a medium change.

use std::sync::Arc;

use disk::{BlockDevice, Disk, RawDisk};
use storvsc_backend::cdrom::{mmc::*, CdromError, CD_BLOCK};
use storvsc_backend::scsi::{opcode::*, Completion, Lun, ScsiController, Sense};
use storvsc_backend::ScsiCdrom;

/// A medium of `blocks` 2048-byte blocks; block i is filled with (i % 251) as u8.
fn medium(blocks: u64) -> Disk {
    let d = RawDisk::memory(blocks * CD_BLOCK as u64).unwrap();
    for i in 0..blocks {
        d.write_at(&[(i % 251) as u8; 2048], i * 2048).unwrap();
    }
    Disk::new(Arc::new(d))
}

fn run(c: &mut ScsiCdrom, cdb: &[u8], alloc: usize) -> (Completion, Vec<u8>) {
    let mut b = vec![0u8; alloc];
    let r = c.execute(cdb, &mut b);
    (r, b)
}

fn good(c: &mut ScsiCdrom, cdb: &[u8], alloc: usize) -> Vec<u8> {
    let (r, mut b) = run(c, cdb, alloc);
    match r {
        Completion::Good { transferred } => {
            b.truncate(transferred);
            b
        }
        other => panic!("{:02x?}: {other:?}", cdb),
    }
}

fn sense(c: &mut ScsiCdrom, cdb: &[u8]) -> Sense {
    match run(c, cdb, 4096).0 {
        Completion::Check { sense, .. } => sense,
        other => panic!("{:02x?}: expected CHECK CONDITION, got {other:?}", cdb),
    }
}

const TUR: [u8; 6] = [TEST_UNIT_READY, 0, 0, 0, 0, 0];
const EJECT: [u8; 6] = [START_STOP_UNIT, 0, 0, 0, 0x02, 0];
const LOAD: [u8; 6] = [START_STOP_UNIT, 0, 0, 0, 0x03, 0];
const PREVENT: [u8; 6] = [PREVENT_ALLOW, 0, 0, 0, 1, 0];
const ALLOW: [u8; 6] = [PREVENT_ALLOW, 0, 0, 0, 0, 0];

fn gesn() -> [u8; 10] {
    [GET_EVENT_STATUS_NOTIFICATION, 1, 0, 0, 0x10, 0, 0, 0, 8, 0]
}

/// (event code, media status) of a polled media-class event.
fn media_event(c: &mut ScsiCdrom) -> (u8, u8) {
    let d = good(c, &gesn(), 8);
    assert_eq!(d.len(), 8);
    assert_eq!(u16::from_be_bytes([d[0], d[1]]), 6, "event data length");
    assert_eq!(d[2], 4, "media class, NEA clear");
    assert_eq!(d[3], 0x10, "supported classes: media");
    (d[4], d[5])
}

fn read10(lba: u32, n: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = READ_10;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&n.to_be_bytes());
    c
}

#[test]
fn inquiry_says_removable_dvd() {
    let mut c = ScsiCdrom::new(medium(16)).unwrap().with_serial("dvd-1");
    let d = good(&mut c, &[INQUIRY, 0, 0, 0, 96, 0], 96);
    assert_eq!(d[0], 0x05, "peripheral type 5, qualifier 0");
    assert_eq!(d[1] & 0x80, 0x80, "RMB");
    assert_eq!(&d[8..16], b"Msft    ");
    assert_eq!(&d[16..32], b"Virtual DVD-ROM ");
    let d = good(&mut c, &[INQUIRY, 1, 0x80, 0, 64, 0], 64);
    assert_eq!(&d[4..], b"dvd-1");
    let d = good(&mut c, &[INQUIRY, 1, 0x00, 0, 64, 0], 64);
    assert_eq!(&d[4..], &[0x00, 0x80]);
    assert_eq!(
        sense(&mut c, &[INQUIRY, 1, 0xB0, 0, 64, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
}

#[test]
fn capacity_and_reads_in_2048_byte_blocks() {
    let mut c = ScsiCdrom::new(medium(300)).unwrap();
    good(&mut c, &TUR, 0);
    let d = good(&mut c, &[READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(u32::from_be_bytes(d[0..4].try_into().unwrap()), 299);
    assert_eq!(u32::from_be_bytes(d[4..8].try_into().unwrap()), 2048);
    let d = good(&mut c, &read10(10, 3), 3 * 2048);
    assert_eq!(d.len(), 3 * 2048);
    for (i, blk) in d.chunks(2048).enumerate() {
        assert!(blk.iter().all(|&b| b == (10 + i) as u8), "block {}", 10 + i);
    }
    let mut r12 = [0u8; 12];
    r12[0] = READ_12;
    r12[2..6].copy_from_slice(&298u32.to_be_bytes());
    r12[6..10].copy_from_slice(&2u32.to_be_bytes());
    let d = good(&mut c, &r12, 4096);
    assert!(d[..2048].iter().all(|&b| b == (298 % 251) as u8));
    assert!(d[2048..].iter().all(|&b| b == (299 % 251) as u8));
    assert_eq!(sense(&mut c, &read10(299, 2)), Sense::LBA_OUT_OF_RANGE);
    // A transfer larger than the initiator's buffer is refused, not truncated.
    assert_eq!(
        run(&mut c, &read10(0, 2), 2048).0,
        Completion::Check {
            sense: Sense::INVALID_FIELD_IN_CDB,
            transferred: 0
        }
    );
    let mut w = read10(0, 1);
    w[0] = WRITE_10;
    assert_eq!(sense(&mut c, &w), Sense::WRITE_PROTECTED);
}

#[test]
fn read_toc_formats() {
    let mut c = ScsiCdrom::new(medium(1000)).unwrap();
    // Format 0, LBA form.
    let d = good(&mut c, &[READ_TOC, 0, 0, 0, 0, 0, 0, 0, 100, 0], 100);
    assert_eq!(d.len(), 20);
    assert_eq!(u16::from_be_bytes([d[0], d[1]]), 18);
    assert_eq!((d[2], d[3]), (1, 1), "first and last track");
    assert_eq!((d[5], d[6]), (0x14, 1), "track 1: data");
    assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), 0);
    assert_eq!(d[14], 0xAA, "lead-out");
    assert_eq!(u32::from_be_bytes(d[16..20].try_into().unwrap()), 1000);
    // MSF form: lead-out at 1000 + 150 frames = 00:15:25.
    let d = good(&mut c, &[READ_TOC, 2, 0, 0, 0, 0, 0, 0, 100, 0], 100);
    assert_eq!(&d[16..20], &[0, 0, 15, 25]);
    assert_eq!(&d[8..12], &[0, 0, 2, 0], "track 1 at 00:02:00");
    // Starting at the lead-out gives just the lead-out.
    let d = good(&mut c, &[READ_TOC, 0, 0, 0, 0, 0, 0xAA, 0, 100, 0], 100);
    assert_eq!(d.len(), 12);
    assert_eq!(d[6], 0xAA);
    assert_eq!(
        sense(&mut c, &[READ_TOC, 0, 0, 0, 0, 0, 2, 0, 100, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    // Session info, asked the old way (format in byte 9).
    let d = good(&mut c, &[READ_TOC, 0, 0, 0, 0, 0, 0, 0, 12, 0x40], 12);
    assert_eq!(u16::from_be_bytes([d[0], d[1]]), 10);
    assert_eq!(d[6], 1, "first track of the last session");
    // Format 2 (full TOC) is not offered.
    assert_eq!(
        sense(&mut c, &[READ_TOC, 0, 2, 0, 0, 0, 0, 0, 100, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    // A short allocation length truncates.
    assert_eq!(
        good(&mut c, &[READ_TOC, 0, 0, 0, 0, 0, 0, 0, 4, 0], 100).len(),
        4
    );
}

/// (code, current) of every feature descriptor in a GET CONFIGURATION answer, and the
/// current profile.
fn features(d: &[u8]) -> (u16, Vec<(u16, bool)>) {
    let len = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, d.len(), "data length");
    let profile = u16::from_be_bytes([d[6], d[7]]);
    let mut out = Vec::new();
    let mut o = 8;
    while o < d.len() {
        out.push((u16::from_be_bytes([d[o], d[o + 1]]), d[o + 2] & 1 != 0));
        o += 4 + d[o + 3] as usize;
    }
    assert_eq!(o, d.len(), "descriptors fill the answer");
    (profile, out)
}

#[test]
fn get_configuration_dvd_rom_profile() {
    let mut c = ScsiCdrom::new(medium(64)).unwrap();
    let cdb = |rt: u8, start: u16| {
        let s = start.to_be_bytes();
        [GET_CONFIGURATION, rt, s[0], s[1], 0, 0, 0, 2, 0, 0]
    };
    let d = good(&mut c, &cdb(0, 0), 512);
    let (profile, f) = features(&d);
    assert_eq!(profile, PROFILE_DVD_ROM);
    let codes: Vec<u16> = f.iter().map(|x| x.0).collect();
    assert_eq!(codes, [0x0000, 0x0001, 0x0002, 0x0003, 0x0010, 0x001F]);
    assert!(f.iter().all(|x| x.1), "all current with a medium");
    // The profile list: DVD-ROM current, CD-ROM listed.
    assert_eq!(&d[12..20], &[0x00, 0x10, 1, 0, 0x00, 0x08, 0, 0]);
    // RT 2: only the one asked for.
    let (_, f) = features(&good(&mut c, &cdb(2, 0x0010), 512));
    assert_eq!(f, [(0x0010, true)]);
    // No medium: no current profile, the medium features are not current and RT 1 omits them.
    c.host_eject(false).unwrap();
    let (profile, f) = features(&good(&mut c, &cdb(0, 0), 512));
    assert_eq!(profile, 0);
    assert!(f.contains(&(0x0010, false)) && f.contains(&(0x001F, false)));
    let (_, f) = features(&good(&mut c, &cdb(1, 0), 512));
    assert!(f.iter().all(|x| x.1) && !f.iter().any(|x| x.0 == 0x0010));
    assert_eq!(sense(&mut c, &cdb(3, 0)), Sense::INVALID_FIELD_IN_CDB);
}

#[test]
fn mode_sense_capabilities_page_both_forms() {
    let mut c = ScsiCdrom::new(medium(64)).unwrap();
    // 6-byte form, as Linux's sr asks for page 0x2A.
    let d = good(&mut c, &[MODE_SENSE_6, 0, 0x2A, 0, 0xFF, 0], 255);
    assert_eq!(d[0] as usize, d.len() - 1, "mode data length");
    assert_eq!(d[3], 0, "no block descriptors");
    let p = &d[4..];
    assert_eq!((p[0], p[1]), (0x2A, 0x14));
    assert_eq!(p[2] & 0x08, 0x08, "DVD-ROM read");
    assert_eq!(p[3], 0, "no writing");
    assert_eq!(p[6] >> 5, 1, "tray loading mechanism");
    assert_eq!(p[6] & 0x09, 0x09, "eject and lock supported");
    assert!(u16::from_be_bytes([p[8], p[9]]) >= 176);
    // 10-byte form, and the all-pages form.
    let d10 = good(&mut c, &[MODE_SENSE_10, 0, 0x2A, 0, 0, 0, 0, 1, 0, 0], 256);
    assert_eq!(u16::from_be_bytes([d10[0], d10[1]]) as usize, d10.len() - 2);
    assert_eq!(&d10[8..], p);
    let all = good(&mut c, &[MODE_SENSE_10, 0, 0x3F, 0, 0, 0, 0, 1, 0, 0], 256);
    assert_eq!(&all[8..], p);
    // The lock state shows in the page.
    good(&mut c, &PREVENT, 0);
    let d = good(&mut c, &[MODE_SENSE_6, 0, 0x2A, 0, 0xFF, 0], 255);
    assert_eq!(d[4 + 6] & 0x02, 0x02);
    assert_eq!(
        sense(&mut c, &[MODE_SENSE_6, 0, 0x08, 0, 0xFF, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        sense(&mut c, &[MODE_SENSE_6, 0, 0xEA, 0, 0xFF, 0]),
        Sense::SAVING_PARAMETERS_NOT_SUPPORTED
    );
}

#[test]
fn empty_drive_reports_medium_not_present() {
    let mut c = ScsiCdrom::empty();
    assert_eq!(sense(&mut c, &TUR), Sense::MEDIUM_NOT_PRESENT_TRAY_CLOSED);
    let s = sense(&mut c, &TUR);
    assert_eq!(
        (s.key, s.asc),
        (0x02, 0x3A),
        "NOT READY / medium not present"
    );
    assert_eq!(
        sense(&mut c, &[READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        Sense::MEDIUM_NOT_PRESENT_TRAY_CLOSED
    );
    assert_eq!(
        sense(&mut c, &read10(0, 1)),
        Sense::MEDIUM_NOT_PRESENT_TRAY_CLOSED
    );
    assert_eq!(
        sense(&mut c, &[READ_TOC, 0, 0, 0, 0, 0, 0, 0, 100, 0]),
        Sense::MEDIUM_NOT_PRESENT_TRAY_CLOSED
    );
    let d = good(&mut c, &[REQUEST_SENSE, 0, 0, 0, 18, 0], 18);
    assert_eq!((d[2], d[12], d[13]), (0x02, 0x3A, 0x02));
    assert_eq!(
        media_event(&mut c),
        (0, 0),
        "no event, tray closed, no medium"
    );
    // INQUIRY and MODE SENSE work without a medium.
    good(&mut c, &[INQUIRY, 0, 0, 0, 36, 0], 36);
    good(&mut c, &[MODE_SENSE_10, 0, 0x2A, 0, 0, 0, 0, 1, 0, 0], 256);
}

#[test]
fn guest_eject_and_load() {
    let mut c = ScsiCdrom::new(medium(32)).unwrap();
    good(&mut c, &TUR, 0);
    good(&mut c, &EJECT, 0);
    assert!(c.tray_open());
    assert_eq!(c.take_tray_moves(), [true]);
    assert_eq!(sense(&mut c, &TUR), Sense::MEDIUM_NOT_PRESENT_TRAY_OPEN);
    assert_eq!(media_event(&mut c), (3, 0x01), "media removal, tray open");
    assert_eq!(media_event(&mut c), (0, 0x01), "the event is reported once");
    // Ejecting again is not an error; a stop without LoEj changes nothing.
    good(&mut c, &EJECT, 0);
    good(&mut c, &[START_STOP_UNIT, 0, 0, 0, 0, 0], 0);
    assert_eq!(c.take_tray_moves(), Vec::<bool>::new());
    // Load: the same medium is back.
    good(&mut c, &LOAD, 0);
    assert!(!c.tray_open());
    assert_eq!(c.take_tray_moves(), [false]);
    assert_eq!(media_event(&mut c), (2, 0x02), "new media, present");
    good(&mut c, &TUR, 0);
    assert!(good(&mut c, &read10(5, 1), 2048).iter().all(|&b| b == 5));
}

#[test]
fn prevented_removal() {
    let mut c = ScsiCdrom::new(medium(32)).unwrap();
    good(&mut c, &PREVENT, 0);
    assert!(c.locked());
    assert_eq!(sense(&mut c, &EJECT), Sense::MEDIUM_REMOVAL_PREVENTED);
    assert!(!c.tray_open());
    // The host cannot take it either without force; the guest is asked to eject.
    assert_eq!(c.host_eject(false).unwrap_err(), CdromError::Locked);
    assert!(c.medium().is_some());
    assert_eq!(media_event(&mut c), (1, 0x02), "eject request");
    assert_eq!(
        c.media_events_fetched(),
        storvsc_backend::MediaEventCounts {
            eject_request: 1,
            ..Default::default()
        },
        "the host sees that the guest fetched it"
    );
    good(&mut c, &TUR, 0);
    // Allowed again: the guest ejects.
    good(&mut c, &ALLOW, 0);
    good(&mut c, &EJECT, 0);
    assert!(c.tray_open());
    // A forced host eject ignores the lock.
    let mut c = ScsiCdrom::new(medium(32)).unwrap();
    good(&mut c, &PREVENT, 0);
    assert!(c.host_eject(true).unwrap().is_some());
    assert_eq!(sense(&mut c, &TUR), Sense::MEDIUM_NOT_PRESENT_TRAY_OPEN);
}

#[test]
fn host_medium_change_raises_unit_attention() {
    let mut c = ScsiCdrom::new(medium(32)).unwrap();
    good(&mut c, &TUR, 0);
    let old = c.host_insert(medium(64), false).unwrap();
    assert_eq!(
        old.map(|d| d.size()),
        Some(32 * 2048),
        "the old medium is handed back"
    );
    // INQUIRY and GET EVENT STATUS pass a pending unit attention by...
    good(&mut c, &[INQUIRY, 0, 0, 0, 36, 0], 36);
    assert_eq!(media_event(&mut c), (2, 0x02), "new media");
    assert_eq!(c.media_events_fetched().new_media, 1);
    assert_eq!(media_event(&mut c), (0, 0x02));
    assert_eq!(c.media_events_fetched().new_media, 1, "counted once");
    // ...the next other command gets it, once.
    assert_eq!(sense(&mut c, &TUR), Sense::MEDIUM_CHANGED);
    good(&mut c, &TUR, 0);
    let d = good(&mut c, &[READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(u32::from_be_bytes(d[0..4].try_into().unwrap()), 63);
    // REQUEST SENSE reports and clears it too.
    c.host_insert(medium(16), false).unwrap();
    let d = good(&mut c, &[REQUEST_SENSE, 0, 0, 0, 18, 0], 18);
    assert_eq!((d[2], d[12], d[13]), (0x06, 0x28, 0x00));
    good(&mut c, &TUR, 0);
    // A host eject then insert into an empty drive.
    let mut c = ScsiCdrom::empty();
    assert!(c.host_eject(false).unwrap().is_none());
    assert!(c.tray_open());
    assert!(c.host_insert(medium(8), false).unwrap().is_none());
    assert_eq!(sense(&mut c, &read10(0, 1)), Sense::MEDIUM_CHANGED);
    assert!(good(&mut c, &read10(7, 1), 2048).iter().all(|&b| b == 7));
    // A medium smaller than one block is refused and changes nothing.
    let tiny = Disk::new(Arc::new(RawDisk::memory(1024).unwrap()));
    assert!(matches!(
        c.host_insert(tiny, false),
        Err(CdromError::TooSmall(1024))
    ));
    good(&mut c, &TUR, 0);
}

#[test]
fn event_status_polled_only() {
    let mut c = ScsiCdrom::new(medium(8)).unwrap();
    assert_eq!(
        sense(
            &mut c,
            &[GET_EVENT_STATUS_NOTIFICATION, 0, 0, 0, 0x10, 0, 0, 0, 8, 0]
        ),
        Sense::INVALID_FIELD_IN_CDB,
        "asynchronous mode"
    );
    // Asking for another class only: no event available.
    let d = good(
        &mut c,
        &[GET_EVENT_STATUS_NOTIFICATION, 1, 0, 0, 0x04, 0, 0, 0, 8, 0],
        8,
    );
    assert_eq!(d, [0, 2, 0x80, 0x10]);
    assert_eq!(media_event(&mut c), (0, 0x02));
}

#[test]
fn dvd_lun_on_a_controller() {
    let mut ctl = ScsiController::new();
    ctl.add_lun(0, ScsiCdrom::new(medium(8)).unwrap()).unwrap();
    let mut b = vec![0u8; 36];
    assert_eq!(
        ctl.execute(0, 0, 0, &[INQUIRY, 0, 0, 0, 36, 0], &mut b),
        Completion::Good { transferred: 36 }
    );
    assert_eq!(b[0], 0x05);
    match ctl.lun_mut(0) {
        Some(Lun::Cdrom(c)) => {
            c.host_eject(false).unwrap();
        }
        other => panic!("LUN 0 is {other:?}"),
    }
    let mut empty = Vec::new();
    assert_eq!(
        ctl.execute(0, 0, 0, &TUR, &mut empty),
        Completion::Check {
            sense: Sense::MEDIUM_NOT_PRESENT_TRAY_OPEN,
            transferred: 0
        }
    );
}

/// A VHDX holding the ISO bytes is a medium like the ISO file itself.
#[test]
fn vhdx_holding_an_iso() {
    let dir = std::env::temp_dir().join(format!("viridian-cdrom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("iso.vhdx");
    let _ = std::fs::remove_file(&path);
    {
        let v = vhdx::VhdxDisk::create(
            &path,
            &vhdx::CreateOptions::new(vhdx::CreateKind::Dynamic, 4 << 20),
        )
        .unwrap();
        for i in 0..8u64 {
            v.write_at(&[0xA0 + i as u8; 2048], i * 2048).unwrap();
        }
        v.flush().unwrap();
    }
    let v = vhdx::VhdxDisk::open_path(&path, &vhdx::OpenOptions { read_only: true }).unwrap();
    let mut c = ScsiCdrom::new(Arc::new(v)).unwrap();
    let d = good(&mut c, &[READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(u32::from_be_bytes(d[0..4].try_into().unwrap()), 2047);
    let d = good(&mut c, &read10(3, 2), 4096);
    assert!(d[..2048].iter().all(|&b| b == 0xA3));
    assert!(d[2048..].iter().all(|&b| b == 0xA4));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn read_disc_information_reports_a_finalized_disc() {
    let rdi = [0x51u8, 0, 0, 0, 0, 0, 0, 0, 34, 0];
    let mut c = ScsiCdrom::new(medium(32)).unwrap();
    let d = good(&mut c, &rdi, 34);
    assert_eq!(u16::from_be_bytes([d[0], d[1]]), 32);
    assert_eq!(d[2] & 0x03, 2, "disc status: complete");
    assert_eq!((d[2] >> 2) & 0x03, 3, "last session: complete");
    assert_eq!((d[3], d[4], d[5], d[6]), (1, 1, 1, 1));
    // Other data types are not supported; an empty drive has no disc.
    assert_eq!(
        sense(&mut c, &[0x51, 1, 0, 0, 0, 0, 0, 0, 34, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    let mut e = ScsiCdrom::empty();
    assert_eq!(sense(&mut e, &rdi), Sense::MEDIUM_NOT_PRESENT_TRAY_CLOSED);
}

#[test]
fn read_track_information_reports_track_one() {
    // Address type 1 (track number), track 1, allocation 48.
    let rti = |t: u8, n: u32| {
        let b = n.to_be_bytes();
        [0x52u8, t, b[0], b[1], b[2], b[3], 0, 0, 48, 0]
    };
    let mut c = ScsiCdrom::new(medium(32)).unwrap();
    for (t, n) in [(1, 1), (0, 0), (0, 31), (2, 1)] {
        let d = good(&mut c, &rti(t, n), 48);
        assert_eq!(d.len(), 48);
        assert_eq!(u16::from_be_bytes([d[0], d[1]]), 46);
        assert_eq!((d[2], d[3]), (1, 1), "track 1 of session 1");
        assert_eq!(d[5] & 0x0F, 4, "data track");
        assert_eq!(d[6] & 0x40, 0, "not blank");
        assert_eq!(
            u32::from_be_bytes(d[8..12].try_into().unwrap()),
            0,
            "starts at 0"
        );
        assert_eq!(
            u32::from_be_bytes(d[24..28].try_into().unwrap()),
            32,
            "size"
        );
        assert_eq!(
            u32::from_be_bytes(d[28..32].try_into().unwrap()),
            31,
            "last"
        );
    }
    // A short allocation is honoured.
    assert_eq!(good(&mut c, &rti(1, 1), 8).len(), 8);
    // No track 2, no LBA past the end, no session 2, no address type 3.
    assert_eq!(sense(&mut c, &rti(1, 2)), Sense::INVALID_FIELD_IN_CDB);
    assert_eq!(sense(&mut c, &rti(0, 32)), Sense::LBA_OUT_OF_RANGE);
    assert_eq!(sense(&mut c, &rti(2, 2)), Sense::INVALID_FIELD_IN_CDB);
    assert_eq!(sense(&mut c, &rti(3, 0)), Sense::INVALID_FIELD_IN_CDB);
    let mut e = ScsiCdrom::empty();
    assert_eq!(
        sense(&mut e, &rti(1, 1)),
        Sense::MEDIUM_NOT_PRESENT_TRAY_CLOSED
    );
}

#[test]
fn an_open_tray_takes_a_medium_without_force() {
    let mut c = ScsiCdrom::new(medium(8)).unwrap();
    // The guest locks the tray; the host forces it open.
    let mut none = Vec::new();
    assert!(matches!(
        c.execute(&[0x1E, 0, 0, 0, 1, 0], &mut none),
        Completion::Good { .. }
    ));
    assert_eq!(
        c.host_insert(medium(4), false).unwrap_err(),
        CdromError::Locked
    );
    assert!(c.host_eject(true).unwrap().is_some());
    assert!(c.tray_open());
    // Open: a medium goes in without force, and the tray closes.
    assert!(c.host_insert(medium(4), false).unwrap().is_none());
    assert!(!c.tray_open());
    assert_eq!(c.blocks(), 4);
}

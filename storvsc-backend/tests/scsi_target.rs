//! The SCSI target on its own (no VMBus): CDB in, data buffer, completion out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use disk::{BlockDevice, RawDisk, ZeroFlags};
use storvsc_backend::scsi::{opcode::*, Completion, ScsiController, ScsiDisk, Sense};

/// A disk wrapper that can fail reads/writes and report a 4 KiB physical sector.
#[derive(Debug)]
struct TestDisk {
    inner: RawDisk,
    fail_reads: AtomicBool,
    fail_writes: AtomicBool,
    phys: u32,
    read_only: bool,
}

fn io_err() -> disk::Error {
    disk::Error::io("injected", std::io::Error::other("boom"))
}

impl BlockDevice for TestDisk {
    fn format(&self) -> &'static str {
        "test"
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.inner.logical_sector_size()
    }
    fn physical_sector_size(&self) -> u32 {
        self.phys
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> disk::Result<()> {
        if self.fail_reads.load(Ordering::Relaxed) {
            return Err(io_err());
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> disk::Result<()> {
        if self.read_only {
            return Err(disk::Error::ReadOnly);
        }
        if self.fail_writes.load(Ordering::Relaxed) {
            return Err(io_err());
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> disk::Result<()> {
        if self.fail_writes.load(Ordering::Relaxed) {
            return Err(io_err());
        }
        self.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> disk::Result<()> {
        if self.read_only {
            return Err(disk::Error::ReadOnly);
        }
        self.inner.write_zeroes(offset, len, flags)
    }
}

fn test_disk(size: u64, logical: u32, phys: u32, read_only: bool) -> Arc<TestDisk> {
    Arc::new(TestDisk {
        inner: RawDisk::memory(size)
            .unwrap()
            .with_logical_sector_size(logical),
        fail_reads: AtomicBool::new(false),
        fail_writes: AtomicBool::new(false),
        phys,
        read_only,
    })
}

fn lun(d: Arc<TestDisk>) -> ScsiDisk {
    ScsiDisk::new(d).unwrap().with_serial("serial-1")
}

fn good(c: Completion) -> usize {
    match c {
        Completion::Good { transferred } => transferred,
        other => panic!("expected GOOD, got {other:?}"),
    }
}

fn check(c: Completion) -> Sense {
    match c {
        Completion::Check { sense, .. } => sense,
        other => panic!("expected CHECK CONDITION, got {other:?}"),
    }
}

fn rw16(op: u8, lba: u64, n: u32, fua: bool) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[1] = if fua { 8 } else { 0 };
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&n.to_be_bytes());
    c
}

#[test]
fn inquiry_and_vpd() {
    let mut s = lun(test_disk(1 << 20, 512, 4096, false));
    let mut b = vec![0u8; 255];
    let n = good(s.execute(&[INQUIRY, 0, 0, 0, 36, 0], &mut b));
    assert_eq!(n, 36);
    assert_eq!(b[0], 0);
    assert_eq!(b[2], 5);
    assert_eq!(b[7] & 2, 2, "CmdQue");
    assert_eq!(&b[8..16], b"Msft    ");
    assert_eq!(&b[16..32], b"Virtual Disk    ");
    let n = good(s.execute(&[INQUIRY, 0, 0, 0, 255, 0], &mut b));
    assert_eq!(n, b[4] as usize + 5);
    // Page code without EVPD is invalid.
    assert_eq!(
        check(s.execute(&[INQUIRY, 0, 0x80, 0, 255, 0], &mut b)),
        Sense::INVALID_FIELD_IN_CDB
    );
    let n = good(s.execute(&[INQUIRY, 1, 0x00, 0, 255, 0], &mut b));
    assert_eq!(&b[..n], &[0, 0, 0, 6, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
    let n = good(s.execute(&[INQUIRY, 1, 0x80, 0, 255, 0], &mut b));
    assert_eq!(&b[4..n], b"serial-1");
    let n = good(s.execute(&[INQUIRY, 1, 0x83, 0, 255, 0], &mut b));
    assert_eq!(&b[4..8], &[1, 3, 0, 16]);
    assert_eq!(b[8] >> 4, 6);
    assert_eq!(&b[24..28], &[2, 1, 0, 16]);
    assert_eq!(&b[28..44], b"Msft    serial-1");
    assert_eq!(n, 44);
    let n = good(s.execute(&[INQUIRY, 1, 0xB0, 0, 255, 0], &mut b));
    assert_eq!(n, 64);
    assert_eq!(b[3], 0x3C);
    assert_eq!(
        u16::from_be_bytes([b[6], b[7]]),
        8,
        "8 logical per physical"
    );
    assert_eq!(
        u32::from_be_bytes(b[8..12].try_into().unwrap()),
        0x40000 / 512
    );
    assert!(
        u32::from_be_bytes(b[20..24].try_into().unwrap()) > 0,
        "max unmap"
    );
    assert_eq!(u32::from_be_bytes(b[28..32].try_into().unwrap()), 8);
    assert_eq!(b[32] & 0x80, 0x80, "UGAVALID");
    let n = good(s.execute(&[INQUIRY, 1, 0xB1, 0, 255, 0], &mut b));
    assert_eq!((n, b[4], b[5]), (64, 0, 1));
    let n = good(s.execute(&[INQUIRY, 1, 0xB2, 0, 255, 0], &mut b));
    assert_eq!(n, 8);
    assert_eq!(b[5] & 0x80, 0x80, "LBPU");
    assert_eq!(b[5] & 0x04, 0x04, "LBPRZ");
    assert_eq!(
        check(s.execute(&[INQUIRY, 1, 0x55, 0, 255, 0], &mut b)),
        Sense::INVALID_FIELD_IN_CDB
    );
    // Allocation length truncates.
    assert_eq!(good(s.execute(&[INQUIRY, 1, 0xB0, 0, 10, 0], &mut b)), 10);
}

#[test]
fn read_capacity_reports_sector_sizes() {
    for (logical, phys, exp) in [(512u32, 512u32, 0u8), (512, 4096, 3), (4096, 4096, 0)] {
        let mut s = lun(test_disk(8 << 20, logical, phys, false));
        let mut b = vec![0u8; 32];
        assert_eq!(
            good(s.execute(&[READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &mut b)),
            8
        );
        let blocks = (8u64 << 20) / logical as u64;
        assert_eq!(
            u32::from_be_bytes(b[0..4].try_into().unwrap()) as u64,
            blocks - 1
        );
        assert_eq!(u32::from_be_bytes(b[4..8].try_into().unwrap()), logical);
        let mut c = [0u8; 16];
        c[0] = SERVICE_ACTION_IN_16;
        c[1] = SA_READ_CAPACITY_16;
        c[13] = 32;
        assert_eq!(good(s.execute(&c, &mut b)), 32);
        assert_eq!(u64::from_be_bytes(b[0..8].try_into().unwrap()), blocks - 1);
        assert_eq!(u32::from_be_bytes(b[8..12].try_into().unwrap()), logical);
        assert_eq!(b[13] & 0xF, exp);
        assert_eq!(b[14] & 0xC0, 0xC0, "LBPME + LBPRZ");
        c[1] = 0x11;
        assert_eq!(check(s.execute(&c, &mut b)), Sense::INVALID_OPCODE);
    }
}

#[test]
fn mode_sense_pages_and_write_protect() {
    let mut s = lun(test_disk(1 << 20, 512, 512, false));
    let mut b = vec![0u8; 255];
    let n = good(s.execute(&[MODE_SENSE_6, 0, 0x08, 0, 255, 0], &mut b));
    assert_eq!(n, 24);
    assert_eq!(b[0] as usize, n - 1);
    assert_eq!(b[2], 0x10, "DPOFUA, not write protected");
    assert_eq!(&b[4..7], &[0x08, 0x12, 0x04]);
    let n = good(s.execute(&[MODE_SENSE_10, 0, 0x3F, 0, 0, 0, 0, 0, 255, 0], &mut b));
    assert_eq!(u16::from_be_bytes([b[0], b[1]]) as usize, n - 2);
    assert_eq!(n, 8 + 20 + 12);
    assert_eq!(b[8], 0x08);
    assert_eq!(b[28], 0x0A);
    // Changeable values: WCE not changeable.
    good(s.execute(&[MODE_SENSE_6, 0, 0x48, 0, 255, 0], &mut b));
    assert_eq!(b[6], 0);
    assert_eq!(
        check(s.execute(&[MODE_SENSE_6, 0, 0x1C, 0, 255, 0], &mut b)),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        check(s.execute(&[MODE_SENSE_6, 0, 0xC8, 0, 255, 0], &mut b)),
        Sense::SAVING_PARAMETERS_NOT_SUPPORTED
    );
    let mut ro = lun(test_disk(1 << 20, 512, 512, true));
    good(ro.execute(&[MODE_SENSE_6, 0, 0x3F, 0, 255, 0], &mut b));
    assert_eq!(b[2] & 0x80, 0x80, "WP");
    good(ro.execute(&[MODE_SENSE_10, 0, 0x08, 0, 0, 0, 0, 0, 255, 0], &mut b));
    assert_eq!(b[3] & 0x80, 0x80, "WP");
}

#[test]
fn read_write_all_cdb_sizes_and_fua() {
    let mut s = lun(test_disk(4 << 20, 512, 512, false));
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 13 + 7) as u8).collect();
    // WRITE(6) at LBA 3, 2 blocks.
    let mut b = data[..1024].to_vec();
    assert_eq!(good(s.execute(&[WRITE_6, 0, 0, 3, 2, 0], &mut b)), 1024);
    // WRITE(10) with FUA at LBA 10, 4 blocks.
    let mut b = data[..2048].to_vec();
    good(s.execute(&[WRITE_10, 8, 0, 0, 0, 10, 0, 0, 4, 0], &mut b));
    // WRITE(12) at LBA 100, 16 blocks.
    let mut b = data.clone();
    good(s.execute(&[WRITE_12, 0, 0, 0, 0, 100, 0, 0, 0, 16, 0, 0], &mut b));
    // WRITE(16) at LBA 8000.
    let mut b = data.clone();
    good(s.execute(&rw16(WRITE_16, 8000, 16, true), &mut b));
    let mut r = vec![0u8; 8192];
    assert_eq!(good(s.execute(&[READ_6, 0, 0, 3, 2, 0], &mut r)), 1024);
    assert_eq!(&r[..1024], &data[..1024]);
    good(s.execute(&[READ_10, 0, 0, 0, 0, 10, 0, 0, 4, 0], &mut r));
    assert_eq!(&r[..2048], &data[..2048]);
    good(s.execute(&[READ_12, 0, 0, 0, 0, 100, 0, 0, 0, 16, 0, 0], &mut r));
    assert_eq!(r, data);
    r.fill(0);
    good(s.execute(&rw16(READ_16, 8000, 16, false), &mut r));
    assert_eq!(r, data);
    // Zero-length transfer is fine.
    assert_eq!(good(s.execute(&rw16(READ_16, 0, 0, false), &mut r)), 0);
    // READ(6) with length 0 means 256 blocks: the buffer is too small.
    assert_eq!(
        check(s.execute(&[READ_6, 0, 0, 0, 0, 0], &mut r)),
        Sense::INVALID_FIELD_IN_CDB
    );
    // Out of range, including overflow.
    assert_eq!(
        check(s.execute(&rw16(READ_16, 8191, 2, false), &mut r)),
        Sense::LBA_OUT_OF_RANGE
    );
    assert_eq!(
        check(s.execute(&rw16(WRITE_16, u64::MAX, 1, false), &mut r)),
        Sense::LBA_OUT_OF_RANGE
    );
    // Short CDB.
    assert_eq!(
        check(s.execute(&[READ_16, 0, 0, 0], &mut r)),
        Sense::INVALID_FIELD_IN_CDB
    );
    good(s.execute(&[SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &mut r));
    good(s.execute(
        &[
            SYNCHRONIZE_CACHE_16,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ],
        &mut r,
    ));
    good(s.execute(&[VERIFY_10, 0, 0, 0, 0, 0, 0, 0, 8, 0], &mut r));
}

#[test]
fn four_k_sectors() {
    let d = test_disk(4 << 20, 4096, 4096, false);
    let mut s = lun(d.clone());
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let mut b = data.clone();
    assert_eq!(good(s.execute(&rw16(WRITE_16, 5, 2, false), &mut b)), 8192);
    let mut raw = vec![0u8; 8192];
    d.read_at(&mut raw, 5 * 4096).unwrap();
    assert_eq!(raw, data);
    assert_eq!(
        check(s.execute(&rw16(READ_16, 1023, 2, false), &mut b)),
        Sense::LBA_OUT_OF_RANGE
    );
}

#[test]
fn unmap_and_write_same() {
    let d = test_disk(1 << 20, 512, 512, false);
    let mut s = lun(d.clone());
    d.write_at(&[0xAB; 1 << 20], 0).unwrap();
    // UNMAP two descriptors.
    let mut list = vec![0u8; 8 + 32];
    list[0..2].copy_from_slice(&38u16.to_be_bytes());
    list[2..4].copy_from_slice(&32u16.to_be_bytes());
    list[8..16].copy_from_slice(&4u64.to_be_bytes());
    list[16..20].copy_from_slice(&4u32.to_be_bytes());
    list[24..32].copy_from_slice(&100u64.to_be_bytes());
    list[32..36].copy_from_slice(&1u32.to_be_bytes());
    let cdb = [UNMAP, 0, 0, 0, 0, 0, 0, 0, 40, 0];
    good(s.execute(&cdb, &mut list.clone()));
    let mut b = vec![0u8; 512 * 8];
    d.read_at(&mut b, 0).unwrap();
    assert!(b[..2048].iter().all(|&x| x == 0xAB));
    assert!(b[2048..4096].iter().all(|&x| x == 0));
    let mut one = vec![0u8; 512];
    d.read_at(&mut one, 100 * 512).unwrap();
    assert!(disk::is_zero(&one));
    // Parameter list errors.
    assert_eq!(
        check(s.execute(&[UNMAP, 0, 0, 0, 0, 0, 0, 0, 4, 0], &mut list.clone())),
        Sense::PARAMETER_LIST_LENGTH_ERROR
    );
    let mut bad = list.clone();
    bad[8..16].copy_from_slice(&2047u64.to_be_bytes());
    assert_eq!(check(s.execute(&cdb, &mut bad)), Sense::LBA_OUT_OF_RANGE);
    // Nothing changed by the failed list (checked before acting): block 100 region intact.
    let mut many = vec![0u8; 8 + 16 * 65];
    many[2..4].copy_from_slice(&((16 * 65) as u16).to_be_bytes());
    let len = many.len() as u16;
    let mut c = cdb;
    c[7..9].copy_from_slice(&len.to_be_bytes());
    assert_eq!(
        check(s.execute(&c, &mut many)),
        Sense::INVALID_FIELD_IN_PARAMETER_LIST
    );
    // Zero-length parameter list is a no-op.
    good(s.execute(&[UNMAP, 0, 0, 0, 0, 0, 0, 0, 0, 0], &mut Vec::new()));

    // WRITE SAME(16) with UNMAP and a zero block.
    let mut ws = [0u8; 16];
    ws[0] = WRITE_SAME_16;
    ws[1] = 0x08;
    ws[2..10].copy_from_slice(&200u64.to_be_bytes());
    ws[10..14].copy_from_slice(&10u32.to_be_bytes());
    good(s.execute(&ws, &mut vec![0u8; 512]));
    let mut b = vec![0u8; 5120];
    d.read_at(&mut b, 200 * 512).unwrap();
    assert!(disk::is_zero(&b));
    // WRITE SAME with a pattern block.
    ws[1] = 0;
    let pat: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
    good(s.execute(&ws, &mut pat.clone()));
    d.read_at(&mut b, 200 * 512).unwrap();
    for blk in b.chunks(512) {
        assert_eq!(blk, &pat[..]);
    }
    // NDOB: no data-out buffer, zeros.
    ws[1] = 0x09;
    good(s.execute(&ws, &mut Vec::new()));
    d.read_at(&mut b, 200 * 512).unwrap();
    assert!(disk::is_zero(&b));
    // WSNZ: zero blocks is invalid.
    ws[10..14].copy_from_slice(&0u32.to_be_bytes());
    assert_eq!(
        check(s.execute(&ws, &mut Vec::new())),
        Sense::INVALID_FIELD_IN_CDB
    );
    // WRITE SAME(10) too.
    let mut w10 = [WRITE_SAME_10, 0, 0, 0, 0, 50, 0, 0, 2, 0];
    good(s.execute(&w10, &mut pat.clone()));
    w10[7..9].copy_from_slice(&3000u16.to_be_bytes());
    assert_eq!(
        check(s.execute(&w10, &mut pat.clone())),
        Sense::LBA_OUT_OF_RANGE
    );
}

#[test]
fn read_only_disk() {
    let mut s = lun(test_disk(1 << 20, 512, 512, true));
    let mut b = vec![0u8; 4096];
    good(s.execute(&rw16(READ_16, 0, 8, false), &mut b));
    assert_eq!(
        check(s.execute(&rw16(WRITE_16, 0, 8, false), &mut b)),
        Sense::WRITE_PROTECTED
    );
    assert_eq!(
        check(s.execute(&[WRITE_6, 0, 0, 0, 1, 0], &mut b)),
        Sense::WRITE_PROTECTED
    );
    assert_eq!(
        check(s.execute(&[UNMAP, 0, 0, 0, 0, 0, 0, 0, 24, 0], &mut b)),
        Sense::WRITE_PROTECTED
    );
    let mut ws = [0u8; 16];
    ws[0] = WRITE_SAME_16;
    ws[13] = 1;
    assert_eq!(check(s.execute(&ws, &mut b)), Sense::WRITE_PROTECTED);
    let mut c = [0u8; 16];
    c[0] = SERVICE_ACTION_IN_16;
    c[1] = SA_READ_CAPACITY_16;
    c[13] = 32;
    good(s.execute(&c, &mut b));
    assert_eq!(b[14] & 0x80, 0, "no LBPME on a read-only disk");
    let f = Sense::WRITE_PROTECTED.fixed();
    assert_eq!((f[0], f[2], f[7], f[12], f[13]), (0x70, 7, 10, 0x27, 0));
}

#[test]
fn backend_errors_are_medium_errors() {
    let d = test_disk(1 << 20, 512, 512, false);
    let mut s = lun(d.clone());
    let mut b = vec![0u8; 4096];
    d.fail_reads.store(true, Ordering::Relaxed);
    assert_eq!(
        check(s.execute(&rw16(READ_16, 0, 8, false), &mut b)),
        Sense::UNRECOVERED_READ_ERROR
    );
    d.fail_reads.store(false, Ordering::Relaxed);
    d.fail_writes.store(true, Ordering::Relaxed);
    assert_eq!(
        check(s.execute(&rw16(WRITE_16, 0, 8, false), &mut b)),
        Sense::WRITE_ERROR
    );
    assert_eq!(
        check(s.execute(&[SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &mut b)),
        Sense::WRITE_ERROR
    );
    assert_eq!(Sense::WRITE_ERROR.key, 3);
    assert_eq!(Sense::UNRECOVERED_READ_ERROR.asc, 0x11);
}

#[test]
fn unsupported_commands() {
    let mut s = lun(test_disk(1 << 20, 512, 512, false));
    let mut b = vec![0u8; 512];
    for cdb in [
        vec![PERSISTENT_RESERVE_IN, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        vec![PERSISTENT_RESERVE_OUT, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        vec![0xC0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        vec![0x15, 0, 0, 0, 0, 0], // MODE SELECT
        vec![],
    ] {
        assert_eq!(
            check(s.execute(&cdb, &mut b)),
            Sense::INVALID_OPCODE,
            "{cdb:x?}"
        );
    }
    good(s.execute(&[TEST_UNIT_READY, 0, 0, 0, 0, 0], &mut b));
    good(s.execute(&[START_STOP_UNIT, 0, 0, 0, 1, 0], &mut b));
    good(s.execute(&[PREVENT_ALLOW, 0, 0, 0, 1, 0], &mut b));
    assert_eq!(
        good(s.execute(&[REQUEST_SENSE, 0, 0, 0, 18, 0], &mut b)),
        18
    );
    assert_eq!((b[0], b[2]), (0x70, 0));
}

#[test]
fn controller_addresses_luns() {
    let mut c = ScsiController::new();
    c.add_lun(0, lun(test_disk(1 << 20, 512, 512, false)))
        .unwrap();
    c.add_lun(3, lun(test_disk(2 << 20, 4096, 4096, false)))
        .unwrap();
    assert!(c
        .add_lun(3, lun(test_disk(1 << 20, 512, 512, false)))
        .is_err());
    let mut b = vec![0u8; 64];
    let rl = [REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0];
    // Addressed to any LUN of target 0, even an absent one.
    for l in [0, 3, 7] {
        assert_eq!(good(c.execute(0, 0, l, &rl, &mut b)), 24);
        assert_eq!(&b[0..4], &[0, 0, 0, 16]);
        assert_eq!((b[9], b[17]), (0, 3));
    }
    // Another target: empty list.
    assert_eq!(good(c.execute(0, 1, 0, &rl, &mut b)), 8);
    assert_eq!(&b[0..4], &[0, 0, 0, 0]);
    // Allocation length under 16 is invalid.
    let mut short = rl;
    short[9] = 8;
    assert_eq!(
        check(c.execute(0, 0, 0, &short, &mut b)),
        Sense::INVALID_FIELD_IN_CDB
    );
    // Absent LUN: INQUIRY says PQ 3, VPD fails, other commands say "no LUN".
    let n = good(c.execute(0, 0, 5, &[INQUIRY, 0, 0, 0, 36, 0], &mut b));
    assert_eq!((n, b[0]), (36, 0x7F));
    assert!(
        b[8..36].iter().all(|&x| x == 0),
        "no vendor strings at LUN != 0"
    );
    good(c.execute(2, 0, 0, &[INQUIRY, 0, 0, 0, 36, 0], &mut b));
    assert_eq!((b[0], &b[8..12]), (0x7F, &b"Msft"[..]));
    assert_eq!(
        check(c.execute(0, 0, 5, &[INQUIRY, 1, 0, 0, 36, 0], &mut b)),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        c.execute(0, 0, 5, &rw16(READ_16, 0, 1, false), &mut b),
        Completion::NoLun
    );
    assert_eq!(
        c.execute(0, 1, 0, &[TEST_UNIT_READY, 0, 0, 0, 0, 0], &mut b),
        Completion::NoLun
    );
    // LUN 3 has 4 KiB blocks.
    let mut rc = [0u8; 16];
    rc[0] = SERVICE_ACTION_IN_16;
    rc[1] = SA_READ_CAPACITY_16;
    rc[13] = 32;
    good(c.execute(0, 0, 3, &rc, &mut b));
    assert_eq!(u32::from_be_bytes(b[8..12].try_into().unwrap()), 4096);
    assert_eq!(u64::from_be_bytes(b[0..8].try_into().unwrap()), 511);
}

#[test]
fn sector_size_is_validated() {
    let d = Arc::new(
        RawDisk::memory(1 << 20)
            .unwrap()
            .with_logical_sector_size(1000),
    );
    assert!(ScsiDisk::new(d).is_err());
    let d = Arc::new(RawDisk::memory(100).unwrap());
    assert!(ScsiDisk::new(d).is_err());
}

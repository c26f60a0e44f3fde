//! Hand-built dirty images: pending log entries (one entry, a wrapped two-entry sequence, a
//! torn last entry) replay to the expected bytes; read-only opens replay in memory only.

mod common;

use std::sync::Arc;

use common::*;
use disk::{BlockDevice, MemStorage, Storage};
use vhdx::format::{bat_entry, Header, PB_FULLY_PRESENT};
use vhdx::{CreateKind, CreateOptions, OpenOptions, VhdxDisk};

const MIB: u64 = 1 << 20;

struct Base {
    bytes: Vec<u8>,
    bat_offset: u64,
    log_offset: u64,
    log_len: u64,
}

fn base() -> Base {
    let s = Arc::new(MemStorage::new());
    let d = VhdxDisk::create_on(
        s.clone(),
        &CreateOptions::new(CreateKind::Dynamic, 16 * MIB),
    )
    .unwrap();
    d.write_at(&vec![0xa5; MIB as usize], 0).unwrap();
    let i = d.info();
    d.close().unwrap();
    drop(d);
    Base {
        bytes: s.to_vec(),
        bat_offset: i.bat_offset,
        log_offset: i.log_offset,
        log_len: i.log_length as u64,
    }
}

/// Puts `entry` into the ring at `at`, wrapping.
fn put_ring(b: &mut [u8], log_offset: u64, log_len: u64, at: u64, entry: &[u8]) {
    for (i, byte) in entry.iter().enumerate() {
        let p = (at + i as u64) % log_len;
        b[(log_offset + p) as usize] = *byte;
    }
}

/// Makes the image's current header carry `guid` as LogGuid (written to the other slot).
fn set_log_guid(b: &mut [u8], guid: disk::Guid) {
    let h1 = Header::parse(&b[65536..65536 + 4096], 65536).unwrap();
    let h2 = Header::parse(&b[131072..131072 + 4096], 131072).unwrap();
    let (cur, other) = if h1.sequence > h2.sequence {
        (h1, 131072usize)
    } else {
        (h2, 65536usize)
    };
    let mut n = cur.clone();
    n.sequence += 1;
    n.log_guid = guid;
    b[other..other + 4096].copy_from_slice(&n.serialize());
}

/// BAT page 0 with blocks (index, offset) made FULLY_PRESENT.
fn bat_page(b: &[u8], bat_offset: u64, blocks: &[(u64, u64)]) -> Vec<u8> {
    let mut p = b[bat_offset as usize..bat_offset as usize + 4096].to_vec();
    for &(blk, off) in blocks {
        // 16 MiB disk, chunk ratio 4096: payload index == block.
        p[blk as usize * 8..blk as usize * 8 + 8]
            .copy_from_slice(&bat_entry(PB_FULLY_PRESENT, off).to_le_bytes());
    }
    p
}

enum Variant {
    Single,
    /// A page image plus a zero descriptor that wipes block 0's data.
    Zero,
    Wrapped,
    TornLast,
}

/// Returns the dirty image and the expected (block, byte) pairs after replay.
fn dirty_image(v: &Variant) -> (Vec<u8>, Vec<(u64, u8)>) {
    let base = base();
    let mut b = base.bytes.clone();
    let guid = disk::Guid::new_random().unwrap();
    let end = (b.len() as u64).div_ceil(MIB) * MIB;
    // Data for the new blocks is already in the file (written before the log entry).
    let blk2 = end;
    let blk3 = end + MIB;
    b.resize((end + 2 * MIB) as usize, 0);
    b[blk2 as usize..(blk2 + MIB) as usize].fill(0xb2);
    b[blk3 as usize..(blk3 + MIB) as usize].fill(0xc3);
    let p1 = bat_page(&b, base.bat_offset, &[(2, blk2)]);
    let p2 = bat_page(&b, base.bat_offset, &[(2, blk2), (3, blk3)]);
    // The entries record the length the file must have after replay.
    let last = end + 2 * MIB;
    let expected;
    match v {
        Variant::Single => {
            let e = vhdx::log::build_entry(1, 0, &guid, end, last, &[(base.bat_offset, &p1)]);
            put_ring(&mut b, base.log_offset, base.log_len, 0, &e);
            expected = vec![(0, 0xa5), (2, 0xb2), (3, 0)];
        }
        Variant::Zero => {
            let blk0 = vhdx::format::bat_offset(u64::from_le_bytes(
                b[base.bat_offset as usize..base.bat_offset as usize + 8]
                    .try_into()
                    .unwrap(),
            ));
            let e = vhdx::log::build_entry_with_zeros(
                7,
                8192,
                &guid,
                end,
                last,
                &[(base.bat_offset, &p1)],
                &[(blk0, MIB)],
            );
            put_ring(&mut b, base.log_offset, base.log_len, 8192, &e);
            expected = vec![(0, 0), (2, 0xb2), (3, 0)];
        }
        Variant::Wrapped | Variant::TornLast => {
            // Entry 1 starts one page before the end of the ring and wraps; entry 2 follows.
            let at1 = base.log_len - 4096;
            let e1 =
                vhdx::log::build_entry(41, at1 as u32, &guid, end, last, &[(base.bat_offset, &p1)]);
            put_ring(&mut b, base.log_offset, base.log_len, at1, &e1);
            let at2 = (at1 + e1.len() as u64) % base.log_len;
            let mut e2 =
                vhdx::log::build_entry(42, at1 as u32, &guid, end, last, &[(base.bat_offset, &p2)]);
            if matches!(v, Variant::TornLast) {
                // Only the first sector of the last entry reached the disk.
                for x in e2.iter_mut().skip(4096) {
                    *x = 0;
                }
                expected = vec![(0, 0xa5), (2, 0xb2), (3, 0)];
            } else {
                expected = vec![(0, 0xa5), (2, 0xb2), (3, 0xc3)];
            }
            put_ring(&mut b, base.log_offset, base.log_len, at2, &e2);
        }
    }
    set_log_guid(&mut b, guid);
    (b, expected)
}

fn verify(d: &VhdxDisk, expected: &[(u64, u8)]) {
    let mut buf = vec![0u8; MIB as usize];
    for &(blk, val) in expected {
        d.read_at(&mut buf, blk * MIB).unwrap();
        assert!(
            buf.iter().all(|&x| x == val),
            "block {blk} should be {val:#x}"
        );
    }
}

#[test]
fn dirty_logs_replay_read_only_and_read_write() {
    for v in [
        Variant::Single,
        Variant::Zero,
        Variant::Wrapped,
        Variant::TornLast,
    ] {
        let (img, expected) = dirty_image(&v);
        // Read-only: replayed data visible, file untouched.
        let s = Arc::new(MemStorage::from_vec(img.clone()));
        let d = VhdxDisk::open(s.clone(), &OpenOptions { read_only: true }).unwrap();
        assert!(d.dirty());
        verify(&d, &expected);
        drop(d);
        assert!(s.to_vec() == img, "read-only open modified the file");

        // Read-write: replayed in place, then clean.
        let s = Arc::new(MemStorage::from_vec(img.clone()));
        let d = VhdxDisk::open(s.clone(), &OpenOptions::default()).unwrap();
        assert!(d.dirty());
        assert!(d.info().replayed_log_entries >= 1);
        verify(&d, &expected);
        d.close().unwrap();
        drop(d);
        let d = VhdxDisk::open(s.clone(), &OpenOptions { read_only: true }).unwrap();
        assert!(!d.dirty());
        verify(&d, &expected);
        drop(d);
        let rep = vhdx::check(s.clone(), disk::check::Repair::None).unwrap();
        assert_eq!(rep.corruptions, 0, "{:?}", rep.findings);

        // Check reports the dirty log, and -r replays it.
        let s = Arc::new(MemStorage::from_vec(img.clone()));
        let rep = vhdx::check(s.clone(), disk::check::Repair::None).unwrap();
        assert_eq!(rep.corruptions, 1, "{:?}", rep.findings);
        let rep = vhdx::check(s.clone(), disk::check::Repair::All).unwrap();
        assert_eq!(rep.corruptions_fixed, 1, "{:?}", rep.findings);
        let rep = vhdx::check(s, disk::check::Repair::None).unwrap();
        assert_eq!(rep.corruptions, 0, "{:?}", rep.findings);
    }
}

#[test]
fn qemu_replays_our_dirty_logs() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, v) in [
        Variant::Single,
        Variant::Zero,
        Variant::Wrapped,
        Variant::TornLast,
    ]
    .iter()
    .enumerate()
    {
        let (img, expected) = dirty_image(v);
        let p = dir.path().join(format!("dirty{i}.vhdx"));
        std::fs::write(&p, &img).unwrap();
        // qemu refuses a read-only open of a dirty image; check -r all replays it.
        run(
            "qemu-img",
            &[
                "check",
                "-q",
                "-r",
                "all",
                "-f",
                "vhdx",
                p.to_str().unwrap(),
            ],
        );
        let raw = dir.path().join(format!("dirty{i}.raw"));
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "vhdx",
                "-O",
                "raw",
                p.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        let r = std::fs::read(&raw).unwrap();
        for &(blk, val) in &expected {
            let s = &r[(blk * MIB) as usize..((blk + 1) * MIB) as usize];
            assert!(s.iter().all(|&x| x == val), "qemu: variant {i} block {blk}");
        }
    }
}

#[test]
fn bad_structures_fail_cleanly() {
    let base = base();
    // Corrupt header 1 only: header 2 is used.
    let mut b = base.bytes.clone();
    b[65536 + 100] ^= 0xff;
    let d = VhdxDisk::open(
        Arc::new(MemStorage::from_vec(b.clone())),
        &OpenOptions { read_only: true },
    )
    .unwrap();
    verify(&d, &[(0, 0xa5)]);
    drop(d);
    // Disk2vhd style: two identical headers with equal sequence numbers open; differing ones
    // with equal sequence numbers do not.
    let mut b = base.bytes.clone();
    let h2 = b[131072..131072 + 4096].to_vec();
    b[65536..65536 + 4096].copy_from_slice(&h2);
    VhdxDisk::open(
        Arc::new(MemStorage::from_vec(b.clone())),
        &OpenOptions { read_only: true },
    )
    .unwrap();
    let mut h = Header::parse(&h2, 131072).unwrap();
    h.log_offset = 2 * MIB;
    b[65536..65536 + 4096].copy_from_slice(&h.serialize());
    let e = VhdxDisk::open(
        Arc::new(MemStorage::from_vec(b)),
        &OpenOptions { read_only: true },
    )
    .unwrap_err();
    assert!(e.to_string().contains("differ"), "{e}");
    // An unknown metadata item marked required is refused with a clear message.
    let mut b = base.bytes.clone();
    let meta = VhdxDisk::open(
        Arc::new(MemStorage::from_vec(b.clone())),
        &OpenOptions { read_only: true },
    )
    .unwrap()
    .info()
    .metadata_offset as usize;
    // Entry 0 (file parameters) gets another GUID: now unknown and required (and the file
    // parameters item is gone).
    b[meta + 32] ^= 0x55;
    let e = VhdxDisk::open(
        Arc::new(MemStorage::from_vec(b)),
        &OpenOptions { read_only: true },
    )
    .unwrap_err();
    assert!(matches!(e, disk::Error::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("required"), "{e}");
    // Corrupt region table 1: table 2 is used.
    let mut b = base.bytes.clone();
    b[196608 + 40] ^= 0xff;
    VhdxDisk::open(
        Arc::new(MemStorage::from_vec(b)),
        &OpenOptions { read_only: true },
    )
    .unwrap();
    // check reports the bad copy and -r all rewrites it from the good one.
    let mut b = base.bytes.clone();
    b[196608 + 40] ^= 0xff;
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(b));
    let rep = vhdx::check(s.clone(), disk::check::Repair::None).unwrap();
    assert_eq!(rep.corruptions, 1, "{:?}", rep.findings);
    let rep = vhdx::check(s.clone(), disk::check::Repair::All).unwrap();
    assert_eq!(rep.corruptions_fixed, 1, "{:?}", rep.findings);
    let rep = vhdx::check(s, disk::check::Repair::None).unwrap();
    assert_eq!(rep.corruptions, 0, "{:?}", rep.findings);
    // Both headers bad: Corrupt error, no panic.
    let mut b = base.bytes.clone();
    b[65536 + 100] ^= 0xff;
    b[131072 + 100] ^= 0xff;
    let e = VhdxDisk::open(
        Arc::new(MemStorage::from_vec(b)),
        &OpenOptions { read_only: true },
    )
    .unwrap_err();
    assert!(matches!(e, disk::Error::Corrupt { .. }), "{e}");
    // A BAT entry past the end of the file.
    let mut b = base.bytes.clone();
    let o = base.bat_offset as usize + 8;
    b[o..o + 8].copy_from_slice(&bat_entry(PB_FULLY_PRESENT, 1 << 40).to_le_bytes());
    let e = VhdxDisk::open(
        Arc::new(MemStorage::from_vec(b.clone())),
        &OpenOptions { read_only: true },
    )
    .unwrap_err();
    assert!(e.to_string().contains("BAT"), "{e}");
    let rep = vhdx::check(Arc::new(MemStorage::from_vec(b)), disk::check::Repair::None).unwrap();
    assert!(rep
        .findings
        .iter()
        .any(|f| f.message.contains("probably been truncated")));
    // Random garbage everywhere past the identifier never panics.
    let mut rng = disk::fault::SplitMix(99);
    for _ in 0..300 {
        let mut b = base.bytes.clone();
        for _ in 0..1 + rng.below(8) {
            let region = [
                65536u64,
                131072,
                196608,
                262144,
                base.bat_offset,
                2 * MIB,
                base.log_offset,
            ];
            let at = region[rng.below(region.len() as u64) as usize] + rng.below(4096);
            b[at as usize] = rng.next_u64() as u8;
        }
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(b));
        if let Ok(d) = VhdxDisk::open(s.clone(), &OpenOptions { read_only: true }) {
            let mut buf = vec![0u8; 65536];
            let _ = d.read_at(&mut buf, 0);
        }
        let _ = vhdx::check(s, disk::check::Repair::None);
    }
}

#[test]
fn corrupted_logs_never_panic() {
    let (img, _) = dirty_image(&Variant::Wrapped);
    let b0 = base();
    let mut rng = disk::fault::SplitMix(3);
    for i in 0..200 {
        let mut b = img.clone();
        for _ in 0..1 + rng.below(6) {
            // Hit entry headers, descriptors and data sectors at both ends of the ring.
            let at = if rng.below(2) == 0 {
                b0.log_offset + b0.log_len - 4096 + rng.below(4096)
            } else {
                b0.log_offset + rng.below(3 * 4096)
            };
            let v = rng.next_u64() as u8;
            b[at as usize] = v;
            // Sometimes fix the CRC so the damage reaches the field checks.
            if i % 2 == 0 {
                let start = (b0.log_offset + b0.log_len - 4096) as usize;
                let mut e = b[start..start + 4096].to_vec();
                e.extend_from_slice(&b[b0.log_offset as usize..b0.log_offset as usize + 4096]);
                let c = vhdx::format::crc32c_skip(&e, 4);
                b[start + 4..start + 8].copy_from_slice(&c.to_le_bytes());
            }
        }
        for read_only in [true, false] {
            let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(b.clone()));
            if let Ok(d) = VhdxDisk::open(s, &OpenOptions { read_only }) {
                let mut buf = vec![0u8; 4 * MIB as usize];
                let _ = d.read_at(&mut buf, 0);
            }
        }
    }
}

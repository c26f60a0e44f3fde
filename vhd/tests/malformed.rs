//! Hostile input: typed errors, no panics, bounded memory.

mod common;

use std::sync::Arc;

use disk::fault::SplitMix;
use disk::{BlockDevice, Error, MemStorage, Storage};
use vhd::{CreateKind, CreateOptions, OpenOptions, VhdDisk};

const MIB: u64 = 1 << 20;

fn open(bytes: Vec<u8>) -> disk::Result<VhdDisk> {
    VhdDisk::open(
        Arc::new(MemStorage::from_vec(bytes)),
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
}

/// A small dynamic image with two allocated blocks (64 KiB blocks).
fn dynamic_image() -> Vec<u8> {
    let s = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(CreateKind::Dynamic, MIB);
    o.block_size = 64 << 10;
    let d = disk::Disk::new(Arc::new(VhdDisk::create_on(s.clone(), &o).unwrap()));
    d.write_at(&common::pattern(70_000, 1), 1000).unwrap();
    d.flush().unwrap();
    drop(d);
    s.to_vec()
}

fn differencing_image() -> Vec<u8> {
    let parent: Arc<dyn BlockDevice> = Arc::new(
        VhdDisk::create_on(
            Arc::new(MemStorage::new()),
            &CreateOptions::new(CreateKind::Dynamic, MIB),
        )
        .unwrap(),
    );
    let s = Arc::new(MemStorage::new());
    let kind = CreateKind::Differencing {
        parent_path: "/images/parent.vhd".into(),
        parent,
    };
    let d = VhdDisk::create_on(s.clone(), &CreateOptions::new(kind, 0)).unwrap();
    d.write_at(&[9u8; 1024], 512).unwrap();
    d.flush().unwrap();
    drop(d);
    s.to_vec()
}

fn be32(v: &mut [u8], off: usize, x: u32) {
    v[off..off + 4].copy_from_slice(&x.to_be_bytes());
}

/// Recomputes the footer checksum (so tests hit the check they mean, not the checksum).
fn fix_footer(v: &mut [u8], at: usize) {
    v[at + 64..at + 68].fill(0);
    let sum: u32 = v[at..at + 512].iter().map(|&b| b as u32).sum();
    be32(v, at + 64, !sum);
}

fn set_footer_field(v: &mut [u8], off: usize, bytes: &[u8]) {
    let n = v.len();
    for at in [0, n - 512] {
        v[at + off..at + off + bytes.len()].copy_from_slice(bytes);
        fix_footer(v, at);
    }
}

fn corrupt_structure(e: &Error) -> &'static str {
    match e {
        Error::Corrupt { structure, .. } => structure,
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// Opening (and, if it opens, reading everything and checking) must never panic.
fn exercise(bytes: Vec<u8>) {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes));
    if let Ok(d) = VhdDisk::open(
        s.clone(),
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    ) {
        let size = d.size();
        let mut buf = vec![0u8; 64 << 10];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(buf.len() as u64) as usize;
            let _ = d.read_at(&mut buf[..n], off);
            let _ = d.block_status(off, n as u64);
            off += n as u64;
        }
        let _ = d.format_specific();
        let _ = d.parent_link();
    }
    let _ = vhd::check(s.clone(), disk::check::Repair::None);
    // Writable open of a private copy: writes, resize, compact and repair must not panic either.
    let copy: Vec<u8> = {
        let n = s.len().unwrap_or(0) as usize;
        let mut v = vec![0u8; n];
        let _ = s.read_at(&mut v, 0);
        v
    };
    let w: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(copy));
    if let Ok(d) = VhdDisk::open(w.clone(), &OpenOptions::default()) {
        let size = d.size();
        for off in [0, size / 2, size.saturating_sub(700)] {
            if off < size {
                let n = (size - off).min(700) as usize;
                let _ = d.write_at(&vec![0x5a; n], off);
            }
        }
        let _ = d.flush();
        let _ = d.resize(size + (1 << 20));
        let _ = d.compact();
        drop(d);
        let _ = VhdDisk::open(w.clone(), &OpenOptions::default());
    }
    let _ = vhd::check(w, disk::check::Repair::All);
}

#[test]
fn tiny_and_empty_files_are_not_vhd() {
    for len in [0usize, 100, 511] {
        let e = open(vec![0; len]).unwrap_err();
        assert!(matches!(e, Error::WrongFormat { .. }), "{e}");
        assert!(!VhdDisk::probe(&MemStorage::from_vec(vec![0; len])).unwrap());
    }
    assert!(matches!(
        open(vec![0; 4096]).unwrap_err(),
        Error::WrongFormat { .. }
    ));
}

#[test]
fn truncated_at_every_interesting_point() {
    let img = dynamic_image();
    let n = img.len();
    let mut cuts = vec![
        512,
        513,
        1000,
        1024,
        1535,
        1536,
        2047,
        2048,
        4095,
        4096,
        n / 2,
        n - 513,
        n - 512,
        n - 511,
        n - 1,
    ];
    cuts.extend((0..n).step_by(4093));
    for cut in cuts {
        let v = img[..cut].to_vec();
        exercise(v.clone());
        // Anything cut inside the allocated data must not open with garbage silently:
        // either a typed error or a consistent image.
        if let Ok(d) = open(v) {
            let mut b = vec![0u8; d.size() as usize];
            let _ = d.read_at(&mut b, 0);
        }
    }
    // Losing only the trailing footer: the copy at offset 0 is used, BAT entries into the lost
    // region are refused.
    let e = open(img[..n - 512].to_vec());
    match e {
        Ok(d) => assert!(d.info().warnings.iter().any(|w| w.contains("offset 0"))),
        Err(e) => assert_eq!(corrupt_structure(&e), "VHD BAT"),
    }
}

#[test]
fn bad_footer_checksum_is_a_warning_and_bad_type_an_error() {
    let mut img = dynamic_image();
    let n = img.len();
    for at in [0, n - 512] {
        img[at + 64] ^= 1;
    }
    let d = open(img.clone()).unwrap();
    assert!(d.info().warnings.iter().any(|w| w.contains("checksum")));
    set_footer_field(&mut img, 60, &7u32.to_be_bytes());
    let e = open(img).unwrap_err();
    assert_eq!(corrupt_structure(&e), "VHD footer");
}

#[test]
fn bat_entry_past_eof_or_on_metadata() {
    let img = dynamic_image();
    for bad in [0x7fff_fff0u32, 0, 2, 3] {
        let mut v = img.clone();
        be32(&mut v, 1536, bad);
        let e = open(v.clone()).unwrap_err();
        assert_eq!(corrupt_structure(&e), "VHD BAT", "entry {bad:#x}: {e}");
        let r = vhd::check(Arc::new(MemStorage::from_vec(v)), disk::check::Repair::All).unwrap();
        assert!(r.corruptions >= 1 && r.corruptions_fixed == 0, "{r:?}");
    }
}

#[test]
fn huge_table_claims_are_bounded_by_file_size() {
    let img = dynamic_image();
    // max_table_entries 2^32-1 with current_size 2 TiB in a ~200 KiB file: refused, no 16 GiB
    // allocation.
    let mut v = img.clone();
    be32(&mut v, 512 + 28, u32::MAX);
    set_footer_field(&mut v, 48, &(2u64 << 40).to_be_bytes());
    let e = open(v).unwrap_err();
    assert_eq!(corrupt_structure(&e), "VHD BAT");
    // current_size near 2^64 with tiny blocks: refused by max_table_entries.
    let mut v = img.clone();
    set_footer_field(&mut v, 48, &(u64::MAX - 4095).to_be_bytes());
    let e = open(v).unwrap_err();
    assert_eq!(corrupt_structure(&e), "VHD dynamic header");
    // A 4 KiB file claiming 2^32 entries.
    let mut v = img[..4096].to_vec();
    be32(&mut v, 512 + 28, u32::MAX);
    v.extend_from_slice(&img[img.len() - 512..]);
    let n = v.len();
    v[n - 512 + 48..n - 512 + 56].copy_from_slice(&(1u64 << 40).to_be_bytes());
    fix_footer(&mut v, n - 512);
    let t = std::time::Instant::now();
    assert!(open(v).is_err());
    assert!(t.elapsed().as_secs() < 2);
    // Fewer table entries than the size needs.
    let mut v = img.clone();
    be32(&mut v, 512 + 28, 3);
    assert_eq!(
        corrupt_structure(&open(v).unwrap_err()),
        "VHD dynamic header"
    );
}

#[test]
fn bad_block_sizes() {
    let img = dynamic_image();
    for bs in [0u32, 3000, 0x1234_5678, 0x8000_0000, 256] {
        let mut v = img.clone();
        be32(&mut v, 512 + 32, bs);
        match open(v).unwrap_err() {
            Error::Corrupt {
                structure, offset, ..
            } => {
                assert_eq!((structure, offset), ("VHD dynamic header", 512 + 32));
            }
            e => panic!("{e}"),
        }
    }
}

#[test]
fn bad_header_offset_and_cookie() {
    let img = dynamic_image();
    let mut v = img.clone();
    set_footer_field(&mut v, 16, &(1u64 << 50).to_be_bytes());
    assert_eq!(corrupt_structure(&open(v).unwrap_err()), "VHD footer");
    let mut v = img.clone();
    v[512] = b'X';
    assert_eq!(
        corrupt_structure(&open(v).unwrap_err()),
        "VHD dynamic header"
    );
}

#[test]
fn locators_out_of_range() {
    let img = differencing_image();
    assert!(open(img.clone()).is_ok());
    // Locator 0 offset far past EOF.
    let mut v = img.clone();
    v[512 + 576 + 16..512 + 576 + 24].copy_from_slice(&(1u64 << 40).to_be_bytes());
    assert_eq!(
        corrupt_structure(&open(v).unwrap_err()),
        "VHD parent locator"
    );
    // Offset + length overflows.
    let mut v = img.clone();
    v[512 + 576 + 16..512 + 576 + 24].copy_from_slice(&u64::MAX.to_be_bytes());
    assert_eq!(
        corrupt_structure(&open(v).unwrap_err()),
        "VHD parent locator"
    );
    // Absurd length.
    let mut v = img.clone();
    be32(&mut v, 512 + 576 + 8, u32::MAX);
    assert_eq!(
        corrupt_structure(&open(v).unwrap_err()),
        "VHD parent locator"
    );
    // Unpaired surrogate in the parent name: opens, lossy name, raw kept.
    let mut v = img.clone();
    v[512 + 64..512 + 66].copy_from_slice(&0xD800u16.to_be_bytes());
    let d = open(v).unwrap();
    assert!(d.parent_link().unwrap().name.starts_with('\u{FFFD}'));
    assert_eq!(d.parent_name_raw().unwrap()[0], 0xD800);
    assert!(d.info().warnings.iter().any(|w| w.contains("surrogate")));
}

#[test]
fn footer_quirks_511_bytes_and_copy_mismatch() {
    let img = dynamic_image();
    // 511-byte trailing footer.
    let v = img[..img.len() - 1].to_vec();
    let d = open(v.clone()).unwrap();
    assert!(d.info().warnings.iter().any(|w| w.contains("511")));
    assert!(VhdDisk::probe(&MemStorage::from_vec(v)).unwrap());
    // Copy at 0 differs (valid checksum on both): trailer wins, warning.
    let mut v = img.clone();
    v[40..48].copy_from_slice(&(3 * MIB).to_be_bytes());
    fix_footer(&mut v, 0);
    let d = open(v).unwrap();
    assert_eq!(d.size(), MIB);
    assert!(d.info().warnings.iter().any(|w| w.contains("differs")));
}

#[test]
fn random_corruption_never_panics() {
    let imgs = [dynamic_image(), differencing_image()];
    let mut rng = SplitMix(0x5eed);
    // VHD_FUZZ_ROUNDS=20000 for a longer local run.
    let rounds: usize = std::env::var("VHD_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    for round in 0..rounds {
        let base = &imgs[round % 2];
        let mut v = base.clone();
        let flips = 1 + rng.below(8);
        for _ in 0..flips {
            // Aim at the metadata most of the time.
            let at = if rng.below(4) == 0 {
                rng.below(v.len() as u64) as usize
            } else if rng.below(2) == 0 {
                rng.below(4096) as usize
            } else {
                v.len() - 1 - rng.below(512) as usize
            };
            v[at] = rng.next_u64() as u8;
        }
        exercise(v);
    }
}

/// Deprecated locators (Wi2r relative ANSI, Wi2k absolute ANSI, MacX file URL) are read, and
/// candidates come out in order: relative, absolute (+ slash form), child dir + name.
#[test]
fn deprecated_locators_and_candidate_order() {
    let mut v = differencing_image();
    let entry = |i: usize| 512 + 576 + 24 * i;
    let region = u64::from_be_bytes(v[entry(0) + 16..entry(0) + 24].try_into().unwrap()) as usize;
    let payloads: [(&[u8; 4], &[u8]); 3] = [
        (b"Wi2r", b"..\\base\\p.vhd\0"),
        (b"Wi2k", b"D:\\vms\\p.vhd"),
        (b"MacX", b"file:///Users/me/my%20vms/p.vhd"),
    ];
    for (i, (code, data)) in payloads.iter().enumerate() {
        let off = region + i * 1024;
        v[off..off + data.len()].copy_from_slice(data);
        let e = entry(i);
        v[e..e + 4].copy_from_slice(*code);
        // Platform data space in sectors (spec style): 2 sectors.
        be32(&mut v, e + 4, 2);
        be32(&mut v, e + 8, data.len() as u32);
        v[e + 16..e + 24].copy_from_slice(&(off as u64).to_be_bytes());
    }
    let d = open(v).unwrap();
    let info = d.info();
    let paths: Vec<_> = info
        .locators
        .iter()
        .map(|l| l.path.clone().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "..\\base\\p.vhd",
            "D:\\vms\\p.vhd",
            "/Users/me/my vms/p.vhd"
        ]
    );
    assert!(info.locators.iter().all(|l| l.data_space_bytes == 1024));
    let link = d.parent_link().unwrap();
    // No file path for a memory store: relative entries are relative to "". The Windows path
    // is not absolute here, so it is not tried (it would resolve against the working
    // directory); the POSIX absolute one is.
    let want: Vec<std::path::PathBuf> = ["../base/p.vhd", "/Users/me/my vms/p.vhd", "parent.vhd"]
        .iter()
        .map(Into::into)
        .collect();
    assert_eq!(chain::parent_candidates(None, &link), want);
    assert!(info.warnings.iter().any(|w| w.contains("header checksum")));
}

/// The BAT may sit at any byte offset (not sector aligned).
#[test]
fn bat_at_odd_offset() {
    let img = dynamic_image();
    let mut v = img.clone();
    // Move the 16-entry BAT from 1536 to 2049 (padding before the first block at 3584).
    let bat: Vec<u8> = img[1536..1536 + 64].to_vec();
    let new = 2049;
    v[new..new + 64].copy_from_slice(&bat);
    v[512 + 16..512 + 24].copy_from_slice(&(new as u64).to_be_bytes());
    let d = open(v).unwrap();
    let e = open(img).unwrap();
    let (mut a, mut b) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    d.read_at(&mut a, 0).unwrap();
    e.read_at(&mut b, 0).unwrap();
    assert!(a == b);
    assert_eq!(d.info().bat_offset, Some(new as u64));
}

/// A fixed disk whose guest data starts with a (dynamic) VHD footer: offset 0 is data, never a
/// footer copy, even when the trailer's checksum is bad.
#[test]
fn fixed_disk_with_vhd_inside_keeps_its_own_footer() {
    let inner = dynamic_image();
    let s = Arc::new(MemStorage::new());
    let d = VhdDisk::create_on(s.clone(), &CreateOptions::new(CreateKind::Fixed, MIB)).unwrap();
    d.write_at(&inner[..512], 0).unwrap();
    drop(d);
    let mut v = s.to_vec();
    let n = v.len();
    v[n - 512 + 64] ^= 0x55;
    let d = open(v).unwrap();
    let i = d.info();
    assert_eq!(i.disk_type, "fixed");
    assert_eq!(d.size(), MIB);
    assert!(
        !i.warnings.iter().any(|w| w.contains("offset 0")),
        "{:?}",
        i.warnings
    );
    let mut b = [0u8; 8];
    d.read_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"conectix");
}

/// More BAT entries than we are willing to hold is a typed Unsupported error.
#[test]
fn bat_entry_cap() {
    let mut v = dynamic_image();
    // 512-byte blocks and 1 TiB: 2^31 entries.
    be32(&mut v, 512 + 32, 512);
    be32(&mut v, 512 + 28, u32::MAX);
    set_footer_field(&mut v, 48, &(1u64 << 40).to_be_bytes());
    assert!(matches!(open(v).unwrap_err(), Error::Unsupported(_)));
}

/// blktap `tap\0` version 1 wrote LSB-first bitmaps: read them that way.
#[test]
fn blktap_lsb_bitmaps() {
    let mut v = differencing_image();
    let d = open(v.clone()).unwrap();
    let bat = d.info().bat_offset.unwrap() as usize;
    let e = u32::from_be_bytes(v[bat..bat + 4].try_into().unwrap()) as usize * 512;
    assert_eq!(v[e], 0x60, "sectors 1 and 2 set, MSB-first");
    for b in &mut v[e..e + 512] {
        *b = b.reverse_bits();
    }
    // Read as MSB-first, sector 5 now looks present: the quirk matters.
    assert!(matches!(
        open(v.clone())
            .unwrap()
            .block_status(5 * 512, 512)
            .unwrap()
            .allocation,
        disk::Allocation::Data { .. }
    ));
    set_footer_field(&mut v, 28, b"tap\0");
    set_footer_field(&mut v, 32, &1u32.to_be_bytes());
    let d = open(v).unwrap();
    assert!(d.info().warnings.iter().any(|w| w.contains("LSB")));
    for sector in [0, 5] {
        assert_eq!(
            d.block_status(sector * 512, 512).unwrap().allocation,
            disk::Allocation::Unallocated
        );
    }
    assert!(matches!(
        d.block_status(512, 1024).unwrap(),
        disk::Extent {
            len: 1024,
            allocation: disk::Allocation::Data { .. }
        }
    ));
    let mut b = [0u8; 1024];
    d.read_at(&mut b, 512).unwrap();
    assert_eq!(b, [9u8; 1024]);
}

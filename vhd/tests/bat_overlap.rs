//! Regression (reliability work, hostile image `vhd-bat-entries-overlap.vhd`): two BAT entries
//! whose blocks overlap used to open, so a write through one block silently changed the
//! other's data. An open now refuses it with a typed `Corrupt`; `check` still reports it.

mod common;

use std::sync::Arc;

use disk::check::Repair;
use disk::{BlockDevice, Error, MemStorage};
use vhd::{CreateKind, CreateOptions, OpenOptions, VhdDisk};

fn image() -> Vec<u8> {
    let s = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(CreateKind::Dynamic, 1 << 20);
    o.block_size = 64 << 10;
    let d = VhdDisk::create_on(s.clone(), &o).unwrap();
    d.write_at(&common::pattern(4096, 1), 0).unwrap();
    d.write_at(&common::pattern(4096, 2), 64 << 10).unwrap();
    d.flush().unwrap();
    drop(d);
    s.to_vec()
}

fn bat_offset(img: &[u8]) -> usize {
    u64::from_be_bytes(img[512 + 16..512 + 24].try_into().unwrap()) as usize
}

fn fix_header_checksum(img: &mut [u8]) {
    let mut sum: u32 = 0;
    for (i, &b) in img[512..1536].iter().enumerate() {
        if !(36..40).contains(&i) {
            sum = sum.wrapping_add(b as u32);
        }
    }
    img[512 + 36..512 + 40].copy_from_slice(&(!sum).to_be_bytes());
}

fn open(img: Vec<u8>, read_only: bool) -> disk::Result<VhdDisk> {
    VhdDisk::open(
        Arc::new(MemStorage::from_vec(img)),
        &OpenOptions {
            read_only,
            ..Default::default()
        },
    )
}

#[test]
fn overlapping_blocks_are_refused_at_open_and_reported_by_check() {
    let sound = image();
    assert!(open(sound.clone(), false).is_ok());
    let bat = bat_offset(&sound);
    for delta in [0u32, 1, 8] {
        // Entry 1 onto (or into) entry 0's block.
        let mut img = sound.clone();
        let first = u32::from_be_bytes(img[bat..bat + 4].try_into().unwrap());
        img[bat + 4..bat + 8].copy_from_slice(&(first + delta).to_be_bytes());
        fix_header_checksum(&mut img);
        for ro in [true, false] {
            match open(img.clone(), ro) {
                Err(Error::Corrupt { structure, .. }) => assert_eq!(structure, "VHD BAT"),
                other => panic!("delta {delta}: expected a corrupt BAT, got {other:?}"),
            }
        }
        let r = vhd::check(Arc::new(MemStorage::from_vec(img)), Repair::None).unwrap();
        assert!(r.corruptions > 0, "check must report the overlap: {r:?}");
    }
}

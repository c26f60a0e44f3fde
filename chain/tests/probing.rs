//! Probing rules that guest data of a raw disk cannot subvert, and the write guard `open`
//! puts on a raw image whose format was probed.

use std::path::Path;

use chain::{create, open, probe_explained, CreateSpec, Format, OpenOptions};
use disk::{Error, MemStorage};

fn fixed_vhd_bytes(dir: &Path, size: u64) -> Vec<u8> {
    let p = dir.join(format!("fixed-{size}.vhd"));
    let mut spec = CreateSpec::new(Format::Vhd, size);
    spec.fixed = true;
    create(&p, &spec).unwrap().close().unwrap();
    std::fs::read(&p).unwrap()
}

fn probe(bytes: Vec<u8>) -> chain::Probe {
    probe_explained(&MemStorage::from_vec(bytes)).unwrap()
}

#[test]
fn trailing_fixed_footer_counts_only_when_it_agrees_with_the_file() {
    let d = tempfile::tempdir().unwrap();
    let good = fixed_vhd_bytes(d.path(), 1 << 20);
    assert_eq!(probe(good.clone()).format, Format::Vhd);
    assert!(probe(good.clone()).rule.contains("current size + 512"));
    // Old Virtual PC: 511-byte footer (last reserved byte missing).
    assert_eq!(probe(good[..good.len() - 1].to_vec()).format, Format::Vhd);
    // Bad checksum: guest data.
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 512 + 100] ^= 1;
    assert_eq!(probe(bad).format, Format::Raw);
    // A larger file ending with the same footer (64 MiB raw, footer for 1 MiB): raw.
    let mut big = vec![0u8; 4 << 20];
    let n = big.len();
    big[n - 512..].copy_from_slice(&good[good.len() - 512..]);
    let p = probe(big);
    assert_eq!(p.format, Format::Raw);
    assert_eq!(p.rule, chain::RAW_RULE);
}

#[test]
fn dynamic_vhd_and_vhdx_are_recognised_by_their_first_bytes() {
    let d = tempfile::tempdir().unwrap();
    for f in [Format::Vhd, Format::Vhdx] {
        let p = d.path().join(format!("a.{}", f.name()));
        create(&p, &CreateSpec::new(f, 4 << 20))
            .unwrap()
            .close()
            .unwrap();
        assert_eq!(chain::probe_path(&p).unwrap(), f);
    }
}

#[test]
fn a_probed_raw_image_is_guarded_and_an_explicit_one_is_not() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("disk.raw");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    {
        let probed = open(&p, &OpenOptions::read_write()).unwrap();
        let e = probed.write_at(b"vhdxfile", 0).unwrap_err();
        assert!(matches!(e, Error::ProbedRawGuard { .. }), "{e}");
        assert_eq!(e.errno(), 1, "EPERM for protocol servers");
        probed.write_at(&[1u8; 512], 4096).unwrap();
        probed.close().unwrap();
    }
    assert_eq!(chain::probe_path(&p).unwrap(), Format::Raw);
    {
        let explicit = open(
            &p,
            &OpenOptions {
                format: Some(Format::Raw),
                ..OpenOptions::read_write()
            },
        )
        .unwrap();
        explicit.write_at(b"vhdxfile", 0).unwrap();
        explicit.close().unwrap();
    }
    assert_eq!(chain::probe_path(&p).unwrap(), Format::Vhdx);
}

#[test]
fn a_forged_signature_of_the_other_format_makes_probing_refuse() {
    let d = tempfile::tempdir().unwrap();
    // A fixed VHD whose guest wrote a VHDX identifier into its first sector (guest data).
    let p = d.path().join("fixed.vhd");
    let mut spec = CreateSpec::new(Format::Vhd, 4 << 20);
    spec.fixed = true;
    create(&p, &spec).unwrap().close().unwrap();
    let mut rw = OpenOptions::read_write();
    rw.format = Some(Format::Vhd);
    let vhd = open(&p, &rw).unwrap();
    let mut sector = vec![0u8; 512];
    sector[..8].copy_from_slice(b"vhdxfile");
    vhd.write_at(&sector, 0).unwrap();
    vhd.close().unwrap();
    drop(vhd);
    match chain::probe_path(&p) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("ambiguous"), "{m}"),
        other => panic!("a forged VHDX identifier in a fixed VHD probed as {other:?}"),
    }
    assert!(open(&p, &OpenOptions::read_only()).is_err());
    // Stated, it is the fixed VHD it was, with the guest's bytes as data.
    let mut ro = OpenOptions::read_only();
    ro.format = Some(Format::Vhd);
    let again = open(&p, &ro).unwrap();
    assert_eq!(again.size(), 4 << 20);
    let mut back = vec![0u8; 8];
    again.read_at(&mut back, 0).unwrap();
    assert_eq!(&back, b"vhdxfile");
}

#[test]
fn an_undo_session_cannot_commit_a_probed_raw_disk_into_another_format() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("guest.img");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    let before = std::fs::read(&p).unwrap();
    // Probed raw: the guest's forged VHDX identifier lands in the undo file, but is refused
    // when the session is committed into the image.
    let u = chain::UndoDisk::open(&p, &OpenOptions::read_only(), None).unwrap();
    let mut sector = vec![0u8; 512];
    sector[..8].copy_from_slice(b"vhdxfile");
    u.disk().write_at(&sector, 0).unwrap();
    u.disk().flush().unwrap();
    let kept = u.child_path().to_path_buf();
    match u.commit(&mut |_| {}) {
        Err(Error::ProbedRawGuard { .. }) => {}
        other => panic!("a forged VHDX identifier was committed: {other:?}"),
    }
    assert_eq!(std::fs::read(&p).unwrap(), before, "the image changed");
    assert!(
        kept.exists(),
        "the undo file is kept for the user to decide"
    );
    assert_eq!(chain::probe_path(&p).unwrap(), Format::Raw);
    // Started with an explicit raw format, the guest owns every byte and the commit goes in.
    std::fs::remove_file(&kept).unwrap();
    let mut explicit = OpenOptions::read_only();
    explicit.format = Some(Format::Raw);
    let u = chain::UndoDisk::open(&p, &explicit, None).unwrap();
    u.disk().write_at(&sector, 0).unwrap();
    u.commit(&mut |_| {}).unwrap();
    assert_eq!(&std::fs::read(&p).unwrap()[..8], b"vhdxfile");
}

//! The planning and apply steps of the library on Virtual PC VMs generated at test time
//! (`testdata/vpc`: the VHD/.vud bytes are written there, not by the code under test).

use std::path::Path;
use std::sync::Arc;

use disk::BlockDevice;
use migrate::{OutFormat, PathMap, Settings, UndoChoice};
use vpc_fixtures as fixtures;

fn settings(fx: &fixtures::Fixture, to: &Path, undo: UndoChoice, maps: &[&str]) -> Settings {
    Settings {
        vmc: fx.vmc.clone(),
        to: to.to_path_buf(),
        format: OutFormat::Vhdx,
        undo,
        maps: maps.iter().map(|m| PathMap::parse(m).unwrap()).collect(),
        size_rule: vhd::SizeRule::Auto,
        physical_sector_size: 4096,
    }
}

fn read_all(d: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

/// Plans as the CLI does: load the .vmc, probe, decide.
fn build(s: &Settings) -> migrate::Result<migrate::Plan> {
    migrate::plan_migration(s, migrate::vmc::load(&s.vmc)?)
}

/// An observer that never interrupts and shows nothing.
struct Silent;

impl migrate::Observer for Silent {
    fn interrupted(&self) -> bool {
        false
    }
}

#[test]
fn plan_finds_the_undo_disk_by_identity_and_keeps_the_chs_size() {
    let t = tempfile::tempdir().unwrap();
    let fx = fixtures::make(t.path(), &fixtures::Options::new("winxp")).unwrap();
    let to = t.path().join("out");
    let p = build(&settings(&fx, &to, UndoChoice::Merge, &[])).unwrap();
    assert_eq!(p.disks.len(), 1);
    let d = &p.disks[0];
    assert!(d.resolved_by.contains("relative"), "{}", d.resolved_by);
    assert_eq!(d.guest_size, fixtures::chs_size());
    assert!(d.guest_size < fixtures::CURRENT_SIZE);
    assert!(d.chs_sized);
    assert_eq!(d.chain.len(), 1);
    assert_eq!(d.chain[0].creator_app.as_deref(), Some("vpc "));
    let u = d.undo.as_ref().expect("undo disk found");
    assert_eq!(Path::new(&u.path), fx.vud.as_deref().unwrap());
    assert_eq!(u.choice, UndoChoice::Merge);
    assert_eq!(d.output, "winxp-disk0.vhdx");
    assert_eq!(p.toml, "winxp.toml");
    assert_eq!(p.skipped_drives.len(), 1, "the CD drive");
    assert!(p.need_bytes >= d.data_bytes && d.data_bytes > 0);
    assert!(!p.undecided());
    // The merged view is what the guest saw with its undo disk.
    assert_eq!(read_all(d.view.as_ref().unwrap().as_ref()), fx.merged_view);
    assert!(!to.exists(), "planning writes nothing");
}

#[test]
fn path_map_and_parent_override_find_a_moved_chain() {
    let t = tempfile::tempdir().unwrap();
    let mut o = fixtures::Options::new("moved");
    o.disk_elsewhere = true;
    o.encoding = fixtures::Encoding::Utf8;
    let fx = fixtures::make(t.path(), &o).unwrap();
    let to = t.path().join("out");
    // Without the map the disk is missing, and the error says what was tried.
    let e = build(&settings(&fx, &to, UndoChoice::Merge, &[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing") && e.contains("--path-map"), "{e}");
    let map = format!(
        "{}={}",
        fx.windows_dir.to_uppercase(),
        fx.store_dir.display()
    );
    let p = build(&settings(&fx, &to, UndoChoice::Merge, &[&map])).unwrap();
    let d = &p.disks[0];
    assert_eq!(Path::new(&d.source), fx.vhd);
    assert!(d.resolved_by.contains("--path-map"));
    // The .vud's locators point at C:\... and .\moved.vhd, neither exists here: the parent
    // came from the override, identity-checked.
    assert!(d.undo.is_some());
    assert_eq!(read_all(d.view.as_ref().unwrap().as_ref()), fx.merged_view);
    // Discard: the base view.
    let p = build(&settings(&fx, &to, UndoChoice::Discard, &[&map])).unwrap();
    assert_eq!(
        read_all(p.disks[0].view.as_ref().unwrap().as_ref()),
        fx.base_view
    );
}

#[test]
fn stray_undo_disks_are_reported_not_used() {
    let t = tempfile::tempdir().unwrap();
    let mut o = fixtures::Options::new("a");
    o.with_undo = false;
    let fx = fixtures::make(t.path(), &o).unwrap();
    // An undo disk of another VM, and garbage named .vud, in this VM's folder.
    let other = fixtures::make(&t.path().join("other"), &fixtures::Options::new("b")).unwrap();
    let mut foreign = std::fs::read(other.vud.as_ref().unwrap()).unwrap();
    // Change the parent id it claims (bytes 40.. of the dynamic header at 512).
    foreign[512 + 40] ^= 0xFF;
    std::fs::write(fx.vm_dir.join("foreign.vud"), &foreign).unwrap();
    std::fs::write(fx.vm_dir.join("junk.VUD"), b"not a vhd").unwrap();
    let p = build(&settings(
        &fx,
        &t.path().join("out"),
        UndoChoice::Undecided,
        &[],
    ))
    .unwrap();
    assert!(p.disks[0].undo.is_none());
    assert_eq!(p.unmatched_undo.len(), 2);
    assert!(!p.undecided());
    assert_eq!(
        read_all(p.disks[0].view.as_ref().unwrap().as_ref()),
        fx.base_view
    );
}

#[test]
fn two_undo_disks_for_one_disk_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let fx = fixtures::make(t.path(), &fixtures::Options::new("twice")).unwrap();
    std::fs::copy(fx.vud.as_ref().unwrap(), fx.vm_dir.join("copy.vud")).unwrap();
    let e = build(&settings(
        &fx,
        &t.path().join("out"),
        UndoChoice::Merge,
        &[],
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("2 undo disks"), "{e}");
}

/// Reads fail after the first MiB: a disk that dies mid-conversion.
#[derive(Debug)]
struct DyingDisk(disk::Disk);

impl BlockDevice for DyingDisk {
    fn format(&self) -> &'static str {
        "raw"
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> disk::Result<()> {
        if offset >= 1 << 20 {
            return Err(disk::Error::InvalidArgument("injected read failure".into()));
        }
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64) -> disk::Result<()> {
        Err(disk::Error::ReadOnly)
    }
    fn flush(&self) -> disk::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failure_mid_conversion_removes_every_output() {
    let t = tempfile::tempdir().unwrap();
    let fx = fixtures::make(t.path(), &fixtures::Options::new("dies")).unwrap();
    let to = t.path().join("out");
    let st = settings(&fx, &to, UndoChoice::Merge, &[]);
    let mut p = build(&st).unwrap();
    let inner = p.disks[0].view.take().unwrap();
    p.disks[0].view = Some(disk::Disk::new(Arc::new(DyingDisk(inner))));
    let e = migrate::apply(&st, &p, &mut Silent).unwrap_err();
    assert!(
        migrate::one_line(&e).contains("injected read failure"),
        "{e:#}"
    );
    assert!(
        !to.exists(),
        "the partial output and the directory made for it are gone"
    );
    // An existing target directory stays, emptied of what this run wrote.
    std::fs::create_dir(&to).unwrap();
    std::fs::write(to.join("unrelated.txt"), b"keep").unwrap();
    assert!(migrate::apply(&st, &p, &mut Silent).is_err());
    let left: Vec<_> = std::fs::read_dir(&to)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["unrelated.txt"]);
}

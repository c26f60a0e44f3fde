//! Parent resolution: locators, identity checks, cycles, overrides, in both formats.

use std::path::Path;

use chain::{create, open, CreateSpec, Format, OpenOptions};
use disk::{BlockDevice, Error};

fn mk(path: &Path, format: Format, parent: Option<&Path>) {
    let mut spec = CreateSpec::new(format, 8 << 20);
    spec.parent = parent.map(Path::to_path_buf);
    let d = create(path, &spec).unwrap();
    d.close().unwrap();
}

fn write(path: &Path, byte: u8, offset: u64) {
    let d = open(path, &OpenOptions::read_write()).unwrap();
    d.write_at(&[byte; 4096], offset).unwrap();
    d.close().unwrap();
}

fn read(path: &Path, offset: u64) -> u8 {
    let d = open(path, &OpenOptions::read_only()).unwrap();
    let mut b = [0u8; 4096];
    d.read_at(&mut b, offset).unwrap();
    assert!(b.iter().all(|&x| x == b[0]), "torn read");
    b[0]
}

fn ext(f: Format) -> &'static str {
    f.name()
}

#[test]
fn probe_tells_formats_apart() {
    let d = tempfile::tempdir().unwrap();
    for f in [Format::Raw, Format::Vhd, Format::Vhdx] {
        let p = d.path().join(format!("x.{}", ext(f)));
        mk(&p, f, None);
        assert_eq!(chain::probe_path(&p).unwrap(), f);
    }
    // A fixed VHD is recognised by its trailing footer (qemu calls it raw).
    let p = d.path().join("fixed.vhd");
    let mut spec = CreateSpec::new(Format::Vhd, 8 << 20);
    spec.fixed = true;
    create(&p, &spec).unwrap().close().unwrap();
    assert_eq!(chain::probe_path(&p).unwrap(), Format::Vhd);
    assert_eq!(open(&p, &OpenOptions::read_only()).unwrap().size(), 8 << 20);
}

#[test]
fn three_level_chains_read_through_and_write_only_the_top() {
    for f in [Format::Vhd, Format::Vhdx] {
        let d = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            d.path().join(format!("a.{}", ext(f))),
            d.path().join(format!("b.{}", ext(f))),
            d.path().join(format!("c.{}", ext(f))),
        );
        mk(&a, f, None);
        write(&a, 1, 0);
        write(&a, 1, 1 << 20);
        mk(&b, f, Some(&a));
        write(&b, 2, 1 << 20);
        mk(&c, f, Some(&b));
        let a_bytes = std::fs::read(&a).unwrap();
        write(&c, 3, 2 << 20);
        assert_eq!(read(&c, 0), 1);
        assert_eq!(read(&c, 1 << 20), 2);
        assert_eq!(read(&c, 2 << 20), 3);
        assert_eq!(read(&c, 3 << 20), 0);
        assert_eq!(std::fs::read(&a).unwrap(), a_bytes, "{f:?}: base changed");
        let top = open(&c, &OpenOptions::read_only()).unwrap();
        assert_eq!(chain::layers(&top).len(), 3);
    }
}

#[test]
fn moved_chain_is_found_in_the_childs_directory_or_by_override() {
    for f in [Format::Vhd, Format::Vhdx] {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let a = sub.join(format!("base.{}", ext(f)));
        let b = sub.join(format!("child.{}", ext(f)));
        mk(&a, f, None);
        write(&a, 7, 0);
        mk(&b, f, Some(&a));
        // Move the whole folder: the absolute locator is stale, the relative one still works.
        let moved = d.path().join("moved");
        std::fs::rename(&sub, &moved).unwrap();
        let child = moved.join(format!("child.{}", ext(f)));
        assert_eq!(read(&child, 0), 7, "{f:?}: relative locator");
        // Move the parent elsewhere: not found, with the paths tried.
        let elsewhere = d.path().join(format!("elsewhere.{}", ext(f)));
        std::fs::rename(moved.join(format!("base.{}", ext(f))), &elsewhere).unwrap();
        match open(&child, &OpenOptions::read_only()) {
            Err(Error::ParentNotFound { tried, .. }) => assert!(!tried.is_empty()),
            other => panic!("{f:?}: expected ParentNotFound, got {other:?}"),
        }
        let mut o = OpenOptions::read_only();
        o.parent_override = Some(elsewhere.clone());
        let top = open(&child, &o).unwrap();
        let mut buf = [0u8; 512];
        top.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf[0], 7);
    }
}

#[test]
fn wrong_parent_is_refused_naming_both_files() {
    for f in [Format::Vhd, Format::Vhdx] {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join(format!("a.{}", ext(f)));
        let other = d.path().join(format!("other.{}", ext(f)));
        let b = d.path().join(format!("b.{}", ext(f)));
        mk(&a, f, None);
        mk(&other, f, None);
        mk(&b, f, Some(&a));
        let mut o = OpenOptions::read_only();
        o.parent_override = Some(other.clone());
        match open(&b, &o) {
            Err(e @ Error::ParentMismatch { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("other.") && msg.contains("b."), "{msg}");
            }
            other => panic!("{f:?}: expected ParentMismatch, got {other:?}"),
        }
    }
}

#[test]
fn parent_cycles_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.vhd");
    let b = d.path().join("b.vhd");
    let c = d.path().join("c.vhd");
    mk(&a, Format::Vhd, None);
    mk(&b, Format::Vhd, Some(&a));
    mk(&c, Format::Vhd, Some(&b));
    // Point b at c: c -> b -> c.
    {
        let mut rw = OpenOptions::read_write();
        rw.no_parent = true;
        let bd = chain::open_image(&b, &rw).unwrap();
        let cd = open(
            &c,
            &OpenOptions {
                no_parent: true,
                ..OpenOptions::read_only()
            },
        )
        .unwrap();
        let chain::Image::Vhd(v) = &bd else {
            panic!("b.vhd opened as {:?}", bd.format())
        };
        v.set_parent(&c, cd.as_ref()).unwrap();
        v.close().unwrap();
    }
    match open(&c, &OpenOptions::read_only()) {
        Err(Error::ParentCycle { .. }) => {}
        other => panic!("expected ParentCycle, got {other:?}"),
    }
}

/// `a.<fmt>` holding 5s, and an undo session over it that wrote and flushed 9s at 4 KiB.
/// Returns the base, its bytes before the session, and the session.
fn undo_session_with_a_write(
    dir: &Path,
    f: Format,
) -> (std::path::PathBuf, Vec<u8>, chain::UndoDisk) {
    let a = dir.join(format!("a.{}", ext(f)));
    mk(&a, f, None);
    write(&a, 5, 0);
    let before = std::fs::read(&a).unwrap();
    let u = chain::UndoDisk::open(&a, &OpenOptions::read_only(), None).unwrap();
    let disk = u.disk();
    disk.write_at(&[9u8; 4096], 4096).unwrap();
    disk.flush().unwrap();
    (a, before, u)
}

#[test]
fn undo_sessions_never_touch_the_parent_until_commit() {
    for f in [Format::Raw, Format::Vhd, Format::Vhdx] {
        let d = tempfile::tempdir().unwrap();
        let (a, before, u) = undo_session_with_a_write(d.path(), f);
        let disk = u.disk();
        let mut b = [0u8; 8192];
        disk.read_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 5) && b[4096..].iter().all(|&x| x == 9));
        assert_eq!(
            std::fs::read(&a).unwrap(),
            before,
            "{f:?}: parent written during undo"
        );
        drop(disk);
        u.commit(&mut |_| {}).unwrap();
        assert_eq!(read(&a, 4096), 9, "{f:?}: commit");
        assert_eq!(read(&a, 0), 5);
    }
}

#[test]
fn relink_restores_a_child_after_its_parent_was_written() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.vhdx");
    let b = d.path().join("b.vhdx");
    mk(&a, Format::Vhdx, None);
    write(&a, 1, 0);
    mk(&b, Format::Vhdx, Some(&a));
    write(&b, 2, 1 << 20);
    // Writing the parent gives it a new DataWriteGuid: the child no longer matches.
    write(&a, 1, 2 << 20);
    assert!(matches!(
        open(&b, &OpenOptions::read_only()),
        Err(Error::ParentMismatch { .. })
    ));
    chain::relink(&b, &a).unwrap();
    assert_eq!(read(&b, 0), 1);
    assert_eq!(read(&b, 1 << 20), 2);
    assert_eq!(read(&b, 2 << 20), 1);
}

/// The crash-safe commit's building blocks: a child that records `parent_linkage2` accepts the
/// parent before and after its DataWriteGuid changes to that pre-chosen value, and nothing
/// else; re-linking drops the second identity again.
#[test]
fn vhdx_parent_linkage2_accepts_the_pre_chosen_identity_only() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.vhdx");
    let child = d.path().join("child.vhdx");
    mk(&base, Format::Vhdx, None);
    mk(&child, Format::Vhdx, Some(&base));
    let next = disk::Guid::new_random().unwrap();
    {
        let mut rw = OpenOptions::read_write();
        rw.no_parent = true;
        let Ok(chain::Image::Vhdx(c)) = chain::open_image(&child, &rw) else {
            panic!("child.vhdx does not open as a VHDX")
        };
        let b = open(&base, &OpenOptions::read_only()).unwrap();
        c.set_parent_with_next(&base, b.as_ref(), Some(next))
            .unwrap();
        c.close().unwrap();
    }
    assert_eq!(read(&child, 0), 0, "opens with the old identity");
    {
        let Ok(chain::Image::Vhdx(x)) = chain::open_image(&base, &OpenOptions::read_write()) else {
            panic!("base.vhdx does not open as a VHDX")
        };
        let b = disk::Disk::new(x.clone());
        x.set_next_data_write_guid(next).unwrap();
        b.write_at(&[7u8; 4096], 0).unwrap();
        assert_eq!(b.unique_id(), Some(next));
        assert!(x.set_next_data_write_guid(next).is_err(), "too late");
        b.close().unwrap();
    }
    assert_eq!(read(&child, 0), 7, "opens with the pre-chosen identity");
    // A write without a pre-chosen identity gets a random one: refused.
    write(&base, 8, 4096);
    match open(&child, &OpenOptions::read_only()) {
        Err(Error::ParentMismatch { .. }) => {}
        other => panic!("expected a parent mismatch, got {other:?}"),
    }
    chain::relink(&child, &base).unwrap();
    let c = open(&child, &OpenOptions::read_only()).unwrap();
    let link = c.parent_link().unwrap();
    assert_eq!(link.also_accepted, None, "relink keeps parent_linkage2");
    assert_eq!(Some(link.expected_id), c.backing().unwrap().unique_id());
}

/// The formats report their locators as recorded (Windows paths: `.\`, backslashes); chain
/// resolves them by one rule (docs/chains.md), the same for VHD and VHDX.
#[test]
fn recorded_windows_relative_paths_resolve_from_the_childs_directory_in_both_formats() {
    for f in [Format::Vhd, Format::Vhdx] {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("sub/deeper")).unwrap();
        let base = d.path().join(format!("sub/base.{}", ext(f)));
        let child = d.path().join(format!("child.{}", ext(f)));
        let grandchild = d.path().join(format!("sub/deeper/gc.{}", ext(f)));
        mk(&base, f, None);
        write(&base, 7, 0);
        mk(&child, f, Some(&base));
        mk(&grandchild, f, Some(&child));
        for (top, recorded, resolved) in [
            (&child, ".\\sub\\base", base.clone()),
            (
                &grandchild,
                "..\\..\\child",
                d.path().join("sub/deeper/../../child"),
            ),
        ] {
            let mut o = OpenOptions::read_only();
            o.no_parent = true;
            let link = open(top, &o).unwrap().parent_link().unwrap();
            let rel: Vec<&str> = link
                .locators
                .iter()
                .filter(|l| l.kind == disk::LocatorKind::Relative)
                .map(|l| l.path.as_str())
                .collect();
            let recorded = format!("{recorded}.{}", ext(f));
            assert_eq!(rel, [recorded.as_str()], "{f:?}: recorded as written");
            let resolved = resolved.with_extension(ext(f));
            let first = chain::parent_candidates(Some(top), &link)[0].clone();
            assert_eq!(
                first.to_str().unwrap(),
                resolved.to_str().unwrap(),
                "{f:?}: no ./ left, slashes converted"
            );
        }
        assert_eq!(read(&grandchild, 0), 7, "{f:?}");
    }
}

/// A parent moved next to its child is found by the recorded name's file name, in both formats.
#[test]
fn a_parent_beside_the_child_is_found_by_its_recorded_name_in_both_formats() {
    for f in [Format::Vhd, Format::Vhdx] {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let base = d.path().join(format!("sub/base.{}", ext(f)));
        let child = d.path().join(format!("child.{}", ext(f)));
        mk(&base, f, None);
        write(&base, 9, 4096);
        mk(&child, f, Some(&base));
        let beside = d.path().join(format!("base.{}", ext(f)));
        std::fs::rename(&base, &beside).unwrap();
        let top = open(&child, &OpenOptions::read_only()).unwrap();
        assert_eq!(
            top.backing().unwrap().path(),
            Some(beside.as_path()),
            "{f:?}"
        );
        drop(top);
        assert_eq!(read(&child, 4096), 9, "{f:?}");
    }
}

/// A child grown past its parent reads the parent's data up to the parent's end and zeros
/// after it, in both formats (one helper, disk::read_parent).
#[test]
fn a_child_grown_past_its_parent_reads_zeros_there_in_both_formats() {
    const MIB: u64 = 1 << 20;
    for f in [Format::Vhd, Format::Vhdx] {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join(format!("base.{}", ext(f)));
        let child = d.path().join(format!("child.{}", ext(f)));
        mk(&base, f, None);
        write(&base, 5, 8 * MIB - 4096);
        mk(&child, f, Some(&base));
        let img = chain::open_image(&child, &OpenOptions::read_write()).unwrap();
        match &img {
            chain::Image::Vhd(v) => v.resize(16 * MIB).unwrap(),
            chain::Image::Vhdx(v) => v.resize(16 * MIB).unwrap(),
            chain::Image::Raw(_) => unreachable!(),
        }
        let top = img.disk();
        assert_eq!(top.size(), 16 * MIB, "{f:?}");
        assert_eq!(top.backing().unwrap().size(), 8 * MIB, "{f:?}");
        // Across the parent's end: its last bytes, then zeros.
        let mut buf = vec![0xeeu8; 8192];
        top.read_at(&mut buf, 8 * MIB - 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 5), "{f:?}: parent data");
        assert!(
            buf[4096..].iter().all(|&b| b == 0),
            "{f:?}: past the parent"
        );
        // Wholly past it.
        let mut buf = vec![0xeeu8; MIB as usize];
        top.read_at(&mut buf, 15 * MIB).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "{f:?}: end of the child");
        top.close().unwrap();
    }
}

#[test]
fn undo_commit_into_a_locked_base_changes_nothing() {
    for f in [Format::Raw, Format::Vhd, Format::Vhdx] {
        let d = tempfile::tempdir().unwrap();
        let (a, before, u) = undo_session_with_a_write(d.path(), f);
        let child = u.child_path().to_path_buf();
        // Another session holds the base: the commit cannot open it for writing.
        let holder = open(&a, &OpenOptions::read_only()).unwrap();
        let e = u.commit(&mut |_| {}).unwrap_err();
        assert!(matches!(e, Error::Locked { .. }), "{f:?}: {e}");
        // The holder is a reader, and in this process: the message claims no more.
        assert_eq!(e.to_string(), format!("{} is in use (locked)", a.display()));
        assert_eq!(std::fs::read(&a).unwrap(), before, "{f:?}: base written");
        assert!(child.exists(), "{f:?}: the changes are kept");
        assert!(
            !chain::undo::commit_interrupted(&child),
            "{f:?}: a commit marker was left though the base was never written"
        );
        drop(holder);
        std::fs::remove_file(&child).unwrap();
    }
}

#[test]
fn create_never_makes_a_chain_deeper_than_open_accepts() {
    // Each child is made as `create -b` makes it, opening the whole chain under it.
    let d = tempfile::tempdir().unwrap();
    let name = |i: usize| d.path().join(format!("l{i}.vhd"));
    mk(&name(0), Format::Vhd, None);
    for i in 1..chain::MAX_CHAIN_DEPTH {
        mk(&name(i), Format::Vhd, Some(&name(i - 1)));
    }
    let top = name(chain::MAX_CHAIN_DEPTH - 1);
    write(&top, 9, 0);
    assert_eq!(read(&top, 0), 9, "the deepest chain open accepts must work");
    let mut spec = CreateSpec::new(Format::Vhd, 8 << 20);
    spec.parent = Some(top.clone());
    let over = name(chain::MAX_CHAIN_DEPTH);
    let err = create(&over, &spec).unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("l255.vhd"), "{err}");
    assert!(!over.exists(), "the refused child was left behind");
    // Re-parenting an existing child onto the full chain is refused the same way, before the
    // link changes: the child still opens on its old parent.
    let side = d.path().join("side.vhd");
    mk(&side, Format::Vhd, Some(&name(0)));
    let mut rw = OpenOptions::read_write();
    rw.no_parent = true;
    let child = chain::open_image(&side, &rw).unwrap();
    let full = open(&top, &OpenOptions::read_only()).unwrap();
    let err = child.set_parent(&top, full.as_ref()).unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    child.disk().close().unwrap();
    drop(child);
    assert_eq!(read(&side, 0), 0, "the refused re-link changed the child");
}

#[test]
fn a_vhdx_child_without_a_readable_parent_linkage_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.vhdx");
    let child = d.path().join("child.vhdx");
    mk(&base, Format::Vhdx, None);
    mk(&child, Format::Vhdx, Some(&base));
    let id = open(&child, &OpenOptions::read_only())
        .unwrap()
        .parent_link()
        .unwrap()
        .expected_id;
    // The locator value is UTF-16LE text "{guid}"; spoil one of its digits.
    let text: Vec<u8> = format!("{{{id}}}")
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let mut bytes = std::fs::read(&child).unwrap();
    let at = bytes
        .windows(text.len())
        .position(|w| w == text.as_slice())
        .expect("parent_linkage value in the file");
    bytes[at + 2] = b'z';
    std::fs::write(&child, &bytes).unwrap();
    let err = open(&child, &OpenOptions::read_only()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("parent_linkage") && msg.contains("not a GUID"),
        "{msg}"
    );
}

#[test]
fn a_parent_path_that_is_not_a_regular_file_is_named_with_what_it_is() {
    for f in [Format::Vhd, Format::Vhdx] {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join(format!("base.{}", ext(f)));
        let child = d.path().join(format!("child.{}", ext(f)));
        mk(&base, f, None);
        mk(&child, f, Some(&base));
        std::fs::remove_file(&base).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&base)
            .status()
            .unwrap();
        assert!(made.success());
        let msg = open(&child, &OpenOptions::read_only())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("not found") && msg.contains("is a FIFO"),
            "{f:?}: {msg}"
        );
    }
}

//! `viridian migrate` end to end, driving the built binary on Virtual PC fixtures generated at
//! test time (the `vpc-fixtures` crate in testdata/vpc writes the VHD/.vud bytes itself).

mod common;

use vpc_fixtures as fixtures;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use common::{ok, viridian};
use disk::BlockDevice;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn open(p: &Path) -> disk::Disk {
    chain::open(p, &chain::OpenOptions::read_only()).expect("open output")
}

fn read_all(d: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).expect("read");
    v
}

/// Bytes and mtime of every source file, to prove migrate never touches them.
fn snapshot(fx: &fixtures::Fixture) -> Vec<(PathBuf, Vec<u8>, SystemTime)> {
    let mut files = vec![fx.vmc.clone(), fx.vhd.clone()];
    files.extend(fx.vud.clone());
    files.extend(fx.vsv.clone());
    files
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            let m = std::fs::metadata(&p).unwrap().modified().unwrap();
            (p, b, m)
        })
        .collect()
}

fn assert_unchanged(before: &[(PathBuf, Vec<u8>, SystemTime)]) {
    for (p, b, m) in before {
        assert_eq!(&std::fs::read(p).unwrap(), b, "{} changed", p.display());
        assert_eq!(
            &std::fs::metadata(p).unwrap().modified().unwrap(),
            m,
            "{} mtime changed",
            p.display()
        );
    }
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn migrate_dry_run_shows_the_plan_and_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let mut o = fixtures::Options::new("winxp");
    o.with_saved_state = true;
    let fx = fixtures::make(t.path(), &o).unwrap();
    let before = snapshot(&fx);
    let to = t.path().join("out");
    let plan = ok(&["migrate", s(&fx.vmc), "--to", s(&to)]);
    assert!(plan.contains("dry run"), "{plan}");
    assert!(plan.contains("winxp-disk0.vhdx"), "{plan}");
    assert!(plan.contains(".vud"), "{plan}");
    assert!(plan.contains("pending"), "{plan}");
    assert!(plan.contains("cannot be migrated"), "{plan}");
    assert!(plan.contains(&fixtures::chs_size().to_string()), "{plan}");
    let j: serde_json::Value = serde_json::from_str(&ok(&[
        "migrate",
        s(&fx.vmc),
        "--to",
        s(&to),
        "--json",
        "--merge-undo",
    ]))
    .unwrap();
    assert_eq!(j["mode"], "plan");
    assert_eq!(j["plan"]["disks"][0]["guest_size"], fixtures::chs_size());
    assert!(!to.exists(), "a dry run must not create the target");
    assert_unchanged(&before);
    // --apply without a choice for the pending undo disk is refused before writing.
    let out = viridian(&["migrate", s(&fx.vmc), "--to", s(&to), "--apply"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--merge-undo"), "{}", stderr(&out));
    assert!(!to.exists());
    assert_unchanged(&before);
}

#[test]
fn migrate_merge_undo_converts_the_merged_view_with_the_chs_size() {
    let t = tempfile::tempdir().unwrap();
    let mut o = fixtures::Options::new("winxp");
    o.with_saved_state = true;
    let fx = fixtures::make(t.path(), &o).unwrap();
    let before = snapshot(&fx);
    let to = t.path().join("out");
    ok(&[
        "migrate",
        s(&fx.vmc),
        "--to",
        s(&to),
        "--merge-undo",
        "--apply",
    ]);
    assert_unchanged(&before);

    let out_path = to.join("winxp-disk0.vhdx");
    let out = open(&out_path);
    assert_eq!(out.format(), "vhdx");
    assert_eq!(
        out.size(),
        fixtures::chs_size(),
        "the guest-visible (CHS) size"
    );
    assert_eq!(out.cluster_size(), Some(1 << 20));
    assert_eq!(out.physical_sector_size(), 4096);
    assert_eq!(read_all(out.as_ref()), fx.merged_view);
    drop(out);
    // The same through `viridian compare` against the source chain (.vud over .vhd).
    ok(&["compare", s(&out_path), s(fx.vud.as_ref().unwrap())]);

    let toml = std::fs::read_to_string(to.join("winxp.toml")).unwrap();
    for want in [
        "name = \"winxp\"",
        "memory_mib = 512",
        "cpus = 1",
        "[[disk]]\npath = \"winxp-disk0.vhdx\"\nformat = \"vhdx\"\nread_only = false\nundo = false\ncontroller = \"ide\"\nchannel = 0\nslot = 0\n",
        "[[network]]\nmac = \"00:03:FF:12:34:56\"",
    ] {
        assert!(toml.contains(want), "{want:?} not in\n{toml}");
    }

    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(to.join("report.json")).unwrap()).unwrap();
    assert_eq!(j["mode"], "applied");
    let d = &j["plan"]["disks"][0];
    assert_eq!(d["controller"], "ide");
    assert_eq!(d["source"], s(&fx.vhd));
    assert_eq!(d["chain"][0]["creator_app"], "vpc ");
    assert_eq!(d["chain"][0]["current_size"], fixtures::CURRENT_SIZE);
    assert_eq!(d["chs_sized"], true);
    assert_eq!(d["undo"]["path"], s(fx.vud.as_ref().unwrap()));
    assert_eq!(d["undo"]["choice"], "merge");
    assert_eq!(j["converted"][0]["virtual_size"], fixtures::chs_size());
    assert_eq!(j["plan"]["vm"]["encoding"], "UTF-16LE");
    assert_eq!(j["plan"]["vm"]["nics"][0]["mac"], "00:03:FF:12:34:56");
    assert_eq!(j["plan"]["saved_state"][0], s(fx.vsv.as_ref().unwrap()));
    assert!(j["merged"][0].as_str().unwrap().contains(".vud"));
    let dropped = j["dropped"].to_string();
    assert!(
        dropped.contains(".vsv") && dropped.contains("cannot be migrated"),
        "{dropped}"
    );
    assert!(dropped.contains("CD/DVD"), "{dropped}");
    assert!(dropped.contains("past the CHS size"), "{dropped}");
    let actions = j["guest_actions"].to_string();
    assert!(actions.contains("Virtual Machine Additions"));
    assert!(actions.contains("re-activation"));
    assert!(actions.contains("IDE 0:0"));
    let md = std::fs::read_to_string(to.join("report.md")).unwrap();
    for want in [
        "## Disks",
        "## Saved state",
        "## Merged",
        "## Dropped",
        "## What to do in the guest",
    ] {
        assert!(md.contains(want), "{want} not in report.md");
    }

    // Running again would overwrite: refused, exit 1, outputs untouched.
    let again = viridian(&[
        "migrate",
        s(&fx.vmc),
        "--to",
        s(&to),
        "--merge-undo",
        "--apply",
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("refusing to overwrite"),
        "{}",
        stderr(&again)
    );
    assert_eq!(read_all(open(&out_path).as_ref()), fx.merged_view);
}

#[test]
fn migrate_discard_undo_with_path_map_gives_the_base_contents() {
    let t = tempfile::tempdir().unwrap();
    let mut o = fixtures::Options::new("moved");
    o.encoding = fixtures::Encoding::Utf8;
    o.disk_elsewhere = true;
    let fx = fixtures::make(t.path(), &o).unwrap();
    let before = snapshot(&fx);
    let to = t.path().join("out");
    // Without the map the absolute C:\ path is unreachable and the relative one is wrong.
    let miss = viridian(&[
        "migrate",
        s(&fx.vmc),
        "--to",
        s(&to),
        "--discard-undo",
        "--apply",
    ]);
    assert_eq!(miss.status.code(), Some(1));
    assert!(stderr(&miss).contains("--path-map"), "{}", stderr(&miss));
    let map = format!("{}={}", fx.windows_dir, s(&fx.store_dir));
    ok(&[
        "migrate",
        s(&fx.vmc),
        "--to",
        s(&to),
        "--path-map",
        &map,
        "--discard-undo",
        "--apply",
        "-q",
    ]);
    assert_unchanged(&before);
    let out = open(&to.join("moved-disk0.vhdx"));
    assert_eq!(out.size(), fixtures::chs_size());
    assert_eq!(read_all(out.as_ref()), fx.base_view);
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(to.join("report.json")).unwrap()).unwrap();
    assert_eq!(j["plan"]["vm"]["encoding"], "UTF-8");
    assert_eq!(j["plan"]["disks"][0]["undo"]["choice"], "discard");
    assert!(j["dropped"].to_string().contains("discarded"));
}

#[test]
fn migrate_vhd_output_keeps_chs_geometry_and_utf16be_parses() {
    let t = tempfile::tempdir().unwrap();
    let mut o = fixtures::Options::new("be");
    o.encoding = fixtures::Encoding::Utf16Be;
    let fx = fixtures::make(t.path(), &o).unwrap();
    let to = t.path().join("out");
    ok(&[
        "migrate",
        s(&fx.vmc),
        "--to",
        s(&to),
        "--format",
        "vhd",
        "--merge-undo",
        "--apply",
        "-q",
    ]);
    let p = to.join("be-disk0.vhd");
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["info", "--output", "json", s(&p)])).unwrap();
    assert_eq!(info["virtual-size"], fixtures::chs_size());
    for rule in ["chs", "current"] {
        let i: serde_json::Value = serde_json::from_str(&ok(&[
            "info",
            "--output",
            "json",
            "--size-rule",
            rule,
            s(&p),
        ]))
        .unwrap();
        assert_eq!(i["virtual-size"], fixtures::chs_size(), "size rule {rule}");
    }
    let d = open(&p);
    assert_eq!(read_all(d.as_ref()), fx.merged_view);
}

#[test]
fn migrate_missing_disk_and_unreadable_vmc_are_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let mut o = fixtures::Options::new("gone");
    o.missing_disk = true;
    let fx = fixtures::make(t.path(), &o).unwrap();
    let to = t.path().join("out");
    let out = viridian(&[
        "migrate",
        s(&fx.vmc),
        "--to",
        s(&to),
        "--merge-undo",
        "--apply",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.starts_with("viridian: "), "{e}");
    assert!(
        e.contains("ide 0:0") && e.contains("missing") && e.contains("gone-missing.vhd"),
        "{e}"
    );
    assert!(!to.exists());

    let bad = t.path().join("broken.vmc");
    std::fs::write(&bad, b"<preferences><hardware></preferences>").unwrap();
    let out = viridian(&["migrate", s(&bad), "--to", s(&to)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not a readable .vmc"),
        "{}",
        stderr(&out)
    );
    let out = viridian(&["migrate", s(&t.path().join("none.vmc")), "--to", s(&to)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot read"), "{}", stderr(&out));
}

#[test]
fn migrate_broken_chain_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let fx = fixtures::make(t.path(), &fixtures::Options::new("bad")).unwrap();
    // Make the .vmc name the .vud itself as the disk, and hide its parent: the chain breaks.
    let vud = fx.vud.clone().unwrap();
    let vmc = fx.vm_dir.join("chain.vmc");
    let text = fixtures::vmc_xml(
        "D:\\nowhere\\x.vud",
        &format!(".\\{}", vud.file_name().unwrap().to_str().unwrap()),
        "0003FF000001",
    );
    std::fs::write(&vmc, fixtures::encode(&text, fixtures::Encoding::Utf16Le)).unwrap();
    std::fs::rename(&fx.vhd, fx.vm_dir.join("elsewhere.bin")).unwrap();
    let to = t.path().join("out");
    let out = viridian(&["migrate", s(&vmc), "--to", s(&to)]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.contains("parent chain"), "{e}");
    assert!(!to.exists());
}

#[test]
fn migrate_relative_vmc_and_target_paths_from_the_current_directory() {
    let t = tempfile::tempdir().unwrap();
    let fx = fixtures::make(t.path(), &fixtures::Options::new("rel")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_viridian"))
        .current_dir(&fx.vm_dir)
        .args([
            "migrate",
            "rel.vmc",
            "--to",
            "../out",
            "--merge-undo",
            "--apply",
            "-q",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let d = open(&t.path().join("out").join("rel-disk0.vhdx"));
    assert_eq!(read_all(d.as_ref()), fx.merged_view);
}

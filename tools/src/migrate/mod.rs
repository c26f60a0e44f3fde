//! `viridian migrate VM.vmc --to DIR`: move a Virtual PC 2004/2007 or Virtual Server 2005 VM.
//!
//! Reads the `.vmc` (UTF-16 or UTF-8 XML), finds every disk and its chain (absolute paths
//! through `--path-map`, relative paths from the `.vmc`'s folder), finds pending `.vud` undo
//! disks by parent identity, and converts each disk to VHDX (1 MiB blocks) or a clean VHD with
//! the guest-visible size kept exactly (CHS-sized Virtual PC disks keep their CHS size). Writes
//! `<vm>.toml` for `viridian run` and `report.md`/`report.json`.
//!
//! Without `--apply` it only shows the plan. Sources are opened read-only; everything is
//! written under `--to`, never over an existing file, and a failure removes what was written.

mod convert;
mod paths;
mod plan;
mod report;
mod vmc;
mod xml;

#[cfg(test)]
#[path = "../../../testdata/vpc/fixtures.rs"]
mod fixtures;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::common::{self, human_size, SizeRuleArg};
use crate::progress;
use plan::{OutFormat, Settings, UndoChoice};

#[derive(clap::Args)]
pub struct Args {
    /// The VM's .vmc file (Virtual PC 2004/2007, Virtual Server 2005).
    vmc: PathBuf,
    /// Directory to write the converted disks, the VM TOML and the reports into.
    #[arg(long = "to", value_name = "DIR")]
    to: PathBuf,
    /// Merge pending undo disks (.vud) into the converted disks (Virtual PC's "commit").
    #[arg(long = "merge-undo", conflicts_with = "discard_undo")]
    merge_undo: bool,
    /// Leave pending undo disks behind and convert the base disks ("discard").
    #[arg(long = "discard-undo")]
    discard_undo: bool,
    /// Output disk format.
    #[arg(long = "format", value_enum, default_value_t = OutFormat::Vhdx)]
    format: OutFormat,
    /// Where a Windows folder now is: 'C:\VMs=/srv/vms' or '\\server\share=/mnt/share'
    /// (repeatable; the longest matching prefix wins).
    #[arg(long = "path-map", value_name = "WINDOWS=LOCAL")]
    path_map: Vec<String>,
    /// Do it; without this only the plan is shown and nothing is written.
    #[arg(long = "apply")]
    apply: bool,
    /// Physical sector size of VHDX outputs (512 or 4096).
    #[arg(long = "physical-sector-size", default_value_t = 4096)]
    physical_sector_size: u32,
    /// VHD size rule for the sources (auto: CHS for Virtual PC's `vpc ` creator).
    #[arg(long = "size-rule", value_enum, default_value_t = SizeRuleArg::Auto)]
    size_rule: SizeRuleArg,
    /// Print the report as JSON instead of Markdown.
    #[arg(long = "json")]
    json: bool,
    /// Show progress (default: when stderr is a terminal).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: print no messages (errors are still printed).
    #[arg(short = 'q')]
    quiet: bool,
}

pub fn run(a: Args) -> Result<i32> {
    if !matches!(a.physical_sector_size, 512 | 4096) {
        bail!("--physical-sector-size must be 512 or 4096");
    }
    let maps = a
        .path_map
        .iter()
        .map(|m| paths::PathMap::parse(m))
        .collect::<Result<Vec<_>>>()?;
    let settings = Settings {
        vmc: a.vmc.clone(),
        to: a.to.clone(),
        format: a.format,
        undo: if a.merge_undo {
            UndoChoice::Merge
        } else if a.discard_undo {
            UndoChoice::Discard
        } else {
            UndoChoice::Undecided
        },
        maps,
        size_rule: a.size_rule.to_vhd(),
        physical_sector_size: a.physical_sector_size,
    };
    let vm = vmc::load(&a.vmc)?;
    let plan = plan::build(&settings, vm)?;

    if !a.apply {
        let r = report::build(&plan, &[], false);
        print_report(&r, a.json)?;
        if let Ok(avail) = convert::free_space(&settings.to) {
            if avail < plan.need_bytes {
                eprintln!(
                    "viridian: warning: {} has {} free, the migration needs about {}",
                    settings.to.display(),
                    human_size(avail),
                    human_size(plan.need_bytes)
                );
            }
        }
        if plan.undecided() {
            eprintln!(
                "viridian: a pending undo disk was found: --apply needs --merge-undo or --discard-undo"
            );
        }
        if !a.quiet {
            eprintln!("viridian: dry run: nothing was written; add --apply to migrate");
        }
        return Ok(0);
    }
    if plan.undecided() {
        let pending: Vec<&str> = plan
            .disks
            .iter()
            .filter_map(|d| d.undo.as_ref().map(|u| u.path.as_str()))
            .collect();
        bail!(
            "pending undo disk {}: choose --merge-undo (keep the changes) or --discard-undo (drop them)",
            pending.join(", ")
        );
    }
    apply(&a, &settings, &plan)
}

fn print_report(r: &report::Report, json: bool) -> Result<()> {
    let text = if json {
        serde_json::to_string_pretty(r)? + "\n"
    } else {
        report::markdown(r)
    };
    let mut out = std::io::stdout().lock();
    // A closed pipe (| head) is not an error worth failing a migration for.
    let _ = out.write_all(text.as_bytes());
    Ok(())
}

fn apply(a: &Args, s: &Settings, plan: &plan::Plan) -> Result<i32> {
    let made_dir = if s.to.exists() {
        None
    } else {
        std::fs::create_dir_all(&s.to)
            .with_context(|| format!("cannot create {}", s.to.display()))?;
        Some(s.to.clone())
    };
    let mut cleanup = convert::Cleanup::new(made_dir);
    // The reports and TOML are small; 1 MiB covers them.
    convert::check_room(&s.to, plan.need_bytes + (1 << 20))?;

    let mut outcomes = Vec::new();
    for d in &plan.disks {
        common::check_interrupted()?;
        let out = s.to.join(&d.output);
        cleanup.add(&out);
        let pb = progress::bar(d.guest_size, a.progress, a.quiet);
        pb.set_message(d.output.clone());
        let c = convert::convert(d, &out, s.physical_sector_size, &pb)?;
        pb.finish_and_clear();
        if !a.quiet {
            eprintln!(
                "viridian: {} -> {} ({} bytes, {} written)",
                d.source,
                out.display(),
                c.virtual_size,
                human_size(c.bytes_written)
            );
        }
        outcomes.push(report::Outcome {
            output: d.output.clone(),
            virtual_size: c.virtual_size,
            bytes_written: c.bytes_written,
            geometry: c.geometry,
            note: c.note,
        });
    }
    let r = report::build(plan, &outcomes, true);
    write_new(
        &s.to.join(&plan.toml),
        report::vm_toml(plan).as_bytes(),
        &mut cleanup,
    )?;
    write_new(
        &s.to.join("report.json"),
        (serde_json::to_string_pretty(&r)? + "\n").as_bytes(),
        &mut cleanup,
    )?;
    write_new(
        &s.to.join("report.md"),
        report::markdown(&r).as_bytes(),
        &mut cleanup,
    )?;
    cleanup.disarm();
    if a.json {
        print_report(&r, true)?;
    } else if !a.quiet {
        eprintln!(
            "viridian: migrated {} to {} ({}, report.md, report.json)",
            plan.vm.name,
            s.to.display(),
            plan.toml
        );
    }
    Ok(0)
}

/// Writes a new file (refusing an existing one), registered for cleanup first.
fn write_new(path: &Path, bytes: &[u8], cleanup: &mut convert::Cleanup) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    cleanup.add(path);
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::sync::Arc;

    use disk::BlockDevice;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: Args,
    }

    fn args(v: &[&str]) -> Args {
        let mut all = vec!["migrate"];
        all.extend_from_slice(v);
        Cli::try_parse_from(all).unwrap().a
    }

    fn settings(fx: &fixtures::Fixture, to: &Path, undo: UndoChoice, maps: &[&str]) -> Settings {
        Settings {
            vmc: fx.vmc.clone(),
            to: to.to_path_buf(),
            format: OutFormat::Vhdx,
            undo,
            maps: maps
                .iter()
                .map(|m| paths::PathMap::parse(m).unwrap())
                .collect(),
            size_rule: vhd::SizeRule::Auto,
            physical_sector_size: 4096,
        }
    }

    fn read_all(d: &dyn BlockDevice) -> Vec<u8> {
        let mut v = vec![0u8; d.size() as usize];
        d.read_at(&mut v, 0).unwrap();
        v
    }

    fn open(p: &Path) -> disk::Disk {
        chain::open(p, &chain::OpenOptions::read_only()).unwrap()
    }

    #[test]
    fn plan_finds_the_undo_disk_by_identity_and_keeps_the_chs_size() {
        let t = tempfile::tempdir().unwrap();
        let fx = fixtures::make(t.path(), &fixtures::Options::new("winxp")).unwrap();
        let vm = vmc::load(&fx.vmc).unwrap();
        let to = t.path().join("out");
        let p = plan::build(&settings(&fx, &to, UndoChoice::Merge, &[]), vm).unwrap();
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
        let e = plan::build(
            &settings(&fx, &to, UndoChoice::Merge, &[]),
            vmc::load(&fx.vmc).unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("missing") && e.contains("--path-map"), "{e}");
        let map = format!(
            "{}={}",
            fx.windows_dir.to_uppercase(),
            fx.store_dir.display()
        );
        let p = plan::build(
            &settings(&fx, &to, UndoChoice::Merge, &[&map]),
            vmc::load(&fx.vmc).unwrap(),
        )
        .unwrap();
        let d = &p.disks[0];
        assert_eq!(Path::new(&d.source), fx.vhd);
        assert!(d.resolved_by.contains("--path-map"));
        // The .vud's locators point at C:\... and .\moved.vhd, neither exists here: the parent
        // came from the override, identity-checked.
        assert!(d.undo.is_some());
        assert_eq!(read_all(d.view.as_ref().unwrap().as_ref()), fx.merged_view);
        // Discard: the base view.
        let p = plan::build(
            &settings(&fx, &to, UndoChoice::Discard, &[&map]),
            vmc::load(&fx.vmc).unwrap(),
        )
        .unwrap();
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
        let p = plan::build(
            &settings(&fx, &t.path().join("out"), UndoChoice::Undecided, &[]),
            vmc::load(&fx.vmc).unwrap(),
        )
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
        let e = plan::build(
            &settings(&fx, &t.path().join("out"), UndoChoice::Merge, &[]),
            vmc::load(&fx.vmc).unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("2 undo disks"), "{e}");
    }

    #[test]
    fn apply_converts_keeps_sources_and_refuses_to_overwrite() {
        let t = tempfile::tempdir().unwrap();
        let mut o = fixtures::Options::new("winxp");
        o.with_saved_state = true;
        let fx = fixtures::make(t.path(), &o).unwrap();
        let before = [&fx.vmc, &fx.vhd, fx.vud.as_ref().unwrap()].map(|p| {
            (
                std::fs::read(p).unwrap(),
                std::fs::metadata(p).unwrap().modified().unwrap(),
            )
        });
        let to = t.path().join("out");
        let ts = to.to_str().unwrap();
        let vmc_s = fx.vmc.to_str().unwrap();

        // Dry run: nothing written. Apply without a choice: refused.
        assert_eq!(run(args(&[vmc_s, "--to", ts, "-q"])).unwrap(), 0);
        assert!(!to.exists());
        let e = run(args(&[vmc_s, "--to", ts, "--apply", "-q"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--merge-undo"), "{e}");
        assert!(!to.exists());

        assert_eq!(
            run(args(&[vmc_s, "--to", ts, "--apply", "--merge-undo", "-q"])).unwrap(),
            0
        );
        let out = open(&to.join("winxp-disk0.vhdx"));
        assert_eq!(out.size(), fixtures::chs_size());
        assert_eq!(out.physical_sector_size(), 4096);
        assert_eq!(out.cluster_size(), Some(1 << 20));
        assert_eq!(read_all(out.as_ref()), fx.merged_view);
        drop(out);
        let toml = std::fs::read_to_string(to.join("winxp.toml")).unwrap();
        assert!(
            toml.contains("name = \"winxp\"\nmemory_mib = 512\ncpus = 1\n"),
            "{toml}"
        );
        assert!(toml.contains("[[disk]]\npath = \"winxp-disk0.vhdx\"\nformat = \"vhdx\"\nread_only = false\nundo = false\ncontroller = \"ide\"\nchannel = 0\nslot = 0\n"), "{toml}");
        assert!(
            toml.contains("[[network]]\nmac = \"00:03:FF:12:34:56\"\n"),
            "{toml}"
        );
        let j: serde_json::Value =
            serde_json::from_slice(&std::fs::read(to.join("report.json")).unwrap()).unwrap();
        assert_eq!(j["mode"], "applied");
        assert_eq!(j["plan"]["saved_state"].as_array().unwrap().len(), 1);
        let md = std::fs::read_to_string(to.join("report.md")).unwrap();
        assert!(md.contains("cannot be migrated") && md.contains("Virtual Machine Additions"));

        for (p, (bytes, mtime)) in [&fx.vmc, &fx.vhd, fx.vud.as_ref().unwrap()]
            .iter()
            .zip(&before)
        {
            assert_eq!(&std::fs::read(p).unwrap(), bytes);
            assert_eq!(&std::fs::metadata(p).unwrap().modified().unwrap(), mtime);
        }
        // A second run would overwrite: refused, and the first run's files are untouched.
        let e = run(args(&[vmc_s, "--to", ts, "--apply", "--merge-undo", "-q"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("refusing to overwrite"), "{e}");
        assert!(to.join("winxp-disk0.vhdx").exists());
    }

    #[test]
    fn vhd_output_keeps_the_chs_geometry() {
        let t = tempfile::tempdir().unwrap();
        let fx = fixtures::make(t.path(), &fixtures::Options::new("winxp")).unwrap();
        let to = t.path().join("out");
        let code = run(args(&[
            fx.vmc.to_str().unwrap(),
            "--to",
            to.to_str().unwrap(),
            "--apply",
            "--discard-undo",
            "--format",
            "vhd",
            "-q",
        ]))
        .unwrap();
        assert_eq!(code, 0);
        let p = to.join("winxp-disk0.vhd");
        for rule in [
            vhd::SizeRule::Auto,
            vhd::SizeRule::Chs,
            vhd::SizeRule::CurrentSize,
        ] {
            let d = chain::open(
                &p,
                &chain::OpenOptions {
                    vhd_size_rule: rule,
                    ..chain::OpenOptions::read_only()
                },
            )
            .unwrap();
            assert_eq!(d.size(), fixtures::chs_size(), "{rule:?}");
        }
        let d = open(&p);
        let (c, h, s) = fixtures::geometry();
        assert_eq!(d.facts().geometry, Some((c, h, s)));
        assert_eq!(read_all(d.as_ref()), fx.base_view);
    }

    #[test]
    fn failures_leave_nothing_behind() {
        let t = tempfile::tempdir().unwrap();
        let mut o = fixtures::Options::new("gone");
        o.missing_disk = true;
        let fx = fixtures::make(t.path(), &o).unwrap();
        let to = t.path().join("out");
        let e = run(args(&[
            fx.vmc.to_str().unwrap(),
            "--to",
            to.to_str().unwrap(),
            "--apply",
            "--merge-undo",
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("missing") && e.contains("gone-missing.vhd"),
            "{e}"
        );
        assert!(!to.exists());
        // Unreadable .vmc.
        let bad = t.path().join("bad.vmc");
        std::fs::write(&bad, [0xFF, 0xFE, b'<', 0, b'x']).unwrap();
        let e = run(args(&[bad.to_str().unwrap(), "--to", to.to_str().unwrap()])).unwrap_err();
        assert!(
            common::one_line(&e).contains("not a readable .vmc"),
            "{e:#}"
        );
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
        let mut p = plan::build(&st, vmc::load(&fx.vmc).unwrap()).unwrap();
        let inner = p.disks[0].view.take().unwrap();
        p.disks[0].view = Some(disk::Disk::new(Arc::new(DyingDisk(inner))));
        let a = args(&[fx.vmc.to_str().unwrap(), "--to", to.to_str().unwrap(), "-q"]);
        let e = apply(&a, &st, &p).unwrap_err();
        assert!(
            common::one_line(&e).contains("injected read failure"),
            "{e:#}"
        );
        assert!(
            !to.exists(),
            "the partial output and the directory made for it are gone"
        );
        // An existing target directory stays, emptied of what this run wrote.
        std::fs::create_dir(&to).unwrap();
        std::fs::write(to.join("unrelated.txt"), b"keep").unwrap();
        assert!(apply(&a, &st, &p).is_err());
        let left: Vec<_> = std::fs::read_dir(&to)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["unrelated.txt"]);
    }

    #[test]
    fn cleanup_removes_partial_outputs() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("made");
        std::fs::create_dir(&dir).unwrap();
        let f = dir.join("partial.vhdx");
        std::fs::write(&f, b"x").unwrap();
        let mut c = convert::Cleanup::new(Some(dir.clone()));
        c.add(&f);
        drop(c);
        assert!(!f.exists() && !dir.exists());
        assert!(convert::check_room(t.path(), u64::MAX)
            .unwrap_err()
            .to_string()
            .contains("not enough room"));
        assert!(convert::free_space(&t.path().join("not/yet")).unwrap() > 0);
    }
}

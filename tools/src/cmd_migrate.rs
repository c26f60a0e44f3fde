//! `viridian migrate VM.vmc --to DIR`: move a Virtual PC 2004/2007 or Virtual Server 2005 VM
//! (the `migrate` crate does the work; this verb parses the flags and prints).
//!
//! Without `--apply` it only shows the plan. Sources are opened read-only; everything is
//! written under `--to`, never over an existing file, and a failure removes what was written.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use migrate::{OutFormat, Settings, UndoChoice};

use crate::common::{self, human_size, SizeRuleArg};
use crate::progress;

/// Output image format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    #[default]
    Vhdx,
    Vhd,
}

impl FormatArg {
    fn to_format(self) -> OutFormat {
        match self {
            FormatArg::Vhdx => OutFormat::Vhdx,
            FormatArg::Vhd => OutFormat::Vhd,
        }
    }
}

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
    #[arg(long = "format", value_enum, default_value_t = FormatArg::Vhdx)]
    format: FormatArg,
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
        .map(|m| migrate::PathMap::parse(m))
        .collect::<Result<Vec<_>, _>>()?;
    let settings = Settings {
        vmc: a.vmc.clone(),
        to: a.to.clone(),
        format: a.format.to_format(),
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
    let vm = migrate::vmc::load(&a.vmc)?;
    let plan = migrate::plan_migration(&settings, vm)?;

    if !a.apply {
        let r = migrate::report::build(&plan, &[], false);
        print_report(&r, a.json)?;
        if let Ok(avail) = migrate::free_space(&settings.to) {
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
    apply(&a, &settings, &plan)
}

fn print_report(r: &migrate::Report, json: bool) -> Result<()> {
    let text = if json {
        serde_json::to_string_pretty(r)? + "\n"
    } else {
        migrate::report::markdown(r)
    };
    let mut out = std::io::stdout().lock();
    // A closed pipe (| head) is not an error worth failing a migration for.
    let _ = out.write_all(text.as_bytes());
    Ok(())
}

/// Progress bars and per-disk messages on stderr; Ctrl-C stops the run.
struct Progress {
    show_bar: bool,
    quiet: bool,
    bar: Option<indicatif::ProgressBar>,
}

impl migrate::Observer for Progress {
    fn interrupted(&self) -> bool {
        common::interrupted()
    }
    fn converting(&mut self, disk: &migrate::DiskPlan, _out: &Path) {
        let pb = progress::bar(disk.guest_size, self.show_bar, self.quiet);
        pb.set_message(disk.output.clone());
        self.bar = Some(pb);
    }
    fn copied(&mut self, n: u64) {
        if let Some(pb) = &self.bar {
            pb.inc(n);
        }
    }
    fn converted(&mut self, disk: &migrate::DiskPlan, out: &Path, c: &migrate::Converted) {
        if let Some(pb) = self.bar.take() {
            pb.finish_and_clear();
        }
        if !self.quiet {
            eprintln!(
                "viridian: {} -> {} ({} bytes, {} written)",
                disk.source,
                out.display(),
                c.virtual_size,
                human_size(c.bytes_written)
            );
        }
    }
}

fn apply(a: &Args, s: &Settings, plan: &migrate::Plan) -> Result<i32> {
    let mut progress = Progress {
        show_bar: a.progress,
        quiet: a.quiet,
        bar: None,
    };
    let outcomes = migrate::apply(s, plan, &mut progress)?;
    if a.json {
        print_report(&migrate::report::build(plan, &outcomes, true), true)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    use disk::BlockDevice;
    use vpc_fixtures as fixtures;

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

    fn read_all(d: &dyn BlockDevice) -> Vec<u8> {
        let mut v = vec![0u8; d.size() as usize];
        d.read_at(&mut v, 0).unwrap();
        v
    }

    fn open(p: &Path) -> disk::Disk {
        chain::open(p, &chain::OpenOptions::read_only()).unwrap()
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
}

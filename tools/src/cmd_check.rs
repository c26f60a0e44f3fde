//! `viridian check`: consistency checks with qemu-img check's output and exit codes
//! (0 clean, 1 check not completed, 2 corruptions, 3 leaks only, 63 format has no checks).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use chain::Format;
use disk::check::Repair;
use disk::{Access, CheckReport, FileStorage, Storage};

use crate::common::{self, Output};

#[derive(clap::Args)]
pub struct Args {
    /// Image format (raw, vhd/vpc or vhdx); probed when absent.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Repair: leaks, or all (everything that is safe to fix).
    #[arg(short = 'r', long = "repair")]
    repair: Option<String>,
    /// Output as human text or JSON (qemu-img's keys).
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// Quiet: print no messages (errors are still printed).
    #[arg(short = 'q')]
    quiet: bool,
    /// Force shared access: open without the lock, so the image can be read while another
    /// process (serve --rw, a VM) writes it; what is read may then be inconsistent.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    file: PathBuf,
}

impl Args {
    /// Whether this check may write (`-r`).
    pub fn repairs(&self) -> bool {
        self.repair.is_some()
    }
}

pub fn run(a: Args) -> Result<i32> {
    let repair = match a.repair.as_deref() {
        None => Repair::None,
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(other) => bail!("-r {other}: expected leaks or all"),
    };
    let format = match &a.format {
        Some(f) => common::parse_format(f)?,
        None => chain::probe_path(&a.file)
            .with_context(|| format!("cannot open {}", a.file.display()))?,
    };
    if format == Format::Raw {
        eprintln!("viridian: This image format does not support checks");
        return Ok(63);
    }
    let first = check_once(&a, format, repair)?;
    // After a repair, check again (as qemu-img does) so the report and the exit code say what
    // is left, not what was found before repairing: a leak that could not be returned keeps
    // exit code 3 and is named, and the end offset is the repaired file's.
    let (report, after) = if repair != Repair::None && first.leaks + first.corruptions > 0 {
        let second = check_once(&a, format, Repair::None)?;
        let code = second.exit_code();
        let mut merged = second.clone();
        merged.leaks_fixed = first.leaks_fixed;
        merged.corruptions_fixed = first.corruptions_fixed;
        merged.findings = first.findings.clone();
        (merged, Some((second, code)))
    } else {
        (first, None)
    };
    match a.output {
        Output::Json if !a.quiet => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Human if !a.quiet => print_human(&report, after.as_ref().map(|(s, _)| s)),
        _ => {}
    }
    Ok(match after {
        Some((_, code)) => code,
        None => report.exit_code(),
    })
}

/// One pass of the format's checker (repairing when asked).
fn check_once(a: &Args, format: Format, repair: Repair) -> Result<CheckReport> {
    let access = if repair == Repair::None {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    let storage: Arc<dyn Storage> = Arc::new(
        FileStorage::open(&a.file, access, !a.force_share || repair != Repair::None)
            .with_context(|| format!("cannot open {}", a.file.display()))?,
    );
    let result = match format {
        Format::Vhd => vhd::check_with_cache(
            storage,
            repair,
            chain::default_bat_cache_bytes().unwrap_or(vhd::DEFAULT_BAT_CACHE_BYTES),
        ),
        _ => vhdx::check_with_cache(
            storage,
            repair,
            chain::default_bat_cache_bytes().unwrap_or(vhdx::DEFAULT_BAT_CACHE_BYTES),
        ),
    };
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            // The check itself could not finish (qemu's exit code 1 case).
            let mut r = CheckReport {
                check_errors: 1,
                ..Default::default()
            };
            r.warning(e.to_string());
            r
        }
    };
    report.filename = a.file.display().to_string();
    report.format = common::qemu_format_name(format.name()).to_string();
    Ok(report)
}

/// `after`: the re-check after a repair; its counts are what is left.
fn print_human(r: &CheckReport, after: Option<&CheckReport>) {
    for f in &r.findings {
        let tag = match (f.kind, f.fixed) {
            (_, true) => "Repaired",
            ("corruption", _) => "ERROR",
            ("leak", _) => "Leaked",
            _ => "Warning",
        };
        eprintln!("{tag}: {}", f.message);
    }
    let (remaining_corruptions, remaining_leaks) = match after {
        Some(s) => (s.corruptions, s.leaks),
        None => (
            r.corruptions - r.corruptions_fixed.min(r.corruptions),
            r.leaks - r.leaks_fixed.min(r.leaks),
        ),
    };
    if r.corruptions_fixed + r.leaks_fixed > 0 {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n",
            r.leaks_fixed, r.corruptions_fixed
        );
    }
    if let Some(s) = after {
        println!("Double checking the fixed image now...");
        for f in s
            .findings
            .iter()
            .filter(|f| !f.fixed && f.kind != "warning")
        {
            let what = if f.kind == "corruption" {
                "corruption"
            } else {
                "leak"
            };
            println!("Could not repair this {what}: {}", f.message);
        }
        if s.leaks > 0 {
            println!(
                "Leaked space in the middle of the file cannot be returned by check; \
                 `viridian compact` moves blocks down and returns it."
            );
        }
    }
    if r.check_errors > 0 {
        println!(
            "{} internal errors occurred during the check.",
            r.check_errors
        );
    } else if remaining_corruptions > 0 {
        println!(
            "{remaining_corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it."
        );
    } else if remaining_leaks > 0 {
        println!(
            "{remaining_leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data."
        );
    } else {
        println!("No errors were found on the image.");
    }
    if let (Some(a), Some(t)) = (r.allocated_clusters, r.total_clusters) {
        let pct = if t == 0 {
            0.0
        } else {
            a as f64 * 100.0 / t as f64
        };
        let frag = r.fragmented_clusters.unwrap_or(0);
        let fpct = if a == 0 {
            0.0
        } else {
            frag as f64 * 100.0 / a as f64
        };
        println!("{a}/{t} = {pct:.2}% allocated, {fpct:.2}% fragmented, 0.00% compressed clusters");
    }
    if let Some(end) = r.image_end_offset {
        println!("Image end offset: {end}");
    }
}

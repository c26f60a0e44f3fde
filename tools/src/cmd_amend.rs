//! `viridian amend -o KEY=VALUE FILE`: change an existing VHD/VHDX in place (qemu-img amend;
//! Hyper-V's Set-VHD -PhysicalSectorSizeBytes and Convert-VHD -VHDType without a second name).
//!
//! * `physical_sector_size` (VHDX) is one metadata item, changed through the image's log.
//! * `subformat` and `block_size` change the layout of the whole file, so the image is copied
//!   into a new file beside it (`.NAME.amend-PID`), made durable, given the old image's identity
//!   (VHD unique id and time stamp, VHDX DataWriteGuid: what differencing children check, so
//!   they keep opening on it; VHDX page 83 id: the disk the guest sees), and only then renamed
//!   over the original. A failure at any step
//!   before the rename removes the new file and leaves the original untouched.
//!
//! Options that only make sense at creation get qemu-img's answer ("Invalid parameter ...
//! This option is only supported for image creation"), exit 1.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use chain::Format;
use clap::Parser;

use crate::common::{self, parse_size, SizeRuleArg};

#[derive(clap::Args)]
pub struct Args {
    /// Image format (vhd/vpc or vhdx); probed when absent.
    #[arg(short = 'f', value_name = "FORMAT")]
    format: Option<String>,
    /// What to change: KEY=VALUE[,KEY=VALUE...] (repeatable); `-o help` lists the keys.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Show progress while an image is rewritten.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: print no messages (errors are still printed).
    #[arg(short = 'q')]
    quiet: bool,
    /// The image to change.
    file: Option<PathBuf>,
}

const HELP: &str = "\
Amend options for 'vhdx':
  physical_sector_size=512|4096  Physical sector size reported to the guest (metadata only)
  subformat=fixed|dynamic        Rewrite the image as fixed (preallocated) or dynamic (sparse)
  block_size=SIZE                Rewrite the image with another block size (1M to 256M)
Amend options for 'vpc' (VHD):
  subformat=fixed|dynamic        Rewrite the image as fixed or dynamic
  block_size=SIZE                Rewrite the image with another block size (4k to 256M)
A rewrite keeps the image's identity, so differencing children keep opening on it.
Differencing images cannot be rewritten (commit or convert them instead).";

/// Options `create` takes that cannot change afterwards.
const CREATE_ONLY: &[&str] = &[
    "log_size",
    "logical_sector_size",
    "force_size",
    "size_rule",
    "azure",
    "preallocation",
    "block_state_zero",
    "size",
];

/// What the image is now, as far as amend cares.
struct Current {
    fixed: bool,
    differencing: bool,
    block_size: u32,
    physical_sector: Option<u32>,
    logical_sector: Option<u32>,
}

pub fn run(a: Args) -> Result<i32> {
    if a.options.is_empty() {
        eprintln!("viridian: Must specify options (-o)\nTry 'viridian amend --help' for more info");
        return Ok(1);
    }
    if a.options.iter().any(|o| o.split(',').any(|i| i == "help")) {
        // As qemu-img: a raw image (named by -f or found in FILE) has nothing to amend.
        let raw = match (&a.format, &a.file) {
            (Some(f), _) => common::parse_format(f)? == Format::Raw,
            (None, Some(file)) => chain::probe_path(file).ok() == Some(Format::Raw),
            _ => false,
        };
        if raw {
            eprintln!("viridian: Format driver 'raw' does not support option amendment");
            return Ok(1);
        }
        println!("{HELP}");
        return Ok(0);
    }
    let Some(file) = a.file.as_deref() else {
        eprintln!(
            "viridian: Expecting one image file name\nTry 'viridian amend --help' for more info"
        );
        return Ok(1);
    };
    let format = match &a.format {
        Some(f) => common::parse_format(f)?,
        None => {
            chain::probe_path(file).with_context(|| format!("cannot open {}", file.display()))?
        }
    };
    if format == Format::Raw {
        eprintln!("viridian: Format driver 'raw' does not support option amendment");
        return Ok(1);
    }
    let opts = common::parse_options(&a.options)?;
    let mut want_fixed = None;
    let mut want_block = None;
    let mut want_physical = None;
    for (k, v) in &opts {
        match k.as_str() {
            "subformat" => {
                want_fixed = Some(match v.as_str() {
                    "fixed" => true,
                    "dynamic" => false,
                    "diff" | "differencing" => bail!(
                        "Changing the subformat to differencing is not supported (use snapshot)"
                    ),
                    _ => bail!("subformat={v}: expected fixed or dynamic"),
                })
            }
            "block_size" => {
                want_block = Some(u32::try_from(parse_size(v)?).context("block_size too large")?)
            }
            "physical_sector_size" if format == Format::Vhd => {
                bail!("Changing the physical sector size is not supported: a VHD has no such field")
            }
            "physical_sector_size" => {
                let ps = parse_size(v)? as u32;
                if ps != 512 && ps != 4096 {
                    bail!("physical_sector_size={v}: expected 512 or 4096");
                }
                want_physical = Some(ps);
            }
            k if CREATE_ONLY.contains(&k) => {
                eprintln!(
                    "viridian: Invalid parameter '{k}'\nThis option is only supported for image creation"
                );
                return Ok(1);
            }
            k => {
                eprintln!("viridian: Invalid parameter '{k}'");
                return Ok(1);
            }
        }
    }
    // What an amend killed before its rename left behind goes, whatever this amend does.
    if let Ok(real) = std::fs::canonicalize(file) {
        if let (Some(dir), Some(name)) = (real.parent(), real.file_name()) {
            crate::replace::remove_stale(dir, &format!(".{}.amend-", name.to_string_lossy()));
        }
    }
    let cur = current(file, format)?;
    let target_fixed = want_fixed.unwrap_or(cur.fixed);
    if want_block.is_some() && target_fixed {
        bail!("Changing the block size of a fixed image is not supported: it has no blocks");
    }
    let rewrite = target_fixed != cur.fixed || want_block.is_some_and(|b| b != cur.block_size);
    if rewrite && cur.differencing {
        bail!(
            "Changing the {} of a differencing image is not supported: {} would lose its \
             parent link; commit or convert it instead",
            if want_fixed.is_some() {
                "subformat"
            } else {
                "block size"
            },
            file.display()
        );
    }
    if rewrite {
        rewrite_image(
            file,
            format,
            &cur,
            want_fixed,
            want_block,
            want_physical,
            &a,
        )?;
    } else if let Some(ps) = want_physical.filter(|&p| Some(p) != cur.physical_sector) {
        let d = open_vhdx(file, &vhdx::OpenOptions { read_only: false })
            .with_context(|| format!("cannot open {}", file.display()))?;
        d.set_physical_sector_size(ps).with_context(|| {
            format!(
                "cannot change the physical sector size of {}",
                file.display()
            )
        })?;
        disk::BlockDevice::close(&d)
            .with_context(|| format!("cannot finish writing {}", file.display()))?;
    }
    Ok(0)
}

fn current(file: &Path, format: Format) -> Result<Current> {
    let ctx = || format!("cannot open {}", file.display());
    Ok(match format {
        Format::Vhdx => {
            let i = open_vhdx(file, &vhdx::OpenOptions { read_only: true })
                .with_context(ctx)?
                .info();
            Current {
                fixed: i.leave_blocks_allocated,
                differencing: i.has_parent,
                block_size: i.block_size,
                physical_sector: Some(i.physical_sector_size),
                logical_sector: Some(i.logical_sector_size),
            }
        }
        _ => {
            let d = open_vhd(
                file,
                &vhd::OpenOptions {
                    read_only: true,
                    size_rule: vhd::SizeRule::Auto,
                },
            )
            .with_context(ctx)?;
            let i = d.info_with(false);
            Current {
                fixed: d.disk_type() == vhd::DiskType::Fixed,
                differencing: d.disk_type() == vhd::DiskType::Differencing,
                block_size: i.block_size.unwrap_or(0),
                physical_sector: None,
                logical_sector: None,
            }
        }
    })
}

/// Copies `file` into a new file beside it with the wanted layout, makes it durable, gives it
/// the old identity and renames it over `file`. The original stays until the rename.
fn rewrite_image(
    file: &Path,
    format: Format,
    cur: &Current,
    want_fixed: Option<bool>,
    want_block: Option<u32>,
    want_physical: Option<u32>,
    a: &Args,
) -> Result<()> {
    // The rename replaces a directory entry: the image's own (not a symbolic link to it, not
    // one of several hard links), only if we may write it and nobody has it open.
    let plan = crate::replace::Replacement::plan_locked(file, "amend", &[], false)?;
    // A shared hold on the original for the whole rewrite: a writer (serve --rw, a VM) cannot
    // open it meanwhile, so the copy is the content that the rename then replaces.
    let hold = common::open_ro(file, Some(format.name()), SizeRuleArg::Auto)?;
    let tmp = plan.temp.clone();
    let guard = common::RemoveOnFailure::new(&tmp);

    let fixed = want_fixed.unwrap_or(cur.fixed);
    let mut o = vec![format!(
        "subformat={}",
        if fixed { "fixed" } else { "dynamic" }
    )];
    if !fixed {
        if let Some(b) = want_block.or(Some(cur.block_size).filter(|&b| b != 0)) {
            o.push(format!("block_size={b}"));
        }
    }
    if let Some(ps) = want_physical.or(cur.physical_sector) {
        o.push(format!("physical_sector_size={ps}"));
    }
    if let Some(ls) = cur.logical_sector {
        o.push(format!("logical_sector_size={ls}"));
    }
    if format == Format::Vhd {
        // The copy must have exactly the size the original reads as.
        o.push("force_size=on".into());
    }
    let fmt = format.name().to_string();
    let mut argv: Vec<String> = vec!["convert".into(), "-q".into()];
    argv.extend([
        "-f".into(),
        fmt.clone(),
        "-O".into(),
        fmt,
        "-o".into(),
        o.join(","),
    ]);
    // Durable before it can replace anything.
    argv.extend(["-t".into(), "writeback".into()]);
    if a.progress {
        argv.push("-p".into());
    }
    argv.push(file.display().to_string());
    argv.push(tmp.display().to_string());
    let conv = ConvertCli::try_parse_from(&argv)
        .map_err(|e| anyhow::anyhow!("internal convert arguments: {e}"))?;
    crate::cmd_convert::run(conv.args)
        .with_context(|| format!("cannot rewrite {} (it is unchanged)", file.display()))?;

    adopt_identity(file, &tmp, format)
        .with_context(|| format!("cannot rewrite {} (it is unchanged)", file.display()))?;
    // The original's owner and mode, durable data, then the rename, done while the hold is
    // still there: no writer can slip in between and write to the file being replaced.
    plan.commit()
        .with_context(|| format!("cannot replace {} (it is unchanged)", file.display()))?;
    guard.disarm();
    drop(hold);
    if !a.quiet {
        eprintln!(
            "viridian: rewrote {} as a {} image",
            file.display(),
            if fixed { "fixed" } else { "dynamic" }
        );
    }
    Ok(())
}

/// Gives the copy at `tmp` the identity of `file`, which it is about to replace.
fn adopt_identity(file: &Path, tmp: &Path, format: Format) -> Result<()> {
    match format {
        Format::Vhdx => {
            let old = open_vhdx(file, &vhdx::OpenOptions { read_only: true })?;
            let new = open_vhdx(tmp, &vhdx::OpenOptions { read_only: false })?;
            // The guest keeps seeing the same disk (page 83), children the same parent.
            new.set_page83(old.page83())?;
            new.adopt_data_write_guid(old.data_write_guid())?;
            disk::BlockDevice::close(&new)?;
        }
        _ => {
            let ro = vhd::OpenOptions {
                read_only: true,
                size_rule: vhd::SizeRule::Auto,
            };
            let (id, ts) = open_vhd(file, &ro)?.identity();
            let new = open_vhd(
                tmp,
                &vhd::OpenOptions {
                    read_only: false,
                    ..ro
                },
            )?;
            new.adopt_identity(id, ts)?;
            disk::BlockDevice::close(&new)?;
        }
    }
    Ok(())
}

/// Parses the convert command line amend builds, so the rewrite is exactly `convert`.
#[derive(Parser)]
struct ConvertCli {
    #[command(flatten)]
    args: crate::cmd_convert::Args,
}

/// Opens a VHDX with the global `--bat-cache` bound.
fn open_vhdx(path: &Path, opts: &vhdx::OpenOptions) -> disk::Result<vhdx::VhdxDisk> {
    let cache = chain::default_bat_cache_bytes().unwrap_or(vhdx::DEFAULT_BAT_CACHE_BYTES);
    vhdx::VhdxDisk::open_path_with_cache(path, opts, cache)
}

/// Opens a VHD with the global `--bat-cache` bound.
fn open_vhd(path: &Path, opts: &vhd::OpenOptions) -> disk::Result<vhd::VhdDisk> {
    let cache = chain::default_bat_cache_bytes().unwrap_or(vhd::DEFAULT_BAT_CACHE_BYTES);
    vhd::VhdDisk::open_path_with_cache(path, opts, cache)
}

//! `viridian measure`: the file size a VHD, VHDX or raw target needs.

use std::path::PathBuf;

use anyhow::{bail, Result};
use chain::Format;
use serde_json::json;

use crate::common::{self, Output, SizeRuleArg};

#[derive(clap::Args)]
pub struct Args {
    /// Target format: raw (the default, as in qemu-img measure), vhd/vpc or vhdx.
    #[arg(short = 'O', value_name = "FORMAT", default_value = "raw")]
    out_format: String,
    /// Target options, as for create.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Format of FILE (probed when absent).
    #[arg(short = 'f', value_name = "FORMAT")]
    format: Option<String>,
    /// Output as human text or JSON (qemu-img's keys).
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// Measure a new empty image of this size instead of FILE.
    #[arg(long)]
    size: Option<String>,
    /// Force shared access: open without the lock, so the image can be read while another
    /// process (serve --rw, a VM) writes it; what is read may then be inconsistent.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// How a VHD source's virtual size is derived.
    #[arg(long = "size-rule", value_enum, default_value_t = SizeRuleArg::Auto)]
    size_rule: SizeRuleArg,
    /// The image to measure (or --size).
    file: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<i32> {
    let format = common::parse_format(&a.out_format)?;
    // The target's allocation unit: data anywhere in a block allocates the whole block.
    let spec0 = crate::cmd_create::spec_from_options(format, 0, &a.options)?;
    let unit = u64::from(spec0.block_size.unwrap_or(match format {
        Format::Vhd => vhd::DEFAULT_BLOCK_SIZE,
        Format::Vhdx => vhdx::DEFAULT_BLOCK_SIZE,
        Format::Raw => 1 << 20,
    }))
    .max(512);
    let (size, allocated) = match (&a.size, &a.file) {
        (Some(s), None) => (common::parse_size(s)?, 0),
        (None, Some(f)) => {
            let d = common::open_ro_shared(f, a.format.as_deref(), a.size_rule, a.force_share)?;
            let mut blocks = 0u64;
            let mut last_block: Option<u64> = None;
            disk::map::for_each_extent(d.as_ref(), |e| {
                if e.data {
                    let first = e.start / unit;
                    let last = (e.start + e.length - 1) / unit;
                    let first = if last_block == Some(first) {
                        first + 1
                    } else {
                        first
                    };
                    if last >= first {
                        blocks += last - first + 1;
                    }
                    last_block = Some(last);
                }
                Ok(())
            })?;
            (d.size(), (blocks * unit).min(d.size()))
        }
        _ => bail!("measure needs either --size or FILE (not both)"),
    };
    let mut spec = spec0;
    spec.size = size;
    // No number for an image `create` would refuse.
    crate::cmd_create::validate_spec(format, &spec)?;
    let (required, full) = match format {
        // A raw file needs its whole size (sparse files may use less, as qemu-img says too).
        Format::Raw => (size, size),
        Format::Vhd => vhd::measure(size, allocated, &chain::vhd_options(&spec, None)),
        Format::Vhdx => vhdx::measure(size, allocated, &chain::vhdx_options(&spec, None)),
    };
    match a.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({"required": required, "fully-allocated": full}))?
        ),
        Output::Human => {
            println!("required size: {required}");
            println!("fully allocated size: {full}");
        }
    }
    Ok(0)
}

//! `viridian map`: the allocation map with qemu-img map's keys, with real VHDX block states.

use std::path::PathBuf;

use anyhow::Result;
use serde_json::{json, Value};

use crate::common::{self, Output, SizeRuleArg};

#[derive(clap::Args)]
pub struct Args {
    /// Image format (raw, vhd/vpc or vhdx); probed when absent.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Output as human text or JSON (qemu-img's keys).
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// Start the map at this offset (suffixes as for sizes).
    #[arg(long = "start-offset", default_value = "0")]
    start_offset: String,
    /// Map at most this many bytes.
    #[arg(long = "max-length")]
    max_length: Option<String>,
    /// Force shared access: open without the lock, so the image can be read while another
    /// process (serve --rw, a VM) writes it; what is read may then be inconsistent.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// How a VHD's virtual size is derived (auto follows qemu 10).
    #[arg(long = "size-rule", value_enum, default_value_t = SizeRuleArg::Auto)]
    size_rule: SizeRuleArg,
    /// The image file.
    file: PathBuf,
}

pub fn run(a: Args) -> Result<i32> {
    let d = common::open_ro_shared(&a.file, a.format.as_deref(), a.size_rule, a.force_share)?;
    let size = d.size();
    let start = common::parse_size(&a.start_offset)?.min(size);
    let len = match &a.max_length {
        Some(m) => common::parse_size(m)?.min(size - start),
        None => size - start,
    };
    let extents = disk::map::map_range(d.as_ref(), start, len)?;
    let layers = chain::layers(&d);
    match a.output {
        Output::Json => {
            let items: Vec<Value> = extents
                .iter()
                .map(|e| {
                    let mut v = json!({
                        "start": e.start,
                        "length": e.length,
                        "depth": e.depth,
                        "present": e.present,
                        "zero": e.zero,
                        "data": e.data,
                        "compressed": false,
                    });
                    if let Some(off) = e.offset {
                        v["offset"] = json!(off);
                    }
                    v
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&Value::Array(items))?);
        }
        Output::Human => {
            println!("{:<20}{:<20}{:<20}File", "Offset", "Length", "Mapped to");
            for e in extents.iter().filter(|e| e.data) {
                let file = layers
                    .get(e.depth)
                    .and_then(|l| l.path())
                    .map(common::shown_path)
                    .unwrap_or_default();
                let mapped = e
                    .offset
                    .map(|o| format!("{o:#x}"))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<20}{:<20}{:<20}{file}",
                    format!("{:#x}", e.start),
                    format!("{:#x}", e.length),
                    mapped
                );
            }
        }
    }
    Ok(0)
}

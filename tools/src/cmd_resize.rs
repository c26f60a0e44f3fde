//! `viridian resize` and `viridian compact`.

use disk::BlockDevice;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use chain::OpenOptions;

use crate::common::{self, SizeRuleArg};

#[derive(clap::Args)]
pub struct Args {
    /// Image format (raw, vhd/vpc or vhdx); probed when absent.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Allow making the image smaller.
    #[arg(long)]
    shrink: bool,
    /// How the new space of a growing fixed image (or raw file) is allocated: off, metadata,
    /// falloc or full. Fixed images default to falloc, as `create` makes them fully allocated.
    #[arg(long, value_name = "MODE")]
    preallocation: Option<String>,
    /// Quiet: print no messages (errors are still printed).
    #[arg(short = 'q')]
    quiet: bool,
    /// The image file.
    file: PathBuf,
    /// New size, or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

pub fn run(a: Args) -> Result<i32> {
    let mut rw = OpenOptions::read_write();
    rw.no_parent = true;
    let image = common::open_image_with(&a.file, a.format.as_deref(), SizeRuleArg::Auto, rw)?;
    let d = image.disk();
    let cur = d.size();
    let new = if let Some(rest) = a.size.strip_prefix('+') {
        cur.checked_add(common::parse_size(rest)?)
            .context("size overflows")?
    } else if let Some(rest) = a.size.strip_prefix('-') {
        cur.checked_sub(common::parse_size(rest)?)
            .context("cannot shrink below zero")?
    } else {
        common::parse_size(&a.size)?
    };
    if new < cur && !a.shrink {
        bail!("use --shrink to make {} smaller ({cur} -> {new} bytes); data past the new end would be lost", a.file.display());
    }
    if new == cur {
        // Nothing to change, and nothing written: a parent's identity stays, its children valid.
        if !a.quiet {
            println!("Image resized.");
        }
        return Ok(0);
    }
    if d.parent_link().is_some() {
        bail!(
            "{} is a differencing image: resize its base and the whole chain instead",
            a.file.display()
        );
    }
    let prealloc = a
        .preallocation
        .as_deref()
        .map(common::Prealloc::parse)
        .transpose()?;
    let fixed = d.facts().disk_type == Some("fixed");
    // A fixed image is fully allocated from creation; its new space is too unless told off.
    let fill = match prealloc {
        Some(p) => p,
        None if fixed => common::Prealloc::Falloc,
        None => common::Prealloc::Off,
    };
    if new > cur && !fixed && !matches!(image, chain::Image::Raw(_)) {
        if let Some(p @ (common::Prealloc::Falloc | common::Prealloc::Full)) = prealloc {
            bail!(
                "--preallocation={}: a dynamic image allocates blocks as they are written",
                if p == common::Prealloc::Falloc {
                    "falloc"
                } else {
                    "full"
                }
            );
        }
    }
    match &image {
        chain::Image::Vhd(v) => v.resize(new)?,
        chain::Image::Vhdx(v) => v.resize(new)?,
        chain::Image::Raw(_) => {
            // Raw: the file length is the size.
            drop(d);
            drop(image);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&a.file)
                .with_context(|| format!("cannot open {}", a.file.display()))?;
            f.set_len(new)
                .with_context(|| format!("cannot resize {}", a.file.display()))?;
            f.sync_all()?;
            if new > cur {
                common::preallocate(&a.file, fill)?;
            }
            if !a.quiet {
                println!("Image resized.");
            }
            return Ok(0);
        }
    }
    d.close()
        .with_context(|| format!("cannot finish writing {}", a.file.display()))?;
    drop(d);
    drop(image);
    if new > cur && fixed {
        common::preallocate(&a.file, fill)?;
    }
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(0)
}

#[derive(clap::Args)]
pub struct CompactArgs {
    /// Image format (vhd/vpc or vhdx); probed when absent.
    #[arg(short = 'f', long = "format", value_name = "FORMAT")]
    format: Option<String>,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image to compact (not in use by another process).
    file: PathBuf,
}

/// File length and bytes allocated on disk.
fn sizes(path: &std::path::Path) -> Result<(u64, u64)> {
    let m = std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok((m.len(), m.blocks() * 512))
}

pub fn run_compact(a: CompactArgs) -> Result<i32> {
    let (len_before, alloc_before) = sizes(&a.file)?;
    let rw = OpenOptions::read_write();
    let image = common::open_image_with(&a.file, a.format.as_deref(), SizeRuleArg::Auto, rw)?;
    let d = image.disk();
    let fixed = d.facts().disk_type == Some("fixed");
    if fixed {
        d.close()?;
        if !a.quiet {
            println!(
                "Nothing to do: {} is a fixed image (every block is allocated by design); \
                 convert it to a dynamic image to make it smaller",
                a.file.display()
            );
        }
        return Ok(0);
    }
    let (freed, moved) = match &image {
        chain::Image::Vhd(v) => {
            let s = v.compact()?;
            (s.blocks_freed, s.blocks_moved)
        }
        chain::Image::Vhdx(v) => {
            let s = v.compact()?;
            (s.blocks_released, s.blocks_moved)
        }
        chain::Image::Raw(_) => bail!(
            "compact works on vhd and vhdx images; {} is {}",
            a.file.display(),
            d.format()
        ),
    };
    d.close()
        .with_context(|| format!("cannot finish writing {}", a.file.display()))?;
    drop(d);
    let (len_after, alloc_after) = sizes(&a.file)?;
    if !a.quiet {
        println!(
            "Compacted {}: {freed} blocks released, {moved} moved\n\
             file size:      {len_before} -> {len_after} bytes\n\
             allocated size: {alloc_before} -> {alloc_after} bytes",
            a.file.display(),
        );
    }
    Ok(0)
}

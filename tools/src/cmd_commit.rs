//! `viridian commit`: merge a differencing image (and, with -b, the layers between) into an
//! ancestor, like Hyper-V's Merge-VHD.
//!
//! Only ranges that a layer above the base defines are read (through the merged view) and
//! written into the base, so the base ends up reading exactly as the child did. Afterwards the
//! merged layers either stay, re-linked so the chain still opens and reads the same, or are
//! deleted with `--remove` (what Merge-VHD does).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use chain::OpenOptions;
use disk::BlockDevice;

use crate::common::{self, SizeRuleArg};
use crate::progress;

#[derive(clap::Args)]
pub struct Args {
    /// Image format (raw, vhd/vpc or vhdx); probed when absent.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Merge down to this ancestor instead of the immediate parent.
    #[arg(short = 'b', long = "base")]
    base: Option<PathBuf>,
    /// Delete the merged images afterwards (Merge-VHD behaviour).
    #[arg(long)]
    remove: bool,
    /// Accepted for qemu-img compatibility: we never empty the child.
    #[arg(short = 'd')]
    drop: bool,
    /// Show a progress bar.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: print no messages (errors are still printed).
    #[arg(short = 'q')]
    quiet: bool,
    /// The image file.
    file: PathBuf,
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

pub fn run(a: Args) -> Result<i32> {
    // The read side takes no locks: the base is about to be opened for writing by us.
    let mut ro = OpenOptions::read_only();
    ro.lock = false;
    let top = common::open_with(&a.file, a.format.as_deref(), SizeRuleArg::Auto, ro.clone())?;
    let layers = chain::layers(&top);
    if layers.len() < 2 {
        bail!(
            "{} has no backing file: nothing to commit",
            a.file.display()
        );
    }
    let base_depth = match &a.base {
        None => 1,
        Some(b) => layers
            .iter()
            .position(|l| l.path().is_some_and(|p| same_file(p, b)))
            .filter(|&d| d > 0)
            .ok_or_else(|| {
                anyhow!(
                    "{} is not a backing file of {}",
                    b.display(),
                    a.file.display()
                )
            })?,
    };
    let path_of = |l: &Arc<dyn BlockDevice>| -> Result<PathBuf> {
        Ok(l.path()
            .ok_or_else(|| anyhow!("an image of the chain has no file"))?
            .to_path_buf())
    };
    let base_path = path_of(&layers[base_depth])?;
    let above = path_of(&layers[base_depth - 1])?;
    let merged: Vec<PathBuf> = layers[..base_depth]
        .iter()
        .map(path_of)
        .collect::<Result<_>>()?;
    let size = top.size();
    if layers[base_depth].size() != size {
        bail!(
            "{} has size {} but the child has {size}",
            base_path.display(),
            layers[base_depth].size()
        );
    }
    // The chain is opened again (after the link is prepared) for the merge itself.
    drop(layers);
    drop(top);
    let pb = progress::bar(size, a.progress, a.quiet);
    let open_top = || {
        let mut o = ro.clone();
        if let Some(f) = &a.format {
            o.format = chain::Format::parse(f);
        }
        chain::open(&a.file, &o)
    };
    let copied = chain::commit_into_base(
        &open_top,
        base_depth,
        &base_path,
        &above,
        &OpenOptions::read_write(),
        &mut |n| {
            pb.inc(n);
            // Ctrl-C or SIGTERM: stop between pieces, through the failure path that leaves
            // the chain opening as before.
            if common::interrupted() {
                return Err(disk::Error::io(
                    "stopped by a signal",
                    std::io::ErrorKind::Interrupted.into(),
                ));
            }
            Ok(())
        },
    )
    .with_context(|| {
        format!(
            "cannot commit {} into {} (the chain is left as it was and still opens; run the \
             commit again)",
            a.file.display(),
            base_path.display()
        )
    })?;
    pb.finish_and_clear();
    if a.remove {
        // Top first: a kill half-way leaves the remaining layers a chain that still opens.
        for p in &merged {
            std::fs::remove_file(p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    if !a.quiet {
        println!(
            "Image committed: {} bytes merged into {}{}",
            copied,
            base_path.display(),
            if a.remove {
                " (merged images removed)"
            } else {
                ""
            }
        );
    }
    Ok(0)
}

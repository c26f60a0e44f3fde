//! `viridian commit`: merge a differencing image (and, with -b, the layers between) into an
//! ancestor, like Hyper-V's Merge-VHD.
//!
//! Only ranges that a layer above the base defines are read (through the merged view) and
//! written into the base, so the base ends up reading exactly as the child did. Afterwards the
//! merged layers either stay, re-linked so the chain still opens and reads the same, or are
//! deleted with `--remove` (what Merge-VHD does).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use chain::OpenOptions;
use disk::{BlockDevice, Disk};

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
    let top = common::open_with(&a.file, a.format.as_deref(), SizeRuleArg::Auto, ro)?;
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
    let base_path = layers[base_depth]
        .path()
        .ok_or_else(|| anyhow!("the base image has no file"))?
        .to_path_buf();
    // A differencing base keeps its own parents so partially present blocks stay readable.
    let base_has_parent = layers[base_depth].parent_link().is_some();
    commit_into(&a, &top, base_depth, &base_path, base_has_parent)
}

fn commit_into(
    a: &Args,
    top: &Disk,
    base_depth: usize,
    base_path: &Path,
    base_has_parent: bool,
) -> Result<i32> {
    let mut rw = OpenOptions::read_write();
    rw.no_parent = !base_has_parent;
    let base = chain::open(base_path, &rw)
        .with_context(|| format!("cannot open {} for writing", base_path.display()))?;
    let size = top.size();
    if base.size() != size {
        bail!(
            "{} has size {} but the child has {size}",
            base_path.display(),
            base.size()
        );
    }
    let pb = progress::bar(size, a.progress, a.quiet);
    let merged = chain::merge(top.as_ref(), base_depth, base.as_ref(), &mut |n| pb.inc(n));
    let copied = match merged {
        Ok(n) => n,
        Err(e) => {
            // The base only received ranges the layers above define, so the chain still reads
            // the same; but writing may have changed the base's identity (VHDX), so re-link
            // the layer above it before reporting, or the chain would no longer open.
            let _ = base.close();
            drop(base);
            let layers = chain::layers(top);
            let above = layers[base_depth - 1].path().map(Path::to_path_buf);
            drop(layers);
            if let Some(above) = above {
                if let Err(r) = chain::relink(&above, base_path) {
                    eprintln!("viridian: could not re-link {}: {r}", above.display());
                }
            }
            return Err(anyhow::Error::new(e))
                .with_context(|| format!("cannot merge into {}", base_path.display()));
        }
    };
    base.close()
        .with_context(|| format!("cannot finish writing {}", base_path.display()))?;
    drop(base);
    pb.finish_and_clear();
    let layers = chain::layers(top);
    let merged: Vec<PathBuf> = layers[..base_depth]
        .iter()
        .filter_map(|l| l.path().map(Path::to_path_buf))
        .collect();
    drop(layers);
    if a.remove {
        for p in &merged {
            std::fs::remove_file(p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
    } else {
        // Writing may have changed the base's identity (VHDX DataWriteGuid); re-link the layer
        // right above it so the chain still opens.
        let above = &merged[base_depth - 1];
        crate::cmd_rebase::relink(above, base_path)?;
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

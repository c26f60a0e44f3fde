//! `viridian rebase`: give a differencing image a new parent, like Set-VHD -ParentPath.
//!
//! Safe mode (default) first copies into the image every range it does not define itself where
//! the old and the new parent read differently, so the image reads the same afterwards. `-u`
//! only rewrites the parent locator (for a parent that was moved or copied).
//!
//! Crash order (docs/RELIABILITY.md): (1) the copies go into the image; each copied range
//! reads the same through the old parent as before, so a kill during the copy leaves the old
//! chain intact; (2) then the parent link is rewritten in one step: VHDX through its log
//! (replayed at the next open: old or new locator, never a mix), VHD by writing the new locator
//! payloads to fresh space first and the 1 KiB header (inside one 4 KiB page) last. Either link
//! reads the same, because (1) made the image define every range where the parents differ.
//! Writing data into a VHDX changes its DataWriteGuid: images that have this image as their
//! parent no longer open after a safe rebase (as with any write to a parent).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use chain::OpenOptions;
use disk::BlockDevice;

use crate::common::{self, SizeRuleArg};
use crate::progress;

#[derive(clap::Args)]
pub struct Args {
    /// Image format (raw, vhd/vpc or vhdx); probed when absent.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// The new parent.
    #[arg(short = 'b', long = "backing", required = true, value_parser = clap::builder::TypedValueParser::map(clap::builder::OsStringValueParser::new(), PathBuf::from))]
    backing: PathBuf,
    /// The new parent's format: opened as that instead of being probed.
    #[arg(short = 'F', long = "backing-format")]
    backing_format: Option<String>,
    #[command(flatten)]
    windows: common::WindowsArgs,
    /// Unsafe: only rewrite the parent link; contents are not compared.
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// Show a progress bar.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: print no messages (errors are still printed).
    #[arg(short = 'q')]
    quiet: bool,
    /// The image file.
    file: PathBuf,
}

fn set_parent(
    child: &chain::Image,
    parent_path: &Path,
    parent: &dyn BlockDevice,
    windows: &chain::WindowsLocation,
) -> Result<()> {
    child
        .set_parent_located(parent_path, parent, windows)
        .with_context(|| format!("cannot point the image at {}", parent_path.display()))
}

pub fn run(a: Args) -> Result<i32> {
    if a.backing.as_os_str().is_empty() {
        bail!(
            "rebase -b \"\" (making {} standalone) is not supported: a VHD or VHDX cannot drop \
             its parent in place; `viridian convert` writes a standalone copy",
            a.file.display()
        );
    }
    // A relative backing name is relative to the image's folder, as in qemu-img and `create -b`.
    common::check_parent_name(&a.backing)?;
    let backing = common::backing_relative_to(&a.file, &a.backing);
    let new_parent = common::open_ro(&backing, a.backing_format.as_deref(), SizeRuleArg::Auto)?;
    // Checked before anything is copied: the link is refused anyway (chain::Image).
    chain::check_room_for_child(&backing, &new_parent)?;
    // The new parent's chain must not lead back to the image itself.
    let me = std::fs::canonicalize(&a.file).unwrap_or_else(|_| a.file.clone());
    let mut layer: Option<&dyn disk::BlockDevice> = Some(&new_parent);
    while let Some(l) = layer {
        if l.path()
            .and_then(|p| std::fs::canonicalize(p).ok())
            .as_ref()
            == Some(&me)
        {
            bail!(
                "{} is in the backing chain of {}: rebasing onto it would make a loop",
                a.file.display(),
                backing.display()
            );
        }
        layer = l.backing().map(|b| b.as_ref());
    }
    let mut rw = OpenOptions::read_write();
    rw.no_parent = true;
    if let Some(f) = &a.format {
        rw.format = Some(common::parse_format(f)?);
    }
    let child_image = chain::open_image(&a.file, &rw)
        .with_context(|| format!("cannot open {}", a.file.display()))?;
    let child = child_image.disk();
    if child.parent_link().is_none() {
        bail!("{} is not a differencing image", a.file.display());
    }
    if new_parent.size() != child.size() {
        bail!(
            "{} has size {} but {} has {}",
            backing.display(),
            new_parent.size(),
            a.file.display(),
            child.size()
        );
    }
    if !a.unsafe_mode {
        // The old view, read without locks (the child is open for writing above).
        let mut ro = OpenOptions::read_only();
        ro.lock = false;
        let old = chain::open(&a.file, &ro).with_context(|| {
            format!(
                "cannot open the current chain of {} (use -u if the old parent is gone)",
                a.file.display()
            )
        })?;
        let size = child.size();
        let pb = progress::bar(size, a.progress, a.quiet);
        let mut b_old = vec![0u8; 1 << 20];
        let mut b_new = vec![0u8; 1 << 20];
        let mut pos = 0;
        while pos < size {
            common::check_interrupted()?;
            let e = disk::map::status_through_chain(old.as_ref(), pos, size - pos)?;
            let defined_here = e.present && e.depth == 0;
            if !defined_here {
                let mut off = 0;
                while off < e.length {
                    let n = (e.length - off).min(b_old.len() as u64) as usize;
                    let at = pos + off;
                    old.read_at(&mut b_old[..n], at)?;
                    new_parent.read_at(&mut b_new[..n], at)?;
                    if b_old[..n] != b_new[..n] {
                        // Copy only the differing sectors' span.
                        child
                            .write_at(&b_old[..n], at)
                            .with_context(|| format!("cannot write {}", a.file.display()))?;
                    }
                    off += n as u64;
                }
            }
            pos += e.length;
            pb.inc(e.length);
        }
        pb.finish_and_clear();
    }
    set_parent(
        &child_image,
        &backing,
        new_parent.as_ref(),
        &a.windows.location(),
    )?;
    child
        .close()
        .with_context(|| format!("cannot finish writing {}", a.file.display()))?;
    Ok(0)
}

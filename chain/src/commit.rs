//! Crash-safe commit: merging the layers above a base into it so that a kill at any moment
//! leaves a chain that opens with no manual step and reads the same as before.
//!
//! Why it is safe to write the base at all while the layers above still use it: the merge
//! only writes ranges that a layer above defines, so the top's view never changes mid-merge
//! (the base's bytes under a covered range are never read through the chain).
//!
//! What can break is the identity check. A VHDX parent gets a new DataWriteGuid on its first
//! data write, and the child records the DataWriteGuid it was made against. So the order is:
//!
//! 1. Pre-choose the base's next DataWriteGuid `G1`. Rewrite the locator of the layer right
//!    above the base (through its log, atomically): `parent_linkage` = the base's current
//!    DataWriteGuid, `parent_linkage2` = `G1`; flush. From now on the child accepts both.
//! 2. Open the base for writing with `G1` chosen as its next DataWriteGuid, merge, flush,
//!    close. A kill here leaves the base with its old or its new identity, both accepted.
//! 3. Re-link the child: `parent_linkage` = `G1`, no `parent_linkage2`; flush.
//!
//! A commit that is run again after a kill starts at step 1 from whatever state it finds
//! (linkage = the base's identity as it is now), so it converges.
//!
//! VHD parents keep their Unique ID when written (the parent time stamp is not verified), so a
//! VHD child needs no re-link and its header is not rewritten at all by a commit.

use disk::{BlockDevice, Disk, Error, Result};
use std::path::Path;

use crate::{open, open_image, probe_path, Format, Image, OpenOptions};

/// Merges into `base` every range that a layer of the chain opened by `open_top` defines
/// above depth `depth_limit` (the base's depth in that chain). `above` is the layer right
/// above the base (the one whose parent link names it). Returns the bytes merged.
///
/// `open_top` is called after the link was prepared (step 1), so the reading chain sees the
/// prepared locator; it must open without locks on the base (the base is opened for writing).
pub fn commit_into_base(
    open_top: &dyn Fn() -> Result<Disk>,
    depth_limit: usize,
    base: &Path,
    above: &Path,
    template: &OpenOptions,
    progress: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<u64> {
    commit_into_base_then(
        open_top,
        depth_limit,
        base,
        above,
        template,
        &mut || Ok(()),
        progress,
    )
}

/// [`commit_into_base`], calling `before_first_write` once the base is open (and locked) for
/// writing and before anything is written to it: a commit that cannot open its base fails
/// before that, having changed nothing the caller has to record.
pub(crate) fn commit_into_base_then(
    open_top: &dyn Fn() -> Result<Disk>,
    depth_limit: usize,
    base: &Path,
    above: &Path,
    template: &OpenOptions,
    before_first_write: &mut dyn FnMut() -> Result<()>,
    progress: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<u64> {
    let vhdx_link = probe_path(above)? == Format::Vhdx && probe_path(base)? == Format::Vhdx;
    // Step 1.
    let next = if vhdx_link {
        let g = disk::Guid::new_random()
            .map_err(|e| Error::io("cannot generate the base's next DataWriteGuid", e))?;
        link_above(above, base, template, Some(g))?;
        Some(g)
    } else {
        None
    };
    // Step 2.
    let mut alone = template.clone();
    alone.read_only = true;
    alone.no_parent = true;
    alone.format = None;
    alone.parent_override = None;
    let base_has_parent = open(base, &alone)?.parent_link().is_some();
    let top = open_top()?;
    let mut rw = template.clone();
    rw.read_only = false;
    rw.format = None;
    rw.parent_override = None;
    rw.no_parent = !base_has_parent;
    let base_image = open_image(base, &rw)?;
    let base_disk = base_image.disk();
    if top.size() > base_disk.size() {
        return Err(Error::InvalidArgument(format!(
            "{} has size {} but the image above it has {}",
            base.display(),
            base_disk.size(),
            top.size()
        )));
    }
    if let Some(g) = next {
        match &base_image {
            Image::Vhdx(x) => x.set_next_data_write_guid(g)?,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "{} is no longer a VHDX",
                    base.display()
                )))
            }
        }
    }
    before_first_write()?;
    let merged = crate::merge(top.as_ref(), depth_limit, base_disk.as_ref(), progress)?;
    base_disk.close()?;
    drop(base_disk);
    drop(base_image);
    drop(top);
    // Step 3.
    if vhdx_link {
        link_above(above, base, template, None)?;
    }
    Ok(merged)
}

/// Rewrites the parent link of `above` to name `base` as it is now, plus `next` as the second
/// accepted identity (VHDX `parent_linkage2`) when given.
fn link_above(
    above: &Path,
    base: &Path,
    template: &OpenOptions,
    next: Option<disk::Guid>,
) -> Result<()> {
    let mut rw = template.clone();
    rw.read_only = false;
    rw.no_parent = true;
    rw.format = None;
    rw.parent_override = None;
    let child = open_image(above, &rw)?;
    let mut ro = template.clone();
    ro.read_only = true;
    ro.no_parent = true;
    ro.format = None;
    ro.parent_override = None;
    let parent = open(base, &ro)?;
    let abs = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
    let Image::Vhdx(x) = &child else {
        return Err(Error::InvalidArgument(format!(
            "{} is not a VHDX",
            above.display()
        )));
    };
    x.set_parent_with_next(&abs, parent.as_ref(), next)?;
    drop(parent);
    x.close()
}

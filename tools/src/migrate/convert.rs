//! Writing one output image from a (merged) view, and the guards around it: free space and
//! removal of partial outputs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use disk::{BlockDevice, Disk};

use super::plan::{DiskPlan, OutFormat};
use crate::common::{self, human_size};

/// Copy unit: the VHDX block size, so every write fills whole blocks.
const CHUNK: u64 = 1 << 20;

/// Bytes available to an unprivileged writer in the file system holding `dir` (or its nearest
/// existing ancestor).
pub fn free_space(dir: &Path) -> Result<u64> {
    let mut probe = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p.to_path_buf(),
            None => break,
        }
    }
    let st = nix::sys::statvfs::statvfs(&probe)
        .with_context(|| format!("cannot read the free space of {}", probe.display()))?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Fails unless `dir` has room for `need` bytes.
pub fn check_room(dir: &Path, need: u64) -> Result<()> {
    let avail = free_space(dir)?;
    if avail < need {
        bail!(
            "not enough room in {}: the migration needs about {} ({need} bytes), only {} ({avail} bytes) is free",
            dir.display(),
            human_size(need),
            human_size(avail)
        );
    }
    Ok(())
}

/// Removes every file (and the target directory, if this run made it) unless disarmed.
pub struct Cleanup {
    files: Vec<PathBuf>,
    made_dir: Option<PathBuf>,
    armed: bool,
}

impl Cleanup {
    pub fn new(made_dir: Option<PathBuf>) -> Self {
        Cleanup {
            files: Vec::new(),
            made_dir,
            armed: true,
        }
    }
    pub fn add(&mut self, p: &Path) {
        self.files.push(p.to_path_buf());
    }
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for f in self.files.iter().rev() {
            let _ = std::fs::remove_file(f);
        }
        if let Some(d) = &self.made_dir {
            // Only when empty: never remove what someone else put there.
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// What a conversion produced.
pub struct Converted {
    pub bytes_written: u64,
    pub virtual_size: u64,
    pub geometry: Option<String>,
    pub note: Option<String>,
}

/// Creates `out` (never overwriting) and copies `disk`'s view into it. The caller registers
/// `out` for cleanup before calling, so a failure anywhere leaves nothing behind.
pub fn convert(
    disk: &DiskPlan,
    out: &Path,
    physical_sector_size: u32,
    pb: &indicatif::ProgressBar,
) -> Result<Converted> {
    let view = disk
        .view
        .clone()
        .context("internal error: the disk has no opened view")?;
    let size = disk.guest_size;
    let (target, note) = create_target(disk, out, size, physical_sector_size)?;
    if target.size() != size {
        bail!(
            "{} would have {} bytes, not the guest's {size}; nothing converted",
            out.display(),
            target.size()
        );
    }
    let written = copy(view.as_ref(), target.as_ref(), pb)
        .with_context(|| format!("cannot convert {} to {}", disk.source, out.display()))?;
    target
        .close()
        .with_context(|| format!("cannot finish writing {}", out.display()))?;
    let geometry = vhd_geometry(target.as_ref());
    Ok(Converted {
        bytes_written: written,
        virtual_size: target.size(),
        geometry,
        note,
    })
}

fn create_target(
    disk: &DiskPlan,
    out: &Path,
    size: u64,
    physical_sector_size: u32,
) -> Result<(Disk, Option<String>)> {
    let mk = |spec: &chain::CreateSpec| {
        chain::create(out, spec).with_context(|| format!("cannot create {}", out.display()))
    };
    match disk.output_format {
        OutFormat::Vhdx => {
            let mut spec = chain::CreateSpec::new(chain::Format::Vhdx, size);
            spec.block_size = Some(CHUNK as u32);
            spec.logical_sector_size = Some(512);
            spec.physical_sector_size = Some(physical_sector_size);
            Ok((mk(&spec)?, None))
        }
        OutFormat::Vhd => {
            let mut spec = chain::CreateSpec::new(chain::Format::Vhd, size);
            if !disk.chs_sized {
                return Ok((mk(&spec)?, None));
            }
            // Keep the CHS rule: geometry whose capacity is exactly the guest size, and
            // current_size equal to it, so every reader (CHS or current_size) agrees.
            spec.vhd_size_rule = vhd::SizeRule::Chs;
            if let Ok(t) = mk(&spec) {
                if t.size() == size && vhd_chs_size(t.as_ref()) == Some(size) {
                    return Ok((t, None));
                }
                drop(t);
                std::fs::remove_file(out)
                    .with_context(|| format!("cannot remove {} to retry", out.display()))?;
            }
            spec.vhd_size_rule = vhd::SizeRule::CurrentSize;
            let t = mk(&spec)?;
            let note = format!(
                "no CHS geometry has exactly {size} bytes; current_size keeps the exact size, the geometry {} is smaller",
                vhd_geometry(t.as_ref()).unwrap_or_default()
            );
            Ok((t, Some(note)))
        }
    }
}

fn vhd_chs_size(d: &dyn BlockDevice) -> Option<u64> {
    d.facts().chs_size
}

fn vhd_geometry(d: &dyn BlockDevice) -> Option<String> {
    d.facts().geometry.map(|(c, h, s)| format!("{c}/{h}/{s}"))
}

/// Copies the data extents of `src` into the fresh (all-zero) `dst`, skipping zero chunks.
/// Returns the bytes written.
fn copy(src: &dyn BlockDevice, dst: &dyn BlockDevice, pb: &indicatif::ProgressBar) -> Result<u64> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut written = 0u64;
    disk::map::for_each_extent(src, |e| {
        if common::interrupted() {
            return Err(disk::Error::InvalidArgument("interrupted".into()));
        }
        if e.data {
            let end = e.start + e.length;
            let mut pos = e.start;
            while pos < end {
                let n = (CHUNK - pos % CHUNK).min(end - pos);
                let b = &mut buf[..n as usize];
                src.read_at(b, pos)?;
                if !disk::is_zero(b) {
                    dst.write_at(b, pos)?;
                    written += n;
                }
                pos += n;
                pb.inc(n);
            }
        } else {
            pb.inc(e.length);
        }
        Ok(())
    })?;
    common::check_interrupted()?;
    dst.flush()?;
    Ok(written)
}

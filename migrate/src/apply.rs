//! The apply step: write every output of a plan under the target directory (the converted
//! disks, the VM description and the reports), never over an existing file, with room checked
//! first; a failure or an interruption removes everything this run wrote.

use std::io::Write;
use std::path::{Path, PathBuf};

use disk::{BlockDevice, Disk};

use crate::plan::{DiskPlan, OutFormat, Plan, Settings};
use crate::report::{self, Outcome};
use crate::{Error, Result};

/// Copy unit: the VHDX block size, so every write fills whole blocks.
const CHUNK: u64 = 1 << 20;

/// What the caller sees of an apply run: progress, and a way to stop it.
pub trait Observer {
    /// Polled between extents; true stops the run with [`Error::Interrupted`].
    fn interrupted(&self) -> bool;
    /// `disk` is about to be converted to `out`.
    fn converting(&mut self, _disk: &DiskPlan, _out: &Path) {}
    /// `n` more bytes of the current disk are done.
    fn copied(&mut self, _n: u64) {}
    /// `disk` was converted to `out`.
    fn converted(&mut self, _disk: &DiskPlan, _out: &Path, _result: &Converted) {}
}

/// Writes every output of `plan` under `s.to` (made when missing): the converted disks, the
/// VM description and `report.md`/`report.json`. Refuses a plan with an undecided undo disk.
/// Returns the outcome of each disk.
pub fn apply(s: &Settings, plan: &Plan, obs: &mut dyn Observer) -> Result<Vec<Outcome>> {
    if plan.undecided() {
        return Err(Error::UndoUndecided {
            pending: plan
                .disks
                .iter()
                .filter_map(|d| d.undo.as_ref().map(|u| u.path.clone()))
                .collect(),
        });
    }
    let made_dir = if s.to.exists() {
        None
    } else {
        std::fs::create_dir_all(&s.to).map_err(|source| Error::Create {
            path: s.to.clone(),
            source,
        })?;
        Some(s.to.clone())
    };
    let mut cleanup = Cleanup::new(made_dir);
    // The reports and TOML are small; 1 MiB covers them.
    check_room(&s.to, plan.need_bytes + (1 << 20))?;

    let mut outcomes = Vec::new();
    for d in &plan.disks {
        if obs.interrupted() {
            return Err(Error::Interrupted);
        }
        let out = s.to.join(&d.output);
        cleanup.add(&out);
        obs.converting(d, &out);
        let c = convert(d, &out, s.physical_sector_size, obs)?;
        obs.converted(d, &out, &c);
        outcomes.push(Outcome {
            output: d.output.clone(),
            virtual_size: c.virtual_size,
            bytes_written: c.bytes_written,
            geometry: c.geometry,
            note: c.note,
        });
    }
    let r = report::build(plan, &outcomes, true);
    write_new(
        &s.to.join(&plan.toml),
        report::vm_toml(plan).as_bytes(),
        &mut cleanup,
    )?;
    write_new(
        &s.to.join("report.json"),
        (serde_json::to_string_pretty(&r)? + "\n").as_bytes(),
        &mut cleanup,
    )?;
    write_new(
        &s.to.join("report.md"),
        report::markdown(&r).as_bytes(),
        &mut cleanup,
    )?;
    cleanup.disarm();
    Ok(outcomes)
}

/// Writes a new file (refusing an existing one), registered for cleanup first.
fn write_new(path: &Path, bytes: &[u8], cleanup: &mut Cleanup) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| Error::Create {
            path: path.to_path_buf(),
            source,
        })?;
    cleanup.add(path);
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|source| Error::Write {
            path: path.to_path_buf(),
            source,
        })
}

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
    let st = nix::sys::statvfs::statvfs(&probe).map_err(|source| Error::FreeSpace {
        path: probe.clone(),
        source,
    })?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Fails unless `dir` has room for `need` bytes.
fn check_room(dir: &Path, need: u64) -> Result<()> {
    let avail = free_space(dir)?;
    if avail < need {
        return Err(Error::NoRoom {
            dir: dir.to_path_buf(),
            need,
            avail,
        });
    }
    Ok(())
}

/// Removes every file (and the target directory, if this run made it) unless disarmed.
struct Cleanup {
    files: Vec<PathBuf>,
    made_dir: Option<PathBuf>,
    armed: bool,
}

impl Cleanup {
    fn new(made_dir: Option<PathBuf>) -> Self {
        Cleanup {
            files: Vec::new(),
            made_dir,
            armed: true,
        }
    }
    fn add(&mut self, p: &Path) {
        self.files.push(p.to_path_buf());
    }
    fn disarm(mut self) {
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
fn convert(
    disk: &DiskPlan,
    out: &Path,
    physical_sector_size: u32,
    obs: &mut dyn Observer,
) -> Result<Converted> {
    let view = disk.view.clone().ok_or(Error::NoView)?;
    let size = disk.guest_size;
    let (target, note) = create_target(disk, out, size, physical_sector_size)?;
    if target.size() != size {
        return Err(Error::WrongSize {
            path: out.to_path_buf(),
            size: target.size(),
            guest_size: size,
        });
    }
    let written = copy(view.as_ref(), target.as_ref(), obs).map_err(|source| Error::Convert {
        source_disk: disk.source.clone(),
        path: out.to_path_buf(),
        source: Box::new(source),
    })?;
    target.close().map_err(|source| Error::Finish {
        path: out.to_path_buf(),
        source,
    })?;
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
        chain::create(out, spec).map_err(|source| Error::CreateImage {
            path: out.to_path_buf(),
            source,
        })
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
                std::fs::remove_file(out).map_err(|source| Error::RemoveRetry {
                    path: out.to_path_buf(),
                    source,
                })?;
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
/// Returns the bytes written; fails when interrupted.
fn copy(src: &dyn BlockDevice, dst: &dyn BlockDevice, obs: &mut dyn Observer) -> disk::Result<u64> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut written = 0u64;
    disk::map::for_each_extent(src, |e| {
        if obs.interrupted() {
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
                obs.copied(n);
            }
        } else {
            obs.copied(e.length);
        }
        Ok(())
    })?;
    if obs.interrupted() {
        return Err(disk::Error::InvalidArgument("interrupted".into()));
    }
    dst.flush()?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_removes_partial_outputs() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("made");
        std::fs::create_dir(&dir).unwrap();
        let f = dir.join("partial.vhdx");
        std::fs::write(&f, b"x").unwrap();
        let mut c = Cleanup::new(Some(dir.clone()));
        c.add(&f);
        drop(c);
        assert!(!f.exists() && !dir.exists());
        assert!(check_room(t.path(), u64::MAX)
            .unwrap_err()
            .to_string()
            .contains("not enough room"));
        assert!(free_space(&t.path().join("not/yet")).unwrap() > 0);
    }
}

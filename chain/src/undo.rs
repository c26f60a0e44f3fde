//! Undo mode: run a disk with every write going to a throwaway child, then commit or discard.
//!
//! For VHD and VHDX images the child is a real differencing image of the same format (like
//! Virtual PC's `.vud` undo disks), in a file the caller names or a temporary file beside the
//! image. For raw images, which have no differencing format, the child is a copy-on-write
//! overlay in a scratch file. Either way the parent is opened read-only for the whole session,
//! so a crash or a kill in the middle never changes it: committing is a separate step that
//! copies the child's ranges into the parent and only then removes the child.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use disk::overlay::CowOverlay;
use disk::{BlockDevice, Disk, Error, FileStorage, Result};

use crate::{create, open, CreateSpec, Format, OpenOptions};

/// A disk in undo mode.
#[derive(Debug)]
pub struct UndoDisk {
    disk: Disk,
    parent_path: PathBuf,
    /// The differencing child (VHD/VHDX) or the overlay's scratch file (raw).
    child_path: PathBuf,
    overlay: bool,
}

/// Where a temporary child goes: beside the parent when that directory is writable (same file
/// system, relative locator works), else in the system temp directory.
fn temp_child_path(parent: &Path, ext: &str) -> PathBuf {
    let name = parent
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    let file = format!(
        ".{name}.undo-{}-{}.{ext}",
        std::process::id(),
        unique_suffix()
    );
    let dir = parent
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let probe = dir.join(format!(".viridian-probe-{}", std::process::id()));
    if std::fs::File::create(&probe).is_ok() {
        let _ = std::fs::remove_file(&probe);
        dir.join(file)
    } else {
        std::env::temp_dir().join(file)
    }
}

fn unique_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ N.fetch_add(1, Ordering::Relaxed)
}

impl UndoDisk {
    /// Opens `path` (and its chain) read-only and puts a fresh writable child on top.
    /// `child` names the child file (it must not exist); None makes a temporary one.
    pub fn open(path: &Path, opts: &OpenOptions, child: Option<&Path>) -> Result<UndoDisk> {
        let mut ro = opts.clone();
        ro.read_only = true;
        let format = match opts.format {
            Some(f) => f,
            None => crate::probe_path(path)?,
        };
        match format {
            Format::Raw => {
                let base = open(path, &ro)?;
                let scratch_path = child
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| temp_child_path(path, "undo"));
                let scratch = Arc::new(FileStorage::create(&scratch_path)?);
                let ov = CowOverlay::new(base.image().clone(), scratch);
                Ok(UndoDisk {
                    disk: Disk::new(Arc::new(ov)),
                    parent_path: path.to_path_buf(),
                    child_path: scratch_path,
                    overlay: true,
                })
            }
            Format::Vhd | Format::Vhdx => {
                let child_path = child
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| temp_child_path(path, format.name()));
                let mut spec = CreateSpec::new(format, 0);
                spec.parent = Some(path.to_path_buf());
                spec.vhd_size_rule = opts.vhd_size_rule;
                let created = create(&child_path, &spec)?;
                created.close()?;
                drop(created);
                let mut rw = opts.clone();
                rw.read_only = false;
                rw.format = Some(format);
                rw.parent_override = Some(path.to_path_buf());
                let disk = match open(&child_path, &rw) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = std::fs::remove_file(&child_path);
                        return Err(e);
                    }
                };
                Ok(UndoDisk {
                    disk,
                    parent_path: path.to_path_buf(),
                    child_path,
                    overlay: false,
                })
            }
        }
    }

    /// The disk to use: reads see parent + changes, writes go to the child.
    pub fn disk(&self) -> Disk {
        self.disk.clone()
    }

    pub fn child_path(&self) -> &Path {
        &self.child_path
    }

    pub fn parent_path(&self) -> &Path {
        &self.parent_path
    }

    /// Throws the changes away; the parent was never written.
    pub fn discard(self) -> Result<()> {
        let UndoDisk {
            disk, child_path, ..
        } = self;
        drop(disk);
        std::fs::remove_file(&child_path)
            .map_err(|e| Error::io(format!("cannot remove {}", child_path.display()), e))
    }

    /// Copies the changes into the parent, makes them durable, then removes the child.
    /// Returns the number of bytes merged. `progress` gets byte counts as they are done.
    pub fn commit(self, progress: &mut dyn FnMut(u64)) -> Result<u64> {
        let UndoDisk {
            disk,
            parent_path,
            child_path,
            overlay,
        } = self;
        disk.flush()?;
        if disk.handle_count() > 1 {
            return Err(Error::InvalidArgument(
                "the undo disk is still in use; close every user before committing".into(),
            ));
        }
        let merged = if overlay {
            let ov = disk
                .as_any()
                .downcast_ref::<CowOverlay>()
                .ok_or_else(|| Error::InvalidArgument("undo overlay lost its type".into()))?;
            let ranges = ov.written_ranges();
            let scratch = ov.scratch().clone();
            // Release the overlay (and its read-only hold on the parent) before writing it.
            drop(disk);
            let parent = open(&parent_path, &OpenOptions::read_write())?;
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0;
            for (start, len) in ranges {
                let mut off = 0;
                while off < len {
                    let n = (len - off).min(buf.len() as u64) as usize;
                    scratch
                        .read_at(&mut buf[..n], start + off)
                        .map_err(|e| Error::io("cannot read the undo scratch file", e))?;
                    parent.write_at(&buf[..n], start + off)?;
                    off += n as u64;
                    progress(n as u64);
                }
                total += len;
            }
            parent.close()?;
            total
        } else {
            // Read the child alone so the parent is not open twice.
            drop(disk);
            let parent = open(&parent_path, &OpenOptions::read_write())?;
            let mut alone = OpenOptions::read_only();
            alone.no_parent = true;
            let child = open(&child_path, &alone)?;
            let merged =
                crate::merge(&child, 1, &parent, progress).and_then(|n| parent.close().map(|()| n));
            drop(child);
            drop(parent);
            match merged {
                Ok(n) => n,
                Err(e) => {
                    // Keep the child usable: writing may have changed the parent's identity,
                    // while the child's view is unchanged (only its own ranges were copied).
                    let _ = crate::relink(&child_path, &parent_path);
                    return Err(e);
                }
            }
        };
        std::fs::remove_file(&child_path)
            .map_err(|e| Error::io(format!("cannot remove {}", child_path.display()), e))?;
        Ok(merged)
    }
}

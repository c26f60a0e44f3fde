//! Undo mode: run a disk with every write going to a throwaway child, then commit or discard.
//!
//! For VHD and VHDX images the child is a real differencing image of the same format (like
//! Virtual PC's `.vud` undo disks), in a file the caller names or a temporary file beside the
//! image. For raw images, which have no differencing format, the child is a copy-on-write
//! overlay in a "raw undo file" (see `disk::overlay`) that records durably which ranges were
//! written. Either way the parent is opened read-only for the whole session, so a crash or a
//! kill in the middle never changes it, and the undo file (made durable, directory entry
//! included, before the session starts) can afterwards be committed or discarded with
//! `viridian undo`. Committing is a separate step that copies the child's ranges into the
//! parent (crash-safe, see `commit.rs`) and only then removes the child.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use disk::overlay::{CowOverlay, OverlayHeader};
use disk::{Access, Disk, Error, FileStorage, Result, Storage};

use crate::{create, open, CreateSpec, Format, OpenOptions};

/// Makes a new directory entry durable (so the undo file is still there after a crash).
fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("cannot make {} durable", dir.display()), e))
}

/// The marker that says a commit of the undo file `undo` has started writing its base. While
/// it exists the base may hold part of the session, so a discard cannot restore the base and
/// is refused: the commit has to be run again to finish.
pub fn commit_marker(undo: &Path) -> PathBuf {
    let mut name = undo.file_name().unwrap_or_default().to_os_string();
    name.push(".committing");
    undo.with_file_name(name)
}

/// Whether a commit of `undo` was interrupted (see [`commit_marker`]).
pub fn commit_interrupted(undo: &Path) -> bool {
    commit_marker(undo).exists()
}

/// Puts the marker down, durably, before the base is first written.
fn begin_commit(undo: &Path) -> Result<()> {
    let m = commit_marker(undo);
    std::fs::File::create(&m)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(format!("cannot create {}", m.display()), e))?;
    sync_parent_dir(&m)
}

/// After a complete commit: removes the undo file, then the marker (a kill between the two
/// leaves a marker whose commit simply runs again).
pub fn finish_commit(undo: &Path) -> Result<()> {
    std::fs::remove_file(undo)
        .map_err(|e| Error::io(format!("cannot remove {}", undo.display()), e))?;
    let m = commit_marker(undo);
    match std::fs::remove_file(&m) {
        Ok(()) => sync_parent_dir(&m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("cannot remove {}", m.display()), e)),
    }
}

/// Whether `path` is a raw undo file; if so, the base it belongs to.
pub fn raw_undo_base(path: &Path) -> Result<Option<PathBuf>> {
    let s = FileStorage::open(path, Access::ReadOnly, false)?;
    Ok(OverlayHeader::read(&s)?.map(|h| label_path(&h.label)))
}

/// The label of a raw undo file: the base's absolute path, then a NUL and the base's stamp
/// (older files hold the path alone).
fn label_path(label: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let path = label.split(|&b| b == 0).next().unwrap_or_default();
    PathBuf::from(std::ffi::OsStr::from_bytes(path))
}

/// What a raw base file looked like when an undo session started on it: the session never
/// writes its base, so a different stamp at commit time means someone else wrote the base
/// since, and committing the session's older changes over it would undo theirs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BaseStamp {
    inode: u64,
    size: u64,
    modified_ns: i128,
}

impl BaseStamp {
    fn of(path: &Path) -> Result<BaseStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)
            .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?;
        Ok(BaseStamp {
            inode: m.ino(),
            size: m.size(),
            modified_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        })
    }

    fn encode(&self) -> String {
        format!(
            "inode={},size={},modified-ns={}",
            self.inode, self.size, self.modified_ns
        )
    }

    fn from_label(label: &[u8]) -> Option<BaseStamp> {
        let tail = std::str::from_utf8(label.splitn(2, |&b| b == 0).nth(1)?).ok()?;
        let mut stamp = BaseStamp {
            inode: 0,
            size: 0,
            modified_ns: 0,
        };
        for field in tail.split(',') {
            let (k, v) = field.split_once('=')?;
            match k {
                "inode" => stamp.inode = v.parse().ok()?,
                "size" => stamp.size = v.parse().ok()?,
                "modified-ns" => stamp.modified_ns = v.parse().ok()?,
                _ => {}
            }
        }
        Some(stamp)
    }
}

fn raw_undo_label(base: &Path) -> Result<Vec<u8>> {
    let abs = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
    let mut label = abs.as_os_str().as_encoded_bytes().to_vec();
    // Block devices have no meaningful modification time: only the path is kept.
    if std::fs::metadata(base).is_ok_and(|m| m.is_file()) {
        label.push(0);
        label.extend_from_slice(BaseStamp::of(base)?.encode().as_bytes());
    }
    Ok(label)
}

/// Opens a raw undo file over its base (read-only): the view of the interrupted session.
pub fn open_raw_undo(path: &Path) -> Result<(PathBuf, CowOverlay)> {
    let scratch: Arc<dyn Storage> = Arc::new(FileStorage::open(path, Access::ReadOnly, true)?);
    let header = OverlayHeader::read(&*scratch)?.ok_or_else(|| Error::WrongFormat {
        format: "raw undo",
        detail: format!("{} is not a raw undo file", path.display()),
    })?;
    let base_path = label_path(&header.label);
    let base = open(&base_path, &OpenOptions::read_only())?;
    Ok((base_path, CowOverlay::open(base.image().clone(), scratch)?))
}

/// Copies what the raw undo file `path` holds into its base and makes the base durable; the
/// caller removes the undo file afterwards. A kill half-way leaves the undo file complete, so
/// the commit can simply run again. Returns (base path, bytes copied).
///
/// The base is written as a probed raw image, with the guard that refuses writes that would
/// make it probe as VHD or VHDX (a guest of a raw disk must not turn it into another format
/// through its undo session either), unless `explicit_raw` says the session was started with an
/// explicit raw format.
///
/// A base written by someone else since the session started (its stamp differs) is refused
/// unless `base_changed_ok`, because the session's older changes would overwrite the newer
/// data; after an interrupted commit the base is expected to differ and is not checked.
pub fn commit_raw_undo(
    path: &Path,
    explicit_raw: bool,
    base_changed_ok: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<(PathBuf, u64)> {
    let scratch: Arc<dyn Storage> = Arc::new(FileStorage::open(path, Access::ReadOnly, true)?);
    let header = OverlayHeader::read(&*scratch)?.ok_or_else(|| Error::WrongFormat {
        format: "raw undo",
        detail: format!("{} is not a raw undo file", path.display()),
    })?;
    let base_path = label_path(&header.label);
    if let Some(then) = BaseStamp::from_label(&header.label) {
        let now = BaseStamp::of(&base_path)?;
        if now != then && !commit_interrupted(path) && !base_changed_ok {
            return Err(Error::InvalidArgument(format!(
                "{} changed after the undo session {} started (it was replaced or written \
                 since); committing would overwrite the newer data with the session's older \
                 changes (commit with --force to do it anyway)",
                base_path.display(),
                path.display()
            )));
        }
    }
    let mut rw = OpenOptions::read_write();
    if explicit_raw {
        rw.format = Some(Format::Raw);
    } else if crate::probe_path(&base_path)? != Format::Raw {
        return Err(Error::InvalidArgument(format!(
            "{} no longer probes as a raw image; not committing {} into it",
            base_path.display(),
            path.display()
        )));
    }
    let base = open(&base_path, &rw)?;
    let ov = CowOverlay::open(base.image().clone(), scratch)?;
    begin_commit(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    for (start, len) in ov.written_ranges() {
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            ov.read_written(&mut buf[..n], start + off)?;
            base.write_at(&buf[..n], start + off)?;
            off += n as u64;
            progress(n as u64);
        }
        total += len;
    }
    drop(ov);
    base.close()?;
    Ok((base_path, total))
}

/// Merges the differencing undo child `child` into `parent` (crash-safe, see `commit.rs`);
/// the caller removes the child afterwards. Returns the bytes merged.
///
/// A VHD parent has no identity that changes when it is written (VHDX has its DataWriteGuid),
/// so a VHD child's recorded Parent Time Stamp (the parent file's modification time when the
/// child was made) stands in: a parent modified after it was written by someone else, and the
/// child's older changes would overwrite the newer data. That is refused unless
/// `base_changed_ok`; after an interrupted commit the parent is expected to have changed.
pub fn commit_child(
    child: &Path,
    parent: &Path,
    base_changed_ok: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    if !base_changed_ok && !commit_interrupted(child) {
        refuse_vhd_parent_written_since(child, parent)?;
    }
    let open_child = || {
        let mut alone = OpenOptions::read_only();
        alone.no_parent = true;
        open(child, &alone)
    };
    // The marker goes down only once the parent is open for writing: a parent that cannot be
    // opened (locked by someone else) fails the commit with nothing changed, and the undo file
    // can still be discarded.
    crate::commit::commit_into_base_then(
        &open_child,
        1,
        parent,
        child,
        &OpenOptions::read_write(),
        &mut || begin_commit(child),
        &mut |n| {
            progress(n);
            Ok(())
        },
    )
}

fn refuse_vhd_parent_written_since(child: &Path, parent: &Path) -> Result<()> {
    let mut alone = OpenOptions::read_only();
    alone.no_parent = true;
    let crate::Image::Vhd(v) = crate::open_image(child, &alone)? else {
        return Ok(());
    };
    let Some(recorded) = v.info_with(false).parent_timestamp.filter(|&t| t != 0) else {
        return Ok(());
    };
    const VHD_EPOCH: u64 = 946_684_800;
    let modified = std::fs::metadata(parent)
        .and_then(|m| m.modified())
        .map_err(|e| Error::io(format!("cannot stat {}", parent.display()), e))?
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().saturating_sub(VHD_EPOCH))
        .unwrap_or(0);
    if modified > u64::from(recorded) {
        return Err(Error::InvalidArgument(format!(
            "{} changed after the undo disk {} was made (it was written since); committing \
             would overwrite the newer data with the undo disk's older changes (commit with \
             --force to do it anyway)",
            parent.display(),
            child.display()
        )));
    }
    Ok(())
}

/// A disk in undo mode.
#[derive(Debug)]
pub struct UndoDisk {
    disk: Disk,
    parent_path: PathBuf,
    /// The differencing child (VHD/VHDX) or the overlay's scratch file (raw).
    child_path: PathBuf,
    overlay: bool,
    /// The session was opened with an explicit raw format (no probe guard on commit).
    explicit_raw: bool,
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
                let label = raw_undo_label(path)?;
                let scratch = Arc::new(FileStorage::create(&scratch_path)?);
                let ov = CowOverlay::create(base.image().clone(), scratch, &label)
                    .and_then(|ov| sync_parent_dir(&scratch_path).map(|()| ov));
                let ov = match ov {
                    Ok(ov) => ov,
                    Err(e) => {
                        let _ = std::fs::remove_file(&scratch_path);
                        return Err(e);
                    }
                };
                Ok(UndoDisk {
                    disk: Disk::new(Arc::new(ov)),
                    parent_path: path.to_path_buf(),
                    child_path: scratch_path,
                    overlay: true,
                    explicit_raw: opts.format == Some(Format::Raw),
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
                let made = created.close().and_then(|()| sync_parent_dir(&child_path));
                drop(created);
                if let Err(e) = made {
                    let _ = std::fs::remove_file(&child_path);
                    return Err(e);
                }
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
                    explicit_raw: false,
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
    /// Every user of [`disk`](Self::disk) must have dropped its handle.
    pub fn commit(self, progress: &mut dyn FnMut(u64)) -> Result<u64> {
        let UndoDisk {
            disk,
            parent_path,
            child_path,
            overlay,
            explicit_raw,
        } = self;
        if disk.handle_count() > 1 {
            let _ = disk.flush();
            return Err(Error::InvalidArgument(format!(
                "the undo disk is still in use; close every user before committing (the \
                 changes stay in {})",
                child_path.display()
            )));
        }
        // Release the session (and its read-only hold on the parent) before writing it.
        disk.close()?;
        drop(disk);
        let merged = if overlay {
            commit_raw_undo(&child_path, explicit_raw, false, progress)?.1
        } else {
            commit_child(&child_path, &parent_path, false, progress)?
        };
        finish_commit(&child_path)?;
        Ok(merged)
    }

    /// Ends the session keeping the undo file for a later `viridian undo commit|discard`.
    /// Returns its path.
    pub fn keep(self) -> Result<PathBuf> {
        let UndoDisk {
            disk, child_path, ..
        } = self;
        let flushed = disk.close();
        drop(disk);
        flushed.map(|()| child_path)
    }
}

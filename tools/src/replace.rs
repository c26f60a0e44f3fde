//! Writing a new file that replaces a name, the way the verbs that build an output beside its
//! final name (`dd`, `amend`) need it: the new file is written under a hidden temporary name
//! in the same folder and renamed over the final name only when it is complete and durable.
//!
//! A rename replaces a directory entry, so before the first byte is written [`Replacement::plan`]
//! makes sure that entry is the one the user means and may replace:
//! * a symbolic link is followed: the file it points to is replaced, the link stays;
//! * a name that is not a regular file (a device node, a FIFO, a folder) is refused: replacing
//!   `/dev/full` with a regular file is never what was meant;
//! * a file with several hard links is refused: the other names would keep the old file;
//! * a file the caller may not write is refused, as writing it in place would be;
//! * a file that is also an input is refused: the copy would read what it replaces.
//!
//! The new file gets the old one's owner and mode.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Where a new file goes and what it replaces.
pub struct Replacement {
    /// The replaced file held open with a writer's lock until the rename, when asked for, so
    /// no process can open it meanwhile.
    _held: Option<disk::FileStorage>,
    /// The name the rename replaces (symbolic links resolved).
    pub target: PathBuf,
    /// The temporary name the new file is written under, in the target's folder.
    pub temp: PathBuf,
    /// The replaced file's attributes, when it exists.
    pub old: Option<std::fs::Metadata>,
}

impl Replacement {
    /// Plans replacing `output` (as named by the user) by a file written first under
    /// `.NAME.<tag>-PID`. `inputs` are the files the new content is read from.
    pub fn plan(output: &Path, tag: &str, inputs: &[&Path]) -> Result<Replacement> {
        Self::plan_locked(output, tag, inputs, true)
    }

    /// Like [`Replacement::plan`]. The existing file must not be open in any other process
    /// (viridian's or QEMU's locks: a writer's acknowledged writes would go to the replaced
    /// file and be lost, a reader would go on reading the old one). With `hold` the lock is kept
    /// until the rename; without it (the caller reads the file itself and holds its own lock
    /// from now on) it is only tested.
    pub fn plan_locked(
        output: &Path,
        tag: &str,
        inputs: &[&Path],
        hold: bool,
    ) -> Result<Replacement> {
        let shown = output.display();
        let (target, old) = match std::fs::metadata(output) {
            Ok(m) => {
                let real = std::fs::canonicalize(output)
                    .with_context(|| format!("cannot resolve {shown}"))?;
                (real, Some(m))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if std::fs::symlink_metadata(output).is_ok() {
                    bail!("{shown} is a symbolic link to nothing; name the file itself");
                }
                (output.to_path_buf(), None)
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {shown}")),
        };
        if let Some(m) = &old {
            if !m.file_type().is_file() {
                bail!(
                    "{shown} exists and is not a regular file (a device, FIFO or folder); \
                     not replacing it"
                );
            }
            if m.nlink() > 1 {
                bail!(
                    "{shown} has {} hard links: replacing it would leave the other names on \
                     the old file",
                    m.nlink()
                );
            }
            // The same permission check writing it in place would meet.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&target)
                .with_context(|| format!("cannot write {shown}"))?;
            for input in inputs {
                if let Ok(i) = std::fs::metadata(input) {
                    if (i.dev(), i.ino()) == (m.dev(), m.ino()) {
                        bail!(
                            "{shown} is also the input {}: refusing to overwrite what is read",
                            input.display()
                        );
                    }
                }
            }
        }
        let held = match &old {
            Some(_) => {
                let lock = disk::FileStorage::open(&target, disk::Access::ReadWrite, true)
                    .map_err(|e| match e {
                        disk::Error::Locked { .. } => anyhow::anyhow!(
                            "{shown} is in use by another process (locked); not replacing it"
                        ),
                        e => anyhow::Error::new(e).context(format!("cannot lock {shown}")),
                    })?;
                hold.then_some(lock)
            }
            None => None,
        };
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .with_context(|| format!("{shown}: not a file name"))?;
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        remove_stale(&dir, &format!(".{name}.{tag}-"));
        let temp = dir.join(format!(".{name}.{tag}-{}", std::process::id()));
        Ok(Replacement {
            _held: held,
            target,
            temp,
            old,
        })
    }

    /// The folder both names are in.
    pub fn dir(&self) -> PathBuf {
        match self.target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// Gives the finished temporary file the old file's owner and mode, makes it durable and
    /// renames it over the target, then makes the folder durable.
    pub fn commit(&self) -> Result<()> {
        self.commit_with(true)
    }

    /// [`Replacement::commit`], with the flushes only when `sync` (`-t unsafe` skips them). A
    /// target that did not exist when planned is never overwritten: if one appeared meanwhile,
    /// the rename fails and the new file stays under its temporary name for the caller to remove.
    pub fn commit_with(&self, sync: bool) -> Result<()> {
        if let Some(m) = &self.old {
            std::os::unix::fs::chown(&self.temp, Some(m.uid()), Some(m.gid()))
                .with_context(|| format!("cannot give {} its owner", self.temp.display()))?;
            std::fs::set_permissions(&self.temp, m.permissions())
                .with_context(|| format!("cannot give {} its mode", self.temp.display()))?;
        }
        if sync {
            std::fs::File::open(&self.temp)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("cannot flush {}", self.temp.display()))?;
        }
        if self.old.is_some() {
            std::fs::rename(&self.temp, &self.target)
        } else {
            rename_no_replace(&self.temp, &self.target)
        }
        .with_context(|| format!("cannot replace {}", self.target.display()))?;
        if !sync {
            return Ok(());
        }
        std::fs::File::open(self.dir())
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot flush the folder of {}", self.target.display()))
    }
}

/// Renames `from` to `to` unless `to` exists (Linux `renameat2` with `RENAME_NOREPLACE`).
fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call; AT_FDCWD
    // makes them relative to the working folder, as std::fs::rename does.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Removes temporary files with `prefix` and a process id that no longer runs: what a killed
/// run left behind. A live run's file is left alone.
pub fn remove_stale(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() && std::fs::remove_file(e.path()).is_ok() {
            eprintln!(
                "viridian: removed {}, left by a run that did not finish",
                e.path().display()
            );
        }
    }
}

//! The link of a differencing disk to its parent: attaching the parent, where to look for it
//! (locators and parent name), and re-linking (`set_parent`).

use std::path::Path;
use std::sync::Arc;

use disk::{BlockDevice, Error, LocatorKind, LocatorPath, ParentLink, Result};

use crate::dynamic_header::LOCATOR_SLOTS;
use crate::footer::VHD_EPOCH;
use crate::io::{flush_storage, io_err, write_all};
use crate::locator::{
    utf16le, LocatorEntry, PLAT_MACX, PLAT_W2KU, PLAT_W2RU, PLAT_WI2K, PLAT_WI2R,
};
use crate::open::read_locators;
use crate::{DiskType, VhdDisk};

impl VhdDisk {
    /// Attaches the parent of a differencing disk (its size must equal ours).
    pub fn attach_parent(&mut self, parent: Arc<dyn BlockDevice>) -> Result<()> {
        if self.kind != DiskType::Differencing {
            return Err(Error::InvalidArgument(
                "only a differencing VHD has a parent".into(),
            ));
        }
        if parent.size() != self.size() {
            return Err(Error::ParentMismatch {
                child: self.path.clone().unwrap_or_default(),
                parent: parent.path().map(Path::to_path_buf).unwrap_or_default(),
                detail: format!(
                    "parent size {} differs from the child's size {}",
                    parent.size(),
                    self.size()
                ),
            });
        }
        self.parent = Some(parent);
        Ok(())
    }

    /// The raw UTF-16 code units of the parent name (unpaired surrogates kept).
    pub fn parent_name_raw(&self) -> Option<Vec<u16>> {
        let m = self.m();
        m.header
            .as_ref()
            .filter(|_| self.kind == DiskType::Differencing)
            .map(|h| h.parent_name.clone())
    }

    /// [`BlockDevice::parent_link`]: the header's parent name and unique id, and every locator
    /// that decodes to a path, as recorded, in slot order (`chain` decides where to look).
    pub(crate) fn link(&self) -> Option<ParentLink> {
        if self.kind != DiskType::Differencing {
            return None;
        }
        let m = self.m();
        let h = m.header.as_ref()?;
        let locators = m
            .locators
            .iter()
            .filter_map(|l| {
                let kind = match l.platform_code {
                    PLAT_W2RU | PLAT_WI2R => LocatorKind::Relative,
                    PLAT_W2KU | PLAT_WI2K | PLAT_MACX => LocatorKind::Absolute,
                    _ => return None,
                };
                Some(LocatorPath {
                    kind,
                    path: l.path.clone()?,
                })
            })
            .collect();
        Some(ParentLink {
            name: h.parent_name_lossy(),
            locators,
            expected_id: h.parent_unique_id,
            also_accepted: None,
            format: "vhd",
        })
    }

    /// Re-links a differencing disk to a new parent (`rebase -u`): parent unique id, time
    /// stamp, name and W2ku/W2ru locators.
    ///
    /// Crash order: the new locator payloads go to fresh space appended at the end (the old
    /// payloads stay intact), flush; then the 1024-byte header, flush. A crash before the
    /// header write leaves the complete old link. The header spans two sectors, so a torn
    /// header write can mix old and new halves (the checksum then fails, which we tolerate with
    /// a warning): the unique id and the locators then name different parents, and opening the
    /// chain fails with a parent mismatch instead of reading wrong data; `set_parent` again
    /// repairs it. The old locator space is left unused (a few KiB per rebase).
    pub fn set_parent(&self, parent_path: &Path, parent: &dyn BlockDevice) -> Result<()> {
        self.set_parent_with(parent_path, &disk::ParentWindowsPaths::default(), parent)
    }

    /// [`VhdDisk::set_parent`], also recording the parent's Windows path when it is known.
    pub fn set_parent_with(
        &self,
        parent_path: &Path,
        windows: &disk::ParentWindowsPaths,
        parent: &dyn BlockDevice,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.kind != DiskType::Differencing {
            return Err(Error::InvalidArgument(
                "set_parent needs a differencing VHD".into(),
            ));
        }
        if parent.size() != self.size() {
            return Err(Error::InvalidArgument(format!(
                "new parent size {} differs from the child's size {}",
                parent.size(),
                self.size()
            )));
        }
        let id = parent.unique_id().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} has no unique id (not a VHD?)",
                parent_path.display()
            ))
        })?;
        let _g = self.wl();
        self.usable()?;
        let link = ParentPaths::new(parent_path, self.path.as_deref(), windows)?;
        let (mut h, hoff) = {
            let m = self.m();
            let h = m
                .header
                .clone()
                .ok_or_else(|| Error::corrupt("VHD dynamic header", 0, "missing"))?;
            (h, m.header_offset)
        };
        let mut new_locs: [LocatorEntry; LOCATOR_SLOTS] = Default::default();
        for (slot, (code, data)) in link.payloads().iter().enumerate() {
            let space = (data.len() as u64).div_ceil(4096).max(1) * 4096;
            let off = self.append_space(space)?;
            write_all(&*self.storage, data, off, "VHD parent locator data")?;
            new_locs[slot] = LocatorEntry {
                code: *code,
                data_space: space as u32,
                data_len: data.len() as u32,
                reserved: 0,
                data_offset: off,
            };
        }
        flush_storage(&*self.storage)?;
        h.parent_unique_id = id;
        h.parent_timestamp = parent_timestamp(parent);
        h.parent_name = link.name_units();
        h.locators = new_locs;
        self.write_header(&h, hoff)?;
        let len = self
            .storage
            .len()
            .map_err(|e| io_err("reading VHD file length", e))?;
        let locators = read_locators(&*self.storage, &h, hoff, len)?;
        let mut m = self.mw();
        m.header = Some(h);
        m.locators = locators;
        Ok(())
    }
}

/// The "Parent Time Stamp" a child records: the parent file's modification time, in seconds
/// since 2000-01-01 UTC (0 when it is unknown). Nothing verifies it when a chain is opened
/// (the Unique ID is the identity), so it is informational.
pub(crate) fn parent_timestamp(parent: &dyn BlockDevice) -> u32 {
    parent
        .path()
        .and_then(|p| std::fs::metadata(p).ok())
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| {
            d.as_secs()
                .saturating_sub(VHD_EPOCH)
                .min(u64::from(u32::MAX)) as u32
        })
        .unwrap_or(0)
}

/// The paths a child records for its parent. The relative path (W2ru) is always written; the
/// Windows absolute path (W2ku, and the header's parent name) only when the caller knows it:
/// a POSIX path there means nothing to Windows, and libvhdi takes the name after its last
/// backslash, so the header then carries the parent's bare file name.
pub(crate) struct ParentPaths {
    windows_absolute: Option<String>,
    relative: String,
    file_name: String,
}

impl ParentPaths {
    pub(crate) fn new(
        parent: &Path,
        child: Option<&Path>,
        windows: &disk::ParentWindowsPaths,
    ) -> Result<Self> {
        let abs = std::path::absolute(parent)
            .map_err(|e| io_err(format!("resolving {}", parent.display()), e))?;
        let file = abs
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("{} has no file name", parent.display()))
            })?;
        let relative = match child.and_then(|c| std::path::absolute(c).ok()) {
            Some(c) => disk::windows_relative_path(c.parent().unwrap_or(Path::new("/")), &abs),
            None => format!(".\\{file}"),
        };
        Ok(ParentPaths {
            windows_absolute: windows.absolute.clone().filter(|w| !w.is_empty()),
            relative,
            file_name: file,
        })
    }

    /// Locator payloads, relative first (what every reader here tries first).
    pub(crate) fn payloads(&self) -> Vec<(u32, Vec<u8>)> {
        let mut v = vec![(PLAT_W2RU, utf16le(&self.relative))];
        if let Some(w) = &self.windows_absolute {
            v.push((PLAT_W2KU, utf16le(w)));
        }
        v
    }

    /// UTF-16 units of the header's parent name: the Windows absolute path when known (and it
    /// fits), else the file name.
    pub(crate) fn name_units(&self) -> Vec<u16> {
        if let Some(w) = &self.windows_absolute {
            let u: Vec<u16> = w.encode_utf16().collect();
            if u.len() <= 255 {
                return u;
            }
        }
        self.file_name.encode_utf16().take(255).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_name_is_the_windows_path_when_known_else_the_file_name() {
        let none = disk::ParentWindowsPaths::default();
        let p =
            ParentPaths::new(Path::new("/x/base.vhd"), Some(Path::new("/x/c.vhd")), &none).unwrap();
        assert_eq!(String::from_utf16(&p.name_units()).unwrap(), "base.vhd");
        assert_eq!(p.payloads().len(), 1);
        let win = disk::ParentWindowsPaths {
            absolute: Some("C:\\vms\\base.vhd".into()),
            ..Default::default()
        };
        let p = ParentPaths::new(Path::new("/x/base.vhd"), None, &win).unwrap();
        assert_eq!(
            String::from_utf16(&p.name_units()).unwrap(),
            "C:\\vms\\base.vhd"
        );
        assert_eq!(p.payloads()[1].0, PLAT_W2KU);
    }
}

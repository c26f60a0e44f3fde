//! Differencing images and their parent: attaching it, finding it (the locator's paths and the
//! identity check), and re-parenting.

use super::*;

impl VhdxDisk {
    /// [`BlockDevice::parent_link`]: the locator's paths as recorded (relative, absolute,
    /// volume: the key order of the specification, since the item is a key/value table) and
    /// the identity the parent must have (`chain` decides where to look).
    pub(crate) fn parent_link_of(&self) -> Option<ParentLink> {
        let meta = rlock(&self.meta);
        if !meta.has_parent {
            return None;
        }
        let loc = meta.parent_locator.as_ref()?;
        let locators = [
            ("relative_path", LocatorKind::Relative),
            ("absolute_win32_path", LocatorKind::Absolute),
            ("volume_path", LocatorKind::Absolute),
        ]
        .into_iter()
        .filter_map(|(key, kind)| {
            Some(LocatorPath {
                kind,
                path: loc.get(key)?.to_string(),
            })
        })
        .collect();
        Some(ParentLink {
            name: parent_name(loc),
            locators,
            expected_id: loc
                .get("parent_linkage")
                .and_then(Guid::parse)
                .unwrap_or(Guid::NIL),
            also_accepted: loc.get("parent_linkage2").and_then(Guid::parse),
            format: "vhdx",
        })
    }

    /// Attaches the parent of a differencing image. Size and logical sector size must match.
    pub fn attach_parent(&mut self, parent: Arc<dyn BlockDevice>) -> Result<()> {
        let meta = rlock(&self.meta);
        if !meta.has_parent {
            return Err(Error::InvalidArgument(
                "image is not a differencing disk".into(),
            ));
        }
        if parent.size() != meta.virtual_size {
            return Err(Error::ParentMismatch {
                child: self.path.clone().unwrap_or_default(),
                parent: parent.path().map(|p| p.to_path_buf()).unwrap_or_default(),
                detail: format!(
                    "parent size {} differs from the child's {}",
                    parent.size(),
                    meta.virtual_size
                ),
            });
        }
        if parent.logical_sector_size() != meta.logical_sector {
            return Err(Error::ParentMismatch {
                child: self.path.clone().unwrap_or_default(),
                parent: parent.path().map(|p| p.to_path_buf()).unwrap_or_default(),
                detail: format!(
                    "parent logical sector size {} differs from the child's {}",
                    parent.logical_sector_size(),
                    meta.logical_sector
                ),
            });
        }
        drop(meta);
        self.parent = Some(parent);
        Ok(())
    }

    pub(crate) fn parent_missing(&self) -> Error {
        let meta = rlock(&self.meta);
        let name = meta
            .parent_locator
            .as_ref()
            .map(parent_name)
            .unwrap_or_default();
        Error::ParentNotFound {
            child: self.path.clone().unwrap_or_default(),
            name,
            tried: Vec::new(),
            unusable: Box::default(),
        }
    }

    /// Re-parents a differencing image (`rebase -u`): a new locator pointing at `parent_path`,
    /// linked to `parent`'s DataWriteGuid; written through the log.
    pub fn set_parent(&self, parent_path: &Path, parent: &dyn BlockDevice) -> Result<()> {
        self.set_parent_full(
            parent_path,
            &disk::ParentWindowsPaths::default(),
            parent,
            None,
        )
    }

    /// Like [`set_parent`](Self::set_parent), and when `next` is set, records it as
    /// `parent_linkage2`: the child then also accepts a parent whose DataWriteGuid is `next`
    /// (the identity a commit will give the parent), so a crash mid-commit leaves it openable.
    pub fn set_parent_with_next(
        &self,
        parent_path: &Path,
        parent: &dyn BlockDevice,
        next: Option<Guid>,
    ) -> Result<()> {
        self.set_parent_full(
            parent_path,
            &disk::ParentWindowsPaths::default(),
            parent,
            next,
        )
    }

    /// [`VhdxDisk::set_parent`], also recording the parent's Windows paths when they are known.
    pub fn set_parent_with(
        &self,
        parent_path: &Path,
        windows: &disk::ParentWindowsPaths,
        parent: &dyn BlockDevice,
    ) -> Result<()> {
        self.set_parent_full(parent_path, windows, parent, None)
    }

    fn set_parent_full(
        &self,
        parent_path: &Path,
        windows: &disk::ParentWindowsPaths,
        parent: &dyn BlockDevice,
        next: Option<Guid>,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        {
            let meta = rlock(&self.meta);
            if !meta.has_parent {
                return Err(Error::InvalidArgument(
                    "image is not a differencing disk".into(),
                ));
            }
            if parent.size() != meta.virtual_size
                || parent.logical_sector_size() != meta.logical_sector
            {
                return Err(Error::InvalidArgument(format!(
                    "new parent has size {} / sector {}, the child {} / {}",
                    parent.size(),
                    parent.logical_sector_size(),
                    meta.virtual_size,
                    meta.logical_sector
                )));
            }
        }
        let child = self
            .path
            .clone()
            .unwrap_or_else(|| PathBuf::from("child.vhdx"));
        let mut loc = build_locator(&child, parent_path, windows, parent)?;
        if let Some(g) = next {
            loc.entries
                .push(("parent_linkage2".to_string(), format!("{{{g}}}")));
        }
        let item = loc.serialize();
        self.usable()?;
        self.ensure_session(false)?;
        let mut wal = lock(&self.wal);
        // Earlier changes first, so the locator's pages go in one entry of their own.
        self.flush_locked(&mut wal)?;
        let mo = self.rt().meta_offset;
        let mlen = self.rt().meta_length as usize;
        let mut region = vec![0u8; mlen];
        self.read_meta_region(&wal, &mut region)?;
        let table = metadata::read_table(&region);
        let mut slot = None;
        let mut top = 65536u64;
        for (i, e) in table.iter().enumerate() {
            if e.guid == GUID_PARENT_LOCATOR && e.flags & META_IS_USER == 0 {
                slot = Some(i);
            } else {
                top = top.max(round_up(e.offset as u64 + e.length as u64, 8));
            }
        }
        let slot = slot.ok_or_else(|| {
            Error::corrupt(
                "VHDX metadata table",
                mo,
                "no parent locator item to replace",
            )
        })?;
        let old_off = table[slot].offset as u64;
        // Reuse the old place when it is past every other item, else go past them.
        let place = if old_off >= top { old_off } else { top };
        if place + item.len() as u64 > mlen as u64 {
            return Err(Error::Unsupported(
                "new parent locator does not fit in the metadata region".into(),
            ));
        }
        let new_region = {
            let mut r = region.clone();
            let entry = metadata::MetaEntry {
                offset: place as u32,
                length: item.len() as u32,
                ..table[slot].clone()
            };
            metadata::write_table_entry(&mut r, slot, &entry);
            r[place as usize..place as usize + item.len()].copy_from_slice(&item);
            r
        };
        for p in 0..(mlen as u64 / PAGE) {
            let a = (p * PAGE) as usize;
            let b = a + PAGE as usize;
            if region[a..b] != new_region[a..b] {
                wal.raw_dirty
                    .insert(mo + p * PAGE, new_region[a..b].to_vec().into_boxed_slice());
            }
        }
        let parsed = parse_metadata(&new_region, mo)?;
        *wlock(&self.meta) = parsed;
        // Failed, the new locator may or may not be in a durable log entry: neither keeping it
        // pending (a later flush would re-parent after we reported failure) nor dropping it is
        // honest, so the handle stops.
        self.flush_locked(&mut wal)
            .map_err(|e| self.poison("re-parenting failed", e))
    }
}

/// The parent locator of a new link: `parent_linkage`, `relative_path` (always), and the
/// Windows paths only when known. A POSIX path in `absolute_win32_path` helps no Windows
/// reader, so none is written.
pub(crate) fn build_locator(
    child: &Path,
    parent_path: &Path,
    windows: &disk::ParentWindowsPaths,
    parent: &dyn BlockDevice,
) -> Result<ParentLocator> {
    let id = parent.unique_id().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{} has no unique id ({} images cannot be VHDX parents)",
            parent_path.display(),
            parent.format()
        ))
    })?;
    let abs = |p: &Path| -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(p))
                .unwrap_or(p.to_path_buf())
        }
    };
    let pabs = abs(parent_path);
    let cabs = abs(child);
    let cdir = cabs.parent().unwrap_or(Path::new("/"));
    let mut entries = vec![
        ("parent_linkage".to_string(), format!("{{{id}}}")),
        (
            "relative_path".to_string(),
            disk::windows_relative_path(cdir, &pabs),
        ),
    ];
    if let Some(v) = windows.volume.as_ref().filter(|v| !v.is_empty()) {
        entries.push(("volume_path".to_string(), v.clone()));
    }
    if let Some(a) = windows.absolute.as_ref().filter(|a| !a.is_empty()) {
        entries.push(("absolute_win32_path".to_string(), a.clone()));
    }
    entries.retain(|(_, v)| v.len() < 32000);
    Ok(ParentLocator { entries })
}

/// The parent's name for messages: the relative path, else the absolute one, else the volume
/// path.
fn parent_name(loc: &ParentLocator) -> String {
    loc.get("relative_path")
        .or_else(|| loc.get("absolute_win32_path"))
        .or_else(|| loc.get("volume_path"))
        .unwrap_or("")
        .to_string()
}

//! The kinds of image a layer can be, for what only a format can do.
//!
//! Data I/O never needs the kind: it goes through [`Disk`], the request layer, over
//! `dyn BlockDevice`. Management does (resizing, compacting, re-linking a child, the facts
//! only one format has), so [`crate::open_image`] hands out the top layer as an [`Image`] and
//! callers `match` on it instead of downcasting.

use std::path::Path;
use std::sync::Arc;

use disk::{BlockDevice, Disk, Error, RawDisk, Result};

use crate::WindowsLocation;

#[derive(Clone, Debug)]
pub enum Image {
    Raw(Arc<RawDisk>),
    Vhd(Arc<vhd::VhdDisk>),
    Vhdx(Arc<vhdx::VhdxDisk>),
}

impl Image {
    /// The layer as a block device (what a child holds as its parent).
    pub fn device(&self) -> Arc<dyn BlockDevice> {
        match self {
            Image::Raw(d) => d.clone(),
            Image::Vhd(d) => d.clone(),
            Image::Vhdx(d) => d.clone(),
        }
    }

    /// The request-layer handle to do I/O through.
    pub fn disk(&self) -> Disk {
        Disk::new(self.device())
    }

    pub fn format(&self) -> crate::Format {
        match self {
            Image::Raw(_) => crate::Format::Raw,
            Image::Vhd(_) => crate::Format::Vhd,
            Image::Vhdx(_) => crate::Format::Vhdx,
        }
    }

    /// Points this differencing image at `parent` (rewrites its parent locator and the
    /// identity it records), through its own format.
    pub fn set_parent(&self, parent_path: &Path, parent: &dyn BlockDevice) -> Result<()> {
        self.set_parent_located(parent_path, parent, &WindowsLocation::default())
    }

    /// Like [`Image::set_parent`], also recording the parent's Windows paths (`windows`,
    /// resolved against this image's path) in the locators that hold absolute Windows paths.
    pub fn set_parent_located(
        &self,
        parent_path: &Path,
        parent: &dyn BlockDevice,
        windows: &WindowsLocation,
    ) -> Result<()> {
        let abs = std::path::absolute(parent_path).unwrap_or_else(|_| parent_path.to_path_buf());
        let want = match self {
            Image::Raw(_) => {
                return Err(Error::InvalidArgument(
                    "raw images have no parent to change".into(),
                ))
            }
            Image::Vhd(_) => "vhd",
            Image::Vhdx(_) => "vhdx",
        };
        crate::check_room_for_child(parent_path, parent)?;
        if parent.format() != want {
            return Err(Error::InvalidArgument(format!(
                "a differencing {} needs a {} parent; {} is {}",
                want.to_uppercase(),
                want.to_uppercase(),
                parent_path.display(),
                parent.format()
            )));
        }
        let w = if *windows == WindowsLocation::default() {
            disk::ParentWindowsPaths::default()
        } else {
            let device = self.device();
            let child_path = device.path().map(Path::to_path_buf).unwrap_or_default();
            windows.resolve(&child_path, parent_path)?
        };
        match self {
            Image::Raw(_) => Ok(()),
            Image::Vhd(v) => v.set_parent_with(&abs, &w, parent),
            Image::Vhdx(v) => v.set_parent_with(&abs, &w, parent),
        }
    }

    /// The VHD facts only a VHD has (geometry, creator, size rule), for callers that show or
    /// keep them.
    pub fn vhd_info(&self) -> Option<vhd::VhdInfo> {
        match self {
            Image::Vhd(v) => Some(v.info()),
            _ => None,
        }
    }
}

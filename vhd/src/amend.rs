//! In-place changes for `viridian amend` that touch only the footer.

use disk::{Error, Guid, Result};

use crate::VhdDisk;

impl VhdDisk {
    /// The footer's unique id and time stamp: what a differencing child records of its parent.
    pub fn identity(&self) -> (Guid, u32) {
        let m = self.m();
        (m.footer.unique_id, m.footer.timestamp)
    }

    /// Gives this image the identity (unique id and time stamp) of another image with the same
    /// content, so children made against that image open on this one. Only for a faithful copy
    /// (amend rewrites an image into a new file and then puts it in the old one's place); used
    /// on anything else it would let a child read the wrong parent.
    pub fn adopt_identity(&self, unique_id: Guid, timestamp: u32) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let mut m = self.mw();
        let mut footer = m.footer.clone();
        footer.unique_id = unique_id;
        footer.timestamp = timestamp;
        // Memory takes the new identity once both footers carry it.
        self.write_footers(&footer, m.footer_pos)?;
        m.footer = footer;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateKind, CreateOptions, OpenOptions, SizeRule};
    use disk::BlockDevice;

    #[test]
    fn an_adopted_identity_survives_reopening() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a.vhd");
        let disk =
            VhdDisk::create(&path, &CreateOptions::new(CreateKind::Dynamic, 8 << 20)).unwrap();
        disk.close().unwrap();
        drop(disk);
        let rw = OpenOptions {
            read_only: false,
            size_rule: SizeRule::Auto,
        };
        let disk = VhdDisk::open_path(&path, &rw).unwrap();
        disk.adopt_identity(Guid::from_rfc_bytes([4u8; 16]), 12345)
            .unwrap();
        disk.close().unwrap();
        drop(disk);
        let ro = OpenOptions {
            read_only: true,
            ..rw
        };
        let disk = VhdDisk::open_path(&path, &ro).unwrap();
        assert_eq!(disk.identity(), (Guid::from_rfc_bytes([4u8; 16]), 12345));
        assert!(
            disk.adopt_identity(Guid::from_rfc_bytes([5u8; 16]), 1)
                .is_err(),
            "read-only handle wrote"
        );
    }
}

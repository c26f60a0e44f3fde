//! What a differencing layer records about its parent, and the one way a layer reads its
//! parent's data. Finding the parent from these records is `chain`'s job (one rule for every
//! format, docs/chains.md); the formats only report what their files say.

use std::sync::Arc;

use crate::{BlockDevice, Guid, Result};

/// What a differencing layer records about its parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentLink {
    /// The parent's name for messages (VHD: the header's parent Unicode name; VHDX: the
    /// relative path, else the absolute one, else the volume path). Its file name is also
    /// the last place `chain` looks (beside the child).
    pub name: String,
    /// The locator entries that hold a path, exactly as recorded (no slashes converted, no
    /// prefix stripped), in the format's order.
    pub locators: Vec<LocatorPath>,
    /// The parent's [`BlockDevice::unique_id`] that this child was made against.
    pub expected_id: Guid,
    /// A second accepted identity (VHDX `parent_linkage2`): set while a commit into the parent
    /// is under way, so the parent's new DataWriteGuid is accepted too.
    pub also_accepted: Option<Guid>,
    /// The format the parent must have ("vhd" or "vhdx").
    pub format: &'static str,
}

/// One locator entry that names a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocatorPath {
    pub kind: LocatorKind,
    /// The path as stored in the child (a Windows path usually: backslashes, maybe `.\`).
    pub path: String,
}

/// How a locator path is meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocatorKind {
    /// Relative to the child's directory (VHD `W2ru`/`Wi2r`, VHDX `relative_path`).
    Relative,
    /// An absolute path (VHD `W2ku`/`Wi2k`/`MacX`, VHDX `absolute_win32_path`, `volume_path`).
    Absolute,
}

/// Reads `buf` at `off` from a layer's parent, for the bytes the layer itself does not define.
/// A parent smaller than the child (the child was grown after it was made) reads as zeros past
/// its end. `missing` makes the error when no parent is attached.
pub fn read_parent(
    parent: Option<&Arc<dyn BlockDevice>>,
    buf: &mut [u8],
    off: u64,
    missing: impl FnOnce() -> crate::Error,
) -> Result<()> {
    let Some(p) = parent else {
        return Err(missing());
    };
    let psize = p.size();
    if off >= psize {
        buf.fill(0);
        return Ok(());
    }
    let n = ((psize - off) as usize).min(buf.len());
    p.read_at(&mut buf[..n], off)?;
    buf[n..].fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemStorage, RawDisk};

    fn raw(bytes: Vec<u8>) -> Arc<dyn BlockDevice> {
        Arc::new(RawDisk::new(Arc::new(MemStorage::from_vec(bytes)), true).unwrap())
    }

    #[test]
    fn past_the_parents_end_reads_zeros() {
        let p = raw(vec![7u8; 4096]);
        let mut buf = vec![1u8; 2048];
        read_parent(Some(&p), &mut buf, 3072, || unreachable!()).unwrap();
        assert_eq!(&buf[..1024], &[7u8; 1024][..]);
        assert!(buf[1024..].iter().all(|&b| b == 0));
        let mut buf = vec![1u8; 512];
        read_parent(Some(&p), &mut buf, 8192, || unreachable!()).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn no_parent_is_the_callers_error() {
        let e = read_parent(None, &mut [0u8; 512], 0, || crate::Error::ReadOnly).unwrap_err();
        assert!(matches!(e, crate::Error::ReadOnly));
    }
}

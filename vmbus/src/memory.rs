//! Guest physical memory as the VMBus host sees it.
//!
//! Every address and length that comes from the guest goes through [`GuestMemory`], whose
//! methods fail with [`MemoryError::OutOfRange`] instead of touching anything outside guest RAM.

use std::sync::Mutex;

/// 4 KiB, the page size of GPADLs and GPA-direct ranges.
pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    #[error("guest range {gpa:#x}+{len:#x} is outside guest memory")]
    OutOfRange { gpa: u64, len: u64 },
}

/// Access to guest physical memory. Implementations must be callable from several threads
/// (the VMM implements it over `vm-memory`; tests use [`VecMemory`]).
///
/// The guest may change memory concurrently; callers never assume two reads agree.
pub trait GuestMemory: Send + Sync {
    /// Copies `buf.len()` bytes from guest physical address `gpa`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError>;
    /// Copies `data` to guest physical address `gpa`.
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError>;
    /// Succeeds when `gpa..gpa+len` is entirely guest RAM.
    fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError>;

    /// Reads an aligned little-endian u32 (ring indices). A VMM should override this with an
    /// atomic load when its `read` is not a single aligned access.
    fn read_u32(&self, gpa: u64) -> Result<u32, MemoryError> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    /// Writes an aligned little-endian u32 (ring indices).
    fn write_u32(&self, gpa: u64, v: u32) -> Result<(), MemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }
}

/// Guest memory in one host buffer starting at GPA 0 (tests, benchmarks, fuzzing).
#[derive(Debug)]
pub struct VecMemory {
    bytes: Mutex<Vec<u8>>,
    size: u64,
}

impl VecMemory {
    pub fn new(size: usize) -> Self {
        VecMemory {
            bytes: Mutex::new(vec![0; size]),
            size: size as u64,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, MemoryError> {
        self.check(gpa, len as u64)?;
        Ok(gpa as usize..gpa as usize + len)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic elsewhere while holding the lock leaves plain bytes behind; keep going.
        self.bytes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl GuestMemory for VecMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let r = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.lock()[r]);
        Ok(())
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let r = self.range(gpa, data.len())?;
        self.lock()[r].copy_from_slice(data);
        Ok(())
    }
    fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(MemoryError::OutOfRange { gpa, len }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        let m = VecMemory::new(8192);
        m.write(8188, &[1, 2, 3, 4]).unwrap();
        assert_eq!(m.read_u32(8188).unwrap(), 0x04030201);
        assert!(m.write(8189, &[0; 4]).is_err());
        assert!(m.read(u64::MAX - 1, &mut [0; 4]).is_err());
        assert!(m.check(0, 8193).is_err());
    }
}

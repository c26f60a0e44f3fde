//! Guest RAM: anonymous mappings registered as KVM memory slots, with bounds-checked access
//! for everything the VMM reads or writes on the guest's behalf.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{FOUR_GIB, MMIO_HOLE_START};
use crate::VmmError;

/// Guest memory, shared by all threads of a VM.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    /// End of RAM below the MMIO hole.
    low_end: u64,
    /// Bytes of RAM above 4 GiB.
    high_size: u64,
}

impl GuestRam {
    /// Allocates `size` bytes of guest RAM: below 3 GiB first, the rest from 4 GiB up.
    pub fn new(size: u64) -> Result<Self, VmmError> {
        if size < (32 << 20) {
            return Err(VmmError::Config(format!(
                "guest memory {size} bytes is too small (32 MiB at least)"
            )));
        }
        let low_end = size.min(MMIO_HOLE_START);
        let high_size = size - low_end;
        let mut ranges = vec![(GuestAddress(0), low_end as usize)];
        if high_size > 0 {
            ranges.push((GuestAddress(FOUR_GIB), high_size as usize));
        }
        let mem = GuestMemoryMmap::<()>::from_ranges(&ranges)
            .map_err(|e| VmmError::Memory(format!("allocating {size} bytes: {e}")))?;
        Ok(GuestRam {
            mem,
            low_end,
            high_size,
        })
    }

    /// The vm-memory object (for linux-loader).
    pub fn mmap(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn low_end(&self) -> u64 {
        self.low_end
    }

    pub fn high_size(&self) -> u64 {
        self.high_size
    }

    /// Registers every region as a KVM memory slot.
    pub fn register(&self, vm: &VmFd) -> Result<(), VmmError> {
        for (slot, region) in self.mem.iter().enumerate() {
            let host = self
                .mem
                .get_host_address(region.start_addr())
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live anonymous mapping owned by `self.mem`, which outlives
            // the VM (the VM is dropped before the memory in `Vm`), and its size is exact.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(|e| VmmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        Ok(())
    }

    /// Host pointer to `len` bytes at `gpa`, only if they all lie in one RAM region.
    pub fn host_range(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        let region = self.mem.find_region(GuestAddress(gpa))?;
        let off = gpa - region.start_addr().0;
        if off.checked_add(len as u64)? > region.len() {
            return None;
        }
        self.mem.get_host_address(GuestAddress(gpa)).ok()
    }

    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| GuestMemError {
                gpa,
                len: buf.len(),
            })
    }

    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), GuestMemError> {
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| GuestMemError {
                gpa,
                len: buf.len(),
            })
    }

    pub fn read_u64(&self, gpa: u64) -> Result<u64, GuestMemError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn read_u32(&self, gpa: u64) -> Result<u32, GuestMemError> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Atomic view of an aligned u32 in guest RAM.
    pub fn atomic_u32(&self, gpa: u64) -> Result<&AtomicU32, GuestMemError> {
        let err = GuestMemError { gpa, len: 4 };
        if gpa & 3 != 0 {
            return Err(err);
        }
        let p = self.host_range(gpa, 4).ok_or(err)?;
        // SAFETY: `p` is 4-aligned (guest addresses and the mapping are page aligned) and points
        // into a mapping that lives as long as `self`; the guest may access it concurrently,
        // which is exactly why an atomic type is used.
        Ok(unsafe { AtomicU32::from_ptr(p.cast()) })
    }

    /// Atomic view of an aligned u64 in guest RAM.
    pub fn atomic_u64(&self, gpa: u64) -> Result<&AtomicU64, GuestMemError> {
        let err = GuestMemError { gpa, len: 8 };
        if gpa & 7 != 0 {
            return Err(err);
        }
        let p = self.host_range(gpa, 8).ok_or(err)?;
        // SAFETY: as in `atomic_u32`, with 8-byte alignment.
        Ok(unsafe { AtomicU64::from_ptr(p.cast()) })
    }

    /// Atomic view of one byte of guest RAM.
    pub fn atomic_u8(&self, gpa: u64) -> Result<&AtomicU8, GuestMemError> {
        let p = self
            .host_range(gpa, 1)
            .ok_or(GuestMemError { gpa, len: 1 })?;
        // SAFETY: a byte needs no alignment; the mapping outlives `self`.
        Ok(unsafe { AtomicU8::from_ptr(p) })
    }

    /// Release-store of a u32 after the bytes written before it.
    pub fn store_u32_release(&self, gpa: u64, v: u32) -> Result<(), GuestMemError> {
        self.atomic_u32(gpa)?.store(v, Ordering::Release);
        Ok(())
    }
}

/// An access outside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest physical range {gpa:#x}+{len:#x} is not RAM")]
pub struct GuestMemError {
    pub gpa: u64,
    pub len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_around_hole() {
        let ram = GuestRam::new(64 << 20).unwrap();
        assert_eq!(ram.low_end(), 64 << 20);
        assert_eq!(ram.high_size(), 0);
        ram.write(0x1000, &[1, 2, 3, 4]).unwrap();
        assert_eq!(ram.read_u32(0x1000).unwrap(), 0x0403_0201);
        assert!(ram.read_u32((64 << 20) - 2).is_err());
        assert!(ram.host_range((64 << 20) - 2, 4).is_none());
        let a = ram.atomic_u32(0x2000).unwrap();
        a.fetch_or(5, Ordering::SeqCst);
        assert_eq!(ram.read_u32(0x2000).unwrap(), 5);
        assert!(ram.atomic_u32(0x2001).is_err());
    }
}

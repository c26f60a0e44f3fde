//! Direct 64-bit Linux boot: kernel and initrd loading, the zero page, e820, identity-mapped
//! page tables, a GDT, and the BSP's entry registers.

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{elf::Elf, BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::memory::GuestRam;
use crate::VmmError;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// "HdrS"
const HDRS_MAGIC: u32 = 0x5372_6448;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const LOADFLAG_CAN_USE_HEAP: u8 = 0x80;

/// What the loader produced: where to enter and what to put in the zero page.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// 64-bit entry point (guest physical).
    pub entry: u64,
    /// Setup header taken from a bzImage; None for an ELF vmlinux.
    pub header: Option<linux_loader::loader::bootparam::setup_header>,
    /// End of the loaded image (for placing nothing over it).
    pub end: u64,
    /// "bzImage" or "ELF vmlinux", for messages.
    pub kind: &'static str,
}

/// Loads an uncompressed ELF vmlinux or a bzImage (detected from the file's magic).
pub fn load_kernel(ram: &GuestRam, path: &Path) -> Result<LoadedKernel, VmmError> {
    let open = || {
        File::open(path).map_err(|e| VmmError::Io(format!("opening kernel {}", path.display()), e))
    };
    let mut f = open()?;
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        f.read_exact(&mut magic)
            .map_err(|e| VmmError::Io(format!("reading kernel {}", path.display()), e))?;
    }
    let bad = |e: linux_loader::loader::Error| VmmError::Kernel(format!("{}: {e}", path.display()));
    if magic == *b"\x7fELF" {
        let r =
            Elf::load(ram.mmap(), None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(bad)?;
        Ok(LoadedKernel {
            entry: r.kernel_load.0,
            header: None,
            end: r.kernel_end,
            kind: "ELF vmlinux",
        })
    } else {
        let r = BzImage::load(
            ram.mmap(),
            Some(GuestAddress(HIMEM_START)),
            &mut f,
            Some(GuestAddress(HIMEM_START)),
        )
        .map_err(bad)?;
        // The 64-bit entry point of a bzImage is 0x200 past the protected-mode code.
        Ok(LoadedKernel {
            entry: r.kernel_load.0 + 0x200,
            header: r.setup_header,
            end: r.kernel_end,
            kind: "bzImage",
        })
    }
}

/// Puts the initrd page-aligned as high in low RAM as the kernel allows; returns (addr, size).
pub fn load_initrd(
    ram: &GuestRam,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<(u64, u64), VmmError> {
    let data = std::fs::read(path)
        .map_err(|e| VmmError::Io(format!("reading initrd {}", path.display()), e))?;
    let max = kernel
        .header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let top = (max + 1).min(ram.low_end());
    let size = data.len() as u64;
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel.end.max(HIMEM_START))
        .ok_or_else(|| {
            VmmError::Config(format!(
                "initrd {} ({size} bytes) does not fit in guest memory below {top:#x}",
                path.display()
            ))
        })?;
    ram.write(addr, &data)
        .map_err(|e| VmmError::Memory(format!("writing initrd: {e}")))?;
    Ok((addr, size))
}

/// The e820 map the guest gets.
pub fn e820_map(ram: &GuestRam) -> Vec<(u64, u64, u32)> {
    let mut v = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
        (BIOS_START, BIOS_END - BIOS_START, E820_RESERVED),
        (HIMEM_START, ram.low_end() - HIMEM_START, E820_RAM),
    ];
    if ram.high_size() > 0 {
        v.push((FOUR_GIB, ram.high_size(), E820_RAM));
    }
    v
}

/// Writes the command line, the zero page, the GDT and the page tables.
pub fn write_boot_data(
    ram: &GuestRam,
    kernel: &LoadedKernel,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
) -> Result<(), VmmError> {
    let memerr = |e: crate::memory::GuestMemError| VmmError::Memory(e.to_string());
    if cmdline.len() >= CMDLINE_MAX {
        return Err(VmmError::Config(format!(
            "kernel command line is {} bytes; the limit is {}",
            cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    if cmdline.bytes().any(|b| b == 0) {
        return Err(VmmError::Config(
            "kernel command line contains a NUL".into(),
        ));
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    ram.write(CMDLINE_ADDR, &c).map_err(memerr)?;

    let mut params = boot_params::default();
    if let Some(h) = kernel.header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = HDRS_MAGIC;
        params.hdr.version = 0x020f;
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.loadflags |= LOADFLAG_CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = (c.len() - 1) as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = RSDP_ADDR;
    let map = e820_map(ram);
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = map.len() as u8;
    ram.mmap()
        .write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| VmmError::Memory(format!("writing the zero page: {e}")))?;

    // GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18).
    let gdt: [u64; 4] = [
        0,
        BOOT_CODE.descriptor(),
        BOOT_DATA.descriptor(),
        0x008f_8b00_0000_ffff,
    ];
    for (i, d) in gdt.iter().enumerate() {
        ram.write(GDT_ADDR + 8 * i as u64, &d.to_le_bytes())
            .map_err(memerr)?;
    }
    ram.write(IDT_ADDR, &0u64.to_le_bytes()).map_err(memerr)?;

    // Identity map of the first 4 GiB with 2 MiB pages.
    ram.write(PML4_ADDR, &(PDPT_ADDR | 0x3).to_le_bytes())
        .map_err(memerr)?;
    for pd in 0..4u64 {
        let pd_addr = PD_ADDR + pd * 0x1000;
        ram.write(PDPT_ADDR + pd * 8, &(pd_addr | 0x3).to_le_bytes())
            .map_err(memerr)?;
        let mut page = vec![0u8; 4096];
        for i in 0..512u64 {
            let e = ((pd << 30) + (i << 21)) | 0x83;
            page[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        ram.write(pd_addr, &page).map_err(memerr)?;
    }
    Ok(())
}

/// A flat code or data segment (base 0, limit 4 GiB, 4 KiB granularity), described once for
/// both forms the CPU needs: its GDT descriptor and the segment register state KVM loads. The
/// boot GDT and the probe's micro-guest (`probe::guest`) both build theirs from this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlatSegment {
    /// Selector, with the requested privilege level in its low two bits.
    pub selector: u16,
    /// Descriptor type: 0xb execute/read code, 0x3 read/write data (both marked accessed).
    pub type_: u8,
    /// Descriptor privilege level: 0 kernel, 3 user.
    pub dpl: u8,
    /// 64-bit code.
    pub l: u8,
    /// 32-bit default operand size (data, and 32-bit code).
    pub db: u8,
}

impl FlatSegment {
    pub const fn new(selector: u16, type_: u8, dpl: u8, l: u8, db: u8) -> Self {
        FlatSegment {
            selector,
            type_,
            dpl,
            l,
            db,
        }
    }

    /// The 8-byte GDT descriptor: limit 0xfffff, base 0, access byte P | DPL | S | type,
    /// flags G | D/B | L.
    pub const fn descriptor(self) -> u64 {
        let access = 0x80 | ((self.dpl as u64 & 3) << 5) | 0x10 | (self.type_ as u64 & 0xf);
        let flags = 0x8 | ((self.db as u64 & 1) << 2) | ((self.l as u64 & 1) << 1);
        0xffff | (access << 40) | (0xf << 48) | (flags << 52)
    }

    /// The same segment as KVM's segment register state.
    pub fn register(self) -> kvm_segment {
        kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: self.selector,
            type_: self.type_,
            present: 1,
            dpl: self.dpl,
            db: self.db,
            s: 1,
            l: self.l,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        }
    }
}

/// The boot GDT's code and data segments (the TSS slot at 0x18 follows them).
const BOOT_CODE: FlatSegment = FlatSegment::new(0x08, 0xb, 0, 1, 0);
const BOOT_DATA: FlatSegment = FlatSegment::new(0x10, 0x3, 0, 0, 1);

/// Long-mode segment and control registers for the BSP.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = BOOT_CODE.register();
    let data = BOOT_DATA.register();
    let mut tss = FlatSegment::new(0x18, 0xb, 0, 0, 0).register();
    tss.s = 0;
    tss.limit = 0xfffff;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr0 = 0x8000_0011; // PG | ET | PE
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = 0x20; // PAE
    sregs.efer = 0x500; // LMA | LME
    sregs
}

/// General registers at the 64-bit entry point.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsi: ZERO_PAGE_ADDR,
        rsp: BOOT_STACK_TOP,
        rbp: BOOT_STACK_TOP,
        rflags: 0x2,
        ..Default::default()
    }
}

pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_segment_descriptors() {
        // The boot GDT's descriptors as they were written by hand before.
        assert_eq!(BOOT_CODE.descriptor(), 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_DATA.descriptor(), 0x00cf_9300_0000_ffff);
        // User 64-bit code and user data (DPL 3).
        assert_eq!(
            FlatSegment::new(0x2b, 0xb, 3, 1, 0).descriptor(),
            0x00af_fb00_0000_ffff
        );
        assert_eq!(
            FlatSegment::new(0x23, 0x3, 3, 0, 1).descriptor(),
            0x00cf_f300_0000_ffff
        );
        let r = FlatSegment::new(0x2b, 0xb, 3, 1, 0).register();
        assert_eq!(
            (r.selector, r.type_, r.dpl, r.l, r.db, r.s, r.g),
            (0x2b, 0xb, 3, 1, 0, 1, 1)
        );
    }

    #[test]
    fn zero_page_and_tables() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let k = LoadedKernel {
            entry: 0x100_0000,
            header: None,
            end: 0x200_0000,
            kind: "test",
        };
        write_boot_data(&ram, &k, "console=ttyS0", Some((0x300_0000, 0x1000))).unwrap();
        let mut b = [0u8; 14];
        ram.read(CMDLINE_ADDR, &mut b).unwrap();
        assert_eq!(&b, b"console=ttyS0\0");
        // e820_entries at 0x1e8, HdrS at 0x202, rsdp at 0x70, ramdisk_image at 0x218.
        let mut zp = vec![0u8; 4096];
        ram.read(ZERO_PAGE_ADDR, &mut zp).unwrap();
        assert_eq!(zp[0x1e8], 4);
        assert_eq!(&zp[0x202..0x206], b"HdrS");
        assert_eq!(
            u64::from_le_bytes(zp[0x70..0x78].try_into().unwrap()),
            RSDP_ADDR
        );
        assert_eq!(
            u32::from_le_bytes(zp[0x218..0x21c].try_into().unwrap()),
            0x300_0000
        );
        assert_eq!(ram.read_u64(PML4_ADDR).unwrap(), PDPT_ADDR | 3);
        assert_eq!(ram.read_u64(PD_ADDR + 8).unwrap(), (2 << 20) | 0x83);
        assert!(write_boot_data(&ram, &k, &"x".repeat(CMDLINE_MAX), None).is_err());
    }

    #[test]
    fn initrd_goes_high() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("initrd");
        std::fs::write(&p, vec![7u8; 5000]).unwrap();
        let k = LoadedKernel {
            entry: 0x100_0000,
            header: None,
            end: 0x200_0000,
            kind: "test",
        };
        let (addr, size) = load_initrd(&ram, &k, &p).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20 && addr + 8192 >= 64 << 20);
    }
}

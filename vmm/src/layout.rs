//! Guest physical memory layout for direct 64-bit boot.

/// GDT used while entering the kernel.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT (the kernel installs its own before enabling interrupts).
pub const IDT_ADDR: u64 = 0x520;
/// Linux "zero page" (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer handed to the kernel.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// PML4 of the identity map; PDPT and four PDs follow (identity-maps 4 GiB with 2 MiB pages).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Linux's x86 COMMAND_LINE_SIZE.
pub const CMDLINE_MAX: usize = 2048;
/// End of conventional memory; the EBDA follows.
pub const EBDA_START: u64 = 0x9fc00;
/// Reserved BIOS area holding the ACPI tables; the RSDP sits at its start, where Linux's legacy
/// scan finds it.
pub const BIOS_START: u64 = 0xe0000;
pub const RSDP_ADDR: u64 = BIOS_START;
pub const BIOS_END: u64 = 0x10_0000;
/// Where the kernel goes (bzImage); an ELF vmlinux uses its own physical addresses.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (IOAPIC, LAPIC).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 0x1_0000_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Highest address an initrd may end at when the kernel does not say (ELF boot).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// TSS area KVM needs on Intel hosts (three pages below 4 GiB, outside RAM).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

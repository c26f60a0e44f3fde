//! Can this host's KVM run guest user space that makes system calls?
//!
//! On our nested test hosts (`kvm_pvm`, VMM.md first section) guest ring-3 code runs, but a
//! 64-bit `syscall` from ring 3 faults at the LSTAR address still in user mode and `int $0x80`
//! raises #UD, so no Linux init program can run there. On ordinary hardware KVM both work.
//! [`probe_guest_user_space`] finds out which case this is in a few milliseconds, without
//! booting Linux: it builds a micro-guest (64 KiB of RAM, long mode, a GDT with kernel and
//! user segments in the layout `STAR` needs, a TSS, an IDT that reports every exception), starts
//! the vCPU directly in ring 3 and lets it execute `syscall` (first VM) and `int $0x80` (second
//! VM). Each handler reports the CS it runs with and then reads CR0, which only ring 0 may: a
//! call "works" when that read succeeds. All guest code is hand-assembled below; it reports to
//! the VMM with 32-bit stores to an MMIO page: a store to `PROBE_VALUE` queues a value, a store
//! to `PROBE_TAG` ends a report whose meaning the tag gives (`TAG_*`); the queued values belong
//! to it.
//!
//! Measured on a `kvm_pvm` host: "syscall: entered LSTAR in CPL 3 (CS 0x33, not the GDT's user
//! CS 0x2b), then #GP at its mov from CR0 from CPL 3, error 0x0; int $0x80: #UD at the int
//! $0x80 instruction from CPL 3" (0x33 is the host's own user CS: the handler ran natively in
//! host ring 3). A ring-3 `out` there raises #GP even with IOPL 3, hence MMIO.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, kvm_segment, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::VmmError;

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpaceProbe {
    /// The vCPU ran ring-3 code (a store from CPL 3 reached the VMM). If this is false the
    /// probe itself could not run here and the other answers mean nothing.
    pub reached_user_mode: bool,
    /// A 64-bit `syscall` from ring 3 entered the LSTAR handler in ring 0 (it could read CR0).
    pub syscall_works: bool,
    /// `int $0x80` from ring 3 entered its (DPL 3) IDT gate's handler in ring 0 (it could read
    /// CR0).
    pub int80_works: bool,
    /// One line saying what happened to each, e.g. "syscall: reached ring 0 (CS 0x8); int
    /// $0x80: reached ring 0 (CS 0x8)" or "syscall: #PF at LSTAR from CPL 3, error 0xf, CR2
    /// 0x8080; int $0x80: #UD at the int $0x80 instruction from CPL 3".
    pub detail: String,
}

/// Runs the probe (at most [`PROBE_TIME_LIMIT`], normally a few milliseconds).
/// [`VmmError::KvmUnavailable`] when there is no usable /dev/kvm; other errors when a KVM
/// ioctl needed to build the micro-guest fails. What the guest did, including a triple fault,
/// an emulation failure or a hang, is an answer, not an error.
pub fn probe_guest_user_space() -> Result<UserSpaceProbe, VmmError> {
    probe_with_limit(PROBE_TIME_LIMIT)
}

/// The longest [`probe_guest_user_space`] lets the guest run.
pub const PROBE_TIME_LIMIT: Duration = Duration::from_secs(2);

// ---- Guest physical (= virtual) layout: 16 pages, page 0 left unmapped. ----

const MEM_SIZE: usize = 0x1_0000;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: u64 = 0x4000;
const GDT: u64 = 0x5000;
const IDT: u64 = 0x6000;
const TSS: u64 = 0x7000;
/// Ring-0 code: exception reporter, LSTAR handler, `int $0x80` handler, privilege check.
const KCODE: u64 = 0x8000;
const REPORT_EXCEPTION: u64 = KCODE;
const SYSCALL_ENTRY: u64 = KCODE + 0x80;
const INT80_ENTRY: u64 = KCODE + 0xc0;
const PRIVILEGE_CHECK: u64 = KCODE + 0x100;
/// 256 exception stubs of 16 bytes, one per vector.
const STUBS: u64 = 0x9000;
const STUB_SIZE: u64 = 16;
/// Ring-3 code: the `syscall` phase at `UCODE`, the `int $0x80` phase at `UCODE + 0x40`.
const UCODE: u64 = 0xa000;
const USER_SYSCALL: u64 = UCODE;
/// Address of the `syscall` instruction (after `mov edx; mov eax; mov [rdx], eax`).
const USER_SYSCALL_INSN: u64 = USER_SYSCALL + 0xc;
const USER_INT80: u64 = UCODE + 0x40;
const USER_INT80_INSN: u64 = USER_INT80 + 0xc;
const USER_STACK_TOP: u64 = 0xc000;
/// TSS.RSP0: the stack the CPU switches to on an exception or `int` from ring 3.
const KERNEL_STACK_TOP: u64 = 0xd000;
/// TSS.IST1, used by the #DF gate.
const DF_STACK_TOP: u64 = 0xe000;

// ---- GDT selectors. `STAR` needs kernel CS, kernel SS = CS + 8 and, for `sysret`, user
// CS32, user SS = CS32 + 8, user CS64 = CS32 + 16 in this order. ----

const KERNEL_CS: u16 = 0x08;
const KERNEL_DS: u16 = 0x10;
const USER_CS32: u16 = 0x18;
const USER_DS: u16 = 0x20 | 3;
const USER_CS: u16 = 0x28 | 3;
const TSS_SEL: u16 = 0x30;

/// Flat descriptors (base 0, limit 0xfffff pages) by index; the TSS's two slots follow.
const GDT_ENTRIES: [u64; 6] = [
    0,
    0x00af_9a00_0000_ffff, // 0x08 kernel code: P, DPL 0, exec/read, L
    0x00cf_9200_0000_ffff, // 0x10 kernel data: P, DPL 0, read/write, D/B
    0x00cf_fa00_0000_ffff, // 0x18 user code 32-bit: P, DPL 3, exec/read, D/B
    0x00cf_f200_0000_ffff, // 0x20 user data: P, DPL 3, read/write, D/B
    0x00af_fa00_0000_ffff, // 0x28 user code 64-bit: P, DPL 3, exec/read, L
];
const TSS_LIMIT: u64 = 0x67;

const MSR_EFER_SCE: u64 = 1;
const EFER: u64 = MSR_EFER_SCE | 0x100 | 0x400; // SCE | LME | LMA
const CR0: u64 = 0x8001_0031; // PG | WP | NE | ET | PE
const CR4: u64 = 0x20; // PAE
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SFMASK: u32 = 0xc000_0084;
/// RFLAGS bits `syscall` clears: TF, IF, DF, NT, AC.
const SFMASK: u64 = 0x4_4700;
/// RFLAGS at the start: only the always-one bit 1 (IF clear, IOPL 0 as in a Linux process).
const START_RFLAGS: u64 = 0x2;

// ---- Probe registers and report tags. ----

/// The probe's MMIO page: mapped in the guest page tables (U/S), backed by no memory slot, so
/// every 32-bit store to it is a KVM MMIO exit. A store to [`PROBE_VALUE`] queues a value, a
/// store to [`PROBE_TAG`] ends a report. MMIO rather than `out`, because on `kvm_pvm` hosts a
/// ring-3 `out` raises #GP even with IOPL 3 (measured), and ring-3 code must report too.
const PROBE_PAGE: u64 = MEM_SIZE as u64;
const PROBE_TAG: u64 = PROBE_PAGE;
const PROBE_VALUE: u64 = PROBE_PAGE + 4;
/// Ring 3 ran (no values).
const TAG_USER: u32 = 1;
/// An exception (values: vector, error code, RIP low, RIP high, saved CS, CR2 low, CR2 high,
/// the handler's CS).
const TAG_EXCEPTION: u32 = 2;
/// The LSTAR handler ran (values: its CS, RCX low, RCX high); the privilege check follows.
const TAG_SYSCALL: u32 = 3;
/// The `int $0x80` handler ran (values: its CS, saved CS); the privilege check follows.
const TAG_INT80: u32 = 4;
/// The instruction after `syscall`/`int $0x80` ran in ring 3 without any handler (no values).
const TAG_FELL_THROUGH: u32 = 5;
/// The handler read CR0, which only ring 0 may (values: CR0 low).
const TAG_PRIVILEGED: u32 = 6;

// ---- Hand-assembled guest code (bytes checked with GNU as + objdump). ----

/// At [`REPORT_EXCEPTION`]; every stub jumps here with `[rsp]` = vector, `[rsp+8]` = error
/// code (0 when the CPU pushed none), then the CPU's frame: RIP, CS, RFLAGS, RSP, SS.
#[rustfmt::skip]
const REPORT_EXCEPTION_CODE: &[u8] = &[
    0xba, 0x04, 0x00, 0x01, 0x00, // mov edx, PROBE_VALUE
    0x48, 0x8b, 0x04, 0x24,       // mov rax, [rsp]        ; vector
    0x89, 0x02,                   // mov [rdx], eax
    0x48, 0x8b, 0x44, 0x24, 0x08, // mov rax, [rsp+8]      ; error code
    0x89, 0x02,                   // mov [rdx], eax
    0x48, 0x8b, 0x44, 0x24, 0x10, // mov rax, [rsp+16]     ; faulting RIP
    0x89, 0x02,                   // mov [rdx], eax        ; low half
    0x48, 0xc1, 0xe8, 0x20,       // shr rax, 32
    0x89, 0x02,                   // mov [rdx], eax        ; high half
    0x48, 0x8b, 0x44, 0x24, 0x18, // mov rax, [rsp+24]     ; saved CS (CPL at the fault)
    0x89, 0x02,                   // mov [rdx], eax
    0x0f, 0x20, 0xd0,             // mov rax, cr2
    0x89, 0x02,                   // mov [rdx], eax        ; low half
    0x48, 0xc1, 0xe8, 0x20,       // shr rax, 32
    0x89, 0x02,                   // mov [rdx], eax        ; high half
    0x8c, 0xc8,                   // mov eax, cs           ; the handler's own CS
    0x89, 0x02,                   // mov [rdx], eax
    0xba, 0x00, 0x00, 0x01, 0x00, // mov edx, PROBE_TAG
    0xb8, 0x02, 0x00, 0x00, 0x00, // mov eax, TAG_EXCEPTION
    0x89, 0x02,                   // mov [rdx], eax
    0xf4,                         // 1: hlt
    0xeb, 0xfd,                   // jmp 1b
];

/// At [`SYSCALL_ENTRY`] (LSTAR). Reports the CS it runs with (its low bits are the CPL) and
/// RCX (the return RIP `syscall` saved), then goes to the privilege check.
#[rustfmt::skip]
const SYSCALL_ENTRY_CODE: &[u8] = &[
    0xba, 0x04, 0x00, 0x01, 0x00, // mov edx, PROBE_VALUE
    0x8c, 0xc8,                   // mov eax, cs
    0x89, 0x02,                   // mov [rdx], eax
    0x48, 0x89, 0xc8,             // mov rax, rcx
    0x89, 0x02,                   // mov [rdx], eax        ; low half
    0x48, 0xc1, 0xe8, 0x20,       // shr rax, 32
    0x89, 0x02,                   // mov [rdx], eax        ; high half
    0xba, 0x00, 0x00, 0x01, 0x00, // mov edx, PROBE_TAG
    0xb8, 0x03, 0x00, 0x00, 0x00, // mov eax, TAG_SYSCALL
    0x89, 0x02,                   // mov [rdx], eax
    0xeb, 0x5e,                   // jmp PRIVILEGE_CHECK   ; from +0x22 to +0x80
];

/// At [`INT80_ENTRY`], reached through the DPL-3 gate of vector 0x80; the frame has no error
/// code, so `[rsp+8]` is the saved CS.
#[rustfmt::skip]
const INT80_ENTRY_CODE: &[u8] = &[
    0xba, 0x04, 0x00, 0x01, 0x00, // mov edx, PROBE_VALUE
    0x8c, 0xc8,                   // mov eax, cs
    0x89, 0x02,                   // mov [rdx], eax
    0x48, 0x8b, 0x44, 0x24, 0x08, // mov rax, [rsp+8]      ; saved CS
    0x89, 0x02,                   // mov [rdx], eax
    0xba, 0x00, 0x00, 0x01, 0x00, // mov edx, PROBE_TAG
    0xb8, 0x04, 0x00, 0x00, 0x00, // mov eax, TAG_INT80
    0x89, 0x02,                   // mov [rdx], eax
    0xeb, 0x22,                   // jmp PRIVILEGE_CHECK   ; from +0x1e to +0x40
];

/// At [`PRIVILEGE_CHECK`]: reads CR0, which raises #GP unless the CPU really is in ring 0
/// (reading CS alone could be fooled by a nested hypervisor that runs guest code in a ring
/// other than the one the guest believes in).
#[rustfmt::skip]
const PRIVILEGE_CHECK_CODE: &[u8] = &[
    0x0f, 0x20, 0xc0,             // mov rax, cr0
    0xba, 0x04, 0x00, 0x01, 0x00, // mov edx, PROBE_VALUE
    0x89, 0x02,                   // mov [rdx], eax
    0xba, 0x00, 0x00, 0x01, 0x00, // mov edx, PROBE_TAG
    0xb8, 0x06, 0x00, 0x00, 0x00, // mov eax, TAG_PRIVILEGED
    0x89, 0x02,                   // mov [rdx], eax
    0xf4,                         // 1: hlt
    0xeb, 0xfd,                   // jmp 1b
];

/// At [`USER_SYSCALL`], ring 3.
#[rustfmt::skip]
const USER_SYSCALL_CODE: &[u8] = &[
    0xba, 0x00, 0x00, 0x01, 0x00, // mov edx, PROBE_TAG
    0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, TAG_USER
    0x89, 0x02,                   // mov [rdx], eax
    0x0f, 0x05,                   // syscall               ; at USER_SYSCALL_INSN
    0xb8, 0x05, 0x00, 0x00, 0x00, // mov eax, TAG_FELL_THROUGH
    0x89, 0x02,                   // mov [rdx], eax
    0xeb, 0xfe,                   // 1: jmp 1b
];

/// At [`USER_INT80`], ring 3.
#[rustfmt::skip]
const USER_INT80_CODE: &[u8] = &[
    0xba, 0x00, 0x00, 0x01, 0x00, // mov edx, PROBE_TAG
    0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, TAG_USER
    0x89, 0x02,                   // mov [rdx], eax
    0xcd, 0x80,                   // int 0x80              ; at USER_INT80_INSN
    0xb8, 0x05, 0x00, 0x00, 0x00, // mov eax, TAG_FELL_THROUGH
    0x89, 0x02,                   // mov [rdx], eax
    0xeb, 0xfe,                   // 1: jmp 1b
];

/// Vectors for which the CPU pushes an error code.
fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// The 16-byte stub for `vector` at `STUBS + vector * 16`: pushes a zero error code where the
/// CPU pushes none, pushes the vector and jumps to the reporter. Padded with `int3`.
fn stub(vector: u8) -> [u8; STUB_SIZE as usize] {
    let mut s = [0xcc; STUB_SIZE as usize];
    let mut n = 0;
    if !has_error_code(vector) {
        s[..2].copy_from_slice(&[0x6a, 0x00]); // push 0
        n = 2;
    }
    // push imm8 (sign-extended to 64 bits; the VMM keeps the low byte)
    s[n..n + 2].copy_from_slice(&[0x6a, vector]);
    n += 2;
    // jmp rel32 to the reporter, relative to the end of this 5-byte instruction
    let next = STUBS + u64::from(vector) * STUB_SIZE + n as u64 + 5;
    let rel = (REPORT_EXCEPTION.wrapping_sub(next)) as i64 as i32;
    s[n] = 0xe9;
    s[n + 1..n + 5].copy_from_slice(&rel.to_le_bytes());
    s
}

/// A 64-bit interrupt gate (type 0xE) to `handler` in the kernel code segment.
fn gate(handler: u64, dpl: u8, ist: u8) -> [u8; 16] {
    let attr = 0x8e | (u64::from(dpl & 3) << 5); // P | DPL | 64-bit interrupt gate
    let lo = (handler & 0xffff)
        | (u64::from(KERNEL_CS) << 16)
        | (u64::from(ist & 7) << 32)
        | (attr << 40)
        | ((handler >> 16) & 0xffff) << 48;
    let hi = handler >> 32;
    let mut g = [0; 16];
    g[..8].copy_from_slice(&lo.to_le_bytes());
    g[8..].copy_from_slice(&hi.to_le_bytes());
    g
}

/// The two GDT slots of an available 64-bit TSS at `base`.
fn tss_descriptor(base: u64, limit: u64) -> [u64; 2] {
    let lo = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | 0x89 << 40 // P | type 9 (available 64-bit TSS)
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    [lo, base >> 32]
}

fn memerr(e: impl std::fmt::Display) -> VmmError {
    VmmError::Memory(format!("probe guest memory: {e}"))
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Kvm(what, e)
}

/// Writes page tables, GDT, IDT, TSS and code into a fresh 64 KiB guest memory.
fn build_memory() -> Result<GuestMemoryMmap, VmmError> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).map_err(memerr)?;
    let put = |addr: u64, bytes: &[u8]| mem.write_slice(bytes, GuestAddress(addr)).map_err(memerr);
    let put64 = |addr: u64, v: u64| put(addr, &v.to_le_bytes());

    // Identity map of pages 1..16 with 4 KiB pages; P | RW | U/S at every level.
    const PTE: u64 = 0x7;
    put64(PML4, PDPT | PTE)?;
    put64(PDPT, PD | PTE)?;
    put64(PD, PT | PTE)?;
    for page in 1..(MEM_SIZE as u64 >> 12) {
        put64(PT + page * 8, (page << 12) | PTE)?;
    }
    put64(PT + (PROBE_PAGE >> 12) * 8, PROBE_PAGE | PTE)?;

    for (i, d) in GDT_ENTRIES.iter().enumerate() {
        put64(GDT + i as u64 * 8, *d)?;
    }
    let [tss_lo, tss_hi] = tss_descriptor(TSS, TSS_LIMIT);
    put64(GDT + u64::from(TSS_SEL), tss_lo)?;
    put64(GDT + u64::from(TSS_SEL) + 8, tss_hi)?;

    // 64-bit TSS: RSP0 at offset 4, IST1 at 36, I/O map base at 102 (past the limit: no map).
    put64(TSS + 4, KERNEL_STACK_TOP)?;
    put64(TSS + 36, DF_STACK_TOP)?;
    put(TSS + 102, &(TSS_LIMIT as u16 + 1).to_le_bytes())?;

    for v in 0..=255u8 {
        let g = match v {
            0x80 => gate(INT80_ENTRY, 3, 0),
            8 => gate(STUBS + 8 * STUB_SIZE, 0, 1),
            _ => gate(STUBS + u64::from(v) * STUB_SIZE, 0, 0),
        };
        put(IDT + u64::from(v) * 16, &g)?;
        put(STUBS + u64::from(v) * STUB_SIZE, &stub(v))?;
    }

    // Fill the code pages with int3 so a stray jump reports #BP instead of running zeros.
    put(KCODE, &[0xcc; 4096])?;
    put(UCODE, &[0xcc; 4096])?;
    put(REPORT_EXCEPTION, REPORT_EXCEPTION_CODE)?;
    put(SYSCALL_ENTRY, SYSCALL_ENTRY_CODE)?;
    put(INT80_ENTRY, INT80_ENTRY_CODE)?;
    put(PRIVILEGE_CHECK, PRIVILEGE_CHECK_CODE)?;
    put(USER_SYSCALL, USER_SYSCALL_CODE)?;
    put(USER_INT80, USER_INT80_CODE)?;
    Ok(mem)
}

fn segment(selector: u16, type_: u8, dpl: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The ring a phase starts in: user for the probe, kernel for self-tests of the handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ring {
    User,
    #[cfg_attr(not(test), allow(dead_code))]
    Kernel,
}

/// A VM with the micro-guest loaded and one vCPU about to run `entry` in `ring`.
/// The memory is returned because it must outlive the VM.
fn build_vm(
    kvm: &Kvm,
    (entry, ring): (u64, Ring),
) -> Result<(kvm_ioctls::VmFd, VcpuFd, GuestMemoryMmap), VmmError> {
    let mem = build_memory()?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(crate::layout::KVM_TSS_ADDR)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    let host = mem.get_host_address(GuestAddress(0)).map_err(memerr)?;
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: `host` is the start of a live MEM_SIZE-byte anonymous mapping owned by `mem`;
    // the caller keeps `mem` alive at least as long as the VM and its vCPU.
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;

    let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;

    let mut s = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let (cs, data) = match ring {
        Ring::User => (
            segment(USER_CS, 0xb, 3, 1, 0),
            segment(USER_DS, 0x3, 3, 0, 1),
        ),
        Ring::Kernel => (
            segment(KERNEL_CS, 0xb, 0, 1, 0),
            segment(KERNEL_DS, 0x3, 0, 0, 1),
        ),
    };
    s.cs = cs;
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.tr = kvm_segment {
        base: TSS,
        limit: TSS_LIMIT as u32,
        selector: TSS_SEL,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.gdt.base = GDT;
    s.gdt.limit = TSS_SEL + 16 - 1;
    s.idt.base = IDT;
    s.idt.limit = 256 * 16 - 1;
    s.cr0 = CR0;
    s.cr3 = PML4;
    s.cr4 = CR4;
    s.efer = EFER;
    vcpu.set_sregs(&s).map_err(kvm_err("KVM_SET_SREGS"))?;

    let entries = [
        (
            MSR_STAR,
            (u64::from(USER_CS32) << 48) | (u64::from(KERNEL_CS) << 32),
        ),
        (MSR_LSTAR, SYSCALL_ENTRY),
        (MSR_CSTAR, SYSCALL_ENTRY),
        (MSR_SFMASK, SFMASK),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| VmmError::Config(format!("probe MSR list: {e:?}")))?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if n != entries.len() {
        return Err(VmmError::Config(format!(
            "KVM_SET_MSRS took {n} of the {} syscall MSRs (MSR {:#x} refused)",
            entries.len(),
            entries[n].index
        )));
    }

    let regs = kvm_bindings::kvm_regs {
        rip: entry,
        rsp: USER_STACK_TOP,
        rflags: START_RFLAGS,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    debug_assert_eq!(KERNEL_DS, KERNEL_CS + 8, "STAR: kernel SS = CS + 8");
    Ok((vm, vcpu, mem))
}

/// How one phase ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The handler passed the privilege check (read CR0).
    Privileged {
        cr0: u32,
    },
    Exception {
        vector: u8,
        error: u32,
        rip: u64,
        saved_cs: u32,
        cr2: u64,
    },
    FellThrough,
    /// A KVM exit that ended the run (triple fault, failed entry, emulation failure, ...).
    Exit(String),
    Timeout,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Phase {
    reached_user: bool,
    /// The handler (LSTAR or the vector-0x80 gate's) ran, with this CS.
    entered_with_cs: Option<u32>,
    outcome: Outcome,
}

/// One decoded report.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Report {
    User,
    /// A handler ran with this CS.
    Entered(u32),
    End(Outcome),
}

/// Turns a report (tag + queued values) into its meaning.
fn decode_report(tag: u32, v: &[u32]) -> Report {
    let q = |lo: u32, hi: u32| u64::from(lo) | u64::from(hi) << 32;
    Report::End(match (tag, v) {
        (TAG_USER, []) => return Report::User,
        (TAG_EXCEPTION, &[vector, error, rip_lo, rip_hi, saved_cs, cr2_lo, cr2_hi, _cs]) => {
            Outcome::Exception {
                vector: vector as u8,
                error,
                rip: q(rip_lo, rip_hi),
                saved_cs,
                cr2: q(cr2_lo, cr2_hi),
            }
        }
        // Extra values: RCX (syscall), the saved CS (int 0x80); kept for debugging the guest.
        (TAG_SYSCALL, &[cs, _, _]) | (TAG_INT80, &[cs, _]) => return Report::Entered(cs),
        (TAG_PRIVILEGED, &[cr0]) => Outcome::Privileged { cr0 },
        (TAG_FELL_THROUGH, []) => Outcome::FellThrough,
        (t, v) => Outcome::Exit(format!("malformed probe report: tag {t}, values {v:x?}")),
    })
}

/// Runs the vCPU until a report ends the phase, a KVM exit stops it, or `stop` is set (the
/// caller then kicks this thread out of KVM_RUN with SIGRTMIN).
fn run_phase(vcpu: &mut VcpuFd, stop: &AtomicBool) -> Phase {
    let mut reached_user = false;
    let mut entered_with_cs = None;
    let mut values: Vec<u32> = Vec::new();
    let outcome = loop {
        if stop.load(Ordering::Acquire) {
            break Outcome::Timeout;
        }
        let report = match vcpu.run() {
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                let word = u32::from_le_bytes(b);
                match addr {
                    PROBE_VALUE if values.len() >= 16 => {
                        break Outcome::Exit(at(vcpu, "more than 16 values in one report"))
                    }
                    PROBE_VALUE => {
                        values.push(word);
                        continue;
                    }
                    PROBE_TAG => Some((word, std::mem::take(&mut values))),
                    _ => break Outcome::Exit(at(vcpu, &format!("stray MMIO write to {addr:#x}"))),
                }
            }
            Ok(VcpuExit::MmioRead(addr, _)) => {
                break Outcome::Exit(at(vcpu, &format!("stray MMIO read from {addr:#x}")))
            }
            Ok(VcpuExit::IoOut(port, _)) => {
                break Outcome::Exit(at(vcpu, &format!("stray out to port {port:#x}")))
            }
            Ok(VcpuExit::Hlt) => break Outcome::Exit(at(vcpu, "hlt without a report")),
            Ok(VcpuExit::Shutdown) => {
                break Outcome::Exit(at(vcpu, "triple fault (KVM_EXIT_SHUTDOWN)"))
            }
            Ok(VcpuExit::FailEntry(reason, _)) => {
                break Outcome::Exit(format!("KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}"))
            }
            Ok(VcpuExit::InternalError) => {
                let (sub, data) = {
                    let run = vcpu.get_kvm_run();
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                    // active member of the exit union.
                    let i = unsafe { run.__bindgen_anon_1.internal };
                    let n = (i.ndata as usize).min(i.data.len()).min(4);
                    (i.suberror, i.data[..n].to_vec())
                };
                let what = if sub == 1 {
                    "emulation failure".to_string()
                } else {
                    format!("suberror {sub}")
                };
                break Outcome::Exit(at(
                    vcpu,
                    &format!("KVM_EXIT_INTERNAL_ERROR ({what}, data {data:x?})"),
                ));
            }
            Ok(other) => break Outcome::Exit(format!("unexpected KVM exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => break Outcome::Exit(format!("KVM_RUN failed: {e}")),
        };
        if let Some((tag, vals)) = report {
            match decode_report(tag, &vals) {
                Report::User => reached_user = true,
                Report::Entered(cs) => entered_with_cs = Some(cs),
                Report::End(o) => break o,
            }
        }
    };
    Phase {
        reached_user,
        entered_with_cs,
        outcome,
    }
}

/// `what` with the vCPU's RIP and CS appended.
fn at(vcpu: &VcpuFd, what: &str) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!("{what} at RIP {:#x}, CS {:#x}", r.rip, s.cs.selector),
        _ => what.to_string(),
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// [`probe_guest_user_space`] with a chosen time limit for the guest.
fn probe_with_limit(limit: Duration) -> Result<UserSpaceProbe, VmmError> {
    let phases = run_phases(
        &[(USER_SYSCALL, Ring::User), (USER_INT80, Ring::User)],
        limit,
    )?;
    Ok(summarize(&phases))
}

/// Runs one fresh micro-guest per entry point (ring 3) in a worker thread, for at most
/// `limit` in all. Returns fewer phases than entries only if the worker could not be made to
/// leave KVM_RUN within a second after the limit (it is then left behind, owning its VMs).
fn run_phases(entries: &[(u64, Ring)], limit: Duration) -> Result<Vec<Phase>, VmmError> {
    let kvm = Kvm::new().map_err(|e| VmmError::KvmUnavailable(format!("/dev/kvm: {e}")))?;
    let vms = entries
        .iter()
        .map(|&e| build_vm(&kvm, e))
        .collect::<Result<Vec<_>, _>>()?;
    // A no-op handler, so that SIGRTMIN only interrupts KVM_RUN (vm.rs installs the same).
    register_signal_handler(SIGRTMIN(), kick_handler)
        .map_err(|e| VmmError::Io("installing the vCPU kick signal".into(), e.into()))?;

    let deadline = Instant::now() + limit;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let worker = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("kvm-probe".into())
            .spawn(move || {
                let mut out = Vec::new();
                // The VMs and memories live in this thread until it ends.
                for (_vm, mut vcpu, _mem) in vms {
                    out.push(run_phase(&mut vcpu, &stop));
                }
                let _ = tx.send(out);
            })
            .map_err(|e| VmmError::Io("spawning the probe vCPU thread".into(), e))?
    };
    let mut result = rx.recv_timeout(limit);
    if matches!(result, Err(RecvTimeoutError::Timeout)) {
        // Out of time: make the worker give up and kick it out of KVM_RUN until it answers.
        stop.store(true, Ordering::Release);
        while Instant::now() < deadline + Duration::from_secs(1) {
            if !worker.is_finished() {
                let _ = worker.kill(SIGRTMIN());
            }
            result = rx.recv_timeout(Duration::from_millis(10));
            if !matches!(result, Err(RecvTimeoutError::Timeout)) {
                break;
            }
        }
    }
    match result {
        Ok(p) => {
            let _ = worker.join();
            Ok(p)
        }
        Err(RecvTimeoutError::Disconnected) => {
            let why = match worker.join() {
                Err(e) => e
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| e.downcast_ref::<String>().cloned())
                    .unwrap_or_default(),
                Ok(()) => String::new(),
            };
            Err(VmmError::Config(format!(
                "the probe vCPU thread died: {why}"
            )))
        }
        // The thread would not leave KVM_RUN; leave it be (it owns its VMs and memory).
        Err(RecvTimeoutError::Timeout) => Ok(Vec::new()),
    }
}

fn vector_name(v: u8) -> String {
    let name = match v {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        21 => "#CP",
        _ => return format!("vector {v:#x}"),
    };
    name.to_string()
}

/// One phase in words, and whether its handler ran in ring 0. `insn` is the address of the
/// `syscall`/`int` instruction, `handler` the address of the handler it should enter.
fn describe(what: &str, p: &Phase, insn: u64, handler: u64, handler_name: &str) -> (bool, String) {
    let where_ = |rip: u64| {
        if rip == handler {
            format!("at {handler_name}")
        } else if rip == insn {
            format!("at the {what} instruction")
        } else if rip == PRIVILEGE_CHECK {
            "at its mov from CR0".to_string()
        } else {
            format!("at {rip:#x}")
        }
    };
    let ok = p.entered_with_cs.is_some() && matches!(p.outcome, Outcome::Privileged { .. });
    let mut text = match p.entered_with_cs {
        Some(cs) if ok && cs & 3 == 0 => format!("reached ring 0 (CS {cs:#x})"),
        Some(cs) if ok => format!("entered {handler_name} with CS {cs:#x} but could read CR0"),
        Some(cs) => {
            // Under kvm_pvm the handler reads the host's user CS (0x33), not ours.
            let note = if cs != u32::from(USER_CS) && cs & 3 != 0 {
                format!(", not the GDT's user CS {USER_CS:#x}")
            } else {
                String::new()
            };
            format!(
                "entered {handler_name} in CPL {} (CS {cs:#x}{note})",
                cs & 3
            )
        }
        None => String::new(),
    };
    let end = match &p.outcome {
        Outcome::Privileged { .. } if p.entered_with_cs.is_some() => String::new(),
        Outcome::Privileged { cr0 } => format!("privileged code ran (CR0 {cr0:#x})"),
        Outcome::Exception {
            vector,
            error,
            rip,
            saved_cs,
            cr2,
        } => {
            let mut s = format!(
                "{} {} from CPL {}",
                vector_name(*vector),
                where_(*rip),
                saved_cs & 3
            );
            if has_error_code(*vector) {
                s.push_str(&format!(", error {error:#x}"));
            }
            if *vector == 14 {
                s.push_str(&format!(", CR2 {cr2:#x}"));
            }
            s
        }
        Outcome::FellThrough => "returned to ring 3 without entering a handler".into(),
        Outcome::Exit(e) => e.clone(),
        Outcome::Timeout => "no report within the time limit".into(),
    };
    if !end.is_empty() {
        if !text.is_empty() {
            text.push_str(", then ");
        }
        text.push_str(&end);
    }
    let text = if p.reached_user {
        format!("{what}: {text}")
    } else {
        format!("{what}: never reached user mode: {text}")
    };
    (ok, text)
}

fn summarize(phases: &[Phase]) -> UserSpaceProbe {
    let (Some(sys), Some(i80)) = (phases.first(), phases.get(1)) else {
        return UserSpaceProbe {
            reached_user_mode: false,
            syscall_works: false,
            int80_works: false,
            detail: "the probe vCPU could not be stopped at the time limit".into(),
        };
    };
    let (syscall_works, s) = describe("syscall", sys, USER_SYSCALL_INSN, SYSCALL_ENTRY, "LSTAR");
    let (int80_works, i) = describe(
        "int $0x80",
        i80,
        USER_INT80_INSN,
        INT80_ENTRY,
        "the int $0x80 handler",
    );
    UserSpaceProbe {
        reached_user_mode: sys.reached_user && i80.reached_user,
        syscall_works: syscall_works && sys.reached_user,
        int80_works: int80_works && i80.reached_user,
        detail: format!("{s}; {i}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stubs_jump_to_the_reporter() {
        // #PF (error code pushed by the CPU): push 14; jmp rel32.
        let s = stub(14);
        assert_eq!(&s[..3], &[0x6a, 14, 0xe9]);
        let rel = i32::from_le_bytes(s[3..7].try_into().unwrap());
        assert_eq!(
            (STUBS + 14 * STUB_SIZE + 7).wrapping_add(rel as i64 as u64),
            REPORT_EXCEPTION
        );
        // #UD: push 0; push 6; jmp rel32.
        let s = stub(6);
        assert_eq!(&s[..5], &[0x6a, 0, 0x6a, 6, 0xe9]);
        let rel = i32::from_le_bytes(s[5..9].try_into().unwrap());
        assert_eq!(
            (STUBS + 6 * STUB_SIZE + 9).wrapping_add(rel as i64 as u64),
            REPORT_EXCEPTION
        );
    }

    #[test]
    fn gate_and_tss_encoding() {
        let g = gate(0x1234_5678_9abc_def0, 3, 1);
        assert_eq!(
            u64::from_le_bytes(g[..8].try_into().unwrap()),
            0x9abc_ee01_0008_def0
        );
        assert_eq!(u64::from_le_bytes(g[8..].try_into().unwrap()), 0x1234_5678);
        assert_eq!(tss_descriptor(0x7000, 0x67), [0x0000_8900_7000_0067, 0]);
    }

    #[test]
    fn code_addresses_match_the_layout() {
        // The `syscall`/`int` instruction sits after mov edx, mov eax, mov [rdx] (12 bytes).
        assert_eq!(&USER_SYSCALL_CODE[12..14], &[0x0f, 0x05]);
        assert_eq!(USER_SYSCALL_INSN - USER_SYSCALL, 12);
        assert_eq!(&USER_INT80_CODE[12..14], &[0xcd, 0x80]);
        assert_eq!(USER_INT80_INSN - USER_INT80, 12);
        assert!(REPORT_EXCEPTION + (REPORT_EXCEPTION_CODE.len() as u64) <= SYSCALL_ENTRY);
        assert!(SYSCALL_ENTRY + (SYSCALL_ENTRY_CODE.len() as u64) <= INT80_ENTRY);
        assert!(INT80_ENTRY + (INT80_ENTRY_CODE.len() as u64) <= PRIVILEGE_CHECK);
        // Both handlers end with a `jmp rel8` to the privilege check.
        for (code, at) in [
            (SYSCALL_ENTRY_CODE, SYSCALL_ENTRY),
            (INT80_ENTRY_CODE, INT80_ENTRY),
        ] {
            let end = at + code.len() as u64;
            assert_eq!(code[code.len() - 2], 0xeb);
            assert_eq!(end + u64::from(code[code.len() - 1]), PRIVILEGE_CHECK);
        }
        assert!(USER_SYSCALL + (USER_SYSCALL_CODE.len() as u64) <= USER_INT80);
        // Addresses and tags baked into the code bytes.
        let imm32 =
            |c: &[u8], at: usize| u64::from(u32::from_le_bytes(c[at..at + 4].try_into().unwrap()));
        assert_eq!(imm32(REPORT_EXCEPTION_CODE, 1), PROBE_VALUE);
        assert_eq!(imm32(REPORT_EXCEPTION_CODE, 0x36), PROBE_TAG);
        assert_eq!(imm32(REPORT_EXCEPTION_CODE, 0x3b), u64::from(TAG_EXCEPTION));
        assert_eq!(imm32(SYSCALL_ENTRY_CODE, 1), PROBE_VALUE);
        assert_eq!(imm32(SYSCALL_ENTRY_CODE, 0x15), PROBE_TAG);
        assert_eq!(imm32(SYSCALL_ENTRY_CODE, 0x1a), u64::from(TAG_SYSCALL));
        assert_eq!(imm32(INT80_ENTRY_CODE, 1), PROBE_VALUE);
        assert_eq!(imm32(INT80_ENTRY_CODE, 0x11), PROBE_TAG);
        assert_eq!(imm32(INT80_ENTRY_CODE, 0x16), u64::from(TAG_INT80));
        assert_eq!(imm32(PRIVILEGE_CHECK_CODE, 4), PROBE_VALUE);
        assert_eq!(imm32(PRIVILEGE_CHECK_CODE, 0xb), PROBE_TAG);
        assert_eq!(imm32(PRIVILEGE_CHECK_CODE, 0x10), u64::from(TAG_PRIVILEGED));
        for user in [USER_SYSCALL_CODE, USER_INT80_CODE] {
            assert_eq!(imm32(user, 1), PROBE_TAG);
            assert_eq!(imm32(user, 6), u64::from(TAG_USER));
            assert_eq!(imm32(user, 15), u64::from(TAG_FELL_THROUGH));
        }
    }

    fn phase(entered_with_cs: Option<u16>, outcome: Outcome) -> Phase {
        Phase {
            reached_user: true,
            entered_with_cs: entered_with_cs.map(u32::from),
            outcome,
        }
    }

    fn exception(vector: u8, error: u32, rip: u64, cr2: u64) -> Outcome {
        Outcome::Exception {
            vector,
            error,
            rip,
            saved_cs: u32::from(USER_CS),
            cr2,
        }
    }

    #[test]
    fn details_read_well() {
        // What Linux saw on kvm_pvm.
        let p = summarize(&[
            phase(None, exception(14, 0xf, SYSCALL_ENTRY, SYSCALL_ENTRY)),
            phase(None, exception(6, 0, USER_INT80_INSN, 0)),
        ]);
        assert!(p.reached_user_mode && !p.syscall_works && !p.int80_works);
        assert_eq!(
            p.detail,
            "syscall: #PF at LSTAR from CPL 3, error 0xf, CR2 0x8080; \
             int $0x80: #UD at the int $0x80 instruction from CPL 3"
        );
        // What this probe sees on kvm_pvm.
        let p = summarize(&[
            phase(Some(0x33), exception(13, 0, PRIVILEGE_CHECK, 0)),
            phase(None, exception(6, 0, USER_INT80_INSN, 0)),
        ]);
        assert!(p.reached_user_mode && !p.syscall_works && !p.int80_works);
        assert_eq!(
            p.detail,
            "syscall: entered LSTAR in CPL 3 (CS 0x33, not the GDT's user CS 0x2b), then #GP \
             at its mov from CR0 from CPL 3, error 0x0; \
             int $0x80: #UD at the int $0x80 instruction from CPL 3"
        );
        // Ordinary KVM.
        let ok = || phase(Some(KERNEL_CS), Outcome::Privileged { cr0: 0x8001_0031 });
        let p = summarize(&[ok(), ok()]);
        assert!(p.syscall_works && p.int80_works);
        assert_eq!(
            p.detail,
            "syscall: reached ring 0 (CS 0x8); int $0x80: reached ring 0 (CS 0x8)"
        );
    }

    fn require_all() -> bool {
        std::env::var("VIRIDIAN_REQUIRE_ALL").as_deref() == Ok("1")
    }

    /// On a host with /dev/kvm the probe must reach ring 3, and its answer about system calls
    /// must match what we know: they fail under `kvm_pvm` (VMM.md, first section) and work on
    /// ordinary KVM.
    #[test]
    fn probe_matches_the_host() {
        let start = Instant::now();
        let p = match probe_guest_user_space() {
            Ok(p) => p,
            Err(VmmError::KvmUnavailable(why)) => {
                assert!(
                    !require_all(),
                    "VIRIDIAN_REQUIRE_ALL=1 but KVM is unavailable: {why}"
                );
                eprintln!("skipped: KVM is not available: {why}");
                return;
            }
            Err(e) => panic!("probe failed: {e}"),
        };
        let took = start.elapsed();
        eprintln!("probe ({took:?}): {p:?}");
        assert!(
            p.reached_user_mode,
            "micro-guest never ran ring 3: {}",
            p.detail
        );
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            assert!(
                !p.syscall_works,
                "syscall works under kvm_pvm?: {}",
                p.detail
            );
            assert!(p.detail.starts_with("syscall: "), "{}", p.detail);
        } else {
            assert!(p.syscall_works, "syscall fails on plain KVM: {}", p.detail);
            assert!(p.int80_works, "int $0x80 fails on plain KVM: {}", p.detail);
        }
        assert!(took < Duration::from_millis(500), "probe took {took:?}");
    }

    /// A guest that spins in ring 3 without exits is stopped at the time limit.
    #[test]
    fn a_spinning_guest_is_stopped() {
        let spin = USER_SYSCALL + USER_SYSCALL_CODE.len() as u64 - 2; // the final `jmp 1b`
        let start = Instant::now();
        let phases = match run_phases(&[(spin, Ring::User); 2], Duration::from_millis(200)) {
            Ok(p) => p,
            Err(VmmError::KvmUnavailable(why)) => {
                assert!(
                    !require_all(),
                    "VIRIDIAN_REQUIRE_ALL=1 but KVM is unavailable: {why}"
                );
                eprintln!("skipped: KVM is not available: {why}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let took = start.elapsed();
        let timeout = Phase {
            reached_user: false,
            entered_with_cs: None,
            outcome: Outcome::Timeout,
        };
        assert_eq!(phases, vec![timeout.clone(), timeout]);
        assert!(took < Duration::from_millis(700), "took {took:?}");
    }

    /// Positive control for hosts where `syscall` fails: entered directly in ring 0, the
    /// handlers and the privilege check must report success. This proves the probe's ring-0
    /// path works, so a failure in the real probe is the host's.
    #[test]
    fn handlers_work_when_entered_in_ring_0() {
        let phases = match run_phases(
            &[(SYSCALL_ENTRY, Ring::Kernel), (INT80_ENTRY, Ring::Kernel)],
            PROBE_TIME_LIMIT,
        ) {
            Ok(p) => p,
            Err(VmmError::KvmUnavailable(why)) => {
                assert!(
                    !require_all(),
                    "VIRIDIAN_REQUIRE_ALL=1 but KVM is unavailable: {why}"
                );
                eprintln!("skipped: KVM is not available: {why}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        for p in &phases {
            assert_eq!(p.entered_with_cs, Some(u32::from(KERNEL_CS)), "{p:?}");
            assert!(
                matches!(p.outcome, Outcome::Privileged { cr0 } if u64::from(cr0) == CR0),
                "{p:?}"
            );
        }
        assert_eq!(phases.len(), 2);
    }

    #[test]
    fn malformed_reports_are_not_trusted() {
        assert!(matches!(
            decode_report(TAG_SYSCALL, &[8]),
            Report::End(Outcome::Exit(_))
        ));
        assert!(matches!(
            decode_report(TAG_USER, &[1]),
            Report::End(Outcome::Exit(_))
        ));
        assert_eq!(decode_report(TAG_USER, &[]), Report::User);
        assert_eq!(decode_report(TAG_SYSCALL, &[8, 1, 0]), Report::Entered(8));
        assert_eq!(
            decode_report(TAG_PRIVILEGED, &[0x31]),
            Report::End(Outcome::Privileged { cr0: 0x31 })
        );
    }
}

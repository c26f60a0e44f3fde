//! The probe's micro-guest: 64 KiB of memory holding page tables, a GDT with kernel and user
//! segments in the order `STAR` needs, a TSS, an IDT whose every gate reports its exception,
//! and hand-assembled ring-0 and ring-3 code, plus the CPU state it starts with. It reports to
//! the VMM with 32-bit stores to an MMIO page (see [`PROBE_PAGE`]).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::FlatSegment;
use crate::VmmError;

// ---- Guest physical (= virtual) layout: 16 pages, page 0 left unmapped. ----

pub(super) const MEM_SIZE: usize = 0x1_0000;
pub(super) const PML4: u64 = 0x1000;
pub(super) const PDPT: u64 = 0x2000;
pub(super) const PD: u64 = 0x3000;
pub(super) const PT: u64 = 0x4000;
pub(super) const GDT: u64 = 0x5000;
pub(super) const IDT: u64 = 0x6000;
pub(super) const TSS: u64 = 0x7000;
/// Ring-0 code: exception reporter, LSTAR handler, `int $0x80` handler, privilege check.
pub(super) const KCODE: u64 = 0x8000;
pub(super) const REPORT_EXCEPTION: u64 = KCODE;
pub(super) const SYSCALL_ENTRY: u64 = KCODE + 0x80;
pub(super) const INT80_ENTRY: u64 = KCODE + 0xc0;
pub(super) const PRIVILEGE_CHECK: u64 = KCODE + 0x100;
/// 256 exception stubs of 16 bytes, one per vector.
pub(super) const STUBS: u64 = 0x9000;
pub(super) const STUB_SIZE: u64 = 16;
/// Ring-3 code: the `syscall` phase at `UCODE`, the `int $0x80` phase at `UCODE + 0x40`.
pub(super) const UCODE: u64 = 0xa000;
pub(super) const USER_SYSCALL: u64 = UCODE;
/// Address of the `syscall` instruction (after `mov edx; mov eax; mov [rdx], eax`).
pub(super) const USER_SYSCALL_INSN: u64 = USER_SYSCALL + 0xc;
pub(super) const USER_INT80: u64 = UCODE + 0x40;
pub(super) const USER_INT80_INSN: u64 = USER_INT80 + 0xc;
pub(super) const USER_STACK_TOP: u64 = 0xc000;
/// TSS.RSP0: the stack the CPU switches to on an exception or `int` from ring 3.
pub(super) const KERNEL_STACK_TOP: u64 = 0xd000;
/// TSS.IST1, used by the #DF gate.
pub(super) const DF_STACK_TOP: u64 = 0xe000;

// ---- GDT. `STAR` needs kernel CS, kernel SS = CS + 8 and, for `sysret`, user CS32, user
// SS = CS32 + 8, user CS64 = CS32 + 16 in this order. ----

pub(super) const KERNEL_CODE: FlatSegment = FlatSegment::new(0x08, 0xb, 0, 1, 0);
pub(super) const KERNEL_DATA: FlatSegment = FlatSegment::new(0x10, 0x3, 0, 0, 1);
/// Only named by `STAR` (for `sysret` to 32-bit code, which the probe never does).
pub(super) const USER_CODE32: FlatSegment = FlatSegment::new(0x18, 0xb, 3, 0, 1);
pub(super) const USER_DATA: FlatSegment = FlatSegment::new(0x20 | 3, 0x3, 3, 0, 1);
pub(super) const USER_CODE: FlatSegment = FlatSegment::new(0x28 | 3, 0xb, 3, 1, 0);
/// Every code and data segment of the GDT (slot = selector / 8; slot 0 is the null one).
pub(super) const GDT_SEGMENTS: [FlatSegment; 5] =
    [KERNEL_CODE, KERNEL_DATA, USER_CODE32, USER_DATA, USER_CODE];

pub(super) const KERNEL_CS: u16 = KERNEL_CODE.selector;
pub(super) const KERNEL_DS: u16 = KERNEL_DATA.selector;
pub(super) const USER_CS32: u16 = USER_CODE32.selector;
pub(super) const USER_CS: u16 = USER_CODE.selector;
/// The TSS's two slots follow the segments.
pub(super) const TSS_SEL: u16 = 0x30;
pub(super) const TSS_LIMIT: u64 = 0x67;

pub(super) const MSR_EFER_SCE: u64 = 1;
pub(super) const EFER: u64 = MSR_EFER_SCE | 0x100 | 0x400; // SCE | LME | LMA
pub(super) const CR0: u64 = 0x8001_0031; // PG | WP | NE | ET | PE
pub(super) const CR4: u64 = 0x20; // PAE
pub(super) const MSR_STAR: u32 = 0xc000_0081;
pub(super) const MSR_LSTAR: u32 = 0xc000_0082;
pub(super) const MSR_CSTAR: u32 = 0xc000_0083;
pub(super) const MSR_SFMASK: u32 = 0xc000_0084;
/// RFLAGS bits `syscall` clears: TF, IF, DF, NT, AC.
pub(super) const SFMASK: u64 = 0x4_4700;
/// RFLAGS at the start: only the always-one bit 1 (IF clear, IOPL 0 as in a Linux process).
pub(super) const START_RFLAGS: u64 = 0x2;

// ---- Probe registers and report tags. ----

/// The probe's MMIO page: mapped in the guest page tables (U/S), backed by no memory slot, so
/// every 32-bit store to it is a KVM MMIO exit. A store to [`PROBE_VALUE`] queues a value, a
/// store to [`PROBE_TAG`] ends a report. MMIO rather than `out`, because on `kvm_pvm` hosts a
/// ring-3 `out` raises #GP even with IOPL 3 (measured), and ring-3 code must report too.
pub(super) const PROBE_PAGE: u64 = MEM_SIZE as u64;
pub(super) const PROBE_TAG: u64 = PROBE_PAGE;
pub(super) const PROBE_VALUE: u64 = PROBE_PAGE + 4;
/// Ring 3 ran (no values).
pub(super) const TAG_USER: u32 = 1;
/// An exception (values: vector, error code, RIP low, RIP high, saved CS, CR2 low, CR2 high,
/// the handler's CS).
pub(super) const TAG_EXCEPTION: u32 = 2;
/// The LSTAR handler ran (values: its CS, RCX low, RCX high); the privilege check follows.
pub(super) const TAG_SYSCALL: u32 = 3;
/// The `int $0x80` handler ran (values: its CS, saved CS); the privilege check follows.
pub(super) const TAG_INT80: u32 = 4;
/// The instruction after `syscall`/`int $0x80` ran in ring 3 without any handler (no values).
pub(super) const TAG_FELL_THROUGH: u32 = 5;
/// The handler read CR0, which only ring 0 may (values: CR0 low).
pub(super) const TAG_PRIVILEGED: u32 = 6;

// ---- Hand-assembled guest code (bytes checked with GNU as + objdump). ----

/// At [`REPORT_EXCEPTION`]; every stub jumps here with `[rsp]` = vector, `[rsp+8]` = error
/// code (0 when the CPU pushed none), then the CPU's frame: RIP, CS, RFLAGS, RSP, SS.
#[rustfmt::skip]
pub(super) const REPORT_EXCEPTION_CODE: &[u8] = &[
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
pub(super) const SYSCALL_ENTRY_CODE: &[u8] = &[
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
pub(super) const INT80_ENTRY_CODE: &[u8] = &[
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
pub(super) const PRIVILEGE_CHECK_CODE: &[u8] = &[
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
pub(super) const USER_SYSCALL_CODE: &[u8] = &[
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
pub(super) const USER_INT80_CODE: &[u8] = &[
    0xba, 0x00, 0x00, 0x01, 0x00, // mov edx, PROBE_TAG
    0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, TAG_USER
    0x89, 0x02,                   // mov [rdx], eax
    0xcd, 0x80,                   // int 0x80              ; at USER_INT80_INSN
    0xb8, 0x05, 0x00, 0x00, 0x00, // mov eax, TAG_FELL_THROUGH
    0x89, 0x02,                   // mov [rdx], eax
    0xeb, 0xfe,                   // 1: jmp 1b
];

/// Vectors for which the CPU pushes an error code.
pub(super) fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// The 16-byte stub for `vector` at `STUBS + vector * 16`: pushes a zero error code where the
/// CPU pushes none, pushes the vector and jumps to the reporter. Padded with `int3`.
pub(super) fn stub(vector: u8) -> [u8; STUB_SIZE as usize] {
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
pub(super) fn gate(handler: u64, dpl: u8, ist: u8) -> [u8; 16] {
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
pub(super) fn tss_descriptor(base: u64, limit: u64) -> [u64; 2] {
    let lo = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | 0x89 << 40 // P | type 9 (available 64-bit TSS)
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    [lo, base >> 32]
}

pub(super) fn memerr(e: impl std::fmt::Display) -> VmmError {
    VmmError::Memory(format!("probe guest memory: {e}"))
}

/// Writes page tables, GDT, IDT, TSS and code into a fresh 64 KiB guest memory.
pub(super) fn build_memory() -> Result<GuestMemoryMmap, VmmError> {
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

    for seg in GDT_SEGMENTS {
        put64(GDT + u64::from(seg.selector & !7), seg.descriptor())?;
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
}

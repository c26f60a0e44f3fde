//! Running the micro-guest: one fresh VM per phase, its vCPU started at an entry point in
//! ring 3 (or ring 0 for self-tests), reports decoded as they arrive, and a time limit
//! enforced by kicking the vCPU thread out of KVM_RUN.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, kvm_segment, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::guest::*;
use crate::VmmError;

pub(super) fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Kvm(what, e)
}

/// The ring a phase starts in: user for the probe, kernel for self-tests of the handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ring {
    User,
    #[cfg_attr(not(test), allow(dead_code))]
    Kernel,
}

/// A VM with the micro-guest loaded and one vCPU about to run `entry` in `ring`.
/// The memory is returned because it must outlive the VM.
pub(super) fn build_vm(
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
        Ring::User => (USER_CODE.register(), USER_DATA.register()),
        Ring::Kernel => (KERNEL_CODE.register(), KERNEL_DATA.register()),
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
pub(super) enum Outcome {
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
pub(super) struct Phase {
    pub(super) reached_user: bool,
    /// The handler (LSTAR or the vector-0x80 gate's) ran, with this CS.
    pub(super) entered_with_cs: Option<u32>,
    pub(super) outcome: Outcome,
}

/// One decoded report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Report {
    User,
    /// A handler ran with this CS.
    Entered(u32),
    End(Outcome),
}

/// Turns a report (tag + queued values) into its meaning.
pub(super) fn decode_report(tag: u32, v: &[u32]) -> Report {
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
pub(super) fn run_phase(vcpu: &mut VcpuFd, stop: &AtomicBool) -> Phase {
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
pub(super) fn at(vcpu: &VcpuFd, what: &str) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!("{what} at RIP {:#x}, CS {:#x}", r.rip, s.cs.selector),
        _ => what.to_string(),
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Runs one fresh micro-guest per entry point (ring 3) in a worker thread, for at most
/// `limit` in all. Returns fewer phases than entries only if the worker could not be made to
/// leave KVM_RUN within a second after the limit (it is then left behind, owning its VMs).
pub(super) fn run_phases(entries: &[(u64, Ring)], limit: Duration) -> Result<Vec<Phase>, VmmError> {
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

#[cfg(test)]
mod tests {
    use super::super::tests::ok_or_skip;
    use super::super::PROBE_TIME_LIMIT;
    use super::*;

    /// A guest that spins in ring 3 without exits is stopped at the time limit.
    #[test]
    fn a_spinning_guest_is_stopped() {
        let spin = USER_SYSCALL + USER_SYSCALL_CODE.len() as u64 - 2; // the final `jmp 1b`
        let start = Instant::now();
        let Some(phases) = ok_or_skip(run_phases(
            &[(spin, Ring::User); 2],
            Duration::from_millis(200),
        )) else {
            return;
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
        let Some(phases) = ok_or_skip(run_phases(
            &[(SYSCALL_ENTRY, Ring::Kernel), (INT80_ENTRY, Ring::Kernel)],
            PROBE_TIME_LIMIT,
        )) else {
            return;
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

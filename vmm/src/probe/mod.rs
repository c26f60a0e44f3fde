//! Can this host's KVM run guest user space that makes system calls?
//!
//! On our nested test hosts (`kvm_pvm`, docs/vmm.md, "Test hosts") guest ring-3 code runs, but a
//! 64-bit `syscall` from ring 3 faults at the LSTAR address still in user mode and `int $0x80`
//! raises #UD, so no Linux init program can run there. On ordinary hardware KVM both work.
//! [`probe_guest_user_space`] finds out which case this is in a few milliseconds, without
//! booting Linux: it builds a micro-guest (64 KiB of RAM, long mode, a GDT with kernel and
//! user segments in the layout `STAR` needs, a TSS, an IDT that reports every exception), starts
//! the vCPU directly in ring 3 and lets it execute `syscall` (first VM) and `int $0x80` (second
//! VM). Each handler reports the CS it runs with and then reads CR0, which only ring 0 may: a
//! call "works" when that read succeeds. All guest code is hand-assembled (in `guest`); it
//! reports to the VMM with 32-bit stores to an MMIO page: a store to `PROBE_VALUE` queues a
//! value, a store to `PROBE_TAG` ends a report whose meaning the tag gives (`TAG_*`); the
//! queued values belong to it.
//!
//! Measured on a `kvm_pvm` host: "syscall: entered LSTAR in CPL 3 (CS 0x33, not the GDT's user
//! CS 0x2b), then #GP at its mov from CR0 from CPL 3, error 0x0; int $0x80: #UD at the int
//! $0x80 instruction from CPL 3" (0x33 is the host's own user CS: the handler ran natively in
//! host ring 3). A ring-3 `out` there raises #GP even with IOPL 3, hence MMIO.
//!
//! Parts: `guest` is the micro-guest itself (memory layout, descriptor tables, hand-assembled
//! code, the report protocol), `run` builds a VM around it and runs it with a time limit, and
//! `report` turns what each phase did into the answer and its one-line description.

mod guest;
mod report;
mod run;

use std::time::Duration;

use crate::VmmError;
use guest::{USER_INT80, USER_SYSCALL};
use run::Ring;

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

/// [`probe_guest_user_space`] with a chosen time limit for the guest.
fn probe_with_limit(limit: Duration) -> Result<UserSpaceProbe, VmmError> {
    let phases = run::run_phases(
        &[(USER_SYSCALL, Ring::User), (USER_INT80, Ring::User)],
        limit,
    )?;
    Ok(report::summarize(&phases))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// The result of a run that needs KVM; None (after saying so) when KVM is unavailable,
    /// which fails instead under VIRIDIAN_REQUIRE_ALL=1.
    pub(super) fn ok_or_skip<T>(r: Result<T, VmmError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(VmmError::KvmUnavailable(why)) => {
                assert!(
                    !require_all(),
                    "VIRIDIAN_REQUIRE_ALL=1 but KVM is unavailable: {why}"
                );
                eprintln!("skipped: KVM is not available: {why}");
                None
            }
            Err(e) => panic!("probe failed: {e}"),
        }
    }

    pub(super) fn require_all() -> bool {
        std::env::var("VIRIDIAN_REQUIRE_ALL").as_deref() == Ok("1")
    }

    /// On a host with /dev/kvm the probe must reach ring 3, and its answer about system calls
    /// must match what we know: they fail under `kvm_pvm` (docs/vmm.md, "Test hosts") and work on
    /// ordinary KVM.
    #[test]
    fn probe_matches_the_host() {
        let start = Instant::now();
        let Some(p) = ok_or_skip(probe_guest_user_space()) else {
            return;
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
}

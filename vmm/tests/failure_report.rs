//! When the guest dies, `vmm::run` returns a report with the exit reason, the registers, the
//! instruction bytes at RIP and the console tail. A tiny ELF "kernel" whose first instruction
//! is `ud2` (no IDT, so #UD escalates to a triple fault) must fail fast with a report that
//! points at that instruction; a Linux guest stopped by the time limit must report its vCPU
//! state and the console lines it printed.

mod common;

use std::time::Duration;

use common::{kernel_or_skip, prerequisites};

#[test]
fn a_guest_that_dies_reports_rip_code_bytes_and_reason() {
    if prerequisites(&[]).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("ud2.elf");
    // ud2; then bytes that must show up after it in the report.
    std::fs::write(
        &kernel,
        common::elf_executable(0x10_0000, &[0x0f, 0x0b, 0xf4, 0x90, 0x90]),
    )
    .unwrap();
    let mut cfg = vmm::VmConfig::new(&kernel);
    cfg.memory = 64 << 20;
    cfg.console = vmm::Console::Null;
    cfg.timeout = Some(Duration::from_secs(60));
    let started = std::time::Instant::now();
    let report = match vmm::run(cfg) {
        Err(vmm::VmmError::Guest(r)) => r,
        Err(vmm::VmmError::KvmUnavailable(why)) => {
            common::skip(&why);
            return;
        }
        other => panic!("expected a guest failure, got {other:?}"),
    };
    let text = report.to_string();
    eprintln!("{text}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(report.reason, vmm::StopReason::Failure(_)),
        "{:?}",
        report.reason
    );
    assert_eq!(report.vcpus.len(), 1, "{text}");
    assert!(text.contains("RIP="), "{text}");
    assert!(text.contains("CR0="), "{text}");
    assert!(text.contains("code at RIP:"), "{text}");
    assert!(text.contains("last console lines:"), "{text}");
    assert!(text.contains("triple fault"), "{text}");
    // The faulting instruction: RIP at the entry, and its bytes as they are in guest memory.
    let v = &report.vcpus[0];
    assert_eq!(v.regs.rip, 0x10_0000, "{text}");
    assert!(v.code.starts_with(&[0x0f, 0x0b, 0xf4, 0x90]), "{text}");
    assert!(text.contains("code at RIP: 0f 0b f4 90"), "{text}");
}

#[test]
fn a_linux_guest_past_its_time_limit_reports_state_and_console() {
    if prerequisites(&[]).is_none() {
        return;
    }
    let Some(kernel) = kernel_or_skip() else {
        return;
    };
    let mut cfg = vmm::VmConfig::new(&kernel);
    cfg.memory = 64 << 20;
    cfg.console = vmm::Console::Null;
    cfg.timeout = Some(Duration::from_secs(4));
    let report = match vmm::run(cfg) {
        Err(vmm::VmmError::Guest(r)) => r,
        other => panic!("expected the time limit, got {other:?}"),
    };
    let text = report.to_string();
    assert_eq!(report.reason, vmm::StopReason::Timeout, "{text}");
    assert!(text.contains("time limit reached"), "{text}");
    assert!(
        report
            .console_tail
            .iter()
            .any(|l| l.contains("Linux version")),
        "{text}"
    );
    assert!(
        report.milestones.iter().any(|m| m.name == "kernel-started"),
        "{text}"
    );
    assert_eq!(report.vcpus.len(), 1, "{text}");
    assert!(
        text.contains("RIP=0xffffffff8"),
        "not in the kernel: {text}"
    );
}

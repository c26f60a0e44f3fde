//! The vCPU run loop: port I/O (serial, hypercall port, CMOS, reset, poweroff), synthetic MSR
//! exits, resumable emulation failures, and the register snapshot for failure reports.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_regs, kvm_sregs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::acpi::{SLEEP_CONTROL_PORT, SLEEP_ENABLE};
use crate::console::{SerialPort, StopReason, StopSignal, COM1_BASE};
use crate::decode::{classify, Fixup, Gprs};
use crate::events::EventLog;
use crate::hv::{lock, Hv, MsrResult, HYPERCALL_PORT};
use crate::memory::GuestRam;

/// KVM_INTERNAL_ERROR_EMULATION
const INTERNAL_ERROR_EMULATION: u32 = 1;
/// Give up when the same RIP fails this many times in a row.
const MAX_SAME_RIP_FIXUPS: u32 = 64;

/// State shared by all vCPU threads.
pub struct Shared {
    pub ram: Arc<GuestRam>,
    pub hv: Arc<Hv>,
    pub serial: Arc<SerialPort>,
    pub stop: Arc<StopSignal>,
    pub events: Arc<EventLog>,
    pub cmos: Mutex<Cmos>,
    pub snapshots: Mutex<Vec<VcpuSnapshot>>,
    pub exits: AtomicU64,
    pub fixups: AtomicU64,
    /// Set by the main thread (trace mode) to have vCPUs log RIP at their next kick.
    pub sample: std::sync::atomic::AtomicBool,
    /// `stop`/`cont` from the control socket.
    pub pause: Arc<PauseGate>,
}

/// Holds the vCPUs outside KVM_RUN while the VM is paused.
#[derive(Debug, Default)]
pub struct PauseGate {
    /// Fast path for every vCPU exit: no lock unless a pause was asked for.
    requested: std::sync::atomic::AtomicBool,
    state: Mutex<PauseState>,
    cv: std::sync::Condvar,
    /// The vCPU threads, to kick out of KVM_RUN.
    threads: Mutex<Vec<libc::pthread_t>>,
}

#[derive(Debug, Default)]
struct PauseState {
    paused: bool,
    /// vCPUs waiting at the gate.
    parked: usize,
}

impl PauseGate {
    pub fn set_threads(&self, t: Vec<libc::pthread_t>) {
        *crate::hv::lock(&self.threads) = t;
    }

    pub fn paused(&self) -> bool {
        crate::hv::lock(&self.state).paused
    }

    /// Pauses the vCPUs and waits (at most `wait`) until every one of them has left KVM_RUN;
    /// false when some did not in time (they still stop at their next exit).
    pub fn pause(&self, stop: &StopSignal, wait: Duration) -> bool {
        crate::hv::lock(&self.state).paused = true;
        self.requested.store(true, Ordering::Release);
        let threads = crate::hv::lock(&self.threads).clone();
        let deadline = Instant::now() + wait;
        let mut st = crate::hv::lock(&self.state);
        while st.parked < threads.len() && !stop.stopped() {
            for &t in &threads {
                // SAFETY: the vCPU threads are joined only after the control socket's thread
                // (the only caller) has been joined, so each id is still a live or unjoined
                // thread; the signal has a no-op handler and only interrupts KVM_RUN.
                unsafe { libc::pthread_kill(t, vmm_sys_util::signal::SIGRTMIN()) };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .cv
                .wait_timeout(st, left.min(Duration::from_millis(10)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    pub fn resume(&self) {
        crate::hv::lock(&self.state).paused = false;
        self.requested.store(false, Ordering::Release);
        self.cv.notify_all();
    }

    /// Called by a vCPU before entering the guest: waits while paused (or until the VM stops).
    fn gate(&self, stop: &StopSignal) {
        if !self.requested.load(Ordering::Acquire) {
            return;
        }
        let mut st = crate::hv::lock(&self.state);
        if !st.paused {
            return;
        }
        st.parked += 1;
        self.cv.notify_all();
        while st.paused && !stop.stopped() {
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.parked -= 1;
    }
}

/// Registers and code bytes of a vCPU when it stopped.
#[derive(Debug, Clone, Default)]
pub struct VcpuSnapshot {
    pub vp: u32,
    /// What made this vCPU stop (exit reason, suberror).
    pub exit: String,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// Up to 16 bytes at RIP (fewer when unmapped).
    pub code: Vec<u8>,
}

impl fmt::Display for VcpuSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.regs;
        let s = &self.sregs;
        writeln!(f, "vCPU {}: {}", self.vp, self.exit)?;
        writeln!(
            f,
            "  RIP={:#018x} RSP={:#018x} RFLAGS={:#x} CS={:#x}",
            r.rip, r.rsp, r.rflags, s.cs.selector
        )?;
        writeln!(
            f,
            "  CR0={:#x} CR2={:#x} CR3={:#x} CR4={:#x} EFER={:#x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        )?;
        writeln!(
            f,
            "  RAX={:#x} RBX={:#x} RCX={:#x} RDX={:#x} RSI={:#x} RDI={:#x} RBP={:#x}",
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
        )?;
        let code: Vec<String> = self.code.iter().map(|b| format!("{b:02x}")).collect();
        write!(
            f,
            "  code at RIP: {}",
            if code.is_empty() {
                "(not readable)".to_string()
            } else {
                code.join(" ")
            }
        )
    }
}

/// Read-only CMOS clock (BCD, 24-hour) so the guest's wall clock starts at host time.
#[derive(Debug, Default)]
pub struct Cmos {
    index: u8,
}

impl Cmos {
    fn read(&self) -> u8 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let mut tm: libc::tm = unsafe_zeroed_tm();
        // SAFETY: gmtime_r only writes into `tm`, which we own.
        unsafe { libc::gmtime_r(&now, &mut tm) };
        let bcd = |v: i32| -> u8 {
            let v = v.clamp(0, 99) as u8;
            ((v / 10) << 4) | (v % 10)
        };
        match self.index & 0x7f {
            0x00 => bcd(tm.tm_sec),
            0x02 => bcd(tm.tm_min),
            0x04 => bcd(tm.tm_hour),
            0x06 => bcd(tm.tm_wday + 1),
            0x07 => bcd(tm.tm_mday),
            0x08 => bcd(tm.tm_mon + 1),
            0x09 => bcd(tm.tm_year % 100),
            0x32 => bcd(19 + tm.tm_year / 100),
            0x0a => 0x26, // no update in progress
            0x0b => 0x02, // 24-hour, BCD
            0x0d => 0x80, // valid RAM and time
            _ => 0,
        }
    }
}

fn unsafe_zeroed_tm() -> libc::tm {
    // SAFETY: libc::tm is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

enum Action {
    None,
    Hypercall,
    Stop(StopReason),
    Internal,
    Fail(String),
}

/// Runs one vCPU until the VM stops.
pub fn run(vp: u32, mut vcpu: VcpuFd, sh: Arc<Shared>) {
    let mut last_fix_rip = u64::MAX;
    let mut same_rip = 0u32;
    let mut unknown_ports = 0u32;
    loop {
        if sh.stop.stopped() {
            snapshot(vp, &vcpu, &sh, "stopped by the VMM".into());
            return;
        }
        sh.pause.gate(&sh.stop);
        if sh.stop.stopped() {
            continue;
        }
        let action = match vcpu.run() {
            Ok(exit) => {
                sh.exits.fetch_add(1, Ordering::Relaxed);
                match exit {
                    VcpuExit::IoOut(port, data) => io_out(&sh, port, data, &mut unknown_ports),
                    VcpuExit::IoIn(port, data) => {
                        io_in(&sh, port, data);
                        Action::None
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        data.fill(0xff);
                        if unknown_ports < 32 {
                            unknown_ports += 1;
                            sh.events.note(format!("vcpu{vp}: MMIO read {addr:#x}"));
                        }
                        Action::None
                    }
                    VcpuExit::MmioWrite(addr, _) => {
                        if unknown_ports < 32 {
                            unknown_ports += 1;
                            sh.events.note(format!("vcpu{vp}: MMIO write {addr:#x}"));
                        }
                        Action::None
                    }
                    VcpuExit::X86Rdmsr(exit) => {
                        match sh.hv.rdmsr(vp, exit.index) {
                            MsrResult::Ok(v) => *exit.data = v,
                            MsrResult::Fault => {
                                sh.events
                                    .note(format!("vcpu{vp}: rdmsr {:#x} -> #GP", exit.index));
                                *exit.error = 1;
                            }
                        }
                        Action::None
                    }
                    VcpuExit::X86Wrmsr(exit) => {
                        if let MsrResult::Fault = sh.hv.wrmsr(vp, exit.index, exit.data) {
                            sh.events.note(format!(
                                "vcpu{vp}: wrmsr {:#x} = {:#x} -> #GP",
                                exit.index, exit.data
                            ));
                            *exit.error = 1;
                        }
                        Action::None
                    }
                    VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => Action::None,
                    VcpuExit::Shutdown => {
                        Action::Fail("KVM_EXIT_SHUTDOWN (triple fault or shutdown)".into())
                    }
                    VcpuExit::FailEntry(reason, cpu) => Action::Fail(format!(
                        "KVM_EXIT_FAIL_ENTRY hardware reason {reason:#x} on cpu {cpu}"
                    )),
                    VcpuExit::InternalError => Action::Internal,
                    VcpuExit::SystemEvent(t, _) => match t {
                        KVM_SYSTEM_EVENT_RESET => Action::Stop(StopReason::Reboot),
                        KVM_SYSTEM_EVENT_SHUTDOWN => Action::Stop(StopReason::Poweroff),
                        KVM_SYSTEM_EVENT_CRASH => Action::Fail("KVM system event: crash".into()),
                        t => Action::Fail(format!("KVM system event {t}")),
                    },
                    other => Action::Fail(format!("unhandled exit {other:?}")),
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                if sh.sample.swap(false, Ordering::Relaxed) {
                    if let (Ok(r), Ok(s)) = (vcpu.get_regs(), vcpu.get_sregs()) {
                        sh.events.note(format!(
                            "vcpu{vp}: sample RIP {:#x} RSP {:#x} RFLAGS {:#x} CR2 {:#x}",
                            r.rip, r.rsp, r.rflags, s.cr2
                        ));
                    }
                }
                Action::None
            }
            Err(e) => Action::Fail(format!("KVM_RUN failed: {e}")),
        };
        match action {
            Action::None => {}
            Action::Hypercall => match vcpu.get_regs() {
                Ok(mut regs) => {
                    regs.rax = sh.hv.hypercall(vp, &regs);
                    // RIP stays at the `out`; KVM skips it when it completes the port I/O.
                    if let Err(e) = vcpu.set_regs(&regs) {
                        fail(vp, &vcpu, &sh, format!("KVM_SET_REGS after hypercall: {e}"));
                        return;
                    }
                }
                Err(e) => {
                    fail(vp, &vcpu, &sh, format!("KVM_GET_REGS for hypercall: {e}"));
                    return;
                }
            },
            Action::Stop(r) => {
                sh.stop.stop(r);
            }
            Action::Fail(msg) => {
                fail(vp, &vcpu, &sh, msg);
                return;
            }
            Action::Internal => {
                let (sub, data) = {
                    let run = vcpu.get_kvm_run();
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                    // active union member.
                    let i = unsafe { run.__bindgen_anon_1.internal };
                    let n = (i.ndata as usize).min(i.data.len());
                    (i.suberror, i.data[..n].to_vec())
                };
                if sub == INTERNAL_ERROR_EMULATION {
                    match try_fixup(vp, &vcpu, &sh) {
                        Ok(rip) => {
                            if rip == last_fix_rip {
                                same_rip += 1;
                            } else {
                                same_rip = 0;
                                last_fix_rip = rip;
                            }
                            if same_rip < MAX_SAME_RIP_FIXUPS {
                                continue;
                            }
                            fail(
                                vp,
                                &vcpu,
                                &sh,
                                format!("emulation failure repeats at {rip:#x} after fix-ups"),
                            );
                            return;
                        }
                        Err(why) => {
                            let d: Vec<String> = data.iter().map(|x| format!("{x:#x}")).collect();
                            fail(vp, &vcpu, &sh, format!(
                                "KVM_EXIT_INTERNAL_ERROR suberror 1 (emulation failure), data [{}]; {why}",
                                d.join(", ")
                            ));
                            return;
                        }
                    }
                } else {
                    let d: Vec<String> = data.iter().map(|x| format!("{x:#x}")).collect();
                    fail(
                        vp,
                        &vcpu,
                        &sh,
                        format!(
                            "KVM_EXIT_INTERNAL_ERROR suberror {sub}, data [{}]",
                            d.join(", ")
                        ),
                    );
                    return;
                }
            }
        }
    }
}

fn io_out(sh: &Shared, port: u16, data: &[u8], unknown: &mut u32) -> Action {
    let v = data.first().copied().unwrap_or(0);
    match port {
        p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
            sh.serial.write((p - COM1_BASE) as u8, v);
        }
        HYPERCALL_PORT => return Action::Hypercall,
        0x64 if v == 0xfe => return Action::Stop(StopReason::Reboot),
        0x70 => lock(&sh.cmos).index = v,
        SLEEP_CONTROL_PORT if v & SLEEP_ENABLE != 0 => return Action::Stop(StopReason::Poweroff),
        0x80 | 0x71 | 0x61 | 0x64 | 0x60 | 0xcf8..=0xcff | SLEEP_CONTROL_PORT => {}
        _ => {
            if *unknown < 32 {
                *unknown += 1;
                sh.events
                    .note(format!("port write {port:#x} = {v:#x} ignored"));
            }
        }
    }
    Action::None
}

fn io_in(sh: &Shared, port: u16, data: &mut [u8]) {
    match port {
        p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
            let v = sh.serial.read((p - COM1_BASE) as u8);
            data.fill(0);
            if let Some(b) = data.first_mut() {
                *b = v;
            }
        }
        0x71 => {
            let v = lock(&sh.cmos).read();
            data.fill(v);
        }
        0x64 | 0x60 | 0x61 | SLEEP_CONTROL_PORT => data.fill(0),
        _ => data.fill(0xff),
    }
}

fn gprs(r: &kvm_regs) -> Gprs {
    [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ]
}

/// Reads guest-virtual memory through the vCPU's page tables.
fn read_virt(vcpu: &VcpuFd, ram: &GuestRam, gva: u64, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let va = gva.wrapping_add(done as u64);
        let Ok(t) = vcpu.translate_gva(va) else { break };
        if t.valid == 0 {
            break;
        }
        let in_page = (4096 - (va & 0xfff)) as usize;
        let n = in_page.min(buf.len() - done);
        if ram
            .read(t.physical_address, &mut buf[done..done + n])
            .is_err()
        {
            break;
        }
        done += n;
    }
    done
}

/// Finishes an instruction KVM could not emulate; returns its RIP.
fn try_fixup(vp: u32, vcpu: &VcpuFd, sh: &Shared) -> Result<u64, String> {
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    let mut code = [0u8; 16];
    let n = read_virt(vcpu, &sh.ram, regs.rip, &mut code);
    let rip = regs.rip;
    let fix = classify(&code[..n], rip, &gprs(&regs), sregs.fs.base, sregs.gs.base)
        .ok_or_else(|| "no fix-up for this instruction".to_string())?;
    match fix {
        Fixup::Int3 => {
            regs.rip += 1;
            vcpu.set_regs(&regs)
                .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
            let mut ev = vcpu
                .get_vcpu_events()
                .map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
            ev.exception.injected = 1;
            ev.exception.nr = 3;
            ev.exception.has_error_code = 0;
            ev.exception.pending = 0;
            ev.exception.error_code = 0;
            vcpu.set_vcpu_events(&ev)
                .map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))?;
        }
        Fixup::SetAc(set) => {
            if set {
                regs.rflags |= 1 << 18;
            } else {
                regs.rflags &= !(1 << 18);
            }
            regs.rip += 3;
            vcpu.set_regs(&regs)
                .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        }
        Fixup::Fwait => {
            regs.rip += 1;
            vcpu.set_regs(&regs)
                .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        }
        Fixup::Ldmxcsr { addr, len } => {
            let mut b = [0u8; 4];
            if read_virt(vcpu, &sh.ram, addr, &mut b) != 4 {
                return Err(format!("ldmxcsr operand {addr:#x} not readable"));
            }
            let mut fpu = vcpu.get_fpu().map_err(|e| format!("KVM_GET_FPU: {e}"))?;
            fpu.mxcsr = u32::from_le_bytes(b);
            vcpu.set_fpu(&fpu)
                .map_err(|e| format!("KVM_SET_FPU: {e}"))?;
            regs.rip += len as u64;
            vcpu.set_regs(&regs)
                .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        }
    }
    let count = sh.fixups.fetch_add(1, Ordering::Relaxed);
    if count < 50 {
        sh.events.note(format!(
            "vcpu{vp}: emulation failure at {rip:#x} finished by the VMM: {fix:?}"
        ));
    }
    Ok(rip)
}

fn snapshot(vp: u32, vcpu: &VcpuFd, sh: &Shared, exit: String) {
    let regs = vcpu.get_regs().unwrap_or_default();
    let sregs = vcpu.get_sregs().unwrap_or_default();
    let mut code = vec![0u8; 16];
    let n = read_virt(vcpu, &sh.ram, regs.rip, &mut code);
    code.truncate(n);
    lock(&sh.snapshots).push(VcpuSnapshot {
        vp,
        exit,
        regs,
        sregs,
        code,
    });
}

fn fail(vp: u32, vcpu: &VcpuFd, sh: &Shared, msg: String) {
    sh.events.note(format!("vcpu{vp}: {msg}"));
    snapshot(vp, vcpu, sh, msg.clone());
    sh.stop
        .stop(StopReason::Failure(format!("vCPU {vp}: {msg}")));
}

//! Hyper-V enlightenments emulated in user space: synthetic MSRs (reached through the KVM MSR
//! filter), the hypercall page (which exits to the VMM with an `out`), and the SynIC: message
//! slots and event flags in guest pages, with interrupts injected as MSIs. Nothing here relies
//! on KVM's own Hyper-V support.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::kvm_regs;

use crate::events::EventLog;
use crate::memory::GuestRam;

/// I/O port the hypercall page's `out` uses (no legacy device lives there; not 0x7E).
pub const HYPERCALL_PORT: u16 = 0xe4;

/// Synthetic MSR numbers.
pub mod msr {
    pub const GUEST_OS_ID: u32 = 0x4000_0000;
    pub const HYPERCALL: u32 = 0x4000_0001;
    pub const VP_INDEX: u32 = 0x4000_0002;
    pub const TIME_REF_COUNT: u32 = 0x4000_0020;
    pub const TSC_FREQUENCY: u32 = 0x4000_0022;
    pub const APIC_FREQUENCY: u32 = 0x4000_0023;
    pub const VP_ASSIST_PAGE: u32 = 0x4000_0073;
    pub const SCONTROL: u32 = 0x4000_0080;
    pub const SVERSION: u32 = 0x4000_0081;
    pub const SIEFP: u32 = 0x4000_0082;
    pub const SIMP: u32 = 0x4000_0083;
    pub const EOM: u32 = 0x4000_0084;
    pub const SINT0: u32 = 0x4000_0090;
    pub const SINT15: u32 = 0x4000_009f;
    pub const CRASH_P0: u32 = 0x4000_0100;
    pub const CRASH_P4: u32 = 0x4000_0104;
    pub const CRASH_CTL: u32 = 0x4000_0105;
    pub const TSC_INVARIANT_CONTROL: u32 = 0x4000_0118;
    /// First and count of the range sent to user space by the MSR filter.
    pub const FILTER_BASE: u32 = 0x4000_0000;
    pub const FILTER_COUNT: u32 = 0x200;
}

/// Hypercall codes.
pub const HVCALL_POST_MESSAGE: u16 = 0x005c;
pub const HVCALL_SIGNAL_EVENT: u16 = 0x005d;

/// Hypercall status codes.
pub mod status {
    pub const SUCCESS: u16 = 0;
    pub const INVALID_HYPERCALL_CODE: u16 = 2;
    pub const INVALID_HYPERCALL_INPUT: u16 = 3;
    pub const INVALID_ALIGNMENT: u16 = 4;
    pub const INVALID_PARAMETER: u16 = 5;
    pub const ACCESS_DENIED: u16 = 6;
    pub const INSUFFICIENT_MEMORY: u16 = 0xb;
    pub const INVALID_PORT_ID: u16 = 0x11;
    pub const INVALID_CONNECTION_ID: u16 = 0x12;
    pub const INSUFFICIENT_BUFFERS: u16 = 0x13;
}

/// Size of one SynIC message slot and of its payload.
pub const MESSAGE_SIZE: usize = 256;
pub const MESSAGE_PAYLOAD_MAX: usize = 240;
pub const SINT_COUNT: usize = 16;
const SINT_MASKED: u64 = 1 << 16;
const SINT_RESET: u64 = SINT_MASKED;
/// Cap on messages queued for one (VP, SINT) before posts fail with INSUFFICIENT_BUFFERS.
const QUEUE_LIMIT: usize = 256;

/// Where guest hypercalls for VMBus go (the VMBus server implements it).
pub trait HypercallTarget: Send + Sync {
    /// HvPostMessage: a guest→host message to `connection_id`; returns a hypercall status.
    fn post_message(&self, connection_id: u32, message_type: u32, payload: &[u8]) -> u16;
    /// HvSignalEvent: the guest kicked `connection_id`; returns a hypercall status.
    fn signal_event(&self, connection_id: u32, flag: u16) -> u16;
}

/// Injects fixed interrupts into the guest's local APICs (KVM_SIGNAL_MSI in a real VM).
pub trait InterruptSink: Send + Sync {
    fn fixed_interrupt(&self, apic_id: u32, vector: u8) -> Result<(), String>;
}

/// Errors of host→guest SynIC operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SynicError {
    #[error("no virtual processor {0}")]
    NoSuchVp(u32),
    #[error("SINT {0} out of range")]
    BadSint(u8),
    #[error("message payload of {0} bytes exceeds 240")]
    TooLong(usize),
    #[error("message queue for VP {vp} SINT {sint} is full")]
    QueueFull { vp: u32, sint: u8 },
    #[error("the guest's SynIC page is not in RAM: {0}")]
    BadPage(#[from] crate::memory::GuestMemError),
}

#[derive(Debug, Clone)]
struct QueuedMessage {
    message_type: u32,
    payload: Vec<u8>,
}

#[derive(Debug)]
struct VpSynic {
    apic_id: u32,
    scontrol: u64,
    simp: u64,
    siefp: u64,
    sint: [u64; SINT_COUNT],
    vp_assist: u64,
    queues: [VecDeque<QueuedMessage>; SINT_COUNT],
}

impl VpSynic {
    fn new(apic_id: u32) -> Self {
        VpSynic {
            apic_id,
            scontrol: 1,
            simp: 0,
            siefp: 0,
            sint: [SINT_RESET; SINT_COUNT],
            vp_assist: 0,
            queues: Default::default(),
        }
    }
}

#[derive(Debug, Default)]
struct Partition {
    guest_os_id: u64,
    hypercall: u64,
    tsc_invariant: u64,
    crash: [u64; 5],
}

/// Statistics for reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct HvStats {
    pub post_message_calls: u64,
    pub signal_event_calls: u64,
    pub messages_delivered: u64,
    pub events_signalled: u64,
    pub interrupts: u64,
}

/// The partition's Hyper-V state.
pub struct Hv {
    ram: Arc<GuestRam>,
    irq: Arc<dyn InterruptSink>,
    tsc_hz: u64,
    dilation: u64,
    start: std::time::Instant,
    partition: Mutex<Partition>,
    vps: Vec<Mutex<VpSynic>>,
    target: OnceLock<Arc<dyn HypercallTarget>>,
    stats: Mutex<HvStats>,
    events: Arc<EventLog>,
    /// Log every hypercall and message (env VIRIDIAN_VMM_TRACE=1).
    trace: bool,
}

impl std::fmt::Debug for Hv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hv").field("vps", &self.vps.len()).finish()
    }
}

/// Outcome of an MSR access for the vCPU loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsrResult {
    Ok(u64),
    /// Inject #GP.
    Fault,
}

impl Hv {
    pub fn new(
        ram: Arc<GuestRam>,
        irq: Arc<dyn InterruptSink>,
        vps: u32,
        tsc_hz: u64,
        dilation: u32,
        events: Arc<EventLog>,
    ) -> Self {
        let dilation = u64::from(dilation.max(1));
        Hv {
            ram,
            irq,
            tsc_hz: tsc_hz * dilation,
            dilation,
            start: std::time::Instant::now(),
            partition: Mutex::new(Partition::default()),
            vps: (0..vps).map(|i| Mutex::new(VpSynic::new(i))).collect(),
            target: OnceLock::new(),
            stats: Mutex::new(HvStats::default()),
            events,
            trace: std::env::var_os("VIRIDIAN_VMM_TRACE").is_some_and(|v| v == "1"),
        }
    }

    /// Connects the VMBus server (once).
    pub fn set_target(&self, t: Arc<dyn HypercallTarget>) {
        let _ = self.target.set(t);
    }

    pub fn stats(&self) -> HvStats {
        *lock(&self.stats)
    }

    /// The guest enabled the hypercall interface (read back by `hv_is_hyperv_initialized`).
    pub fn hypercall_enabled(&self) -> bool {
        lock(&self.partition).hypercall & 1 != 0
    }

    pub fn guest_os_id(&self) -> u64 {
        lock(&self.partition).guest_os_id
    }

    fn vp(&self, vp: u32) -> Result<&Mutex<VpSynic>, SynicError> {
        self.vps.get(vp as usize).ok_or(SynicError::NoSuchVp(vp))
    }

    /// RDMSR of a synthetic MSR on VP `vp`.
    pub fn rdmsr(&self, vp: u32, index: u32) -> MsrResult {
        let Ok(v) = self.vp(vp) else {
            return MsrResult::Fault;
        };
        let p = lock(&self.partition);
        let s = lock(v);
        let val = match index {
            msr::GUEST_OS_ID => p.guest_os_id,
            msr::HYPERCALL => p.hypercall,
            msr::VP_INDEX => u64::from(vp),
            msr::TIME_REF_COUNT => (self.start.elapsed().as_nanos() / 100) as u64 / self.dilation,
            msr::TSC_FREQUENCY => self.tsc_hz,
            msr::APIC_FREQUENCY => 1_000_000_000 * self.dilation,
            msr::VP_ASSIST_PAGE => s.vp_assist,
            msr::SCONTROL => s.scontrol,
            msr::SVERSION => 1,
            msr::SIEFP => s.siefp,
            msr::SIMP => s.simp,
            msr::EOM => 0,
            msr::SINT0..=msr::SINT15 => s.sint[(index - msr::SINT0) as usize],
            msr::CRASH_P0..=msr::CRASH_P4 => p.crash[(index - msr::CRASH_P0) as usize],
            msr::CRASH_CTL => 1 << 63,
            msr::TSC_INVARIANT_CONTROL => p.tsc_invariant,
            _ => return MsrResult::Fault,
        };
        MsrResult::Ok(val)
    }

    /// WRMSR of a synthetic MSR on VP `vp`.
    pub fn wrmsr(&self, vp: u32, index: u32, value: u64) -> MsrResult {
        let Ok(v) = self.vp(vp) else {
            return MsrResult::Fault;
        };
        match index {
            msr::GUEST_OS_ID => {
                lock(&self.partition).guest_os_id = value;
                self.events.note(format!("hv: guest OS id {value:#x}"));
            }
            msr::HYPERCALL => {
                if value & 0xffc != 0 {
                    return MsrResult::Fault;
                }
                let mut p = lock(&self.partition);
                let old = p.hypercall;
                p.hypercall = value;
                drop(p);
                if value & 1 != 0 && (old & 1 == 0 || (old ^ value) & !0xfff != 0) {
                    let gpa = value & !0xfff;
                    if self.ram.write(gpa, &hypercall_page()).is_err() {
                        self.events.note(format!(
                            "hv: hypercall page {gpa:#x} outside RAM; hypercalls will fail"
                        ));
                    } else {
                        self.events.note(format!("hv: hypercall page at {gpa:#x}"));
                    }
                }
            }
            msr::VP_ASSIST_PAGE => lock(v).vp_assist = value,
            msr::SCONTROL => {
                lock(v).scontrol = value;
                self.deliver_all(vp);
            }
            msr::SIEFP => lock(v).siefp = value,
            msr::SIMP => {
                lock(v).simp = value;
                self.deliver_all(vp);
            }
            msr::EOM => self.deliver_all(vp),
            msr::SINT0..=msr::SINT15 => {
                let vector = value & 0xff;
                if value & SINT_MASKED == 0 && vector < 16 {
                    return MsrResult::Fault;
                }
                lock(v).sint[(index - msr::SINT0) as usize] = value;
                self.deliver_all(vp);
            }
            msr::CRASH_P0..=msr::CRASH_P4 => {
                lock(&self.partition).crash[(index - msr::CRASH_P0) as usize] = value;
            }
            msr::CRASH_CTL => {
                if value & (1 << 63) != 0 {
                    let c = lock(&self.partition).crash;
                    self.events.note(format!(
                        "hv: guest reported a crash: P0={:#x} P1={:#x} P2={:#x} P3={:#x} P4={:#x}",
                        c[0], c[1], c[2], c[3], c[4]
                    ));
                }
            }
            msr::TSC_INVARIANT_CONTROL => lock(&self.partition).tsc_invariant = value & 1,
            _ => return MsrResult::Fault,
        }
        MsrResult::Ok(0)
    }

    /// Handles the hypercall page's `out`: decodes RCX/RDX/R8 and returns the new RAX.
    pub fn hypercall(&self, _vp: u32, regs: &kvm_regs) -> u64 {
        let control = regs.rcx;
        if self.trace {
            self.events.note(format!(
                "hv: hypercall control {control:#x} rdx {:#x} r8 {:#x}",
                regs.rdx, regs.r8
            ));
        }
        let code = (control & 0xffff) as u16;
        let fast = control & (1 << 16) != 0;
        let rep_count = (control >> 32) & 0xfff;
        let st = if rep_count != 0 {
            status::INVALID_HYPERCALL_INPUT
        } else {
            match code {
                HVCALL_POST_MESSAGE if !fast => self.post_message_call(regs.rdx),
                HVCALL_SIGNAL_EVENT => {
                    let input = if fast {
                        Ok(regs.rdx)
                    } else if regs.rdx & 7 != 0 {
                        Err(status::INVALID_ALIGNMENT)
                    } else {
                        self.ram
                            .read_u64(regs.rdx)
                            .map_err(|_| status::INVALID_PARAMETER)
                    };
                    match input {
                        Ok(v) => self.signal_event_call((v & 0xff_ffff) as u32, (v >> 32) as u16),
                        Err(s) => s,
                    }
                }
                HVCALL_POST_MESSAGE => status::INVALID_HYPERCALL_INPUT,
                _ => {
                    self.events.note(format!(
                        "hv: unsupported hypercall {code:#x} (control {control:#x})"
                    ));
                    status::INVALID_HYPERCALL_CODE
                }
            }
        };
        u64::from(st)
    }

    fn post_message_call(&self, gpa: u64) -> u16 {
        lock(&self.stats).post_message_calls += 1;
        if gpa & 7 != 0 {
            return status::INVALID_ALIGNMENT;
        }
        let mut input = [0u8; MESSAGE_SIZE];
        if self.ram.read(gpa, &mut input).is_err() {
            return status::INVALID_PARAMETER;
        }
        let connection_id = u32::from_le_bytes([input[0], input[1], input[2], 0]);
        let message_type = u32::from_le_bytes(input[8..12].try_into().unwrap_or_default());
        let size = u32::from_le_bytes(input[12..16].try_into().unwrap_or_default()) as usize;
        if size > MESSAGE_PAYLOAD_MAX || message_type == 0 || message_type & 0x8000_0000 != 0 {
            return status::INVALID_PARAMETER;
        }
        let payload = &input[16..16 + size];
        match self.target.get() {
            Some(t) => t.post_message(connection_id, message_type, payload),
            None => {
                let msgtype = payload
                    .get(..4)
                    .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
                    .unwrap_or(0);
                self.events.note(format!(
                    "hv: HvPostMessage(conn {connection_id}, type {message_type}, {size} bytes, \
                     vmbus msgtype {msgtype}) with no VMBus server attached"
                ));
                status::SUCCESS
            }
        }
    }

    fn signal_event_call(&self, connection_id: u32, flag: u16) -> u16 {
        lock(&self.stats).signal_event_calls += 1;
        match self.target.get() {
            Some(t) => t.signal_event(connection_id, flag),
            None => status::INVALID_CONNECTION_ID,
        }
    }

    /// Queues a host→guest message for (`vp`, `sint`) and delivers it when the slot is free.
    pub fn post_message(
        &self,
        vp: u32,
        sint: u8,
        message_type: u32,
        payload: &[u8],
    ) -> Result<(), SynicError> {
        if sint as usize >= SINT_COUNT {
            return Err(SynicError::BadSint(sint));
        }
        if payload.len() > MESSAGE_PAYLOAD_MAX {
            return Err(SynicError::TooLong(payload.len()));
        }
        let v = self.vp(vp)?;
        {
            let mut s = lock(v);
            let q = &mut s.queues[sint as usize];
            if q.len() >= QUEUE_LIMIT {
                return Err(SynicError::QueueFull { vp, sint });
            }
            q.push_back(QueuedMessage {
                message_type,
                payload: payload.to_vec(),
            });
        }
        self.deliver(vp, sint as usize);
        Ok(())
    }

    /// Sets event flag `flag` of (`vp`, `sint`) in the guest's SIEFP page and interrupts the
    /// VP when the flag was newly set. Returns whether an interrupt was sent.
    pub fn signal_event(&self, vp: u32, sint: u8, flag: u32) -> Result<bool, SynicError> {
        if sint as usize >= SINT_COUNT {
            return Err(SynicError::BadSint(sint));
        }
        if flag >= 2048 {
            return Err(SynicError::BadSint(sint));
        }
        let v = self.vp(vp)?;
        let (siefp, sintv, scontrol, apic) = {
            let s = lock(v);
            (s.siefp, s.sint[sint as usize], s.scontrol, s.apic_id)
        };
        if scontrol & 1 == 0 || siefp & 1 == 0 || sintv & SINT_MASKED != 0 {
            return Ok(false);
        }
        let byte = (siefp & !0xfff) + sint as u64 * MESSAGE_SIZE as u64 + u64::from(flag / 8);
        let bit = 1u8 << (flag % 8);
        let old = self.ram.atomic_u8(byte)?.fetch_or(bit, Ordering::SeqCst);
        lock(&self.stats).events_signalled += 1;
        if old & bit == 0 {
            self.interrupt(apic, (sintv & 0xff) as u8);
            return Ok(true);
        }
        Ok(false)
    }

    fn deliver_all(&self, vp: u32) {
        for sint in 0..SINT_COUNT {
            self.deliver(vp, sint);
        }
    }

    /// Moves queued messages into the free message slot, flagging msg_pending when it is busy.
    /// The guest clears the slot's type with cmpxchg, then reads msg_pending, then writes EOM;
    /// the re-check after setting msg_pending closes the race with that sequence.
    fn deliver(&self, vp: u32, sint: usize) {
        let Ok(v) = self.vp(vp) else { return };
        let mut s = lock(v);
        loop {
            if s.queues[sint].is_empty() {
                return;
            }
            let sintv = s.sint[sint];
            if s.scontrol & 1 == 0 || s.simp & 1 == 0 || sintv & SINT_MASKED != 0 {
                return;
            }
            let slot = (s.simp & !0xfff) + (sint * MESSAGE_SIZE) as u64;
            let Ok(type_word) = self.ram.atomic_u32(slot) else {
                return;
            };
            if type_word.load(Ordering::Acquire) != 0 {
                let Ok(flags) = self.ram.atomic_u8(slot + 5) else {
                    return;
                };
                flags.fetch_or(1, Ordering::SeqCst);
                if self.trace {
                    self.events
                        .note(format!("hv: VP {vp} SINT {sint} slot busy, msg_pending"));
                }
                if type_word.load(Ordering::SeqCst) != 0 {
                    return;
                }
                continue;
            }
            let Some(m) = s.queues[sint].pop_front() else {
                return;
            };
            let mut body = [0u8; MESSAGE_SIZE - 4];
            body[0] = m.payload.len() as u8;
            // flags, reserved, and the 8-byte sender id stay zero
            body[12..12 + m.payload.len()].copy_from_slice(&m.payload);
            if self.ram.write(slot + 4, &body).is_err() {
                return;
            }
            type_word.store(m.message_type, Ordering::Release);
            if self.trace {
                let t = m.payload.get(..4).map(|b| b[0]).unwrap_or(0);
                self.events.note(format!(
                    "hv: delivered message (vmbus msgtype {t}) to VP {vp} SINT {sint}"
                ));
            }
            lock(&self.stats).messages_delivered += 1;
            let apic = s.apic_id;
            self.interrupt(apic, (sintv & 0xff) as u8);
        }
    }

    /// Fixed-delivery MSI of `vector` to `apic_id`.
    pub fn interrupt(&self, apic_id: u32, vector: u8) {
        lock(&self.stats).interrupts += 1;
        if let Err(e) = self.irq.fixed_interrupt(apic_id, vector) {
            self.events
                .note(format!("hv: KVM_SIGNAL_MSI vector {vector:#x} failed: {e}"));
        }
    }
}

/// The hypercall page: `endbr64; out HYPERCALL_PORT, al; ret`, the rest int3.
pub fn hypercall_page() -> Vec<u8> {
    let mut p = vec![0xccu8; 4096];
    p[..7].copy_from_slice(&[0xf3, 0x0f, 0x1e, 0xfa, 0xe6, HYPERCALL_PORT as u8, 0xc3]);
    p
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Irqs(Mutex<Vec<(u32, u8)>>);
    impl InterruptSink for Irqs {
        fn fixed_interrupt(&self, apic_id: u32, vector: u8) -> Result<(), String> {
            lock(&self.0).push((apic_id, vector));
            Ok(())
        }
    }

    #[derive(Default)]
    struct Target(Mutex<Vec<(u32, u32, Vec<u8>)>>);
    impl HypercallTarget for Target {
        fn post_message(&self, c: u32, t: u32, p: &[u8]) -> u16 {
            lock(&self.0).push((c, t, p.to_vec()));
            status::SUCCESS
        }
        fn signal_event(&self, c: u32, _flag: u16) -> u16 {
            if c == 0x2001 {
                status::SUCCESS
            } else {
                status::INVALID_CONNECTION_ID
            }
        }
    }

    const SIMP: u64 = 0x10000;
    const SIEFP: u64 = 0x11000;

    fn setup() -> (Arc<GuestRam>, Arc<Irqs>, Hv) {
        let ram = Arc::new(GuestRam::new(32 << 20).unwrap());
        let irqs = Arc::new(Irqs::default());
        let hv = Hv::new(
            ram.clone(),
            irqs.clone(),
            2,
            2_000_000_000,
            1,
            Arc::new(EventLog::new(false)),
        );
        (ram, irqs, hv)
    }

    fn enable_synic(hv: &Hv, vp: u32) {
        assert_eq!(hv.wrmsr(vp, msr::SIMP, SIMP | 1), MsrResult::Ok(0));
        assert_eq!(hv.wrmsr(vp, msr::SIEFP, SIEFP | 1), MsrResult::Ok(0));
        assert_eq!(hv.wrmsr(vp, msr::SINT0 + 2, 0xf3), MsrResult::Ok(0));
        assert_eq!(hv.wrmsr(vp, msr::SCONTROL, 1), MsrResult::Ok(0));
    }

    #[test]
    fn msrs_and_hypercall_page() {
        let (ram, _, hv) = setup();
        assert_eq!(hv.rdmsr(1, msr::VP_INDEX), MsrResult::Ok(1));
        assert_eq!(
            hv.rdmsr(0, msr::TSC_FREQUENCY),
            MsrResult::Ok(2_000_000_000)
        );
        assert_eq!(hv.rdmsr(0, msr::SINT0), MsrResult::Ok(SINT_MASKED));
        assert_eq!(hv.rdmsr(0, msr::SCONTROL), MsrResult::Ok(1));
        assert_eq!(hv.rdmsr(5, msr::VP_INDEX), MsrResult::Fault);
        assert_eq!(hv.rdmsr(0, 0x4000_0199), MsrResult::Fault);
        assert_eq!(hv.wrmsr(0, msr::VP_INDEX, 3), MsrResult::Fault);
        // Reserved bits in HYPERCALL fault; enabling writes the page.
        assert_eq!(hv.wrmsr(0, msr::HYPERCALL, 0x5000 | 4), MsrResult::Fault);
        assert!(!hv.hypercall_enabled());
        assert_eq!(hv.wrmsr(0, msr::HYPERCALL, 0x5000 | 1), MsrResult::Ok(0));
        assert!(hv.hypercall_enabled());
        assert_eq!(hv.rdmsr(0, msr::HYPERCALL), MsrResult::Ok(0x5001));
        let mut page = [0u8; 8];
        ram.read(0x5000, &mut page).unwrap();
        assert_eq!(&page[..7], &[0xf3, 0x0f, 0x1e, 0xfa, 0xe6, 0xe4, 0xc3]);
        assert_eq!(page[7], 0xcc);
        // An unmasked SINT needs a vector >= 16.
        assert_eq!(hv.wrmsr(0, msr::SINT0, 5), MsrResult::Fault);
    }

    #[test]
    fn messages_queue_until_eom() {
        let (ram, irqs, hv) = setup();
        // Posted before the SynIC is enabled: held.
        hv.post_message(0, 2, 1, b"first").unwrap();
        assert!(lock(&irqs.0).is_empty());
        enable_synic(&hv, 0);
        let slot = SIMP + 2 * 256;
        assert_eq!(ram.read_u32(slot).unwrap(), 1);
        let mut hdr = [0u8; 21];
        ram.read(slot, &mut hdr).unwrap();
        assert_eq!(hdr[4], 5);
        assert_eq!(&hdr[16..21], b"first");
        assert_eq!(lock(&irqs.0).as_slice(), &[(0, 0xf3)]);
        // Slot busy: the second one sets msg_pending and waits.
        hv.post_message(0, 2, 1, b"second").unwrap();
        let mut flags = [0u8; 1];
        ram.read(slot + 5, &mut flags).unwrap();
        assert_eq!(flags[0] & 1, 1);
        assert_eq!(lock(&irqs.0).len(), 1);
        // EOM with the slot still busy changes nothing.
        hv.wrmsr(0, msr::EOM, 0);
        assert_eq!(lock(&irqs.0).len(), 1);
        // Guest frees the slot, then EOM: delivered.
        ram.write(slot, &[0, 0, 0, 0]).unwrap();
        ram.write(slot + 5, &[0]).unwrap();
        hv.wrmsr(0, msr::EOM, 0);
        let mut body = [0u8; 6];
        ram.read(slot + 16, &mut body).unwrap();
        assert_eq!(&body, b"second");
        assert_eq!(lock(&irqs.0).len(), 2);
        assert_eq!(hv.stats().messages_delivered, 2);
        // Errors.
        assert_eq!(hv.post_message(9, 2, 1, b"x"), Err(SynicError::NoSuchVp(9)));
        assert_eq!(
            hv.post_message(0, 16, 1, b"x"),
            Err(SynicError::BadSint(16))
        );
        assert_eq!(
            hv.post_message(0, 2, 1, &[0; 241]),
            Err(SynicError::TooLong(241))
        );
    }

    #[test]
    fn event_flags() {
        let (ram, irqs, hv) = setup();
        assert_eq!(hv.signal_event(1, 2, 5), Ok(false)); // SynIC off: nothing
        enable_synic(&hv, 1);
        hv.interrupt(1, 0); // mark the sink; VP 1's APIC id is 1
        lock(&irqs.0).clear();
        assert_eq!(hv.signal_event(1, 2, 9), Ok(true));
        assert_eq!(hv.signal_event(1, 2, 9), Ok(false)); // already set
        let mut b = [0u8; 2];
        ram.read(SIEFP + 512, &mut b).unwrap();
        assert_eq!(b, [0, 2]);
        assert_eq!(lock(&irqs.0).as_slice(), &[(1, 0xf3)]);
        assert!(hv.signal_event(1, 2, 4096).is_err());
    }

    #[test]
    fn hypercalls_reach_the_target() {
        let (ram, _, hv) = setup();
        let t = Arc::new(Target::default());
        hv.set_target(t.clone());
        let mut input = [0u8; 256];
        input[0..4].copy_from_slice(&4u32.to_le_bytes());
        input[8..12].copy_from_slice(&1u32.to_le_bytes());
        input[12..16].copy_from_slice(&3u32.to_le_bytes());
        input[16..19].copy_from_slice(b"abc");
        ram.write(0x8000, &input).unwrap();
        let mut regs = kvm_regs {
            rcx: u64::from(HVCALL_POST_MESSAGE),
            rdx: 0x8000,
            ..Default::default()
        };
        assert_eq!(hv.hypercall(0, &regs), 0);
        assert_eq!(lock(&t.0).as_slice(), &[(4, 1, b"abc".to_vec())]);
        regs.rdx = 0x8004; // misaligned
        assert_eq!(hv.hypercall(0, &regs), u64::from(status::INVALID_ALIGNMENT));
        regs.rdx = 0xffff_f000_0000; // not RAM
        assert_eq!(hv.hypercall(0, &regs), u64::from(status::INVALID_PARAMETER));
        input[12..16].copy_from_slice(&241u32.to_le_bytes());
        ram.write(0x8000, &input).unwrap();
        regs.rdx = 0x8000;
        assert_eq!(hv.hypercall(0, &regs), u64::from(status::INVALID_PARAMETER));
        // Fast HvSignalEvent.
        regs.rcx = 0x1_005d;
        regs.rdx = 0x2001;
        assert_eq!(hv.hypercall(0, &regs), 0);
        regs.rdx = 0x2002;
        assert_eq!(
            hv.hypercall(0, &regs),
            u64::from(status::INVALID_CONNECTION_ID)
        );
        regs.rcx = 0x99;
        assert_eq!(
            hv.hypercall(0, &regs),
            u64::from(status::INVALID_HYPERCALL_CODE)
        );
        regs.rcx = u64::from(HVCALL_POST_MESSAGE) | (1 << 32);
        assert_eq!(
            hv.hypercall(0, &regs),
            u64::from(status::INVALID_HYPERCALL_INPUT)
        );
    }
}

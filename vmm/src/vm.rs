//! Building and running a VM.

use std::fs::File;
use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_enable_cap, kvm_msr_entry, Msrs, KVM_CAP_X86_USER_SPACE_MSR, KVM_MAX_CPUID_ENTRIES,
    KVM_MSR_EXIT_REASON_FILTER,
};
use kvm_ioctls::{
    Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::console::{
    ConsoleLog, ConsoleSink, IrqTrigger, SerialPort, StopReason, StopSignal, COM1_IRQ,
};
use crate::events::EventLog;
use crate::hv::{lock, msr, Hv, InterruptSink};
use crate::memory::GuestRam;
use crate::stats::{CountingDisk, DiskCounters};
use crate::vcpu::{Cmos, PauseGate, Shared};
use crate::{
    acpi, boot, cpuid, Console, ExitReason, ExitStatus, FailureReport, VmConfig, VmmError,
};

const MAX_CPUS: u32 = 8;

struct MsiSink(Arc<VmFd>);

impl InterruptSink for MsiSink {
    fn fixed_interrupt(&self, apic_id: u32, vector: u8) -> Result<(), String> {
        let msi = kvm_bindings::kvm_msi {
            address_lo: 0xfee0_0000 | ((apic_id & 0xff) << 12),
            address_hi: 0,
            data: u32::from(vector),
            ..Default::default()
        };
        self.0
            .signal_msi(msi)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Kvm(what, e)
}

/// Boots the configured guest and runs it to the end. See the crate docs.
pub fn run(cfg: VmConfig) -> Result<ExitStatus, VmmError> {
    if cfg.cpus == 0 || cfg.cpus > MAX_CPUS {
        return Err(VmmError::Config(format!(
            "cpus must be 1..={MAX_CPUS}, not {}",
            cfg.cpus
        )));
    }
    if cfg.disks.len() + cfg.dvds.len() > 64 {
        return Err(VmmError::Config("at most 64 disks and DVD drives".into()));
    }
    if let Some(path) = &cfg.qmp {
        // Refused before anything starts, not reported as a failed guest later.
        crate::qmp::check_path(path)
            .map_err(|e| VmmError::Config(format!("control socket: {e}")))?;
    }
    let start = Instant::now();
    let kvm = Kvm::new().map_err(|e| VmmError::KvmUnavailable(format!("/dev/kvm: {e}")))?;
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::X86UserSpaceMsr, "KVM_CAP_X86_USER_SPACE_MSR"),
        (Cap::SignalMsi, "KVM_CAP_SIGNAL_MSI"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmmError::KvmUnavailable(format!("host KVM lacks {name}")));
        }
    }
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    vm.set_tss_address(crate::layout::KVM_TSS_ADDR)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(kvm_err("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
    let deny = vec![0u8; (msr::FILTER_COUNT / 8) as usize];
    vm.set_msr_filter(
        MsrFilterDefaultAction::ALLOW,
        &[MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base: msr::FILTER_BASE,
            msr_count: msr::FILTER_COUNT,
            bitmap: &deny,
        }],
    )
    .map_err(kvm_err("KVM_X86_SET_MSR_FILTER"))?;

    let ram = Arc::new(GuestRam::new(cfg.memory)?);
    ram.register(&vm)?;
    let kernel = boot::load_kernel(&ram, &cfg.kernel)?;
    let initrd = match &cfg.initrd {
        Some(p) => Some(boot::load_initrd(&ram, &kernel, p)?),
        None => None,
    };
    boot::write_boot_data(&ram, &kernel, &cfg.cmdline, initrd)?;
    acpi::write_tables(&ram, cfg.cpus as u8)?;

    let events = Arc::new(EventLog::new(cfg.verbose));
    events.note(format!(
        "{} entry {:#x}, {} MiB, {} vCPU(s), cmdline: {}",
        kernel.kind,
        kernel.entry,
        cfg.memory >> 20,
        cfg.cpus,
        cfg.cmdline
    ));
    let stop = Arc::new(StopSignal::default());
    let watch = cfg
        .console_script
        .iter()
        .filter_map(|s| s.after.clone())
        .collect();
    let log = Arc::new(ConsoleLog::with_watch(
        start,
        cfg.stop_on.clone(),
        stop.clone(),
        watch,
    ));
    let out: Option<Box<dyn Write + Send>> = match &cfg.console {
        Console::Stdout => Some(Box::new(std::io::stdout())),
        Console::File(p) => {
            Some(Box::new(File::create(p).map_err(|e| {
                VmmError::Io(format!("creating {}", p.display()), e)
            })?))
        }
        Console::AppendFile(p) => Some(Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| VmmError::Io(format!("opening {}", p.display()), e))?,
        )),
        Console::Null => None,
    };
    let irq = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| VmmError::Io("creating the serial eventfd".into(), e))?;
    vm.register_irqfd(&irq, COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD"))?;
    let serial = Arc::new(SerialPort::new(
        IrqTrigger(irq),
        ConsoleSink::new(out, log.clone()),
    ));

    // vCPUs first: the TSC frequency for the Hyper-V MSRs comes from one.
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus: Vec<VcpuFd> = Vec::new();
    for i in 0..cfg.cpus {
        let vcpu = vm
            .create_vcpu(u64::from(i))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let entries = cpuid::guest_cpuid(supported.as_slice(), i, cfg.cpus);
        vcpu.set_cpuid2(&cpuid::to_kvm(&entries)?)
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        setup_lapic(&vcpu)?;
        vcpus.push(vcpu);
    }
    let tsc_khz = vcpus[0].get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
    {
        let bsp = &vcpus[0];
        let sregs = bsp.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        bsp.set_sregs(&boot::boot_sregs(sregs))
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        bsp.set_regs(&boot::boot_regs(kernel.entry))
            .map_err(kvm_err("KVM_SET_REGS"))?;
        bsp.set_fpu(&boot::boot_fpu())
            .map_err(kvm_err("KVM_SET_FPU"))?;
        let msrs = Msrs::from_entries(&[
            kvm_msr_entry {
                index: 0x1a0,
                data: 1,
                ..Default::default()
            },
            kvm_msr_entry {
                index: 0x2ff,
                data: 0x806,
                ..Default::default()
            },
        ])
        .map_err(|e| VmmError::Config(format!("MSR list: {e:?}")))?;
        bsp.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    }

    let hv = Arc::new(Hv::new(
        ram.clone(),
        Arc::new(MsiSink(vm.clone())),
        cfg.cpus,
        u64::from(tsc_khz) * 1000,
        cfg.time_dilation,
        events.clone(),
    ));
    let counters: Vec<Arc<DiskCounters>> = Vec::new();
    let disks: Vec<Arc<CountingDisk>> = cfg
        .disks
        .iter()
        .map(|d| Arc::new(CountingDisk::new(d.clone(), start)))
        .collect();
    let dvds: Vec<Option<Arc<CountingDisk>>> = cfg
        .dvds
        .iter()
        .map(|m| {
            m.as_ref()
                .map(|d| Arc::new(CountingDisk::new(d.clone(), start)))
        })
        .collect();
    let counters: Vec<Arc<DiskCounters>> = counters
        .into_iter()
        .chain(disks.iter().map(|d| d.counters.clone()))
        .chain(dvds.iter().flatten().map(|d| d.counters.clone()))
        .collect();
    let vmbus = crate::vmbus_glue::attach(
        &hv,
        &ram,
        &disks,
        &dvds,
        cfg.qmp.is_some(),
        &events,
        cfg.io_thread,
    )?;
    let pause = Arc::new(PauseGate::default());

    let shared = Arc::new(Shared {
        ram: ram.clone(),
        hv: hv.clone(),
        serial: serial.clone(),
        stop: stop.clone(),
        events: events.clone(),
        cmos: Mutex::new(Cmos::default()),
        snapshots: Mutex::new(Vec::new()),
        exits: AtomicU64::new(0),
        fixups: AtomicU64::new(0),
        sample: std::sync::atomic::AtomicBool::new(false),
        pause: pause.clone(),
    });

    register_signal_handler(SIGRTMIN(), kick_handler)
        .map_err(|e| VmmError::Io("installing the vCPU kick signal".into(), e.into()))?;
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    for (i, vcpu) in vcpus.into_iter().enumerate() {
        let sh = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .spawn(move || crate::vcpu::run(i as u32, vcpu, sh))
            .map_err(|e| VmmError::Io("spawning a vCPU thread".into(), e))?;
        threads.push(t);
    }
    pause.set_threads(threads.iter().map(|t| t.as_pthread_t()).collect());

    // The control socket.
    let qmp_events = Arc::new(crate::qmp::Events::default());
    let mut hot_control = None;
    let qmp = match &cfg.qmp {
        Some(path) => {
            let mut table = crate::control::BlockTable::new(
                start,
                cfg.open_image.unwrap_or(crate::control::open_raw),
            )
            .with_undo(cfg.open_undo);
            for (i, d) in disks.iter().enumerate() {
                table.register(
                    &format!("disk{i}"),
                    i as u8,
                    false,
                    Some(d.counters.clone()),
                );
            }
            for (j, m) in dvds.iter().enumerate() {
                let lun = (disks.len() + j) as u8;
                table.register(
                    &format!("cd{j}"),
                    lun,
                    true,
                    m.as_ref().map(|d| d.counters.clone()),
                );
            }
            let control = Arc::new(crate::control::VmControl {
                target: vmbus.target().clone(),
                table: Mutex::new(table),
                pause: pause.clone(),
                stop: stop.clone(),
                events: qmp_events.clone(),
            });
            hot_control = Some(control.clone());
            let server = crate::qmp::QmpServer::start(path, control, qmp_events.clone())
                .map_err(|e| VmmError::Io(format!("control socket {}", path.display()), e));
            match server {
                Ok(s) => Some(s),
                Err(e) => {
                    stop.stop(StopReason::Failure(e.to_string()));
                    None
                }
            }
        }
        None => None,
    };

    // Console input: a scripted conversation and/or the user's stdin. Both end within a poll
    // interval of the stop; the stdin thread is joined below so that it never reads input
    // meant for whatever the caller runs next (another boot, its own prompt).
    if !cfg.console_script.is_empty() {
        let (steps, serial, log, stop) = (
            cfg.console_script.clone(),
            serial.clone(),
            log.clone(),
            stop.clone(),
        );
        std::thread::Builder::new()
            .name("console-script".into())
            .spawn(move || crate::console::play_script(steps, serial, log, stop))
            .map_err(|e| VmmError::Io("spawning the console script thread".into(), e))?;
    }
    // Raw keyboard input while the VM runs; restored when `run` returns (also on errors).
    let _raw_terminal = if cfg.stdin_console {
        crate::console::RawTerminal::enter()
    } else {
        None
    };
    let mut stdin_thread = None;
    if cfg.stdin_console {
        if _raw_terminal.is_some() {
            eprint!("{}", crate::console::ESCAPE_HELP);
        }
        let (serial, stop) = (serial.clone(), stop.clone());
        stdin_thread = Some(
            std::thread::Builder::new()
                .name("console-stdin".into())
                .spawn(move || crate::console::forward_stdin(serial, stop))
                .map_err(|e| VmmError::Io("spawning the console input thread".into(), e))?,
        );
    }

    // Watch for the end.
    let io_total = |c: &[Arc<DiskCounters>]| -> u64 {
        c.iter()
            .map(|c| {
                let s = c.snapshot();
                s.reads + s.writes + s.flushes
            })
            .sum()
    };
    let mut last_io = io_total(&counters);
    let mut last_io_at = Instant::now();
    let trace = std::env::var_os("VIRIDIAN_VMM_TRACE").is_some_and(|v| v == "1");
    let mut last_trace = Instant::now();
    let reason = loop {
        if let Some(r) = stop.wait(Duration::from_millis(200)) {
            break r;
        }
        if trace && last_trace.elapsed() >= Duration::from_secs(5) {
            last_trace = Instant::now();
            shared
                .sample
                .store(true, std::sync::atomic::Ordering::Relaxed);
            for t in &threads {
                let _ = t.kill(SIGRTMIN());
            }
            events.note(format!(
                "progress: {} exits, {} fix-ups, console {} bytes, {:?}",
                shared.exits.load(std::sync::atomic::Ordering::Relaxed),
                shared.fixups.load(std::sync::atomic::Ordering::Relaxed),
                log.bytes(),
                hv.stats()
            ));
        }
        if cfg.interrupted.is_some_and(|f| f()) {
            stop.stop(StopReason::Interrupted);
            continue;
        }
        if let Some(t) = cfg.timeout {
            if start.elapsed() >= t {
                stop.stop(StopReason::Timeout);
                continue;
            }
        }
        let io = io_total(&counters);
        if io != last_io {
            last_io = io;
            last_io_at = Instant::now();
        }
        if let Some(s) = cfg.stall_timeout.filter(|_| !pause.paused()) {
            let quiet = log.last_output().max(last_io_at);
            if quiet.elapsed() >= s {
                stop.stop(StopReason::Stalled);
            }
        }
    };
    // Tell the control client how the VM ended, before the socket goes.
    if let Some(q) = qmp {
        let (guest, why) = match &reason {
            StopReason::Reboot => (true, "guest-reset"),
            StopReason::Poweroff => (true, "guest-shutdown"),
            StopReason::Quit => (false, "host-qmp-quit"),
            StopReason::Interrupted => (false, "host-signal"),
            StopReason::Marker(_) => (false, "host-marker"),
            _ => (false, "host-error"),
        };
        if reason == StopReason::Reboot {
            qmp_events.emit("RESET", serde_json::json!({"guest": true, "reason": why}));
        }
        qmp_events.emit(
            "SHUTDOWN",
            serde_json::json!({"guest": guest, "reason": why}),
        );
        q.shutdown();
    }
    pause.resume();
    // Kick the vCPUs out of KVM_RUN until they have all left.
    while threads.iter().any(|t| !t.is_finished()) {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            let _ = t.kill(SIGRTMIN());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for t in threads {
        let _ = t.join();
    }
    // LUNs the control socket added are flushed and closed like the boot disks.
    if let Some(c) = hot_control {
        for line in c.finish(cfg.hotplug_undo_end) {
            events.note(format!("hot-plugged LUN at exit: {line}"));
        }
    }
    vmbus.shutdown();
    if let Some(t) = stdin_thread {
        let _ = t.join();
    }
    serial.flush();
    for d in &disks {
        if let Err(e) = d.flush() {
            events.note(format!("flushing a disk at exit: {e}"));
        }
    }
    let elapsed = start.elapsed();
    let disk_stats = counters.iter().map(|c| c.snapshot()).collect();
    let exit = match reason {
        StopReason::Marker(m) => ExitReason::Marker(m),
        StopReason::Reboot => ExitReason::Reboot,
        StopReason::Poweroff => ExitReason::Poweroff,
        StopReason::Quit => ExitReason::Quit,
        r => {
            let mut vcpus = lock(&shared.snapshots).clone();
            vcpus.sort_by_key(|s| s.vp);
            return Err(VmmError::Guest(Box::new(FailureReport {
                reason: r,
                elapsed,
                milestones: log.milestones(),
                vcpus,
                console_tail: log.tail(),
                events: events.lines(),
                disk_stats,
            })));
        }
    };
    Ok(ExitStatus {
        reason: exit,
        elapsed,
        milestones: log.milestones(),
        console_tail: log.tail(),
        disk_stats,
        hv_stats: hv.stats(),
        events: events.lines(),
    })
}

use disk::BlockDevice as _;

/// LINT0 = ExtINT, LINT1 = NMI.
fn setup_lapic(vcpu: &VcpuFd) -> Result<(), VmmError> {
    let mut l = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let mut set = |off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = l.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            l.regs[off + i] = *x as _;
        }
    };
    set(0x350, 7);
    set(0x360, 4);
    vcpu.set_lapic(&l).map_err(kvm_err("KVM_SET_LAPIC"))?;
    Ok(())
}

//! Viridian's KVM VMM: boots a Linux kernel directly in 64-bit mode and gives it our disks
//! through an emulated Hyper-V (CPUID, synthetic MSRs, hypercall page, SynIC), VMBus and the
//! synthetic SCSI controller (storvsc).
//!
//! # Calling it (for the CLI)
//!
//! ```no_run
//! use std::time::Duration;
//! # fn open_disk() -> disk::Disk { unimplemented!() }
//! let mut cfg = vmm::VmConfig::new("/path/to/vmlinux");
//! cfg.cmdline = vmm::default_cmdline("root=/dev/sda1 rw rootfstype=ext4");
//! cfg.memory = 256 << 20;
//! cfg.cpus = 1;
//! cfg.disks.push(open_disk()); // LUN 0, then LUN 1, ...
//! cfg.console = vmm::Console::Stdout;
//! cfg.timeout = Some(Duration::from_secs(600));
//! cfg.stop_on.push("Attempted to kill init".into());
//! match vmm::run(cfg) {
//!     Ok(status) => println!("guest ended: {:?} after {:?}", status.reason, status.elapsed),
//!     Err(vmm::VmmError::KvmUnavailable(why)) => eprintln!("no KVM: {why}"),
//!     Err(e) => { eprintln!("{e}"); std::process::exit(1) } // includes the failure report
//! }
//! ```
//!
//! `run` blocks until the guest reboots, powers off, prints one of `stop_on`, fails, or runs
//! out of time. Failures (emulation failure, triple fault, unhandled exit, timeout, stall)
//! come back as [`VmmError::Guest`] whose `Display` is the full report: exit reason,
//! registers (RIP, CR0, CR3, CR4, EFER), the code bytes at RIP, milestones reached, VMM
//! events and the last console lines.

// unsafe only where a VMM cannot do without: KVM memory-region registration and the kvm_run
// exit union, atomic views of the mapped guest RAM, and libc calls std has no wrapper for
// (pthread_kill to interrupt KVM_RUN, gmtime_r, termios, poll), each with a SAFETY comment.
#![deny(unsafe_op_in_unsafe_fn)]

mod acpi;
mod boot;
pub mod console;
pub mod control;
mod cpuid;
mod decode;
mod events;
pub mod hv;
mod layout;
mod memory;
pub mod probe;
pub mod qmp;
pub mod shutdown_ic;
mod stats;
mod strict_json;
mod vcpu;
mod vm;
mod vmbus_devices;
mod vmbus_glue;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub use console::{ConsoleStep, Milestone, SerialInput, StopReason, MILESTONES};
pub use probe::{probe_guest_user_space, UserSpaceProbe};
pub use stats::DiskStats;
pub use vcpu::VcpuSnapshot;
pub use vm::run;

/// Kernel command-line switches our nested-KVM hosts need (docs/vmm.md, "Test hosts"): features
/// the guest would otherwise use through KVM's instruction emulator, which fails on them.
/// `clearcpuid` numbers (6.1 takes numbers only): 137 SSSE3, 141 CX16, 151 POPCNT, 154 XSAVE,
/// 308 SMAP (its `clac`/`stac` on every user copy fail in the emulator).
pub const HOST_QUIRK_SWITCHES: &str =
    "clearcpuid=137,141,151,154,308 nopcid noinvpcid nofsgsbase mitigations=off";

/// Console and reboot switches every boot wants: serial console from the first message, a
/// keyboard-controller reset on reboot, and reboot immediately on panic.
pub const BASE_SWITCHES: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 pci=off";

/// [`BASE_SWITCHES`] + [`HOST_QUIRK_SWITCHES`] + `extra`.
pub fn default_cmdline(extra: &str) -> String {
    let mut s = format!("{BASE_SWITCHES} {HOST_QUIRK_SWITCHES}");
    if !extra.trim().is_empty() {
        s.push(' ');
        s.push_str(extra.trim());
    }
    s
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Console {
    /// The VMM's stdout.
    #[default]
    Stdout,
    /// A log file (created or truncated).
    File(PathBuf),
    /// A log file appended to (created if missing), e.g. for the next boot after a reboot.
    AppendFile(PathBuf),
    /// Nowhere (the VMM still keeps the last lines for reports).
    Null,
}

/// Everything a VM needs.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Uncompressed ELF `vmlinux` or a `bzImage` (detected by content).
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The whole kernel command line (see [`default_cmdline`]).
    pub cmdline: String,
    /// Guest RAM in bytes (at least 32 MiB).
    pub memory: u64,
    /// vCPUs (1..=8; 1 is the tested configuration on nested hosts).
    pub cpus: u32,
    /// SCSI LUNs 0, 1, ... of the one synthetic SCSI controller.
    pub disks: Vec<disk::Disk>,
    /// DVD drives, the LUNs after the disks, each with its medium or empty.
    pub dvds: Vec<Option<disk::Disk>>,
    /// Serve the QMP-shaped control socket here (docs/qmp.md).
    pub qmp: Option<PathBuf>,
    /// Opens images for `device_add` / `blockdev-change-medium` (default: raw only).
    pub open_image: Option<control::ImageOpener>,
    /// Opens disks in undo mode for `device_add ... undo=true` (default: refused).
    pub open_undo: Option<control::UndoOpener>,
    /// What the VM's end does with hot-plugged undo LUNs still attached.
    pub hotplug_undo_end: qmp::UndoEnd,
    pub console: Console,
    /// Stop (as a failure) after this long.
    pub timeout: Option<Duration>,
    /// Stop (as a failure) when the console has been silent and no disk I/O happened for this
    /// long.
    pub stall_timeout: Option<Duration>,
    /// Console substrings that end the run successfully, e.g. "Attempted to kill init".
    pub stop_on: Vec<String>,
    /// Input typed into the serial console when given lines appear (an expect-style script;
    /// e.g. BREAK + `o` powers off a guest with Magic SysRq).
    pub console_script: Vec<ConsoleStep>,
    /// Forward the VMM's stdin to the serial console (interactive use). A terminal is put in
    /// raw mode for the run; Ctrl-A x quits, Ctrl-A b sends BREAK, Ctrl-A h lists the keys.
    pub stdin_console: bool,
    /// Polled every 200 ms: when it returns true the VM stops, as a failure with
    /// [`StopReason::Interrupted`] (the CLI passes its Ctrl-C/SIGTERM flag). Disks are still
    /// flushed.
    pub interrupted: Option<fn() -> bool>,
    /// Serve storvsc channel signals on a separate I/O thread; the signalling vCPU waits at
    /// most 1 ms for its request (default on; `VIRIDIAN_VMM_IO_THREAD=0` serves them inline
    /// on the vCPU thread).
    pub io_thread: bool,
    /// Print VMM events (hypercalls of note, fix-ups, MSR faults) to stderr as they happen.
    pub verbose: bool,
    /// Guest time runs this many times slower than real time: the TSC and APIC-timer
    /// frequencies the guest reads from the Hyper-V frequency MSRs are multiplied by it. On
    /// hosts where the guest kernel runs through KVM's instruction emulator, a periodic
    /// 250 Hz tick costs more than its period and the guest livelocks in timer interrupts;
    /// dilating time by [`NESTED_TIME_DILATION`] gives it room. 1 = real time.
    pub time_dilation: u32,
}

/// The time dilation our nested test hosts need (see [`VmConfig::time_dilation`]).
pub const NESTED_TIME_DILATION: u32 = 10;

/// [`NESTED_TIME_DILATION`] on hosts whose KVM is the software-nested `kvm_pvm` module (guest
/// kernel code emulated), 1 elsewhere. [`VmConfig::new`] uses it.
pub fn recommended_time_dilation() -> u32 {
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        NESTED_TIME_DILATION
    } else {
        1
    }
}

impl VmConfig {
    /// Defaults: 256 MiB, 1 vCPU, console on stdout, [`default_cmdline`] with no extras, no
    /// disks, no time limit, [`recommended_time_dilation`].
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: default_cmdline(""),
            memory: 256 << 20,
            cpus: 1,
            disks: Vec::new(),
            dvds: Vec::new(),
            qmp: None,
            open_image: None,
            open_undo: None,
            hotplug_undo_end: qmp::UndoEnd::Discard,
            console: Console::Stdout,
            timeout: None,
            stall_timeout: None,
            stop_on: Vec::new(),
            console_script: Vec::new(),
            stdin_console: false,
            interrupted: None,
            io_thread: std::env::var_os("VIRIDIAN_VMM_IO_THREAD").is_none_or(|v| v != "0"),
            verbose: false,
            time_dilation: recommended_time_dilation(),
        }
    }
}

/// How an orderly run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// A `stop_on` marker appeared; the string is the marker.
    Marker(String),
    /// The guest rebooted (i8042 reset; with `panic=-1` also after a panic).
    Reboot,
    /// The guest powered off (ACPI S5).
    Poweroff,
    /// `quit` on the control socket (disks flushed, like every orderly end).
    Quit,
}

/// The result of an orderly run.
#[derive(Debug, Clone)]
pub struct ExitStatus {
    pub reason: ExitReason,
    pub elapsed: Duration,
    pub milestones: Vec<Milestone>,
    pub console_tail: Vec<String>,
    /// Per LUN, what went through the disk.
    pub disk_stats: Vec<DiskStats>,
    /// Hyper-V/VMBus counters.
    pub hv_stats: hv::HvStats,
    pub events: Vec<String>,
}

impl ExitStatus {
    /// Time at which milestone `name` was reached.
    pub fn milestone(&self, name: &str) -> Option<Duration> {
        self.milestones
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.at)
    }
}

/// Everything known when a run failed.
#[derive(Debug, Clone)]
pub struct FailureReport {
    pub reason: StopReason,
    pub elapsed: Duration,
    pub milestones: Vec<Milestone>,
    pub vcpus: Vec<VcpuSnapshot>,
    pub console_tail: Vec<String>,
    pub events: Vec<String>,
    pub disk_stats: Vec<DiskStats>,
}

impl FailureReport {
    pub fn last_milestone(&self) -> Option<&Milestone> {
        self.milestones.last()
    }
}

impl fmt::Display for FailureReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match &self.reason {
            StopReason::Failure(s) => s.clone(),
            StopReason::Timeout => "time limit reached".into(),
            StopReason::Stalled => "no guest progress (console silent, no disk I/O)".into(),
            StopReason::Interrupted => "interrupted (the VMM was asked to stop)".into(),
            other => format!("{other:?}"),
        };
        writeln!(
            f,
            "guest failed after {:.1}s: {why}",
            self.elapsed.as_secs_f64()
        )?;
        match self.last_milestone() {
            Some(m) => writeln!(
                f,
                "last milestone: {} at {:.1}s",
                m.name,
                m.at.as_secs_f64()
            )?,
            None => writeln!(f, "last milestone: none")?,
        }
        for v in &self.vcpus {
            writeln!(f, "{v}")?;
        }
        for (i, d) in self.disk_stats.iter().enumerate() {
            writeln!(
                f,
                "LUN {i}: {} reads ({} bytes), {} writes ({} bytes), {} flushes",
                d.reads, d.read_bytes, d.writes, d.write_bytes, d.flushes
            )?;
        }
        if !self.events.is_empty() {
            writeln!(f, "VMM events (last {}):", self.events.len().min(30))?;
            for e in self.events.iter().rev().take(30).rev() {
                writeln!(f, "  {e}")?;
            }
        }
        writeln!(f, "last console lines:")?;
        for l in &self.console_tail {
            writeln!(f, "  | {l}")?;
        }
        Ok(())
    }
}

/// Errors of [`run`].
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm is missing or unusable; callers that test may skip.
    #[error("KVM is not available: {0}")]
    KvmUnavailable(String),
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("loading the kernel: {0}")]
    Kernel(String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The guest failed, timed out or stalled; the report has the details.
    #[error("{0}")]
    Guest(Box<FailureReport>),
}

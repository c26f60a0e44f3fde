//! The guest's serial console: a vm-superio 8250 at 0x3F8 whose output goes to stdout or a
//! file, while the VMM keeps the last lines and watches for boot milestones and end markers.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::hv::lock;

/// COM1.
pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// Console lines kept for reports.
pub const TAIL_LINES: usize = 60;

/// A boot milestone recognised on the console (VMM.md §10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Milestone {
    /// Short name, see [`MILESTONES`].
    pub name: &'static str,
    /// Time since the VM started.
    pub at: Duration,
    /// The console line that showed it.
    pub line: String,
}

/// Milestones in boot order: (name, substrings that must all appear in one line).
pub const MILESTONES: &[(&str, &[&str])] = &[
    ("kernel-started", &["Linux version"]),
    (
        "hyperv-detected",
        &["Hypervisor detected: Microsoft Hyper-V"],
    ),
    ("vmbus-connected", &["Vmbus version:"]),
    ("storvsc-host", &["storvsc_host_t"]),
    ("scsi-disk", &["Msft", "Virtual Disk"]),
    ("disk-attached", &["[sd", "logical blocks"]),
    ("ext4-mounted", &["EXT4-fs (", "mounted filesystem"]),
    ("root-mounted", &["VFS: Mounted root"]),
    ("init-started", &["Run ", " as init process"]),
    ("kernel-panic", &["Kernel panic"]),
];

/// Why the VM stopped (set once, by whoever sees the reason first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A configured end marker appeared on the console.
    Marker(String),
    /// The guest reset itself (i8042 reset, triple fault treated as reset is NOT this).
    Reboot,
    /// ACPI poweroff.
    Poweroff,
    /// A vCPU hit something the VMM cannot continue from; the report says what.
    Failure(String),
    /// The configured time limit passed.
    Timeout,
    /// No console output and no I/O for the configured stall time.
    Stalled,
}

/// Shared stop flag with a condition variable for the main thread.
#[derive(Debug, Default)]
pub struct StopSignal {
    reason: Mutex<Option<StopReason>>,
    cv: Condvar,
}

impl StopSignal {
    /// Records `r` unless a reason is already set; returns whether it was recorded.
    pub fn stop(&self, r: StopReason) -> bool {
        let mut g = lock(&self.reason);
        if g.is_some() {
            return false;
        }
        *g = Some(r);
        self.cv.notify_all();
        true
    }

    pub fn reason(&self) -> Option<StopReason> {
        lock(&self.reason).clone()
    }

    pub fn stopped(&self) -> bool {
        lock(&self.reason).is_some()
    }

    /// Waits up to `d` for a stop; returns the reason if there is one.
    pub fn wait(&self, d: Duration) -> Option<StopReason> {
        let g = lock(&self.reason);
        let (g, _) = self
            .cv
            .wait_timeout_while(g, d, |r| r.is_none())
            .unwrap_or_else(|e| e.into_inner());
        g.clone()
    }
}

#[derive(Debug)]
struct LogInner {
    line: Vec<u8>,
    tail: VecDeque<String>,
    milestones: Vec<Milestone>,
    last_output: Instant,
    bytes: u64,
}

/// What the console has shown so far.
#[derive(Debug)]
pub struct ConsoleLog {
    start: Instant,
    stop_patterns: Vec<String>,
    stop: Arc<StopSignal>,
    inner: Mutex<LogInner>,
}

impl ConsoleLog {
    pub fn new(start: Instant, stop_patterns: Vec<String>, stop: Arc<StopSignal>) -> Self {
        ConsoleLog {
            start,
            stop_patterns,
            stop,
            inner: Mutex::new(LogInner {
                line: Vec::new(),
                tail: VecDeque::new(),
                milestones: Vec::new(),
                last_output: start,
                bytes: 0,
            }),
        }
    }

    /// Feeds guest output bytes.
    pub fn feed(&self, data: &[u8]) {
        let mut g = lock(&self.inner);
        g.bytes += data.len() as u64;
        g.last_output = Instant::now();
        for &b in data {
            match b {
                b'\n' => {
                    let raw = std::mem::take(&mut g.line);
                    let line = String::from_utf8_lossy(&raw)
                        .trim_end_matches('\r')
                        .to_string();
                    self.line_done(&mut g, line);
                }
                _ if g.line.len() < 4096 => g.line.push(b),
                _ => {}
            }
        }
    }

    fn line_done(&self, g: &mut LogInner, line: String) {
        for (name, needles) in MILESTONES {
            if needles.iter().all(|n| line.contains(n))
                && !g.milestones.iter().any(|m| m.name == *name)
            {
                g.milestones.push(Milestone {
                    name,
                    at: self.start.elapsed(),
                    line: line.clone(),
                });
            }
        }
        for p in &self.stop_patterns {
            if line.contains(p.as_str()) {
                self.stop.stop(StopReason::Marker(p.clone()));
            }
        }
        if g.tail.len() >= TAIL_LINES {
            g.tail.pop_front();
        }
        g.tail.push_back(line);
    }

    /// The last lines, including a partial one.
    pub fn tail(&self) -> Vec<String> {
        let g = lock(&self.inner);
        let mut v: Vec<String> = g.tail.iter().cloned().collect();
        if !g.line.is_empty() {
            v.push(String::from_utf8_lossy(&g.line).to_string());
        }
        v
    }

    pub fn milestones(&self) -> Vec<Milestone> {
        lock(&self.inner).milestones.clone()
    }

    pub fn last_output(&self) -> Instant {
        lock(&self.inner).last_output
    }

    pub fn bytes(&self) -> u64 {
        lock(&self.inner).bytes
    }
}

/// Where console bytes go: a writer plus the log.
pub struct ConsoleSink {
    out: Option<Box<dyn Write + Send>>,
    log: Arc<ConsoleLog>,
}

impl ConsoleSink {
    pub fn new(out: Option<Box<dyn Write + Send>>, log: Arc<ConsoleLog>) -> Self {
        ConsoleSink { out, log }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.log.feed(buf);
        if let Some(o) = self.out.as_mut() {
            // A console writer failing (closed pipe) must not stop the guest.
            let _ = o.write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(o) = self.out.as_mut() {
            let _ = o.flush();
        }
        Ok(())
    }
}

/// Raises the UART's interrupt through an irqfd on GSI 4.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The COM1 device.
pub struct SerialPort {
    inner: Mutex<Serial<IrqTrigger, NoEvents, ConsoleSink>>,
}

impl SerialPort {
    pub fn new(trigger: IrqTrigger, sink: ConsoleSink) -> Self {
        SerialPort {
            inner: Mutex::new(Serial::new(trigger, sink)),
        }
    }

    pub fn read(&self, offset: u8) -> u8 {
        lock(&self.inner).read(offset)
    }

    pub fn write(&self, offset: u8, value: u8) {
        let mut s = lock(&self.inner);
        // Errors here are from the interrupt trigger; the guest then just polls.
        let _ = s.write(offset, value);
    }

    pub fn flush(&self) {
        let _ = lock(&self.inner).writer_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milestones_and_markers() {
        let stop = Arc::new(StopSignal::default());
        let log = ConsoleLog::new(
            Instant::now(),
            vec!["Attempted to kill init".into()],
            stop.clone(),
        );
        log.feed(b"[    0.000000] Linux version 6.1.0 (x)\r\n[    0.1] Hypervisor detected: Microsoft Hyper-V\n");
        log.feed(
            b"[ 1.0] sd 0:0:0:0: [sda] 131072 512-byte logical blocks: (67.1 MB/64.0 MiB)\npartial",
        );
        let names: Vec<_> = log.milestones().iter().map(|m| m.name).collect();
        assert_eq!(
            names,
            vec!["kernel-started", "hyperv-detected", "disk-attached"]
        );
        assert_eq!(log.tail().last().unwrap(), "partial");
        assert!(!stop.stopped());
        log.feed(b"\nKernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\n");
        assert_eq!(
            stop.reason(),
            Some(StopReason::Marker("Attempted to kill init".into()))
        );
        assert!(!stop.stop(StopReason::Timeout));
    }
}

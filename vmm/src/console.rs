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

/// A boot milestone recognised on the console (docs/vmm.md, "Boot milestones").
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
    // md RAID workloads
    ("md-resync-started", &["md: resync of RAID array"]),
    ("md-resync-done", &[": resync done."]),
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
    /// The caller asked the run to stop (`VmConfig::interrupted`, e.g. Ctrl-C).
    Interrupted,
    /// `quit` on the control socket.
    Quit,
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
    /// For each of `ConsoleLog::watch`, whether a line has contained it.
    seen: Vec<bool>,
}

/// What the console has shown so far.
#[derive(Debug)]
pub struct ConsoleLog {
    start: Instant,
    stop_patterns: Vec<String>,
    stop: Arc<StopSignal>,
    /// Substrings whose first appearance is recorded (console script triggers).
    watch: Vec<String>,
    inner: Mutex<LogInner>,
}

impl ConsoleLog {
    pub fn new(start: Instant, stop_patterns: Vec<String>, stop: Arc<StopSignal>) -> Self {
        Self::with_watch(start, stop_patterns, stop, Vec::new())
    }

    /// Like [`ConsoleLog::new`], also recording whether each of `watch` has appeared.
    pub fn with_watch(
        start: Instant,
        stop_patterns: Vec<String>,
        stop: Arc<StopSignal>,
        watch: Vec<String>,
    ) -> Self {
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
                seen: vec![false; watch.len()],
            }),
            watch,
        }
    }

    /// Whether a console line has contained `pattern` (one of the `watch` patterns).
    pub fn seen(&self, pattern: &str) -> bool {
        let g = lock(&self.inner);
        self.watch
            .iter()
            .zip(&g.seen)
            .any(|(w, &seen)| seen && w == pattern)
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
        for (i, w) in self.watch.iter().enumerate() {
            if line.contains(w.as_str()) {
                g.seen[i] = true;
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

/// Input for the guest's serial console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialInput {
    /// Bytes the guest receives as typed characters.
    Text(Vec<u8>),
    /// A line break condition: the guest reads a NUL with the Break Interrupt bit in the line
    /// status. With Magic SysRq on a serial console, BREAK followed by a key runs that SysRq
    /// command (`s` sync, `u` remount read-only, `o` power off, `b` reboot).
    Break,
    /// Wait this long before the next item.
    Pause(Duration),
}

/// Host-to-guest input waiting for room in the UART's receive FIFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Byte(u8),
    Break,
}

/// Line Status Register offset and its Break Interrupt bit (not modelled by vm-superio).
const LSR_OFFSET: u8 = 5;
const LSR_BREAK_INTERRUPT: u8 = 0x10;
const DATA_OFFSET: u8 = 0;

struct SerialInner {
    uart: Serial<IrqTrigger, NoEvents, ConsoleSink>,
    /// Input not yet in the FIFO (the 64-byte FIFO fills up on long input).
    pending: VecDeque<Pending>,
    /// A BREAK's NUL is in the FIFO and the next LSR read must show BI (cleared by that read,
    /// as on a real 16550).
    break_latched: bool,
}

impl SerialInner {
    /// Moves pending input into the FIFO while there is room.
    fn pump(&mut self) {
        while let Some(&next) = self.pending.front() {
            match next {
                Pending::Break => {
                    // BI belongs to the character at the head of the FIFO, so a break waits
                    // until everything before it has been read.
                    if self.uart.fifo_capacity() < 64 || self.break_latched {
                        return;
                    }
                    if !matches!(self.uart.enqueue_raw_bytes(&[0]), Ok(1)) {
                        return;
                    }
                    self.break_latched = true;
                    self.pending.pop_front();
                }
                Pending::Byte(_) => {
                    let room = self.uart.fifo_capacity();
                    let mut chunk = Vec::new();
                    for p in self.pending.iter().take(room) {
                        match p {
                            Pending::Byte(b) => chunk.push(*b),
                            Pending::Break => break,
                        }
                    }
                    if chunk.is_empty() {
                        return;
                    }
                    match self.uart.enqueue_raw_bytes(&chunk) {
                        Ok(n) if n > 0 => {
                            self.pending.drain(..n);
                        }
                        // Full, or the UART is in loopback mode: try again later.
                        _ => return,
                    }
                }
            }
        }
    }
}

/// The COM1 device.
pub struct SerialPort {
    inner: Mutex<SerialInner>,
}

impl SerialPort {
    pub fn new(trigger: IrqTrigger, sink: ConsoleSink) -> Self {
        SerialPort {
            inner: Mutex::new(SerialInner {
                uart: Serial::new(trigger, sink),
                pending: VecDeque::new(),
                break_latched: false,
            }),
        }
    }

    pub fn read(&self, offset: u8) -> u8 {
        let mut s = lock(&self.inner);
        let mut v = s.uart.read(offset);
        if offset == LSR_OFFSET && s.break_latched {
            v |= LSR_BREAK_INTERRUPT;
            s.break_latched = false;
        }
        if offset == DATA_OFFSET && !s.pending.is_empty() {
            s.pump();
        }
        v
    }

    pub fn write(&self, offset: u8, value: u8) {
        let mut s = lock(&self.inner);
        // Errors here are from the interrupt trigger; the guest then just polls.
        let _ = s.uart.write(offset, value);
    }

    /// Queues input for the guest (a `Pause` is the caller's business and ignored here).
    pub fn send(&self, input: &SerialInput) {
        let mut s = lock(&self.inner);
        match input {
            SerialInput::Text(t) => s.pending.extend(t.iter().map(|&b| Pending::Byte(b))),
            SerialInput::Break => s.pending.push_back(Pending::Break),
            SerialInput::Pause(_) => {}
        }
        s.pump();
    }

    /// Retries queued input (called periodically: the guest may not read the FIFO dry).
    pub fn pump(&self) {
        lock(&self.inner).pump();
    }

    /// Input still waiting for FIFO room.
    pub fn pending(&self) -> usize {
        lock(&self.inner).pending.len()
    }

    pub fn flush(&self) {
        let _ = lock(&self.inner).uart.writer_mut().flush();
    }
}

/// One step of a console script: once `after` has appeared on the console (at once when
/// None), send `input` in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleStep {
    pub after: Option<String>,
    pub input: Vec<SerialInput>,
}

/// Plays `steps` against the guest until they are done or the VM stops. Runs on its own
/// thread; also keeps long input flowing into the 64-byte FIFO.
pub fn play_script(
    steps: Vec<ConsoleStep>,
    serial: Arc<SerialPort>,
    log: Arc<ConsoleLog>,
    stop: Arc<StopSignal>,
) {
    let tick = Duration::from_millis(50);
    for step in steps {
        if let Some(after) = &step.after {
            while !log.seen(after) {
                if stop.wait(tick).is_some() {
                    return;
                }
                serial.pump();
            }
        }
        for input in &step.input {
            match input {
                SerialInput::Pause(d) => {
                    if stop.wait(*d).is_some() {
                        return;
                    }
                }
                other => serial.send(other),
            }
        }
    }
    while serial.pending() > 0 && stop.wait(tick).is_none() {
        serial.pump();
    }
}

/// The console escape key: Ctrl-A, as in QEMU's `-nographic`.
pub const ESCAPE: u8 = 0x01;

/// What one chunk of keyboard input means once console escapes are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyAction {
    /// Send to the guest.
    Input(SerialInput),
    /// Ctrl-A x: stop the VM.
    Quit,
    /// Ctrl-A h (or an unknown Ctrl-A key): show the escape keys.
    Help,
}

/// The help text for [`ESCAPE`] sequences.
pub const ESCAPE_HELP: &str = "\r\nviridian console: Ctrl-A x quit, Ctrl-A b send BREAK (then a \
key = Magic SysRq), Ctrl-A Ctrl-A send Ctrl-A, Ctrl-A h this help\r\n";

/// Applies console escapes to keyboard input (`pending_escape` carries a Ctrl-A across reads).
pub fn decode_keys(bytes: &[u8], pending_escape: &mut bool) -> Vec<KeyAction> {
    let mut out = Vec::new();
    let mut text = Vec::new();
    let flush = |text: &mut Vec<u8>, out: &mut Vec<KeyAction>| {
        if !text.is_empty() {
            out.push(KeyAction::Input(SerialInput::Text(std::mem::take(text))));
        }
    };
    for &b in bytes {
        if *pending_escape {
            *pending_escape = false;
            match b {
                b'x' | b'X' => {
                    flush(&mut text, &mut out);
                    out.push(KeyAction::Quit);
                }
                b'b' | b'B' => {
                    flush(&mut text, &mut out);
                    out.push(KeyAction::Input(SerialInput::Break));
                }
                ESCAPE => text.push(ESCAPE),
                _ => {
                    flush(&mut text, &mut out);
                    out.push(KeyAction::Help);
                }
            }
        } else if b == ESCAPE {
            *pending_escape = true;
        } else {
            text.push(b);
        }
    }
    flush(&mut text, &mut out);
    out
}

/// Puts a terminal on stdin into raw input mode (no line editing, echo or signals: every key,
/// Ctrl-C included, goes to the guest; output processing stays on) and restores it on drop.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// None when stdin is not a terminal (nothing to change).
    pub fn enter() -> Option<RawTerminal> {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a properly sized, initialised
        // termios; failures are reported through their return values.
        unsafe {
            if libc::isatty(0) != 1 {
                return None;
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            raw.c_iflag &= !(libc::IGNBRK
                | libc::BRKINT
                | libc::PARMRK
                | libc::ISTRIP
                | libc::INLCR
                | libc::IGNCR
                | libc::ICRNL
                | libc::IXON);
            raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
            raw.c_cflag = (raw.c_cflag & !(libc::CSIZE | libc::PARENB)) | libc::CS8;
            raw.c_cc[libc::VMIN] = 1;
            raw.c_cc[libc::VTIME] = 0;
            if libc::tcsetattr(0, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(RawTerminal { saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read from the same fd in `enter`.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.saved);
        }
    }
}

/// Forwards the VMM's stdin to the guest console until EOF or the VM stops, applying the
/// Ctrl-A escapes ([`decode_keys`]). The caller puts a terminal into raw mode first
/// ([`RawTerminal`]) so keys arrive one by one. Stdin is read only when poll(2) says it is
/// readable, so the thread notices a stop within [`STDIN_POLL`] without reading (and losing)
/// input meant for whatever runs next, e.g. the next boot after a reboot.
pub fn forward_stdin(serial: Arc<SerialPort>, stop: Arc<StopSignal>) {
    let mut buf = [0u8; 256];
    let mut escape = false;
    while !stop.stopped() {
        let mut pfd = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout = STDIN_POLL.as_millis() as libc::c_int;
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, timeout) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if ready == 0 || stop.stopped() {
            continue;
        }
        // SAFETY: reads into a live buffer of the given length.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return; // EOF or a read error: no more input.
        }
        for action in decode_keys(&buf[..n as usize], &mut escape) {
            match action {
                KeyAction::Input(i) => serial.send(&i),
                KeyAction::Quit => {
                    stop.stop(StopReason::Interrupted);
                    return;
                }
                KeyAction::Help => eprint!("{ESCAPE_HELP}"),
            }
        }
    }
}

/// How often [`forward_stdin`] looks at the stop flag while stdin is idle.
pub const STDIN_POLL: Duration = Duration::from_millis(100);

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

    fn port() -> SerialPort {
        let stop = Arc::new(StopSignal::default());
        let log = Arc::new(ConsoleLog::new(Instant::now(), vec![], stop));
        let irq = IrqTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        SerialPort::new(irq, ConsoleSink::new(None, log))
    }

    /// Reads everything the guest would see: (LSR at the time, byte) pairs.
    fn drain(p: &SerialPort) -> Vec<(u8, u8)> {
        let mut got = Vec::new();
        for _ in 0..1000 {
            let lsr = p.read(LSR_OFFSET);
            if lsr & 1 == 0 {
                break;
            }
            got.push((lsr, p.read(DATA_OFFSET)));
        }
        got
    }

    #[test]
    fn break_shows_bi_once_with_its_nul() {
        let p = port();
        p.write(1, 0x05); // IER: receive data + line status interrupts
        p.send(&SerialInput::Text(b"ab".to_vec()));
        p.send(&SerialInput::Break);
        p.send(&SerialInput::Text(b"o".to_vec()));
        // The break waits behind "ab": BI must come with the NUL, not with 'a'.
        let got = drain(&p);
        let chars: Vec<u8> = got.iter().map(|g| g.1).collect();
        assert_eq!(chars, b"ab\0o");
        let bi: Vec<bool> = got.iter().map(|g| g.0 & LSR_BREAK_INTERRUPT != 0).collect();
        assert_eq!(bi, vec![false, false, true, false]);
        assert_eq!(p.read(LSR_OFFSET) & (LSR_BREAK_INTERRUPT | 1), 0);
    }

    #[test]
    fn console_escapes() {
        let mut esc = false;
        let t = |b: &[u8]| KeyAction::Input(SerialInput::Text(b.to_vec()));
        assert_eq!(decode_keys(b"ls\r", &mut esc), vec![t(b"ls\r")]);
        assert_eq!(
            decode_keys(b"a\x01bo\x01\x01z\x01?", &mut esc),
            vec![
                t(b"a"),
                KeyAction::Input(SerialInput::Break),
                t(b"o\x01z"),
                KeyAction::Help
            ]
        );
        // A Ctrl-A at the end of one read applies to the first byte of the next.
        assert_eq!(decode_keys(b"q\x01", &mut esc), vec![t(b"q")]);
        assert!(esc);
        assert_eq!(decode_keys(b"x", &mut esc), vec![KeyAction::Quit]);
        assert!(!esc);
    }

    #[test]
    fn long_input_flows_through_the_fifo() {
        let p = port();
        let text: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        p.send(&SerialInput::Text(text.clone()));
        assert!(p.pending() > 0, "more than a FIFO's worth waits");
        let got: Vec<u8> = drain(&p).into_iter().map(|g| g.1).collect();
        assert_eq!(got, text);
        assert_eq!(p.pending(), 0);
    }
}

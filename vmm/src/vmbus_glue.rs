//! Connects the `vmbus` channel server and the `storvsc-backend` SCSI controller to the
//! Hyper-V emulation: guest hypercalls go to the server, and the server's actions become
//! SynIC messages and event flags.
//!
//! Channel-management messages (HvPostMessage) are handled on the vCPU thread that made the
//! hypercall. Channel signals (HvSignalEvent) go to an I/O thread that drains the ring, does
//! the disk I/O and signals completions (SynIC events, MSIs); the signalling vCPU waits for
//! that at most [`SIGNAL_WAIT`], so requests served from the page cache complete before the
//! hypercall returns (as if served inline) while slow I/O never holds a vCPU longer.
//! `VmConfig::io_thread = false` (`VIRIDIAN_VMM_IO_THREAD=0`) serves signals inline on the
//! vCPU thread instead.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use storvsc_backend::{ScsiCdrom, ScsiController, ScsiDisk, StorvscDevice};
use vmbus::{Action, GuestMemory, MemoryError};

use crate::vmbus_devices::VmmDevice;

/// The VM's VMBus server, over the devices it offers.
pub(crate) type VmbusServer = vmbus::VmbusServer<VmmDevice>;

use crate::events::EventLog;
use crate::hv::{lock, status, Hv, HypercallTarget};
use crate::memory::GuestRam;
use crate::stats::CountingDisk;
use crate::VmmError;

/// Instance GUID of the one SCSI controller.
pub const SCSI_INSTANCE: &str = "f8b3781b-1e82-4818-a1c3-63d806ec15bb";

/// Guest RAM as the vmbus crate sees it.
pub struct VmbusMemory(pub Arc<GuestRam>);

fn oor(gpa: u64, len: u64) -> MemoryError {
    MemoryError::OutOfRange { gpa, len }
}

impl GuestMemory for VmbusMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.0
            .read(gpa, buf)
            .map_err(|_| oor(gpa, buf.len() as u64))
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.0
            .write(gpa, data)
            .map_err(|_| oor(gpa, data.len() as u64))
    }
    fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        if len == 0 {
            return self.0.host_range(gpa, 0).map(|_| ()).ok_or(oor(gpa, len));
        }
        // Ranges may span RAM regions only where both are RAM; check page by page.
        let end = gpa.checked_add(len).ok_or(oor(gpa, len))?;
        let mut a = gpa;
        while a < end {
            let n = ((a | 0xfff) + 1).min(end) - a;
            self.0.host_range(a, n as usize).ok_or(oor(gpa, len))?;
            a += n;
        }
        Ok(())
    }
    fn read_u32(&self, gpa: u64) -> Result<u32, MemoryError> {
        match self.0.atomic_u32(gpa) {
            Ok(a) => Ok(a.load(Ordering::Acquire)),
            Err(_) => {
                let mut b = [0u8; 4];
                self.read(gpa, &mut b)?;
                Ok(u32::from_le_bytes(b))
            }
        }
    }
    fn write_u32(&self, gpa: u64, v: u32) -> Result<(), MemoryError> {
        match self.0.atomic_u32(gpa) {
            Ok(a) => {
                a.store(v, Ordering::Release);
                Ok(())
            }
            Err(_) => self.write(gpa, &v.to_le_bytes()),
        }
    }
}

/// How long a signalling vCPU waits for the I/O thread to finish its request before it goes
/// back to the guest. A request served from the page cache takes tens of microseconds and
/// then completes exactly as in the synchronous mode (the completion is in the guest's ring
/// when the hypercall returns); a slow one no longer holds the vCPU longer than this.
const SIGNAL_WAIT: Duration = Duration::from_millis(1);

#[derive(Default)]
struct KickState {
    /// Connection ids signalled since the I/O thread last looked.
    pending: BTreeSet<u32>,
    /// Signals queued so far, and how many of them have been served.
    queued: u64,
    served: u64,
}

/// Channel signals waiting for the I/O thread.
#[derive(Default)]
struct Kicks {
    state: Mutex<KickState>,
    /// The I/O thread waits here for work.
    work: Condvar,
    /// Signalling vCPUs wait here (at most [`SIGNAL_WAIT`]) for their request to be served.
    done: Condvar,
    stopping: AtomicBool,
}

/// The VMBus server behind the hypercall page.
pub struct VmbusTarget {
    server: Mutex<VmbusServer>,
    mem: VmbusMemory,
    hv: Weak<Hv>,
    events: Arc<EventLog>,
    announced_version: Mutex<Option<u32>>,
    /// None: channel signals are served synchronously on the vCPU thread.
    kicks: Option<Arc<Kicks>>,
}

impl VmbusTarget {
    fn run_actions(&self, server: &mut VmbusServer) {
        for line in server.take_log() {
            self.events.note(format!("vmbus: {line}"));
        }
        let v = server.version();
        {
            let mut a = lock(&self.announced_version);
            if v.is_some() && *a != v {
                *a = v;
                if let Some(v) = v {
                    self.events.note(format!(
                        "vmbus: connected, version {}.{}",
                        v >> 16,
                        v & 0xffff
                    ));
                }
            }
        }
        let Some(hv) = self.hv.upgrade() else {
            return;
        };
        for a in server.take_actions() {
            match a {
                Action::DeliverMessage {
                    vp,
                    sint,
                    message_type,
                    payload,
                } => {
                    if let Err(e) = hv.post_message(vp, sint, message_type, &payload) {
                        self.events
                            .note(format!("vmbus: message to VP {vp} dropped: {e}"));
                    }
                }
                Action::SignalGuest { vp, sint, relid } => {
                    if let Err(e) = hv.signal_event(vp, sint, relid) {
                        self.events
                            .note(format!("vmbus: event for relid {relid} dropped: {e}"));
                    }
                }
                Action::ChannelFailed { relid, reason } => {
                    self.events
                        .note(format!("vmbus: channel {relid} failed: {reason}"));
                }
            }
        }
    }
}

impl HypercallTarget for VmbusTarget {
    fn post_message(&self, connection_id: u32, message_type: u32, payload: &[u8]) -> u16 {
        let mut s = lock(&self.server);
        let st = s.post_message(&self.mem, connection_id, message_type, payload);
        self.run_actions(&mut s);
        st
    }

    fn signal_event(&self, connection_id: u32, _flag: u16) -> u16 {
        let channel = (connection_id & 0xff_ffff) >= vmbus::protocol::CHANNEL_CONNECTION_BASE;
        if let (true, Some(k)) = (channel, &self.kicks) {
            // An unknown channel id is reported (logged) by the I/O thread; the guest does not
            // look at HvSignalEvent's status.
            let mut g = lock(&k.state);
            g.pending.insert(connection_id);
            g.queued += 1;
            let mine = g.queued;
            k.work.notify_one();
            let deadline = Instant::now() + SIGNAL_WAIT;
            while g.served < mine {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                g = k
                    .done
                    .wait_timeout(g, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            return status::SUCCESS;
        }
        self.serve_signal(connection_id)
    }
}

impl VmbusTarget {
    /// A target with no hypervisor behind it (its actions go nowhere), for tests of the
    /// host-side paths.
    #[cfg(test)]
    pub(crate) fn detached(server: VmbusServer, ram: Arc<GuestRam>) -> Arc<VmbusTarget> {
        Arc::new(VmbusTarget {
            server: Mutex::new(server),
            mem: VmbusMemory(ram),
            hv: Weak::new(),
            events: Arc::new(EventLog::new(false)),
            announced_version: Mutex::new(None),
            kicks: None,
        })
    }

    /// Runs `f` on the SCSI controller (host-side changes: hot-plug, media), then lets the
    /// device tell the guest (bus-change notice) and delivers what that produced. None when
    /// the VM has no SCSI controller.
    pub fn with_storvsc<R>(&self, f: impl FnOnce(&mut StorvscDevice) -> R) -> Option<R> {
        self.with_device(
            |d| match d {
                VmmDevice::Storvsc(s) => Some(s),
                _ => None,
            },
            f,
        )
    }

    /// Runs `f` on the shutdown integration service, when the VM offers one.
    pub fn with_shutdown_ic<R>(
        &self,
        f: impl FnOnce(&mut crate::shutdown_ic::ShutdownIc) -> R,
    ) -> Option<R> {
        self.with_device(
            |d| match d {
                VmmDevice::Shutdown(s) => Some(s),
                _ => None,
            },
            f,
        )
    }

    /// Runs `f` on the first device `pick` accepts, then polls the server and delivers what
    /// that produced. None when there is no such device.
    fn with_device<T, R>(
        &self,
        pick: impl Fn(&mut VmmDevice) -> Option<&mut T>,
        f: impl FnOnce(&mut T) -> R,
    ) -> Option<R> {
        let mut s = lock(&self.server);
        let relid = s
            .relids()
            .into_iter()
            .find(|&r| s.device_mut(r).and_then(&pick).is_some())?;
        let out = f(s.device_mut(relid).and_then(&pick)?);
        s.poll(&self.mem);
        self.run_actions(&mut s);
        Some(out)
    }

    fn serve_signal(&self, connection_id: u32) -> u16 {
        let mut s = lock(&self.server);
        let st = s.signal_event(&self.mem, connection_id);
        self.run_actions(&mut s);
        if st != status::SUCCESS {
            self.events.note(format!(
                "vmbus: HvSignalEvent({connection_id:#x}) -> {st:#x}"
            ));
        }
        st
    }
}

/// The I/O thread: serves queued channel signals until told to stop.
fn serve_kicks(target: Arc<VmbusTarget>, kicks: Arc<Kicks>) {
    loop {
        let (batch, upto) = {
            let mut g = lock(&kicks.state);
            while g.pending.is_empty() && !kicks.stopping.load(Ordering::Acquire) {
                g = kicks.work.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            if g.pending.is_empty() {
                return;
            }
            (std::mem::take(&mut g.pending), g.queued)
        };
        for id in batch {
            target.serve_signal(id);
        }
        lock(&kicks.state).served = upto;
        kicks.done.notify_all();
    }
}

/// Keeps the VMBus machinery alive for the VM's lifetime.
pub struct VmbusHandle {
    target: Arc<VmbusTarget>,
    io: Option<JoinHandle<()>>,
}

impl VmbusHandle {
    pub fn target(&self) -> &Arc<VmbusTarget> {
        &self.target
    }

    /// Stops the VMBus side (after the vCPUs have stopped): the I/O thread finishes what the
    /// guest had already signalled, then ends, so every acknowledged write is in the disk
    /// layer before the caller flushes the disks.
    pub fn shutdown(mut self) {
        if let Some(k) = &self.target.kicks {
            k.stopping.store(true, Ordering::Release);
            let _g = lock(&k.state);
            k.work.notify_all();
        }
        if let Some(t) = self.io.take() {
            let _ = t.join();
        }
    }
}

/// Builds the VMBus server with one SCSI controller holding `disks` as LUNs 0.., then the DVD
/// drives `dvds` (each with its medium, if any) as the next LUNs, and connects it to the
/// hypercall path. With `always_controller` the controller is there even without LUNs (for
/// hot-plug).
pub fn attach(
    hv: &Arc<Hv>,
    ram: &Arc<GuestRam>,
    disks: &[Arc<CountingDisk>],
    dvds: &[Option<Arc<CountingDisk>>],
    always_controller: bool,
    events: &Arc<EventLog>,
    io_thread: bool,
) -> Result<VmbusHandle, VmmError> {
    let mut server = VmbusServer::with_device_type();
    if !disks.is_empty() || !dvds.is_empty() || always_controller {
        let mut ctl = ScsiController::new();
        for (i, d) in disks.iter().enumerate() {
            let dev = disk::Disk::new(d.clone());
            let sd = ScsiDisk::new(dev)
                .map_err(|e| VmmError::Config(format!("disk {i}: {e}")))?
                .with_serial(&format!("viridian-lun{i}"));
            ctl.add_lun(i as u8, sd)
                .map_err(|e| VmmError::Config(format!("disk {i}: {e}")))?;
        }
        for (j, m) in dvds.iter().enumerate() {
            let lun = disks.len() + j;
            let serial = format!("viridian-lun{lun}");
            let cd = match m {
                Some(d) => ScsiCdrom::new(disk::Disk::new(d.clone()))
                    .map_err(|e| VmmError::Config(format!("DVD {j}: {e}")))?,
                None => ScsiCdrom::empty(),
            }
            .with_serial(&serial);
            let lun = u8::try_from(lun).map_err(|_| VmmError::Config("too many LUNs".into()))?;
            ctl.add_lun(lun, cd)
                .map_err(|e| VmmError::Config(format!("DVD {j}: {e}")))?;
        }
        let instance = vmbus::Guid::parse(SCSI_INSTANCE)
            .ok_or_else(|| VmmError::Config("bad SCSI instance GUID".into()))?;
        if server
            .add_device(VmmDevice::Storvsc(StorvscDevice::new(instance, ctl)))
            .is_none()
        {
            return Err(VmmError::Config("VMBus has no free channel".into()));
        }
    }
    // A controllable VM (the control socket) also offers the shutdown integration service,
    // for `system_powerdown`.
    if always_controller {
        let instance = vmbus::Guid::parse(crate::shutdown_ic::SHUTDOWN_IC_INSTANCE)
            .ok_or_else(|| VmmError::Config("bad shutdown IC instance GUID".into()))?;
        if server
            .add_device(VmmDevice::Shutdown(crate::shutdown_ic::ShutdownIc::new(
                instance,
            )))
            .is_none()
        {
            return Err(VmmError::Config("VMBus has no free channel".into()));
        }
    }
    let kicks = io_thread.then(|| Arc::new(Kicks::default()));
    let target = Arc::new(VmbusTarget {
        server: Mutex::new(server),
        mem: VmbusMemory(ram.clone()),
        hv: Arc::downgrade(hv),
        events: events.clone(),
        announced_version: Mutex::new(None),
        kicks: kicks.clone(),
    });
    let io = match kicks {
        Some(k) => {
            let t = target.clone();
            Some(
                std::thread::Builder::new()
                    .name("vmbus-io".into())
                    .spawn(move || serve_kicks(t, k))
                    .map_err(|e| VmmError::Io("spawning the VMBus I/O thread".into(), e))?,
            )
        }
        None => None,
    };
    hv.set_target(target.clone());
    Ok(VmbusHandle { target, io })
}

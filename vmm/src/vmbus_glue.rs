//! Connects the VMBus server and the storvsc back end to the Hyper-V emulation.
//! (Placeholder until the `vmbus` and `storvsc-backend` crates land: hypercalls are logged.)

use std::sync::Arc;

use crate::events::EventLog;
use crate::hv::Hv;
use crate::memory::GuestRam;
use crate::stats::CountingDisk;
use crate::VmmError;

/// Keeps the VMBus machinery alive for the VM's lifetime.
pub struct VmbusHandle;

pub fn attach(
    _hv: &Arc<Hv>,
    _ram: &Arc<GuestRam>,
    disks: &[Arc<CountingDisk>],
    events: &EventLog,
) -> Result<VmbusHandle, VmmError> {
    if !disks.is_empty() {
        events.note("no VMBus server yet: disks are not offered to the guest");
    }
    Ok(VmbusHandle)
}

impl VmbusHandle {
    /// Stops the VMBus workers (after the vCPUs have stopped).
    pub fn shutdown(self) {}
}

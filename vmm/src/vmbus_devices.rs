//! The VMBus devices this VMM offers, as one type: the control path reaches the one it needs
//! with a `match` (no downcast), and the VMBus server serves them all.

use storvsc_backend::StorvscDevice;
use vmbus::{ChannelIo, DeviceError, Guid, IncomingPacket, VmbusDevice};

use crate::shutdown_ic::ShutdownIc;

/// A device behind one of the VM's VMBus channels.
pub enum VmmDevice {
    /// The synthetic SCSI controller (disks and DVD drives).
    Storvsc(StorvscDevice),
    /// The shutdown integration service (`system_powerdown`).
    Shutdown(ShutdownIc),
}

impl VmmDevice {
    fn inner(&self) -> &dyn VmbusDevice {
        match self {
            VmmDevice::Storvsc(d) => d,
            VmmDevice::Shutdown(d) => d,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn VmbusDevice {
        match self {
            VmmDevice::Storvsc(d) => d,
            VmmDevice::Shutdown(d) => d,
        }
    }
}

impl VmbusDevice for VmmDevice {
    fn interface_type(&self) -> Guid {
        self.inner().interface_type()
    }
    fn interface_instance(&self) -> Guid {
        self.inner().interface_instance()
    }
    fn user_defined(&self) -> [u8; 120] {
        self.inner().user_defined()
    }
    fn min_ring_size(&self) -> u32 {
        self.inner().min_ring_size()
    }
    fn open(&mut self) -> Result<(), DeviceError> {
        self.inner_mut().open()
    }
    fn close(&mut self) {
        self.inner_mut().close()
    }
    fn packet(
        &mut self,
        io: &mut ChannelIo<'_>,
        packet: &IncomingPacket,
    ) -> Result<(), DeviceError> {
        self.inner_mut().packet(io, packet)
    }
    fn poll(&mut self, io: &mut ChannelIo<'_>) -> Result<(), DeviceError> {
        self.inner_mut().poll(io)
    }
}

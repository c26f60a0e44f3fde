//! The Hyper-V synthetic SCSI controller (StorVSP) for Viridian's VMM.
//!
//! Two layers, usable separately:
//! * [`scsi`]: a SCSI target over any `disk::Disk` ([`ScsiDisk`] per LUN,
//!   [`ScsiController`] for LUNs at path 0 / target 0). It knows nothing about VMBus: a command
//!   is a CDB plus a [`scsi::DataBuffer`], its result a [`scsi::Completion`].
//! * [`StorvscDevice`]: the vstor protocol (docs/vmm.md) as a [`vmbus::VmbusDevice`]: init
//!   sequence (BEGIN_INITIALIZATION, QUERY_PROTOCOL_VERSION accepting 6.0 and 5.1 and answering
//!   REVISION_MISMATCH to 6.2, QUERY_PROPERTIES without sub-channels, END_INITIALIZATION), and
//!   EXECUTE_SRB with data in GPA-direct ranges. Every completion is a 64-byte vstor packet
//!   (80 bytes with the VMBus descriptor) echoing the request's transaction id.
//!
//! Wiring it into a VMM:
//!
//! ```no_run
//! use std::sync::Arc;
//! use storvsc_backend::{ScsiController, ScsiDisk, StorvscDevice};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let disk: Arc<dyn disk::BlockDevice> = Arc::new(disk::RawDisk::memory(64 << 20)?);
//! let mut ctl = ScsiController::new();
//! ctl.add_lun(0, ScsiDisk::new(disk)?.with_serial("disk0"))?;
//! let instance = vmbus::Guid::parse("6a1a3ac5-5d9f-4bd8-9c3d-9a3c6e0b1f00").unwrap();
//! let mut server = vmbus::VmbusServer::new();
//! let relid = server.add_device(Box::new(StorvscDevice::new(instance, ctl)));
//! // Then drive `server` from HvPostMessage / HvSignalEvent (see the vmbus crate docs).
//! # let _ = relid; Ok(()) }
//! ```
//!
//! I/O is synchronous inside [`vmbus::VmbusServer::signal_event`]: call it from the thread that
//! should do the disk I/O (an I/O thread woken by an ioeventfd is the intended place).
//! Guest errors (bad CDB, bad lengths, GPA ranges outside guest memory, unknown operations)
//! fail the request with a logged reason and never panic the host.

#![forbid(unsafe_code)]

pub mod cdrom;
pub mod device;
pub mod scsi;
pub mod sense;
pub mod vstor;

pub use cdrom::{CdromError, MediaEvent, MediaEventCounts, ScsiCdrom};
pub use device::{StorvscDevice, StorvscStats};
pub use scsi::{Completion, Lun, ScsiController, ScsiDisk, ScsiError, Sense};
pub use vstor::{VstorPacket, SCSI_CLASS_ID};

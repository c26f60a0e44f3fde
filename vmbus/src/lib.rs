//! VMBus, host side: channel management, GPADLs, ring buffers and a channel server that
//! routes packets to devices (protocol facts: `docs/vmm.md` in this repository).
//!
//! The crate has no threads and no I/O of its own. The VMM feeds it the two guest→host
//! events and carries out the [`Action`]s it returns:
//!
//! ```text
//! vCPU exit: hypercall 0x5C HvPostMessage, RDX = input GPA
//!     status = server.hv_post_message(&mem, rdx)        // reads hv_input_post_message itself
//!     (or server.post_message(&mem, connection_id, message_type, payload) if you parsed it)
//!     RAX = status; then for a in server.take_actions() { vmm.do(a) }
//! vCPU exit / ioeventfd: hypercall 0x1005D HvSignalEvent (fast), RDX = conn_id | flag << 32
//!     status = server.hv_signal_event(&mem, rdx)        // = signal_event(&mem, conn_id):
//!                                                       //   drains that channel's ring
//!     for a in server.take_actions() { vmm.do(a) }
//! device finished async work / timer:  server.poll(&mem); take_actions()
//!
//! Action::DeliverMessage { vp, sint, message_type, payload } → SIMP slot `sint` of `vp`
//!     (FIFO per (vp, sint); msg_pending + EOM when the slot is busy), then inject the SINT vector
//! Action::SignalGuest { vp, sint, relid } → set bit `relid` of the event-flags area at byte
//!     offset sint*256 of `vp`'s SIEFP page (atomic OR), then inject the SINT vector
//! Action::ChannelFailed { relid, reason } → log it (the guest broke the protocol)
//! server.take_log() → lines to print (guest errors, protocol events)
//! ```
//!
//! Pieces, usable on their own:
//! * [`protocol`]: channel-management messages ([`Message::parse`], [`Message::encode`]).
//! * [`GuestMemory`]: the guest-memory trait (the VMM implements it over `vm-memory`;
//!   [`VecMemory`] is a plain buffer for tests). Every guest address is bounds-checked.
//! * [`GpadlTable`], [`PageBuffer`]: GPADL assembly and scatter/gather access to page lists.
//! * [`ring`]: ring-buffer reader/writer with the signalling rules of docs/vmm.md, "VMBus ring buffers".
//! * [`VmbusServer`] + [`VmbusDevice`]: the channel state machine and the device trait a
//!   device (e.g. `storvsc-backend`) implements. A device sees packets through
//!   [`ChannelIo`] (guest memory, completions, logging).
//!
//! Implementing [`GuestMemory`] in the VMM (vm-memory 0.18, `GuestMemoryMmap`):
//!
//! ```text
//! impl vmbus::GuestMemory for GuestRam {
//!     fn read(&self, gpa, buf)  -> self.mem.read_slice(buf, GuestAddress(gpa)) mapped to
//!                                  MemoryError::OutOfRange { gpa, len } on any error
//!     fn write(&self, gpa, data) -> self.mem.write_slice(data, GuestAddress(gpa)) likewise
//!     fn check(&self, gpa, len)  -> Ok iff gpa+len does not overflow and
//!                                  self.mem.check_range(GuestAddress(gpa), len)
//!     fn read_u32 / write_u32    -> self.mem.load/store::<u32>(.., Ordering::Acquire/Release)
//!                                  (ring indices must be single aligned accesses)
//! }
//! ```
//!
//! Threads: the server is `Send` and has no interior locking; put it in a `Mutex`. With one
//! vCPU the simplest wiring calls everything from the vCPU thread. With an I/O thread, forward
//! HvSignalEvent (ioeventfd per channel connection id) to it and call `signal_event` there;
//! HvPostMessage is rare after boot and can lock the same mutex from the vCPU thread.
//!
//! Guest errors never panic: malformed messages are logged and dropped (or answered with a
//! failure status), and a malformed ring stops its channel with [`Action::ChannelFailed`].

#![forbid(unsafe_code)]

pub mod gpadl;
pub mod guid;
pub mod memory;
pub mod protocol;
pub mod ring;
pub mod server;

pub use gpadl::{GpaRange, Gpadl, GpadlError, GpadlTable, PageBuffer};
pub use guid::Guid;
pub use memory::{GuestMemory, MemoryError, VecMemory, PAGE_SIZE};
pub use protocol::{Message, ProtocolError};
pub use ring::{IncomingPacket, PacketKind, RingError};
pub use server::{
    channel_connection_id, hv_status, Action, ChannelIo, ChannelState, DeviceError, VmbusDevice,
    VmbusServer,
};

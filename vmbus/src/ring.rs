//! VMBus ring buffers: one control page followed by a circular data area, in guest pages.
//!
//! The host reads the guest→host ring with [`RingReader`] and writes the host→guest ring with
//! [`RingWriter`]. The host keeps its own copy of the index it owns (read index of the inbound
//! ring, write index of the outbound ring) and only publishes it, so a guest that scribbles on
//! those fields cannot confuse it. The index the guest owns is validated on every read
//! (in range and 8-byte aligned); a bad value is a [`RingError`], after which the channel should
//! be stopped.
//!
//! Signalling (docs/vmm.md, "VMBus ring buffers"):
//! * Reader: [`RingReader::commit`] returns `true` when the guest's writer is waiting for space
//!   (`pending_send_sz`) and the read just freed enough of it: signal the guest.
//! * Writer: [`RingWriter::write`] returns `signal = true` when the ring was empty before the
//!   write and the guest has not masked interrupts.

use std::sync::atomic::{fence, Ordering};

use crate::gpadl::GpaRange;
use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE};
use crate::protocol::{rd16, rd32, rd64, wr16, wr64};

/// Control page offsets (`struct hv_ring_buffer`).
pub mod control {
    pub const WRITE_INDEX: u64 = 0;
    pub const READ_INDEX: u64 = 4;
    pub const INTERRUPT_MASK: u64 = 8;
    pub const PENDING_SEND_SZ: u64 = 12;
    pub const FEATURE_BITS: u64 = 64;
}
use control::*;
/// feature_bits bit 0: the ring supports pending_send_sz.
pub const FEAT_PENDING_SEND_SZ: u32 = 1;

/// Size of a packet descriptor.
pub const DESCRIPTOR_SIZE: usize = 16;
/// Size of the trailer after each packet (the writer's old write index << 32).
pub const TRAILER_SIZE: usize = 8;
/// Largest packet the host accepts from the guest (descriptor and payload).
pub const MAX_INCOMING_PACKET: usize = 64 * 1024;
/// Most GPA-direct ranges in one packet.
pub const MAX_GPA_RANGES: usize = 64;

/// Packet types.
pub mod packet_type {
    pub const DATA_INBAND: u16 = 6;
    pub const DATA_USING_XFER_PAGES: u16 = 7;
    pub const DATA_USING_GPADL: u16 = 8;
    pub const DATA_USING_GPA_DIRECT: u16 = 9;
    pub const CANCEL: u16 = 10;
    pub const COMPLETION: u16 = 11;
}
/// Descriptor flag: the sender wants a completion.
pub const FLAG_COMPLETION_REQUESTED: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("ring layout: {0}")]
    Layout(String),
    #[error("{which} index {value:#x} is invalid for a data area of {size:#x} bytes")]
    BadIndex {
        which: &'static str,
        value: u32,
        size: u32,
    },
    #[error("bad packet: {0}")]
    BadPacket(String),
}

/// The pages of one ring (control page first) in guest memory.
#[derive(Debug, Clone)]
pub struct Ring {
    control_gpa: u64,
    /// GPAs of the data pages, with runs of contiguous pages merged: (buffer offset, gpa, len).
    runs: Vec<(u32, u64, u32)>,
    size: u32,
}

impl Ring {
    /// A ring on `pfns` (at least 2: control + data). Every page must be guest memory.
    pub fn new(mem: &dyn GuestMemory, pfns: &[u64]) -> Result<Ring, RingError> {
        if pfns.len() < 2 {
            return Err(RingError::Layout(format!(
                "{} pages (need a control page and data pages)",
                pfns.len()
            )));
        }
        let data_pages = pfns.len() - 1;
        if data_pages as u64 * PAGE_SIZE > u32::MAX as u64 / 2 {
            return Err(RingError::Layout(format!("{data_pages} data pages")));
        }
        let gpa = |pfn: u64| -> Result<u64, RingError> {
            let g = pfn
                .checked_mul(PAGE_SIZE)
                .ok_or(MemoryError::OutOfRange { gpa: pfn, len: 0 })?;
            mem.check(g, PAGE_SIZE)?;
            Ok(g)
        };
        let control_gpa = gpa(pfns[0])?;
        let mut runs: Vec<(u32, u64, u32)> = Vec::new();
        for (i, &pfn) in pfns[1..].iter().enumerate() {
            let g = gpa(pfn)?;
            match runs.last_mut() {
                Some((_, start, len)) if *start + *len as u64 == g => *len += PAGE_SIZE as u32,
                _ => runs.push(((i as u64 * PAGE_SIZE) as u32, g, PAGE_SIZE as u32)),
            }
        }
        Ok(Ring {
            control_gpa,
            runs,
            size: (data_pages as u64 * PAGE_SIZE) as u32,
        })
    }

    /// Bytes in the data area.
    pub fn data_size(&self) -> u32 {
        self.size
    }

    fn control_u32(&self, mem: &dyn GuestMemory, off: u64) -> Result<u32, MemoryError> {
        mem.read_u32(self.control_gpa + off)
    }

    fn set_control_u32(&self, mem: &dyn GuestMemory, off: u64, v: u32) -> Result<(), MemoryError> {
        mem.write_u32(self.control_gpa + off, v)
    }

    /// Calls `f` for the guest pieces of `len` bytes at data offset `pos`, wrapping at the end.
    fn pieces(
        &self,
        mut pos: u32,
        len: usize,
        mut f: impl FnMut(u64, usize, usize) -> Result<(), MemoryError>,
    ) -> Result<(), MemoryError> {
        let mut done = 0usize;
        while done < len {
            pos %= self.size;
            // Find the run holding `pos` (runs are few: usually one).
            let idx = match self.runs.binary_search_by(|r| r.0.cmp(&pos)) {
                Ok(i) => i,
                Err(i) => i - 1,
            };
            let (start, gpa, rlen) = self.runs[idx];
            let within = pos - start;
            let n = ((rlen - within) as usize).min(len - done);
            f(gpa + within as u64, done, n)?;
            done += n;
            pos += n as u32;
        }
        Ok(())
    }

    fn read_data(
        &self,
        mem: &dyn GuestMemory,
        pos: u32,
        buf: &mut [u8],
    ) -> Result<(), MemoryError> {
        self.pieces(pos, buf.len(), |gpa, at, n| {
            mem.read(gpa, &mut buf[at..at + n])
        })
    }

    fn write_data(&self, mem: &dyn GuestMemory, pos: u32, data: &[u8]) -> Result<(), MemoryError> {
        self.pieces(pos, data.len(), |gpa, at, n| {
            mem.write(gpa, &data[at..at + n])
        })
    }

    fn check_index(&self, which: &'static str, value: u32) -> Result<u32, RingError> {
        if value >= self.size || value & 7 != 0 {
            return Err(RingError::BadIndex {
                which,
                value,
                size: self.size,
            });
        }
        Ok(value)
    }

    /// Bytes a writer at `w` may still use with the reader at `r` (docs/vmm.md, "VMBus ring buffers").
    fn writable(&self, w: u32, r: u32) -> u32 {
        if w >= r {
            self.size - (w - r)
        } else {
            r - w
        }
    }
}

/// What kind of packet arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketKind {
    /// DATA_INBAND (6).
    InBand,
    /// DATA_USING_GPA_DIRECT (9): the packet carries [`IncomingPacket::ranges`].
    GpaDirect,
    /// COMPLETION (11).
    Completion,
    /// Any other type (the device decides; most reject it).
    Other(u16),
}

/// One packet read from the guest→host ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingPacket {
    pub kind: PacketKind,
    pub flags: u16,
    pub trans_id: u64,
    /// Bytes from `offset8 * 8` to `len8 * 8`.
    pub payload: Vec<u8>,
    /// GPA-direct ranges (empty for other kinds).
    pub ranges: Vec<GpaRange>,
}

impl IncomingPacket {
    pub fn completion_requested(&self) -> bool {
        self.flags & FLAG_COMPLETION_REQUESTED != 0
    }
}

/// Parses the descriptor and body of one packet (`bytes` = `len8 * 8` bytes).
pub fn parse_packet(bytes: &[u8]) -> Result<IncomingPacket, RingError> {
    let bad = |s: String| RingError::BadPacket(s);
    if bytes.len() < DESCRIPTOR_SIZE {
        return Err(bad(format!("{} bytes", bytes.len())));
    }
    let ty = rd16(bytes, 0);
    let off = rd16(bytes, 2) as usize * 8;
    let len = rd16(bytes, 4) as usize * 8;
    if off < DESCRIPTOR_SIZE || off > len || len != bytes.len() {
        return Err(bad(format!("offset8*8 {off}, len8*8 {len}")));
    }
    let kind = match ty {
        packet_type::DATA_INBAND => PacketKind::InBand,
        packet_type::DATA_USING_GPA_DIRECT => PacketKind::GpaDirect,
        packet_type::COMPLETION => PacketKind::Completion,
        t => PacketKind::Other(t),
    };
    let mut ranges = Vec::new();
    if kind == PacketKind::GpaDirect {
        // u32 reserved, u32 range count, then ranges {u32 count, u32 offset, u64 pfn[n]}.
        if off < DESCRIPTOR_SIZE + 8 {
            return Err(bad("GPA direct header too short".into()));
        }
        let count = rd32(bytes, DESCRIPTOR_SIZE + 4) as usize;
        if count == 0 || count > MAX_GPA_RANGES {
            return Err(bad(format!("{count} GPA ranges")));
        }
        let mut at = DESCRIPTOR_SIZE + 8;
        for _ in 0..count {
            if at + 8 > off {
                return Err(bad("GPA range header past the header area".into()));
            }
            let byte_count = rd32(bytes, at);
            let byte_offset = rd32(bytes, at + 4);
            if byte_offset as u64 >= PAGE_SIZE {
                return Err(bad(format!("GPA range byte offset {byte_offset}")));
            }
            let n = (byte_offset as u64 + byte_count as u64).div_ceil(PAGE_SIZE) as usize;
            at += 8;
            if at + 8 * n > off {
                return Err(bad(format!("GPA range of {n} pages past the header area")));
            }
            let pfns = (0..n).map(|i| rd64(bytes, at + 8 * i)).collect();
            at += 8 * n;
            ranges.push(GpaRange {
                byte_count,
                byte_offset,
                pfns,
            });
        }
    }
    Ok(IncomingPacket {
        kind,
        flags: rd16(bytes, 6),
        trans_id: rd64(bytes, 8),
        payload: bytes[off..len].to_vec(),
        ranges,
    })
}

/// Builds a packet (descriptor, payload padded to 8 bytes; no trailer).
pub fn build_packet(ty: u16, flags: u16, trans_id: u64, header: &[u8], payload: &[u8]) -> Vec<u8> {
    let off = (DESCRIPTOR_SIZE + header.len()).next_multiple_of(8);
    let len = (off + payload.len()).next_multiple_of(8);
    let mut b = vec![0u8; len];
    wr16(&mut b, 0, ty);
    wr16(&mut b, 2, (off / 8) as u16);
    wr16(&mut b, 4, (len / 8) as u16);
    wr16(&mut b, 6, flags);
    wr64(&mut b, 8, trans_id);
    b[DESCRIPTOR_SIZE..DESCRIPTOR_SIZE + header.len()].copy_from_slice(header);
    b[off..off + payload.len()].copy_from_slice(payload);
    b
}

/// The host's reader of the guest→host ring.
#[derive(Debug)]
pub struct RingReader {
    ring: Ring,
    /// Our read index (authoritative; published by `commit`).
    read: u32,
    /// Read index last published.
    published: u32,
}

impl RingReader {
    /// Takes over a ring whose indices the guest has just initialised.
    pub fn new(mem: &dyn GuestMemory, ring: Ring) -> Result<Self, RingError> {
        let r = ring.check_index("read", ring.control_u32(mem, READ_INDEX)?)?;
        ring.check_index("write", ring.control_u32(mem, WRITE_INDEX)?)?;
        Ok(RingReader {
            ring,
            read: r,
            published: r,
        })
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    fn guest_write_index(&self, mem: &dyn GuestMemory) -> Result<u32, RingError> {
        let w = self.ring.control_u32(mem, WRITE_INDEX)?;
        fence(Ordering::Acquire);
        self.ring.check_index("write", w)
    }

    /// True when no unread packet is in the ring.
    pub fn is_empty(&self, mem: &dyn GuestMemory) -> Result<bool, RingError> {
        Ok(self.guest_write_index(mem)? == self.read)
    }

    /// Sets or clears the interrupt mask (set while draining so the guest need not signal).
    /// Clearing is followed by a full fence; the caller must then re-check [`Self::is_empty`].
    pub fn set_interrupt_mask(&self, mem: &dyn GuestMemory, masked: bool) -> Result<(), RingError> {
        self.ring
            .set_control_u32(mem, INTERRUPT_MASK, masked as u32)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Reads the next packet, if any. The space is returned to the guest by [`Self::commit`].
    pub fn read_packet(
        &mut self,
        mem: &dyn GuestMemory,
    ) -> Result<Option<IncomingPacket>, RingError> {
        let w = self.guest_write_index(mem)?;
        if w == self.read {
            return Ok(None);
        }
        let size = self.ring.size;
        let avail = if w > self.read {
            w - self.read
        } else {
            size - self.read + w
        };
        let mut desc = [0u8; DESCRIPTOR_SIZE];
        if (avail as usize) < DESCRIPTOR_SIZE + TRAILER_SIZE {
            return Err(RingError::BadPacket(format!(
                "only {avail} bytes in the ring"
            )));
        }
        self.ring.read_data(mem, self.read, &mut desc)?;
        let len = rd16(&desc, 4) as usize * 8;
        if !(DESCRIPTOR_SIZE..=MAX_INCOMING_PACKET).contains(&len)
            || len + TRAILER_SIZE > avail as usize
        {
            return Err(RingError::BadPacket(format!(
                "packet length {len} with {avail} bytes available"
            )));
        }
        let mut bytes = vec![0u8; len];
        self.ring.read_data(mem, self.read, &mut bytes)?;
        // The guest may have changed the descriptor between the two reads: parse the copy.
        if rd16(&bytes, 4) as usize * 8 != len {
            return Err(RingError::BadPacket(
                "descriptor changed while reading".into(),
            ));
        }
        let pkt = parse_packet(&bytes)?;
        self.read = ((self.read as usize + len + TRAILER_SIZE) % size as usize) as u32;
        Ok(Some(pkt))
    }

    /// Publishes the read index. Returns `true` when the guest should be signalled because it
    /// is waiting (pending_send_sz) for space that is now free.
    pub fn commit(&mut self, mem: &dyn GuestMemory) -> Result<bool, RingError> {
        if self.read == self.published {
            return Ok(false);
        }
        let w = self.guest_write_index(mem)?;
        let before = self.ring.writable(w, self.published);
        fence(Ordering::Release);
        self.ring.set_control_u32(mem, READ_INDEX, self.read)?;
        self.published = self.read;
        fence(Ordering::SeqCst);
        let pending = self.ring.control_u32(mem, PENDING_SEND_SZ)? & !7;
        if pending == 0 {
            return Ok(false);
        }
        let w = self.guest_write_index(mem)?;
        let after = self.ring.writable(w, self.read);
        Ok(before < pending && after >= pending)
    }
}

/// Result of [`RingWriter::write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Written; signal the guest when `signal`.
    Written { signal: bool },
    /// No room: `pending_send_sz` is set so the guest signals when it has read enough.
    Full,
}

/// The host's writer of the host→guest ring.
#[derive(Debug)]
pub struct RingWriter {
    ring: Ring,
    write: u32,
    pending_set: bool,
}

impl RingWriter {
    pub fn new(mem: &dyn GuestMemory, ring: Ring) -> Result<Self, RingError> {
        let w = ring.check_index("write", ring.control_u32(mem, WRITE_INDEX)?)?;
        ring.check_index("read", ring.control_u32(mem, READ_INDEX)?)?;
        Ok(RingWriter {
            ring,
            write: w,
            pending_set: false,
        })
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Writes one packet (from [`build_packet`]) and its trailer.
    pub fn write(
        &mut self,
        mem: &dyn GuestMemory,
        packet: &[u8],
    ) -> Result<WriteOutcome, RingError> {
        if packet.len() & 7 != 0 || packet.len() < DESCRIPTOR_SIZE {
            return Err(RingError::BadPacket(format!(
                "host packet of {} bytes",
                packet.len()
            )));
        }
        let total = packet.len() + TRAILER_SIZE;
        if total >= self.ring.size as usize {
            return Err(RingError::Layout(format!(
                "packet of {total} bytes cannot fit a ring of {} bytes",
                self.ring.size
            )));
        }
        let r = self
            .ring
            .check_index("read", self.ring.control_u32(mem, READ_INDEX)?)?;
        if self.ring.writable(self.write, r) as usize <= total {
            // Ask the guest to signal when it has made room, then look again in case it
            // already did (the guest checks pending_send_sz after publishing its read index).
            self.ring
                .set_control_u32(mem, PENDING_SEND_SZ, total as u32)?;
            self.pending_set = true;
            fence(Ordering::SeqCst);
            let r = self
                .ring
                .check_index("read", self.ring.control_u32(mem, READ_INDEX)?)?;
            if self.ring.writable(self.write, r) as usize <= total {
                return Ok(WriteOutcome::Full);
            }
        }
        if self.pending_set {
            self.ring.set_control_u32(mem, PENDING_SEND_SZ, 0)?;
            self.pending_set = false;
        }
        let old = self.write;
        self.ring.write_data(mem, old, packet)?;
        let trailer = ((old as u64) << 32).to_le_bytes();
        let after = ((old as usize + packet.len()) % self.ring.size as usize) as u32;
        self.ring.write_data(mem, after, &trailer)?;
        self.write = ((old as usize + total) % self.ring.size as usize) as u32;
        fence(Ordering::Release);
        self.ring.set_control_u32(mem, WRITE_INDEX, self.write)?;
        fence(Ordering::SeqCst);
        let masked = self.ring.control_u32(mem, INTERRUPT_MASK)? != 0;
        let r = self.ring.control_u32(mem, READ_INDEX)?;
        Ok(WriteOutcome::Written {
            signal: !masked && r == old,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::VecMemory;
    use crate::protocol::wr32;

    /// A minimal guest writer for the guest→host ring.
    fn guest_write(mem: &VecMemory, ctl: u64, data_gpa: u64, size: u32, pkt: &[u8]) -> bool {
        let w = mem.read_u32(ctl).unwrap();
        let r = mem.read_u32(ctl + 4).unwrap();
        let free = if w >= r { size - (w - r) } else { r - w };
        let total = pkt.len() as u32 + 8;
        if free <= total {
            return false;
        }
        let mut all = pkt.to_vec();
        all.extend_from_slice(&((w as u64) << 32).to_le_bytes());
        for (i, b) in all.iter().enumerate() {
            let pos = (w as u64 + i as u64) % size as u64;
            mem.write(data_gpa + pos, &[*b]).unwrap();
        }
        mem.write_u32(ctl, (w + total) % size).unwrap();
        true
    }

    #[test]
    fn read_wraps_and_commits() {
        let mem = VecMemory::new(8 * 4096);
        // control page 1, data pages 2 and 3 (contiguous): 8 KiB data.
        let ring = Ring::new(&mem, &[1, 2, 3]).unwrap();
        let mut rd = RingReader::new(&mem, ring).unwrap();
        let mut n = 0u64;
        for round in 0..200u64 {
            let payload: Vec<u8> = (0..(round % 50) * 8 + 8).map(|i| i as u8).collect();
            let pkt = build_packet(packet_type::DATA_INBAND, 1, round, &[], &payload);
            assert!(guest_write(&mem, 4096, 2 * 4096, 8192, &pkt));
            let p = rd.read_packet(&mem).unwrap().unwrap();
            assert_eq!(p.trans_id, round);
            assert_eq!(p.payload, payload);
            assert!(rd.read_packet(&mem).unwrap().is_none());
            rd.commit(&mem).unwrap();
            n += 1;
        }
        assert_eq!(n, 200);
        assert_eq!(mem.read_u32(4096 + 4).unwrap(), mem.read_u32(4096).unwrap());
    }

    #[test]
    fn writer_signals_on_empty_and_honours_mask() {
        let mem = VecMemory::new(8 * 4096);
        let ring = Ring::new(&mem, &[4, 6]).unwrap(); // 4 KiB data, non-contiguous pages
        let mut wr = RingWriter::new(&mem, ring).unwrap();
        let pkt = build_packet(packet_type::COMPLETION, 0, 7, &[], &[0u8; 64]);
        assert_eq!(
            wr.write(&mem, &pkt).unwrap(),
            WriteOutcome::Written { signal: true }
        );
        assert_eq!(
            wr.write(&mem, &pkt).unwrap(),
            WriteOutcome::Written { signal: false }
        );
        // Guest reads everything and masks interrupts.
        let w = mem.read_u32(4 * 4096).unwrap();
        mem.write_u32(4 * 4096 + 4, w).unwrap();
        mem.write_u32(4 * 4096 + 8, 1).unwrap();
        assert_eq!(
            wr.write(&mem, &pkt).unwrap(),
            WriteOutcome::Written { signal: false }
        );
        mem.write_u32(4 * 4096 + 8, 0).unwrap();
        // Fill the ring: 88 bytes per packet, 4096 bytes of data.
        let mut written = 1;
        while let WriteOutcome::Written { .. } = wr.write(&mem, &pkt).unwrap() {
            written += 1;
        }
        assert_eq!(written, 4095 / 88);
        assert_eq!(mem.read_u32(4 * 4096 + 12).unwrap(), 88);
        // Guest frees space: the next write succeeds and clears pending_send_sz.
        let w = mem.read_u32(4 * 4096).unwrap();
        mem.write_u32(4 * 4096 + 4, w).unwrap();
        assert!(matches!(
            wr.write(&mem, &pkt).unwrap(),
            WriteOutcome::Written { signal: true }
        ));
        assert_eq!(mem.read_u32(4 * 4096 + 12).unwrap(), 0);
        // The trailer holds the old write index.
        let mut t = [0u8; 8];
        mem.read(6 * 4096 + ((w as u64 + 80) % 4096), &mut t)
            .unwrap();
        assert_eq!(u64::from_le_bytes(t) >> 32, w as u64);
    }

    #[test]
    fn reader_signals_when_pending_space_frees() {
        let mem = VecMemory::new(8 * 4096);
        let ring = Ring::new(&mem, &[1, 2]).unwrap();
        let mut rd = RingReader::new(&mem, ring).unwrap();
        let pkt = build_packet(packet_type::DATA_INBAND, 1, 1, &[], &[0u8; 1000]);
        let mut n = 0;
        while guest_write(&mem, 4096, 2 * 4096, 4096, &pkt) {
            n += 1;
        }
        assert_eq!(n, 3, "the ring is never filled completely");
        mem.write_u32(4096 + 12, 1024 + 8).unwrap(); // guest waits for room for one more
        rd.read_packet(&mem).unwrap().unwrap();
        assert!(rd.commit(&mem).unwrap());
        rd.read_packet(&mem).unwrap().unwrap();
        assert!(!rd.commit(&mem).unwrap(), "already had enough space");
    }

    #[test]
    fn bad_indices_and_lengths_are_errors() {
        let mem = VecMemory::new(8 * 4096);
        mem.write_u32(4096, 4096).unwrap(); // write index == size
        assert!(matches!(
            RingReader::new(&mem, Ring::new(&mem, &[1, 2]).unwrap()),
            Err(RingError::BadIndex { .. })
        ));
        mem.write_u32(4096, 0).unwrap();
        let mut rd = RingReader::new(&mem, Ring::new(&mem, &[1, 2]).unwrap()).unwrap();
        mem.write_u32(4096, 12).unwrap(); // unaligned
        assert!(rd.read_packet(&mem).is_err());
        mem.write_u32(4096, 24).unwrap();
        // descriptor claims 4000 bytes but only 24 are there.
        let mut d = [0u8; 16];
        d[2] = 2;
        d[4..6].copy_from_slice(&500u16.to_le_bytes());
        mem.write(2 * 4096, &d).unwrap();
        assert!(matches!(rd.read_packet(&mem), Err(RingError::BadPacket(_))));
        // offset8 below the descriptor.
        d[2] = 1;
        d[4] = 2;
        d[5] = 0;
        mem.write(2 * 4096, &d).unwrap();
        assert!(matches!(rd.read_packet(&mem), Err(RingError::BadPacket(_))));
        // Ring pages outside memory.
        assert!(Ring::new(&mem, &[1, 100]).is_err());
        assert!(Ring::new(&mem, &[1]).is_err());
    }

    #[test]
    fn gpa_direct_parsing() {
        let mut hdr = vec![0u8; 8 + 8 + 16];
        wr32(&mut hdr, 4, 1);
        wr32(&mut hdr, 8, 5000);
        wr32(&mut hdr, 12, 100);
        wr64(&mut hdr, 16, 77);
        wr64(&mut hdr, 24, 78);
        let pkt = build_packet(packet_type::DATA_USING_GPA_DIRECT, 1, 9, &hdr, &[1u8; 64]);
        let p = parse_packet(&pkt).unwrap();
        assert_eq!(p.kind, PacketKind::GpaDirect);
        assert_eq!(p.ranges[0].pfns, vec![77, 78]);
        assert_eq!(p.payload.len(), 64);
        // Claims more pages than present.
        wr32(&mut hdr, 8, 9000);
        let pkt = build_packet(packet_type::DATA_USING_GPA_DIRECT, 1, 9, &hdr, &[1u8; 64]);
        assert!(parse_packet(&pkt).is_err());
        wr32(&mut hdr, 8, 100);
        wr32(&mut hdr, 12, 4096);
        let pkt = build_packet(packet_type::DATA_USING_GPA_DIRECT, 1, 9, &hdr, &[1u8; 64]);
        assert!(parse_packet(&pkt).is_err());
    }
}

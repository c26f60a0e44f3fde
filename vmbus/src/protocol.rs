//! VMBus channel-management messages (the payload of HvPostMessage / of a SynIC message).
//!
//! Every message starts with `{u32 msgtype; u32 padding}`; offsets in this module include that
//! header. [`Message::parse`] accepts a payload at least as long as the fixed part of its type
//! (extra bytes are ignored, as Hyper-V does) and [`Message::encode`] produces exactly the size
//! listed in [`Message::wire_size`].

use crate::guid::Guid;

/// The largest SynIC message payload.
pub const MAX_MESSAGE_PAYLOAD: usize = 240;
/// The SynIC message type of VMBus messages.
pub const HV_MESSAGE_TYPE_VMBUS: u32 = 1;
/// SINT used for VMBus messages and events before protocol 5.0 (and by Linux always).
pub const VMBUS_MESSAGE_SINT: u8 = 2;
/// Connection ids the guest posts messages to.
pub const VMBUS_MESSAGE_CONNECTION_ID: u32 = 1;
pub const VMBUS_MESSAGE_CONNECTION_ID_4: u32 = 4;
/// Base of per-channel connection ids (HvSignalEvent): `CHANNEL_CONNECTION_BASE + relid`.
pub const CHANNEL_CONNECTION_BASE: u32 = 0x2000;
/// The highest relid + 1 (the event-flags page has 2048 bits; bit 0 is reserved).
pub const MAX_CHANNEL_RELIDS: u32 = 2048;
/// GPADL header: PFNs that fit in the first message.
pub const GPADL_HEADER_MAX_PFNS: usize = 26;
/// GPADL body: PFNs per continuation message.
pub const GPADL_BODY_MAX_PFNS: usize = 28;

/// VMBus protocol versions (major << 16 | minor).
pub mod version {
    pub const WS2008: u32 = 0x000D;
    pub const WIN7: u32 = 0x1_0001;
    pub const WIN8: u32 = 0x2_0004;
    pub const WIN8_1: u32 = 0x3_0000;
    pub const WIN10: u32 = 0x4_0000;
    pub const WIN10_V4_1: u32 = 0x4_0001;
    pub const WIN10_V5: u32 = 0x5_0000;
    pub const WIN10_V5_1: u32 = 0x5_0001;
    pub const WIN10_V5_2: u32 = 0x5_0002;
    pub const WIN10_V5_3: u32 = 0x5_0003;
    pub const COPPER: u32 = 0x6_0000;
}

/// Message type numbers.
pub mod msgtype {
    pub const OFFER_CHANNEL: u32 = 1;
    pub const RESCIND_CHANNEL_OFFER: u32 = 2;
    pub const REQUEST_OFFERS: u32 = 3;
    pub const ALL_OFFERS_DELIVERED: u32 = 4;
    pub const OPEN_CHANNEL: u32 = 5;
    pub const OPEN_CHANNEL_RESULT: u32 = 6;
    pub const CLOSE_CHANNEL: u32 = 7;
    pub const GPADL_HEADER: u32 = 8;
    pub const GPADL_BODY: u32 = 9;
    pub const GPADL_CREATED: u32 = 10;
    pub const GPADL_TEARDOWN: u32 = 11;
    pub const GPADL_TORNDOWN: u32 = 12;
    pub const RELID_RELEASED: u32 = 13;
    pub const INITIATE_CONTACT: u32 = 14;
    pub const VERSION_RESPONSE: u32 = 15;
    pub const UNLOAD: u32 = 16;
    pub const UNLOAD_RESPONSE: u32 = 17;
    pub const MODIFY_CHANNEL: u32 = 22;
    pub const MODIFY_CHANNEL_RESPONSE: u32 = 24;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("message of {len} bytes is shorter than its header")]
    TooShort { len: usize },
    #[error("message type {msgtype} needs {need} bytes, got {got}")]
    Truncated {
        msgtype: u32,
        need: usize,
        got: usize,
    },
    #[error("message payload of {0} bytes exceeds 240")]
    TooLong(usize),
    #[error("unknown message type {0}")]
    UnknownType(u32),
    #[error("GPADL header: {0}")]
    BadGpadlHeader(String),
}

pub(crate) fn rd16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub(crate) fn rd32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub(crate) fn rd64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
pub(crate) fn wr16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn wr32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn wr64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// OFFERCHANNEL (196 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferChannel {
    pub interface_type: Guid,
    pub interface_instance: Guid,
    pub chn_flags: u16,
    pub mmio_megabytes: u16,
    pub user_defined: [u8; 120],
    pub sub_channel_index: u16,
    pub child_relid: u32,
    pub monitor_id: u8,
    pub monitor_allocated: bool,
    pub is_dedicated_interrupt: bool,
    pub connection_id: u32,
}

/// INITIATE_CONTACT (40 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitiateContact {
    pub version_requested: u32,
    pub target_vcpu: u32,
    /// Before 5.0: the interrupt page GPA. From 5.0: byte 0 msg_sint, byte 1 msg_vtl,
    /// bytes 4..8 feature flags.
    pub interrupt_page_or_sint: u64,
    pub monitor_page1: u64,
    pub monitor_page2: u64,
}

impl InitiateContact {
    /// The SINT the guest wants control messages on (2 before protocol 5.0).
    pub fn message_sint(&self) -> u8 {
        if self.version_requested >= version::WIN10_V5 {
            self.interrupt_page_or_sint as u8
        } else {
            VMBUS_MESSAGE_SINT
        }
    }
}

/// OPENCHANNEL (148 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenChannel {
    pub child_relid: u32,
    pub open_id: u32,
    pub ring_gpadl: u32,
    pub target_vp: u32,
    /// Pages of the guest→host ring (including its control page) at the start of the GPADL.
    pub downstream_page_offset: u32,
    pub user_data: [u8; 120],
}

/// GPADL_HEADER (28 + 8·n bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpadlHeader {
    pub child_relid: u32,
    pub gpadl: u32,
    /// `8 + 8 * total_pfns` for the single range.
    pub range_buflen: u16,
    pub range_count: u16,
    pub byte_count: u32,
    pub byte_offset: u32,
    /// The first PFNs (at most 26).
    pub pfns: Vec<u64>,
}

impl GpadlHeader {
    /// PFNs of the whole GPADL, from `range_buflen`.
    pub fn total_pfns(&self) -> usize {
        (self.range_buflen as usize).saturating_sub(8) / 8
    }
}

/// Every channel-management message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    OfferChannel(Box<OfferChannel>),
    RescindChannelOffer {
        child_relid: u32,
    },
    RequestOffers,
    AllOffersDelivered,
    OpenChannel(Box<OpenChannel>),
    OpenChannelResult {
        child_relid: u32,
        open_id: u32,
        status: u32,
    },
    CloseChannel {
        child_relid: u32,
    },
    GpadlHeader(GpadlHeader),
    GpadlBody {
        msg_number: u32,
        gpadl: u32,
        pfns: Vec<u64>,
    },
    GpadlCreated {
        child_relid: u32,
        gpadl: u32,
        status: u32,
    },
    GpadlTeardown {
        child_relid: u32,
        gpadl: u32,
    },
    GpadlTorndown {
        gpadl: u32,
    },
    RelidReleased {
        child_relid: u32,
    },
    InitiateContact(InitiateContact),
    VersionResponse {
        supported: bool,
        connection_state: u8,
        msg_conn_id: u32,
    },
    Unload,
    UnloadResponse,
    ModifyChannel {
        child_relid: u32,
        target_vp: u32,
    },
    ModifyChannelResponse {
        child_relid: u32,
        status: u32,
    },
}

/// Fixed size of each message type (for GPADL header/body: the size without PFNs).
pub fn fixed_size(msgtype: u32) -> Option<usize> {
    use msgtype::*;
    Some(match msgtype {
        OFFER_CHANNEL => 196,
        RESCIND_CHANNEL_OFFER => 12,
        REQUEST_OFFERS => 8,
        ALL_OFFERS_DELIVERED => 8,
        OPEN_CHANNEL => 148,
        OPEN_CHANNEL_RESULT => 20,
        CLOSE_CHANNEL => 12,
        GPADL_HEADER => 28,
        GPADL_BODY => 16,
        GPADL_CREATED => 20,
        GPADL_TEARDOWN => 16,
        GPADL_TORNDOWN => 12,
        RELID_RELEASED => 12,
        INITIATE_CONTACT => 40,
        VERSION_RESPONSE => 16,
        UNLOAD => 8,
        UNLOAD_RESPONSE => 8,
        MODIFY_CHANNEL => 16,
        MODIFY_CHANNEL_RESPONSE => 16,
        _ => return None,
    })
}

fn pfns_at(b: &[u8], off: usize, max: usize) -> Vec<u64> {
    let n = (b.len().saturating_sub(off) / 8).min(max);
    (0..n).map(|i| rd64(b, off + 8 * i)).collect()
}

impl Message {
    /// The message type number.
    pub fn msgtype(&self) -> u32 {
        use msgtype::*;
        match self {
            Message::OfferChannel(_) => OFFER_CHANNEL,
            Message::RescindChannelOffer { .. } => RESCIND_CHANNEL_OFFER,
            Message::RequestOffers => REQUEST_OFFERS,
            Message::AllOffersDelivered => ALL_OFFERS_DELIVERED,
            Message::OpenChannel(_) => OPEN_CHANNEL,
            Message::OpenChannelResult { .. } => OPEN_CHANNEL_RESULT,
            Message::CloseChannel { .. } => CLOSE_CHANNEL,
            Message::GpadlHeader(_) => GPADL_HEADER,
            Message::GpadlBody { .. } => GPADL_BODY,
            Message::GpadlCreated { .. } => GPADL_CREATED,
            Message::GpadlTeardown { .. } => GPADL_TEARDOWN,
            Message::GpadlTorndown { .. } => GPADL_TORNDOWN,
            Message::RelidReleased { .. } => RELID_RELEASED,
            Message::InitiateContact(_) => INITIATE_CONTACT,
            Message::VersionResponse { .. } => VERSION_RESPONSE,
            Message::Unload => UNLOAD,
            Message::UnloadResponse => UNLOAD_RESPONSE,
            Message::ModifyChannel { .. } => MODIFY_CHANNEL,
            Message::ModifyChannelResponse { .. } => MODIFY_CHANNEL_RESPONSE,
        }
    }

    /// The size [`Message::encode`] produces.
    pub fn wire_size(&self) -> usize {
        let fixed = fixed_size(self.msgtype()).unwrap_or(8);
        match self {
            Message::GpadlHeader(h) => fixed + 8 * h.pfns.len(),
            Message::GpadlBody { pfns, .. } => fixed + 8 * pfns.len(),
            _ => fixed,
        }
    }

    /// Parses one message payload.
    pub fn parse(b: &[u8]) -> Result<Message, ProtocolError> {
        use msgtype::*;
        if b.len() > MAX_MESSAGE_PAYLOAD {
            return Err(ProtocolError::TooLong(b.len()));
        }
        if b.len() < 8 {
            return Err(ProtocolError::TooShort { len: b.len() });
        }
        let t = rd32(b, 0);
        let need = fixed_size(t).ok_or(ProtocolError::UnknownType(t))?;
        if b.len() < need {
            return Err(ProtocolError::Truncated {
                msgtype: t,
                need,
                got: b.len(),
            });
        }
        Ok(match t {
            OFFER_CHANNEL => {
                let mut user_defined = [0u8; 120];
                user_defined.copy_from_slice(&b[60..180]);
                Message::OfferChannel(Box::new(OfferChannel {
                    interface_type: Guid::from_windows_bytes(
                        b[8..24].try_into().unwrap_or_default(),
                    ),
                    interface_instance: Guid::from_windows_bytes(
                        b[24..40].try_into().unwrap_or_default(),
                    ),
                    chn_flags: rd16(b, 56),
                    mmio_megabytes: rd16(b, 58),
                    user_defined,
                    sub_channel_index: rd16(b, 180),
                    child_relid: rd32(b, 184),
                    monitor_id: b[188],
                    monitor_allocated: b[189] & 1 != 0,
                    is_dedicated_interrupt: rd16(b, 190) & 1 != 0,
                    connection_id: rd32(b, 192),
                }))
            }
            RESCIND_CHANNEL_OFFER => Message::RescindChannelOffer {
                child_relid: rd32(b, 8),
            },
            REQUEST_OFFERS => Message::RequestOffers,
            ALL_OFFERS_DELIVERED => Message::AllOffersDelivered,
            OPEN_CHANNEL => {
                let mut user_data = [0u8; 120];
                user_data.copy_from_slice(&b[28..148]);
                Message::OpenChannel(Box::new(OpenChannel {
                    child_relid: rd32(b, 8),
                    open_id: rd32(b, 12),
                    ring_gpadl: rd32(b, 16),
                    target_vp: rd32(b, 20),
                    downstream_page_offset: rd32(b, 24),
                    user_data,
                }))
            }
            OPEN_CHANNEL_RESULT => Message::OpenChannelResult {
                child_relid: rd32(b, 8),
                open_id: rd32(b, 12),
                status: rd32(b, 16),
            },
            CLOSE_CHANNEL => Message::CloseChannel {
                child_relid: rd32(b, 8),
            },
            GPADL_HEADER => {
                let h = GpadlHeader {
                    child_relid: rd32(b, 8),
                    gpadl: rd32(b, 12),
                    range_buflen: rd16(b, 16),
                    range_count: rd16(b, 18),
                    byte_count: rd32(b, 20),
                    byte_offset: rd32(b, 24),
                    pfns: Vec::new(),
                };
                let total = h.total_pfns();
                let pfns = pfns_at(b, 28, total.min(GPADL_HEADER_MAX_PFNS));
                Message::GpadlHeader(GpadlHeader { pfns, ..h })
            }
            GPADL_BODY => Message::GpadlBody {
                msg_number: rd32(b, 8),
                gpadl: rd32(b, 12),
                pfns: pfns_at(b, 16, GPADL_BODY_MAX_PFNS),
            },
            GPADL_CREATED => Message::GpadlCreated {
                child_relid: rd32(b, 8),
                gpadl: rd32(b, 12),
                status: rd32(b, 16),
            },
            GPADL_TEARDOWN => Message::GpadlTeardown {
                child_relid: rd32(b, 8),
                gpadl: rd32(b, 12),
            },
            GPADL_TORNDOWN => Message::GpadlTorndown { gpadl: rd32(b, 8) },
            RELID_RELEASED => Message::RelidReleased {
                child_relid: rd32(b, 8),
            },
            INITIATE_CONTACT => Message::InitiateContact(InitiateContact {
                version_requested: rd32(b, 8),
                target_vcpu: rd32(b, 12),
                interrupt_page_or_sint: rd64(b, 16),
                monitor_page1: rd64(b, 24),
                monitor_page2: rd64(b, 32),
            }),
            VERSION_RESPONSE => Message::VersionResponse {
                supported: b[8] != 0,
                connection_state: b[9],
                msg_conn_id: rd32(b, 12),
            },
            UNLOAD => Message::Unload,
            UNLOAD_RESPONSE => Message::UnloadResponse,
            MODIFY_CHANNEL => Message::ModifyChannel {
                child_relid: rd32(b, 8),
                target_vp: rd32(b, 12),
            },
            MODIFY_CHANNEL_RESPONSE => Message::ModifyChannelResponse {
                child_relid: rd32(b, 8),
                status: rd32(b, 12),
            },
            other => return Err(ProtocolError::UnknownType(other)),
        })
    }

    /// Encodes the message (header included), `wire_size()` bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.wire_size()];
        wr32(&mut b, 0, self.msgtype());
        match self {
            Message::OfferChannel(o) => {
                b[8..24].copy_from_slice(&o.interface_type.to_windows_bytes());
                b[24..40].copy_from_slice(&o.interface_instance.to_windows_bytes());
                wr16(&mut b, 56, o.chn_flags);
                wr16(&mut b, 58, o.mmio_megabytes);
                b[60..180].copy_from_slice(&o.user_defined);
                wr16(&mut b, 180, o.sub_channel_index);
                wr32(&mut b, 184, o.child_relid);
                b[188] = o.monitor_id;
                b[189] = o.monitor_allocated as u8;
                wr16(&mut b, 190, o.is_dedicated_interrupt as u16);
                wr32(&mut b, 192, o.connection_id);
            }
            Message::RescindChannelOffer { child_relid }
            | Message::CloseChannel { child_relid }
            | Message::RelidReleased { child_relid } => wr32(&mut b, 8, *child_relid),
            Message::RequestOffers
            | Message::AllOffersDelivered
            | Message::Unload
            | Message::UnloadResponse => {}
            Message::OpenChannel(o) => {
                wr32(&mut b, 8, o.child_relid);
                wr32(&mut b, 12, o.open_id);
                wr32(&mut b, 16, o.ring_gpadl);
                wr32(&mut b, 20, o.target_vp);
                wr32(&mut b, 24, o.downstream_page_offset);
                b[28..148].copy_from_slice(&o.user_data);
            }
            Message::OpenChannelResult {
                child_relid,
                open_id,
                status,
            } => {
                wr32(&mut b, 8, *child_relid);
                wr32(&mut b, 12, *open_id);
                wr32(&mut b, 16, *status);
            }
            Message::GpadlHeader(h) => {
                wr32(&mut b, 8, h.child_relid);
                wr32(&mut b, 12, h.gpadl);
                wr16(&mut b, 16, h.range_buflen);
                wr16(&mut b, 18, h.range_count);
                wr32(&mut b, 20, h.byte_count);
                wr32(&mut b, 24, h.byte_offset);
                for (i, p) in h.pfns.iter().enumerate() {
                    wr64(&mut b, 28 + 8 * i, *p);
                }
            }
            Message::GpadlBody {
                msg_number,
                gpadl,
                pfns,
            } => {
                wr32(&mut b, 8, *msg_number);
                wr32(&mut b, 12, *gpadl);
                for (i, p) in pfns.iter().enumerate() {
                    wr64(&mut b, 16 + 8 * i, *p);
                }
            }
            Message::GpadlCreated {
                child_relid,
                gpadl,
                status,
            } => {
                wr32(&mut b, 8, *child_relid);
                wr32(&mut b, 12, *gpadl);
                wr32(&mut b, 16, *status);
            }
            Message::GpadlTeardown { child_relid, gpadl } => {
                wr32(&mut b, 8, *child_relid);
                wr32(&mut b, 12, *gpadl);
            }
            Message::GpadlTorndown { gpadl } => wr32(&mut b, 8, *gpadl),
            Message::InitiateContact(c) => {
                wr32(&mut b, 8, c.version_requested);
                wr32(&mut b, 12, c.target_vcpu);
                wr64(&mut b, 16, c.interrupt_page_or_sint);
                wr64(&mut b, 24, c.monitor_page1);
                wr64(&mut b, 32, c.monitor_page2);
            }
            Message::VersionResponse {
                supported,
                connection_state,
                msg_conn_id,
            } => {
                b[8] = *supported as u8;
                b[9] = *connection_state;
                wr32(&mut b, 12, *msg_conn_id);
            }
            Message::ModifyChannel {
                child_relid,
                target_vp,
            } => {
                wr32(&mut b, 8, *child_relid);
                wr32(&mut b, 12, *target_vp);
            }
            Message::ModifyChannelResponse {
                child_relid,
                status,
            } => {
                wr32(&mut b, 8, *child_relid);
                wr32(&mut b, 12, *status);
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Message> {
        vec![
            Message::OfferChannel(Box::new(OfferChannel {
                interface_type: Guid::from_windows_bytes([1; 16]),
                interface_instance: Guid::from_windows_bytes([2; 16]),
                chn_flags: 0,
                mmio_megabytes: 0,
                user_defined: [3; 120],
                sub_channel_index: 0,
                child_relid: 1,
                monitor_id: 0,
                monitor_allocated: false,
                is_dedicated_interrupt: true,
                connection_id: 0x2001,
            })),
            Message::RescindChannelOffer { child_relid: 1 },
            Message::RequestOffers,
            Message::AllOffersDelivered,
            Message::OpenChannel(Box::new(OpenChannel {
                child_relid: 1,
                open_id: 2,
                ring_gpadl: 3,
                target_vp: 4,
                downstream_page_offset: 5,
                user_data: [6; 120],
            })),
            Message::OpenChannelResult {
                child_relid: 1,
                open_id: 1,
                status: 0,
            },
            Message::CloseChannel { child_relid: 1 },
            Message::GpadlHeader(GpadlHeader {
                child_relid: 1,
                gpadl: 0xE1E10,
                range_buflen: 8 + 8 * 30,
                range_count: 1,
                byte_count: 30 * 4096,
                byte_offset: 0,
                pfns: (0..26).collect(),
            }),
            Message::GpadlBody {
                msg_number: 1,
                gpadl: 0xE1E10,
                pfns: (26..30).collect(),
            },
            Message::GpadlCreated {
                child_relid: 1,
                gpadl: 7,
                status: 0,
            },
            Message::GpadlTeardown {
                child_relid: 1,
                gpadl: 7,
            },
            Message::GpadlTorndown { gpadl: 7 },
            Message::RelidReleased { child_relid: 1 },
            Message::InitiateContact(InitiateContact {
                version_requested: version::WIN10_V5_3,
                target_vcpu: 0,
                interrupt_page_or_sint: 2,
                monitor_page1: 0x1000,
                monitor_page2: 0x2000,
            }),
            Message::VersionResponse {
                supported: true,
                connection_state: 0,
                msg_conn_id: 1,
            },
            Message::Unload,
            Message::UnloadResponse,
            Message::ModifyChannel {
                child_relid: 1,
                target_vp: 3,
            },
            Message::ModifyChannelResponse {
                child_relid: 1,
                status: 0,
            },
        ]
    }

    #[test]
    fn sizes_match_the_protocol() {
        let expect = [
            196,
            12,
            8,
            8,
            148,
            20,
            12,
            28 + 26 * 8,
            16 + 4 * 8,
            20,
            16,
            12,
            12,
            40,
            16,
            8,
            8,
            16,
            16,
        ];
        for (m, n) in all().iter().zip(expect) {
            let b = m.encode();
            assert_eq!(b.len(), n, "{m:?}");
            assert!(b.len() <= MAX_MESSAGE_PAYLOAD);
            assert_eq!(&Message::parse(&b).unwrap(), m);
        }
    }

    #[test]
    fn field_offsets() {
        // OFFERCHANNEL: relid at 184, monitor_allocated 189, dedicated 190, conn id 192.
        let b = all()[0].encode();
        assert_eq!(rd32(&b, 0), 1);
        assert_eq!(b[8], 1);
        assert_eq!(b[24], 2);
        assert_eq!(b[60], 3);
        assert_eq!(rd32(&b, 184), 1);
        assert_eq!(b[189], 0);
        assert_eq!(rd16(&b, 190), 1);
        assert_eq!(rd32(&b, 192), 0x2001);
        // OPENCHANNEL: downstream offset at 24, userdata at 28.
        let b = all()[4].encode();
        assert_eq!(
            (
                rd32(&b, 8),
                rd32(&b, 12),
                rd32(&b, 16),
                rd32(&b, 20),
                rd32(&b, 24)
            ),
            (1, 2, 3, 4, 5)
        );
        assert_eq!(b[28], 6);
        // INITIATE_CONTACT ≥ 5.0: msg_sint at 16.
        let b = all()[13].encode();
        assert_eq!(rd32(&b, 8), 0x50003);
        assert_eq!(b[16], 2);
        assert_eq!(rd64(&b, 24), 0x1000);
        // VERSION_RESPONSE: supported at 8, conn id at 12.
        let b = all()[14].encode();
        assert_eq!((b[8], b[9], rd32(&b, 12)), (1, 0, 1));
        // GPADL_HEADER: range_buflen at 16, byte_count at 20, pfns at 28.
        let b = all()[7].encode();
        assert_eq!(rd16(&b, 16), 8 + 240);
        assert_eq!(rd16(&b, 18), 1);
        assert_eq!(rd32(&b, 20), 30 * 4096);
        assert_eq!(rd64(&b, 28 + 8), 1);
    }

    #[test]
    fn bad_messages_are_errors() {
        assert!(matches!(
            Message::parse(&[1, 0, 0]),
            Err(ProtocolError::TooShort { .. })
        ));
        assert!(matches!(
            Message::parse(&[99, 0, 0, 0, 0, 0, 0, 0]),
            Err(ProtocolError::UnknownType(99))
        ));
        let mut b = all()[4].encode();
        b.truncate(100);
        assert!(matches!(
            Message::parse(&b),
            Err(ProtocolError::Truncated { .. })
        ));
        assert!(matches!(
            Message::parse(&[0u8; 241]),
            Err(ProtocolError::TooLong(241))
        ));
    }
}

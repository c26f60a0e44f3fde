//! Fixed newstyle option haggling.

use std::io::{Read, Write};
use std::time::Instant;

use crate::error::{ConnError, ConnResult};
use crate::proto::*;
use crate::server::Shared;

/// Longest option payload we read. Real options are tiny (a 4096-byte name plus a few
/// context queries); anything longer is answered with `NBD_REP_ERR_TOO_BIG`.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longer option payloads than `MAX_OPTION_LEN` are skipped up to this size (so the session
/// can go on); beyond it the connection is closed after the error reply.
const MAX_SKIP_LEN: u32 = 1 << 20;

/// What option haggling settled on.
#[derive(Debug)]
pub(crate) struct Session {
    pub export: usize,
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
}

/// Metadata contexts chosen by the last `NBD_OPT_SET_META_CONTEXT`, and for which export.
struct MetaChoice {
    export: usize,
    base_allocation: bool,
}

pub(crate) fn negotiate<R: Read, W: Write>(
    shared: &Shared,
    r: &mut R,
    w: &mut W,
) -> ConnResult<Option<Session>> {
    let started = Instant::now();
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello)?;

    let mut b4 = [0u8; 4];
    r.read_exact(&mut b4)?;
    let client_flags = u32::from_be_bytes(b4);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    // Clients that do not set FIXED_NEWSTYLE still get fixed-newstyle replies (the spec allows
    // it); every real client sets the bit.
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    let mut structured = false;
    let mut meta: Option<MetaChoice> = None;
    loop {
        if started.elapsed() > shared.config.handshake_timeout {
            return Err(ConnError::Protocol("handshake took too long".into()));
        }
        let mut hdr = [0u8; 16];
        r.read_exact(&mut hdr)?;
        if be64(&hdr[0..8]) != IHAVEOPT {
            return Err(ConnError::Protocol("bad option magic".into()));
        }
        let opt = be32(&hdr[8..12]);
        let len = be32(&hdr[12..16]);
        if len > MAX_OPTION_LEN {
            if opt == OPT_EXPORT_NAME {
                return Err(ConnError::Protocol("export name too long".into()));
            }
            if len > MAX_SKIP_LEN {
                reply(w, opt, REP_ERR_TOO_BIG, b"option data too long")?;
                return Err(ConnError::Protocol(format!("option of {len} bytes")));
            }
            skip(r, len as u64)?;
            reply(w, opt, REP_ERR_TOO_BIG, b"option data too long")?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;

        if shared.stopping() && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Ok(None);
            }
            reply(w, opt, REP_ERR_SHUTDOWN, b"server is shutting down")?;
            continue;
        }

        match opt {
            OPT_EXPORT_NAME => {
                let Some(idx) = shared.find_export(&data) else {
                    // This option cannot fail politely: the spec says to close.
                    return Err(ConnError::Protocol(format!(
                        "NBD_OPT_EXPORT_NAME for unknown export {:?}",
                        String::from_utf8_lossy(&data)
                    )));
                };
                let flags = transmission_flags(shared, idx, structured);
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&shared.exports[idx].disk.size().to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&out)?;
                return Ok(Some(session(idx, structured, &meta)));
            }
            OPT_ABORT => {
                // The client may already be gone; a failed ack changes nothing.
                let _ = reply(w, opt, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for e in &shared.exports {
                    let mut d = Vec::with_capacity(4 + e.name.len());
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    reply(w, opt, REP_SERVER, &d)?;
                }
                reply(w, opt, REP_ACK, &[])?;
            }
            OPT_STARTTLS => {
                reply(
                    w,
                    opt,
                    REP_ERR_POLICY,
                    b"TLS is not supported by this server",
                )?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = parse_info_request(&data) else {
                    reply(w, opt, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO data")?;
                    continue;
                };
                let Some(idx) = shared.find_export(name) else {
                    let msg = format!("no export named {:?}", String::from_utf8_lossy(name));
                    reply(w, opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                let e = &shared.exports[idx];
                let flags = transmission_flags(shared, idx, structured);
                let mut d = Vec::with_capacity(12);
                d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                d.extend_from_slice(&e.disk.size().to_be_bytes());
                d.extend_from_slice(&flags.to_be_bytes());
                reply(w, opt, REP_INFO, &d)?;
                if requests.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    reply(w, opt, REP_INFO, &d)?;
                }
                if requests.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
                    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(e.description.as_bytes());
                    reply(w, opt, REP_INFO, &d)?;
                }
                // Our constraints are the defaults' superset, so sending them unasked is fine.
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                d.extend_from_slice(&1u32.to_be_bytes());
                d.extend_from_slice(&preferred_block(shared, idx).to_be_bytes());
                d.extend_from_slice(&shared.config.max_request.to_be_bytes());
                reply(w, opt, REP_INFO, &d)?;
                reply(w, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Some(session(idx, structured, &meta)));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                    continue;
                }
                structured = true;
                reply(w, opt, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set {
                    // Replaced even when this request fails.
                    meta = None;
                }
                if !structured {
                    reply(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        b"negotiate NBD_OPT_STRUCTURED_REPLY first",
                    )?;
                    continue;
                }
                let Some((name, queries)) = parse_meta_request(&data) else {
                    reply(w, opt, REP_ERR_INVALID, b"malformed meta context request")?;
                    continue;
                };
                let Some(idx) = shared.find_export(name) else {
                    let msg = format!("no export named {:?}", String::from_utf8_lossy(name));
                    reply(w, opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                let matched = if set {
                    queries.iter().any(|q| *q == BASE_ALLOCATION.as_bytes())
                } else {
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| *q == b"base:" || *q == BASE_ALLOCATION.as_bytes())
                };
                if matched {
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    reply(w, opt, REP_META_CONTEXT, &d)?;
                }
                if set {
                    meta = Some(MetaChoice {
                        export: idx,
                        base_allocation: matched,
                    });
                }
                reply(w, opt, REP_ACK, &[])?;
            }
            _ => {
                let msg = format!("option {opt} is not supported");
                reply(w, opt, REP_ERR_UNSUP, msg.as_bytes())?;
            }
        }
    }
}

fn session(idx: usize, structured: bool, meta: &Option<MetaChoice>) -> Session {
    let base_allocation = matches!(meta, Some(m) if m.export == idx && m.base_allocation);
    Session {
        export: idx,
        structured,
        base_allocation,
    }
}

pub(crate) fn preferred_block(shared: &Shared, idx: usize) -> u32 {
    let d = &shared.exports[idx].disk;
    let p = d
        .physical_sector_size()
        .max(d.logical_sector_size())
        .max(4096);
    // Must be a power of two no larger than the maximum payload.
    let p = if p.is_power_of_two() { p } else { 4096 };
    p.min(shared.config.max_request)
}

fn transmission_flags(shared: &Shared, idx: usize, structured: bool) -> u16 {
    let e = &shared.exports[idx];
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_CACHE;
    if e.writable {
        f |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    } else {
        f |= FLAG_READ_ONLY;
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    if shared.config.multi_conn {
        f |= FLAG_CAN_MULTI_CONN;
    }
    f
}

/// Parses `u32 name length, name, u16 count, count × u16`; None when the lengths disagree.
fn parse_info_request(d: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let nlen = be32(d.get(0..4)?) as usize;
    let name = d.get(4..4usize.checked_add(nlen)?)?;
    let rest = &d[4 + nlen..];
    let n = be16(rest.get(0..2)?) as usize;
    let list = rest.get(2..)?;
    if list.len() != n * 2 {
        return None;
    }
    Some((name, list.chunks_exact(2).map(be16).collect()))
}

/// Parses `u32 name length, name, u32 count, count × (u32 length, query)`.
fn parse_meta_request(d: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let nlen = be32(d.get(0..4)?) as usize;
    let name = d.get(4..4usize.checked_add(nlen)?)?;
    let mut rest = &d[4 + nlen..];
    let n = be32(rest.get(0..4)?) as usize;
    rest = &rest[4..];
    // Each query needs at least 4 bytes, which bounds `n` by the (small) option length.
    if n > rest.len() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        let qlen = be32(rest.get(0..4)?) as usize;
        let q = rest.get(4..4usize.checked_add(qlen)?)?;
        queries.push(q);
        rest = &rest[4 + qlen..];
    }
    if !rest.is_empty() {
        return None;
    }
    Some((name, queries))
}

fn reply<W: Write>(w: &mut W, opt: u32, kind: u32, data: &[u8]) -> ConnResult<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    w.write_all(&out)?;
    Ok(())
}

/// Reads and drops `n` bytes.
pub(crate) fn skip<R: Read>(r: &mut R, n: u64) -> ConnResult<()> {
    let copied = std::io::copy(&mut r.take(n), &mut std::io::sink())?;
    if copied < n {
        return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_parsing_checks_lengths() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let (n, r) = parse_info_request(&d).unwrap();
        assert_eq!(n, b"abc");
        assert_eq!(r, vec![INFO_NAME, INFO_BLOCK_SIZE]);
        assert!(parse_info_request(&d[..d.len() - 1]).is_none());
        let mut bad = u32::MAX.to_be_bytes().to_vec();
        bad.extend_from_slice(&[0; 8]);
        assert!(parse_info_request(&bad).is_none());
    }

    #[test]
    fn meta_request_parsing_checks_lengths() {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        let (n, q) = parse_meta_request(&d).unwrap();
        assert!(n.is_empty());
        assert_eq!(q, vec![b"base:allocation".as_slice()]);
        assert!(parse_meta_request(&d[..d.len() - 1]).is_none());
        let mut huge = 0u32.to_be_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&huge).is_none());
    }
}

//! One client connection: handshake, then the transmission phase with a reader thread and a
//! pool of worker threads.

use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, MutexGuard};

use disk::map::status_through_chain;
use disk::ZeroFlags;

use crate::error::{ConnError, ConnResult};
use crate::handshake::{negotiate, skip, Session};
use crate::proto::*;
use crate::server::{ExportEntry, Shared};
use crate::stream::Stream;

/// Most descriptors in one block-status reply (the spec asks for at most 2^20).
const MAX_DESCRIPTORS: usize = 1 << 16;
/// Holes shorter than this inside a read are sent as data: a chunk header costs more.
const MIN_HOLE_CHUNK: u64 = 4096;
/// Reply/payload buffers up to this size are kept for reuse.
const POOL_BUF_MAX: usize = (2 << 20) + 4096;
const POOL_MAX_BUFS: usize = 16;

pub(crate) fn serve(shared: &Shared, stream: Stream) {
    let peer = stream.peer();
    shared.log(|| format!("{peer}: connected"));
    match run(shared, &stream) {
        Ok(()) => shared.log(|| format!("{peer}: closed")),
        Err(ConnError::Io(e)) if e.kind() == ErrorKind::UnexpectedEof => {
            shared.log(|| format!("{peer}: client went away"))
        }
        Err(e) => shared.log(|| format!("{peer}: {e}")),
    }
    stream.shutdown(Shutdown::Both);
}

fn run(shared: &Shared, stream: &Stream) -> ConnResult<()> {
    stream.set_read_timeout(Some(shared.config.handshake_timeout))?;
    stream.set_write_timeout(Some(shared.config.handshake_timeout))?;
    let mut reader = BufReader::with_capacity(256 << 10, stream.try_clone()?);
    let mut w = stream.try_clone()?;
    let Some(session) = negotiate(shared, &mut reader, &mut w)? else {
        return Ok(());
    };
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    let export_index = session.export;
    let export = &shared.exports[export_index];
    shared.log(|| format!("{}: serving export {:?}", stream.peer(), export.name));
    let conn = Conn {
        shared,
        export,
        session,
        writer: Mutex::new(w),
        sock: stream.try_clone()?,
        dead: AtomicBool::new(false),
        wrote: AtomicBool::new(false),
        budget: Budget::new(
            shared.config.max_inflight_requests,
            shared.config.max_inflight_bytes,
        ),
        pool: Mutex::new(Vec::new()),
    };
    let result = conn.transmission(reader);
    if export.writable && conn.wrote.load(Ordering::Acquire) {
        // Clients that forget FLUSH before disconnecting still get their data on disk.
        if let Err(e) = export.disk.flush() {
            shared.log(|| format!("flush after disconnect failed: {e}"));
            shared.record_failure(export_index, &e);
        }
    }
    result
}

/// Bounds what one connection may have in flight (requests and payload bytes).
struct Budget {
    state: Mutex<(usize, u64)>,
    cv: Condvar,
    max_reqs: usize,
    max_bytes: u64,
}

impl Budget {
    fn new(max_reqs: usize, max_bytes: u64) -> Self {
        Budget {
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
            max_reqs,
            max_bytes,
        }
    }
    fn lock(&self) -> MutexGuard<'_, (usize, u64)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn acquire(&self, bytes: u64) {
        let mut s = self.lock();
        while s.0 >= self.max_reqs || (s.0 > 0 && s.1 + bytes > self.max_bytes) {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.0 += 1;
        s.1 += bytes;
    }
    fn release(&self, bytes: u64) {
        let mut s = self.lock();
        s.0 -= 1;
        s.1 -= bytes;
        self.cv.notify_all();
    }
}

/// A validated request for a worker.
#[derive(Debug)]
enum Job {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    Write {
        offset: u64,
        /// The payload is `data[..len]` (pooled buffers may be longer).
        data: Vec<u8>,
        len: usize,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
    },
    Zero {
        offset: u64,
        len: u32,
        no_hole: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        one: bool,
    },
}

#[derive(Debug)]
struct Work {
    cookie: u64,
    fua: bool,
    cost: u64,
    job: Job,
}

struct Conn<'a> {
    shared: &'a Shared,
    export: &'a ExportEntry,
    session: Session,
    writer: Mutex<Stream>,
    sock: Stream,
    /// Writing a reply failed: the client is gone; stop doing work for it.
    dead: AtomicBool,
    wrote: AtomicBool,
    budget: Budget,
    pool: Mutex<Vec<Vec<u8>>>,
}

/// An error answer to a request, decided before or after doing the work.
struct Reject {
    errno: u32,
    msg: String,
}

fn reject(errno: u32, msg: impl Into<String>) -> Reject {
    Reject {
        errno,
        msg: msg.into(),
    }
}

impl Conn<'_> {
    fn disk(&self) -> &disk::Disk {
        &self.export.disk
    }

    fn transmission(&self, mut reader: BufReader<Stream>) -> ConnResult<()> {
        let workers = self.shared.config.workers_per_connection;
        let (tx, rx) = mpsc::channel::<Work>();
        let rx = Mutex::new(rx);
        std::thread::scope(|s| {
            let mut started = 0;
            for i in 0..workers {
                let rx = &rx;
                let b = std::thread::Builder::new().name(format!("nbd-worker-{i}"));
                if b.spawn_scoped(s, move || self.worker(rx)).is_ok() {
                    started += 1;
                }
            }
            if started == 0 {
                return Err(ConnError::Io(std::io::Error::other(
                    "cannot start any worker thread",
                )));
            }
            let r = self.read_requests(&mut reader, &tx);
            drop(tx);
            r
        })
    }

    fn worker(&self, rx: &Mutex<mpsc::Receiver<Work>>) {
        loop {
            let work = {
                let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
                match rx.recv() {
                    Ok(w) => w,
                    Err(_) => return,
                }
            };
            let cost = work.cost;
            let cookie = work.cookie;
            if !self.dead.load(Ordering::Acquire) {
                // A panicking disk implementation must not take the connection (or the
                // server) down: the request fails with EIO and the worker goes on.
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| self.execute(work)));
                if r.is_err() {
                    self.send_error(cookie, false, EIO, "internal error in the disk layer");
                }
            }
            self.budget.release(cost);
        }
    }

    /// The reader loop. Returns Ok on DISC or a clean EOF between requests.
    fn read_requests(&self, r: &mut BufReader<Stream>, tx: &mpsc::Sender<Work>) -> ConnResult<()> {
        let max = self.shared.config.max_request;
        loop {
            let mut h = [0u8; REQUEST_LEN];
            if let Err(e) = r.read_exact(&mut h) {
                if e.kind() == ErrorKind::UnexpectedEof && r.buffer().is_empty() {
                    // Client (or our shutdown) closed between requests.
                    return Ok(());
                }
                return Err(e.into());
            }
            if self.dead.load(Ordering::Acquire) {
                return Ok(());
            }
            if be32(&h[0..4]) != REQUEST_MAGIC {
                return Err(ConnError::Protocol("bad request magic".into()));
            }
            let flags = be16(&h[4..6]);
            let typ = be16(&h[6..8]);
            let cookie = be64(&h[8..16]);
            let offset = be64(&h[16..24]);
            let len = be32(&h[24..28]);
            let fua = flags & CMD_FLAG_FUA != 0;

            let checked = match typ {
                CMD_DISC => return Ok(()),
                CMD_WRITE => {
                    if len > max {
                        // Drain the payload so the stream stays in sync, then refuse.
                        skip(r, len as u64)?;
                        Err(reject(
                            EINVAL,
                            format!("write of {len} bytes exceeds the maximum payload {max}"),
                        ))
                    } else {
                        self.budget.acquire(len as u64);
                        let mut data = self.take_buf(len as usize);
                        if let Err(e) = r.read_exact(&mut data[..len as usize]) {
                            self.budget.release(len as u64);
                            return Err(e.into());
                        }
                        match self.check_write(flags, CMD_FLAG_FUA, offset, len as u64) {
                            Ok(()) => {
                                let w = Work {
                                    cookie,
                                    fua,
                                    cost: len as u64,
                                    job: Job::Write {
                                        offset,
                                        data,
                                        len: len as usize,
                                    },
                                };
                                if tx.send(w).is_err() {
                                    return Ok(());
                                }
                                continue;
                            }
                            Err(rej) => {
                                self.budget.release(len as u64);
                                self.give_buf(data);
                                Err(rej)
                            }
                        }
                    }
                }
                CMD_READ => self
                    .check_read(flags, offset, len)
                    .map(|()| Job::Read {
                        offset,
                        len,
                        df: flags & CMD_FLAG_DF != 0,
                    })
                    .map(Some),
                CMD_FLUSH => self
                    .check_flags(flags, CMD_FLAG_FUA)
                    .map(|()| Some(Job::Flush)),
                CMD_TRIM => self
                    .check_write(flags, CMD_FLAG_FUA, offset, len as u64)
                    .map_err(|rej| {
                        if rej.errno == ENOSPC {
                            reject(EINVAL, rej.msg)
                        } else {
                            rej
                        }
                    })
                    .map(|()| Some(Job::Trim { offset, len })),
                CMD_WRITE_ZEROES => {
                    let allowed = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO;
                    match self.check_write(flags, allowed, offset, len as u64) {
                        Err(rej) => Err(rej),
                        Ok(())
                            if flags & CMD_FLAG_FAST_ZERO != 0 && flags & CMD_FLAG_NO_HOLE != 0 =>
                        {
                            // Zeroing without deallocating writes buffers of zeros: no faster
                            // than a WRITE, so fail fast as the spec asks.
                            Err(reject(ENOTSUP, "fast zero without holes is not supported"))
                        }
                        Ok(()) => Ok(Some(Job::Zero {
                            offset,
                            len,
                            no_hole: flags & CMD_FLAG_NO_HOLE != 0,
                        })),
                    }
                }
                CMD_CACHE => self
                    .check_flags(flags, CMD_FLAG_FUA)
                    .and_then(|()| self.check_range(offset, len as u64, EINVAL))
                    .map(|()| None),
                CMD_BLOCK_STATUS => self.check_block_status(flags, offset, len).map(|()| {
                    Some(Job::BlockStatus {
                        offset,
                        len,
                        one: flags & CMD_FLAG_REQ_ONE != 0,
                    })
                }),
                _ => Err(reject(EINVAL, format!("unknown command {typ}"))),
            };
            match checked {
                Ok(Some(job)) => {
                    let cost = match job {
                        Job::Read { len, .. } => len as u64,
                        _ => 0,
                    };
                    self.budget.acquire(cost);
                    if tx
                        .send(Work {
                            cookie,
                            fua,
                            cost,
                            job,
                        })
                        .is_err()
                    {
                        return Ok(());
                    }
                }
                Ok(None) => self.send_ok(cookie),
                Err(rej) => {
                    let is_read = typ == CMD_READ;
                    self.send_error(cookie, is_read, rej.errno, &rej.msg)
                }
            }
        }
    }

    fn check_flags(&self, flags: u16, allowed: u16) -> Result<(), Reject> {
        // FUA is tolerated on every command (the spec notes clients that set it everywhere).
        let allowed = allowed | CMD_FLAG_FUA;
        if flags & !allowed != 0 {
            return Err(reject(EINVAL, format!("invalid command flags {flags:#x}")));
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64, errno: u32) -> Result<(), Reject> {
        let size = self.disk().size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(reject(
                errno,
                format!("offset {offset} length {len} is beyond the export size {size}"),
            )),
        }
    }

    fn check_read(&self, flags: u16, offset: u64, len: u32) -> Result<(), Reject> {
        let df = if self.session.structured {
            CMD_FLAG_DF
        } else {
            0
        };
        self.check_flags(flags, df)?;
        let max = self.shared.config.max_request;
        if len > max {
            let errno = if self.session.structured {
                EOVERFLOW
            } else {
                EINVAL
            };
            return Err(reject(
                errno,
                format!("read of {len} bytes exceeds the maximum payload {max}"),
            ));
        }
        self.check_range(offset, len as u64, EINVAL)
    }

    fn check_write(&self, flags: u16, allowed: u16, offset: u64, len: u64) -> Result<(), Reject> {
        self.check_flags(flags, allowed)?;
        if !self.export.writable {
            return Err(reject(EPERM, "the export is read-only"));
        }
        self.check_range(offset, len, ENOSPC)
    }

    fn check_block_status(&self, flags: u16, offset: u64, len: u32) -> Result<(), Reject> {
        self.check_flags(flags, CMD_FLAG_REQ_ONE)?;
        if !self.session.structured || !self.session.base_allocation {
            return Err(reject(EINVAL, "no metadata context was negotiated"));
        }
        if len == 0 {
            return Err(reject(EINVAL, "block status of length 0"));
        }
        self.check_range(offset, len as u64, EINVAL)
    }

    fn execute(&self, w: Work) {
        let Work {
            cookie, fua, job, ..
        } = w;
        let disk = self.disk();
        let res = match job {
            Job::Read { offset, len, df } => {
                let mut out = ReplyBuf {
                    v: self.take_buf(0),
                    used: 0,
                };
                self.read_reply(&mut out, cookie, offset, len, df);
                self.send(out.bytes());
                self.give_buf(out.v);
                return;
            }
            Job::BlockStatus { offset, len, one } => {
                let out = self.block_status_reply(cookie, offset, len, one);
                self.send(&out);
                return;
            }
            Job::Write { offset, data, len } => {
                let r = disk.write_at(&data[..len], offset);
                self.give_buf(data);
                self.wrote.store(true, Ordering::Release);
                r
            }
            Job::Flush => disk.flush(),
            Job::Trim { offset, len } => {
                self.wrote.store(true, Ordering::Release);
                disk.discard(offset, len as u64)
            }
            Job::Zero {
                offset,
                len,
                no_hole,
            } => {
                self.wrote.store(true, Ordering::Release);
                disk.write_zeroes(
                    offset,
                    len as u64,
                    ZeroFlags {
                        may_unmap: !no_hole,
                    },
                )
            }
        };
        let res = match res {
            Ok(()) if fua && self.export.writable => disk.flush(),
            r => r,
        };
        match res {
            Ok(()) => self.send_ok(cookie),
            Err(e) => {
                // A write or flush the disk could not do (no space, I/O error) means the
                // export's data is not what clients asked for: the server must not end in
                // success. Bad requests (range, read-only) are the client's problem.
                if matches!(errno_of(&e), EIO | ENOSPC) {
                    self.shared.record_failure(self.session.export, &e);
                }
                self.send_error(cookie, false, errno_of(&e), &e.to_string())
            }
        }
    }

    /// The whole reply to a READ in one buffer: simple, or structured with hole chunks.
    fn read_reply(&self, out: &mut ReplyBuf, cookie: u64, offset: u64, len: u32, df: bool) {
        let disk = self.disk();
        let mut hdr = Vec::with_capacity(32);
        if !self.session.structured {
            put_simple_reply(&mut hdr, 0, cookie);
            out.push(&hdr);
            if let Err(e) = disk.read_at(out.reserve(len as usize), offset) {
                hdr.clear();
                put_simple_reply(&mut hdr, errno_of(&e), cookie);
                out.used = 0;
                out.push(&hdr);
            }
            return;
        }
        if len == 0 {
            put_chunk_header(&mut hdr, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
            out.push(&hdr);
            return;
        }
        let segments = self.read_segments(offset, len as u64, df);
        let mut last_header = 0;
        for (start, n, hole) in segments {
            last_header = out.used;
            hdr.clear();
            if hole {
                put_chunk_header(&mut hdr, 0, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
                hdr.extend_from_slice(&start.to_be_bytes());
                hdr.extend_from_slice(&(n as u32).to_be_bytes());
                out.push(&hdr);
            } else {
                put_chunk_header(&mut hdr, 0, REPLY_TYPE_OFFSET_DATA, cookie, 8 + n as u32);
                hdr.extend_from_slice(&start.to_be_bytes());
                out.push(&hdr);
                if let Err(e) = disk.read_at(out.reserve(n as usize), start) {
                    // Nothing has been sent yet: replace the whole reply by one error chunk.
                    hdr.clear();
                    put_error_chunk(&mut hdr, cookie, errno_of(&e), &e.to_string());
                    out.used = 0;
                    out.push(&hdr);
                    return;
                }
            }
        }
        out.v[last_header + 4..last_header + 6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    }

    /// Splits a read into (offset, length, is_hole) runs from the merged allocation view.
    fn read_segments(&self, offset: u64, len: u64, df: bool) -> Vec<(u64, u64, bool)> {
        let end = offset + len;
        let mut segs: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let hole = match status_through_chain(self.disk(), pos, end - pos) {
                Ok(e) => Some((e.length.clamp(1, end - pos), !e.data)),
                Err(_) => None,
            };
            let Some((n, hole)) = hole else {
                // Cannot tell: read it as data (a read error, if any, is reported then).
                segs.push((pos, end - pos, false));
                break;
            };
            segs.push((pos, n, hole));
            pos += n;
        }
        let all_hole = segs.iter().all(|s| s.2);
        if df || segs.len() > 1 {
            for s in segs.iter_mut() {
                if s.2 && (df || s.1 < MIN_HOLE_CHUNK) {
                    s.2 = false;
                }
            }
        }
        if all_hole {
            return vec![(offset, len, true)];
        }
        let mut merged: Vec<(u64, u64, bool)> = Vec::with_capacity(segs.len());
        for s in segs {
            match merged.last_mut() {
                Some(l) if l.2 == s.2 => l.1 += s.1,
                _ => merged.push(s),
            }
        }
        merged
    }

    fn block_status_reply(&self, cookie: u64, offset: u64, len: u32, one: bool) -> Vec<u8> {
        let end = offset + len as u64;
        let mut descs: Vec<(u32, u32)> = Vec::new();
        let mut pos = offset;
        while pos < end && descs.len() < MAX_DESCRIPTORS {
            let e = match status_through_chain(self.disk(), pos, end - pos) {
                Ok(e) => e,
                Err(e) => {
                    if descs.is_empty() {
                        let mut out = Vec::new();
                        put_error_chunk(&mut out, cookie, errno_of(&e), &e.to_string());
                        return out;
                    }
                    break;
                }
            };
            let n = e.length.clamp(1, end - pos);
            let state = if e.data { 0 } else { STATE_HOLE | STATE_ZERO };
            match descs.last_mut() {
                Some(l) if l.1 == state => l.0 += n as u32,
                _ => descs.push((n as u32, state)),
            }
            pos += n;
            if one {
                break;
            }
        }
        let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + 4 + 8 * descs.len());
        put_chunk_header(
            &mut out,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            4 + 8 * descs.len() as u32,
        );
        out.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        for (n, st) in descs {
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(&st.to_be_bytes());
        }
        out
    }

    fn send_ok(&self, cookie: u64) {
        let mut out = Vec::with_capacity(SIMPLE_HEADER_LEN);
        put_simple_reply(&mut out, 0, cookie);
        self.send(&out);
    }

    fn send_error(&self, cookie: u64, is_read: bool, errno: u32, msg: &str) {
        let mut out = Vec::new();
        if self.session.structured {
            put_error_chunk(&mut out, cookie, errno, msg);
        } else {
            // A simple error reply carries no data, even for READ.
            let _ = is_read;
            put_simple_reply(&mut out, errno, cookie);
        }
        self.send(&out);
    }

    /// Writes one complete reply; replies never interleave. A failure means the client is
    /// gone: mark the connection dead and close the socket so the reader stops too.
    fn send(&self, bytes: &[u8]) {
        if self.dead.load(Ordering::Acquire) {
            return;
        }
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if w.write_all(bytes).is_err() {
            self.dead.store(true, Ordering::Release);
            self.sock.shutdown(Shutdown::Both);
        }
    }

    /// A buffer of at least `len` bytes (contents unspecified), reused when possible so
    /// that large requests neither allocate nor zero-fill each time.
    fn take_buf(&self, len: usize) -> Vec<u8> {
        let mut b = self
            .pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default();
        if b.len() < len {
            b.resize(len, 0);
        }
        b
    }

    fn give_buf(&self, b: Vec<u8>) {
        if b.capacity() <= POOL_BUF_MAX {
            let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            if p.len() < POOL_MAX_BUFS {
                p.push(b);
            }
        }
    }
}

/// A reply being built in a reused buffer: `v[..used]` is the reply; `v` beyond it is stale
/// bytes kept initialised so growing into it costs no zero-fill.
struct ReplyBuf {
    v: Vec<u8>,
    used: usize,
}

impl ReplyBuf {
    /// The next `n` bytes of the reply, to be filled by the caller.
    fn reserve(&mut self, n: usize) -> &mut [u8] {
        let end = self.used + n;
        if self.v.len() < end {
            self.v.resize(end, 0);
        }
        let start = self.used;
        self.used = end;
        &mut self.v[start..end]
    }

    fn push(&mut self, b: &[u8]) {
        self.reserve(b.len()).copy_from_slice(b);
    }

    fn bytes(&self) -> &[u8] {
        &self.v[..self.used]
    }
}

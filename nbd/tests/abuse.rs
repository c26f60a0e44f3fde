//! Hostile and broken clients speaking raw bytes. For each case: the protocol's error reply or
//! a clean close, and afterwards a well-behaved client still gets served.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use disk::BlockDevice;

const SIZE: u64 = 4 << 20;

struct Fixture {
    srv: TestServer,
    expected: Vec<u8>,
}

fn fixture(config: nbd::ServerConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (_, d, expected) = sparse_raw(dir.path(), "d.raw", SIZE, &[(1 << 20, 65536)]);
    let rw = disk::RawDisk::memory(SIZE).unwrap();
    let exports = vec![
        nbd::Export::new("disk", d),
        nbd::Export::new("rw", Arc::new(rw)).writable(true),
    ];
    Fixture {
        srv: TestServer::start_in(dir, exports, config),
        expected,
    }
}

impl Fixture {
    fn sock(&self) -> &std::path::Path {
        &self.srv.sock
    }

    /// A good client: full handshake, a structured read compared with the file, a block
    /// status, then a clean disconnect.
    fn good_client_works(&self) {
        let (mut c, size, _) = Client::open(self.sock(), "disk");
        assert_eq!(size, SIZE);
        let got = c.read(1, (1 << 20) - 4096, 16384).unwrap();
        assert!(got[..] == self.expected[(1 << 20) - 4096..(1 << 20) + 12288]);
        c.request(0, CMD_BLOCK_STATUS, 2, 0, SIZE as u32);
        let ch = c.chunks();
        assert_eq!(ch[0].kind, CHUNK_BLOCK_STATUS);
        c.request(0, CMD_DISC, 3, 0, 0);
        assert!(c.closed());
    }
}

#[test]
fn bad_handshake_magic_and_client_flags_close_the_connection() {
    let f = fixture(Default::default());
    // Unknown client flag bits.
    let mut c = Client::connect_raw(f.sock());
    let mut hello = [0u8; 18];
    std::io::Read::read_exact(&mut c.s, &mut hello).unwrap();
    c.send(&0x8000_0001u32.to_be_bytes());
    assert!(c.closed());
    // Bad option magic.
    let mut c = Client::connect(f.sock());
    c.send(b"GARBAGE!GARBAGE!GARBAGE!");
    assert!(c.closed());
    // An HTTP request instead of NBD.
    let mut c = Client::connect_raw(f.sock());
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(c.closed());
    f.good_client_works();
}

#[test]
fn unknown_and_malformed_options_get_error_replies() {
    let f = fixture(Default::default());
    let mut c = Client::connect(f.sock());
    c.opt(99, b"whatever");
    assert_eq!(c.opt_reply().1, REP_ERR_UNSUP);
    c.opt(5, &[]); // STARTTLS: not offered
    assert!(c.opt_reply().1 > 1 << 31);
    c.opt(OPT_LIST, b"x");
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    c.opt(OPT_GO, &[0, 0, 0, 200, b'a']); // name length beyond the data
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    c.opt(OPT_INFO, &info_data("nope", &[]));
    assert_eq!(c.opt_reply().1, REP_ERR_UNKNOWN);
    // Meta contexts need structured replies first.
    c.opt(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    );
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    c.structured();
    c.opt(
        OPT_SET_META_CONTEXT,
        &[0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 0, 0, 9],
    );
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    // LIST_META_CONTEXT with no query lists base:allocation with id 0.
    c.opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &[]));
    let (_, kind, d) = c.opt_reply();
    assert_eq!(kind, REP_META_CONTEXT);
    assert_eq!(&d[..4], &[0, 0, 0, 0]);
    assert_eq!(&d[4..], b"base:allocation");
    assert_eq!(c.opt_reply().1, REP_ACK);
    // Unknown contexts are ignored, not errors.
    assert!(c
        .set_meta("disk", &["qemu:dirty-bitmap:x", "base:"])
        .is_empty());
    // LIST names every export.
    c.opt(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (_, kind, d) = c.opt_reply();
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_SERVER);
        names.push(String::from_utf8(d[4..].to_vec()).unwrap());
    }
    assert_eq!(names, ["disk", "rw"]);
    // After all that, GO still works on this very connection.
    let (size, flags) = c.go("disk").unwrap();
    assert_eq!(size, SIZE);
    assert_ne!(flags & 2, 0, "read-only flag");
    // No context was selected for this export: BLOCK_STATUS is refused.
    c.request(0, CMD_BLOCK_STATUS, 7, 0, 4096);
    assert_eq!(c.status(7), EINVAL);
    f.good_client_works();
}

#[test]
fn huge_option_lengths_get_too_big() {
    let f = fixture(Default::default());
    // A large but skippable option: error, and the session goes on.
    let mut c = Client::connect(f.sock());
    c.opt(99, &vec![7u8; 200 << 10]);
    assert_eq!(c.opt_reply().1, REP_ERR_TOO_BIG);
    assert!(c.go("disk").is_ok());
    // A 4 GiB option: error, then the server hangs up rather than read it all.
    let mut c = Client::connect(f.sock());
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&b);
    assert_eq!(c.opt_reply().1, REP_ERR_TOO_BIG);
    assert!(c.closed());
    // EXPORT_NAME for an unknown export cannot be answered with an error: close.
    let mut c = Client::connect(f.sock());
    c.opt(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
    // ABORT is acknowledged.
    let mut c = Client::connect(f.sock());
    c.opt(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply().1, REP_ACK);
    assert!(c.closed());
    f.good_client_works();
}

#[test]
fn export_name_option_and_simple_replies() {
    let f = fixture(Default::default());
    let mut c = Client::connect(f.sock());
    c.opt(OPT_EXPORT_NAME, b"disk");
    let mut r = [0u8; 10];
    std::io::Read::read_exact(&mut c.s, &mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), SIZE);
    // Simple READ reply: header then data.
    c.request(0, CMD_READ, 5, 1 << 20, 512);
    let mut h = [0u8; 16 + 512];
    std::io::Read::read_exact(&mut c.s, &mut h).unwrap();
    assert_eq!(&h[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    assert_eq!(&h[4..8], &[0, 0, 0, 0]);
    assert!(h[16..] == f.expected[1 << 20..(1 << 20) + 512]);
    // Errors are simple replies without data.
    c.request(0, CMD_READ, 6, SIZE, 512);
    assert_eq!(c.status(6), EINVAL);
    c.request(0, CMD_READ, 7, 0, 64 << 20);
    assert_eq!(c.status(7), EINVAL);
    c.request(0, CMD_BLOCK_STATUS, 8, 0, 512);
    assert_eq!(c.status(8), EINVAL);
    c.request(0, CMD_DISC, 9, 0, 0);
    assert!(c.closed());
}

#[test]
fn oversized_out_of_range_unknown_and_read_only_requests_get_errors() {
    let f = fixture(Default::default());
    let (mut c, _, _) = Client::open(f.sock(), "disk");
    // Oversized read (> 32 MiB).
    c.request(0, CMD_READ, 1, 0, (32 << 20) + 1);
    assert_eq!(c.status(1), EOVERFLOW);
    // Offsets past the end, and offset + length overflowing u64.
    c.request(0, CMD_READ, 2, SIZE - 100, 4096);
    assert_eq!(c.status(2), EINVAL);
    c.request(0, CMD_READ, 3, u64::MAX - 10, 4096);
    assert_eq!(c.status(3), EINVAL);
    c.request(0, CMD_BLOCK_STATUS, 4, SIZE, 1);
    assert_eq!(c.status(4), EINVAL);
    // Unknown command and unknown flags.
    c.request(0, 42, 5, 0, 0);
    assert_eq!(c.status(5), EINVAL);
    c.request(0x8000, CMD_READ, 6, 0, 512);
    assert_eq!(c.status(6), EINVAL);
    // Writes to a read-only export: EPERM, payload consumed, stream stays in sync.
    c.write(0, 7, 0, &[1u8; 4096]);
    assert_eq!(c.status(7), EPERM);
    c.request(0, CMD_TRIM, 8, 0, 4096);
    assert_eq!(c.status(8), EPERM);
    c.request(0, CMD_WRITE_ZEROES, 9, 0, 4096);
    assert_eq!(c.status(9), EPERM);
    // Oversized write (33 MiB payload): refused after draining it.
    let big = vec![0xAAu8; 33 << 20];
    c.write(0, 10, 0, &big);
    assert_eq!(c.status(10), EINVAL);
    // Still in sync.
    let got = c.read(11, 1 << 20, 4096).unwrap();
    assert!(got[..] == f.expected[1 << 20..(1 << 20) + 4096]);
    // Zero-length read is answered.
    c.request(0, CMD_READ, 12, 0, 0);
    assert_eq!(c.status(12), 0);

    // Writable export: out of range writes are ENOSPC, fast zero without holes is ENOTSUP.
    let (mut w, _, _) = Client::open(f.sock(), "rw");
    w.write(0, 1, SIZE - 10, &[1u8; 20]);
    assert_eq!(w.status(1), ENOSPC);
    w.request(0, CMD_WRITE_ZEROES, 2, SIZE, 512);
    assert_eq!(w.status(2), ENOSPC);
    w.request(0, CMD_TRIM, 3, SIZE, 512);
    assert_eq!(w.status(3), EINVAL);
    w.request(FLAG_FAST_ZERO | FLAG_NO_HOLE, CMD_WRITE_ZEROES, 4, 0, 512);
    assert_eq!(w.status(4), ENOTSUP);
    w.request(FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 5, 0, 512);
    assert_eq!(w.status(5), 0);
    // A FUA write and a flush succeed and read back.
    w.write(FLAG_FUA, 6, 12345, b"hello nbd");
    assert_eq!(w.status(6), 0);
    w.request(0, CMD_FLUSH, 7, 0, 0);
    assert_eq!(w.status(7), 0);
    assert_eq!(w.read(8, 12345, 9).unwrap(), b"hello nbd");
    // DF read over data and hole gives one data chunk.
    w.request(FLAG_DF, CMD_READ, 9, 8192, 16384);
    let ch = w.chunks();
    assert_eq!(ch.iter().filter(|c| c.kind == CHUNK_DATA).count(), 1);
    f.good_client_works();
}

#[test]
fn garbage_after_handshake_closes_only_that_connection() {
    let f = fixture(Default::default());
    let (mut c, _, _) = Client::open(f.sock(), "disk");
    let (mut other, _, _) = Client::open(f.sock(), "disk");
    c.send(&[0x55u8; 100]);
    assert!(c.closed());
    // The other, already connected client is unaffected.
    let got = other.read(1, 1 << 20, 512).unwrap();
    assert!(got[..] == f.expected[1 << 20..(1 << 20) + 512]);
    f.good_client_works();
}

#[test]
fn half_closed_connections_are_cleaned_up() {
    let f = fixture(Default::default());
    // Mid-payload: a 1 MiB write with only 1000 bytes sent, then the write side closed.
    let (mut c, _, _) = Client::open(f.sock(), "rw");
    c.request(0, CMD_WRITE, 1, 0, 1 << 20);
    c.send(&[9u8; 1000]);
    c.s.shutdown(Shutdown::Write).unwrap();
    assert!(c.closed());
    // Mid-request-header.
    let (mut c, _, _) = Client::open(f.sock(), "disk");
    c.send(&REQUEST_MAGIC.to_be_bytes());
    c.s.shutdown(Shutdown::Write).unwrap();
    assert!(c.closed());
    // Mid-option.
    let mut c = Client::connect(f.sock());
    c.send(&IHAVEOPT.to_be_bytes());
    c.s.shutdown(Shutdown::Write).unwrap();
    assert!(c.closed());
    // Before even the client flags.
    let mut c = Client::connect_raw(f.sock());
    c.s.shutdown(Shutdown::Write).unwrap();
    assert!(c.closed());
    // Requests pipelined, then the write side closed: replies still arrive.
    let (mut c, _, _) = Client::open(f.sock(), "disk");
    for i in 0..8 {
        c.request(0, CMD_READ, i, i * 4096, 4096);
    }
    c.s.shutdown(Shutdown::Write).unwrap();
    let mut seen = 0;
    for _ in 0..8 {
        seen |= 1 << c.chunks()[0].cookie;
    }
    assert_eq!(seen, 0xff);
    assert!(c.closed());
    // The server did not write a partial payload.
    f.good_client_works();
}

#[test]
fn connections_beyond_the_limit_are_closed_and_slots_come_back() {
    let f = fixture(nbd::ServerConfig {
        max_connections: 3,
        ..Default::default()
    });
    let held: Vec<_> = (0..3).map(|_| Client::open(f.sock(), "disk").0).collect();
    let mut extra = Client::connect_raw(f.sock());
    assert!(extra.closed(), "4th connection must be closed");
    drop(held);
    // Slots are freed once the server notices the disconnects.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = Client::connect_raw(f.sock());
        let mut hello = [0u8; 18];
        if std::io::Read::read_exact(&mut c.s, &mut hello).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "slots never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
    f.good_client_works();
}

#[test]
fn silent_clients_time_out_in_the_handshake() {
    let f = fixture(nbd::ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    });
    let t = Instant::now();
    let mut c = Client::connect(f.sock());
    assert!(c.closed());
    assert!(t.elapsed() < Duration::from_secs(5));
    f.good_client_works();
}

/// A disk whose reads at offset 0 are slow, to show replies leave in completion order.
#[derive(Debug)]
struct SlowDisk {
    inner: disk::RawDisk,
    closes: AtomicUsize,
}

impl BlockDevice for SlowDisk {
    fn format(&self) -> &'static str {
        "raw"
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> disk::Result<()> {
        if offset == 0 {
            std::thread::sleep(Duration::from_millis(400));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> disk::Result<()> {
        if offset == 0 {
            std::thread::sleep(Duration::from_millis(400));
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> disk::Result<()> {
        Ok(())
    }
    fn close(&self) -> disk::Result<()> {
        self.closes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn replies_come_out_of_order_and_shutdown_finishes_in_flight_work() {
    let slow = Arc::new(SlowDisk {
        inner: disk::RawDisk::memory(1 << 20).unwrap(),
        closes: AtomicUsize::new(0),
    });
    let mut srv = TestServer::start(
        vec![nbd::Export::new("slow", slow.clone()).writable(true)],
        Default::default(),
    );
    let (mut c, _, _) = Client::open(&srv.sock, "slow");
    c.request(0, CMD_READ, 1, 0, 4096);
    c.request(0, CMD_READ, 2, 8192, 4096);
    assert_eq!(
        c.chunks()[0].cookie,
        2,
        "the fast read overtakes the slow one"
    );
    assert_eq!(c.chunks()[0].cookie, 1);

    // A slow write in flight when shutdown starts still completes and is answered.
    c.write(0, 3, 0, &[0xC3u8; 4096]);
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    srv.stop();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(c.status(3), 0);
    assert!(c.closed());
    let mut b = [0u8; 4096];
    slow.inner.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0xC3u8; 4096]);
    assert_eq!(slow.closes.load(Ordering::SeqCst), 1, "disk closed once");
    assert!(!srv.sock.exists(), "socket file removed");
}

#[test]
fn many_pipelined_requests_without_reading_replies_do_not_wedge_others() {
    let f = fixture(nbd::ServerConfig {
        max_inflight_requests: 4,
        ..Default::default()
    });
    let (mut c, _, _) = Client::open(f.sock(), "disk");
    // 2000 × 64 KiB reads never read back: the server blocks on this client only.
    c.s.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut req = Vec::new();
    for i in 0..2000u64 {
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&CMD_READ.to_be_bytes());
        req.extend_from_slice(&i.to_be_bytes());
        req.extend_from_slice(&0u64.to_be_bytes());
        req.extend_from_slice(&65536u32.to_be_bytes());
    }
    let _ = c.s.write_all(&req); // may time out once buffers are full
    f.good_client_works();
    drop(c);
}

/// A disk with a bug: reads at 4096 panic.
#[derive(Debug)]
struct PanickyDisk;

impl BlockDevice for PanickyDisk {
    fn format(&self) -> &'static str {
        "raw"
    }
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> disk::Result<()> {
        if offset == 4096 {
            panic!("simulated bug in a disk implementation");
        }
        buf.fill(7);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> disk::Result<()> {
        Err(disk::Error::ReadOnly)
    }
    fn flush(&self) -> disk::Result<()> {
        Ok(())
    }
}

#[test]
fn a_panicking_disk_fails_the_request_not_the_server() {
    let srv = TestServer::start(
        vec![nbd::Export::new("p", Arc::new(PanickyDisk))],
        Default::default(),
    );
    let (mut c, _, _) = Client::open(&srv.sock, "p");
    c.request(0, CMD_READ, 1, 4096, 512);
    let ch = c.chunks();
    assert_eq!(ch[0].kind, CHUNK_ERROR);
    assert_eq!(ch[0].error(), 5);
    assert_eq!(c.read(2, 0, 512).unwrap(), vec![7u8; 512]);
    drop(c);
    let (mut c, _, _) = Client::open(&srv.sock, "p");
    assert_eq!(c.read(3, 8192, 16).unwrap(), vec![7u8; 16]);
}

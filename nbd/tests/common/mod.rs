//! Shared helpers for the integration tests: starting a server in-process on a Unix socket,
//! sparse raw images, locating client binaries, and a tiny raw-protocol client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub server: Option<nbd::RunningServer>,
}

impl TestServer {
    pub fn start(exports: Vec<nbd::Export>, config: nbd::ServerConfig) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, exports, config)
    }

    pub fn start_in(
        dir: tempfile::TempDir,
        exports: Vec<nbd::Export>,
        config: nbd::ServerConfig,
    ) -> TestServer {
        let sock = dir.path().join("nbd.sock");
        let server = nbd::Server::new(exports, config).unwrap();
        let bound = server.bind(&nbd::Listen::Unix(sock.clone())).unwrap();
        let running = bound.spawn().unwrap();
        TestServer {
            dir,
            sock,
            server: Some(running),
        }
    }

    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    pub fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = s.stop();
        }
    }
}

/// Whether a client binary is installed. Missing: a skip message, or a failure when
/// VIRIDIAN_REQUIRE_ALL=1.
pub fn have(bin: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("VIRIDIAN_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!("{bin} is required (VIRIDIAN_REQUIRE_ALL=1) but not installed");
        }
        eprintln!("SKIP: {bin} not installed (apt-get install libnbd-bin qemu-utils)");
    }
    found
}

/// Runs a command, failing the test with its output unless it succeeds; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A sparse raw file of `size` bytes with random data at `ranges` (offset, len); returns its
/// path, the open disk, and the expected bytes.
pub fn sparse_raw(
    dir: &Path,
    name: &str,
    size: u64,
    ranges: &[(u64, usize)],
) -> (PathBuf, Arc<disk::RawDisk>, Vec<u8>) {
    let path = dir.join(name);
    let d = Arc::new(disk::RawDisk::create(&path, size).unwrap());
    let io = disk::Disk::new(d.clone());
    let mut expected = vec![0u8; size as usize];
    for (i, &(off, len)) in ranges.iter().enumerate() {
        let data = pattern(len, i as u64 + 1);
        io.write_at(&data, off).unwrap();
        expected[off as usize..off as usize + len].copy_from_slice(&data);
    }
    io.flush().unwrap();
    (path, d, expected)
}

// ---- a raw protocol client -------------------------------------------------------------------

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const FLAG_DF: u16 = 4;
pub const FLAG_FAST_ZERO: u16 = 16;

pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_DATA: u16 = 1;
pub const CHUNK_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = (1 << 15) + 1;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;

pub struct Client {
    pub s: UnixStream,
}

pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl Chunk {
    pub fn error(&self) -> u32 {
        u32::from_be_bytes(self.payload[0..4].try_into().unwrap())
    }
    pub fn done(&self) -> bool {
        self.flags & 1 != 0
    }
}

impl Client {
    /// Connects and reads the greeting (checks the magics); does not send client flags.
    pub fn connect_raw(sock: &Path) -> Client {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client { s }
    }

    pub fn connect(sock: &Path) -> Client {
        let mut c = Self::connect_raw(sock);
        let mut hello = [0u8; 18];
        c.s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[0..8], b"NBDMAGIC");
        assert_eq!(&hello[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([hello[16], hello[17]]), 3);
        c.send(&3u32.to_be_bytes());
        c
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    pub fn opt(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    pub fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (opt, kind, d)
    }

    pub fn structured(&mut self) {
        self.opt(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(self.opt_reply().1, REP_ACK);
    }

    pub fn set_meta(&mut self, name: &str, queries: &[&str]) -> Vec<(u32, String)> {
        self.opt(OPT_SET_META_CONTEXT, &meta_data(name, queries));
        let mut out = Vec::new();
        loop {
            let (_, kind, d) = self.opt_reply();
            match kind {
                REP_META_CONTEXT => out.push((
                    u32::from_be_bytes(d[0..4].try_into().unwrap()),
                    String::from_utf8(d[4..].to_vec()).unwrap(),
                )),
                REP_ACK => return out,
                k => panic!("unexpected meta context reply {k:#x}"),
            }
        }
    }

    /// NBD_OPT_GO; returns (size, transmission flags) or the error reply type.
    pub fn go(&mut self, name: &str) -> Result<(u64, u16), u32> {
        self.opt(OPT_GO, &info_data(name, &[3]));
        let mut export = None;
        loop {
            let (_, kind, d) = self.opt_reply();
            match kind {
                REP_INFO => {
                    if u16::from_be_bytes([d[0], d[1]]) == 0 {
                        export = Some((
                            u64::from_be_bytes(d[2..10].try_into().unwrap()),
                            u16::from_be_bytes([d[10], d[11]]),
                        ));
                    }
                }
                REP_ACK => return Ok(export.expect("NBD_INFO_EXPORT")),
                k => return Err(k),
            }
        }
    }

    /// A full handshake: structured replies, base:allocation, GO.
    pub fn open(sock: &Path, name: &str) -> (Client, u64, u16) {
        let mut c = Client::connect(sock);
        c.structured();
        let ctx = c.set_meta(name, &["base:allocation"]);
        assert_eq!(ctx.len(), 1);
        let (size, flags) = c.go(name).unwrap();
        (c, size, flags)
    }

    pub fn request(&mut self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.send(&b);
    }

    pub fn write(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        self.request(flags, CMD_WRITE, cookie, offset, data.len() as u32);
        self.send(data);
    }

    /// Reads one reply message: a simple reply becomes a chunk of kind u16::MAX whose payload
    /// is the 4-byte error (reads of simple replies with data are not used here).
    pub fn reply(&mut self) -> Chunk {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).unwrap();
        match u32::from_be_bytes(m) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).unwrap();
                Chunk {
                    flags: 1,
                    kind: u16::MAX,
                    cookie: u64::from_be_bytes(h[4..12].try_into().unwrap()),
                    payload: h[0..4].to_vec(),
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h).unwrap();
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let mut payload = vec![0u8; len as usize];
                self.s.read_exact(&mut payload).unwrap();
                Chunk {
                    flags: u16::from_be_bytes([h[0], h[1]]),
                    kind: u16::from_be_bytes([h[2], h[3]]),
                    cookie: u64::from_be_bytes(h[4..12].try_into().unwrap()),
                    payload,
                }
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }

    /// Reads all chunks of one reply (until DONE).
    pub fn chunks(&mut self) -> Vec<Chunk> {
        let mut v = Vec::new();
        loop {
            let c = self.reply();
            let done = c.done();
            v.push(c);
            if done {
                return v;
            }
        }
    }

    /// The error of a reply with one message (simple, or a structured error/none chunk).
    pub fn status(&mut self, cookie: u64) -> u32 {
        let c = self.reply();
        assert_eq!(c.cookie, cookie);
        match c.kind {
            u16::MAX => c.error(),
            CHUNK_ERROR => {
                assert!(c.done());
                c.error()
            }
            CHUNK_NONE => 0,
            k => panic!("unexpected chunk type {k}"),
        }
    }

    /// Reads `len` bytes at `offset` through a structured READ, reassembling chunks.
    pub fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(0, CMD_READ, cookie, offset, len);
        let mut buf = vec![0xEEu8; len as usize];
        let mut covered = 0u64;
        for c in self.chunks() {
            assert_eq!(c.cookie, cookie);
            match c.kind {
                CHUNK_DATA => {
                    let o = u64::from_be_bytes(c.payload[0..8].try_into().unwrap()) - offset;
                    let d = &c.payload[8..];
                    buf[o as usize..o as usize + d.len()].copy_from_slice(d);
                    covered += d.len() as u64;
                }
                CHUNK_HOLE => {
                    let o = u64::from_be_bytes(c.payload[0..8].try_into().unwrap()) - offset;
                    let n = u32::from_be_bytes(c.payload[8..12].try_into().unwrap());
                    buf[o as usize..o as usize + n as usize].fill(0);
                    covered += n as u64;
                }
                CHUNK_ERROR => return Err(c.error()),
                CHUNK_NONE => {}
                k => panic!("unexpected chunk {k}"),
            }
        }
        assert_eq!(covered, len as u64);
        Ok(buf)
    }

    /// True when the server closed the connection (EOF or reset) within the read timeout.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

//! Fuzz targets for Viridian, shared by the libFuzzer binaries (`fuzz_targets/`, built by
//! `cargo fuzz` with the `libfuzzer` feature) and the stable-toolchain drivers `replay` and
//! `soak` (`src/bin/`).
//!
//! Every target must return normally for every input: a panic, an abort, a hang or an
//! allocation beyond the driver's RSS limit is a finding. Errors are fine: they are the typed
//! `disk::Error`s the crates promise.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use disk::check::Repair;
use disk::{BlockDevice, MemStorage, Storage};

/// The targets by name, for the drivers.
/// A fuzz target: must return normally for every input.
pub type Target = fn(&[u8]);

pub const TARGETS: &[(&str, Target)] = &[
    ("vhd_open", vhd_open),
    ("vhdx_open", vhdx_open),
    ("chain_open", chain_open),
    ("metadata", metadata),
    ("nbd_server", nbd_server),
];

pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// Bytes read per image at most (the rest is sampled through block status).
const READ_BUDGET: u64 = 8 << 20;
/// Block-status calls per image at most.
const STATUS_BUDGET: usize = 4096;

fn mem(data: &[u8]) -> Arc<dyn Storage> {
    Arc::new(MemStorage::from_vec(data.to_vec()))
}

/// Reads a device the way `convert` does: block status over the whole disk, data extents read,
/// within budgets; plus the first and last 64 KiB and every field `info` prints.
pub fn exercise(d: &dyn BlockDevice) {
    let size = d.size();
    let _ = (d.format(), d.read_only(), d.cluster_size(), d.dirty());
    let _ = (d.unique_id(), d.parent_link(), d.format_specific());
    let _ = d
        .parent_link()
        .map(|l| chain::parent_candidates(d.path(), &l));
    let _ = (d.logical_sector_size(), d.physical_sector_size());
    let mut buf = vec![0u8; 64 << 10];
    let head = size.min(buf.len() as u64) as usize;
    let _ = d.read_at(&mut buf[..head], 0);
    let _ = d.read_at(&mut buf[..head], size - head as u64);
    // Out of range must be an error, not a panic.
    let _ = d.read_at(&mut buf[..512], size);
    let _ = d.read_at(&mut buf[..512], u64::MAX - 100);
    let mut pos = 0u64;
    let mut read = 0u64;
    let mut calls = 0;
    while pos < size && calls < STATUS_BUDGET {
        calls += 1;
        let want = (size - pos).min(1 << 30);
        let Ok(e) = d.block_status(pos, want) else {
            // Skip a sector and go on, as a reader that tolerates bad blocks would.
            pos = pos.saturating_add(512);
            continue;
        };
        if e.len == 0 || e.len > want {
            panic!("block_status({pos}, {want}) returned length {}", e.len);
        }
        if read < READ_BUDGET {
            let n = e.len.min(buf.len() as u64).min(READ_BUDGET - read) as usize;
            let _ = d.read_at(&mut buf[..n], pos);
            read += n as u64;
        }
        pos += e.len;
    }
    let _ = disk::map::map_range(d, 0, size.min(64 << 20)).map(|v| v.len());
}

/// Opens `data` as a VHD (read-only and read-write, both size rules), reads it all, checks it.
pub fn vhd_open(data: &[u8]) {
    for rule in [vhd::SizeRule::Auto, vhd::SizeRule::CurrentSize] {
        let opts = vhd::OpenOptions {
            read_only: true,
            size_rule: rule,
        };
        if let Ok(d) = vhd::VhdDisk::open(mem(data), &opts) {
            let _ = d.info();
            let _ = d.parent_name_raw();
            exercise(&d);
        }
    }
    let _ = vhd::check(mem(data), Repair::None);
    // Writes on a hostile image: must fail cleanly or stay inside the store.
    let opts = vhd::OpenOptions {
        read_only: false,
        size_rule: vhd::SizeRule::Auto,
    };
    if let Ok(d) = vhd::VhdDisk::open(mem(data), &opts) {
        let size = d.size();
        if size > 0 {
            let _ = d.write_at(&[0xa5; 4096][..size.min(4096) as usize], (size / 2) & !511);
            let _ = d.flush();
        }
        let _ = d.close();
    }
}

/// Recomputes the CRCs of both VHDX headers and region tables so that mutations behind them
/// reach the code that trusts a valid checksum.
pub fn vhdx_fix_crcs(img: &mut [u8]) {
    use vhdx::format::{HEADER_SIZE, RT_SIZE};
    for (off, len) in [
        (64usize << 10, HEADER_SIZE),
        (128 << 10, HEADER_SIZE),
        (192 << 10, RT_SIZE),
        (256 << 10, RT_SIZE),
    ] {
        if img.len() >= off + len {
            vhdx_fix_crcs_at(&mut img[off..], len);
        }
    }
}

/// Opens `data` as a VHDX (read-only, which replays a pending log in memory), reads it all,
/// checks it; then the same with header and region-table CRCs made valid.
pub fn vhdx_open(data: &[u8]) {
    vhdx_one(data);
    let mut fixed = data.to_vec();
    vhdx_fix_crcs(&mut fixed);
    if fixed != data {
        vhdx_one(&fixed);
    }
}

fn vhdx_one(data: &[u8]) {
    if let Ok(d) = vhdx::VhdxDisk::open(mem(data), &vhdx::OpenOptions { read_only: true }) {
        let _ = d.info();
        exercise(&d);
    }
    let _ = vhdx::check(mem(data), Repair::None);
}

/// A child and a parent from one input: the first two bytes give the split point (as a
/// fraction of the rest). Each half is probed and opened; the parent is attached to the child
/// by hand (no paths involved) and the merged view is read.
pub fn chain_open(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let frac = u16::from_le_bytes([data[0], data[1]]) as usize;
    let rest = &data[2..];
    let split = rest.len() * frac / 65536;
    let (child, parent) = rest.split_at(split);
    let Some(parent) = open_any(parent) else {
        return;
    };
    let parent: Arc<dyn BlockDevice> = parent;
    match chain::probe(&MemStorage::from_vec(child.to_vec())) {
        Ok(chain::Format::Vhd) => {
            let opts = vhd::OpenOptions {
                read_only: true,
                size_rule: vhd::SizeRule::Auto,
            };
            if let Ok(mut d) = vhd::VhdDisk::open(mem(child), &opts) {
                if d.attach_parent(parent).is_ok() {
                    exercise(&d);
                }
            }
        }
        Ok(chain::Format::Vhdx) => {
            let opts = vhdx::OpenOptions { read_only: true };
            if let Ok(mut d) = vhdx::VhdxDisk::open(mem(child), &opts) {
                if d.attach_parent(parent).is_ok() {
                    exercise(&d);
                }
            }
        }
        _ => {}
    }
}

fn open_any(data: &[u8]) -> Option<Arc<dyn BlockDevice>> {
    let s = mem(data);
    match chain::probe(&*s).ok()? {
        chain::Format::Vhd => {
            let opts = vhd::OpenOptions {
                read_only: true,
                size_rule: vhd::SizeRule::Auto,
            };
            Some(Arc::new(vhd::VhdDisk::open(s, &opts).ok()?))
        }
        chain::Format::Vhdx => Some(Arc::new(
            vhdx::VhdxDisk::open(s, &vhdx::OpenOptions { read_only: true }).ok()?,
        )),
        chain::Format::Raw => Some(Arc::new(disk::RawDisk::new(s, true).ok()?)),
    }
}

fn padded(data: &[u8], len: usize) -> Vec<u8> {
    let mut v = data[..data.len().min(len)].to_vec();
    v.resize(len, 0);
    v
}

/// The metadata parsers on their own. The first byte picks the parser, the rest is its input
/// (padded or cut to the size the parser's contract asks for).
pub fn metadata(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 8 {
        // The VHD crate keeps its format module private: its footer, dynamic-header and
        // locator parsers are reached through `open` on a memory store.
        0..=2 => {
            let opts = vhd::OpenOptions {
                read_only: true,
                size_rule: vhd::SizeRule::Auto,
            };
            if let Ok(d) = vhd::VhdDisk::open(mem(rest), &opts) {
                let _ = (d.info(), d.parent_link(), d.parent_name_raw());
            }
        }
        3 => {
            let b = padded(rest, vhdx::format::HEADER_SIZE);
            let _ = vhdx::format::Header::parse(&b, 64 << 10);
            let mut b = b;
            vhdx_fix_crcs_at(&mut b, vhdx::format::HEADER_SIZE);
            let _ = vhdx::format::Header::parse(&b, 64 << 10);
        }
        4 => {
            let mut b = padded(rest, vhdx::format::RT_SIZE);
            let file_len = if rest.len() >= 8 {
                u64::from_le_bytes(rest[rest.len() - 8..].try_into().unwrap_or([0; 8]))
            } else {
                u64::MAX
            };
            let _ = vhdx::format::RegionTable::parse(&b, 192 << 10, file_len);
            vhdx_fix_crcs_at(&mut b, vhdx::format::RT_SIZE);
            let _ = vhdx::format::RegionTable::parse(&b, 192 << 10, file_len);
        }
        5 => {
            if let Ok(m) = vhdx::format::parse_metadata(rest, 3 << 20) {
                let _ = vhdx::format::build_metadata(&m, (rest.len() + 65535) & !65535);
            }
        }
        6 => {
            if let Ok(l) = vhdx::format::ParentLocator::parse(rest, 3 << 20) {
                let _ = l.get("parent_linkage");
                let _ = l.serialize();
            }
        }
        _ => {
            // A log region: pad to whole 4 KiB pages (the region is always page-granular).
            let len = rest.len().div_ceil(4096).max(1) * 4096;
            let log = padded(rest, len);
            let guid = if rest.len() >= 16 {
                let mut g = [0u8; 16];
                g.copy_from_slice(&rest[..16]);
                vhdx::format::Guid::from_windows_bytes(g)
            } else {
                vhdx::format::Guid::NIL
            };
            let seq = vhdx::log::find_sequence(&log, &guid);
            let _ = vhdx::log::validate_targets(&seq, 1 << 20, len as u64);
            let _ = (seq.head_sequence(), seq.head_end(len as u64));
        }
    }
}

/// Stores the CRC-32C of `b[..len]` in its checksum field (bytes 4..8).
fn vhdx_fix_crcs_at(b: &mut [u8], len: usize) {
    let c = vhdx::format::crc32c_skip(&b[..len], 4);
    b[4..8].copy_from_slice(&c.to_le_bytes());
}

struct NbdFixture {
    socket: PathBuf,
}

fn nbd_fixture() -> &'static NbdFixture {
    static F: OnceLock<NbdFixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("viridian-fuzz-nbd-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let socket = dir.join("nbd.sock");
        let rw: Arc<dyn BlockDevice> =
            Arc::new(disk::RawDisk::memory(1 << 20).expect("memory disk"));
        let ro: Arc<dyn BlockDevice> =
            Arc::new(disk::RawDisk::memory(64 << 10).expect("memory disk"));
        let exports = vec![
            nbd::Export::new("", rw).writable(true).description("fuzz"),
            nbd::Export::new("ro", ro),
        ];
        let config = nbd::ServerConfig {
            max_connections: 8,
            max_request: 1 << 20,
            workers_per_connection: 2,
            max_inflight_requests: 16,
            max_inflight_bytes: 4 << 20,
            handshake_timeout: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(1),
            multi_conn: true,
            verbose: false,
        };
        let server = nbd::Server::new(exports, config).expect("nbd server");
        let bound = server
            .bind(&nbd::Listen::Unix(socket.clone()))
            .expect("bind nbd socket");
        let running = bound.spawn().expect("spawn nbd server");
        // Lives for the whole process.
        std::mem::forget(running);
        NbdFixture { socket }
    })
}

/// A raw client byte script against a live server on a Unix socket: the script is sent (then
/// the write side closed) while every reply is read until the server closes. The server must
/// neither panic nor keep the connection open after the client is gone.
pub fn nbd_server(data: &[u8]) {
    let f = nbd_fixture();
    let Ok(mut s) = UnixStream::connect(&f.socket) else {
        panic!("cannot connect to the fuzz NBD server");
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut w) = s.try_clone() else {
        return;
    };
    let script = data.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&script);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let mut buf = vec![0u8; 1 << 16];
    let start = std::time::Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!(
                    "NBD server kept the connection open {:?} after the client's EOF",
                    start.elapsed()
                );
            }
            Err(_) => break,
        }
    }
    let _ = writer.join();
}

/// Seeds for the NBD target: a greeting-aware script per interesting path.
pub fn nbd_seeds() -> Vec<(String, Vec<u8>)> {
    const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
    const REQ: u32 = 0x2560_9513;
    fn opt(v: &mut Vec<u8>, code: u32, data: &[u8]) {
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
    }
    fn go(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }
    fn req(v: &mut Vec<u8>, flags: u16, ty: u16, cookie: u64, off: u64, len: u32) {
        v.extend_from_slice(&REQ.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&ty.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&off.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
    }
    let flags = 3u32.to_be_bytes(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut out = Vec::new();

    let mut v = flags.to_vec();
    opt(&mut v, 3, &[]); // LIST
    opt(&mut v, 6, &go(b"ro", &[0, 1, 2, 3])); // INFO
    opt(&mut v, 2, &[]); // ABORT
    out.push(("nbd-list-info-abort".into(), v));

    let mut v = flags.to_vec();
    opt(&mut v, 8, &[]); // STRUCTURED_REPLY
    let mut ctx = Vec::new();
    ctx.extend_from_slice(&0u32.to_be_bytes());
    ctx.extend_from_slice(&1u32.to_be_bytes());
    ctx.extend_from_slice(&16u32.to_be_bytes());
    ctx.extend_from_slice(b"base:allocation");
    ctx.push(b'x');
    ctx.truncate(ctx.len() - 1);
    opt(&mut v, 10, &ctx); // SET_META_CONTEXT
    opt(&mut v, 7, &go(b"", &[3])); // GO
    req(&mut v, 0, 1, 1, 0, 4096); // WRITE
    v.extend_from_slice(&[0x5a; 4096]);
    req(&mut v, 0, 0, 2, 0, 8192); // READ
    req(&mut v, 0, 7, 3, 0, 1 << 20); // BLOCK_STATUS
    req(&mut v, 2, 6, 4, 8192, 8192); // WRITE_ZEROES NO_HOLE
    req(&mut v, 0, 4, 5, 65536, 65536); // TRIM
    req(&mut v, 1, 3, 6, 0, 0); // FLUSH (FUA)
    req(&mut v, 0, 5, 7, 0, 4096); // CACHE
    req(&mut v, 0, 0, 8, (1 << 20) - 100, 4096); // READ past the end
    req(&mut v, 0, 2, 9, 0, 0); // DISC
    out.push(("nbd-structured-session".into(), v));

    let mut v = flags.to_vec();
    opt(&mut v, 1, b""); // EXPORT_NAME
    req(&mut v, 0, 0, 1, 0, 512);
    req(&mut v, 0, 1, 2, 0, 512);
    v.extend_from_slice(&[1; 512]);
    req(&mut v, 0, 99, 3, 0, 0);
    req(&mut v, 0, 2, 4, 0, 0);
    out.push(("nbd-export-name-simple".into(), v));

    let mut v = flags.to_vec();
    opt(&mut v, 7, &go(b"ro", &[])); // GO on the read-only export
    req(&mut v, 0, 1, 1, 0, 512); // WRITE refused
    v.extend_from_slice(&[2; 512]);
    req(&mut v, 0, 0, 2, 0, 1 << 20); // READ over the limit of the small disk
    out.push(("nbd-ro-go".into(), v));
    out
}

/// Seed inputs for a target, generated in memory (nothing large is committed): small VHD and
/// VHDX images of every type made by the crates' own writers, a VHDX with a pending log
/// (captured from a simulated crash), the dfvfs sample VHDs when `/work/shared/testdata/dfvfs`
/// (or `$VIRIDIAN_DFVFS`) exists, and hand-made NBD scripts.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut images = Vec::new();
    images.extend(gen_vhd());
    images.extend(gen_vhdx());
    let dfvfs = std::env::var_os("VIRIDIAN_DFVFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/shared/testdata/dfvfs"));
    if let Ok(rd) = std::fs::read_dir(&dfvfs) {
        let mut names: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        names.sort();
        for p in names {
            if let Ok(b) = std::fs::read(&p) {
                let n = p.file_name().map(|n| n.to_string_lossy().into_owned());
                images.push((format!("dfvfs-{}", n.unwrap_or_default()), b));
            }
        }
    }
    match target {
        "vhd_open" => images
            .into_iter()
            .filter(|(n, _)| n.contains("vhd") && !n.contains("vhdx"))
            .collect(),
        "vhdx_open" => images
            .into_iter()
            .filter(|(n, _)| n.contains("vhdx"))
            .collect(),
        "chain_open" => {
            let mut out = Vec::new();
            for (name, child, parent) in gen_pairs() {
                let frac =
                    (child.len() as u64 * 65536).div_ceil((child.len() + parent.len()) as u64);
                let mut v = (frac as u16).to_le_bytes().to_vec();
                v.extend_from_slice(&child);
                v.extend_from_slice(&parent);
                out.push((name, v));
            }
            out
        }
        "metadata" => {
            let mut out = Vec::new();
            for (name, img) in &images {
                if name.contains("vhdx") {
                    if img.len() < 4 << 20 {
                        continue;
                    }
                    let h = &img[64 << 10..(64 << 10) + 4096];
                    out.push((format!("{name}-header"), [&[3u8][..], h].concat()));
                    let rt = &img[192 << 10..(192 << 10) + 65536];
                    let mut v = [&[4u8][..], rt].concat();
                    v.extend_from_slice(&(img.len() as u64).to_le_bytes());
                    out.push((format!("{name}-regions"), v));
                    if let Some((off, len)) = vhdx_region(img, &vhdx::format::GUID_METADATA) {
                        let m = &img[off..off + len.min(65536)];
                        out.push((format!("{name}-metadata"), [&[5u8][..], m].concat()));
                    }
                    // Log region (1 MiB at 1 MiB by our writer); keep only the used head.
                    let log = &img[1 << 20..(1 << 20) + (64 << 10)];
                    let mut v = vec![7u8];
                    v.extend_from_slice(&img[(64 << 10) + 48..(64 << 10) + 64]);
                    v.extend_from_slice(&log[16..]);
                    out.push((format!("{name}-log"), v));
                } else if img.len() >= 512 {
                    // Footer copy, dynamic header and BAT head, then the trailing footer.
                    let head = &img[..img.len().min(4096)];
                    let f = &img[img.len() - 512..];
                    out.push((format!("{name}-meta"), [&[0u8][..], head, f].concat()));
                }
            }
            out
        }
        "nbd_server" => nbd_seeds(),
        _ => Vec::new(),
    }
}

fn vhdx_region(img: &[u8], guid: &vhdx::format::Guid) -> Option<(usize, usize)> {
    let rt = img.get(192 << 10..(192 << 10) + 65536)?;
    let table = vhdx::format::RegionTable::parse(rt, 192 << 10, img.len() as u64).ok()?;
    let e = table.entries.iter().find(|e| e.guid == *guid)?;
    Some((e.offset as usize, e.length as usize))
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn mem_arc() -> Arc<MemStorage> {
    Arc::new(MemStorage::new())
}

fn gen_vhd() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let fixed = vhd::CreateOptions::new(vhd::CreateKind::Fixed, 64 << 10);
    let s = mem_arc();
    if let Ok(d) = vhd::VhdDisk::create_on(s.clone(), &fixed) {
        let _ = d.write_at(&pattern(4096, 1), 4096);
        let _ = d.close();
        out.push(("gen-vhd-fixed".to_string(), s.to_vec()));
    }
    let mut dynamic = vhd::CreateOptions::new(vhd::CreateKind::Dynamic, 1 << 20);
    dynamic.block_size = 64 << 10;
    let s = mem_arc();
    if let Ok(d) = vhd::VhdDisk::create_on(s.clone(), &dynamic) {
        let _ = d.write_at(&pattern(8192, 2), 70 << 10);
        let _ = d.close();
        out.push(("gen-vhd-dynamic".to_string(), s.to_vec()));
    }
    out
}

fn gen_vhdx() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let s = mem_arc();
    if let Ok(d) = vhdx::VhdxDisk::create_on(s.clone(), &vhdx_opts(1 << 20)) {
        let _ = d.write_at(&pattern(8192, 3), 0);
        let _ = d.close();
        out.push(("gen-vhdx-dynamic".to_string(), s.to_vec()));
    }
    if let Some(img) = dirty_vhdx() {
        out.push(("gen-vhdx-dirty-log".to_string(), img));
    }
    out
}

fn vhdx_opts(size: u64) -> vhdx::CreateOptions {
    let mut o = vhdx::CreateOptions::new(vhdx::CreateKind::Dynamic, size);
    o.block_size = 1 << 20;
    o
}

/// A VHDX whose log holds entries not yet applied: writes done on a fault-injecting store,
/// then the durable bytes taken right after a flush made the log durable and before the
/// in-place updates were. Found by scanning crash points; None if no point gives a dirty image.
pub fn dirty_vhdx() -> Option<Vec<u8>> {
    use disk::fault::{FaultPlan, FaultyStorage};
    let base = {
        let s = mem_arc();
        let d = vhdx::VhdxDisk::create_on(s.clone(), &vhdx_opts(4 << 20)).ok()?;
        d.close().ok()?;
        drop(d);
        s.to_vec()
    };
    for crash_at in 1..64 {
        let fs = Arc::new(FaultyStorage::new(
            base.clone(),
            FaultPlan {
                crash_at: Some(crash_at),
                ..Default::default()
            },
        ));
        if let Ok(d) = vhdx::VhdxDisk::open(fs.clone(), &vhdx::OpenOptions { read_only: false }) {
            let _ = d.write_at(&pattern(4096, 9), 1 << 20);
            let _ = d.flush();
            let _ = d.write_at(&pattern(4096, 10), 2 << 20);
            let _ = d.flush();
            std::mem::forget(d); // no orderly close: the machine is gone
        }
        let img = fs.durable();
        let ro = vhdx::VhdxDisk::open(mem(&img), &vhdx::OpenOptions { read_only: true });
        if ro.map(|d| d.dirty()).unwrap_or(false) {
            return Some(img);
        }
    }
    None
}

/// Child/parent pairs of both formats.
fn gen_pairs() -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut dynamic = vhd::CreateOptions::new(vhd::CreateKind::Dynamic, 1 << 20);
    dynamic.block_size = 64 << 10;
    let ps = mem_arc();
    if let Ok(p) = vhd::VhdDisk::create_on(ps.clone(), &dynamic) {
        let _ = p.write_at(&pattern(65536, 4), 0);
        let _ = p.flush();
        let p: Arc<dyn BlockDevice> = Arc::new(p);
        let mut o = vhd::CreateOptions::new(
            vhd::CreateKind::Differencing {
                parent_path: PathBuf::from("/nonexistent/parent.vhd"),
                parent: p.clone(),
            },
            0,
        );
        o.block_size = 64 << 10;
        let cs = mem_arc();
        if let Ok(c) = vhd::VhdDisk::create_on(cs.clone(), &o) {
            let _ = c.write_at(&pattern(1024, 5), 512);
            let _ = c.close();
            let _ = p.close();
            out.push(("gen-vhd-diff".to_string(), cs.to_vec(), ps.to_vec()));
        }
    }
    let ps = mem_arc();
    if let Ok(p) = vhdx::VhdxDisk::create_on(ps.clone(), &vhdx_opts(2 << 20)) {
        let _ = p.write_at(&pattern(65536, 6), 0);
        let _ = p.flush();
        let p: Arc<dyn BlockDevice> = Arc::new(p);
        let o = vhdx::CreateOptions::new(
            vhdx::CreateKind::Differencing {
                parent_path: PathBuf::from("/nonexistent/parent.vhdx"),
                parent: p.clone(),
            },
            0,
        );
        let cs = mem_arc();
        if let Ok(c) = vhdx::VhdxDisk::create_on(cs.clone(), &o) {
            let _ = c.write_at(&pattern(1024, 7), 512);
            let _ = c.close();
            let _ = p.close();
            out.push(("gen-vhdx-diff".to_string(), cs.to_vec(), ps.to_vec()));
        }
    }
    out
}

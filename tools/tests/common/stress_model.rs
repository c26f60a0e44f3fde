//! Concurrency stress workloads whose result is decidable, and the model that checks them.
//!
//! A workload is a list of rounds. Every round works inside one window of the disk (a few
//! sectors, a span straddling a block boundary, or a long random span); its pieces are dealt to
//! workers (threads, NBD connections, processes) that run them concurrently, and a barrier ends
//! the round, so rounds are ordered and a later round may rewrite what an earlier one wrote.
//!
//! * Disjoint rounds: the window is cut into pieces of 1 byte to 1 MiB, none overlapping; most
//!   share sectors with pieces of other workers. Every piece must land exactly: a write leaves
//!   its own pattern, write-zeroes leaves zeros, a discard leaves the old bytes or zeros, a gap
//!   (a piece nobody runs) keeps the old bytes.
//! * Overlap rounds: each worker writes (or zeroes) a few random ranges of the window that may
//!   overlap other workers'. Then every byte some request covered must hold the value one of
//!   those requests put there (never the value from before the round); uncovered bytes keep the
//!   old value. The checker then adopts what it read as the new model.
//!
//! Every written byte is `pattern(request id, disk offset)`, never zero, so a mismatch names
//! who wrote what (see [`Model::explain`]).

#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub const MIB: u64 = 1 << 20;
/// Virtual size of every stress image: 8 VHDX blocks, 4 VHD blocks.
pub const SIZE: u64 = 8 * MIB;

/// The formats under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Raw,
    VhdFixed,
    VhdDynamic,
    VhdDiff,
    VhdxFixed(u32),
    VhdxDynamic(u32),
    VhdxDiff(u32),
}

impl Kind {
    pub fn name(self) -> String {
        match self {
            Kind::Raw => "raw".into(),
            Kind::VhdFixed => "vhd-fixed".into(),
            Kind::VhdDynamic => "vhd-dynamic".into(),
            Kind::VhdDiff => "vhd-diff".into(),
            Kind::VhdxFixed(s) => format!("vhdx-fixed-{s}"),
            Kind::VhdxDynamic(s) => format!("vhdx-dynamic-{s}"),
            Kind::VhdxDiff(s) => format!("vhdx-diff-{s}"),
        }
    }

    pub fn logical_sector(self) -> u64 {
        match self {
            Kind::VhdxFixed(s) | Kind::VhdxDynamic(s) | Kind::VhdxDiff(s) => s as u64,
            _ => 512,
        }
    }

    /// Allocation unit: VHD 2 MiB, VHDX 1 MiB (the defaults); raw has none, use 1 MiB.
    pub fn block(self) -> u64 {
        match self {
            Kind::VhdFixed | Kind::VhdDynamic | Kind::VhdDiff => 2 * MIB,
            _ => MIB,
        }
    }

    fn ext(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::VhdFixed | Kind::VhdDynamic | Kind::VhdDiff => "vhd",
            _ => "vhdx",
        }
    }
}

/// Request ids 0 and 1 are not requests: the initial contents and "zeros".
pub const INITIAL: u32 = 0;
pub const ZERO: u32 = 1;
/// Set on a model byte after a discard: it may read as its value or as zero.
const MAYBE_ZERO: u32 = 1 << 31;

/// The byte request `id` writes at disk offset `x`; never zero.
pub fn pattern(id: u32, x: u64) -> u8 {
    let mut h = (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ x;
    h = (h ^ (h >> 31)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    h ^= h >> 29;
    (h as u8) | 1
}

pub fn payload(id: u32, off: u64, len: u64) -> Vec<u8> {
    (off..off + len).map(|x| pattern(id, x)).collect()
}

/// xorshift64*: small, seedable, good enough to pick offsets.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Log-uniform in lo..=hi: as many 1-byte as 1-KiB-ish as 1-MiB-ish lengths.
    pub fn logu(&mut self, lo: u64, hi: u64) -> u64 {
        let (lo, hi) = (lo.max(1), hi.max(lo.max(1)));
        let f = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let v = ((lo as f64).ln() + f * ((hi as f64 + 1.0).ln() - (lo as f64).ln())).exp();
        (v as u64).clamp(lo, hi)
    }
    pub fn percent(&mut self) -> u64 {
        self.below(100)
    }
}

/// The seed: `VIRIDIAN_STRESS_SEED`, else taken from the clock (always printed, so a failing
/// run can be repeated).
pub fn seed() -> u64 {
    std::env::var("VIRIDIAN_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_007
        })
}

/// Rounds to run: `VIRIDIAN_STRESS_ROUNDS`, else `default` (the soak script raises it).
pub fn rounds(default: usize) -> usize {
    std::env::var("VIRIDIAN_STRESS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Write,
    Zero { unmap: bool },
    Discard,
    Flush,
}

/// One request of a worker.
#[derive(Clone, Copy, Debug)]
pub struct Piece {
    pub id: u32,
    pub op: Op,
    pub off: u64,
    pub len: u64,
    pub worker: usize,
}

pub struct Round {
    pub overlap: bool,
    pub window: (u64, u64),
    /// Pieces in the order each worker runs them (workers filter by `worker`).
    pub pieces: Vec<Piece>,
}

/// What a workload may contain.
#[derive(Clone, Copy, Debug)]
pub struct Mix {
    pub workers: usize,
    pub rounds: usize,
    /// Share of overlap rounds, percent.
    pub overlap_percent: u64,
    /// Discards and write-zeroes at all (FUSE has only zeroing fallocate).
    pub discard: bool,
    pub zeroes: bool,
    /// Largest window, bytes.
    pub max_window: u64,
    /// The first request id (plans run one after the other on one image need distinct ids).
    pub first_id: u32,
}

/// A window: a hot spot of a few sectors, a span straddling a block boundary, or a random span.
fn window(rng: &mut Rng, kind: Kind, max_window: u64) -> (u64, u64) {
    let (lo, hi) = match rng.percent() {
        0..=54 => {
            let align = [512, 4096, kind.logical_sector()][rng.below(3) as usize];
            let mut start = rng.below(SIZE / align) * align;
            if rng.percent() < 50 {
                start += rng.below(align);
            }
            (start, start + rng.logu(512, 12 * 1024))
        }
        55..=74 => {
            let blocks = [MIB, kind.block()];
            let b = blocks[rng.below(2) as usize];
            let boundary = (1 + rng.below(SIZE / b - 1)) * b;
            let half = (max_window / 2).max(1);
            (boundary - rng.logu(1, half), boundary + rng.logu(1, half))
        }
        _ => {
            let start = rng.below(SIZE);
            (start, start + rng.logu(1, max_window))
        }
    };
    (lo, hi.min(SIZE).min(lo + max_window))
}

impl Mix {
    pub fn plan(&self, seed: u64, kind: Kind) -> Vec<Round> {
        let mut rng = Rng::new(seed);
        let mut next_id = self.first_id.max(2);
        let mut out = Vec::with_capacity(self.rounds);
        for _ in 0..self.rounds {
            let overlap = rng.percent() < self.overlap_percent;
            let (lo, hi) = window(&mut rng, kind, self.max_window);
            let mut pieces = Vec::new();
            let op_for = |rng: &mut Rng, overlap: bool| -> Option<Op> {
                let r = rng.percent();
                if self.zeroes && r < 8 {
                    Some(Op::Zero {
                        unmap: rng.percent() < 50,
                    })
                } else if self.discard && !overlap && r < 14 {
                    Some(Op::Discard)
                } else if !overlap && r < 22 {
                    None // a gap: nobody touches it
                } else {
                    Some(Op::Write)
                }
            };
            if overlap {
                for w in 0..self.workers {
                    for _ in 0..1 + rng.below(3) {
                        let off = lo + rng.below(hi - lo);
                        let len = rng.logu(1, MIB.min(hi - lo)).min(hi - off);
                        if let Some(op) = op_for(&mut rng, true) {
                            pieces.push(Piece {
                                id: next_id,
                                op,
                                off,
                                len,
                                worker: w,
                            });
                            next_id += 1;
                        }
                    }
                }
            } else {
                // Small windows get small pieces, so many workers share each sector.
                let max_piece = MIB.min(((hi - lo) / 8).max(1));
                let mut pos = lo;
                while pos < hi {
                    let len = rng.logu(1, max_piece).min(hi - pos);
                    if let Some(op) = op_for(&mut rng, false) {
                        pieces.push(Piece {
                            id: next_id,
                            op,
                            off: pos,
                            len,
                            worker: rng.below(self.workers as u64) as usize,
                        });
                        next_id += 1;
                    }
                    pos += len;
                }
                // Each worker runs its pieces in a random order.
                for i in (1..pieces.len()).rev() {
                    let j = rng.below(i as u64 + 1) as usize;
                    pieces.swap(i, j);
                }
            }
            if rng.percent() < 30 {
                let at = rng.below(pieces.len() as u64 + 1) as usize;
                pieces.insert(
                    at,
                    Piece {
                        id: next_id,
                        op: Op::Flush,
                        off: 0,
                        len: 0,
                        worker: rng.below(self.workers as u64) as usize,
                    },
                );
                next_id += 1;
            }
            out.push(Round {
                overlap,
                window: (lo, hi),
                pieces,
            });
        }
        out
    }
}

/// Which 1 MiB chunks of the initial image hold data (the rest are holes, so dynamic images
/// start with unallocated blocks that concurrent writes allocate).
pub fn initial_chunks(seed: u64) -> Vec<bool> {
    let mut rng = Rng::new(seed ^ 0x1111);
    (0..SIZE / MIB).map(|_| rng.percent() < 60).collect()
}

/// The expected contents, one owner per byte.
pub struct Model {
    owner: Vec<u32>,
    data_chunk: Vec<bool>,
    /// Every request so far, to name who wrote a wrong byte.
    history: Vec<Piece>,
}

impl Model {
    pub fn new(data_chunk: Vec<bool>) -> Model {
        Model {
            owner: vec![INITIAL; SIZE as usize],
            data_chunk,
            history: Vec::new(),
        }
    }

    fn initial(&self, x: u64) -> u8 {
        if self.data_chunk[(x / MIB) as usize] {
            pattern(INITIAL, x)
        } else {
            0
        }
    }

    fn value(&self, owner: u32, x: u64) -> u8 {
        match owner & !MAYBE_ZERO {
            INITIAL => self.initial(x),
            ZERO => 0,
            id => pattern(id, x),
        }
    }

    fn accepts(&self, x: u64, actual: u8) -> bool {
        let o = self.owner[x as usize];
        actual == self.value(o, x) || (o & MAYBE_ZERO != 0 && actual == 0)
    }

    /// The initial contents, as the image is made.
    pub fn initial_bytes(&self) -> Vec<u8> {
        (0..SIZE).map(|x| self.initial(x)).collect()
    }

    /// Applies a disjoint round.
    pub fn apply(&mut self, pieces: &[Piece]) {
        for p in pieces {
            let r = p.off as usize..(p.off + p.len) as usize;
            match p.op {
                Op::Write => self.owner[r].fill(p.id),
                Op::Zero { .. } => self.owner[r].fill(ZERO),
                Op::Discard => self.owner[r].iter_mut().for_each(|o| *o |= MAYBE_ZERO),
                Op::Flush => {}
            }
        }
        self.history.extend_from_slice(pieces);
    }

    /// Checks `actual` (bytes from `base`) against the model; Err names the wrong runs.
    pub fn check(&self, actual: &[u8], base: u64) -> Result<(), String> {
        let bad: Vec<u64> = (0..actual.len() as u64)
            .filter(|&i| !self.accepts(base + i, actual[i as usize]))
            .map(|i| base + i)
            .collect();
        if bad.is_empty() {
            return Ok(());
        }
        Err(self.explain(&bad, actual, base))
    }

    /// Checks an overlap round and adopts what was read: a byte covered by requests must hold
    /// one of their values; an uncovered byte must hold the old value.
    pub fn check_overlap(
        &mut self,
        pieces: &[Piece],
        actual: &[u8],
        base: u64,
    ) -> Result<(), String> {
        let mut bad = Vec::new();
        for (i, &a) in actual.iter().enumerate() {
            let x = base + i as u64;
            let mut covered = false;
            let mut matched = None;
            for p in pieces.iter().filter(|p| p.op != Op::Flush) {
                if x >= p.off && x < p.off + p.len {
                    covered = true;
                    let (id, v) = match p.op {
                        Op::Write => (p.id, pattern(p.id, x)),
                        _ => (ZERO, 0),
                    };
                    if v == a {
                        matched = Some(id);
                        break;
                    }
                }
            }
            match (covered, matched) {
                (_, Some(id)) => self.owner[x as usize] = id,
                (false, None) if self.accepts(x, a) => {}
                _ => bad.push(x),
            }
        }
        self.history.extend_from_slice(pieces);
        if bad.is_empty() {
            Ok(())
        } else {
            Err(self.explain(&bad, actual, base))
        }
    }

    /// Names the first wrong runs: where, what was expected, and whose bytes are there.
    fn explain(&self, bad: &[u64], actual: &[u8], base: u64) -> String {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &x in bad {
            match runs.last_mut() {
                Some((s, l)) if *s + *l == x => *l += 1,
                _ => runs.push((x, 1)),
            }
        }
        let mut s = format!(
            "{} wrong bytes in {} runs (sector-sized runs mean lost writes):\n",
            bad.len(),
            runs.len()
        );
        for &(x, l) in runs.iter().take(8) {
            let o = self.owner[x as usize];
            let got = &actual[(x - base) as usize..(x - base + l) as usize];
            let _ = writeln!(
                s,
                "  {x:#x}+{l}: expected {} ; found {}",
                self.describe(o & !MAYBE_ZERO),
                self.whose(x, got)
            );
        }
        s
    }

    fn describe(&self, id: u32) -> String {
        match id {
            INITIAL => "the initial contents".into(),
            ZERO => "zeros".into(),
            id => match self.history.iter().find(|p| p.id == id) {
                Some(p) => format!(
                    "request {id} ({:?} {:#x}+{} by worker {})",
                    p.op, p.off, p.len, p.worker
                ),
                None => format!("request {id}"),
            },
        }
    }

    fn whose(&self, x: u64, got: &[u8]) -> String {
        let matches =
            |f: &dyn Fn(u64) -> u8| got.iter().enumerate().all(|(i, &b)| b == f(x + i as u64));
        if matches(&|_| 0) {
            return "zeros".into();
        }
        if matches(&|y| self.initial(y)) {
            return "the initial contents (stale)".into();
        }
        for p in self.history.iter().rev() {
            if p.op == Op::Write
                && x >= p.off
                && x < p.off + p.len
                && matches(&|y| pattern(p.id, y))
            {
                return format!("bytes of {}", self.describe(p.id));
            }
        }
        format!("unknown bytes {:02x?}", &got[..got.len().min(16)])
    }
}

/// Makes the image for `kind` in `dir` with the initial contents of `chunks` (a differencing
/// image gets them in its parent and starts empty itself). Returns the top image.
pub fn make_image(dir: &Path, kind: Kind, chunks: &[bool]) -> PathBuf {
    use chain::{create, CreateSpec, Format};
    let model = Model::new(chunks.to_vec());
    let initial = model.initial_bytes();
    let fill = |path: &Path| {
        let d = retry_locked(|| chain::open(path, &chain::OpenOptions::read_write()));
        for (i, &data) in chunks.iter().enumerate() {
            if data {
                let r = i * MIB as usize..(i + 1) * MIB as usize;
                d.write_at(&initial[r.clone()], r.start as u64).unwrap();
            }
        }
        d.close().unwrap();
    };
    let spec = |format: Format, fixed: bool| {
        let mut s = CreateSpec::new(format, SIZE);
        s.fixed = fixed;
        if let Kind::VhdxFixed(ls) | Kind::VhdxDynamic(ls) | Kind::VhdxDiff(ls) = kind {
            s.logical_sector_size = Some(ls);
        }
        s
    };
    let top = dir.join(format!("{}.{}", kind.name(), kind.ext()));
    let (format, fixed, diff) = match kind {
        Kind::Raw => (Format::Raw, false, false),
        Kind::VhdFixed => (Format::Vhd, true, false),
        Kind::VhdDynamic => (Format::Vhd, false, false),
        Kind::VhdDiff => (Format::Vhd, false, true),
        Kind::VhdxFixed(_) => (Format::Vhdx, true, false),
        Kind::VhdxDynamic(_) => (Format::Vhdx, false, false),
        Kind::VhdxDiff(_) => (Format::Vhdx, false, true),
    };
    if diff {
        let parent = dir.join(format!("{}-parent.{}", kind.name(), kind.ext()));
        create(&parent, &spec(format, false))
            .unwrap()
            .close()
            .unwrap();
        fill(&parent);
        let mut s = spec(format, false);
        s.parent = Some(parent);
        retry_locked(|| create(&top, &s)).close().unwrap();
    } else {
        create(&top, &spec(format, fixed)).unwrap().close().unwrap();
        fill(&top);
    }
    let d = retry_locked(|| chain::open(&top, &chain::OpenOptions::read_only()));
    assert_eq!(d.size(), SIZE, "{}: size", kind.name());
    assert_eq!(
        d.logical_sector_size() as u64,
        kind.logical_sector(),
        "{}: logical sector size",
        kind.name()
    );
    top
}

/// Runs `f` until it does not fail with `Locked` (at most 5 s). Tests run in parallel threads of
/// one process: a child process another test spawns holds copies of this process's file
/// descriptions (and their locks) between its fork and its exec.
pub fn retry_locked<T>(mut f: impl FnMut() -> disk::Result<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match f() {
            Err(disk::Error::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            r => return r.unwrap(),
        }
    }
}

/// Reads the whole image (closed by every writer) afresh and checks it against the model.
pub fn check_image(path: &Path, model: &Model) -> Result<(), String> {
    let d = retry_locked(|| chain::open(path, &chain::OpenOptions::read_only()));
    let mut all = vec![0u8; SIZE as usize];
    d.read_at(&mut all, 0).unwrap();
    model.check(&all, 0)
}

/// Every format the stress tests cover.
pub const KINDS: [Kind; 10] = [
    Kind::Raw,
    Kind::VhdFixed,
    Kind::VhdDynamic,
    Kind::VhdDiff,
    Kind::VhdxFixed(512),
    Kind::VhdxDynamic(512),
    Kind::VhdxDiff(512),
    Kind::VhdxFixed(4096),
    Kind::VhdxDynamic(4096),
    Kind::VhdxDiff(4096),
];

/// Writes a plan for an out-of-process driver (common/stress_nbd.py, common/stress_fuse.py):
/// `plan.txt` ("rounds N", then "ROUND WORKER OP OFF LEN" per request, OP one of W, Z0 (zero,
/// keep allocated), Z1 (zero, may unmap), D (discard), F (flush)) and `payload-W.bin`, the
/// bytes of worker W's writes in order.
pub fn write_plan(dir: &Path, plan: &[Round], workers: usize) {
    use std::io::Write;
    let mut txt = format!("rounds {}\n", plan.len());
    let mut payloads: Vec<Vec<u8>> = vec![Vec::new(); workers];
    for (r, round) in plan.iter().enumerate() {
        for p in &round.pieces {
            let op = match p.op {
                Op::Write => {
                    payloads[p.worker].extend(payload(p.id, p.off, p.len));
                    "W"
                }
                Op::Zero { unmap: false } => "Z0",
                Op::Zero { unmap: true } => "Z1",
                Op::Discard => "D",
                Op::Flush => "F",
            };
            let _ = writeln!(txt, "{r} {} {op} {} {}", p.worker, p.off, p.len);
        }
    }
    std::fs::write(dir.join("plan.txt"), txt).unwrap();
    for (w, bytes) in payloads.iter().enumerate() {
        std::fs::File::create(dir.join(format!("payload-{w}.bin")))
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }
}

/// How many 1-byte writes and writes straddling a block boundary a plan has: the tests insist
/// on both, so a change to the generator cannot quietly drop them.
pub fn coverage(plan: &[Round], kind: Kind) -> (usize, usize) {
    let writes = plan
        .iter()
        .flat_map(|r| &r.pieces)
        .filter(|p| p.op == Op::Write);
    let (mut ones, mut straddles) = (0, 0);
    for p in writes {
        ones += (p.len == 1) as usize;
        straddles += (p.off / kind.block() != (p.off + p.len - 1) / kind.block()) as usize;
    }
    (ones, straddles)
}

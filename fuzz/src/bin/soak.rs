//! A libFuzzer-free mutation loop for the stable toolchain.
//!
//!     soak TARGET [--seconds N] [--corpus DIR] [--out DIR] [--seed N] [--rss-mb N]
//!     soak --write-seeds TARGET DIR
//!
//! Inputs: the generated seeds (`viridian_fuzz::seeds`) plus every file in `--corpus`. Each
//! iteration takes one input and applies 1-8 stacked mutations (bit flips, interesting integers
//! written at offsets biased towards the non-zero structures of the image, truncation at sector
//! and page boundaries, chunk copies and splices). There is no coverage feedback: it is a
//! smoke soak, not a replacement for `cargo fuzz`.
//!
//! Findings (panic, an input running over 20 s, the process's peak RSS over `--rss-mb`) are
//! written to `--out` (default `fuzz/artifacts/TARGET/`) as `crash-*`, `timeout-*` or `oom-*`
//! and the process exits with status 1. On success it prints `TARGET: N execs in T s`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use disk::fault::SplitMix;

static CURRENT: Mutex<Vec<u8>> = Mutex::new(Vec::new());
static OUT: OnceLock<(PathBuf, String)> = OnceLock::new();
static STARTED_MS: AtomicU64 = AtomicU64::new(0);

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn save(kind: &str) -> Option<PathBuf> {
    let (dir, target) = OUT.get()?;
    let data = CURRENT.try_lock().ok()?.clone();
    let _ = std::fs::create_dir_all(dir);
    let p = dir.join(format!("{kind}-{target}-{:016x}", fnv(&data)));
    std::fs::write(&p, &data).ok()?;
    Some(p)
}

fn now_ms() -> u64 {
    static T0: OnceLock<Instant> = OnceLock::new();
    T0.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

fn max_rss_mb() -> u64 {
    // SAFETY: getrusage fills a plain struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss as u64 / 1024
}

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x100,
    511,
    512,
    513,
    4095,
    4096,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x10_0000,
    0x20_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX - 511,
    u64::MAX,
];

struct Seed {
    data: Vec<u8>,
    /// 8-byte aligned offsets of non-zero words (where the structures are).
    hot: Vec<usize>,
}

fn hot_offsets(d: &[u8]) -> Vec<usize> {
    let mut v: Vec<usize> = (0..d.len() / 8)
        .filter(|&i| d[i * 8..i * 8 + 8].iter().any(|&b| b != 0))
        .map(|i| i * 8)
        .collect();
    if v.len() > 200_000 {
        let step = v.len() / 200_000 + 1;
        v = v.into_iter().step_by(step).collect();
    }
    v
}

fn pos(rng: &mut SplitMix, s: &Seed, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let p = if !s.hot.is_empty() && rng.below(4) != 0 {
        s.hot[rng.below(s.hot.len() as u64) as usize] + rng.below(8) as usize
    } else {
        rng.below(len as u64) as usize
    };
    p.min(len - 1)
}

fn mutate(rng: &mut SplitMix, s: &Seed, other: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&s.data);
    let rounds = 1 + rng.below(8);
    for _ in 0..rounds {
        let len = out.len();
        match rng.below(10) {
            0 | 1 => {
                if len > 0 {
                    let p = pos(rng, s, len);
                    out[p] ^= 1 << rng.below(8);
                }
            }
            2 => {
                if len > 0 {
                    let p = pos(rng, s, len);
                    out[p] = INTERESTING[rng.below(INTERESTING.len() as u64) as usize] as u8;
                }
            }
            3..=5 => {
                // An interesting (or nudged) integer of 2, 4 or 8 bytes, either endianness.
                let w = [2usize, 4, 8][rng.below(3) as usize];
                if len >= w {
                    let p = pos(rng, s, len).min(len - w) & !(w - 1);
                    let mut v = INTERESTING[rng.below(INTERESTING.len() as u64) as usize];
                    if rng.below(3) == 0 {
                        let mut cur = [0u8; 8];
                        cur[..w].copy_from_slice(&out[p..p + w]);
                        v = u64::from_le_bytes(cur)
                            .wrapping_add(rng.below(33))
                            .wrapping_sub(16);
                    }
                    let bytes = if rng.below(2) == 0 {
                        v.to_le_bytes()[..w].to_vec()
                    } else {
                        v.to_be_bytes()[8 - w..].to_vec()
                    };
                    out[p..p + w].copy_from_slice(&bytes);
                }
            }
            6 => {
                // Truncate at a structure boundary.
                if len > 0 {
                    let unit = [1u64, 512, 4096, 65536, 1 << 20][rng.below(5) as usize];
                    let n = (rng.below(len as u64) / unit) * unit;
                    out.truncate(n as usize);
                }
            }
            7 => {
                // Copy a chunk within the input.
                if len > 16 {
                    let n = 1 + rng.below(len.min(4096) as u64) as usize;
                    let a = rng.below((len - n + 1) as u64) as usize;
                    let b = pos(rng, s, len).min(len - n);
                    out.copy_within(a..a + n, b);
                }
            }
            8 => {
                // Splice from another input.
                if len > 0 && !other.is_empty() {
                    let n = 1 + rng.below(other.len().min(4096) as u64) as usize;
                    let a = rng.below((other.len() - n + 1) as u64) as usize;
                    let b = pos(rng, s, len);
                    let end = (b + n).min(len);
                    out[b..end].copy_from_slice(&other[a..a + (end - b)]);
                }
            }
            _ => {
                // Insert or delete a few bytes (shifts everything after: small inputs only).
                if len < (1 << 20) {
                    let p = if len == 0 { 0 } else { pos(rng, s, len) };
                    let n = 1 + rng.below(16) as usize;
                    if rng.below(2) == 0 {
                        let fill = rng.next_u64() as u8;
                        out.splice(p..p, std::iter::repeat_n(fill, n));
                    } else {
                        let end = (p + n).min(len);
                        out.drain(p..end);
                    }
                }
            }
        }
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: soak TARGET [--seconds N] [--corpus DIR] [--out DIR] [--seed N] [--rss-mb N]\n       soak --write-seeds TARGET DIR"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--write-seeds") {
        let (Some(t), Some(dir)) = (args.get(1), args.get(2)) else {
            usage()
        };
        let _ = std::fs::create_dir_all(dir);
        for (n, d) in viridian_fuzz::seeds(t) {
            let _ = std::fs::write(PathBuf::from(dir).join(n), d);
        }
        return;
    }
    let Some(name) = args.first().cloned() else {
        usage()
    };
    let Some(target) = viridian_fuzz::target(&name) else {
        eprintln!("unknown target {name}");
        usage()
    };
    let mut seconds = 60u64;
    let mut corpus: Option<PathBuf> = None;
    let mut out = PathBuf::from(format!("fuzz/artifacts/{name}"));
    let mut seed = 0x5eed_u64;
    let mut rss_mb = 2048u64;
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        let v = it.next().cloned().unwrap_or_else(|| usage());
        match a.as_str() {
            "--seconds" => seconds = v.parse().unwrap_or_else(|_| usage()),
            "--corpus" => corpus = Some(v.into()),
            "--out" => out = v.into(),
            "--seed" => seed = v.parse().unwrap_or_else(|_| usage()),
            "--rss-mb" => rss_mb = v.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let _ = OUT.set((out, name.clone()));

    let mut inputs: Vec<Vec<u8>> = viridian_fuzz::seeds(&name)
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    if let Some(dir) = &corpus {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if let Ok(d) = std::fs::read(e.path()) {
                    inputs.push(d);
                }
            }
        }
    }
    if inputs.is_empty() {
        inputs.push(Vec::new());
    }
    let seeds: Vec<Seed> = inputs
        .into_iter()
        .map(|d| Seed {
            hot: hot_offsets(&d),
            data: d,
        })
        .collect();

    std::panic::set_hook(Box::new(|info| {
        let p = save("crash");
        eprintln!("FINDING: panic: {info}");
        eprintln!("input saved to {p:?}");
        std::process::abort();
    }));
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_millis(500));
        let s = STARTED_MS.load(Ordering::Relaxed);
        if s != 0 && now_ms().saturating_sub(s) > 20_000 {
            let p = save("timeout");
            eprintln!("FINDING: one input ran over 20 s; saved to {p:?}");
            std::process::exit(1);
        }
    });

    let mut rng = SplitMix(seed);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut execs = 0u64;
    let mut buf = Vec::new();
    // Every seed once as is, then mutations.
    for s in &seeds {
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = s.data.clone();
        STARTED_MS.store(now_ms(), Ordering::Relaxed);
        target(&s.data);
        execs += 1;
    }
    let mut last_report = Instant::now();
    while Instant::now() < deadline {
        let s = &seeds[rng.below(seeds.len() as u64) as usize];
        let other = &seeds[rng.below(seeds.len() as u64) as usize].data;
        mutate(&mut rng, s, other, &mut buf);
        {
            let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
            cur.clear();
            cur.extend_from_slice(&buf);
        }
        STARTED_MS.store(now_ms(), Ordering::Relaxed);
        target(&buf);
        STARTED_MS.store(0, Ordering::Relaxed);
        execs += 1;
        if max_rss_mb() > rss_mb {
            let p = save("oom");
            eprintln!(
                "FINDING: peak RSS {} MiB over {rss_mb} MiB; last input saved to {p:?}",
                max_rss_mb()
            );
            std::process::exit(1);
        }
        if last_report.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "{name}: {execs} execs, {:.0} s, {:.0}/s, peak RSS {} MiB",
                start.elapsed().as_secs_f64(),
                execs as f64 / start.elapsed().as_secs_f64(),
                max_rss_mb()
            );
            last_report = Instant::now();
        }
    }
    println!(
        "{name}: {execs} execs in {:.0} s ({:.0}/s), {} seeds, peak RSS {} MiB, no findings",
        start.elapsed().as_secs_f64(),
        execs as f64 / start.elapsed().as_secs_f64(),
        seeds.len(),
        max_rss_mb()
    );
}

//! `viridian convert`: copy one or more images (any format, any chain) into a new image.
//!
//! Sparse-aware: the source's block status tells which ranges hold data; only those are read,
//! and within them runs of zeros (granularity `-S`, default 4 KiB) are skipped when the target
//! already reads zeros there. Reads and writes run on `-m` worker threads, each handling whole
//! chunks, so throughput does not hinge on one thread's latency.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use disk::{BlockDevice, Disk, ZeroFlags};

use crate::common::{self, parse_size, RemoveOnFailure, SizeRuleArg};
use crate::progress;

#[derive(clap::Args)]
pub struct Args {
    /// Source format (probed when absent).
    #[arg(short = 'f')]
    src_format: Option<String>,
    /// Output format: raw (default, as qemu-img), vhd/vpc or vhdx.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Output options, as for create.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Make the target a differencing image of this backing file and write only what differs.
    #[arg(short = 'B', long = "backing")]
    backing: Option<PathBuf>,
    /// Format of the backing file.
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    #[arg(short = 'q')]
    quiet: bool,
    /// Zero-detection granularity; 0 writes every byte (fully allocated target).
    #[arg(short = 'S', default_value = "4k")]
    sparse_size: String,
    /// Write into an existing target instead of creating one.
    #[arg(short = 'n')]
    no_create: bool,
    /// With -n: the target already reads as zeros, so zero runs need no writes.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Worker threads.
    #[arg(short = 'm', default_value_t = 8)]
    workers: usize,
    /// Allow out-of-order writes. Without it, workers read and scan in parallel but write in
    /// target order, so dynamic targets get their blocks allocated in order (no fragmentation).
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Accepted for qemu-img compatibility.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Target cache mode. `unsafe` (the default, as in qemu-img convert) skips fsync: the
    /// target is worthless until convert finishes anyway. `writeback`, `none`, `directsync`
    /// or `writethrough` make it durable before convert returns.
    #[arg(short = 't', default_value = "unsafe")]
    cache: String,
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// VHD size rule for the sources.
    #[arg(long = "size-rule", value_enum, default_value_t = SizeRuleArg::Auto)]
    size_rule: SizeRuleArg,
    /// SRC... DST
    #[arg(num_args = 2.., required = true)]
    files: Vec<PathBuf>,
}

const CHUNK: u64 = 2 << 20;

/// Work for one worker, numbered in target order.
struct Job {
    seq: u64,
    kind: JobKind,
}

enum JobKind {
    /// Copy `len` bytes from source `src` at `src_off` to the target at `dst_off`.
    Copy {
        src: usize,
        src_off: u64,
        dst_off: u64,
        len: u64,
    },
    /// Make the target read zeros here.
    Zero { dst_off: u64, len: u64 },
}

/// Lets writes happen in job order: a worker waits for its turn after reading.
#[derive(Default)]
struct Turnstile {
    next: Mutex<u64>,
    turn: std::sync::Condvar,
}

impl Turnstile {
    fn wait_for(&self, seq: u64, failed: &AtomicBool) -> Result<()> {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        while *next != seq {
            if failed.load(Ordering::SeqCst) || common::interrupted() {
                bail!("stopped");
            }
            next = self
                .turn
                .wait_timeout(next, std::time::Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }
    fn done(&self, seq: u64) {
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = seq + 1;
        self.turn.notify_all();
    }
}

struct Plan {
    /// Write in job order (no -W).
    in_order: bool,
    turnstile: Turnstile,
    failed: AtomicBool,
    sources: Vec<Disk>,
    target: Disk,
    backing: Option<Disk>,
    /// Granule for zero detection (0 = write everything).
    granule: u64,
    /// The target reads zeros everywhere before we start.
    target_zero: bool,
}

pub fn run(a: Args) -> Result<i32> {
    let (dst, srcs) = a
        .files
        .split_last()
        .ok_or_else(|| anyhow!("convert needs SRC and DST"))?;
    if a.target_is_zero && !a.no_create {
        bail!("--target-is-zero requires -n");
    }
    if a.target_is_zero && a.backing.is_some() {
        bail!("--target-is-zero cannot be used with a backing file");
    }
    match a.cache.as_str() {
        "unsafe" => disk::set_skip_file_sync(true),
        "writeback" | "none" | "directsync" | "writethrough" => {}
        other => bail!("-t {other}: expected unsafe, writeback, none, directsync or writethrough"),
    }
    let granule = parse_size(&a.sparse_size)?;
    if granule != 0 && (granule % 512 != 0 || granule > CHUNK) {
        bail!("-S must be 0 or a multiple of 512 up to 2M");
    }
    let mut sources = Vec::new();
    for s in srcs {
        if std::fs::canonicalize(s).ok() == std::fs::canonicalize(dst).ok() {
            bail!("source and target are the same file: {}", s.display());
        }
        sources.push(common::open_ro(s, a.src_format.as_deref(), a.size_rule)?);
    }
    let total: u64 = sources.iter().map(|s| s.size()).sum();

    let mut guard = None;
    let (target, backing) = if a.no_create {
        let t = common::open_with(
            dst,
            Some(&a.out_format),
            SizeRuleArg::Auto,
            chain::OpenOptions::read_write(),
        )?;
        if t.size() < total {
            bail!(
                "target {} is smaller ({} bytes) than the source ({total} bytes)",
                dst.display(),
                t.size()
            );
        }
        let b = t.backing().cloned().map(Disk::new);
        (t, b)
    } else {
        let format = common::parse_format(&a.out_format)?;
        let mut spec = crate::cmd_create::spec_from_options(format, total, &a.options)?;
        if let Some(b) = &a.backing {
            if let Some(bf) = &a.backing_format {
                let want = common::parse_format(bf)?;
                if chain::probe_path(b)? != want {
                    bail!("backing file {} is not {}", b.display(), want.name());
                }
            }
            spec.parent = Some(b.clone());
        }
        let t = chain::create(dst, &spec)
            .with_context(|| format!("cannot create {}", dst.display()))?;
        guard = Some(RemoveOnFailure::new(dst));
        if t.size() < total {
            bail!(
                "the {} target rounds the size down to {} bytes, below the source's {total}; \
                 use -o force_size=on or another format",
                a.out_format,
                t.size()
            );
        }
        let b = t.backing().cloned().map(Disk::new);
        (t, b)
    };
    let plan = Arc::new(Plan {
        in_order: !a.out_of_order,
        turnstile: Turnstile::default(),
        failed: AtomicBool::new(false),
        sources,
        target: target.clone(),
        target_zero: (!a.no_create || a.target_is_zero) && backing.is_none(),
        backing,
        granule,
    });
    let pb = progress::bar(total, a.progress, a.quiet);
    // Threads beyond twice the cores only add contention for page-cache-bound copies.
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    copy_all(&plan, a.workers.clamp(1, 16).min(2 * cores), &pb)?;
    target
        .close()
        .with_context(|| format!("cannot finish writing {}", dst.display()))?;
    pb.finish_and_clear();
    drop(plan);
    drop(target);
    if let Some(g) = guard {
        g.disarm();
    }
    Ok(0)
}

fn copy_all(plan: &Arc<Plan>, workers: usize, pb: &indicatif::ProgressBar) -> Result<()> {
    let (tx, rx) = sync_channel::<Job>(workers * 2);
    let rx = Arc::new(Mutex::new(rx));
    let first_error: Arc<Mutex<Option<anyhow::Error>>> = Arc::new(Mutex::new(None));
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (plan, rx, first_error, pb) =
            (plan.clone(), rx.clone(), first_error.clone(), pb.clone());
        handles.push(std::thread::spawn(move || {
            if let Err(e) = worker(&plan, &rx, &pb) {
                // Record the cause before others see the flag and stop with a lesser error.
                first_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
                plan.failed.store(true, Ordering::SeqCst);
                plan.turnstile.turn.notify_all();
            }
        }));
    }
    // Only the workers hold the receiver: when they all stop (error, interrupt), a blocked send
    // in the producer returns instead of waiting forever.
    drop(rx);
    let produced = produce(plan, &tx, &plan.failed, pb);
    drop(tx);
    for h in handles {
        if h.join().is_err() {
            plan.failed.store(true, Ordering::SeqCst);
        }
    }
    if let Some(e) = first_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    produced?;
    if plan.failed.load(Ordering::SeqCst) {
        bail!("a worker thread failed");
    }
    common::check_interrupted()
}

/// Walks the sources' allocation and queues work.
fn produce(
    plan: &Plan,
    tx: &std::sync::mpsc::SyncSender<Job>,
    failed: &AtomicBool,
    pb: &indicatif::ProgressBar,
) -> Result<()> {
    let mut dst_base = 0u64;
    let mut seq = 0u64;
    let mut next_seq = || {
        seq += 1;
        seq - 1
    };
    for (i, src) in plan.sources.iter().enumerate() {
        let size = src.size();
        let mut pos = 0u64;
        while pos < size {
            if failed.load(Ordering::SeqCst) {
                return Ok(());
            }
            common::check_interrupted()?;
            let e = disk::map::status_through_chain(src.as_ref(), pos, size - pos)
                .with_context(|| format!("cannot read allocation of source {}", i + 1))?;
            let len = e.length;
            let holds_data = e.data || plan.granule == 0 || plan.backing.is_some();
            if holds_data {
                // Chunks aligned to the target's offsets so every worker writes whole blocks.
                let mut off = 0;
                while off < len {
                    let dst_off = dst_base + pos + off;
                    let n = (CHUNK - dst_off % CHUNK).min(len - off);
                    let job = Job {
                        seq: next_seq(),
                        kind: JobKind::Copy {
                            src: i,
                            src_off: pos + off,
                            dst_off,
                            len: n,
                        },
                    };
                    send(tx, job)?;
                    off += n;
                }
            } else if !plan.target_zero {
                let job = Job {
                    seq: next_seq(),
                    kind: JobKind::Zero {
                        dst_off: dst_base + pos,
                        len,
                    },
                };
                send(tx, job)?;
            } else {
                pb.inc(len);
            }
            pos += len;
        }
        dst_base += size;
    }
    Ok(())
}

fn send(tx: &std::sync::mpsc::SyncSender<Job>, job: Job) -> Result<()> {
    // A closed channel means every worker stopped; their error is reported by the caller.
    if tx.send(job).is_err() {
        bail!("the copy workers stopped");
    }
    Ok(())
}

fn worker(plan: &Plan, rx: &Mutex<Receiver<Job>>, pb: &indicatif::ProgressBar) -> Result<()> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut base_buf = if plan.backing.is_some() {
        vec![0u8; CHUNK as usize]
    } else {
        Vec::new()
    };
    loop {
        let job = {
            let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
            guard.recv()
        };
        let Ok(job) = job else { return Ok(()) };
        common::check_interrupted()?;
        let seq = job.seq;
        // Reads and scans run in parallel; without -W the writes then go in job order.
        let my_turn = || -> Result<()> {
            if plan.in_order {
                plan.turnstile.wait_for(seq, &plan.failed)?;
            }
            Ok(())
        };
        match job.kind {
            JobKind::Zero { dst_off, len } => {
                my_turn()?;
                plan.target
                    .write_zeroes(dst_off, len, ZeroFlags { may_unmap: true })
                    .context("cannot write zeros to the target")?;
                pb.inc(len);
            }
            JobKind::Copy {
                src,
                src_off,
                dst_off,
                len,
            } => {
                let data = &mut buf[..len as usize];
                plan.sources[src].read_at(data, src_off).with_context(|| {
                    format!("cannot read source {} at offset {src_off}", src + 1)
                })?;
                let base = match &plan.backing {
                    Some(b) => {
                        let bb = &mut base_buf[..len as usize];
                        b.read_at(bb, dst_off).with_context(|| {
                            format!("cannot read backing file at offset {dst_off}")
                        })?;
                        Some(&base_buf[..len as usize])
                    }
                    None => None,
                };
                my_turn()?;
                write_runs(plan, data, base, dst_off)?;
                pb.inc(len);
            }
        }
        if plan.in_order {
            plan.turnstile.done(seq);
        }
    }
}

/// Writes `data` at `dst_off`, skipping granules the target already has (zeros on a zeroed
/// target, or bytes equal to the backing file's) and coalescing the rest into runs.
fn write_runs(plan: &Plan, data: &[u8], base: Option<&[u8]>, dst_off: u64) -> Result<()> {
    if plan.granule == 0 {
        plan.target
            .write_at(data, dst_off)
            .with_context(|| format!("cannot write the target at offset {dst_off}"))?;
        return Ok(());
    }
    let g = plan.granule as usize;
    let mut run_start: Option<usize> = None;
    let mut zero_run: Option<usize> = None;
    let mut i = 0;
    let flush_write = |start: usize, end: usize| -> Result<()> {
        plan.target
            .write_at(&data[start..end], dst_off + start as u64)
            .with_context(|| {
                format!(
                    "cannot write the target at offset {}",
                    dst_off + start as u64
                )
            })
    };
    let flush_zero = |start: usize, end: usize| -> Result<()> {
        plan.target
            .write_zeroes(
                dst_off + start as u64,
                (end - start) as u64,
                ZeroFlags { may_unmap: true },
            )
            .context("cannot write zeros to the target")
    };
    while i < data.len() {
        let end = (i + g).min(data.len());
        let piece = &data[i..end];
        let skip = match base {
            Some(b) => piece == &b[i..end],
            None => plan.target_zero && disk::is_zero(piece),
        };
        let zero_needed = !skip && base.is_none() && disk::is_zero(piece);
        if skip || zero_needed {
            if let Some(s) = run_start.take() {
                flush_write(s, i)?;
            }
        }
        if skip {
            if let Some(z) = zero_run.take() {
                flush_zero(z, i)?;
            }
        } else if zero_needed {
            zero_run.get_or_insert(i);
        } else {
            if let Some(z) = zero_run.take() {
                flush_zero(z, i)?;
            }
            run_start.get_or_insert(i);
        }
        i = end;
    }
    if let Some(s) = run_start {
        flush_write(s, data.len())?;
    }
    if let Some(z) = zero_run {
        flush_zero(z, data.len())?;
    }
    Ok(())
}

//! `viridian convert`: copy one or more images (any format, any chain) into a new image.
//!
//! Sparse-aware: the source's block status tells which ranges hold data; only those are read,
//! and within them runs of zeros (granularity `-S`, default 4 KiB) are skipped when the target
//! already reads zeros there. Reads and writes run on `-m` worker threads (at most two per core),
//! each handling whole chunks, so throughput does not hinge on one thread's latency.
//!
//! With `-C` (copy offloading, as in qemu-img) data runs that are plain file bytes on both sides
//! (a raw file, a fully present VHDX block) are copied by the kernel (`copy_file_range`), without
//! passing through a user buffer or a zero scan; other runs take the read/write path.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use disk::{BlockDevice, Disk, ZeroFlags};

use crate::common::{self, parse_size, SizeRuleArg};
use crate::progress;

#[derive(clap::Args)]
pub struct Args {
    /// Source format (probed when absent).
    #[arg(short = 'f', value_name = "FORMAT")]
    src_format: Option<String>,
    /// Output format: raw, vhd/vpc or vhdx. Without -O: the target's extension decides
    /// (.vhdx/.avhdx vhdx, .vhd/.avhd/.vpc vhd), anything else raw as in qemu-img; with -n
    /// the existing target is probed.
    #[arg(short = 'O', value_name = "FORMAT")]
    out_format: Option<String>,
    /// Output options, as for create.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Make the target a differencing image of this backing file and write only what differs.
    #[arg(short = 'B', long = "backing")]
    backing: Option<PathBuf>,
    /// Format of the backing file: opened as that instead of being probed.
    #[arg(short = 'F')]
    backing_format: Option<String>,
    #[command(flatten)]
    windows: common::WindowsArgs,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: print no messages (errors are still printed).
    #[arg(short = 'q')]
    quiet: bool,
    /// Zero-detection granularity (default 4k); 0 writes every byte (fully allocated target).
    #[arg(short = 'S')]
    sparse_size: Option<String>,
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
    /// Copy offloading: data runs between plain files are copied by the kernel
    /// (copy_file_range) without zero detection (so, as in qemu-img, not with -S).
    #[arg(short = 'C')]
    copy_range: bool,
    /// Force shared access: open without the lock, so the image can be read while another
    /// process (serve --rw, a VM) writes it; what is read may then be inconsistent.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Target cache mode. `unsafe` (the default, as in qemu-img convert) skips fsync: the
    /// target is worthless until convert finishes anyway. `writeback`, `none`, `directsync`
    /// or `writethrough` make it durable before convert returns.
    #[arg(short = 't', default_value = "unsafe")]
    cache: String,
    /// Source cache mode; accepted for qemu-img compatibility (sources are read through the
    /// page cache).
    #[arg(short = 'T', value_name = "CACHE")]
    src_cache: Option<String>,
    /// Salvage a damaged source: a read error becomes zeros in the target (with a warning
    /// naming the range) instead of stopping the copy, as qemu-img convert --salvage.
    #[arg(long)]
    salvage: bool,
    /// Convert even when the logical sector size changes and the source has a partition
    /// table: its sector-based offsets then no longer match and the table will not parse.
    #[arg(long = "allow-sector-size-change")]
    allow_sector_size_change: bool,
    /// VHD size rule for the sources.
    #[arg(long = "size-rule", value_enum, default_value_t = SizeRuleArg::Auto)]
    size_rule: SizeRuleArg,
    /// One or more sources (concatenated) and then the target: SRC... DST.
    #[arg(num_args = 2.., required = true, value_name = "SRC... DST")]
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
    /// --salvage: unreadable source ranges become zeros.
    salvage: bool,
    /// The target reads zeros everywhere before we start.
    target_zero: bool,
    /// -C: hand data runs between plain files to the kernel.
    copy_range: bool,
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
    // -t unsafe: the target's flushes stop at the page cache (the sources are read-only and
    // never flush).
    let skip_file_sync = match a.cache.as_str() {
        "unsafe" => true,
        "writeback" | "none" | "directsync" | "writethrough" => false,
        other => bail!("-t {other}: expected unsafe, writeback, none, directsync or writethrough"),
    };
    if let Some(t) = a.src_cache.as_deref() {
        if !["unsafe", "writeback", "none", "directsync", "writethrough"].contains(&t) {
            bail!("Invalid source cache option: {t}");
        }
    }
    if !(1..=16).contains(&a.workers) {
        bail!("Invalid number of coroutines specified. Must be between 1 and 16.");
    }
    if a.copy_range && a.sparse_size.is_some() {
        bail!("cannot enable copy offloading when -S is used");
    }
    let granule = parse_size(a.sparse_size.as_deref().unwrap_or("4k"))?;
    if granule != 0 && (granule % 512 != 0 || granule > CHUNK) {
        bail!("-S must be 0 or a multiple of 512 up to 2M");
    }
    let mut sources = Vec::new();
    for s in srcs {
        // Only files that exist can be the same file (two missing paths are not).
        if let (Ok(x), Ok(y)) = (std::fs::canonicalize(s), std::fs::canonicalize(dst)) {
            if x == y {
                bail!("source and target are the same file: {}", s.display());
            }
        }
        sources.push(common::open_ro_shared(
            s,
            a.src_format.as_deref(),
            a.size_rule,
            a.force_share,
        )?);
    }
    let total: u64 = sources.iter().map(|s| s.size()).sum();
    if let Some(f) = &a.src_format {
        for s in srcs {
            common::warn_if_extension_disagrees("-f", common::parse_format(f)?, s);
        }
    }
    let out_format = match &a.out_format {
        Some(f) => {
            let f = common::parse_format(f)?;
            common::warn_if_extension_disagrees("-O", f, dst);
            Some(f)
        }
        None if a.no_create => None,
        None => {
            let f = common::format_of_extension(dst).unwrap_or(chain::Format::Raw);
            if f != chain::Format::Raw && !a.quiet {
                eprintln!(
                    "viridian: no -O given: writing {} (from the name {})",
                    f.name(),
                    dst.display()
                );
            }
            Some(f)
        }
    };

    let mut guard = None;
    let mut replacement: Option<crate::replace::Replacement> = None;
    let (target, backing) = if a.no_create {
        let t = common::open_with(
            dst,
            out_format.map(|f| f.name()),
            SizeRuleArg::Auto,
            chain::OpenOptions {
                skip_file_sync,
                ..chain::OpenOptions::read_write()
            },
        )?;
        check_sector_size_change(&sources, srcs, t.logical_sector_size(), &a)?;
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
        let format = out_format.unwrap_or(chain::Format::Raw);
        let mut spec = crate::cmd_create::spec_from_options(format, total, &a.options)?;
        crate::cmd_create::merge_windows(&mut spec, &a.windows);
        spec.skip_file_sync = skip_file_sync;
        keep_sector_sizes(&mut spec, &sources, &a.options)?;
        let target_sector = match format {
            chain::Format::Vhdx => spec.logical_sector_size.unwrap_or(512),
            _ => 512,
        };
        check_sector_size_change(&sources, srcs, target_sector, &a)?;
        if let Some(b) = &a.backing {
            let b = &common::backing_relative_to(dst, b);
            spec.parent_format = a
                .backing_format
                .as_deref()
                .map(common::parse_format)
                .transpose()?;
            common::check_parent_name(b)?;
            spec.parent = Some(b.clone());
        }
        let prealloc = crate::cmd_create::preallocation_of(&spec, &a.options)?;
        // A new file is written under a temporary name and renamed when complete, so a killed
        // convert never leaves a partial image under the name asked for (it would open as a
        // valid image with data missing). An existing name keeps create's refusal.
        let build_at = if std::fs::symlink_metadata(dst).is_err() {
            let inputs: Vec<&std::path::Path> = srcs.iter().map(|p| p.as_path()).collect();
            let r = crate::replace::Replacement::plan(dst, "convert", &inputs)?;
            let at = r.temp.clone();
            replacement = Some(r);
            at
        } else {
            dst.to_path_buf()
        };
        let (t, g) = common::create_image(&build_at, &spec)
            .with_context(|| format!("cannot create {}", dst.display()))?;
        guard = Some(g);
        common::preallocate(&build_at, prealloc)?;
        if t.size() < total {
            bail!(
                "the {} target rounds the size down to {} bytes, below the source's {total}; \
                 use -o force_size=on or another format",
                format.name(),
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
        salvage: a.salvage,
        copy_range: a.copy_range,
    });
    let pb = progress::bar(total, a.progress, a.quiet);
    // Threads beyond twice the cores only add contention for page-cache-bound copies. (One per
    // core was tried: on the loaded 2-core machine it was slower for VHDX -> raw, 4 rounds
    // alternating, 1.3-2.3 s against 0.3-1.7 s, so the reads keep some overlap.)
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
    if let Some(r) = &replacement {
        r.commit_with(!skip_file_sync)
            .with_context(|| format!("cannot create {}", dst.display()))?;
    }
    if let Some(g) = guard {
        g.disarm();
    }
    warn_if_raw_output_probes_otherwise(dst, out_format, a.quiet);
    Ok(0)
}

/// A raw output holds the guest's bytes as they are, so they can look like another format to
/// a later open that probes (a VHD footer in the last sector, a VHDX identifier at offset 0).
/// Say so, as the file's next reader would otherwise open something else.
fn warn_if_raw_output_probes_otherwise(
    dst: &std::path::Path,
    format: Option<chain::Format>,
    quiet: bool,
) {
    if quiet || format != Some(chain::Format::Raw) {
        return;
    }
    match chain::probe_path_explained(dst) {
        Ok(p) if p.format == chain::Format::Raw => {}
        Ok(p) => eprintln!(
            "viridian: warning: {} is raw, but its contents would probe as {} ({}); \
             open it with -f raw",
            dst.display(),
            p.format.name(),
            p.rule
        ),
        Err(e) => eprintln!(
            "viridian: warning: {} is raw, but probing it fails ({e}); open it with -f raw",
            dst.display()
        ),
    }
}

/// Refuses (unless --allow-sector-size-change) a copy that changes the logical sector size of
/// a disk with a partition table: MBR and GPT count in sectors, so the table would point at
/// the wrong bytes (a GPT header is looked for at LBA 1) and the copy would not parse.
fn check_sector_size_change(
    sources: &[Disk],
    names: &[PathBuf],
    target_sector: u32,
    a: &Args,
) -> Result<()> {
    for (src, name) in sources.iter().zip(names) {
        let from = src.logical_sector_size();
        if from == target_sector {
            continue;
        }
        let scheme = mount::read_table(src.as_ref()).ok().and_then(|t| t.scheme);
        let Some(scheme) = scheme else { continue };
        if a.allow_sector_size_change {
            eprintln!(
                "viridian: warning: {} has a {scheme:?} partition table for {from}-byte sectors; \
                 with {target_sector}-byte sectors in the target it will not parse",
                name.display()
            );
        } else {
            bail!(
                "{} has a {scheme:?} partition table for {from}-byte sectors; the target's \
                 {target_sector}-byte sectors would leave it unparsable (keep \
                 logical_sector_size={from}, or pass --allow-sector-size-change)",
                name.display()
            );
        }
    }
    Ok(())
}

/// A VHDX target keeps a 4096-byte-sector source's geometry (a 4Kn disk stays 4Kn) unless the
/// options say otherwise; every source must agree.
fn keep_sector_sizes(
    spec: &mut chain::CreateSpec,
    sources: &[disk::Disk],
    options: &[String],
) -> Result<()> {
    if spec.format != chain::Format::Vhdx || spec.parent.is_some() {
        return Ok(());
    }
    let given = common::parse_options(options)?;
    let logical = sources
        .iter()
        .map(|s| s.logical_sector_size())
        .max()
        .unwrap_or(512);
    let physical = sources
        .iter()
        .map(|s| s.physical_sector_size())
        .max()
        .unwrap_or(512);
    if !given.contains_key("logical_sector_size") && logical == 4096 {
        spec.logical_sector_size = Some(4096);
    }
    if !given.contains_key("physical_sector_size") && physical == 4096 {
        spec.physical_sector_size = Some(4096);
    }
    Ok(())
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
            let e = match disk::map::status_through_chain(src.as_ref(), pos, size - pos) {
                Ok(e) => e,
                // Salvaging: copy what reads up to the next chunk boundary; the reads decide.
                Err(err) if plan.salvage => {
                    eprintln!(
                        "viridian: warning: cannot read the allocation of source {} at offset \
                         {pos}: {err}; copying the range as data",
                        i + 1
                    );
                    disk::map::MapExtent {
                        start: pos,
                        length: (CHUNK - pos % CHUNK).min(size - pos),
                        depth: 0,
                        present: true,
                        zero: false,
                        data: true,
                        offset: None,
                    }
                }
                Err(err) => {
                    return Err(anyhow::Error::new(err)
                        .context(format!("cannot read allocation of source {}", i + 1)))
                }
            };
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
                if plan.copy_range && plan.backing.is_none() && !plan.salvage {
                    my_turn()?;
                    copy_offloaded(plan, src, src_off, dst_off, len, &mut buf)?;
                    pb.inc(len);
                    if plan.in_order {
                        plan.turnstile.done(seq);
                    }
                    continue;
                }
                let data = &mut buf[..len as usize];
                let source = plan.sources[src].as_ref();
                let holes = if plan.salvage {
                    read_salvaging(source, data, src_off, src);
                    Vec::new()
                } else {
                    // Writers that take bytes as they are (-S 0, or a differing backing
                    // file's range, written whole) need the holes as real zeros.
                    let fill = plan.granule == 0 || plan.backing.is_some();
                    read_source(plan, src, data, src_off, fill)?
                };
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
                write_runs(plan, data, &holes, base, dst_off)?;
                pb.inc(len);
            }
        }
        if plan.in_order {
            plan.turnstile.done(seq);
        }
    }
}

/// --salvage: reads `buf` at `off`, and where that fails retries in smaller pieces (64 KiB,
/// then sectors) so only the unreadable sectors become zeros, each run named in a warning.
fn read_salvaging(src: &dyn BlockDevice, buf: &mut [u8], off: u64, index: usize) {
    if src.read_at(buf, off).is_ok() {
        return;
    }
    let sector = u64::from(src.logical_sector_size().max(512));
    let mut bad: Option<(u64, u64, String)> = None;
    let report = |bad: &mut Option<(u64, u64, String)>| {
        if let Some((start, end, why)) = bad.take() {
            eprintln!(
                "viridian: warning: cannot read source {} at offsets {start}..{end} ({why}); \
                 writing zeros there",
                index + 1
            );
        }
    };
    for (i, piece) in buf.chunks_mut(64 << 10).enumerate() {
        let piece_off = off + (i as u64) * (64 << 10);
        if src.read_at(piece, piece_off).is_ok() {
            report(&mut bad);
            continue;
        }
        for (j, s) in piece.chunks_mut(sector as usize).enumerate() {
            let s_off = piece_off + j as u64 * sector;
            match src.read_at(s, s_off) {
                Ok(()) => report(&mut bad),
                Err(e) => {
                    s.fill(0);
                    match &mut bad {
                        Some((_, end, _)) if *end == s_off => *end = s_off + s.len() as u64,
                        _ => {
                            report(&mut bad);
                            bad = Some((s_off, s_off + s.len() as u64, e.to_string()));
                        }
                    }
                }
            }
        }
    }
    report(&mut bad);
}

/// Reads `buf` from source `src` at `off` and returns the ranges of `buf` (sorted, disjoint)
/// that are holes of the source file: where the bytes are a plain file's and the file has a
/// hole (a VHD or VHDX block allocated but never fully written, a sparse raw file), nothing is
/// read, since a hole reads as zeros. That spares the kernel filling page-cache pages with zeros
/// and the zero scan reading them. The hole ranges are filled with zeros only when `fill` is set
/// (a writer that takes the buffer as it is); otherwise they hold stale bytes.
fn read_source(
    plan: &Plan,
    src: usize,
    buf: &mut [u8],
    off: u64,
    fill: bool,
) -> Result<Vec<Range<usize>>> {
    let source = &plan.sources[src];
    let ctx = || format!("cannot read source {} at offset {off}", src + 1);
    let mut holes: Vec<Range<usize>> = Vec::new();
    let mut done = 0usize;
    while done < buf.len() {
        let s = off + done as u64;
        let left = (buf.len() - done) as u64;
        let (hole, n) = match source.file_run(s, left) {
            Some((f, fo, n)) => {
                let (data, n) = disk::file_data_run(f, fo, n).with_context(ctx)?;
                (!data, n)
            }
            None => (false, left),
        };
        let piece = done..done + n as usize;
        if hole {
            if fill {
                buf[piece.clone()].fill(0);
            }
            // Adjacent holes (two blocks) make one range.
            match holes.last_mut() {
                Some(last) if last.end == piece.start => last.end = piece.end,
                _ => holes.push(piece),
            }
        } else {
            source.read_at(&mut buf[piece], s).with_context(ctx)?;
        }
        done += n as usize;
    }
    Ok(holes)
}

/// -C: copies a data run piece by piece, by `copy_file_range` where both sides are plain file
/// bytes and by read/write (every byte written, no zero scan) elsewhere.
fn copy_offloaded(
    plan: &Plan,
    src: usize,
    src_off: u64,
    dst_off: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<()> {
    let source = &plan.sources[src];
    // Only a raw target's bytes are plain file bytes to write into: a VHDX or VHD block written
    // behind the format's back would miss its write GUID and bitmaps.
    let target_plain = plan.target.format() == "raw";
    let mut done = 0u64;
    while done < len {
        let left = len - done;
        let (s, d) = (src_off + done, dst_off + done);
        let in_kernel =
            source
                .file_run(s, left)
                .filter(|_| target_plain)
                .and_then(|(sf, so, n)| {
                    let (df, dof, m) = plan.target.file_run(d, n)?;
                    Some((sf, so, df, dof, n.min(m)))
                });
        if let Some((sf, so, df, dof, n)) = in_kernel {
            // A hole in the source file (a block allocated but never written) needs no copy on
            // a target that reads zeros; copy_file_range would fill it in.
            let (data, n) = match plan.target_zero {
                true => disk::file_data_run(sf, so, n).with_context(|| {
                    format!("cannot read allocation of source {} at offset {s}", src + 1)
                })?,
                false => (true, n),
            };
            if !data {
                done += n;
                continue;
            }
            match disk::copy_file_range(sf, so, df, dof, n) {
                Ok(()) => {
                    done += n;
                    continue;
                }
                // A block that runs past the end of the source file (its tail reads as zeros):
                // the read path below knows how to read it.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot copy source {} at offset {s} to the target", src + 1)
                    })
                }
            }
        }
        // One piece (up to the buffer) the ordinary way.
        let n = match source.file_run(s, left) {
            Some((_, _, n)) => n,
            None => left,
        }
        .min(buf.len() as u64);
        let data = &mut buf[..n as usize];
        source
            .read_at(data, s)
            .with_context(|| format!("cannot read source {} at offset {s}", src + 1))?;
        plan.target
            .write_at(data, d)
            .with_context(|| format!("cannot write the target at offset {d}"))?;
        done += n;
    }
    Ok(())
}

/// Writes `data` at `dst_off`, skipping granules the target already has (zeros on a zeroed
/// target, or bytes equal to the backing file's) and coalescing the rest into runs. `holes`
/// (sorted, disjoint ranges of `data`) are known zeros: taken whole, neither read nor scanned.
fn write_runs(
    plan: &Plan,
    data: &[u8],
    holes: &[Range<usize>],
    base: Option<&[u8]>,
    dst_off: u64,
) -> Result<()> {
    if plan.granule == 0 {
        // The caller filled the holes with zeros: everything is written.
        plan.target
            .write_at(data, dst_off)
            .with_context(|| format!("cannot write the target at offset {dst_off}"))?;
        return Ok(());
    }
    let g = plan.granule as usize;
    let mut run_start: Option<usize> = None;
    let mut zero_run: Option<usize> = None;
    let mut holes = holes.iter().peekable();
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
        // The next piece: a whole hole, or a granule of read data (cut short at a hole).
        let (end, known_zero) = match holes.peek() {
            Some(h) if h.start == i => {
                let end = h.end;
                holes.next();
                (end, true)
            }
            Some(h) => ((i + g).min(h.start), false),
            None => ((i + g).min(data.len()), false),
        };
        let skip;
        let zero_needed;
        match base {
            Some(b) => {
                let b = &b[i..end];
                skip = if known_zero {
                    disk::is_zero(b)
                } else {
                    &data[i..end] == b
                };
                zero_needed = false;
            }
            None => {
                let zero = known_zero || disk::is_zero(&data[i..end]);
                skip = plan.target_zero && zero;
                zero_needed = !skip && zero;
            }
        }
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

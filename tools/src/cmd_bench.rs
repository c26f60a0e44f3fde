//! `viridian bench`: qemu-img bench through the request layer (`disk::Disk`, the handle every
//! consumer uses), so it measures what `serve`, `mount` and the VMM get.
//!
//! Requests go `-o` then `+ -S` each, back to the start once an offset reaches the end of the
//! image (qemu-img's order; a request that crosses the end fails, as there). `-d` requests are in
//! flight at once: one thread each, taking the next request number as it finishes one.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Result};
use chain::OpenOptions;

use crate::common::{self, SizeRuleArg};

#[derive(clap::Args)]
pub struct Args {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format", value_name = "FORMAT")]
    format: Option<String>,
    /// Number of requests.
    #[arg(short = 'c', long = "count", default_value = "75000")]
    count: String,
    /// Requests in flight at once (threads here).
    #[arg(short = 'd', long = "depth", default_value = "64")]
    depth: String,
    /// Size of each request.
    #[arg(short = 's', long = "buffer-size", default_value = "4096")]
    size: String,
    /// Offset of the first request.
    #[arg(short = 'o', long = "offset", default_value = "0")]
    offset: String,
    /// Step from one request's offset to the next (default: the request size).
    #[arg(short = 'S', long = "step-size")]
    step: Option<String>,
    /// Cache mode: writeback (default), writethrough (a flush after every write) or unsafe (no
    /// fsync); none and directsync (O_DIRECT) are refused.
    #[arg(short = 't', long = "cache", default_value = "writeback")]
    cache: String,
    /// Write test (default is read).
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// Byte written by a write test (default 0).
    #[arg(long = "pattern", value_name = "PATTERN")]
    pattern: Option<String>,
    /// Write test: flush after this many requests.
    #[arg(long = "flush-interval", value_name = "INTERVAL")]
    flush_interval: Option<String>,
    /// Accepted for qemu-img compatibility (flushes here always wait for finished requests).
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// Accepted for qemu-img compatibility (requests are served by threads).
    #[arg(short = 'i', long = "aio", value_name = "AIO")]
    aio: Option<String>,
    /// Accepted for qemu-img compatibility (same as -i native).
    #[arg(short = 'n', long = "native")]
    native: bool,
    /// Print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Open without the shared lock (read tests).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    file: PathBuf,
}

/// A number in range, with qemu-img's message when it is not.
fn ranged(what: &str, v: &str, min: u64, max: u64, sized: bool) -> Result<u64> {
    let n = if sized {
        common::parse_size(v).ok()
    } else {
        common::parse_number(v).ok()
    };
    match n {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        Some(_) => bail!("Invalid {what} specified. Must be between {min} and {max}."),
        None => bail!("Invalid {what} specified: '{v}'."),
    }
}

pub fn run(a: Args) -> Result<i32> {
    const IMAX: u64 = i32::MAX as u64;
    let count = ranged("request count", &a.count, 1, IMAX, false)?;
    let depth = ranged("queue depth", &a.depth, 1, IMAX, false)?;
    let size = ranged("buffer size", &a.size, 1, IMAX, true)?;
    let offset = ranged("offset", &a.offset, 0, i64::MAX as u64, true)?;
    let step = match &a.step {
        // As in qemu-img, a step of 0 means the default: one request size.
        Some(s) => match ranged("step size", s, 0, i64::MAX as u64, true)? {
            0 => size,
            n => n,
        },
        None => size,
    };
    let pattern = match &a.pattern {
        Some(p) => ranged("pattern byte", p, 0, 255, false)? as u8,
        None => 0,
    };
    let flush_interval = match &a.flush_interval {
        Some(f) => ranged("flush interval", f, 0, IMAX, false)?,
        None => 0,
    };
    if a.flush_interval.is_some() && !a.write {
        bail!("--flush-interval is only available in write tests");
    }
    if a.no_drain && a.flush_interval.is_none() {
        bail!("--no-drain requires --flush-interval");
    }
    // writethrough: a write completes once it is durable (a flush after each). The modes that
    // bypass the page cache (O_DIRECT) are refused rather than measured as something else.
    let (skip_file_sync, write_through) = match a.cache.as_str() {
        "unsafe" => (true, false),
        "writeback" => (false, false),
        "writethrough" => (false, true),
        "none" | "directsync" => bail!(
            "-t {}: images are not opened with O_DIRECT here, so a measurement would be of the \
             page cache; use writeback, writethrough (a flush after every write) or unsafe",
            a.cache
        ),
        other => bail!("Invalid cache mode '{other}'"),
    };
    let d = if a.write {
        common::open_with(
            &a.file,
            a.format.as_deref(),
            SizeRuleArg::Auto,
            OpenOptions {
                skip_file_sync,
                ..OpenOptions::read_write()
            },
        )?
    } else {
        common::open_ro_shared(
            &a.file,
            a.format.as_deref(),
            SizeRuleArg::Auto,
            a.force_share,
        )?
    };
    let image_size = d.size();
    if !a.quiet {
        println!(
            "Sending {count} {} requests, {size} bytes each, {depth} in parallel \
             (starting at offset {offset}, step size {step})",
            if a.write { "write" } else { "read" }
        );
        if flush_interval > 0 {
            println!("Sending flush every {flush_interval} requests");
        }
    }
    // Offsets in request order, computed as qemu-img steps them.
    let offset_of = |i: u64| -> u64 {
        if step == 0 || image_size == 0 {
            return offset;
        }
        // After the first, an offset at or past the end goes back to 0; from then on the
        // pattern repeats every `period` requests.
        let first_wrap = if offset >= image_size {
            1
        } else {
            (image_size - offset).div_ceil(step)
        };
        if i < first_wrap {
            return offset + i * step;
        }
        let period = image_size.div_ceil(step);
        ((i - first_wrap) % period) * step
    };
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let start = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..depth.min(count).min(256) {
            s.spawn(|| {
                let mut buf = vec![pattern; size as usize];
                loop {
                    if failure.lock().unwrap_or_else(|p| p.into_inner()).is_some()
                        || common::interrupted()
                    {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= count {
                        return;
                    }
                    let off = offset_of(i);
                    let r = if a.write {
                        d.write_at(&buf, off)
                    } else {
                        d.read_at(&mut buf, off)
                    };
                    let r = r.and_then(|()| {
                        let n = done.fetch_add(1, Ordering::SeqCst) + 1;
                        if (write_through && a.write)
                            || (flush_interval > 0 && n.is_multiple_of(flush_interval))
                        {
                            d.flush()
                        } else {
                            Ok(())
                        }
                    });
                    if let Err(e) = r {
                        failure
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert_with(|| e.to_string());
                        return;
                    }
                }
            });
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        bail!("Failed request: {e}");
    }
    common::check_interrupted()?;
    d.close()
        .map_err(|e| anyhow::anyhow!("Failed request: {e}"))?;
    if !a.quiet {
        println!("Run completed in {elapsed:.3} seconds.");
    }
    Ok(0)
}

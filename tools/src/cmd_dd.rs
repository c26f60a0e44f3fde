//! `viridian dd if=IN of=OUT [bs=N] [count=N] [skip=N]`: qemu-img dd.
//!
//! As qemu-img: `count` blocks are counted from the start of the input (so the copy is
//! `skip*bs .. min(count*bs, size)`), `bs` takes size suffixes and defaults to 512, `count` and
//! `skip` are plain numbers, a later operand wins, the output is created (replacing an existing
//! file) in `-O` format (default raw). A skip past the end prints qemu-img's "cannot skip to
//! specified offset" and leaves an empty output with exit 0, as qemu-img 10 does.
//!
//! Unlike qemu-img, an existing output is replaced only once the copy is complete and flushed
//! (written beside it and renamed): a failed dd leaves the old file as it was.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::common::{self, SizeRuleArg};

#[derive(clap::Args)]
pub struct Args {
    /// Input format (probed when absent).
    #[arg(short = 'f', long = "format", value_name = "FORMAT")]
    format: Option<String>,
    /// Output format (default raw).
    #[arg(short = 'O', long = "output-format", value_name = "FORMAT")]
    out_format: Option<String>,
    /// Open the input without the shared lock (another process may be writing it).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Operands: if=INPUT of=OUTPUT [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS].
    #[arg(value_name = "OPERAND")]
    operands: Vec<String>,
}

/// Largest buffer one step uses, whatever `bs` is (bs may be up to 2 GiB).
const STEP: u64 = 4 << 20;

pub fn run(a: Args) -> Result<i32> {
    let mut input = None;
    let mut output = None;
    let mut bs: u64 = 512;
    let mut count = None;
    let mut skip: u64 = 0;
    for op in &a.operands {
        let (k, v) = op.split_once('=').unwrap_or((op.as_str(), ""));
        match k {
            "if" => input = Some(PathBuf::from(v)),
            "of" => output = Some(PathBuf::from(v)),
            "bs" => {
                let n = common::parse_size(v)
                    .map_err(|_| anyhow::anyhow!("Invalid bs specified: '{v}'."))?;
                if n == 0 || n > i32::MAX as u64 {
                    bail!("Invalid bs specified. Must be between 1 and 2147483647.");
                }
                bs = n;
            }
            "count" => count = Some(block_count("count", v)?),
            "skip" => skip = block_count("skip", v)?,
            _ => bail!("unrecognized operand {op}"),
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        bail!("Must specify both input and output files");
    };
    let src = common::open_ro_shared(
        &input,
        a.format.as_deref(),
        SizeRuleArg::Auto,
        a.force_share,
    )?;
    let size = src.size();
    let end = count.map_or(size, |c| c.saturating_mul(bs).min(size));
    let start = skip.saturating_mul(bs);
    let out_format = common::parse_format(a.out_format.as_deref().unwrap_or("raw"))?;
    let len = end.saturating_sub(start);
    write_output(&src, &input, &output, out_format, start, len)?;
    if start > end {
        // qemu-img's message and exit code: the (empty) output exists, nothing was copied.
        eprintln!(
            "viridian: {}: cannot skip to specified offset",
            input.display()
        );
    }
    Ok(0)
}

fn block_count(name: &str, v: &str) -> Result<u64> {
    match v.parse::<i64>() {
        Ok(n) if n >= 0 => Ok(n as u64),
        Ok(_) => bail!(
            "Invalid {name} specified. Must be between 0 and {}.",
            i64::MAX
        ),
        Err(_) => bail!("Invalid {name} specified: '{v}'."),
    }
}

/// Creates `output` (beside it first, renamed over it once complete) holding `len` bytes of
/// `src` from `start`; writes only non-zero pieces (the new image reads zeros elsewhere).
fn write_output(
    src: &disk::Disk,
    input: &Path,
    output: &Path,
    format: chain::Format,
    start: u64,
    len: u64,
) -> Result<()> {
    let plan = crate::replace::Replacement::plan(output, "dd", &[input])?;
    let tmp = plan.temp.clone();
    let mut spec = chain::CreateSpec::new(format, len);
    spec.fixed = false;
    let (dst, guard) = common::create_image(&tmp, &spec)
        .with_context(|| format!("{}: error while creating output image", output.display()))?;
    let mut buf = vec![0u8; STEP.min(len) as usize];
    let mut done = 0;
    while done < len {
        common::check_interrupted()?;
        let n = (len - done).min(STEP) as usize;
        src.read_at(&mut buf[..n], start + done).with_context(|| {
            format!(
                "error while reading from input image file at {}",
                start + done
            )
        })?;
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_at(&buf[..n], done)
                .with_context(|| format!("error while writing to output image file at {done}"))?;
        }
        done += n as u64;
    }
    dst.close()
        .with_context(|| format!("cannot finish writing {}", output.display()))?;
    drop(dst);
    if format == chain::Format::Raw {
        // qemu-img dd's raw output is whole 512-byte sectors, zero-padded past the copy
        // (bs=3 count=1000 makes 3072 bytes).
        std::fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .and_then(|f| {
                f.set_len(len.div_ceil(512) * 512)?;
                f.sync_all()
            })
            .with_context(|| format!("cannot finish writing {}", output.display()))?;
    }
    plan.commit()
        .with_context(|| format!("cannot create {}", output.display()))?;
    guard.disarm();
    Ok(())
}

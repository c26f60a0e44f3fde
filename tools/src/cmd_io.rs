//! `viridian io`: a small qemu-io: run read/write/zero/discard/flush commands against an image
//! (through its whole chain), for scripts and tests. Reads with `-P` verify a pattern and fail
//! with exit code 1 on a mismatch.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use chain::OpenOptions;
use disk::{BlockDevice, ZeroFlags};

use crate::common::{self, SizeRuleArg, UndoEnd};

#[derive(clap::Args)]
pub struct Args {
    /// Image format (raw, vhd/vpc or vhdx); probed when absent.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Command: "write [-P BYTE] OFF LEN", "read [-P BYTE] OFF LEN", "zero OFF LEN",
    /// "discard OFF LEN", "flush". Repeatable; run in order.
    #[arg(short = 'c', required = true)]
    commands: Vec<String>,
    /// Open read-only (only read commands allowed).
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Undo mode: writes go to a throwaway child, then commit or discard it at the end.
    #[arg(long, value_enum)]
    undo: Option<UndoEnd>,
    /// Name of the undo child (default: a temporary file beside the image).
    #[arg(long = "undo-file")]
    undo_file: Option<PathBuf>,
    /// The image file.
    file: PathBuf,
}

pub fn run(a: Args) -> Result<i32> {
    if let Some(end) = a.undo {
        let mut opts = OpenOptions::read_only();
        if let Some(f) = &a.format {
            opts.format = Some(common::parse_format(f)?);
        }
        let undo = chain::UndoDisk::open(&a.file, &opts, a.undo_file.as_deref())
            .with_context(|| format!("cannot open {} in undo mode", a.file.display()))?;
        let d = undo.disk();
        let mut code = 0;
        let mut ran = Ok(());
        for c in &a.commands {
            match run_one(d.as_ref(), c) {
                Ok(n) => code = code.max(n),
                Err(e) => {
                    ran = Err(e.context(format!("{}: command {c:?}", a.file.display())));
                    break;
                }
            }
        }
        drop(d);
        match (end, ran) {
            (UndoEnd::Commit, Ok(())) => {
                undo.commit(&mut |_| {}).with_context(|| {
                    format!("cannot commit the undo child into {}", a.file.display())
                })?;
            }
            (UndoEnd::Discard, Ok(())) => undo.discard()?,
            // A failed session is never committed; the one meant to be committed keeps its
            // file (finish_undo says where).
            (end, Err(e)) => {
                if let Err(f) = common::finish_undo(undo, end, false) {
                    eprintln!("viridian: {}", common::one_line(&f));
                }
                return Err(e);
            }
        }
        return Ok(code);
    }
    let opts = if a.read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::read_write()
    };
    let d = common::open_with(&a.file, a.format.as_deref(), SizeRuleArg::Auto, opts)?;
    let mut code = 0;
    for c in &a.commands {
        code = code.max(
            run_one(d.as_ref(), c)
                .with_context(|| format!("{}: command {c:?}", a.file.display()))?,
        );
    }
    d.close()
        .with_context(|| format!("cannot finish writing {}", a.file.display()))?;
    Ok(code)
}

/// Largest buffer one command uses; longer ranges are done in pieces.
const CHUNK: u64 = 16 << 20;

fn run_one(d: &dyn BlockDevice, cmd: &str) -> Result<i32> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let (verb, rest) = words
        .split_first()
        .ok_or_else(|| anyhow!("empty command"))?;
    let mut pattern = None;
    let mut args = Vec::new();
    let mut it = rest.iter();
    while let Some(w) = it.next() {
        if *w == "-P" {
            let v = it.next().ok_or_else(|| anyhow!("-P needs a byte value"))?;
            let b = if let Some(h) = v.strip_prefix("0x") {
                u8::from_str_radix(h, 16)
            } else {
                v.parse()
            }
            .map_err(|_| anyhow!("bad pattern {v:?}"))?;
            pattern = Some(b);
        } else {
            args.push(common::parse_size(w)?);
        }
    }
    let range = || -> Result<(u64, u64)> {
        match args.as_slice() {
            [o, l] => Ok((*o, *l)),
            _ => bail!("expected OFFSET LENGTH"),
        }
    };
    match *verb {
        "write" => {
            let (off, len) = range()?;
            // In bounded pieces: a huge LEN must not become a huge allocation.
            let buf = vec![pattern.unwrap_or(0xcd); len.min(CHUNK) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(CHUNK) as usize;
                d.write_at(&buf[..n], off + done)?;
                done += n as u64;
            }
        }
        "read" => {
            let (off, len) = range()?;
            let mut buf = vec![0u8; len.min(CHUNK) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(CHUNK) as usize;
                d.read_at(&mut buf[..n], off + done)?;
                if let Some(p) = pattern {
                    if let Some(i) = buf[..n].iter().position(|&b| b != p) {
                        println!(
                            "Pattern verification failed at offset {}: {:#04x} != {p:#04x}",
                            off + done + i as u64,
                            buf[i]
                        );
                        return Ok(1);
                    }
                }
                done += n as u64;
            }
        }
        "zero" => {
            let (off, len) = range()?;
            d.write_zeroes(off, len, ZeroFlags { may_unmap: true })?;
        }
        "discard" => {
            let (off, len) = range()?;
            d.discard(off, len)?;
        }
        "flush" => d.flush()?,
        other => bail!("unknown command {other:?} (write, read, zero, discard, flush)"),
    }
    Ok(0)
}

//! `viridian io`: a small qemu-io: run read/write/zero/discard/flush commands against an image
//! (through its whole chain), for scripts and tests. As qemu-io: offsets and lengths take size
//! suffixes and `0x` hex, `read -P` verifies a pattern (exit 1 on a mismatch), `read -v` dumps
//! hex, `write -z` writes zeroes, a failed command prints "read failed: ..." and the run goes on
//! (exit 1 at the end), and each command prints "wrote N/N bytes at offset M" and a rate line.

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
    /// Command: "write [-P BYTE | -z [-u]] [-q] OFF LEN", "read [-P BYTE] [-v] [-q] OFF LEN",
    /// "zero OFF LEN", "discard OFF LEN", "flush". Repeatable; run in order.
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
                Ok(0) => {}
                // A command that failed (qemu-io style: reported, exit code 1) fails the
                // session too: it is never committed, and one meant to be keeps its file.
                Ok(n) => {
                    code = code.max(n);
                    ran = Err(anyhow!("{}: command {c:?} failed", a.file.display()));
                    break;
                }
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

/// Longest request one io command takes (qemu-io's limit, 2 GiB less one 512-byte sector).
const IO_MAX_LEN: u64 = (2 << 30) - 512;

/// Largest buffer one command uses; longer ranges are done in pieces.
const CHUNK: u64 = 16 << 20;

/// What a command's flags asked for.
#[derive(Default)]
struct Flags {
    /// `-P BYTE`: the byte written, or the byte every read byte must equal.
    pattern: Option<u8>,
    /// `-v`: hex dump what was read.
    dump: bool,
    /// `-z`: write zeroes instead of a buffer.
    zeroes: bool,
    /// `-u`: with -z, the range may be deallocated.
    unmap: bool,
    /// `-q`: no result lines.
    quiet: bool,
}

/// Runs one command; returns its exit code (1 when it failed or a pattern did not match, with
/// qemu-io's line on stdout), or an error for a command that cannot be understood.
fn run_one(d: &dyn BlockDevice, cmd: &str) -> Result<i32> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let (verb, rest) = words
        .split_first()
        .ok_or_else(|| anyhow!("empty command"))?;
    if !["write", "read", "zero", "discard", "flush"].contains(verb) {
        bail!("command \"{verb}\" not found (write, read, zero, discard, flush)");
    }
    if *verb == "flush" && !rest.is_empty() {
        bail!("flush takes no arguments");
    }
    let mut f = Flags::default();
    let mut args = Vec::new();
    let mut it = rest.iter();
    while let Some(w) = it.next() {
        match *w {
            "-P" => {
                let v = it.next().ok_or_else(|| anyhow!("-P needs a byte value"))?;
                f.pattern = Some(match common::parse_number(v) {
                    Ok(b) if b <= 255 => b as u8,
                    _ => bail!("{v} is not a valid pattern byte"),
                });
            }
            "-v" => f.dump = true,
            "-z" => f.zeroes = true,
            "-u" => f.unmap = true,
            "-q" => f.quiet = true,
            _ => args.push(common::parse_size(w)?),
        }
    }
    if f.unmap && !f.zeroes {
        bail!("-u requires -z to be specified");
    }
    let (off, len) = match (*verb, args.as_slice()) {
        ("flush", []) => (0, 0),
        ("flush", _) => bail!("flush takes no arguments"),
        (_, [o, l]) => (*o, *l),
        _ => bail!("expected OFFSET LENGTH"),
    };
    // One command moves at most what qemu-io allows (just under 2 GiB): a huge length would
    // otherwise run for hours in bounded pieces.
    if len > IO_MAX_LEN {
        bail!("length cannot exceed {IO_MAX_LEN}, given {len}");
    }
    if f.zeroes && f.pattern.is_some() {
        bail!("-z and -P cannot be specified at the same time");
    }
    let start = std::time::Instant::now();
    let mut mismatch = false;
    // The whole request is checked before any piece of it is done (the pieces are bounded),
    // so a request past the end changes nothing, as in qemu-io.
    let r = if *verb == "flush" {
        Ok(())
    } else {
        disk::check_range(off, len, d.size())
    };
    let r = r.and_then(|()| match *verb {
        "write" if f.zeroes => d.write_zeroes(off, len, ZeroFlags { may_unmap: f.unmap }),
        "write" => write_pattern(d, off, len, f.pattern.unwrap_or(0xcd)),
        "read" => read_checked(d, off, len, &f, &mut mismatch),
        "zero" => d.write_zeroes(off, len, ZeroFlags { may_unmap: true }),
        "discard" => d.discard(off, len),
        _ => d.flush(),
    });
    if let Err(e) = r {
        let what = match *verb {
            "zero" => "write",
            v => v,
        };
        // qemu-io's line on stdout; the image named on stderr for whoever reads the errors.
        println!("{what} failed: {e}");
        let name = d
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the image".into());
        eprintln!("viridian: {name}: {what} failed: {e}");
        return Ok(1);
    }
    if !f.quiet && *verb != "flush" {
        let done = match *verb {
            "read" => "read",
            "discard" => "discard",
            _ => "wrote",
        };
        println!("{done} {len}/{len} bytes at offset {off}");
        println!("{}", rate_line(len, start.elapsed().as_secs_f64()));
    }
    Ok(i32::from(mismatch))
}

/// Writes `len` bytes of `byte` in bounded pieces (a huge LEN is no huge allocation).
fn write_pattern(d: &dyn BlockDevice, off: u64, len: u64, byte: u8) -> disk::Result<()> {
    let buf = vec![byte; len.min(CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        d.write_at(&buf[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Reads `len` bytes; with -P checks every byte (qemu-io's failure line names the request, not
/// the byte), with -v prints a hex dump.
fn read_checked(
    d: &dyn BlockDevice,
    off: u64,
    len: u64,
    f: &Flags,
    mismatch: &mut bool,
) -> disk::Result<()> {
    let mut buf = vec![0u8; len.min(CHUNK) as usize];
    let mut done = 0;
    let mut dump = Vec::new();
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        d.read_at(&mut buf[..n], off + done)?;
        if let Some(p) = f.pattern {
            *mismatch |= buf[..n].iter().any(|&b| b != p);
        }
        if f.dump {
            dump.push(hex_dump(&buf[..n], off + done));
        }
        done += n as u64;
    }
    if *mismatch {
        println!("Pattern verification failed at offset {off}, {len} bytes");
    }
    for chunk in dump {
        print!("{chunk}");
    }
    Ok(())
}

/// qemu-io's `-v` dump: offset, 16 bytes in hex, then the printable characters.
fn hex_dump(buf: &[u8], base: u64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for (i, line) in buf.chunks(16).enumerate() {
        let _ = write!(out, "{:08x}:  ", base + 16 * i as u64);
        for b in line {
            let _ = write!(out, "{b:02x} ");
        }
        out.push(' ');
        for &b in line {
            out.push(if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '.'
            });
        }
        out.push('\n');
    }
    out
}

/// qemu-io's sizes: "512 bytes", "4 KiB", "1.889 MiB" (three decimals unless whole).
fn io_size(n: f64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024.0 {
        let s = format!("{n:.3}");
        return format!("{} bytes", s.strip_suffix(".000").unwrap_or(&s));
    }
    let mut v = n / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    let s = format!("{v:.3}");
    format!("{} {}", s.strip_suffix(".000").unwrap_or(&s), UNITS[u])
}

/// qemu-io's second result line: "4 KiB, 1 ops; 00.02 sec (204.024 KiB/sec and 51.0061 ops/sec)".
fn rate_line(len: u64, secs: f64) -> String {
    let secs = secs.max(1e-9);
    let cs = (secs * 100.0) as u64;
    let time = if cs >= 6000 {
        format!("{}:{:02}.{:02}", cs / 6000, cs / 100 % 60, cs % 100)
    } else {
        format!("{:02}.{:02} sec", cs / 100, cs % 100)
    };
    format!(
        "{}, 1 ops; {time} ({}/sec and {:.4} ops/sec)",
        io_size(len as f64),
        io_size(len as f64 / secs),
        1.0 / secs
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_qemu_io() {
        assert_eq!(io_size(512.0), "512 bytes");
        assert_eq!(io_size(1.0), "1 bytes");
        assert_eq!(io_size(4096.0), "4 KiB");
        assert_eq!(io_size(1.5 * 1048576.0), "1.500 MiB");
    }

    #[test]
    fn hex_dump_reads_like_qemu_io() {
        let mut b = vec![7u8; 17];
        b[1] = b'A';
        assert_eq!(
            hex_dump(&b, 0x100000),
            "00100000:  07 41 07 07 07 07 07 07 07 07 07 07 07 07 07 07  .A..............\n\
             00100010:  07  .\n"
        );
    }
}

//! `viridian compare`: qemu-img compare's semantics and exit codes (0 identical, 1 differ,
//! 2 open error, 3 allocation error, 4 read error).

use std::path::PathBuf;

use anyhow::Result;
use disk::BlockDevice;

use crate::common::{self, SizeRuleArg};
use crate::progress;

#[derive(clap::Args)]
pub struct Args {
    /// Format of FILE1 (probed when absent).
    #[arg(short = 'f')]
    format1: Option<String>,
    /// Format of FILE2 (probed when absent).
    #[arg(short = 'F')]
    format2: Option<String>,
    /// Strict: sizes and allocation must match too.
    #[arg(short = 's')]
    strict: bool,
    /// Show a progress bar.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: print no messages (errors are still printed).
    #[arg(short = 'q')]
    quiet: bool,
    /// Force shared access: open without the lock, so the image can be read while another
    /// process (serve --rw, a VM) writes it; what is read may then be inconsistent.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// How a VHD's virtual size is derived (auto follows qemu 10).
    #[arg(long = "size-rule", value_enum, default_value_t = SizeRuleArg::Auto)]
    size_rule: SizeRuleArg,
    /// The first image.
    file1: PathBuf,
    /// The second image.
    file2: PathBuf,
}

const CHUNK: u64 = 1 << 20;

pub fn run(a: Args) -> Result<i32> {
    let open = |p: &PathBuf, f: &Option<String>| {
        common::open_ro_shared(p, f.as_deref(), a.size_rule, a.force_share)
    };
    let d1 = match open(&a.file1, &a.format1) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("viridian: {}", common::one_line(&e));
            return Ok(2);
        }
    };
    let d2 = match open(&a.file2, &a.format2) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("viridian: {}", common::one_line(&e));
            return Ok(2);
        }
    };
    let code = compare(d1.as_ref(), d2.as_ref(), &a)?;
    if code == 0 && !a.quiet {
        println!("Images are identical.");
    }
    Ok(code)
}

fn say(quiet: bool, msg: String) {
    if !quiet {
        println!("{msg}");
    }
}

fn compare(d1: &dyn BlockDevice, d2: &dyn BlockDevice, a: &Args) -> Result<i32> {
    let (s1, s2) = (d1.size(), d2.size());
    if a.strict && s1 != s2 {
        say(a.quiet, "Strict mode: Image size mismatch!".into());
        return Ok(1);
    }
    if s1 != s2 {
        // qemu-img's words (stdout), so scripts that grep for them keep working.
        say(a.quiet, "Warning: Image size mismatch!".into());
    }
    let common_len = s1.min(s2);
    let pb = progress::bar(s1.max(s2), a.progress, a.quiet);
    let mut b1 = vec![0u8; CHUNK as usize];
    let mut b2 = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < common_len {
        common::check_interrupted()?;
        let (e1, e2) = match (
            disk::map::status_through_chain(d1, pos, common_len - pos),
            disk::map::status_through_chain(d2, pos, common_len - pos),
        ) {
            (Ok(x), Ok(y)) => (x, y),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("viridian: cannot get allocation at offset {pos}: {e}");
                return Ok(3);
            }
        };
        let run = e1.length.min(e2.length).max(1);
        let both_zero = !e1.data && !e2.data;
        // Zero runs are skipped whole; data is compared a chunk at a time.
        let n = if both_zero {
            run
        } else {
            run.min(CHUNK - pos % CHUNK)
        };
        if a.strict && (e1.present != e2.present || e1.zero != e2.zero) {
            say(
                a.quiet,
                format!("Strict mode: Offset {pos} block status mismatch!"),
            );
            return Ok(1);
        }
        if !both_zero {
            let (x, y) = (&mut b1[..n as usize], &mut b2[..n as usize]);
            if let Err(e) = d1.read_at(x, pos).and_then(|_| d2.read_at(y, pos)) {
                eprintln!("viridian: error while reading offset {pos}: {e}");
                return Ok(4);
            }
            if x != y {
                let first = x
                    .iter()
                    .zip(y.iter())
                    .position(|(p, q)| p != q)
                    .unwrap_or(0) as u64;
                // qemu reports the first differing sector's offset.
                let at = (pos + first) / 512 * 512;
                say(a.quiet, format!("Content mismatch at offset {at}!"));
                return Ok(1);
            }
        }
        pos += n;
        pb.inc(n);
    }
    // Non-strict: the longer image's tail must read zeros.
    let longer: &dyn BlockDevice = if s1 > s2 { d1 } else { d2 };
    let mut pos = common_len;
    let end = s1.max(s2);
    while pos < end {
        let e = match disk::map::status_through_chain(longer, pos, end - pos) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("viridian: cannot get allocation at offset {pos}: {e}");
                return Ok(3);
            }
        };
        let n = if e.data {
            e.length.min(CHUNK)
        } else {
            e.length
        }
        .max(1);
        if e.data {
            let x = &mut b1[..n as usize];
            if let Err(e) = longer.read_at(x, pos) {
                eprintln!("viridian: error while reading offset {pos}: {e}");
                return Ok(4);
            }
            if let Some(i) = x.iter().position(|&b| b != 0) {
                say(
                    a.quiet,
                    format!(
                        "Content mismatch at offset {}!",
                        (pos + i as u64) / 512 * 512
                    ),
                );
                return Ok(1);
            }
        }
        pos += n;
        pb.inc(n);
    }
    pb.finish_and_clear();
    Ok(0)
}

//! `viridian completions SHELL` and `viridian man [VERB]`: shell completions and man pages
//! generated from the clap definitions, so they list exactly the flags `--help` shows.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for; print the script to stdout (e.g. into
    /// /usr/share/bash-completion/completions/viridian).
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(clap::Args)]
pub struct ManArgs {
    /// Write viridian.1 and one viridian-VERB.1 per verb into this folder instead.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The verb whose page to print (roff, for `man -l -`); the main page when absent.
    verb: Option<String>,
}

pub fn run_completions(a: CompletionsArgs, mut cmd: clap::Command) -> Result<i32> {
    // Generated into memory first: clap_complete panics when its writer fails, and a reader
    // that stops early (`| head`) must end us quietly like every other verb.
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "viridian", &mut script);
    write_stdout(&script)
}

pub fn run_man(a: ManArgs, cmd: clap::Command) -> Result<i32> {
    let cmd = cmd.name("viridian");
    if let Some(dir) = &a.dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut pages = vec![("viridian.1".to_string(), cmd.clone())];
        for sub in cmd.get_subcommands() {
            let name = format!("viridian-{}", sub.get_name());
            pages.push((format!("{name}.1"), sub.clone().name(static_str(name))));
        }
        for (file, page) in pages {
            let path = dir.join(&file);
            let mut out = Vec::new();
            clap_mangen::Man::new(page).render(&mut out)?;
            // Written beside it and renamed: whatever had the page's name (a symbolic link, a
            // hard link, a FIFO) is replaced, never written through or blocked on.
            let tmp = dir.join(format!(".{file}.tmp-{}", std::process::id()));
            std::fs::write(&tmp, out)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(&tmp);
                })
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        return Ok(0);
    }
    let page = match &a.verb {
        None => cmd,
        Some(v) => match cmd.find_subcommand(v) {
            Some(sub) => sub.clone().name(static_str(format!("viridian-{v}"))),
            None => bail!("no verb {v:?} (see viridian --help)"),
        },
    };
    let mut out = Vec::new();
    clap_mangen::Man::new(page).render(&mut out)?;
    write_stdout(&out)
}

/// Writes a generated page or script; a reader that stopped early (`| head`) ends us quietly.
fn write_stdout(bytes: &[u8]) -> Result<i32> {
    match std::io::stdout().write_all(bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        r => r.map(|()| 0).context("cannot write to standard output"),
    }
}

/// clap names are `&'static str` without its "string" feature; this one-shot command leaks the
/// few page names it builds (a handful of bytes, freed at exit).
fn static_str(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

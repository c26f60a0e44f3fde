//! `viridian undo`: inspect, commit or discard undo disks (Virtual PC `.vud` files, any
//! differencing image used as a throwaway layer, the undo files that `serve`/`mount`/`io`/`run`
//! `--undo` sessions leave when they are killed: `.NAME.undo-*`, and raw undo files).

use disk::BlockDevice;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use chain::OpenOptions;
use serde_json::json;

use crate::common::{self, Output, SizeRuleArg};
use crate::progress;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// List undo disks (.vud) in a directory with their parents and sizes.
    List {
        /// Output as human text or JSON (qemu-img's keys).
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
        /// Folder to look for undo disks in (default: the current folder).
        dir: PathBuf,
    },
    /// Show what an undo disk changes: the ranges it holds.
    Show {
        /// Output as human text or JSON (qemu-img's keys).
        #[arg(long, value_enum, default_value_t = Output::Human)]
        output: Output,
        /// The undo disk's format (vhd or vhdx); probed when absent.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// The image file.
        file: PathBuf,
    },
    /// Merge an undo disk into its parent, then delete it.
    Commit {
        /// Show a progress bar.
        #[arg(short = 'p')]
        progress: bool,
        /// Quiet: print no messages (errors are still printed).
        #[arg(short = 'q')]
        quiet: bool,
        /// Commit a file not named like an undo disk, or a raw undo file whose base was written
        /// after the session started (the 64 KiB pieces the session changed then overwrite the
        /// newer data in them).
        #[arg(long)]
        force: bool,
        /// The undo disk's format (vhd or vhdx); probed when absent. Its parent is always
        /// opened as the same format.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// The image file.
        file: PathBuf,
    },
    /// Delete an undo disk, leaving its parent as it is.
    Discard {
        /// Quiet: print no messages (errors are still printed).
        #[arg(short = 'q')]
        quiet: bool,
        /// Discard even after an interrupted commit (the base keeps the part already written),
        /// or a file not named like an undo disk.
        #[arg(long)]
        force: bool,
        /// The undo disk's format (vhd or vhdx); probed when absent.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// The image file.
        file: PathBuf,
    },
}

struct UndoFacts {
    path: PathBuf,
    parent: Option<PathBuf>,
    parent_error: Option<String>,
    size: u64,
    changed: Vec<(u64, u64)>,
    /// A commit started and did not finish: the base holds part of the changes, so the undo
    /// disk must be committed again, not discarded.
    commit_interrupted: bool,
}

/// Whether a directory entry looks like an undo disk: `*.vud`, or the hidden `.NAME.undo-*`
/// files that undo sessions create beside their image.
fn looks_like_undo(p: &Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A commit's marker (`NAME.committing`) sits beside its undo disk but is not one.
    !name.ends_with(".committing")
        && (p.extension().is_some_and(|x| x.eq_ignore_ascii_case("vud"))
            || (name.starts_with('.') && name.contains(".undo-")))
}

/// `undo commit` and `undo discard` delete the file they are given, which is only safe for
/// an undo disk: nothing else is built on it. An ordinary differencing image may have children
/// of its own (`commit` is the verb for it), so it is refused unless forced.
fn refuse_unless_undo(file: &Path, force: bool, verb: &str) -> Result<()> {
    let raw = chain::undo::raw_undo_base(file)
        .with_context(|| format!("cannot open {}", file.display()))?
        .is_some();
    if !raw && !looks_like_undo(file) && !force {
        bail!(
            "{} is not an undo disk (a *.vud file, a .NAME.undo-* file or a raw undo file): \
             other images may be built on it; use `viridian commit` for a differencing image, \
             or `undo {verb} --force` if it really is an undo disk",
            file.display()
        );
    }
    Ok(())
}

fn raw_facts(file: &Path) -> Result<UndoFacts> {
    let (parent, ov) = chain::undo::open_raw_undo(file)
        .with_context(|| format!("cannot open the raw undo file {}", file.display()))?;
    Ok(UndoFacts {
        path: file.to_path_buf(),
        parent: Some(parent),
        parent_error: None,
        size: disk::BlockDevice::size(&ov),
        changed: ov.written_ranges(),
        commit_interrupted: chain::undo::commit_interrupted(file),
    })
}

fn facts(file: &Path, format: Option<&str>) -> Result<UndoFacts> {
    if chain::undo::raw_undo_base(file)
        .with_context(|| format!("cannot open {}", file.display()))?
        .is_some()
    {
        return raw_facts(file);
    }
    let mut alone = OpenOptions::read_only();
    alone.no_parent = true;
    let child = common::open_with(file, format, SizeRuleArg::Auto, alone)?;
    if child.parent_link().is_none() {
        bail!("{} is not a differencing (undo) disk", file.display());
    }
    let whole = OpenOptions {
        format: common::parse_format(child.format()).ok(),
        ..OpenOptions::read_only()
    };
    let (parent, parent_error) = match chain::open(file, &whole) {
        Ok(full) => (
            full.backing().and_then(|b| b.path().map(Path::to_path_buf)),
            None,
        ),
        Err(e) => (None, Some(e.to_string())),
    };
    let mut changed: Vec<(u64, u64)> = Vec::new();
    let size = child.size();
    let mut pos = 0;
    while pos < size {
        let e = disk::map::status_through_chain(child.as_ref(), pos, size - pos)?;
        if e.present && e.depth == 0 {
            match changed.last_mut() {
                Some((s, l)) if *s + *l == pos => *l += e.length,
                _ => changed.push((pos, e.length)),
            }
        }
        pos += e.length;
    }
    Ok(UndoFacts {
        path: file.to_path_buf(),
        parent,
        parent_error,
        size,
        changed,
        commit_interrupted: chain::undo::commit_interrupted(file),
    })
}

fn facts_json(f: &UndoFacts) -> serde_json::Value {
    json!({
        "filename": f.path.display().to_string(),
        "parent": f.parent.as_ref().map(|p| p.display().to_string()),
        "parent-error": f.parent_error,
        "virtual-size": f.size,
        "changed-bytes": f.changed.iter().map(|(_, l)| l).sum::<u64>(),
        "changed-ranges": f.changed.iter().map(|(s, l)| json!({"start": s, "length": l})).collect::<Vec<_>>(),
        "commit-interrupted": f.commit_interrupted,
    })
}

pub fn run(a: Args) -> Result<i32> {
    match a.action {
        Action::List { output, dir } => {
            let mut found = Vec::new();
            let entries = std::fs::read_dir(&dir)
                .with_context(|| format!("cannot read {}", dir.display()))?;
            let mut paths: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| looks_like_undo(p))
                .collect();
            paths.sort();
            for p in paths {
                match facts(&p, None) {
                    Ok(f) => found.push(f),
                    Err(e) => eprintln!(
                        "viridian: skipping {}: {}",
                        p.display(),
                        common::one_line(&e)
                    ),
                }
            }
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &found.iter().map(facts_json).collect::<Vec<_>>()
                    )?
                ),
                Output::Human => {
                    if found.is_empty() {
                        println!("No undo disks (.vud) in {}", dir.display());
                    }
                    for f in &found {
                        let changed: u64 = f.changed.iter().map(|(_, l)| l).sum();
                        println!(
                            "{}\tparent: {}\tchanged: {}{}",
                            f.path.display(),
                            f.parent
                                .as_ref()
                                .map(|p| p.display().to_string())
                                .unwrap_or_else(|| format!(
                                    "NOT FOUND ({})",
                                    f.parent_error.clone().unwrap_or_default()
                                )),
                            common::human_size(changed),
                            if f.commit_interrupted {
                                "\tCOMMIT INTERRUPTED (run undo commit again)"
                            } else {
                                ""
                            }
                        );
                    }
                }
            }
            Ok(0)
        }
        Action::Show {
            output,
            format,
            file,
        } => {
            let f = facts(&file, format.as_deref())?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&facts_json(&f))?),
                Output::Human => {
                    println!("undo disk: {}", f.path.display());
                    if f.commit_interrupted {
                        println!(
                            "state: a commit was interrupted; the base holds part of these \
                             changes: run `viridian undo commit {}` again to finish it",
                            f.path.display()
                        );
                    }
                    match &f.parent {
                        Some(p) => println!("parent: {}", p.display()),
                        None => println!(
                            "parent: not found: {}",
                            f.parent_error.clone().unwrap_or_default()
                        ),
                    }
                    println!(
                        "virtual size: {} ({} bytes)",
                        common::human_size(f.size),
                        f.size
                    );
                    let changed: u64 = f.changed.iter().map(|(_, l)| l).sum();
                    println!(
                        "changed: {} in {} ranges",
                        common::human_size(changed),
                        f.changed.len()
                    );
                    for (s, l) in &f.changed {
                        println!("    {s:#x} +{l:#x}");
                    }
                }
            }
            Ok(0)
        }
        Action::Commit {
            progress,
            quiet,
            force,
            format,
            file,
        } => {
            // Killed after the undo disk was removed but before its marker was: the commit
            // had finished; only the marker is left to clear.
            if !file.exists() && chain::undo::commit_interrupted(&file) {
                let marker = chain::undo::commit_marker(&file);
                std::fs::remove_file(&marker)
                    .with_context(|| format!("cannot remove {}", marker.display()))?;
                if !quiet {
                    println!(
                        "The commit of {} had already finished; removed its marker",
                        file.display()
                    );
                }
                return Ok(0);
            }
            refuse_unless_undo(&file, force, "commit")?;
            let f = facts(&file, format.as_deref())?;
            let parent = f.parent.clone().with_context(|| {
                format!(
                    "cannot commit {}: {}",
                    file.display(),
                    f.parent_error.clone().unwrap_or_default()
                )
            })?;
            let pb = progress::bar(f.size, progress, quiet);
            let merged = if chain::undo::raw_undo_base(&file)?.is_some() {
                chain::undo::commit_raw_undo(&file, false, force, &mut |n| pb.inc(n))
                    .map(|(_, n)| n)
            } else {
                chain::undo::commit_child(&file, &parent, force, &mut |n| pb.inc(n))
            }
            .with_context(|| {
                format!(
                    "cannot merge {} into {} (the undo disk is kept and still opens; run the \
                     commit again)",
                    file.display(),
                    parent.display()
                )
            })?;
            pb.finish_and_clear();
            chain::undo::finish_commit(&file)?;
            if !quiet {
                println!(
                    "Committed {merged} bytes into {}; removed {}",
                    parent.display(),
                    file.display()
                );
            }
            Ok(0)
        }
        Action::Discard {
            quiet,
            force,
            format,
            file,
        } => {
            refuse_unless_undo(&file, force, "discard")?;
            if chain::undo::commit_interrupted(&file) && !force {
                bail!(
                    "a commit of {} was interrupted: its base already holds part of the \
                     session, so discarding cannot restore it; run `viridian undo commit` to \
                     finish it (or `undo discard --force` to keep the base as it is)",
                    file.display()
                );
            }
            let _ = std::fs::remove_file(chain::undo::commit_marker(&file));
            if chain::undo::raw_undo_base(&file)
                .with_context(|| format!("cannot open {}", file.display()))?
                .is_some()
            {
                std::fs::remove_file(&file)
                    .with_context(|| format!("cannot remove {}", file.display()))?;
                if !quiet {
                    println!("Discarded {}", file.display());
                }
                return Ok(0);
            }
            let mut alone = OpenOptions::read_only();
            alone.no_parent = true;
            let child = common::open_with(&file, format.as_deref(), SizeRuleArg::Auto, alone)?;
            if child.parent_link().is_none() {
                bail!(
                    "{} is not a differencing (undo) disk; refusing to delete it",
                    file.display()
                );
            }
            drop(child);
            std::fs::remove_file(&file)
                .with_context(|| format!("cannot remove {}", file.display()))?;
            if !quiet {
                println!("Discarded {}", file.display());
            }
            Ok(0)
        }
    }
}

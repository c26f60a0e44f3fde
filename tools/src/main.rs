//! `viridian`: a qemu-img-style tool for VHD, VHDX and raw images.
//!
//! Verbs, flags, JSON keys and exit codes follow qemu-img where the concept is the same.
//! Every error is reported as one line on stderr (`viridian: what failed: why`) with exit code 1,
//! except where qemu-img defines other codes (check, compare).

// unsafe only for Linux calls std has no wrapper for (signal handler, fallocate, lseek
// SEEK_HOLE/SEEK_DATA), each with a SAFETY comment.
#![deny(unsafe_op_in_unsafe_fn)]

mod cmd_amend;
mod cmd_bench;
mod cmd_check;
mod cmd_commit;
mod cmd_compare;
mod cmd_convert;
mod cmd_create;
mod cmd_dd;
mod cmd_docs;
mod cmd_info;
mod cmd_io;
mod cmd_map;
mod cmd_measure;
mod cmd_migrate;
mod cmd_mount;
mod cmd_rebase;
mod cmd_resize;
mod cmd_run;
mod cmd_serve;
mod cmd_undo;
mod cmd_vm;
mod common;
mod progress;
mod replace;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "viridian",
    version,
    about = "VHD, VHDX and raw disk image tool (qemu-img style)",
    propagate_version = true
)]
struct Cli {
    /// Memory for the block allocation table of each VHD or VHDX file opened, e.g. 256K, 64M
    /// (default 4M for VHDX, 1M for VHD): BAT pages are read on demand and the least recently
    /// used are dropped past this bound (pages changed and not yet flushed are always kept).
    #[arg(long = "bat-cache", global = true, value_name = "SIZE", value_parser = common::parse_size)]
    bat_cache: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show facts about an image (and its backing chain).
    Info(cmd_info::Args),
    /// Create an image (fixed, dynamic or differencing).
    Create(cmd_create::Args),
    /// Copy images between formats, sparse-aware; flattens chains.
    Convert(cmd_convert::Args),
    /// Check an image for consistency and optionally repair it.
    Check(cmd_check::Args),
    /// Compare the contents of two images.
    Compare(cmd_compare::Args),
    /// Show the allocation map of an image.
    Map(cmd_map::Args),
    /// Compute the file size a converted image needs.
    Measure(cmd_measure::Args),
    /// Merge a differencing image into its parent (like Merge-VHD).
    Commit(cmd_commit::Args),
    /// Change the parent of a differencing image (like Set-VHD -ParentPath).
    Rebase(cmd_rebase::Args),
    /// Change an image in place: subformat, block size, physical sector size (qemu-img amend).
    Amend(cmd_amend::Args),
    /// Copy an image like dd: if=, of=, bs=, count=, skip= (qemu-img dd).
    Dd(cmd_dd::Args),
    /// Measure read or write speed through the request layer (qemu-img bench).
    Bench(cmd_bench::Args),
    /// Grow (or shrink, VHDX) an image.
    Resize(cmd_resize::Args),
    /// Reclaim all-zero and trimmed blocks (like Optimize-VHD).
    Compact(cmd_resize::CompactArgs),
    /// Create a differencing child on top of an image, or list its chain.
    Snapshot(cmd_create::SnapshotArgs),
    /// Run read/write/zero/discard commands against an image (like qemu-io).
    Io(cmd_io::Args),
    /// List, show, commit or discard undo disks (.vud).
    Undo(cmd_undo::Args),
    /// Expose an image (and its partitions) as files through FUSE.
    Mount(cmd_mount::Args),
    /// Unmount a `viridian mount`.
    Unmount(cmd_mount::UnmountArgs),
    /// Serve images over NBD.
    Serve(cmd_serve::Args),
    /// Migrate a Virtual PC / Virtual Server VM (.vmc) to VHDX/VHD and a VM TOML.
    Migrate(cmd_migrate::Args),
    /// Boot a Linux kernel under KVM with the disks on a Hyper-V synthetic SCSI controller.
    Run(cmd_run::Args),
    /// Print shell completions (bash, zsh, fish, ...) generated from these definitions.
    Completions(cmd_docs::CompletionsArgs),
    /// Print the man page of viridian or of one verb (or write them all with --dir).
    Man(cmd_docs::ManArgs),
    /// Send a command to a running VM's control socket (`run --qmp SOCKET`).
    Vm(cmd_vm::Args),
}

fn main() {
    common::install_interrupt_handler();
    common::quiet_on_broken_pipe();
    let cli = parse_args();
    if let Some(bytes) = cli.bat_cache {
        chain::set_default_bat_cache_bytes(usize::try_from(bytes).unwrap_or(usize::MAX));
    }
    let read_only_verb = match &cli.command {
        Command::Info(_) | Command::Compare(_) | Command::Map(_) | Command::Measure(_) => true,
        Command::Check(a) => !a.repairs(),
        _ => false,
    };
    if read_only_verb {
        common::stop_at_once_on_signal();
    }
    let result = match cli.command {
        Command::Info(a) => cmd_info::run(a),
        Command::Create(a) => cmd_create::run(a),
        Command::Convert(a) => cmd_convert::run(a),
        Command::Check(a) => cmd_check::run(a),
        Command::Compare(a) => cmd_compare::run(a),
        Command::Map(a) => cmd_map::run(a),
        Command::Measure(a) => cmd_measure::run(a),
        Command::Commit(a) => cmd_commit::run(a),
        Command::Rebase(a) => cmd_rebase::run(a),
        Command::Amend(a) => cmd_amend::run(a),
        Command::Dd(a) => cmd_dd::run(a),
        Command::Bench(a) => cmd_bench::run(a),
        Command::Resize(a) => cmd_resize::run(a),
        Command::Compact(a) => cmd_resize::run_compact(a),
        Command::Snapshot(a) => cmd_create::run_snapshot(a),
        Command::Io(a) => cmd_io::run(a),
        Command::Undo(a) => cmd_undo::run(a),
        Command::Mount(a) => cmd_mount::run(a),
        Command::Unmount(a) => cmd_mount::run_unmount(a),
        Command::Serve(a) => cmd_serve::run(a),
        Command::Migrate(a) => cmd_migrate::run(a),
        Command::Run(a) => cmd_run::run(a),
        Command::Completions(a) => {
            cmd_docs::run_completions(a, <Cli as clap::CommandFactory>::command())
        }
        Command::Man(a) => cmd_docs::run_man(a, <Cli as clap::CommandFactory>::command()),
        Command::Vm(a) => cmd_vm::run(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // Never a panic, even with stderr full or closed: the exit code still tells.
            let _ = std::io::Write::write_fmt(
                &mut std::io::stderr(),
                format_args!("viridian: {}\n", common::one_line(&e)),
            );
            // 128 + the signal (130 for Ctrl-C, 143 for SIGTERM), as a shell reports it.
            std::process::exit(if common::interrupted() {
                common::interrupted_exit_code()
            } else {
                1
            });
        }
    }
}

/// Parses the command line. Usage errors exit 1 as in qemu-img (clap's default of 2 would read
/// as "corruption found" for `check`); help and version exit 0.
fn parse_args() -> Cli {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let e = match Cli::try_parse() {
        Ok(cli) => return cli,
        Err(e) => e,
    };
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => e.exit(),
        ErrorKind::UnknownArgument => {
            // clap suggests "to pass '-c' as a value, use '-- -c'", which misleads someone who
            // typed a qemu-img flag we do not have: say the flag is not supported instead.
            let flag = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(s)) => s.clone(),
                _ => String::new(),
            };
            let similar = match e.get(ContextKind::SuggestedArg) {
                Some(ContextValue::String(s)) => format!(" (did you mean '{s}'?)"),
                _ => String::new(),
            };
            let cmd = match std::env::args().nth(1) {
                Some(v) if !v.starts_with('-') => format!("viridian {v}"),
                _ => "viridian".to_string(),
            };
            eprintln!(
                "{cmd}: option '{flag}' is not supported{similar}\n\
                 Try '{cmd} --help' for the options it takes."
            );
            std::process::exit(1);
        }
        _ => {
            let _ = e.print();
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn missing_help(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if arg.get_help().is_none() && id != "help" && id != "version" {
                out.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            missing_help(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_option_and_argument_has_a_description() {
        let mut missing = Vec::new();
        missing_help(&Cli::command(), "viridian", &mut missing);
        assert!(missing.is_empty(), "no --help text for: {missing:#?}");
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}

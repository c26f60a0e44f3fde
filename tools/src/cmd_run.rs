//! `viridian run`: boot a Linux kernel under KVM with our disks on a Hyper-V synthetic SCSI
//! controller (VMBus + storvsc), from flags or from a VM description (the TOML `migrate`
//! writes).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use chain::{OpenOptions, UndoDisk};
use disk::Disk;
use serde::Deserialize;

use crate::common::{self, SizeRuleArg, UndoEnd};

#[derive(clap::Args)]
pub struct Args {
    /// A VM description (TOML, as `viridian migrate` writes); flags override it.
    vm: Option<PathBuf>,
    /// Kernel: uncompressed vmlinux or bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk to load with the kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel command line (added to the console and host-quirk switches).
    #[arg(long)]
    cmdline: Option<String>,
    /// Use exactly this kernel command line, nothing added.
    #[arg(long = "raw-cmdline")]
    raw_cmdline: Option<String>,
    /// Guest memory (qemu size suffixes).
    #[arg(short = 'm', long)]
    memory: Option<String>,
    /// Number of virtual CPUs.
    #[arg(long)]
    cpus: Option<u32>,
    /// A disk: PATH[,ro][,undo][,format=raw|vhd|vhdx][,media=cdrom] (repeatable; LUN 0, 1, ...
    /// in order; DVD drives take the LUNs after the disks). Without format= the format is
    /// probed, and a probed raw disk refuses guest writes that would make it probe as VHD/VHDX;
    /// format=raw allows them.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// A DVD drive with this image (an ISO, or a VHD/VHDX holding one) as its medium
    /// (repeatable).
    #[arg(long = "cdrom")]
    cdroms: Vec<PathBuf>,
    /// Serve the QMP-shaped control socket at this path (docs/qmp.md; `viridian vm`).
    #[arg(long)]
    qmp: Option<PathBuf>,
    /// What to do with undo disks when the guest ends.
    #[arg(long = "undo-end", value_enum, default_value_t = UndoEnd::Discard)]
    undo_end: UndoEnd,
    /// Write the guest console to this file instead of stdout.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Stop after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// End the run successfully when the console prints this (repeatable).
    #[arg(long = "stop-on")]
    stop_on: Vec<String>,
    /// When the console prints PATTERN, type TEXT into it: `PATTERN::TEXT` (repeatable, in
    /// order). TEXT escapes: \n \r \t \\ \xHH, \B = serial BREAK (BREAK + a key is Magic
    /// SysRq), \P = pause one second. Example: `--type-on 'login:::root\n'`.
    #[arg(long = "type-on")]
    type_on: Vec<String>,
    /// Forward stdin to the guest console (default: when stdin is a terminal and the console
    /// goes to stdout; the terminal is then raw). Escapes: Ctrl-A x quit, Ctrl-A b BREAK,
    /// Ctrl-A Ctrl-A a literal Ctrl-A, Ctrl-A h help.
    #[arg(long, conflicts_with = "no_stdin")]
    stdin: bool,
    /// Never read stdin.
    #[arg(long = "no-stdin")]
    no_stdin: bool,
    /// Slow guest time down by this factor (nested hosts need 10).
    #[arg(long = "time-dilation")]
    time_dilation: Option<u32>,
    /// Print VMM events.
    #[arg(short = 'v', long)]
    verbose: bool,
    /// What a guest reboot does: end the run (like qemu -no-reboot) or boot it again with the
    /// same disks (undo changes carry over; --timeout counts over all boots).
    #[arg(long = "on-reboot", value_enum, default_value_t = OnReboot::Exit)]
    on_reboot: OnReboot,
    /// Open the disks, print what the guest would get (LUN, format, size, access) and exit
    /// without starting a VM.
    #[arg(long = "dry-run")]
    dry_run: bool,
    /// Only report what this host's KVM can do (guest user space, time dilation) and exit.
    #[arg(long = "probe-host")]
    probe_host: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnReboot {
    Exit,
    Restart,
}

/// `viridian run --probe-host`.
fn probe_host() -> Result<i32> {
    match vmm::probe_guest_user_space() {
        Ok(p) => {
            let yes = |b: bool| if b { "yes" } else { "no" };
            println!("KVM: available");
            println!("guest user mode runs: {}", yes(p.reached_user_mode));
            println!("guest system calls (syscall): {}", yes(p.syscall_works));
            println!("guest system calls (int $0x80): {}", yes(p.int80_works));
            println!("detail: {}", p.detail);
            println!(
                "time dilation used by default: {}",
                vmm::recommended_time_dilation()
            );
            if !p.syscall_works {
                println!(
                    "note: init programs cannot run in guests here; only kernel-side work \
                     (boot, SCSI scan, mounts, md) does"
                );
            }
            Ok(0)
        }
        Err(vmm::VmmError::KvmUnavailable(why)) => {
            println!("KVM: not available ({why})");
            Ok(2)
        }
        Err(e) => Err(anyhow!("probing KVM: {e}")),
    }
}

/// The VM description file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmFile {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    memory_mib: Option<u64>,
    #[serde(default)]
    cpus: Option<u32>,
    #[serde(default)]
    kernel: Option<PathBuf>,
    #[serde(default)]
    initrd: Option<PathBuf>,
    #[serde(default)]
    cmdline: Option<String>,
    #[serde(default)]
    disk: Vec<VmDisk>,
    /// DVD drives: `[[dvd]] path = "x.iso"` (no path: an empty drive).
    #[serde(default)]
    dvd: Vec<VmDvd>,
    #[serde(default)]
    network: Vec<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmDvd {
    #[serde(default)]
    path: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmDisk {
    path: PathBuf,
    /// raw, vhd or vhdx; probed when absent.
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    undo: bool,
    // Where the disk sat in the original VM (migrate records it); here every disk is a LUN of
    // the one synthetic SCSI controller, in file order.
    #[serde(default)]
    #[allow(dead_code)]
    controller: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    channel: Option<u32>,
    #[serde(default)]
    #[allow(dead_code)]
    slot: Option<u32>,
}

struct DiskSpec {
    path: PathBuf,
    read_only: bool,
    undo: bool,
    format: Option<chain::Format>,
    cdrom: bool,
}

fn parse_disk_flag(s: &str) -> Result<DiskSpec> {
    // `,,` is a comma in the path, as in qemu's option lists.
    let parts = common::split_option_list(s);
    let mut parts = parts.iter().map(String::as_str);
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| anyhow!("--disk {s:?}: no path"))?;
    let mut d = DiskSpec {
        path: PathBuf::from(path),
        read_only: false,
        undo: false,
        format: None,
        cdrom: false,
    };
    for opt in parts {
        match opt.split_once('=') {
            Some(("format", f)) => {
                d.format = Some(common::parse_format(f).with_context(|| format!("--disk {s:?}"))?)
            }
            _ => match opt {
                "media=cdrom" => d.cdrom = true,
                "media=disk" => d.cdrom = false,
                "ro" => d.read_only = true,
                "rw" => d.read_only = false,
                "undo" => d.undo = true,
                other => {
                    bail!("--disk {s:?}: unknown option {other:?} (ro, undo, format=, media=cdrom)")
                }
            },
        }
    }
    Ok(d)
}

/// Parses `--type-on PATTERN::TEXT` into a console script step.
fn parse_type_on(s: &str) -> Result<vmm::ConsoleStep> {
    let (pattern, text) = s
        .split_once("::")
        .ok_or_else(|| anyhow!("--type-on {s:?}: expected PATTERN::TEXT"))?;
    if pattern.is_empty() {
        bail!("--type-on {s:?}: empty pattern");
    }
    let mut input = Vec::new();
    let mut bytes = Vec::new();
    let mut chars = text.chars();
    let flush = |bytes: &mut Vec<u8>, input: &mut Vec<vmm::SerialInput>| {
        if !bytes.is_empty() {
            input.push(vmm::SerialInput::Text(std::mem::take(bytes)));
        }
    };
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut b = [0u8; 4];
            bytes.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            continue;
        }
        match chars.next() {
            Some('n') => bytes.push(b'\n'),
            Some('r') => bytes.push(b'\r'),
            Some('t') => bytes.push(b'\t'),
            Some('\\') => bytes.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                let v = u8::from_str_radix(&hex, 16)
                    .map_err(|_| anyhow!("--type-on {s:?}: bad \\x escape {hex:?}"))?;
                bytes.push(v);
            }
            Some('B') => {
                flush(&mut bytes, &mut input);
                input.push(vmm::SerialInput::Break);
            }
            Some('P') => {
                flush(&mut bytes, &mut input);
                input.push(vmm::SerialInput::Pause(Duration::from_secs(1)));
            }
            other => bail!("--type-on {s:?}: unknown escape \\{}", other.unwrap_or(' ')),
        }
    }
    flush(&mut bytes, &mut input);
    Ok(vmm::ConsoleStep {
        after: Some(pattern.to_string()),
        input,
    })
}

/// The disks of the VM file, then those of `--disk` flags, in LUN order.
fn disk_specs(file: &VmFile, base_dir: &Path, flags: &[String]) -> Result<Vec<DiskSpec>> {
    let mut specs = Vec::new();
    for d in &file.disk {
        specs.push(DiskSpec {
            path: relative_to(base_dir, &d.path),
            read_only: d.read_only,
            undo: d.undo,
            format: d.format.as_deref().map(common::parse_format).transpose()?,
            cdrom: false,
        });
    }
    for s in flags {
        specs.push(parse_disk_flag(s)?);
    }
    Ok(specs)
}

/// `--dry-run`: opens every disk exactly as a run would, prints one line per LUN, closes them
/// (undo children are discarded).
fn dry_run(file: &VmFile, base_dir: &Path, flags: &[String]) -> Result<i32> {
    let mut undo_disks = Vec::new();
    for (lun, s) in disk_specs(file, base_dir, flags)?.iter().enumerate() {
        let d = open_disk(s, &mut undo_disks)?;
        println!(
            "lun {lun}: {} format={} size={} {}{}",
            s.path.display(),
            d.format(),
            d.size(),
            if d.read_only() { "ro" } else { "rw" },
            if s.undo { " undo" } else { "" }
        );
        d.close()?;
    }
    for u in undo_disks {
        u.discard()?;
    }
    Ok(0)
}

/// Opens one VM disk as `run` gives it to the guest (undo disks are kept in `undo_disks`).
fn open_disk(s: &DiskSpec, undo_disks: &mut Vec<UndoDisk>) -> Result<Disk> {
    if s.undo {
        let opts = OpenOptions {
            format: s.format,
            ..OpenOptions::read_only()
        };
        let u = UndoDisk::open(&s.path, &opts, None)
            .with_context(|| format!("cannot open {} in undo mode", s.path.display()))?;
        let d = u.disk();
        undo_disks.push(u);
        return Ok(d);
    }
    let mut opts = if s.read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::read_write()
    };
    opts.format = s.format;
    common::open_with(&s.path, None, SizeRuleArg::Auto, opts)
}

fn relative_to(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

pub fn run(a: Args) -> Result<i32> {
    if a.probe_host {
        return probe_host();
    }
    let (file, base_dir) = match &a.vm {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            let f: VmFile = toml::from_str(&text)
                .with_context(|| format!("{} is not a valid VM description", p.display()))?;
            let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
            (f, dir)
        }
        None => (VmFile::default(), PathBuf::new()),
    };
    if !file.network.is_empty() {
        eprintln!("viridian: note: network adapters in the VM description are not emulated (no synthetic NIC yet)");
    }
    if a.dry_run {
        return dry_run(&file, &base_dir, &a.disks);
    }
    let kernel = a
        .kernel
        .clone()
        .or_else(|| file.kernel.as_ref().map(|k| relative_to(&base_dir, k)))
        .ok_or_else(|| {
            anyhow!(
                "no kernel: give --kernel (migrated Windows guests cannot be booted by this VMM)"
            )
        })?;
    let mut cfg = vmm::VmConfig::new(&kernel);
    cfg.initrd = a
        .initrd
        .clone()
        .or_else(|| file.initrd.as_ref().map(|i| relative_to(&base_dir, i)));
    cfg.cmdline = match (&a.raw_cmdline, &a.cmdline, &file.cmdline) {
        (Some(raw), _, _) => raw.clone(),
        (None, Some(extra), _) | (None, None, Some(extra)) => vmm::default_cmdline(extra),
        (None, None, None) => vmm::default_cmdline(""),
    };
    if let Some(m) = &a.memory {
        cfg.memory = common::parse_size(m)?;
    } else if let Some(mib) = file.memory_mib {
        cfg.memory = mib.checked_mul(1 << 20).context("memory_mib too large")?;
    }
    cfg.cpus = a.cpus.or(file.cpus).unwrap_or(1);
    cfg.verbose = a.verbose;
    cfg.interrupted = Some(common::interrupted);
    cfg.stop_on = a.stop_on.clone();
    cfg.timeout = a.timeout.map(Duration::from_secs);
    if let Some(t) = a.time_dilation {
        cfg.time_dilation = t.max(1);
    }
    if let Some(c) = &a.console {
        cfg.console = vmm::Console::File(c.clone());
    }
    for t in &a.type_on {
        cfg.console_script.push(parse_type_on(t)?);
    }
    cfg.stdin_console = a.stdin
        || (!a.no_stdin
            && a.console.is_none()
            && std::io::IsTerminal::is_terminal(&std::io::stdin()));
    let mut specs = disk_specs(&file, &base_dir, &a.disks)?;
    cfg.qmp = a.qmp.clone();
    cfg.open_image = Some(crate::cmd_vm::open_image);
    cfg.open_undo = Some(crate::cmd_vm::open_undo);
    cfg.hotplug_undo_end = match a.undo_end {
        UndoEnd::Commit => vmm::qmp::UndoEnd::Commit,
        UndoEnd::Discard => vmm::qmp::UndoEnd::Discard,
    };
    let dvd_paths = file
        .dvd
        .iter()
        .map(|d| d.path.as_ref().map(|p| relative_to(&base_dir, p)));
    let dvd_paths: Vec<Option<PathBuf>> = dvd_paths
        .chain(a.cdroms.iter().map(|p| Some(p.clone())))
        .chain(
            specs
                .iter()
                .filter(|s| s.cdrom)
                .map(|s| Some(s.path.clone())),
        )
        .collect();
    specs.retain(|s| !s.cdrom);
    for p in &dvd_paths {
        let medium = match p {
            Some(p) => Some(crate::cmd_vm::open_image(p, None, true).map_err(|e| anyhow!(e))?),
            None => None,
        };
        cfg.dvds.push(medium);
    }
    let mut undo_disks = Vec::new();
    for s in &specs {
        let disk = open_disk(s, &mut undo_disks)?;
        cfg.disks.push(disk);
    }
    let name = file.name.clone().unwrap_or_else(|| "guest".into());
    let disks = cfg.disks.clone();
    let cfg_dvds = cfg.dvds.clone();
    let deadline = cfg.timeout.map(|t| std::time::Instant::now() + t);
    let mut boots = 0u32;
    let result = loop {
        boots += 1;
        let mut this = cfg.clone();
        if boots > 1 {
            if let vmm::Console::File(p) = &this.console {
                this.console = vmm::Console::AppendFile(p.clone());
            }
        }
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(std::time::Instant::now());
            this.timeout = Some(left.max(Duration::from_millis(1)));
        }
        let r = vmm::run(this);
        match &r {
            Ok(s)
                if s.reason == vmm::ExitReason::Reboot
                    && a.on_reboot == OnReboot::Restart
                    && !common::interrupted() =>
            {
                eprintln!(
                    "viridian: {name} rebooted after {:.1}s; starting boot {}",
                    s.elapsed.as_secs_f64(),
                    boots + 1
                );
            }
            _ => break r,
        }
    };
    // The configuration holds references to the disks; undo commit needs them gone.
    drop(cfg);
    // A disk whose last flush failed may have lost acknowledged writes: say which, and fail.
    let mut close_failed = false;
    for d in &disks {
        if let Err(e) = d.close() {
            eprintln!(
                "viridian: cannot make {} durable: {e}",
                d.image()
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "a disk".into())
            );
            close_failed = true;
        }
    }
    drop(disks);
    for d in cfg_dvds.iter().flatten() {
        if let Err(e) = d.close() {
            eprintln!("viridian: cannot close a DVD image: {e}");
        }
    }
    let ok = result.is_ok() && !close_failed;
    for u in undo_disks {
        let parent = u.parent_path().to_path_buf();
        if a.undo_end == UndoEnd::Commit && close_failed {
            // The guest's writes were not all made durable: neither merge nor throw away.
            let kept = u.child_path().to_path_buf();
            let _ = u.keep();
            eprintln!(
                "viridian: undo changes for {} kept in {} (viridian undo commit|discard)",
                parent.display(),
                kept.display()
            );
        } else if a.undo_end == UndoEnd::Commit && ok {
            let n = u.commit(&mut |_| {}).with_context(|| {
                format!("cannot commit the undo changes into {}", parent.display())
            })?;
            eprintln!("viridian: committed {n} bytes into {}", parent.display());
        } else {
            u.discard()?;
            if a.undo_end == UndoEnd::Commit {
                eprintln!(
                    "viridian: the guest did not end cleanly: undo changes discarded, {} is unchanged",
                    parent.display()
                );
            }
        }
    }
    if close_failed {
        bail!("the disks could not all be made durable (see above)");
    }
    match result {
        Err(vmm::VmmError::Guest(r)) if r.reason == vmm::StopReason::Interrupted => {
            eprintln!(
                "viridian: {name} stopped after {:.1}s: interrupted",
                r.elapsed.as_secs_f64()
            );
            // 130 for Ctrl-C, 143 for SIGTERM, as the rest of the CLI.
            Ok(common::interrupted_exit_code())
        }
        Ok(status) => {
            eprintln!(
                "viridian: {name} ended after {:.1}s: {:?}",
                status.elapsed.as_secs_f64(),
                status.reason
            );
            Ok(0)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::SerialInput::{Break, Pause, Text};

    #[test]
    fn type_on_escapes() {
        let s = parse_type_on("resync done::\\Bs\\P\\Bo").unwrap();
        assert_eq!(s.after.as_deref(), Some("resync done"));
        assert_eq!(
            s.input,
            vec![
                Break,
                Text(b"s".to_vec()),
                Pause(Duration::from_secs(1)),
                Break,
                Text(b"o".to_vec())
            ]
        );
        let s = parse_type_on("login: ::root\\n\\x41\\\\").unwrap();
        assert_eq!(s.after.as_deref(), Some("login: "));
        assert_eq!(s.input, vec![Text(b"root\nA\\".to_vec())]);
        assert!(parse_type_on("no separator").is_err());
        assert!(parse_type_on("::x").is_err());
        assert!(parse_type_on("p::\\q").is_err());
        assert!(parse_type_on("p::\\xZZ").is_err());
    }

    #[test]
    fn dvd_drives_from_flags_and_toml() {
        assert!(parse_disk_flag("a.iso,media=cdrom").unwrap().cdrom);
        assert!(!parse_disk_flag("a.img,ro").unwrap().cdrom);
        assert!(parse_disk_flag("a.iso,media=tape").is_err());
        let f: VmFile = toml::from_str("[[dvd]]\npath = \"x.iso\"\n[[dvd]]\n").unwrap();
        assert_eq!(f.dvd.len(), 2);
        assert_eq!(f.dvd[0].path.as_deref(), Some(Path::new("x.iso")));
        assert!(f.dvd[1].path.is_none(), "an empty drive");
        assert!(toml::from_str::<VmFile>("[[dvd]]\nfile = \"x\"\n").is_err());
    }
}

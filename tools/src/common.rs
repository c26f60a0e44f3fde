//! Pieces every verb shares: sizes, `-o` options, opening images, output modes, interrupts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use chain::{Format, OpenOptions};
use disk::Disk;

/// `--output human|json`, as qemu-img.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Human,
    Json,
}

/// `--size-rule`: how a VHD's virtual size is derived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SizeRuleArg {
    /// current_size, except creators `vpc ` and `qemu` use CHS (qemu 10's rule).
    #[default]
    Auto,
    /// CHS geometry from the footer.
    Chs,
    /// The footer's current_size field.
    Current,
}

impl SizeRuleArg {
    pub fn to_vhd(self) -> vhd::SizeRule {
        match self {
            SizeRuleArg::Auto => vhd::SizeRule::Auto,
            SizeRuleArg::Chs => vhd::SizeRule::Chs,
            SizeRuleArg::Current => vhd::SizeRule::CurrentSize,
        }
    }
}

/// What happens to an undo session's changes when it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UndoEnd {
    Commit,
    Discard,
}

/// Ends an undo session: commits (only when the session went well) or discards, and says so.
/// A session meant to be committed that did not go well (a write or a flush failed) keeps its
/// undo file and fails, naming it: the changes are neither merged half-checked nor thrown away,
/// and `viridian undo commit|discard` decides later.
pub fn finish_undo(u: chain::UndoDisk, end: UndoEnd, session_ok: bool) -> Result<()> {
    let parent = u.parent_path().to_path_buf();
    if end == UndoEnd::Commit && !session_ok {
        let kept = u.child_path().to_path_buf();
        let r = u.keep();
        bail!(
            "the session failed, so its changes were not committed into {}; they are kept in {}{} \
             (viridian undo commit|discard {})",
            parent.display(),
            kept.display(),
            match r {
                Ok(_) => String::new(),
                Err(e) => format!(" (which could not be made durable: {e})"),
            },
            kept.display()
        );
    }
    if end == UndoEnd::Commit {
        let n = u
            .commit(&mut |_| {})
            .with_context(|| format!("cannot commit the undo changes into {}", parent.display()))?;
        eprintln!("viridian: committed {n} bytes into {}", parent.display());
    } else {
        u.discard()?;
        eprintln!(
            "viridian: undo changes discarded; {} is unchanged",
            parent.display()
        );
    }
    Ok(())
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The signal that interrupted us (SIGINT or SIGTERM), for the exit code 128 + signal.
static INTERRUPT_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Set by verbs that never write: they have nothing to stop cleanly, so a signal ends them at
/// once (a library walk that does not poll the flag cannot keep them running).
static STOP_AT_ONCE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: libc::c_int) {
    // A read-only verb has nothing to finish: it ends now, with the code a shell reports for
    // a command killed by the signal. A writer never does, however many signals come (`timeout`
    // sends a second one at once): it stops cleanly, flushing what it acknowledged.
    if STOP_AT_ONCE.load(Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + signal) };
    }
    INTERRUPT_SIGNAL.store(signal, Ordering::SeqCst);
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// For verbs that never write (info, map, compare, measure, check without -r): Ctrl-C and
/// SIGTERM end them at once instead of setting the flag long operations poll.
pub fn stop_at_once_on_signal() {
    STOP_AT_ONCE.store(true, Ordering::SeqCst);
}

/// The exit code a shell reports for a command stopped by the signal that interrupted us:
/// 130 for Ctrl-C, 143 for SIGTERM.
pub fn interrupted_exit_code() -> i32 {
    match INTERRUPT_SIGNAL.load(Ordering::SeqCst) {
        0 => 130,
        s => 128 + s,
    }
}

/// Ctrl-C and SIGTERM set a flag that long operations poll, so they can stop cleanly (remove a
/// half-written target, leave sources untouched) instead of dying mid-write.
pub fn install_interrupt_handler() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// `viridian info x | head -1`: when the reader of stdout goes away, stop quietly with exit 0
/// as qemu-img does, instead of the panic Rust's `println!` raises on EPIPE. SIGPIPE stays
/// ignored (sockets in `serve` must see EPIPE as an error, not die), so the hook catches the
/// one panic that `println!` raises for a closed stdout and lets every other panic through.
pub fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        // Nowhere left to say anything (stderr is full or closed): just the exit code.
        if msg.starts_with("failed printing to stderr") {
            std::process::exit(1);
        }
        if let Some(why) = msg.strip_prefix("failed printing to stdout") {
            if why.contains("Broken pipe") {
                std::process::exit(0);
            }
            // A full disk or a closed terminal: one line and exit 1, not a panic.
            let _ = std::io::Write::write_fmt(
                &mut std::io::stderr(),
                format_args!(
                    "viridian: cannot write to standard output{}\n",
                    why.trim_end()
                ),
            );
            std::process::exit(1);
        }
        default(info);
    }));
}

/// A parent's file name goes into the child's Windows parent locators, which read `\` as a
/// folder separator: a name containing one would make a child that never finds its parent.
pub fn check_parent_name(parent: &Path) -> Result<()> {
    if parent.as_os_str().as_encoded_bytes().contains(&b'\\') {
        bail!(
            "parent file name {} contains '\\', which the child's Windows parent locators \
             would read as a folder separator",
            parent.display()
        );
    }
    Ok(())
}

/// Prints one line to standard output and reports a failure instead of panicking, for the
/// verbs whose result is not complete until it has been said (a create that cannot report
/// the image it made removes it). A reader that went away (`| head`) is not a failure.
pub fn say(line: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to standard output")
        }
        _ => Ok(()),
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// One line: the error and its causes joined with ": ", without repeating a cause that the
/// outer message already contains, nor an outer message that the next cause starts with
/// ("cannot open x" then "cannot open x: No such file" reads once).
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if parts.iter().any(|p| p.contains(&s)) {
            continue;
        }
        match parts.last_mut() {
            Some(last) if s.starts_with(last.as_str()) => *last = s,
            _ => parts.push(s),
        }
    }
    parts.join(": ").replace('\n', " ")
}

/// A path as the user would type it: `.` components dropped after the first, so a parent found
/// through `./` + `./base.vhdx` reads `./base.vhdx`, not `././base.vhdx`.
pub fn shown_path(p: &Path) -> String {
    use std::path::Component;
    let mut out = PathBuf::new();
    for (i, c) in p.components().enumerate() {
        if c == Component::CurDir && i > 0 {
            continue;
        }
        out.push(c.as_os_str());
    }
    out.display().to_string()
}

/// A parent link name as stored (Windows separators in VHD/VHDX locators), shown with this
/// system's separators: `.\base.vhdx` reads `./base.vhdx`.
pub fn shown_link_name(name: &str) -> String {
    shown_path(Path::new(&name.replace('\\', "/")))
}

/// A plain number, decimal or hexadecimal (`0x...`), as qemu-io and qemu-img take counts.
pub fn parse_number(s: &str) -> Result<u64> {
    let t = s.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    }
    .map_err(|_| anyhow!("invalid number {s:?}"))
}

/// Parses a size with qemu's suffixes (k, M, G, T, P, E; 1024-based; plain number = bytes;
/// a trailing `b`/`B` ignored). A `0x` prefix reads the number as hexadecimal (`0x10000`,
/// `0x10k`), as qemu-io and qemu-img accept.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return parse_hex_size(s, h);
    }
    // "10b" is 10 bytes (qemu-img); "10GB" is 10 GiB, as PowerShell's Hyper-V cmdlets write it.
    let t = t
        .strip_suffix(['b', 'B'])
        .filter(|r| !r.is_empty())
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'P' => 1 << 50,
                'E' => 1 << 60,
                _ => bail!("invalid size {s:?}: unknown suffix {c:?} (use k, M, G, T, P or E)"),
            };
            (&t[..t.len() - 1], m)
        }
        _ => (t, 1),
    };
    if num.is_empty() {
        bail!("invalid size {s:?}");
    }
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .ok_or_else(|| anyhow!("size {s:?} is too large"));
    }
    // qemu-img's rule: a fraction needs a unit ("1.5G"); "1.5" bytes is no size at all.
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || !digits(frac) || int.is_empty() && frac.is_empty() {
        bail!("invalid size {s:?}: not a number");
    }
    if mult == 1 {
        bail!("invalid size {s:?}: a fraction needs a unit (k, M, G, T, P or E)");
    }
    let f: f64 = num
        .parse()
        .map_err(|_| anyhow!("invalid size {s:?}: not a number"))?;
    if f.is_nan() || f < 0.0 || f * mult as f64 >= u64::MAX as f64 {
        bail!("invalid size {s:?}");
    }
    Ok((f * mult as f64) as u64)
}

/// `0x` sizes: hex digits, then an optional suffix (hex digits include b, so no `B` suffix).
fn parse_hex_size(s: &str, h: &str) -> Result<u64> {
    let (digits, mult) = match h.chars().last() {
        Some(c) if !c.is_ascii_hexdigit() => {
            let m: u32 = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                _ => bail!("invalid size {s:?}: unknown suffix {c:?}"),
            };
            (&h[..h.len() - 1], m)
        }
        _ => (h, 0),
    };
    let n = u64::from_str_radix(digits, 16).map_err(|_| anyhow!("invalid size {s:?}"))?;
    n.checked_mul(1u64 << mult)
        .ok_or_else(|| anyhow!("size {s:?} is too large"))
}

/// Splits a comma-separated option list the way qemu does: `,,` is a comma inside an item
/// (so `backing_file=a,,b.vhdx` names `a,b.vhdx`), a single `,` ends an item.
pub fn split_option_list(s: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            items.last_mut().expect("never empty").push(c);
        } else if chars.peek() == Some(&',') {
            chars.next();
            items.last_mut().expect("never empty").push(',');
        } else {
            items.push(String::new());
        }
    }
    items
}

/// `-o key=value,key=value` (repeatable; later values win). `help` is handled by callers.
pub fn parse_options(opts: &[String]) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for group in opts {
        let items = split_option_list(group);
        // qemu-img's answer to `-o ""`, `-o ,` or an option list with an empty item.
        if items.iter().any(|s| s.trim().is_empty()) {
            bail!("Invalid option list: {group}");
        }
        for item in items {
            match item.split_once('=') {
                Some((k, v)) => {
                    map.insert(k.trim().to_string(), v.trim().to_string());
                }
                None => {
                    map.insert(item.trim().to_string(), "on".to_string());
                }
            }
        }
    }
    Ok(map)
}

pub fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => bail!("option {key}={v}: expected on or off"),
    }
}

pub fn parse_format(s: &str) -> Result<Format> {
    Format::parse(s).ok_or_else(|| anyhow!("unknown format {s:?} (use raw, vhd/vpc or vhdx)"))
}

/// The format a file name's extension names (.vhd/.avhd/.vpc, .vhdx/.avhdx, .raw/.img/.bin),
/// if any.
pub fn format_of_extension(path: &Path) -> Option<Format> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "vhd" | "avhd" | "vpc" => Some(Format::Vhd),
        "vhdx" | "avhdx" => Some(Format::Vhdx),
        "raw" | "img" | "bin" => Some(Format::Raw),
        _ => None,
    }
}

/// Warns when a format given with -f/-O and the file's extension disagree (`-O raw x.vhdx`
/// writes a raw file that every other tool will misread as VHDX by its name).
pub fn warn_if_extension_disagrees(flag: &str, given: Format, path: &Path) {
    if let Some(by_name) = format_of_extension(path) {
        if by_name != given {
            eprintln!(
                "viridian: warning: {flag} {} but {} is named like a {} image",
                given.name(),
                path.display(),
                by_name.name()
            );
        }
    }
}

/// Opens an image read-only with its chain.
pub fn open_ro(path: &Path, format: Option<&str>, rule: SizeRuleArg) -> Result<Disk> {
    open_with(path, format, rule, OpenOptions::read_only())
}

/// Opens an image read-only; with `force_share` (`-U`) without taking the shared lock, so it
/// works while another process (`serve --rw`, a VM) holds the image for writing. As with
/// qemu-img -U, what is read then may be inconsistent if the writer is busy.
pub fn open_ro_shared(
    path: &Path,
    format: Option<&str>,
    rule: SizeRuleArg,
    force_share: bool,
) -> Result<Disk> {
    let mut opts = OpenOptions::read_only();
    opts.lock = !force_share;
    open_with(path, format, rule, opts)
}

pub fn open_with(
    path: &Path,
    format: Option<&str>,
    rule: SizeRuleArg,
    opts: OpenOptions,
) -> Result<Disk> {
    open_image_with(path, format, rule, opts).map(|i| i.disk())
}

/// Like [`open_with`], but the top layer by kind, for verbs that manage the image itself.
pub fn open_image_with(
    path: &Path,
    format: Option<&str>,
    rule: SizeRuleArg,
    mut opts: OpenOptions,
) -> Result<chain::Image> {
    if let Some(f) = format {
        opts.format = Some(parse_format(f)?);
    }
    opts.vhd_size_rule = rule.to_vhd();
    chain::open_image(path, &opts).with_context(|| format!("cannot open {}", path.display()))
}

/// Where a new parent link's parent is on Windows, for the locators that hold Windows
/// absolute paths (VHD W2ku and header parent name, VHDX absolute_win32_path/volume_path).
/// Without them only the relative locator (and the parent's bare file name) is written.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct WindowsArgs {
    /// The parent's Windows path, e.g. 'D:\VMs\base.vhdx' (also `-o parent_windows_path=`).
    #[arg(long = "parent-windows-path", value_name = "WINPATH")]
    pub parent_windows_path: Option<String>,
    /// Map a host folder to a Windows folder: 'D:\VMs' (the new child's folder is D:\VMs) or
    /// '/srv/vms=D:\VMs'; the parent's Windows path follows from where it sits below it.
    #[arg(long = "windows-root", value_name = "[HOSTDIR=]WINDIR")]
    pub windows_root: Option<String>,
    /// VHDX only: the parent's volume path (\\?\Volume{GUID}\...), written as given.
    #[arg(long = "parent-volume-path", value_name = "VOLPATH")]
    pub parent_volume_path: Option<String>,
}

impl WindowsArgs {
    pub fn location(&self) -> chain::WindowsLocation {
        chain::WindowsLocation {
            parent_path: self.parent_windows_path.clone(),
            root: self.windows_root.clone(),
            volume_path: self.parent_volume_path.clone(),
        }
    }
}

/// The name qemu-img prints for a format (qemu calls VHD "vpc"), so scripts keep working.
pub fn qemu_format_name(fmt: &str) -> &str {
    match fmt {
        "vhd" => "vpc",
        other => other,
    }
}

/// Bytes the file occupies on disk (st_blocks * 512), as qemu's actual-size.
pub fn actual_size(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

/// Human sizes as qemu-img prints them: "64 MiB", "1.5 GiB".
pub use disk::human_size;

/// Creates a new image and a guard that removes it again unless the caller disarms the guard
/// after the whole run succeeded, so a failed `create` or `convert` never leaves a target that
/// would make the corrected retry fail with "already exists". Only a file this run created is
/// ever removed: an existing path is refused before anything is touched.
pub fn create_image(path: &Path, spec: &chain::CreateSpec) -> Result<(Disk, RemoveOnFailure)> {
    if std::fs::symlink_metadata(path).is_ok() {
        bail!(
            "{} already exists; refusing to overwrite it",
            path.display()
        );
    }
    let guard = RemoveOnFailure::new(path);
    let d =
        chain::create(path, spec).with_context(|| format!("cannot create {}", path.display()))?;
    Ok((d, guard))
}

/// A relative backing file name is relative to the new image's folder, as in qemu-img
/// (`create -b p.vhdx sub/c.vhdx` links sub/p.vhdx), not to the working directory.
pub fn backing_relative_to(image: &Path, backing: &Path) -> PathBuf {
    if backing.is_absolute() {
        return backing.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(backing),
        _ => backing.to_path_buf(),
    }
}

/// `-o preallocation=`: how much of a new image's file is allocated on disk up front.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prealloc {
    /// Sparse: the file system allocates as data is written.
    Off,
    /// Only the format's metadata (what a dynamic VHD/VHDX always writes).
    Metadata,
    /// fallocate(2) the whole file: the space is reserved, reads stay zeros, no data written.
    Falloc,
    /// Write zeros over every hole of the file.
    Full,
}

impl Prealloc {
    pub fn parse(v: &str) -> Result<Prealloc> {
        Ok(match v {
            "off" => Prealloc::Off,
            "metadata" => Prealloc::Metadata,
            "falloc" => Prealloc::Falloc,
            "full" => Prealloc::Full,
            _ => bail!("preallocation={v}: expected off, metadata, falloc or full"),
        })
    }
}

/// Allocates the whole file at `path` (its current length) on disk, as `mode` says.
pub fn preallocate(path: &Path, mode: Prealloc) -> Result<()> {
    use std::os::fd::AsRawFd;
    if matches!(mode, Prealloc::Off | Prealloc::Metadata) {
        return Ok(());
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {} to preallocate it", path.display()))?;
    let len = f.metadata()?.len();
    if mode == Prealloc::Falloc {
        // SAFETY: fallocate on a descriptor we own; mode 0 allocates without changing data.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            bail!(
                "cannot preallocate {} (preallocation=falloc): {e}; use preallocation=full or off",
                path.display()
            );
        }
        return Ok(());
    }
    // Full: write zeros into the holes only, so metadata already written stays.
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on a descriptor we own.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 || hole as u64 >= len {
            break;
        }
        let hole = hole as u64;
        // SAFETY: as above.
        let data = unsafe { libc::lseek(f.as_raw_fd(), hole as libc::off_t, libc::SEEK_DATA) };
        let end = if data < 0 {
            len
        } else {
            (data as u64).min(len)
        };
        let mut o = hole;
        while o < end {
            check_interrupted()?;
            let n = (end - o).min(zeros.len() as u64) as usize;
            f.write_all_at(&zeros[..n], o)
                .with_context(|| format!("cannot preallocate {}", path.display()))?;
            o += n as u64;
        }
        pos = end;
    }
    Ok(())
}

/// Removes a partially written output when an operation fails or is interrupted.
pub struct RemoveOnFailure {
    path: Option<PathBuf>,
}

impl RemoveOnFailure {
    pub fn new(path: &Path) -> Self {
        RemoveOnFailure {
            path: Some(path.to_path_buf()),
        }
    }
    pub fn disarm(mut self) {
        self.path = None;
    }
}

impl Drop for RemoveOnFailure {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_doubled_comma_is_a_comma_inside_an_item() {
        assert_eq!(split_option_list("a=1,b=x,,y"), ["a=1", "b=x,y"]);
        assert_eq!(split_option_list("p,,,ro"), ["p,", "ro"]);
        assert_eq!(split_option_list(",,,,"), [",,"]);
        assert_eq!(split_option_list("a,"), ["a", ""]);
        let o = parse_options(&["backing_file=a,,b.vhdx,backing_fmt=vhdx".into()]).unwrap();
        assert_eq!(o["backing_file"], "a,b.vhdx");
        assert_eq!(o["backing_fmt"], "vhdx");
        assert!(parse_options(&["a,,,".into()]).is_err());
    }

    #[test]
    fn sizes_follow_qemu_suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("1k").unwrap(), 1024);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("10MB").unwrap(), 10 << 20);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999E").is_err());
        // qemu-img refuses fractions of a byte and anything that is not plain decimal.
        for bad in [
            "1.5", "0.5", "1e3", "1e3G", "inf", "NaN", "-1", ".G", "1.5.5G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_size("1.7M").unwrap(), 1782579);
        assert_eq!(parse_size(".5k").unwrap(), 512);
        assert_eq!(parse_size("10b").unwrap(), 10);
        assert_eq!(parse_size("10B").unwrap(), 10);
        assert!(parse_size("1.5b").is_err());
        assert_eq!(parse_size("0x10000").unwrap(), 0x10000);
        assert_eq!(parse_size("0X1f").unwrap(), 0x1f);
        assert_eq!(parse_size("0x2k").unwrap(), 2048);
        assert_eq!(parse_size("0xE").unwrap(), 14);
        assert!(parse_size("0x").is_err());
        assert!(parse_size("0xzz").is_err());
        assert_eq!(parse_number("0x20").unwrap(), 32);
        assert_eq!(parse_number("20").unwrap(), 20);
        assert!(parse_number("2k").is_err());
    }

    #[test]
    fn one_line_does_not_repeat_a_prefix() {
        let e = anyhow::anyhow!("cannot open x.vhdx: No such file").context("cannot open x.vhdx");
        assert_eq!(one_line(&e), "cannot open x.vhdx: No such file");
        let e = anyhow::anyhow!("disk full").context("cannot write x");
        assert_eq!(one_line(&e), "cannot write x: disk full");
    }

    #[test]
    fn paths_read_as_typed() {
        assert_eq!(shown_path(Path::new("././base.vhdx")), "./base.vhdx");
        assert_eq!(shown_path(Path::new("./sub/./b.vhdx")), "./sub/b.vhdx");
        assert_eq!(shown_path(Path::new("/a/./b")), "/a/b");
        assert_eq!(shown_path(Path::new("b.vhdx")), "b.vhdx");
        assert_eq!(shown_link_name(".\\base.vhdx"), "./base.vhdx");
        assert_eq!(shown_link_name("..\\x\\p.vhd"), "../x/p.vhd");
    }

    #[test]
    fn options_split_and_default_to_on() {
        let m = parse_options(&["subformat=fixed,azure".into(), "block_size=1M".into()]).unwrap();
        assert_eq!(m["subformat"], "fixed");
        assert_eq!(m["azure"], "on");
        assert_eq!(m["block_size"], "1M");
    }
}

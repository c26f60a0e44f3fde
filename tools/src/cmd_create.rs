//! `viridian create` and `viridian snapshot`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use chain::{CreateSpec, Format};

use crate::common::{self, parse_bool, parse_size};

#[derive(clap::Args)]
pub struct Args {
    /// Format: vhd (qemu name vpc), vhdx or raw.
    #[arg(short = 'f', long = "format", default_value = "vhdx")]
    format: String,
    /// Options: subformat=fixed|dynamic, block_size=, log_size= (vhdx),
    /// logical_sector_size=, physical_sector_size= (vhdx), force_size=on|off (vhd: off rounds
    /// the size to CHS geometry like Virtual PC), size_rule=chs|current, azure=on (vhd fixed,
    /// whole MiB). `-o help` lists them.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Make a differencing image on top of this parent (its size is used).
    #[arg(short = 'b', long = "backing")]
    backing: Option<PathBuf>,
    /// Format of the backing file: it is opened as that format instead of being probed.
    #[arg(short = 'F', long = "backing-format")]
    backing_format: Option<String>,
    #[command(flatten)]
    windows: common::WindowsArgs,
    /// Accepted for qemu-img compatibility (we always open the parent to link to it).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Quiet: print no messages (errors are still printed).
    #[arg(short = 'q')]
    quiet: bool,
    /// The image file.
    file: Option<PathBuf>,
    /// Virtual size: bytes, or a number with a suffix k, M, G, T, P or E (1024-based, e.g. 64M, 1.5G); omit it with -b to take the parent's size.
    size: Option<String>,
}

const OPTION_HELP: &str = "Supported options:
  subformat=fixed|dynamic    fixed (preallocated) or dynamic (sparse); default dynamic
  block_size=SIZE            VHD: default 2M; VHDX: 1M to 256M, default 1M
  log_size=SIZE              VHDX log size, default 1M
  logical_sector_size=512|4096   VHDX only
  physical_sector_size=512|4096  VHDX only
  force_size=on|off          VHD: on (default) keeps the exact size; off rounds to CHS geometry
  size_rule=current|chs      VHD: same as force_size=on|off
  azure=on                   VHD: Azure-ready fixed disk (whole MiB, 20 MiB to 32 TiB)
  preallocation=off|metadata|falloc|full
                             raw: default off; fixed VHD/VHDX: default falloc (the whole
                             size reserved on disk, as New-VHD -Fixed); dynamic: off/metadata
  backing_file=PATH          the parent (same as -b); a comma in PATH is written ,,
  backing_fmt=FMT            the parent's format (same as -F)
  parent_windows_path=WIN    differencing: the parent's Windows path (W2ku / absolute_win32_path)
  parent_volume_path=VOL     differencing VHDX: the parent's volume path";

pub fn spec_from_options(format: Format, size: u64, options: &[String]) -> Result<CreateSpec> {
    let opts = common::parse_options(options)?;
    let mut spec = CreateSpec::new(format, size);
    for (k, v) in &opts {
        match k.as_str() {
            "subformat" => match v.as_str() {
                "fixed" => spec.fixed = true,
                "dynamic" => spec.fixed = false,
                _ => bail!("subformat={v}: expected fixed or dynamic"),
            },
            "block_size" => {
                let b = parse_size(v)?;
                spec.block_size = Some(u32::try_from(b).context("block_size too large")?);
            }
            "log_size" => {
                let b = parse_size(v)?;
                spec.log_size = Some(u32::try_from(b).context("log_size too large")?);
            }
            "logical_sector_size" => spec.logical_sector_size = Some(parse_size(v)? as u32),
            "physical_sector_size" => spec.physical_sector_size = Some(parse_size(v)? as u32),
            "force_size" => {
                spec.vhd_size_rule = if parse_bool(k, v)? {
                    vhd::SizeRule::CurrentSize
                } else {
                    vhd::SizeRule::Chs
                }
            }
            "size_rule" => {
                spec.vhd_size_rule = match v.as_str() {
                    "chs" => vhd::SizeRule::Chs,
                    "current" | "current_size" => vhd::SizeRule::CurrentSize,
                    _ => bail!("size_rule={v}: expected chs or current"),
                }
            }
            "azure" => spec.azure = parse_bool(k, v)?,
            "size" => spec.size = parse_size(v)?,
            "preallocation" => {
                common::Prealloc::parse(v)?;
            }
            "parent_windows_path" => spec.parent_windows.parent_path = Some(v.clone()),
            "parent_volume_path" => spec.parent_windows.volume_path = Some(v.clone()),
            // qemu options that have no meaning for our writers; accepted so scripts run.
            "block_state_zero" | "nocow" | "extent_size_hint" => {}
            other => bail!("unknown option {other:?} (see -o help)"),
        }
    }
    validate_spec(format, &spec)?;
    let is_vhd = format == Format::Vhd;
    let is_vhdx = format == Format::Vhdx;
    if !is_vhdx
        && (spec.log_size.is_some()
            || spec.logical_sector_size.is_some()
            || spec.physical_sector_size.is_some())
    {
        bail!("log_size and sector sizes apply to vhdx only");
    }
    if !is_vhd && (spec.azure || opts.contains_key("force_size") || opts.contains_key("size_rule"))
    {
        bail!("force_size, size_rule and azure apply to vhd only");
    }
    if format == Format::Raw && spec.block_size.is_some() {
        bail!("raw images have no block size");
    }
    Ok(spec)
}

/// The `-o preallocation=` a new image gets: raw is sparse unless asked; a fixed VHD/VHDX is
/// fully allocated (fallocate) by default, as Hyper-V's New-VHD -Fixed makes it, unless
/// `preallocation=off`; a dynamic or differencing image allocates blocks as they are written,
/// so only off and metadata (what it always does) fit it.
pub fn preallocation_of(spec: &CreateSpec, options: &[String]) -> Result<common::Prealloc> {
    use common::Prealloc;
    let opts = common::parse_options(options)?;
    let asked = opts
        .get("preallocation")
        .map(|v| Prealloc::parse(v))
        .transpose()?;
    let fixed = spec.fixed || spec.azure;
    Ok(match (spec.format, asked) {
        (Format::Raw, Some(Prealloc::Metadata)) => {
            bail!("preallocation=metadata: raw images have no metadata (use off, falloc or full)")
        }
        (Format::Raw, a) => a.unwrap_or(Prealloc::Off),
        (_, a) if fixed => a.unwrap_or(Prealloc::Falloc),
        (_, Some(p @ (Prealloc::Falloc | Prealloc::Full))) => bail!(
            "preallocation={}: a dynamic or differencing image allocates its blocks as they \
             are written; use -o subformat=fixed for a fully allocated image",
            if p == Prealloc::Falloc {
                "falloc"
            } else {
                "full"
            }
        ),
        (_, a) => a.unwrap_or(Prealloc::Metadata),
    })
}

/// Rejects values the writers would refuse, before any file exists, with the option's name.
pub(crate) fn validate_spec(format: Format, spec: &CreateSpec) -> Result<()> {
    for (name, v) in [
        ("logical_sector_size", spec.logical_sector_size),
        ("physical_sector_size", spec.physical_sector_size),
    ] {
        if let Some(v) = v {
            if v != 512 && v != 4096 {
                bail!("{name}={v}: expected 512 or 4096");
            }
        }
    }
    if let Some(b) = spec.block_size {
        match format {
            Format::Vhdx if !b.is_power_of_two() || !(1 << 20..=256 << 20).contains(&b) => {
                bail!("block_size={b}: a VHDX block size is a power of 2 from 1M to 256M")
            }
            Format::Vhd if !b.is_power_of_two() || !(4096..=256 << 20).contains(&b) => {
                bail!("block_size={b}: a VHD block size is a power of 2 from 4k to 256M")
            }
            _ => {}
        }
    }
    if let Some(parent) = &spec.parent {
        if spec.fixed {
            bail!("subformat=fixed with a backing file: a differencing image is never fixed");
        }
        if spec.logical_sector_size.is_some() {
            bail!(
                "logical_sector_size with a backing file: a differencing image has its \
                 parent's logical sector size"
            );
        }
        common::check_parent_name(parent)?;
    }
    if let (Some(l), Some(p)) = (spec.logical_sector_size, spec.physical_sector_size) {
        if p < l {
            bail!("physical_sector_size={p} is smaller than logical_sector_size={l}");
        }
    }
    if let Some(l) = spec.log_size {
        if l == 0 || l % (1 << 20) != 0 {
            bail!("log_size={l}: the log size must be a non-zero multiple of 1 MiB");
        }
    }
    if format == Format::Vhdx && spec.size > vhdx::format::MAX_SIZE {
        bail!(
            "size {} exceeds the VHDX maximum of 64 TiB ({} bytes)",
            spec.size,
            vhdx::format::MAX_SIZE
        );
    }
    if format == Format::Vhd && spec.parent.is_none() {
        let (max, what) = if spec.fixed {
            (vhd::MAX_FIXED_SIZE, "a fixed VHD's maximum of 32 TiB")
        } else {
            (vhd::MAX_DYNAMIC_SIZE, "a dynamic VHD's maximum of 2040 GiB")
        };
        if spec.size > max {
            bail!("size {} exceeds {what} ({max} bytes)", spec.size);
        }
        if spec.fixed && spec.size > vhd::MAX_DYNAMIC_SIZE {
            eprintln!(
                "viridian: warning: a fixed VHD over 2040 GiB opens in Azure only: Hyper-V, \
                 Windows and qemu-img refuse VHDs larger than 2040 GiB (use VHDX)"
            );
        }
    }
    Ok(())
}

/// Flags win over `-o` for the parent's Windows location.
pub fn merge_windows(spec: &mut CreateSpec, w: &common::WindowsArgs) {
    let loc = w.location();
    if loc.parent_path.is_some() {
        spec.parent_windows.parent_path = loc.parent_path;
    }
    if loc.volume_path.is_some() {
        spec.parent_windows.volume_path = loc.volume_path;
    }
    if loc.root.is_some() {
        spec.parent_windows.root = loc.root;
    }
}

/// qemu-img takes the parent as `-o backing_file=,backing_fmt=` as well as `-b`/`-F`: moves
/// those two options into the flags (giving one both ways is an error) and leaves the rest.
fn backing_from_options(a: &mut Args) -> Result<()> {
    let mut rest = Vec::new();
    for group in &a.options {
        let mut kept = Vec::new();
        for item in common::split_option_list(group) {
            let (flag, value) = match item.split_once('=') {
                Some(("backing_file", v)) => (&mut a.backing, PathBuf::from(v)),
                Some(("backing_fmt", v)) => {
                    if a.backing_format.is_some() {
                        bail!("the backing format is given twice (-F and -o backing_fmt)");
                    }
                    a.backing_format = Some(v.to_string());
                    continue;
                }
                _ => {
                    // Written back with its commas doubled, so parsing it again gives it back.
                    kept.push(item.replace(',', ",,"));
                    continue;
                }
            };
            if flag.is_some() {
                bail!("the backing file is given twice (-b and -o backing_file)");
            }
            *flag = Some(value);
        }
        if !kept.is_empty() {
            rest.push(kept.join(","));
        }
    }
    a.options = rest;
    Ok(())
}

pub fn run(mut a: Args) -> Result<i32> {
    if a.options.iter().any(|o| o == "help" || o == "?") {
        println!("{OPTION_HELP}");
        return Ok(0);
    }
    backing_from_options(&mut a)?;
    let Some(file) = a.file.clone() else {
        bail!("create needs FILE (and SIZE unless -b gives a parent); -o help lists the options");
    };
    let format = common::parse_format(&a.format)?;
    common::warn_if_extension_disagrees("-f", format, &file);
    let size = match (&a.size, &a.backing) {
        (Some(s), _) => parse_size(s)?,
        (None, Some(_)) => 0,
        (None, None) => bail!("create: a SIZE is needed unless -b gives a parent"),
    };
    let mut spec = spec_from_options(format, size, &a.options)?;
    merge_windows(&mut spec, &a.windows);
    let backing = a
        .backing
        .as_ref()
        .map(|b| common::backing_relative_to(&file, b));
    if let Some(b) = &backing {
        spec.parent_format = a
            .backing_format
            .as_deref()
            .map(common::parse_format)
            .transpose()?;
        if a.size.is_some() {
            let parent =
                common::open_ro(b, a.backing_format.as_deref(), common::SizeRuleArg::Auto)?;
            if parent.size() != size {
                bail!(
                    "a differencing image has its parent's size ({} bytes), not {size}",
                    parent.size()
                );
            }
        }
        spec.parent = Some(b.clone());
        // Again, now that the options meet the backing file.
        validate_spec(format, &spec)?;
    }
    let prealloc = preallocation_of(&spec, &a.options)?;
    let (d, guard) = common::create_image(&file, &spec)?;
    d.close()
        .with_context(|| format!("cannot finish {}", file.display()))?;
    common::preallocate(&file, prealloc)?;
    if !a.quiet {
        let mut line = format!(
            "Formatting '{}', fmt={} size={}",
            file.display(),
            common::qemu_format_name(d.format()),
            d.size()
        );
        if let Some(b) = &a.backing {
            line.push_str(&format!(" backing_file={}", b.display()));
        }
        // Said before the image counts as made: if it cannot be said, the image goes again.
        common::say(&line)?;
    }
    guard.disarm();
    Ok(0)
}

#[derive(clap::Args)]
pub struct SnapshotArgs {
    /// Create an external differencing child file CHILD (e.g. snap1.vhdx) on top of FILE, in
    /// FILE's format. VHD and VHDX have no internal snapshots: from now on write to CHILD;
    /// writing FILE changes its identity and CHILD no longer opens.
    #[arg(short = 'c', long = "create", value_name = "CHILD")]
    create: Option<PathBuf>,
    /// List the chain below FILE (depth, format, size, path).
    #[arg(short = 'l', long = "list")]
    list: bool,
    /// FILE's format (vhd or vhdx); probed when absent.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    #[command(flatten)]
    windows: common::WindowsArgs,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image to snapshot or list.
    file: PathBuf,
}

pub fn run_snapshot(a: SnapshotArgs) -> Result<i32> {
    if let Some(child) = &a.create {
        if child.extension().is_none() {
            bail!(
                "snapshot -c {name}: viridian has no internal snapshots; -c creates an external \
                 differencing child file, so give its file name with an extension, e.g. \
                 -c {name}.{ext}",
                name = child.display(),
                ext = a
                    .file
                    .extension()
                    .and_then(|e| e.to_str())
                    .unwrap_or("vhdx")
            );
        }
        let format = match &a.format {
            Some(f) => common::parse_format(f)?,
            None => chain::probe_path(&a.file)
                .with_context(|| format!("cannot open {}", a.file.display()))?,
        };
        if let Some(by_name) = common::format_of_extension(child) {
            if by_name != format && format != Format::Raw {
                bail!(
                    "snapshot -c {}: the child of a {} image is a {} file, but the name says {}; \
                     name it with a .{} extension",
                    child.display(),
                    format.name(),
                    format.name(),
                    by_name.name(),
                    format.name()
                );
            }
        }
        if format == Format::Raw {
            bail!(
                "{} is raw; snapshots need a vhd or vhdx parent (convert it first)",
                a.file.display()
            );
        }
        common::check_parent_name(&a.file)?;
        let mut spec = CreateSpec::new(format, 0);
        spec.parent = Some(a.file.clone());
        spec.parent_format = Some(format);
        merge_windows(&mut spec, &a.windows);
        let (d, guard) = common::create_image(child, &spec)?;
        d.close()
            .with_context(|| format!("cannot finish {}", child.display()))?;
        if !a.quiet {
            // A VHDX parent's identity changes on its next write, which the child detects; a
            // VHD has no such mark, so a written VHD parent silently changes what the child reads.
            let consequence = if format == Format::Vhdx {
                "would change its identity and break the child"
            } else {
                "would silently change what the child reads (a VHD records nothing the child \
                 could check)"
            };
            common::say(&format!(
                "Created differencing child {} ({}) on top of {}.\n\
                 Write to {} from now on: writing {} {consequence}.",
                child.display(),
                format.name(),
                a.file.display(),
                child.display(),
                a.file.display()
            ))?;
        }
        guard.disarm();
        return Ok(0);
    }
    if a.list || a.create.is_none() {
        let top = common::open_ro(&a.file, a.format.as_deref(), common::SizeRuleArg::Auto)?;
        for (depth, layer) in chain::layers(&top).iter().enumerate() {
            println!(
                "{depth}\t{}\t{}\t{}",
                common::qemu_format_name(layer.format()),
                layer.size(),
                layer.path().map(common::shown_path).unwrap_or_default()
            );
        }
    }
    Ok(0)
}

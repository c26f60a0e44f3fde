//! Opening images: format probing and parent chains.
//!
//! [`open`] takes the format it is told, or else probes the bytes ([`probe_explained`]: VHDX
//! file identifier; a VHD footer cookie at offset 0 (a dynamic VHD's copy); a trailing VHD
//! footer only with a valid checksum that agrees with the file's size; else raw). A writable image whose format
//! was probed as raw refuses writes that would make it probe as something else (guest data
//! must not choose the format of the next open). For differencing images every parent is found
//! and verified by one rule for both formats ([`parent_candidates`], `parent.rs`,
//! docs/chains.md): the formats report their locators as recorded, the candidate paths are
//! tried in order (relative, absolute, then the recorded name's file beside the child); only
//! regular files are considered (a block device only when given explicitly as the parent);
//! each is opened read-only as the child's format (never probed), and its identity (VHD
//! Unique ID, VHDX DataWriteGuid) must equal what the child recorded, else the open fails
//! naming both files. Cycles and absurd depths are refused.

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod commit;
mod image;
mod parent;
pub mod undo;

pub use commit::commit_into_base;
use disk::{Access, BlockDevice, Disk, Error, FileOptions, FileStorage, RawDisk, Result, Storage};
pub use image::Image;
pub use parent::parent_candidates;
use parent::{is_block_device, open_parent};
pub use undo::UndoDisk;

/// Parents deeper than this are refused (a crafted chain must not recurse forever).
pub const MAX_CHAIN_DEPTH: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Vhd,
    Vhdx,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
        }
    }

    /// Parses a user's `-f` value; `vpc` is qemu's name for VHD.
    pub fn parse(s: &str) -> Option<Format> {
        match s.to_ascii_lowercase().as_str() {
            "raw" => Some(Format::Raw),
            "vhd" | "vpc" => Some(Format::Vhd),
            "vhdx" | "avhdx" => Some(Format::Vhdx),
            _ => None,
        }
    }
}

/// How to open an image and its parents.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Open the top image read-only (parents are always read-only unless `parents_writable`).
    pub read_only: bool,
    /// Skip probing.
    pub format: Option<Format>,
    /// Use this file as the top image's parent instead of what the locators say (moved chains).
    pub parent_override: Option<PathBuf>,
    /// Open only the top image; differencing reads of parent data then fail.
    pub no_parent: bool,
    /// VHD size rule (CHS or current_size) for every VHD in the chain.
    pub vhd_size_rule: vhd::SizeRule,
    /// Open parents read-write too (commit writes into them).
    pub parents_writable: bool,
    /// Take advisory locks (shared for readers, exclusive for writers).
    pub lock: bool,
    /// "cache=unsafe" for every file of the chain: flushes stop at the page cache (see
    /// [`disk::FileOptions::skip_file_sync`] for exactly what is skipped). Only writable
    /// layers ever flush. Default false.
    pub skip_file_sync: bool,
    /// Bound of each VHD and VHDX file's BAT page cache, in bytes (`None`: the formats'
    /// defaults, [`vhd::DEFAULT_BAT_CACHE_BYTES`] and [`vhdx::DEFAULT_BAT_CACHE_BYTES`]).
    /// Defaults to what [`set_default_bat_cache_bytes`] set for the process.
    pub bat_cache_bytes: Option<usize>,
}

/// 0: not set.
static DEFAULT_BAT_CACHE_BYTES: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Sets the BAT cache bound every later `OpenOptions::default()` takes (the CLI's global
/// `--bat-cache`), so every verb and every layer of a chain follows one setting.
pub fn set_default_bat_cache_bytes(bytes: usize) {
    DEFAULT_BAT_CACHE_BYTES.store(bytes.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// The BAT cache bound [`set_default_bat_cache_bytes`] set, if any (for verbs that open or
/// create images without [`OpenOptions`]: check, create, amend).
pub fn default_bat_cache_bytes() -> Option<usize> {
    match DEFAULT_BAT_CACHE_BYTES.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: true,
            format: None,
            parent_override: None,
            no_parent: false,
            vhd_size_rule: vhd::SizeRule::Auto,
            parents_writable: false,
            lock: true,
            skip_file_sync: false,
            bat_cache_bytes: default_bat_cache_bytes(),
        }
    }
}

impl OpenOptions {
    pub fn read_only() -> Self {
        Self::default()
    }
    pub fn read_write() -> Self {
        OpenOptions {
            read_only: false,
            ..Self::default()
        }
    }
}

/// What probing found and by which rule (for `info` and messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub format: Format,
    pub rule: &'static str,
}

/// Rule text when nothing matched.
pub const RAW_RULE: &str = "no VHDX identifier, no VHD footer cookie at offset 0, no trailing VHD footer with a valid checksum agreeing with the file size: raw";

/// Determines the format from the bytes of a store, and says which rule decided.
pub fn probe_explained(storage: &dyn Storage) -> Result<Probe> {
    let vhd_rule = vhd::VhdDisk::probe_rule(storage)?;
    if vhdx::VhdxDisk::probe(storage)? {
        // A fixed VHD's offset 0 is guest data, and so may be the last sector of a VHDX (its
        // last block): each format's guest can forge the other's signature. A file that shows
        // both is refused rather than guessed; an explicit format opens it.
        if vhd_rule.is_some() {
            let name = storage
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "the image".into());
            return Err(Error::InvalidArgument(format!(
                "{name}: ambiguous format: a VHDX identifier at offset 0 and a VHD footer at \
                 the end; open it with an explicit format (-f vhdx or -f vhd)"
            )));
        }
        return Ok(Probe {
            format: Format::Vhdx,
            rule: "VHDX file type identifier 'vhdxfile' at offset 0",
        });
    }
    if let Some(rule) = vhd_rule {
        return Ok(Probe {
            format: Format::Vhd,
            rule,
        });
    }
    Ok(Probe {
        format: Format::Raw,
        rule: RAW_RULE,
    })
}

/// Determines the format from the bytes of a store.
pub fn probe(storage: &dyn Storage) -> Result<Format> {
    Ok(probe_explained(storage)?.format)
}

/// Probes the format of a file without locking or writing it.
pub fn probe_path(path: &Path) -> Result<Format> {
    Ok(probe_path_explained(path)?.format)
}

/// Probes a file without locking or writing it, saying which rule decided.
pub fn probe_path_explained(path: &Path) -> Result<Probe> {
    let s = FileStorage::open(path, Access::ReadOnly, false)?;
    probe_explained(&s)
}

/// Opens `path` and, unless told not to, its whole parent chain, behind the request layer
/// ([`Disk`]) that every consumer does its I/O through.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Disk> {
    open_image(path, opts).map(|i| i.disk())
}

/// Like [`open`], but hands out the top layer by kind, for management (resize, compact,
/// re-linking, format facts); do I/O through [`Image::disk`].
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<Image> {
    let mut seen = HashSet::new();
    open_layer(
        path,
        opts,
        opts.format,
        !opts.read_only,
        0,
        &mut seen,
        opts.parent_override.as_deref(),
    )
}

pub(crate) fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Opens one layer (and, recursively, its parents). `format` None means probe.
#[allow(clippy::too_many_arguments)]
pub(crate) fn open_layer(
    path: &Path,
    opts: &OpenOptions,
    format: Option<Format>,
    writable: bool,
    depth: usize,
    seen: &mut HashSet<PathBuf>,
    parent_override: Option<&Path>,
) -> Result<Image> {
    if !seen.insert(canonical(path)) {
        return Err(Error::ParentCycle {
            child: path.to_path_buf(),
            parent: path.to_path_buf(),
        });
    }
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    if !meta.is_file() && !is_block_device(&meta) {
        return Err(Error::InvalidArgument(format!(
            "{} is not a regular file or block device",
            path.display()
        )));
    }
    let access = if writable {
        Access::ReadWrite
    } else {
        Access::ReadOnly
    };
    let file_opts = FileOptions {
        lock: opts.lock,
        skip_file_sync: opts.skip_file_sync,
    };
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open_with(path, access, &file_opts)?);
    let (format, probed) = match format {
        Some(f) => (f, false),
        None => (probe(&*storage)?, true),
    };
    match format {
        Format::Raw => {
            let raw = RawDisk::new(storage, !writable)?;
            // A probed raw image must stay raw: its guest must not be able to write itself
            // into a VHD or VHDX for the next open. An explicit raw format lifts the guard.
            Ok(Image::Raw(Arc::new(if probed && writable {
                raw.with_probe_guard()
            } else {
                raw
            })))
        }
        Format::Vhd => {
            let vopts = vhd::OpenOptions {
                read_only: !writable,
                size_rule: opts.vhd_size_rule,
            };
            let cache = opts.bat_cache_bytes.unwrap_or(vhd::DEFAULT_BAT_CACHE_BYTES);
            let mut d = vhd::VhdDisk::open_with_cache(storage, &vopts, cache)?;
            if let Some(link) = d.parent_link().filter(|_| !opts.no_parent) {
                let parent = open_parent(path, &link, opts, depth, seen, parent_override)?;
                d.attach_parent(parent)?;
            }
            Ok(Image::Vhd(Arc::new(d)))
        }
        Format::Vhdx => {
            let xopts = vhdx::OpenOptions {
                read_only: !writable,
            };
            let cache = opts
                .bat_cache_bytes
                .unwrap_or(vhdx::DEFAULT_BAT_CACHE_BYTES);
            let mut d = vhdx::VhdxDisk::open_with_cache(storage, &xopts, cache)?;
            if let Some(link) = d.parent_link().filter(|_| !opts.no_parent) {
                let parent = open_parent(path, &link, opts, depth, seen, parent_override)?;
                d.attach_parent(parent)?;
            }
            Ok(Image::Vhdx(Arc::new(d)))
        }
    }
}

/// Every layer of a chain, top first (the images themselves, for facts).
pub fn layers(top: &Disk) -> Vec<Arc<dyn BlockDevice>> {
    let mut out = vec![top.image().clone()];
    while let Some(p) = out.last().and_then(|l| l.backing().cloned()) {
        out.push(p);
    }
    out
}

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateSpec {
    pub format: Format,
    /// Virtual size; ignored (taken from the parent) when `parent` is set.
    pub size: u64,
    /// Fixed (preallocated) instead of dynamic.
    pub fixed: bool,
    pub block_size: Option<u32>,
    pub log_size: Option<u32>,
    pub logical_sector_size: Option<u32>,
    pub physical_sector_size: Option<u32>,
    /// VHD only: size by CHS geometry or exact current_size.
    pub vhd_size_rule: vhd::SizeRule,
    /// VHD only: Azure-ready fixed disk (whole MiB).
    pub azure: bool,
    /// Make a differencing image on top of this parent.
    pub parent: Option<PathBuf>,
    /// The parent's format when stated (`-F`); None probes it.
    pub parent_format: Option<Format>,
    /// Where the parent is on Windows, for the absolute locators (see [`WindowsLocation`]).
    pub parent_windows: WindowsLocation,
    /// "cache=unsafe" for the new file: its flushes stop at the page cache (see
    /// [`disk::FileOptions::skip_file_sync`]). Default false.
    pub skip_file_sync: bool,
}

/// How the Windows path of a parent is known, for the locators that need one: stated outright
/// (`-o parent_windows_path=D:\VMs\base.vhdx`), or by mapping a host folder to a Windows
/// folder (`--windows-root 'D:\VMs'` maps the child's folder, `--windows-root
/// '/srv/vms=D:\VMs'` any folder). Nothing known: only the relative locator is written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WindowsLocation {
    pub parent_path: Option<String>,
    pub root: Option<String>,
    pub volume_path: Option<String>,
}

impl WindowsLocation {
    /// The Windows paths to record for `parent` in the child at `child`.
    pub fn resolve(&self, child: &Path, parent: &Path) -> Result<disk::ParentWindowsPaths> {
        let mut out = disk::ParentWindowsPaths {
            absolute: self.parent_path.clone(),
            volume: self.volume_path.clone(),
        };
        if out.absolute.is_none() {
            if let Some(root) = &self.root {
                let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
                let (host, win) = match root.split_once('=') {
                    Some((h, w)) => (abs(Path::new(h)), w.to_string()),
                    None => (
                        abs(child)
                            .parent()
                            .map(Path::to_path_buf)
                            .unwrap_or_default(),
                        root.clone(),
                    ),
                };
                let p = abs(parent);
                out.absolute =
                    Some(disk::windows_path_under(&win, &host, &p).ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "parent {} is not inside {}, which --windows-root maps to {win}",
                            p.display(),
                            host.display()
                        ))
                    })?);
            }
        }
        Ok(out)
    }
}

impl CreateSpec {
    pub fn new(format: Format, size: u64) -> Self {
        CreateSpec {
            format,
            size,
            fixed: false,
            block_size: None,
            log_size: None,
            logical_sector_size: None,
            physical_sector_size: None,
            vhd_size_rule: vhd::SizeRule::CurrentSize,
            azure: false,
            parent: None,
            parent_format: None,
            parent_windows: WindowsLocation::default(),
            skip_file_sync: false,
        }
    }

    /// How the new file is opened: always locked, synced unless `skip_file_sync`.
    fn file_options(&self) -> FileOptions {
        FileOptions {
            lock: true,
            skip_file_sync: self.skip_file_sync,
        }
    }
}

/// Refuses to make `parent` (the top of an opened chain, found at `parent_path`) the parent of
/// an image when the child would be one layer more than the [`MAX_CHAIN_DEPTH`] images a chain
/// may have: a link that open would refuse is never made (create, snapshot, rebase).
pub fn check_room_for_child(parent_path: &Path, parent: &dyn BlockDevice) -> Result<()> {
    let images = disk::chain_depth(parent) + 1;
    if images + 1 > MAX_CHAIN_DEPTH {
        return Err(Error::Unsupported(format!(
            "{} is the top of a chain of {images} images; a child would make it deeper than \
             the {MAX_CHAIN_DEPTH} images a chain may have",
            parent_path.display()
        )));
    }
    Ok(())
}

/// Creates a new image (never overwrites) and returns it opened read-write.
pub fn create(path: &Path, spec: &CreateSpec) -> Result<Disk> {
    create_image(path, spec).map(|i| i.disk())
}

/// Like [`create`], but hands out the new image by kind.
pub fn create_image(path: &Path, spec: &CreateSpec) -> Result<Image> {
    if path.exists() {
        return Err(Error::InvalidArgument(format!(
            "{} already exists; refusing to overwrite it",
            path.display()
        )));
    }
    let parent = match &spec.parent {
        Some(p) => {
            let opts = OpenOptions {
                format: spec.parent_format,
                ..OpenOptions::read_only()
            };
            let parent = open(p, &opts)?;
            check_room_for_child(p, parent.as_ref())?;
            Some((p.clone(), parent))
        }
        None => None,
    };
    let windows = match &spec.parent {
        Some(p) => spec.parent_windows.resolve(path, p)?,
        None => disk::ParentWindowsPaths::default(),
    };
    match spec.format {
        Format::Raw => {
            if parent.is_some() {
                return Err(Error::InvalidArgument(
                    "raw images cannot have a backing file".into(),
                ));
            }
            Ok(Image::Raw(Arc::new(RawDisk::create_with(
                path,
                spec.size,
                &spec.file_options(),
            )?)))
        }
        Format::Vhd => {
            let kind = match parent {
                Some((parent_path, parent)) => {
                    if parent.format() != "vhd" {
                        return Err(Error::InvalidArgument(format!(
                            "a differencing VHD needs a VHD parent; {} is {}",
                            parent_path.display(),
                            parent.format()
                        )));
                    }
                    vhd::CreateKind::Differencing {
                        parent_path: std::path::absolute(&parent_path).unwrap_or(parent_path),
                        parent: parent.image().clone(),
                    }
                }
                None if spec.fixed || spec.azure => vhd::CreateKind::Fixed,
                None => vhd::CreateKind::Dynamic,
            };
            let mut o = vhd_options(spec, Some(kind));
            o.parent_windows = windows;
            Ok(Image::Vhd(Arc::new(vhd::VhdDisk::create(path, &o)?)))
        }
        Format::Vhdx => {
            let kind = match parent {
                Some((parent_path, parent)) => {
                    if parent.format() != "vhdx" {
                        return Err(Error::InvalidArgument(format!(
                            "a differencing VHDX needs a VHDX parent; {} is {}",
                            parent_path.display(),
                            parent.format()
                        )));
                    }
                    vhdx::CreateKind::Differencing {
                        parent_path: std::path::absolute(&parent_path).unwrap_or(parent_path),
                        parent: parent.image().clone(),
                    }
                }
                None if spec.fixed => vhdx::CreateKind::Fixed,
                None => vhdx::CreateKind::Dynamic,
            };
            let mut o = vhdx_options(spec, Some(kind));
            o.parent_windows = windows;
            Ok(Image::Vhdx(Arc::new(vhdx::VhdxDisk::create(path, &o)?)))
        }
    }
}

/// The VHD creation options a spec stands for (`kind` None: fixed or dynamic per the spec).
pub fn vhd_options(spec: &CreateSpec, kind: Option<vhd::CreateKind>) -> vhd::CreateOptions {
    let kind = kind.unwrap_or(if spec.fixed || spec.azure {
        vhd::CreateKind::Fixed
    } else {
        vhd::CreateKind::Dynamic
    });
    let mut o = vhd::CreateOptions::new(kind, spec.size);
    o.file = spec.file_options();
    if let Some(b) = spec.block_size {
        o.block_size = b;
    }
    o.size_rule = spec.vhd_size_rule;
    o.azure = spec.azure;
    if let Some(n) = default_bat_cache_bytes() {
        o.bat_cache_bytes = n;
    }
    o
}

/// The VHDX creation options a spec stands for.
pub fn vhdx_options(spec: &CreateSpec, kind: Option<vhdx::CreateKind>) -> vhdx::CreateOptions {
    let kind = kind.unwrap_or(if spec.fixed {
        vhdx::CreateKind::Fixed
    } else {
        vhdx::CreateKind::Dynamic
    });
    let mut o = vhdx::CreateOptions::new(kind, spec.size);
    o.file = spec.file_options();
    if let Some(b) = spec.block_size {
        o.block_size = b;
    }
    if let Some(l) = spec.log_size {
        o.log_size = l;
    }
    if let Some(s) = spec.logical_sector_size {
        o.logical_sector_size = s;
    }
    if let Some(s) = spec.physical_sector_size {
        o.physical_sector_size = s;
    }
    if let Some(n) = default_bat_cache_bytes() {
        o.bat_cache_bytes = n;
    }
    o
}

/// Copies into `base` every range that a layer of `top` above depth `depth_limit` defines
/// (read through `top`'s merged view), so `base` then reads as `top` does. Zero ranges become
/// write-zeroes. Returns the bytes merged; `progress` is told about every range walked.
pub fn merge(
    top: &dyn BlockDevice,
    depth_limit: usize,
    base: &dyn BlockDevice,
    progress: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<u64> {
    let size = top.size();
    if base.size() < size {
        return Err(Error::InvalidArgument(format!(
            "cannot merge {size} bytes into a {}-byte image",
            base.size()
        )));
    }
    let mut buf = vec![0u8; 2 << 20];
    let mut pos = 0;
    let mut merged = 0;
    while pos < size {
        let e = disk::map::status_through_chain(top, pos, size - pos)?;
        if e.present && e.depth < depth_limit && !e.zero {
            // Progress (which may stop the merge) after every piece, not every extent: one
            // extent can be the whole disk.
            let mut off = 0;
            while off < e.length {
                let n = (e.length - off).min(buf.len() as u64) as usize;
                top.read_at(&mut buf[..n], pos + off)?;
                base.write_at(&buf[..n], pos + off)?;
                off += n as u64;
                merged += n as u64;
                progress(n as u64)?;
            }
        } else {
            if e.present && e.depth < depth_limit {
                base.write_zeroes(pos, e.length, disk::ZeroFlags { may_unmap: true })?;
                merged += e.length;
            }
            progress(e.length)?;
        }
        pos += e.length;
    }
    base.flush()?;
    Ok(merged)
}

/// Opens `child` alone for writing and points it at `parent` (as found now). Used after
/// writing into a parent changed its identity (a VHDX DataWriteGuid) while the child's view
/// stayed the same: commit and undo commit, also when they fail half-way.
pub fn relink(child: &Path, parent: &Path) -> Result<()> {
    let mut rw = OpenOptions::read_write();
    rw.no_parent = true;
    let c = open_image(child, &rw)?;
    let p = open(parent, &OpenOptions::read_only())?;
    c.set_parent(parent, p.image().as_ref())?;
    c.device().close()
}

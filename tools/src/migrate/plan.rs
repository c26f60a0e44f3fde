//! Building the migration plan: find every disk the `.vmc` names, open its chain (identities
//! verified by `chain::open`), find its `.vud` undo disk, decide the view to convert, measure
//! what it needs, and name the outputs. Nothing here writes anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use disk::{BlockDevice, Disk};
use serde::Serialize;

use super::paths::{self, PathMap};
use super::vmc::{Bus, DriveKind, Vmc};

/// Output image format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutFormat {
    #[default]
    Vhdx,
    Vhd,
}

impl OutFormat {
    pub fn ext(self) -> &'static str {
        match self {
            OutFormat::Vhdx => "vhdx",
            OutFormat::Vhd => "vhd",
        }
    }
}

/// What to do with a pending undo disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UndoChoice {
    /// Convert the merged view (base + undo disk): Virtual PC's "commit".
    Merge,
    /// Convert the base alone and leave the undo disk behind: "discard".
    Discard,
    /// Neither flag was given: `--apply` refuses.
    Undecided,
}

/// The choices that shape a plan (from the command line).
#[derive(Clone, Debug)]
pub struct Settings {
    pub vmc: PathBuf,
    pub to: PathBuf,
    pub format: OutFormat,
    pub undo: UndoChoice,
    pub maps: Vec<PathMap>,
    pub size_rule: vhd::SizeRule,
    pub physical_sector_size: u32,
}

/// Facts about one layer of a chain.
#[derive(Clone, Debug, Serialize)]
pub struct LayerInfo {
    pub path: String,
    pub format: &'static str,
    pub disk_type: Option<String>,
    pub unique_id: Option<String>,
    pub parent_unique_id: Option<String>,
    pub creator_app: Option<String>,
    pub creator_host_os: Option<String>,
    pub virtual_size: u64,
    pub size_rule: Option<String>,
    pub current_size: Option<u64>,
    pub chs_size: Option<u64>,
    pub geometry: Option<String>,
    pub saved_state: bool,
}

/// A `.vud` and what became of it.
#[derive(Clone, Debug, Serialize)]
pub struct UndoDisk {
    pub path: String,
    pub how_found: String,
    pub choice: UndoChoice,
    pub layer: LayerInfo,
}

/// One hard disk to convert.
#[derive(Clone, Debug, Serialize)]
pub struct DiskPlan {
    pub controller: Bus,
    pub channel: u32,
    pub slot: u32,
    pub vmc_absolute: Option<String>,
    pub vmc_relative: Option<String>,
    pub source: String,
    pub resolved_by: String,
    /// The base chain, top first (a `.vhd` that is itself differencing lists its parents).
    pub chain: Vec<LayerInfo>,
    pub undo: Option<UndoDisk>,
    /// Bytes the guest saw, which the output keeps exactly.
    pub guest_size: u64,
    /// How the guest size was derived (CHS vs current_size).
    pub size_note: String,
    /// The guest size is the CHS capacity of a VHD (kept as CHS geometry in a VHD output).
    pub chs_sized: bool,
    /// Bytes of data in the view that is converted (the rest reads as zeros).
    pub data_bytes: u64,
    /// Estimated output file size.
    pub need_bytes: u64,
    /// Output file name, relative to the target directory (and to the VM TOML).
    pub output: String,
    pub output_format: OutFormat,
    #[serde(skip)]
    pub view: Option<Disk>,
}

/// A drive that is not converted (CD/DVD, empty slot).
#[derive(Clone, Debug, Serialize)]
pub struct SkippedDrive {
    pub controller: Bus,
    pub channel: u32,
    pub slot: u32,
    pub kind: DriveKind,
    pub path: Option<String>,
    pub reason: String,
}

/// A file found in the VM's folder that is not migrated.
#[derive(Clone, Debug, Serialize)]
pub struct Leftover {
    pub path: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub vmc_path: String,
    pub vm: Vmc,
    /// File-system-safe form of the VM name used for output names.
    pub file_stem: String,
    pub target_dir: String,
    pub disks: Vec<DiskPlan>,
    pub skipped_drives: Vec<SkippedDrive>,
    pub saved_state: Vec<String>,
    pub unmatched_undo: Vec<Leftover>,
    pub toml: String,
    pub need_bytes: u64,
    pub warnings: Vec<String>,
}

impl Plan {
    pub fn undecided(&self) -> bool {
        self.disks.iter().any(|d| {
            d.undo
                .as_ref()
                .is_some_and(|u| u.choice == UndoChoice::Undecided)
        })
    }

    /// Every file the migration writes, relative to the target directory.
    pub fn outputs(&self) -> Vec<String> {
        let mut v: Vec<String> = self.disks.iter().map(|d| d.output.clone()).collect();
        v.push(self.toml.clone());
        v.push("report.md".into());
        v.push("report.json".into());
        v
    }
}

/// Keeps names portable: letters, digits, `-`, `_`, `.`; anything else becomes `_`.
pub fn safe_stem(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_matches('.').to_string();
    if s.is_empty() {
        "vm".into()
    } else {
        s
    }
}

pub fn layer_info(d: &dyn BlockDevice) -> LayerInfo {
    let path = d.path().map(paths::show).unwrap_or_default();
    let mut li = LayerInfo {
        path,
        format: d.format(),
        disk_type: None,
        unique_id: d.unique_id().map(|id| chain::hex_id(&id)),
        parent_unique_id: d.parent_link().map(|l| chain::hex_id(&l.expected_id)),
        creator_app: None,
        creator_host_os: None,
        virtual_size: d.size(),
        size_rule: None,
        current_size: None,
        chs_size: None,
        geometry: None,
        saved_state: false,
    };
    let f = d.facts();
    li.disk_type = f.disk_type.map(str::to_string);
    li.creator_app = f.creator_app;
    li.creator_host_os = f.creator_host_os;
    li.size_rule = f.size_rule.map(str::to_string);
    li.current_size = f.current_size;
    li.chs_size = f.chs_size;
    li.geometry = f.geometry.map(|(c, h, s)| format!("{c}/{h}/{s}"));
    li.saved_state = f.saved_state;
    li
}

fn open_opts(s: &Settings) -> chain::OpenOptions {
    chain::OpenOptions {
        vhd_size_rule: s.size_rule,
        ..chain::OpenOptions::read_only()
    }
}

/// `.vud` files (any case) directly in `dir`.
pub fn scan_vud(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| e.eq_ignore_ascii_case("vud"))
        })
        .collect();
    v.sort();
    v
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The parent identity a `.vud` (a differencing VHD) was made against, without opening parents.
fn undo_parent_id(p: &Path) -> Result<[u8; 16]> {
    let d = chain::open(
        p,
        &chain::OpenOptions {
            no_parent: true,
            format: Some(chain::Format::Vhd),
            ..chain::OpenOptions::read_only()
        },
    )
    .with_context(|| format!("cannot read undo disk {}", p.display()))?;
    d.parent_link()
        .map(|l| l.expected_id)
        .ok_or_else(|| anyhow!("{} is not a differencing VHD", p.display()))
}

/// Builds the plan. Fails for a missing disk, a broken chain, an ambiguous undo disk or
/// outputs that already exist.
pub fn build(s: &Settings, vm: Vmc) -> Result<Plan> {
    let vmc_dir = match s.vmc.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let vmc_dir = std::path::absolute(&vmc_dir).unwrap_or(vmc_dir);
    let file_stem = safe_stem(&vm.name);
    let mut warnings = vm.warnings.clone();
    let mut disks = Vec::new();
    let mut skipped = Vec::new();
    let mut bases: Vec<(Disk, PathBuf)> = Vec::new();

    for d in &vm.drives {
        let where_ = format!("{} {}:{}", d.bus.name(), d.channel, d.slot);
        if d.kind != DriveKind::HardDisk {
            let reason = match d.kind {
                DriveKind::CdDvd => {
                    "CD/DVD drive: not migrated; attach the ISO again if the guest needs it"
                }
                _ => "not a hard disk (drive_type other than 1): not migrated",
            };
            skipped.push(SkippedDrive {
                controller: d.bus,
                channel: d.channel,
                slot: d.slot,
                kind: d.kind,
                path: d.absolute.clone().or_else(|| d.relative.clone()),
                reason: reason.into(),
            });
            continue;
        }
        let cands = paths::candidates(
            d.absolute.as_deref(),
            d.relative.as_deref(),
            &vmc_dir,
            &s.maps,
        );
        let Some(found) = cands.iter().find(|c| c.path.is_file()) else {
            let named = d
                .absolute
                .as_deref()
                .or(d.relative.as_deref())
                .unwrap_or("(no path)");
            let tried: Vec<String> = cands.iter().map(|c| paths::show(&c.path)).collect();
            let hint = if d
                .absolute
                .as_deref()
                .is_some_and(|a| paths::WinPath::parse(a).is_some())
                && s.maps.is_empty()
            {
                " (map its Windows folder with --path-map 'C:\\dir=/local/dir')"
            } else {
                ""
            };
            bail!(
                "disk {where_} of VM {:?} is missing: the .vmc names {named:?}; tried {}{hint}",
                vm.name,
                if tried.is_empty() {
                    "nothing".into()
                } else {
                    tried.join(", ")
                }
            );
        };
        let base = chain::open(&found.path, &open_opts(s)).with_context(|| {
            format!(
                "disk {where_} ({}): cannot open it or its parent chain",
                found.path.display()
            )
        })?;
        let chain_layers = chain::layers(&base);
        let infos: Vec<LayerInfo> = chain_layers
            .iter()
            .map(|l| layer_info(l.as_ref()))
            .collect();
        for li in &infos {
            if li.saved_state {
                warnings.push(format!(
                    "{} has its saved-state flag set: the VM was saved, not shut down",
                    li.path
                ));
            }
        }
        bases.push((base.clone(), found.path.clone()));
        disks.push(DiskPlan {
            controller: d.bus,
            channel: d.channel,
            slot: d.slot,
            vmc_absolute: d.absolute.clone(),
            vmc_relative: d.relative.clone(),
            source: paths::show(&found.path),
            resolved_by: found.how.clone(),
            chain: infos,
            undo: None,
            guest_size: 0,
            size_note: String::new(),
            chs_sized: false,
            data_bytes: 0,
            need_bytes: 0,
            output: String::new(),
            output_format: s.format,
            view: Some(base),
        });
    }

    // Undo disks: named by the .vmc, or lying in the VM's folder or next to a disk.
    let mut vud_files: BTreeMap<PathBuf, (PathBuf, String)> = BTreeMap::new();
    for d in vm.drives.iter().filter(|d| d.kind == DriveKind::HardDisk) {
        if d.undo_absolute.is_none() && d.undo_relative.is_none() {
            continue;
        }
        let c = paths::candidates(
            d.undo_absolute.as_deref(),
            d.undo_relative.as_deref(),
            &vmc_dir,
            &s.maps,
        );
        match c.iter().find(|c| c.path.is_file()) {
            Some(f) => {
                vud_files
                    .entry(canonical(&f.path))
                    .or_insert((f.path.clone(), format!("named by the .vmc ({})", f.how)));
            }
            None => warnings.push(format!(
                "the .vmc names undo disk {:?} for {} {}:{}, which does not exist (it was probably committed or discarded)",
                d.undo_absolute.as_deref().or(d.undo_relative.as_deref()).unwrap_or(""),
                d.bus.name(),
                d.channel,
                d.slot
            )),
        }
    }
    let mut dirs = vec![vmc_dir.clone()];
    for (_, p) in &bases {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dirs.iter().any(|x| canonical(x) == canonical(dir)) {
                dirs.push(dir.to_path_buf());
            }
        }
    }
    for dir in &dirs {
        for p in scan_vud(dir) {
            vud_files
                .entry(canonical(&p))
                .or_insert((p, format!("found in {}", dir.display())));
        }
    }
    let mut unmatched = Vec::new();
    let mut matches: Vec<Vec<(PathBuf, String)>> = vec![Vec::new(); disks.len()];
    for (path, how) in vud_files.into_values() {
        match undo_parent_id(&path) {
            Ok(id) => {
                let hit = bases.iter().position(|(b, _)| b.unique_id() == Some(id));
                match hit {
                    Some(i) => matches[i].push((path, how)),
                    None => unmatched.push(Leftover {
                        path: paths::show(&path),
                        reason: format!(
                            "undo disk whose parent identity {} matches no disk of this VM: not migrated",
                            chain::hex_id(&id)
                        ),
                    }),
                }
            }
            Err(e) => unmatched.push(Leftover {
                path: paths::show(&path),
                reason: format!(
                    "not usable as an undo disk: {}",
                    crate::common::one_line(&e)
                ),
            }),
        }
    }

    for (i, (disk, found)) in disks.iter_mut().zip(matches).enumerate() {
        if found.len() > 1 {
            let names: Vec<String> = found.iter().map(|(p, _)| paths::show(p)).collect();
            bail!(
                "disk {} {}:{} ({}) has {} undo disks claiming it as parent: {}; move the stale ones out of the way",
                disk.controller.name(),
                disk.channel,
                disk.slot,
                disk.source,
                found.len(),
                names.join(", ")
            );
        }
        if let Some((vud, how)) = found.into_iter().next() {
            let opts = chain::OpenOptions {
                parent_override: Some(bases[i].1.clone()),
                ..open_opts(s)
            };
            let top = chain::open(&vud, &opts).with_context(|| {
                format!(
                    "undo disk {} does not fit its disk {}",
                    vud.display(),
                    disk.source
                )
            })?;
            let layer = layer_info(top.as_ref());
            if s.undo == UndoChoice::Merge {
                disk.view = Some(top);
            }
            disk.undo = Some(UndoDisk {
                path: paths::show(&vud),
                how_found: how,
                choice: s.undo,
                layer,
            });
        }
    }

    // Sizes, measurement, names.
    let mut need = 0u64;
    for (i, disk) in disks.iter_mut().enumerate() {
        let view = disk
            .view
            .clone()
            .ok_or_else(|| anyhow!("internal error: no view for disk {i}"))?;
        disk.guest_size = view.size();
        let top = disk
            .undo
            .as_ref()
            .filter(|u| u.choice == UndoChoice::Merge)
            .map(|u| &u.layer)
            .unwrap_or(&disk.chain[0]);
        let (note, chs) = size_note(top);
        disk.size_note = note;
        disk.chs_sized = chs;
        let mut data = 0u64;
        disk::map::for_each_extent(view.as_ref(), |e| {
            if e.data {
                data += e.length;
            }
            Ok(())
        })
        .with_context(|| format!("cannot read the allocation of {}", disk.source))?;
        disk.data_bytes = data;
        disk.need_bytes = match s.format {
            OutFormat::Vhdx => {
                let mut o = vhdx::CreateOptions::new(vhdx::CreateKind::Dynamic, disk.guest_size);
                o.physical_sector_size = s.physical_sector_size;
                vhdx::measure(disk.guest_size, data, &o).0
            }
            OutFormat::Vhd => {
                let o = vhd::CreateOptions::new(vhd::CreateKind::Dynamic, disk.guest_size);
                vhd::measure(disk.guest_size, data, &o).0
            }
        }
        // Bound the estimate from below: a layout we cannot measure still needs its data.
        .max(data + (4 << 20));
        need += disk.need_bytes;
        disk.output = format!("{file_stem}-disk{i}.{}", s.format.ext());
    }

    let saved_state = scan_ext(&vmc_dir, "vsv");
    if vm.undo.enabled == Some(true) && disks.iter().all(|d| d.undo.is_none()) {
        warnings.push(
            "the .vmc enables undo disks, but no pending .vud was found: the last session was committed or discarded"
                .into(),
        );
    }
    if disks.is_empty() {
        warnings.push("the .vmc attaches no hard disk".into());
    }

    let plan = Plan {
        vmc_path: paths::show(&s.vmc),
        file_stem: file_stem.clone(),
        target_dir: paths::show(&s.to),
        disks,
        skipped_drives: skipped,
        saved_state: saved_state.iter().map(|p| paths::show(p)).collect(),
        unmatched_undo: unmatched,
        toml: format!("{file_stem}.toml"),
        need_bytes: need,
        warnings,
        vm,
    };
    let existing: Vec<String> = plan
        .outputs()
        .into_iter()
        .filter(|o| s.to.join(o).symlink_metadata().is_ok())
        .collect();
    if s.to.exists() && !s.to.is_dir() {
        bail!("target {} exists and is not a directory", s.to.display());
    }
    if !existing.is_empty() {
        bail!(
            "target directory {} already has {}: refusing to overwrite; choose another --to or move them",
            s.to.display(),
            existing.join(", ")
        );
    }
    Ok(plan)
}

/// Files with extension `ext` (any case) directly in `dir`.
fn scan_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case(ext))
        })
        .collect();
    v.sort();
    v
}

/// Explains the guest size of a VHD top layer; true when it is the CHS capacity.
fn size_note(top: &LayerInfo) -> (String, bool) {
    match (top.size_rule.as_deref(), top.current_size, top.chs_size) {
        (Some("chs"), Some(cur), Some(chs)) => {
            let mut n = format!(
                "CHS geometry {} = {chs} bytes (creator {:?}: Virtual PC sizes disks by geometry)",
                top.geometry.as_deref().unwrap_or("?"),
                top.creator_app.as_deref().unwrap_or("?")
            );
            if cur != chs {
                n.push_str(&format!(
                    "; the footer's current_size {cur} differs, and the {} bytes past the CHS size were never visible to the guest",
                    cur.saturating_sub(chs)
                ));
            }
            (n, true)
        }
        (Some(rule), Some(cur), Some(chs)) => {
            let mut n = format!("current_size {cur} bytes ({rule} rule)");
            if cur != chs {
                n.push_str(&format!(
                    "; CHS geometry {} would give {chs} bytes (use --size-rule chs if the guest ran on Virtual PC)",
                    top.geometry.as_deref().unwrap_or("?")
                ));
            }
            (n, false)
        }
        _ => (
            format!("{} bytes ({})", top.virtual_size, top.format),
            false,
        ),
    }
}

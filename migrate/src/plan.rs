//! The planning step: from the `.vmc` and the probed [`Facts`], decide what to convert and
//! how: which view of each disk (its chain, or merged with its undo disk), the size the guest
//! saw, the output names and the space needed. Pure: no file system access, so every decision
//! is testable with plain values.

use std::collections::BTreeMap;
use std::path::PathBuf;

use disk::{Disk, Guid};
use serde::Serialize;

use crate::paths::{self, PathMap};
use crate::probe::{DiskFacts, Facts, UndoOpened, ViewFacts};
use crate::vmc::{Bus, DriveKind, Vmc};
use crate::{one_line, Error, Result};

/// Output image format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
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
    pub unique_id: Option<Guid>,
    pub parent_unique_id: Option<Guid>,
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

/// Decides the migration from the `.vmc` and what the file system holds: the view of each disk
/// to convert, its size, the output names and the space needed. Touches no file. Fails, in
/// this order, for a missing or unopenable disk, an ambiguous or unfitting undo disk, an
/// unreadable allocation, or a target that is not a directory or already has an output.
pub fn plan(s: &Settings, vm: Vmc, facts: Facts) -> Result<Plan> {
    let file_stem = safe_stem(&vm.name);
    let mut warnings = vm.warnings.clone();
    let mut disks: Vec<DiskPlan> = Vec::new();
    // Per disk: the drive it came from and the views it may be converted from.
    let mut drive_of: Vec<usize> = Vec::new();
    let mut base_views: Vec<ViewFacts> = Vec::new();
    let mut skipped = Vec::new();
    let mut found: BTreeMap<usize, DiskFacts> =
        facts.disks.into_iter().map(|d| (d.drive, d)).collect();

    for (i, d) in vm.drives.iter().enumerate() {
        let drive = format!("{} {}:{}", d.bus.name(), d.channel, d.slot);
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
        let probed = found.remove(&i);
        let (candidates, hit) = match probed {
            Some(f) => (f.candidates, f.found),
            None => (Vec::new(), None),
        };
        let Some(hit) = hit else {
            return Err(Error::DiskMissing {
                drive,
                vm: vm.name.clone(),
                named: d
                    .absolute
                    .as_deref()
                    .or(d.relative.as_deref())
                    .unwrap_or("(no path)")
                    .to_string(),
                tried: candidates.iter().map(|c| paths::show(&c.path)).collect(),
                suggest_path_map: d
                    .absolute
                    .as_deref()
                    .is_some_and(|a| paths::WinPath::parse(a).is_some())
                    && s.maps.is_empty(),
            });
        };
        let chain = hit.chain.map_err(|source| Error::OpenDisk {
            drive,
            path: hit.candidate.path.clone(),
            source: Box::new(source),
        })?;
        for li in &chain.layers {
            if li.saved_state {
                warnings.push(format!(
                    "{} has its saved-state flag set: the VM was saved, not shut down",
                    li.path
                ));
            }
        }
        drive_of.push(i);
        base_views.push(chain.view);
        disks.push(DiskPlan {
            controller: d.bus,
            channel: d.channel,
            slot: d.slot,
            vmc_absolute: d.absolute.clone(),
            vmc_relative: d.relative.clone(),
            source: paths::show(&hit.candidate.path),
            resolved_by: hit.candidate.how,
            chain: chain.layers,
            undo: None,
            guest_size: 0,
            size_note: String::new(),
            chs_sized: false,
            data_bytes: 0,
            need_bytes: 0,
            output: String::new(),
            output_format: s.format,
            view: None,
        });
    }

    for n in facts.named_undo.iter().filter(|n| !n.exists) {
        let d = &vm.drives[n.drive];
        warnings.push(format!(
            "the .vmc names undo disk {:?} for {} {}:{}, which does not exist (it was probably committed or discarded)",
            n.named,
            d.bus.name(),
            d.channel,
            d.slot
        ));
    }

    // Each undo disk belongs to the disk whose identity it claims; the others are left over.
    let mut unmatched = Vec::new();
    let mut claimed: Vec<Vec<Claim>> = (0..disks.len()).map(|_| Vec::new()).collect();
    for u in facts.undo_disks {
        let id = match u.parent_id {
            Ok(id) => id,
            Err(e) => {
                unmatched.push(Leftover {
                    path: paths::show(&u.path),
                    reason: format!("not usable as an undo disk: {}", one_line(&e)),
                });
                continue;
            }
        };
        let owner = u
            .claims
            .and_then(|(drive, opened)| Some((drive_of.iter().position(|&x| x == drive)?, opened)));
        match owner {
            Some((k, opened)) => claimed[k].push(Claim {
                path: u.path,
                how: u.how,
                opened,
            }),
            None => unmatched.push(Leftover {
                path: paths::show(&u.path),
                reason: format!(
                    "undo disk whose parent identity {} matches no disk of this VM: not migrated",
                    id
                ),
            }),
        }
    }

    let mut views: Vec<ViewFacts> = Vec::with_capacity(disks.len());
    for ((disk, undo), base) in disks.iter_mut().zip(claimed).zip(base_views) {
        if undo.len() > 1 {
            return Err(Error::AmbiguousUndo {
                drive: format!("{} {}:{}", disk.controller.name(), disk.channel, disk.slot),
                source_disk: disk.source.clone(),
                undo_disks: undo.iter().map(|c| paths::show(&c.path)).collect(),
            });
        }
        let Some(Claim {
            path: vud,
            how,
            opened,
        }) = undo.into_iter().next()
        else {
            views.push(base);
            continue;
        };
        let top = opened.map_err(|source| Error::UndoMismatch {
            path: vud.clone(),
            source_disk: disk.source.clone(),
            source: Box::new(source),
        })?;
        disk.undo = Some(UndoDisk {
            path: paths::show(&vud),
            how_found: how,
            choice: s.undo,
            layer: top.layer,
        });
        views.push(if s.undo == UndoChoice::Merge {
            top.view
        } else {
            base
        });
    }

    // Sizes, measurement, names.
    let mut need = 0u64;
    for (i, (disk, view)) in disks.iter_mut().zip(views).enumerate() {
        disk.guest_size = view.size;
        disk.view = view.disk;
        let top = disk
            .undo
            .as_ref()
            .filter(|u| u.choice == UndoChoice::Merge)
            .map(|u| &u.layer)
            .unwrap_or(&disk.chain[0]);
        let (note, chs) = size_note(top);
        disk.size_note = note;
        disk.chs_sized = chs;
        let data = view.data_bytes.map_err(|source| Error::Allocation {
            source_disk: disk.source.clone(),
            source,
        })?;
        disk.data_bytes = data;
        disk.need_bytes = estimate_output(s, disk.guest_size, data);
        need += disk.need_bytes;
        disk.output = format!("{file_stem}-disk{i}.{}", s.format.ext());
    }

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
        saved_state: facts.saved_state.iter().map(|p| paths::show(p)).collect(),
        unmatched_undo: unmatched,
        toml: format!("{file_stem}.toml"),
        need_bytes: need,
        warnings,
        vm,
    };
    if facts.target.exists && !facts.target.is_dir {
        return Err(Error::TargetNotDirectory {
            target: s.to.clone(),
        });
    }
    let existing: Vec<String> = plan
        .outputs()
        .into_iter()
        .filter(|o| facts.target.entries.contains(std::ffi::OsStr::new(o)))
        .collect();
    if !existing.is_empty() {
        return Err(Error::TargetHasOutputs {
            target: s.to.clone(),
            existing,
        });
    }
    Ok(plan)
}

/// An undo disk claiming a disk by its identity.
struct Claim {
    path: PathBuf,
    how: String,
    opened: Result<UndoOpened, disk::Error>,
}

/// The output file size for `data` bytes of data in a `size`-byte disk, bounded from below:
/// a layout we cannot measure still needs its data.
fn estimate_output(s: &Settings, size: u64, data: u64) -> u64 {
    match s.format {
        OutFormat::Vhdx => {
            let mut o = vhdx::CreateOptions::new(vhdx::CreateKind::Dynamic, size);
            o.physical_sector_size = s.physical_sector_size;
            vhdx::measure(size, data, &o).0
        }
        OutFormat::Vhd => {
            let o = vhd::CreateOptions::new(vhd::CreateKind::Dynamic, size);
            vhd::measure(size, data, &o).0
        }
    }
    .max(data + (4 << 20))
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

#[cfg(test)]
mod tests {
    //! The decisions alone, on made-up facts: no file is read or written.

    use std::collections::BTreeSet;

    use super::*;
    use crate::paths::Candidate;
    use crate::probe::{FoundDisk, NamedUndo, OpenedChain, TargetFacts, UndoFacts};
    use crate::vmc::{Drive, UndoSettings};
    use crate::xml::TextEncoding;

    const BASE_ID: Guid = Guid::from_rfc_bytes([1; 16]);
    const CHS_SIZE: u64 = 20_959_232;
    const CURRENT_SIZE: u64 = 20 << 20;

    fn settings(undo: UndoChoice) -> Settings {
        Settings {
            vmc: "/vms/xp/xp.vmc".into(),
            to: "/out".into(),
            format: OutFormat::Vhdx,
            undo,
            maps: Vec::new(),
            size_rule: vhd::SizeRule::Auto,
            physical_sector_size: 4096,
        }
    }

    fn drive(kind: DriveKind, channel: u32, path: &str) -> Drive {
        Drive {
            bus: Bus::Ide,
            channel,
            slot: 0,
            kind,
            absolute: Some(format!("C:\\VMs\\xp\\{path}")),
            relative: Some(format!(".\\{path}")),
            undo_absolute: None,
            undo_relative: None,
        }
    }

    /// A VM named "XP 2007" with a hard disk on IDE 0:0 and a CD drive on IDE 1:0.
    fn vm() -> Vmc {
        Vmc {
            name: "XP 2007".into(),
            encoding: TextEncoding::Utf16Le,
            version: Some("2.0".into()),
            memory_mib: 512,
            cpus: 1,
            drives: vec![
                drive(DriveKind::HardDisk, 0, "xp.vhd"),
                drive(DriveKind::CdDvd, 1, "cd.iso"),
            ],
            nics: Vec::new(),
            undo: UndoSettings {
                enabled: Some(true),
                default_action: Some(1),
            },
            warnings: Vec::new(),
        }
    }

    /// A Virtual PC layer: CHS-sized, its current_size larger.
    fn layer(path: &str, id: Option<Guid>) -> LayerInfo {
        LayerInfo {
            path: path.into(),
            format: "vhd",
            disk_type: Some("dynamic".into()),
            unique_id: id,
            parent_unique_id: None,
            creator_app: Some("vpc ".into()),
            creator_host_os: Some("Wi2k".into()),
            virtual_size: CHS_SIZE,
            size_rule: Some("chs".into()),
            current_size: Some(CURRENT_SIZE),
            chs_size: Some(CHS_SIZE),
            geometry: Some("602/4/17".into()),
            saved_state: false,
        }
    }

    fn view(data: Result<u64, disk::Error>) -> ViewFacts {
        ViewFacts {
            size: CHS_SIZE,
            data_bytes: data,
            disk: None,
        }
    }

    fn candidate(p: &str) -> Candidate {
        Candidate {
            path: p.into(),
            how: format!("relative path {p:?} from the .vmc's folder"),
        }
    }

    /// The disk found and opened, holding 3 MiB of data.
    fn found_disk() -> DiskFacts {
        DiskFacts {
            drive: 0,
            candidates: vec![candidate("/vms/xp/xp.vhd")],
            found: Some(FoundDisk {
                candidate: candidate("/vms/xp/xp.vhd"),
                chain: Ok(OpenedChain {
                    layers: vec![layer("/vms/xp/xp.vhd", Some(BASE_ID))],
                    unique_id: Some(BASE_ID),
                    view: view(Ok(3 << 20)),
                }),
            }),
        }
    }

    /// An undo disk claiming the disk of drive 0; merged it holds 5 MiB of data.
    fn undo_disk(path: &str, merged_data: Result<u64, disk::Error>) -> UndoFacts {
        UndoFacts {
            path: path.into(),
            how: "found in /vms/xp".into(),
            parent_id: Ok(BASE_ID),
            claims: Some((
                0,
                Ok(UndoOpened {
                    layer: layer(path, None),
                    view: view(merged_data),
                }),
            )),
        }
    }

    fn facts() -> Facts {
        Facts {
            disks: vec![found_disk()],
            undo_disks: vec![undo_disk("/vms/xp/xp.vud", Ok(5 << 20))],
            ..Facts::default()
        }
    }

    #[test]
    fn merge_converts_the_merged_view_and_discard_the_base() {
        let p = plan(&settings(UndoChoice::Merge), vm(), facts()).unwrap();
        assert_eq!(p.file_stem, "XP_2007");
        assert_eq!(p.toml, "XP_2007.toml");
        assert_eq!(p.disks.len(), 1);
        let d = &p.disks[0];
        assert_eq!(d.output, "XP_2007-disk0.vhdx");
        assert_eq!(d.source, "/vms/xp/xp.vhd");
        assert_eq!(d.guest_size, CHS_SIZE);
        assert!(d.chs_sized, "{}", d.size_note);
        assert!(d.size_note.contains("never visible"), "{}", d.size_note);
        assert_eq!(d.data_bytes, 5 << 20, "the merged view's data");
        assert_eq!(d.undo.as_ref().unwrap().choice, UndoChoice::Merge);
        assert!(p.need_bytes >= (5 << 20) + (4 << 20));
        assert_eq!(p.skipped_drives.len(), 1);
        assert_eq!(p.skipped_drives[0].kind, DriveKind::CdDvd);
        assert!(!p.undecided());
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);

        let p = plan(&settings(UndoChoice::Discard), vm(), facts()).unwrap();
        assert_eq!(p.disks[0].data_bytes, 3 << 20, "the base view's data");
        let p = plan(&settings(UndoChoice::Undecided), vm(), facts()).unwrap();
        assert!(p.undecided());
    }

    #[test]
    fn an_unreadable_allocation_only_matters_for_the_view_converted() {
        let mut f = facts();
        f.undo_disks = vec![undo_disk("/vms/xp/xp.vud", Err(disk::Error::ReadOnly))];
        assert!(plan(&settings(UndoChoice::Discard), vm(), f).is_ok());
        let mut f = facts();
        f.undo_disks = vec![undo_disk("/vms/xp/xp.vud", Err(disk::Error::ReadOnly))];
        let e = plan(&settings(UndoChoice::Merge), vm(), f).unwrap_err();
        assert!(matches!(e, Error::Allocation { .. }), "{e}");
    }

    #[test]
    fn a_missing_disk_names_what_was_tried_and_suggests_a_path_map() {
        let mut f = facts();
        f.disks[0].found = None;
        let e = plan(&settings(UndoChoice::Merge), vm(), f).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, Error::DiskMissing { .. }), "{m}");
        assert!(m.contains("ide 0:0") && m.contains("/vms/xp/xp.vhd"), "{m}");
        assert!(m.contains("--path-map"), "{m}");
        // With a map given, no hint.
        let mut s = settings(UndoChoice::Merge);
        s.maps = vec![PathMap::parse("C:\\VMs=/elsewhere").unwrap()];
        let mut f = facts();
        f.disks[0].found = None;
        let m = plan(&s, vm(), f).unwrap_err().to_string();
        assert!(!m.contains("--path-map"), "{m}");
    }

    #[test]
    fn undo_disks_are_matched_by_identity_only() {
        // Two undo disks claim the same disk: refused.
        let mut f = facts();
        f.undo_disks.push(undo_disk("/vms/xp/copy.vud", Ok(1)));
        let e = plan(&settings(UndoChoice::Merge), vm(), f).unwrap_err();
        assert!(e.to_string().contains("2 undo disks"), "{e}");
        // One claiming no disk and one unreadable: left over, with their reasons.
        let mut f = facts();
        f.undo_disks = vec![
            UndoFacts {
                claims: None,
                ..undo_disk("/vms/xp/other.vud", Ok(1))
            },
            UndoFacts {
                parent_id: Err(Error::NotDifferencing {
                    path: "/vms/xp/junk.vud".into(),
                }),
                claims: None,
                ..undo_disk("/vms/xp/junk.vud", Ok(1))
            },
        ];
        f.named_undo.push(NamedUndo {
            drive: 0,
            named: "C:\\VMs\\xp\\gone.vud".into(),
            exists: false,
        });
        let p = plan(&settings(UndoChoice::Undecided), vm(), f).unwrap();
        assert!(p.disks[0].undo.is_none());
        assert!(!p.undecided());
        assert_eq!(p.disks[0].data_bytes, 3 << 20);
        let reasons: Vec<&str> = p.unmatched_undo.iter().map(|l| l.reason.as_str()).collect();
        assert!(reasons[0].contains("matches no disk"), "{reasons:?}");
        assert!(reasons[1].contains("not a differencing VHD"), "{reasons:?}");
        assert!(
            p.warnings.iter().any(|w| w.contains("gone.vud")),
            "{:?}",
            p.warnings
        );
        assert!(p.warnings.iter().any(|w| w.contains("no pending .vud")));
    }

    #[test]
    fn outputs_are_never_planned_over_existing_files() {
        let mut f = facts();
        f.target = TargetFacts {
            exists: true,
            is_dir: true,
            entries: BTreeSet::from(["report.md".into(), "unrelated".into()]),
        };
        let e = plan(&settings(UndoChoice::Merge), vm(), f).unwrap_err();
        assert!(
            matches!(&e, Error::TargetHasOutputs { existing, .. } if existing == &["report.md"])
        );
        let mut f = facts();
        f.target.exists = true;
        let e = plan(&settings(UndoChoice::Merge), vm(), f).unwrap_err();
        assert!(matches!(e, Error::TargetNotDirectory { .. }), "{e}");
    }
}

//! The probing step: everything a migration needs to know from the file system, collected
//! into plain values ([`Facts`]) for [`crate::plan()`] to decide on. It finds the disks a `.vmc`
//! names, opens their chains and undo disks read-only, measures the data in use, and lists
//! saved-state files and the target directory. Nothing here decides or fails: a file that
//! cannot be opened is a fact (its error), for the plan to report in its order.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use disk::{BlockDevice, Disk, Guid};

use crate::paths::{self, Candidate};
use crate::plan::{LayerInfo, Settings};
use crate::vmc::{DriveKind, Vmc};
use crate::Error;

/// What the file system holds for one VM.
#[derive(Debug, Default)]
pub struct Facts {
    /// One entry per hard disk of the `.vmc`.
    pub disks: Vec<DiskFacts>,
    /// Undo disks the `.vmc` names per drive, and whether the file exists.
    pub named_undo: Vec<NamedUndo>,
    /// Every `.vud` found (named by the `.vmc`, or lying in the VM's or a disk's folder), in
    /// path order, each listed once.
    pub undo_disks: Vec<UndoFacts>,
    /// `.vsv` saved-state files in the `.vmc`'s folder.
    pub saved_state: Vec<PathBuf>,
    pub target: TargetFacts,
}

/// Where one hard disk of the `.vmc` was looked for, and what was found.
#[derive(Debug)]
pub struct DiskFacts {
    /// Index into [`Vmc::drives`].
    pub drive: usize,
    /// The local files the `.vmc` entry may mean, best first.
    pub candidates: Vec<Candidate>,
    /// The first candidate that exists, and its chain opened; None when none exists.
    pub found: Option<FoundDisk>,
}

#[derive(Debug)]
pub struct FoundDisk {
    pub candidate: Candidate,
    pub chain: Result<OpenedChain, disk::Error>,
}

/// A disk's chain, opened.
#[derive(Debug)]
pub struct OpenedChain {
    /// Top first (a `.vhd` that is itself differencing lists its parents).
    pub layers: Vec<LayerInfo>,
    pub unique_id: Option<Guid>,
    pub view: ViewFacts,
}

/// A view a disk could be converted from (its chain, or its chain merged with an undo disk).
#[derive(Debug)]
pub struct ViewFacts {
    /// Bytes the guest sees.
    pub size: u64,
    /// Bytes of data in it (the rest reads as zeros), or why its allocation is unreadable.
    pub data_bytes: Result<u64, disk::Error>,
    /// The opened view, for the apply step (None when the facts are made up in tests).
    pub disk: Option<Disk>,
}

/// An undo disk named by the `.vmc` for a drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedUndo {
    /// Index into [`Vmc::drives`].
    pub drive: usize,
    /// The path as the `.vmc` writes it.
    pub named: String,
    pub exists: bool,
}

/// One `.vud` file.
#[derive(Debug)]
pub struct UndoFacts {
    pub path: PathBuf,
    /// How it was found (`named by the .vmc (...)`, `found in DIR`).
    pub how: String,
    /// The parent identity it records, or why it is not usable as an undo disk.
    pub parent_id: Result<Guid, Error>,
    /// The disk whose identity it claims ([`Vmc::drives`] index), and the undo disk opened
    /// over that disk's chain.
    pub claims: Option<(usize, Result<UndoOpened, disk::Error>)>,
}

#[derive(Debug)]
pub struct UndoOpened {
    pub layer: LayerInfo,
    /// The merged view (undo disk over its disk's chain).
    pub view: ViewFacts,
}

/// The target directory as it is before the migration.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TargetFacts {
    pub exists: bool,
    pub is_dir: bool,
    /// Names already in it.
    pub entries: BTreeSet<OsString>,
}

/// Looks at the file system for everything `vm` refers to. Opens files read-only; writes
/// nothing.
pub fn probe(s: &Settings, vm: &Vmc) -> Facts {
    let vmc_dir = vmc_dir(&s.vmc);
    let opts = open_opts(s);
    let mut facts = Facts::default();

    for (i, d) in vm.drives.iter().enumerate() {
        if d.kind != DriveKind::HardDisk {
            continue;
        }
        let candidates = paths::candidates(
            d.absolute.as_deref(),
            d.relative.as_deref(),
            &vmc_dir,
            &s.maps,
        );
        let found = candidates
            .iter()
            .find(|c| c.path.is_file())
            .map(|c| FoundDisk {
                candidate: c.clone(),
                chain: open_chain(&c.path, &opts),
            });
        facts.disks.push(DiskFacts {
            drive: i,
            candidates,
            found,
        });
    }

    // Undo disks: named by the .vmc, or lying in the VM's folder or next to a disk.
    let mut vud_files: BTreeMap<PathBuf, (PathBuf, String)> = BTreeMap::new();
    for (i, d) in vm.drives.iter().enumerate() {
        if d.kind != DriveKind::HardDisk || (d.undo_absolute.is_none() && d.undo_relative.is_none())
        {
            continue;
        }
        let c = paths::candidates(
            d.undo_absolute.as_deref(),
            d.undo_relative.as_deref(),
            &vmc_dir,
            &s.maps,
        );
        let found = c.iter().find(|c| c.path.is_file());
        if let Some(f) = found {
            vud_files
                .entry(canonical(&f.path))
                .or_insert((f.path.clone(), format!("named by the .vmc ({})", f.how)));
        }
        facts.named_undo.push(NamedUndo {
            drive: i,
            named: d
                .undo_absolute
                .as_deref()
                .or(d.undo_relative.as_deref())
                .unwrap_or("")
                .to_string(),
            exists: found.is_some(),
        });
    }
    let bases: Vec<(usize, &Path, &OpenedChain)> = facts
        .disks
        .iter()
        .filter_map(|d| {
            let f = d.found.as_ref()?;
            Some((d.drive, f.candidate.path.as_path(), f.chain.as_ref().ok()?))
        })
        .collect();
    let mut dirs = vec![vmc_dir.clone()];
    for (_, p, _) in &bases {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dirs.iter().any(|x| canonical(x) == canonical(dir)) {
                dirs.push(dir.to_path_buf());
            }
        }
    }
    for dir in &dirs {
        for p in scan_ext(dir, "vud").into_iter().filter(|p| p.is_file()) {
            vud_files
                .entry(canonical(&p))
                .or_insert((p, format!("found in {}", dir.display())));
        }
    }
    for (path, how) in vud_files.into_values() {
        let parent_id = undo_parent_id(&path);
        let claims = parent_id.as_ref().ok().and_then(|id| {
            let (drive, base_path, _) = bases.iter().find(|(_, _, c)| c.unique_id == Some(*id))?;
            Some((*drive, open_undo(&path, base_path, &opts)))
        });
        facts.undo_disks.push(UndoFacts {
            path,
            how,
            parent_id,
            claims,
        });
    }

    facts.saved_state = scan_ext(&vmc_dir, "vsv");
    facts.target = target(&s.to);
    facts
}

/// The `.vmc`'s folder, absolute (relative `.vmc` paths name the current directory's files).
fn vmc_dir(vmc: &Path) -> PathBuf {
    let dir = match vmc.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::path::absolute(&dir).unwrap_or(dir)
}

fn open_opts(s: &Settings) -> chain::OpenOptions {
    chain::OpenOptions {
        vhd_size_rule: s.size_rule,
        ..chain::OpenOptions::read_only()
    }
}

fn open_chain(path: &Path, opts: &chain::OpenOptions) -> Result<OpenedChain, disk::Error> {
    let base = chain::open(path, opts)?;
    let layers = chain::layers(&base)
        .iter()
        .map(|l| layer_info(l.as_ref()))
        .collect();
    Ok(OpenedChain {
        layers,
        unique_id: base.unique_id(),
        view: view_facts(base),
    })
}

/// Opens undo disk `vud` with `base` as its parent (its own locators name Windows paths).
fn open_undo(
    vud: &Path,
    base: &Path,
    opts: &chain::OpenOptions,
) -> Result<UndoOpened, disk::Error> {
    let opts = chain::OpenOptions {
        parent_override: Some(base.to_path_buf()),
        ..opts.clone()
    };
    let top = chain::open(vud, &opts)?;
    Ok(UndoOpened {
        layer: layer_info(top.as_ref()),
        view: view_facts(top),
    })
}

fn view_facts(d: Disk) -> ViewFacts {
    let mut data = 0u64;
    let data_bytes = disk::map::for_each_extent(d.as_ref(), |e| {
        if e.data {
            data += e.length;
        }
        Ok(())
    })
    .map(|()| data);
    ViewFacts {
        size: d.size(),
        data_bytes,
        disk: Some(d),
    }
}

pub fn layer_info(d: &dyn BlockDevice) -> LayerInfo {
    let f = d.facts();
    LayerInfo {
        path: d.path().map(paths::show).unwrap_or_default(),
        format: d.format(),
        disk_type: f.disk_type.map(str::to_string),
        unique_id: d.unique_id(),
        parent_unique_id: d.parent_link().map(|l| l.expected_id),
        creator_app: f.creator_app,
        creator_host_os: f.creator_host_os,
        virtual_size: d.size(),
        size_rule: f.size_rule.map(str::to_string),
        current_size: f.current_size,
        chs_size: f.chs_size,
        geometry: f.geometry.map(|(c, h, s)| format!("{c}/{h}/{s}")),
        saved_state: f.saved_state,
    }
}

/// The parent identity a `.vud` (a differencing VHD) was made against, without opening parents.
fn undo_parent_id(p: &Path) -> Result<Guid, Error> {
    let d = chain::open(
        p,
        &chain::OpenOptions {
            no_parent: true,
            format: Some(chain::Format::Vhd),
            ..chain::OpenOptions::read_only()
        },
    )
    .map_err(|source| Error::ReadUndo {
        path: p.to_path_buf(),
        source,
    })?;
    d.parent_link()
        .map(|l| l.expected_id)
        .ok_or_else(|| Error::NotDifferencing {
            path: p.to_path_buf(),
        })
}

fn target(to: &Path) -> TargetFacts {
    let is_dir = to.is_dir();
    let entries = if is_dir {
        std::fs::read_dir(to)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default()
    } else {
        BTreeSet::new()
    };
    TargetFacts {
        exists: to.exists(),
        is_dir,
        entries,
    }
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Files with extension `ext` (any case) directly in `dir`, sorted.
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

//! Moving a Virtual PC 2004/2007 or Virtual Server 2005 VM to Viridian.
//!
//! A migration runs in steps, each its own module:
//!
//! 1. [`vmc::load`]: read the `.vmc` (UTF-16 or UTF-8 XML, [`xml`]) into a [`Vmc`].
//! 2. [`probe::probe`]: look at the file system: find every disk the `.vmc` names (absolute
//!    paths through `--path-map`, relative paths from the `.vmc`'s folder, [`paths`]), open its
//!    chain read-only (identities verified by `chain::open`), find `.vud` undo disks and the
//!    disks they claim by parent identity, measure the data in use, list saved-state files and
//!    the target directory. The result, [`Facts`], is plain values.
//! 3. [`plan::plan`]: decide, without touching the file system: which view of each disk to
//!    convert (base, or merged with its undo disk), the size the guest saw (CHS-sized Virtual
//!    PC disks keep their CHS size), output names, the space needed, what is dropped and why.
//! 4. [`apply::apply`]: write the converted disks (VHDX with 1 MiB blocks, or VHD), the VM
//!    description for `viridian run` and `report.md`/`report.json` under the target directory,
//!    never over an existing file; a failure removes what this run wrote.
//!
//! [`report`] renders a plan (dry run) or its outcome. Facts about the file formats are in the
//! repository's `docs/vmc.md`.

#![forbid(unsafe_code)]

pub mod apply;
mod error;
pub mod paths;
pub mod plan;
pub mod probe;
pub mod report;
pub mod vmc;
pub mod xml;

pub use apply::{apply, free_space, Converted, Observer};
pub use error::{one_line, Error, Result};
pub use paths::PathMap;
pub use plan::{plan, DiskPlan, OutFormat, Plan, Settings, UndoChoice};
pub use probe::{probe, Facts};
pub use report::{Outcome, Report};
pub use vmc::Vmc;

/// Plans a migration: probes the file system for `vm`'s disks, then decides.
pub fn plan_migration(s: &Settings, vm: Vmc) -> Result<Plan> {
    let facts = probe(s, &vm);
    plan(s, vm, facts)
}

//! What the control socket's commands do to a running VM: LUN hot-plug and media changes on
//! the synthetic SCSI controller, pausing the vCPUs, quitting; and the events that come back.
//!
//! [`BlockTable`] is the block-device side over a [`ScsiController`] and needs no VM (tests
//! drive it directly); [`VmControl`] ties it, the vCPU pause gate and the stop signal together
//! as the [`Machine`] behind [`crate::qmp`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use storvsc_backend::{CdromError, Lun, ScsiCdrom, ScsiController, ScsiDisk, StorvscDevice};

use crate::console::{StopReason, StopSignal};
use crate::hv::lock;
use crate::qmp::{Command, DeviceAdd, Driver, Events, Machine, QmpError, UndoEnd};
use crate::shutdown_ic::ShutdownIc;
use crate::stats::{CountingDisk, DiskCounters};
use crate::vcpu::PauseGate;
use crate::vmbus_glue::VmbusTarget;

/// Opens an image for a LUN: (path, format or None to detect, read-only) → disk. The CLI gives
/// one that knows every format; [`open_raw`] is the fallback.
pub type ImageOpener = fn(&Path, Option<&str>, bool) -> Result<disk::Disk, String>;

/// An undo session over a hot-plugged LUN's image (the CLI's wraps `chain::UndoDisk`).
pub trait UndoSession: Send + std::fmt::Debug {
    /// Ends the session. Every user of its disk must be gone (the LUN is off the bus and its
    /// image flushed and dropped). Ok is what was done, for the log.
    fn end(self: Box<Self>, how: UndoEnd) -> Result<String, String>;
}

/// Opens an image in undo mode: (path, format or None to detect) → the disk the guest gets
/// (writes go to a child) and the session that ends it.
pub type UndoOpener = fn(&Path, Option<&str>) -> Result<(disk::Disk, Box<dyn UndoSession>), String>;

/// Opens raw images only.
pub fn open_raw(path: &Path, format: Option<&str>, read_only: bool) -> Result<disk::Disk, String> {
    if format.is_some_and(|f| f != "raw") {
        return Err(format!(
            "{}: format {:?} is not supported here (raw only)",
            path.display(),
            format.unwrap_or_default()
        ));
    }
    let access = if read_only {
        disk::Access::ReadOnly
    } else {
        disk::Access::ReadWrite
    };
    disk::RawDisk::open(path, access)
        .map(|d| disk::Disk::new(Arc::new(d)))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// What the table knows of one LUN beyond the controller.
#[derive(Debug)]
struct Entry {
    lun: u8,
    cdrom: bool,
    /// Counters of the current image (a DVD's medium changes them).
    counters: Option<Arc<DiskCounters>>,
    /// Errors already reported as BLOCK_IO_ERROR (reads, writes).
    reported_errors: (u64, u64),
    /// Added by `device_add` (the VM's end releases it; boot LUNs are the VM's own).
    hot: bool,
    /// The undo session of an undo LUN.
    undo: Option<Box<dyn UndoSession>>,
}

/// A unit built by [`BlockTable::prepare_add`], not yet on the bus.
pub struct Prepared {
    unit: Lun,
    counters: Option<Arc<DiskCounters>>,
    undo: Option<Box<dyn UndoSession>>,
}

/// What [`BlockTable::device_del`] took off the bus: release it with [`Removed::release`].
#[derive(Debug)]
pub struct Removed {
    image: Option<disk::Disk>,
    undo: Option<Box<dyn UndoSession>>,
}

impl Removed {
    /// Flushes and closes the image; an undo session ends as `how` says. Ok says what
    /// happened to an undo session.
    pub fn release(self, how: UndoEnd) -> Result<Option<String>, String> {
        match self.undo {
            None => release(self.image).map(|()| None),
            Some(u) => {
                // The session closes the child itself; here only flush and let go of it.
                if let Some(d) = self.image {
                    d.flush().map_err(|e| format!("flushing: {e}"))?;
                }
                u.end(how).map(Some)
            }
        }
    }
}

/// The LUNs by device id, and the operations on them.
#[derive(Debug)]
pub struct BlockTable {
    entries: BTreeMap<String, Entry>,
    epoch: Instant,
    opener: ImageOpener,
    undo_opener: Option<UndoOpener>,
}

fn entry_not_found(id: &str) -> QmpError {
    QmpError::not_found(format!("Device '{id}' not found"))
}

/// Flushes and closes an image taken off the bus; errors are reported, not hidden.
fn release(image: Option<disk::Disk>) -> Result<(), String> {
    if let Some(d) = image {
        d.flush().map_err(|e| format!("flushing: {e}"))?;
        d.close().map_err(|e| format!("closing: {e}"))?;
    }
    Ok(())
}

impl BlockTable {
    pub fn new(epoch: Instant, opener: ImageOpener) -> Self {
        BlockTable {
            entries: BTreeMap::new(),
            epoch,
            opener,
            undo_opener: None,
        }
    }

    /// Lets `device_add` open disks in undo mode.
    pub fn with_undo(mut self, opener: Option<UndoOpener>) -> Self {
        self.undo_opener = opener;
        self
    }

    /// Records a LUN that was there at boot.
    pub fn register(
        &mut self,
        id: &str,
        lun: u8,
        cdrom: bool,
        counters: Option<Arc<DiskCounters>>,
    ) {
        self.entries.insert(
            id.to_string(),
            Entry {
                lun,
                cdrom,
                counters,
                reported_errors: (0, 0),
                hot: false,
                undo: None,
            },
        );
    }

    fn open(
        &self,
        path: &Path,
        format: Option<&str>,
        read_only: bool,
    ) -> Result<(disk::Disk, Arc<DiskCounters>), QmpError> {
        let d = (self.opener)(path, format, read_only).map_err(|e| could_not_open(path, e))?;
        Ok(self.counted(d))
    }

    fn counted(&self, d: disk::Disk) -> (disk::Disk, Arc<DiskCounters>) {
        let c = Arc::new(CountingDisk::new(d, self.epoch));
        let counters = c.counters.clone();
        (disk::Disk::new(c), counters)
    }

    /// `device_add`, first half: checks the id and LUN, opens the image and builds the unit,
    /// all without touching the controller (opening can take a while).
    pub fn prepare_add(&self, a: &DeviceAdd) -> Result<Prepared, QmpError> {
        if self.entries.contains_key(&a.id) {
            return Err(QmpError::generic(format!("Duplicate device ID '{}'", a.id)));
        }
        if let Some((id, _)) = self.entries.iter().find(|(_, e)| e.lun == a.lun) {
            return Err(QmpError::generic(format!(
                "LUN {} is busy (device '{id}')",
                a.lun
            )));
        }
        let mut undo = None;
        let opened = match &a.file {
            Some(f) if a.undo => {
                let opener = self
                    .undo_opener
                    .ok_or_else(|| QmpError::generic("this VM cannot open disks in undo mode"))?;
                let (d, session) =
                    opener(f, a.format.as_deref()).map_err(|e| could_not_open(f, e))?;
                undo = Some(session);
                Some(self.counted(d))
            }
            Some(f) => Some(self.open(f, a.format.as_deref(), a.read_only)?),
            None => None,
        };
        let counters = opened.as_ref().map(|o| o.1.clone());
        let serial = format!("viridian-{}", a.id);
        let unit: Lun = match (a.driver, opened) {
            (Driver::Disk, Some((d, _))) => ScsiDisk::new(d)
                .map_err(|e| QmpError::generic(format!("'{}': {e}", a.id)))?
                .with_serial(&serial)
                .into(),
            (Driver::Cdrom, Some((d, _))) => ScsiCdrom::new(d)
                .map_err(|e| QmpError::generic(format!("'{}': {e}", a.id)))?
                .with_serial(&serial)
                .into(),
            (Driver::Cdrom, None) => ScsiCdrom::empty().with_serial(&serial).into(),
            (Driver::Disk, None) => return Err(QmpError::generic("Parameter 'file' is missing")),
        };
        Ok(Prepared {
            unit,
            counters,
            undo,
        })
    }

    /// `device_add`, second half: puts the unit on the bus.
    pub fn finish_add(
        &mut self,
        a: &DeviceAdd,
        p: Prepared,
        ctl: &mut ScsiController,
    ) -> Result<Value, QmpError> {
        ctl.add_lun(a.lun, p.unit)
            .map_err(|e| QmpError::generic(format!("LUN {}: {e}", a.lun)))?;
        self.entries.insert(
            a.id.clone(),
            Entry {
                lun: a.lun,
                cdrom: a.driver == Driver::Cdrom,
                counters: p.counters,
                reported_errors: (0, 0),
                hot: true,
                undo: p.undo,
            },
        );
        Ok(json!({}))
    }

    /// `device_add` in one step.
    pub fn device_add(
        &mut self,
        a: &DeviceAdd,
        ctl: &mut ScsiController,
    ) -> Result<Value, QmpError> {
        let p = self.prepare_add(a)?;
        self.finish_add(a, p, ctl)
    }

    /// `device_del`: the LUN goes off the bus, its image is flushed and closed. `undo_end` is
    /// only for undo LUNs: given for another LUN it is an error and nothing changes.
    pub fn device_del(
        &mut self,
        id: &str,
        undo_end: Option<UndoEnd>,
        ctl: &mut ScsiController,
    ) -> Result<Removed, QmpError> {
        let e = self.entries.get(id).ok_or_else(|| entry_not_found(id))?;
        if undo_end.is_some() && e.undo.is_none() {
            return Err(QmpError::generic(format!(
                "Device '{id}' is not an undo LUN ('undo-end' is for LUNs added with undo=true)"
            )));
        }
        let unit = ctl
            .remove_lun(e.lun)
            .ok_or_else(|| QmpError::generic(format!("LUN {} is not on the bus", e.lun)))?;
        let e = self.entries.remove(id).expect("looked up above");
        let image = unit.image().cloned();
        drop(unit);
        Ok(Removed {
            image,
            undo: e.undo,
        })
    }

    /// The end of the VM: takes every hot-plugged LUN off the bus and releases it (undo
    /// sessions end as `how` says). Returns what happened, one line per LUN.
    pub fn release_hot(&mut self, how: UndoEnd, ctl: &mut ScsiController) -> Vec<String> {
        let hot: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.hot)
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        for id in hot {
            let line = match self.device_del(&id, None, ctl) {
                Ok(r) => match r.release(how) {
                    Ok(Some(done)) => format!("'{id}': {done}"),
                    Ok(None) => format!("'{id}': flushed and closed"),
                    Err(e) => format!("'{id}': {e}"),
                },
                Err(e) => format!("'{id}': {}", e.desc),
            };
            out.push(line);
        }
        out
    }

    fn cdrom<'c>(
        &self,
        id: &str,
        ctl: &'c mut ScsiController,
    ) -> Result<&'c mut ScsiCdrom, QmpError> {
        let e = self.entries.get(id).ok_or_else(|| entry_not_found(id))?;
        if !e.cdrom {
            return Err(QmpError::generic(format!("Device '{id}' is not removable")));
        }
        ctl.lun_mut(e.lun)
            .and_then(Lun::as_cdrom_mut)
            .ok_or_else(|| entry_not_found(id))
    }

    /// `eject`: opens the tray and takes the medium out (returned for release).
    pub fn eject(
        &mut self,
        id: &str,
        force: bool,
        ctl: &mut ScsiController,
    ) -> Result<Option<disk::Disk>, QmpError> {
        let cd = self.cdrom(id, ctl)?;
        let old = cd.host_eject(force).map_err(|e| locked(id, e))?;
        if let Some(e) = self.entries.get_mut(id) {
            e.counters = None;
        }
        Ok(old)
    }

    /// Opens a new medium for `blockdev-change-medium` (outside the controller lock).
    pub fn open_medium(
        &self,
        id: &str,
        file: &Path,
        format: Option<&str>,
    ) -> Result<(disk::Disk, Arc<DiskCounters>), QmpError> {
        let e = self.entries.get(id).ok_or_else(|| entry_not_found(id))?;
        if !e.cdrom {
            return Err(QmpError::generic(format!("Device '{id}' is not removable")));
        }
        self.open(file, format, true)
    }

    /// `blockdev-change-medium` with an opened medium: the old one is returned for release.
    pub fn change_medium(
        &mut self,
        id: &str,
        medium: (disk::Disk, Arc<DiskCounters>),
        force: bool,
        ctl: &mut ScsiController,
    ) -> Result<Option<disk::Disk>, QmpError> {
        let cd = self.cdrom(id, ctl)?;
        let old = cd.host_insert(medium.0, force).map_err(|e| locked(id, e))?;
        if let Some(e) = self.entries.get_mut(id) {
            e.counters = Some(medium.1);
            e.reported_errors = (0, 0);
        }
        Ok(old)
    }

    /// `query-block`.
    pub fn query(&self, ctl: &ScsiController) -> Value {
        let mut out: Vec<(u8, Value)> = Vec::new();
        for (id, e) in &self.entries {
            let unit = ctl.lun(e.lun);
            let image = unit.and_then(Lun::image);
            let mut v = json!({
                "device": id,
                "qdev": id,
                "lun": e.lun,
                "type": if e.cdrom { "cd" } else { "hd" },
                "removable": e.cdrom,
            });
            if let Some(Lun::Cdrom(c)) = unit {
                v["locked"] = json!(c.locked());
                v["tray_open"] = json!(c.tray_open());
                let f = c.media_events_fetched();
                v["media-events-fetched"] = json!({
                    "eject-request": f.eject_request,
                    "new-media": f.new_media,
                    "media-removal": f.media_removal,
                });
            } else {
                v["locked"] = json!(false);
            }
            if let Some(d) = image {
                v["inserted"] = json!({
                    "file": disk::BlockDevice::path(d).map(|p| p.display().to_string()),
                    "format": d.format(),
                    "ro": d.read_only() || e.cdrom,
                    "virtual-size": d.size(),
                });
            }
            if let Some(c) = &e.counters {
                let s = c.snapshot();
                v["stats"] = json!({
                    "rd_bytes": s.read_bytes,
                    "wr_bytes": s.write_bytes,
                    "rd_operations": s.reads,
                    "wr_operations": s.writes,
                    "flush_operations": s.flushes,
                    "failed_rd_operations": s.read_errors,
                    "failed_wr_operations": s.write_errors,
                });
            }
            out.push((e.lun, v));
        }
        out.sort_by_key(|x| x.0);
        Value::Array(out.into_iter().map(|x| x.1).collect())
    }

    /// New I/O errors since the last call, as BLOCK_IO_ERROR data.
    fn new_errors(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        for (id, e) in self.entries.iter_mut() {
            let Some(c) = &e.counters else { continue };
            let s = c.snapshot();
            for (op, now, seen) in [
                ("read", s.read_errors, &mut e.reported_errors.0),
                ("write", s.write_errors, &mut e.reported_errors.1),
            ] {
                if now > *seen {
                    *seen = now;
                    out.push(json!({
                        "device": id, "node-name": id, "operation": op,
                        "action": "report", "nospace": false,
                        "reason": format!("{now} failed {op} request(s) so far"),
                    }));
                }
            }
        }
        out
    }

    /// The id of the DVD drive at `lun`.
    fn id_of(&self, lun: u8) -> Option<&str> {
        self.entries
            .iter()
            .find(|(_, e)| e.lun == lun)
            .map(|(id, _)| id.as_str())
    }
}

fn could_not_open(path: &Path, e: String) -> QmpError {
    QmpError::generic(format!("Could not open '{}': {e}", path.display()))
}

fn locked(id: &str, e: CdromError) -> QmpError {
    match e {
        CdromError::Locked => QmpError::generic(format!(
            "Device '{id}' is locked and force was not specified, wait for tray to open and try again"
        )),
        e => QmpError::generic(format!("'{id}': {e}")),
    }
}

pub(crate) fn no_controller() -> QmpError {
    QmpError::generic("this VM has no SCSI controller")
}

/// The [`Machine`] of a running VM.
pub struct VmControl {
    pub(crate) target: Arc<VmbusTarget>,
    pub(crate) table: Mutex<BlockTable>,
    pub(crate) pause: Arc<PauseGate>,
    pub(crate) stop: Arc<StopSignal>,
    pub(crate) events: Arc<Events>,
}

impl VmControl {
    /// The end of the VM (after the vCPUs stopped): releases the hot-plugged LUNs.
    pub fn finish(&self, how: UndoEnd) -> Vec<String> {
        let mut table = lock(&self.table);
        self.with_ctl(|ctl| table.release_hot(how, ctl))
            .unwrap_or_default()
    }

    fn with_ctl<R>(&self, f: impl FnOnce(&mut ScsiController) -> R) -> Result<R, QmpError> {
        self.target
            .with_storvsc(|d: &mut StorvscDevice| f(d.controller_mut()))
            .ok_or_else(no_controller)
    }

    fn tray_moved(&self, id: &str, open: bool) {
        self.events.emit(
            "DEVICE_TRAY_MOVED",
            json!({"device": id, "id": id, "tray-open": open}),
        );
    }

    fn run_block(&self, cmd: Command) -> Result<Value, QmpError> {
        let mut table = lock(&self.table);
        match cmd {
            Command::QueryBlock => self.with_ctl(|ctl| table.query(ctl)),
            Command::DeviceAdd(a) => {
                let p = table.prepare_add(&a)?;
                self.with_ctl(|ctl| table.finish_add(&a, p, ctl))?
            }
            Command::DeviceDel { id, undo_end } => {
                let removed = self.with_ctl(|ctl| table.device_del(&id, undo_end, ctl))??;
                drop(table);
                let r = removed.release(undo_end.unwrap_or_default());
                self.events.emit(
                    "DEVICE_DELETED",
                    json!({"device": id, "path": format!("/machine/peripheral/{id}")}),
                );
                r.map_err(|e| {
                    QmpError::generic(format!(
                        "'{id}' was removed from the bus, but releasing it failed: {e}"
                    ))
                })?;
                Ok(json!({}))
            }
            Command::Eject { id, force } => {
                let (was_open, r) = self.with_ctl(|ctl| {
                    let was_open = table.cdrom(&id, ctl).map(|c| c.tray_open());
                    (was_open, table.eject(&id, force, ctl))
                })?;
                let old = r?;
                drop(table);
                if was_open == Ok(false) {
                    self.tray_moved(&id, true);
                }
                release(old).map_err(QmpError::generic)?;
                Ok(json!({}))
            }
            Command::ChangeMedium {
                id,
                file,
                format,
                force,
            } => {
                let medium = table.open_medium(&id, &file, format.as_deref())?;
                let (was_open, r) = self.with_ctl(|ctl| {
                    let was_open = table.cdrom(&id, ctl).map(|c| c.tray_open());
                    (was_open, table.change_medium(&id, medium, force, ctl))
                })?;
                let old = r?;
                drop(table);
                if was_open == Ok(false) {
                    self.tray_moved(&id, true);
                }
                self.tray_moved(&id, false);
                release(old).map_err(QmpError::generic)?;
                Ok(json!({}))
            }
            _ => Err(QmpError::generic("internal: not a block command")),
        }
    }
}

/// Longest a `stop` waits for the vCPUs to leave the guest.
const PAUSE_WAIT: Duration = Duration::from_secs(5);

impl Machine for VmControl {
    fn run(&self, cmd: Command) -> Result<Value, QmpError> {
        match cmd {
            Command::QueryStatus => {
                let paused = self.pause.paused();
                Ok(json!({
                    "running": !paused,
                    "singlestep": false,
                    "status": if paused { "paused" } else { "running" },
                }))
            }
            Command::Stop => {
                if !self.pause.paused() {
                    if !self.pause.pause(&self.stop, PAUSE_WAIT) {
                        return Err(QmpError::generic(
                            "the vCPUs did not stop in time (they stop at their next exit)",
                        ));
                    }
                    self.events.emit("STOP", json!({}));
                }
                Ok(json!({}))
            }
            Command::Cont => {
                if self.pause.paused() {
                    self.pause.resume();
                    self.events.emit("RESUME", json!({}));
                }
                Ok(json!({}))
            }
            Command::Quit => {
                // The VM's normal end follows: vCPUs stop, the I/O thread drains, disks flush.
                self.stop.stop(StopReason::Quit);
                self.pause.resume();
                Ok(json!({}))
            }
            Command::SystemPowerdown => {
                // Hyper-V guests are shut down through the VMBus shutdown integration
                // service (Linux: hv_utils), not ACPI. Like QEMU, the reply does not wait for
                // the guest; SHUTDOWN follows when it powers off.
                let r = self
                    .target
                    .with_shutdown_ic(|ic: &mut ShutdownIc| ic.request_shutdown())
                    .ok_or_else(|| {
                        QmpError::generic("this VM has no shutdown integration service")
                    })?;
                // (The service's errors already say what failed; no prefix twice.)
                r.map_err(QmpError::generic)?;
                Ok(json!({}))
            }
            c => self.run_block(c),
        }
    }

    fn tick(&self) {
        let mut table = lock(&self.table);
        let moves = self.with_ctl(|ctl| {
            let mut moves = Vec::new();
            for (lun, unit) in ctl.luns_mut() {
                if let Lun::Cdrom(c) = unit {
                    for open in c.take_tray_moves() {
                        moves.push((lun, open));
                    }
                }
            }
            moves
        });
        for (lun, open) in moves.unwrap_or_default() {
            if let Some(id) = table.id_of(lun) {
                let id = id.to_string();
                self.tray_moved(&id, open);
            }
        }
        for e in table.new_errors() {
            self.events.emit("BLOCK_IO_ERROR", e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn file(dir: &Path, name: &str, size: usize, fill: u8) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, vec![fill; size]).unwrap();
        p
    }

    fn add(driver: Driver, id: &str, lun: u8, file: Option<&Path>) -> DeviceAdd {
        DeviceAdd {
            driver,
            id: id.into(),
            lun,
            file: file.map(Path::to_path_buf),
            format: None,
            read_only: driver == Driver::Cdrom,
            undo: false,
        }
    }

    fn err(r: Result<impl std::fmt::Debug, QmpError>) -> String {
        r.expect_err("expected an error").desc
    }

    #[test]
    fn hot_plug_and_media_on_a_controller() {
        let dir = tempfile::tempdir().unwrap();
        let hd = file(dir.path(), "hd.img", 1 << 20, 0);
        let iso1 = file(dir.path(), "a.iso", 64 * 2048, 0xA1);
        let iso2 = file(dir.path(), "b.iso", 32 * 2048, 0xB2);
        let mut ctl = ScsiController::new();
        let mut t = BlockTable::new(Instant::now(), open_raw);
        t.device_add(&add(Driver::Disk, "d1", 1, Some(&hd)), &mut ctl)
            .unwrap();
        t.device_add(&add(Driver::Cdrom, "cd", 2, Some(&iso1)), &mut ctl)
            .unwrap();
        assert!(ctl.take_bus_changed());
        // Busy LUN, duplicate id, an image that does not open: errors, nothing changes.
        assert!(
            err(t.device_add(&add(Driver::Disk, "d2", 1, Some(&hd)), &mut ctl)).contains("busy")
        );
        assert!(
            err(t.device_add(&add(Driver::Disk, "d1", 5, Some(&hd)), &mut ctl))
                .contains("Duplicate")
        );
        let missing = dir.path().join("missing.img");
        assert!(
            err(t.device_add(&add(Driver::Disk, "d3", 3, Some(&missing)), &mut ctl))
                .contains("Could not open")
        );
        let mut vhdx = add(Driver::Disk, "d4", 4, Some(&hd));
        vhdx.format = Some("vhdx".into());
        assert!(err(t.device_add(&vhdx, &mut ctl)).contains("raw only"));
        assert_eq!(ctl.luns().count(), 2);

        let q = t.query(&ctl);
        assert_eq!(q.as_array().unwrap().len(), 2);
        assert_eq!(q[0]["device"], "d1");
        assert_eq!(q[0]["type"], "hd");
        assert_eq!(q[0]["inserted"]["virtual-size"], 1 << 20);
        assert_eq!(q[0]["inserted"]["ro"], false);
        assert_eq!(q[0]["inserted"]["format"], "raw");
        assert_eq!(q[0]["stats"]["rd_operations"], 0);
        assert_eq!(q[1]["type"], "cd");
        assert_eq!(q[1]["tray_open"], false);
        assert_eq!(q[1]["inserted"]["ro"], true);
        assert_eq!(q[1]["inserted"]["file"], iso1.display().to_string());

        // Guest reads through the LUN show in the counters.
        let mut b = vec![0u8; 2048];
        let r = ctl.execute(0, 0, 2, &[0x28, 0, 0, 0, 0, 3, 0, 0, 1, 0], &mut b);
        assert_eq!(r, storvsc_backend::Completion::Good { transferred: 2048 });
        assert!(b.iter().all(|&x| x == 0xA1));
        assert_eq!(t.query(&ctl)[1]["stats"]["rd_bytes"], 2048);

        // The guest locks the tray: eject and change fail without force.
        let mut none = Vec::new();
        ctl.execute(0, 0, 2, &[0x1E, 0, 0, 0, 1, 0], &mut none);
        assert!(err(t.eject("cd", false, &mut ctl)).contains("locked"));
        let m = t.open_medium("cd", &iso2, None).unwrap();
        assert!(err(t.change_medium("cd", m, false, &mut ctl)).contains("locked"));
        assert_eq!(t.query(&ctl)[1]["locked"], true);
        // With force the medium changes; the old one comes back to be released.
        let m = t.open_medium("cd", &iso2, None).unwrap();
        let old = t.change_medium("cd", m, true, &mut ctl).unwrap();
        assert_eq!(old.unwrap().size(), 64 * 2048);
        let q = t.query(&ctl);
        assert_eq!(q[1]["inserted"]["virtual-size"], 32 * 2048);
        assert_eq!(q[1]["stats"]["rd_bytes"], 0, "counters follow the medium");
        let old = t.eject("cd", true, &mut ctl).unwrap();
        release(old).unwrap();
        let q = t.query(&ctl);
        assert_eq!(q[1]["tray_open"], true);
        assert!(q[1].get("inserted").is_none());
        // The tray is open (the guest's lock still set): a new medium goes in without force.
        assert_eq!(q[1]["locked"], true);
        let m = t.open_medium("cd", &iso1, None).unwrap();
        assert!(t.change_medium("cd", m, false, &mut ctl).unwrap().is_none());
        assert_eq!(t.query(&ctl)[1]["tray_open"], false);
        let old = t.eject("cd", true, &mut ctl).unwrap();
        release(old).unwrap();
        // Disks are not removable; unknown ids are DeviceNotFound.
        assert!(err(t.eject("d1", false, &mut ctl)).contains("not removable"));
        assert_eq!(
            t.eject("nope", false, &mut ctl).unwrap_err().class,
            "DeviceNotFound"
        );
        assert!(err(t.open_medium("d1", &iso2, None)).contains("not removable"));

        // device_del takes the LUN off the bus; the id and LUN are free again.
        ctl.take_bus_changed();
        // 'undo-end' on a LUN that is not an undo LUN: refused, the LUN stays.
        let e = err(t.device_del("d1", Some(UndoEnd::Commit), &mut ctl));
        assert!(e.contains("not an undo LUN"), "{e}");
        assert!(ctl.lun(1).is_some());
        assert!(!ctl.take_bus_changed());
        let img = t.device_del("d1", None, &mut ctl).unwrap();
        assert_eq!(img.release(UndoEnd::Discard), Ok(None));
        assert!(ctl.take_bus_changed());
        assert!(ctl.lun(1).is_none());
        assert_eq!(
            t.device_del("d1", None, &mut ctl).unwrap_err().class,
            "DeviceNotFound"
        );
        t.device_add(&add(Driver::Disk, "d1", 1, Some(&hd)), &mut ctl)
            .unwrap();
        // An empty DVD drive can be added and loaded.
        t.device_add(&add(Driver::Cdrom, "cd2", 7, None), &mut ctl)
            .unwrap();
        assert!(t.query(&ctl)[2].get("inserted").is_none());
        let m = t.open_medium("cd2", &iso1, None).unwrap();
        assert!(t
            .change_medium("cd2", m, false, &mut ctl)
            .unwrap()
            .is_none());
        assert_eq!(t.query(&ctl)[2]["inserted"]["virtual-size"], 64 * 2048);
    }
}

/// The whole control path without KVM: socket → protocol → [`VmControl`] → the storvsc device
/// in a VMBus server.
#[cfg(test)]
mod socket_tests {
    use super::*;
    use crate::memory::GuestRam;
    use crate::qmp::QmpServer;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;

    struct Client {
        w: UnixStream,
        r: BufReader<UnixStream>,
        events: Vec<Value>,
    }

    impl Client {
        fn connect(path: &Path) -> Client {
            let s = UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut c = Client {
                w: s.try_clone().unwrap(),
                r: BufReader::new(s),
                events: Vec::new(),
            };
            assert!(c.line().get("QMP").is_some());
            assert_eq!(c.ask("qmp_capabilities", json!({})), json!({"return": {}}));
            c
        }
        fn line(&mut self) -> Value {
            let mut l = String::new();
            self.r.read_line(&mut l).unwrap();
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l:?}: {e}"))
        }
        /// The reply to one request (events in between are kept).
        fn ask(&mut self, cmd: &str, args: Value) -> Value {
            writeln!(self.w, "{}", json!({"execute": cmd, "arguments": args})).unwrap();
            loop {
                let v = self.line();
                if v.get("event").is_some() {
                    self.events.push(v);
                } else {
                    return v;
                }
            }
        }
        fn wait_event(&mut self, name: &str) -> Value {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return self.events.remove(i);
            }
            loop {
                let v = self.line();
                if v["event"] == name {
                    return v;
                }
                self.events.push(v);
            }
        }
    }

    #[test]
    fn control_socket_drives_the_controller() {
        let dir = tempfile::tempdir().unwrap();
        let hd = dir.path().join("hd.img");
        std::fs::write(&hd, vec![0u8; 1 << 20]).unwrap();
        let iso = dir.path().join("a.iso");
        std::fs::write(&iso, vec![0xA5u8; 16 * 2048]).unwrap();

        let mut server = crate::vmbus_glue::VmbusServer::with_device_type();
        let instance = vmbus::Guid::parse(crate::vmbus_glue::SCSI_INSTANCE).unwrap();
        server
            .add_device(crate::vmbus_devices::VmmDevice::Storvsc(
                StorvscDevice::new(instance, ScsiController::new()),
            ))
            .unwrap();
        let ic = vmbus::Guid::parse(crate::shutdown_ic::SHUTDOWN_IC_INSTANCE).unwrap();
        server
            .add_device(crate::vmbus_devices::VmmDevice::Shutdown(ShutdownIc::new(
                ic,
            )))
            .unwrap();
        let ram = Arc::new(GuestRam::new(32 << 20).unwrap());
        let target = VmbusTarget::detached(server, ram);
        let stop = Arc::new(StopSignal::default());
        let events = Arc::new(Events::default());
        let control = Arc::new(VmControl {
            target: target.clone(),
            table: Mutex::new(BlockTable::new(Instant::now(), open_raw)),
            pause: Arc::new(PauseGate::default()),
            stop: stop.clone(),
            events: events.clone(),
        });
        let path = dir.path().join("qmp.sock");
        let srv = QmpServer::start(&path, control, events).unwrap();
        let mut c = Client::connect(&path);

        let r = c.ask(
            "device_add",
            json!({"driver": "scsi-hd", "id": "d1", "lun": 1, "file": hd}),
        );
        assert_eq!(r, json!({"return": {}}));
        let r = c.ask(
            "device_add",
            json!({"driver": "scsi-hd", "id": "d2", "lun": 1, "file": hd}),
        );
        assert!(r["error"]["desc"].as_str().unwrap().contains("busy"), "{r}");
        let r = c.ask(
            "device_add",
            json!({"driver": "scsi-hd", "id": "d3", "lun": 2, "file": dir.path().join("nope")}),
        );
        assert!(
            r["error"]["desc"]
                .as_str()
                .unwrap()
                .contains("Could not open"),
            "{r}"
        );
        let r = c.ask(
            "device_add",
            json!({"driver": "scsi-cd", "id": "cd", "lun": 3, "file": iso}),
        );
        assert_eq!(r, json!({"return": {}}));
        let q = c.ask("query-block", json!({}));
        let luns: Vec<u64> = q["return"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["lun"].as_u64().unwrap())
            .collect();
        assert_eq!(luns, [1, 3]);
        // The controller itself holds the new LUNs.
        let on_bus = target
            .with_storvsc(|d| d.controller().luns().map(|(l, _)| l).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(on_bus, [1, 3]);

        assert_eq!(c.ask("eject", json!({"id": "cd"})), json!({"return": {}}));
        let ev = c.wait_event("DEVICE_TRAY_MOVED");
        assert_eq!(
            ev["data"],
            json!({"device": "cd", "id": "cd", "tray-open": true})
        );
        let r = c.ask(
            "blockdev-change-medium",
            json!({"device": "cd", "filename": iso, "format": "raw"}),
        );
        assert_eq!(r, json!({"return": {}}));
        assert_eq!(
            c.wait_event("DEVICE_TRAY_MOVED")["data"]["tray-open"],
            false
        );

        assert_eq!(
            c.ask("device_del", json!({"id": "d1"})),
            json!({"return": {}})
        );
        assert_eq!(c.wait_event("DEVICE_DELETED")["data"]["device"], "d1");
        let on_bus = target
            .with_storvsc(|d| d.controller().luns().map(|(l, _)| l).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(on_bus, [3]);

        assert_eq!(c.ask("stop", json!({})), json!({"return": {}}));
        c.wait_event("STOP");
        assert_eq!(
            c.ask("query-status", json!({}))["return"]["status"],
            "paused"
        );
        assert_eq!(c.ask("cont", json!({})), json!({"return": {}}));
        c.wait_event("RESUME");
        assert_eq!(c.ask("query-status", json!({}))["return"]["running"], true);
        // No guest opened the shutdown service: an error that says so, once.
        let r = c.ask("system_powerdown", json!({}));
        assert_eq!(r["error"]["class"], "GenericError");
        let desc = r["error"]["desc"].as_str().unwrap();
        assert!(desc.starts_with("the guest has not opened"), "{desc}");
        // 'undo-end' on a plain LUN is refused and the LUN stays.
        let r = c.ask("device_del", json!({"id": "cd", "undo-end": "commit"}));
        assert!(
            r["error"]["desc"]
                .as_str()
                .unwrap()
                .contains("not an undo LUN"),
            "{r}"
        );
        assert_eq!(c.ask("query-block", json!({}))["return"][0]["device"], "cd");
        assert!(!stop.stopped(), "errors do not stop the VM");
        assert_eq!(c.ask("quit", json!({})), json!({"return": {}}));
        assert_eq!(stop.reason(), Some(StopReason::Quit));
        srv.shutdown();
    }
}

//! The VM description for `viridian run` (TOML) and the migration report (Markdown and JSON).

use serde::Serialize;

use disk::human_size;

use crate::plan::{Plan, UndoChoice};
use crate::vmc::Bus;

/// Per-disk outcome of `--apply`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    pub output: String,
    pub virtual_size: u64,
    pub bytes_written: u64,
    pub geometry: Option<String>,
    pub note: Option<String>,
}

#[derive(Serialize)]
pub struct Report<'a> {
    /// "plan" (dry run) or "applied".
    pub mode: &'static str,
    pub plan: &'a Plan,
    pub converted: &'a [Outcome],
    pub merged: Vec<String>,
    pub dropped: Vec<Dropped>,
    pub guest_actions: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Dropped {
    pub item: String,
    pub reason: String,
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            '\r' => o.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => o.push_str(&format!("\\u{:04X}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The VM description `viridian run VM.toml` reads.
pub fn vm_toml(plan: &Plan) -> String {
    let vm = &plan.vm;
    let mut t = String::new();
    t.push_str(&format!(
        "# Migrated by viridian migrate from {}\n",
        plan.vmc_path.replace('\n', " ")
    ));
    t.push_str(
        "# kernel/initrd/cmdline are absent for migrated Windows guests; add them for Linux.\n",
    );
    t.push_str(&format!("name = {}\n", toml_str(&vm.name)));
    t.push_str(&format!("memory_mib = {}\n", vm.memory_mib));
    t.push_str(&format!("cpus = {}\n", vm.cpus));
    for d in &plan.disks {
        t.push_str("\n[[disk]]\n");
        t.push_str(&format!("path = {}\n", toml_str(&d.output)));
        // Stated, never probed at run time: the guest's data cannot change how it is opened.
        t.push_str(&format!("format = {}\n", toml_str(d.output_format.ext())));
        t.push_str("read_only = false\n");
        // Undo overlays discard writes at exit; the migrated VM starts without one (see report).
        t.push_str("undo = false\n");
        t.push_str(&format!("controller = {}\n", toml_str(d.controller.name())));
        t.push_str(&format!("channel = {}\n", d.channel));
        t.push_str(&format!("slot = {}\n", d.slot));
    }
    for n in &vm.nics {
        t.push_str("\n[[network]]\n");
        match &n.mac {
            Some(m) => t.push_str(&format!("mac = {}\n", toml_str(m))),
            None => t.push_str(
                "# the .vmc had no MAC address for this adapter; viridian run picks one\n",
            ),
        }
    }
    t
}

/// What the user must do in the guest, and around it.
pub fn guest_actions(plan: &Plan) -> Vec<String> {
    let mut v = vec![
        "Remove Virtual Machine Additions from the guest (Add/Remove Programs), best before migrating while it still runs on Virtual PC: they conflict with Hyper-V integration services and can be hard to remove later.".to_string(),
        "Expect Windows to ask for re-activation: the virtual hardware (chipset, disk controller, network card) changes.".to_string(),
        "All disks are served as synthetic SCSI (storvsc) LUNs: the guest needs the Hyper-V storage driver (integration services) to boot; on Windows XP/2003 prepare the IDE/HDC driver first to avoid STOP 0x7B.".to_string(),
    ];
    match plan.disks.first() {
        Some(d) if d.controller == Bus::Ide && d.channel == 0 && d.slot == 0 => v.push(format!(
            "The boot disk is {} (IDE 0:0 in the .vmc); it is listed first in the TOML.",
            d.output
        )),
        Some(d) => v.push(format!(
            "The first disk is {} on {} {}:{}: a VM that booted from SCSI must boot from an IDE disk in a Hyper-V generation 1 style setup; check the boot order.",
            d.output,
            d.controller.name(),
            d.channel,
            d.slot
        )),
        None => {}
    }
    if plan
        .vm
        .nics
        .iter()
        .any(|n| n.mac.as_deref().is_some_and(|m| m.starts_with("00:03:FF")))
    {
        v.push("The MAC address is in Virtual PC's 00:03:FF range and is kept so the guest keeps its network settings; change it in the TOML if it clashes on the new network.".into());
    }
    if plan.vm.undo.enabled == Some(true) {
        v.push("The VM used undo disks; the TOML sets undo = false. Set undo = true for a disk to have writes discarded at every exit.".into());
    }
    v.push("Old Windows guests may need a HAL change (ACPI vs non-ACPI) after the move.".into());
    v
}

pub fn dropped(plan: &Plan) -> Vec<Dropped> {
    let mut v = Vec::new();
    for s in &plan.saved_state {
        v.push(Dropped {
            item: s.clone(),
            reason: "saved state (.vsv) cannot be migrated: it is a RAM dump tied to Virtual PC. The disks are taken as they are on disk, i.e. as of before the VM was saved; for a clean result, restore and shut down the VM in Virtual PC, then migrate again".into(),
        });
    }
    for d in &plan.disks {
        if let Some(u) = &d.undo {
            if u.choice == UndoChoice::Discard {
                v.push(Dropped {
                    item: u.path.clone(),
                    reason: format!(
                        "undo disk discarded (--discard-undo): {} holds the base contents only",
                        d.output
                    ),
                });
            }
        }
        let top = d
            .undo
            .as_ref()
            .filter(|u| u.choice == UndoChoice::Merge)
            .map(|u| &u.layer)
            .unwrap_or(&d.chain[0]);
        if let (true, Some(cur)) = (d.chs_sized, top.current_size) {
            if cur > d.guest_size {
                v.push(Dropped {
                    item: format!("{}: bytes {}..{}", d.source, d.guest_size, cur),
                    reason: "past the CHS size the guest saw (current_size is larger); never visible to the guest".into(),
                });
            }
        }
    }
    for s in &plan.skipped_drives {
        v.push(Dropped {
            item: format!(
                "{} {}:{} {}",
                s.controller.name(),
                s.channel,
                s.slot,
                s.path.as_deref().unwrap_or("")
            )
            .trim_end()
            .to_string(),
            reason: s.reason.clone(),
        });
    }
    for l in &plan.unmatched_undo {
        v.push(Dropped {
            item: l.path.clone(),
            reason: l.reason.clone(),
        });
    }
    v
}

pub fn merged(plan: &Plan) -> Vec<String> {
    let mut v = Vec::new();
    for d in &plan.disks {
        if let Some(u) = &d.undo {
            if u.choice == UndoChoice::Merge {
                v.push(format!(
                    "{} merged with {} into {}",
                    u.path, d.source, d.output
                ));
            }
        }
        if d.chain.len() > 1 {
            v.push(format!(
                "differencing chain of {} ({} layers) flattened into {}",
                d.source,
                d.chain.len(),
                d.output
            ));
        }
    }
    v
}

pub fn build<'a>(plan: &'a Plan, converted: &'a [Outcome], applied: bool) -> Report<'a> {
    Report {
        mode: if applied { "applied" } else { "plan" },
        plan,
        converted,
        merged: merged(plan),
        dropped: dropped(plan),
        guest_actions: guest_actions(plan),
    }
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

pub fn markdown(r: &Report) -> String {
    let p = r.plan;
    let vm = &p.vm;
    let mut m = String::new();
    let title = if r.mode == "applied" {
        "Migration report"
    } else {
        "Migration plan (dry run: nothing written)"
    };
    m.push_str(&format!("# {title}: {}\n\n", md_escape(&vm.name)));
    m.push_str(&format!(
        "* Source: `{}` ({}, version {})\n",
        p.vmc_path,
        vm.encoding.name(),
        vm.version.as_deref().unwrap_or("?")
    ));
    m.push_str(&format!("* Target: `{}`\n", p.target_dir));
    m.push_str(&format!(
        "* Memory: {} MiB, CPUs: {}\n",
        vm.memory_mib, vm.cpus
    ));
    m.push_str(&format!(
        "* Undo disks setting: {}{}\n",
        match vm.undo.enabled {
            Some(true) => "enabled",
            Some(false) => "disabled",
            None => "not recorded",
        },
        vm.undo
            .default_action
            .map(|a| format!(" (default_action {a})"))
            .unwrap_or_default()
    ));
    m.push_str(&format!("* VM description: `{}`\n", p.toml));
    m.push_str(&format!(
        "* Space needed: about {}\n\n",
        human_size(p.need_bytes)
    ));

    m.push_str("## Disks\n\n");
    if p.disks.is_empty() {
        m.push_str("None.\n\n");
    }
    for (i, d) in p.disks.iter().enumerate() {
        m.push_str(&format!(
            "### {} {}:{} -> `{}`\n\n",
            d.controller.name().to_uppercase(),
            d.channel,
            d.slot,
            d.output
        ));
        m.push_str(&format!(
            "* Found: `{}` ({})\n",
            d.source,
            md_escape(&d.resolved_by)
        ));
        m.push_str("* Chain (top first):\n");
        for l in &d.chain {
            m.push_str(&format!(
                "  * `{}`: {} {}, creator {:?} on {:?}, id {}, size {} ({}){}\n",
                l.path,
                l.format,
                l.disk_type.as_deref().unwrap_or(""),
                l.creator_app.as_deref().unwrap_or("-"),
                l.creator_host_os.as_deref().unwrap_or("-"),
                l.unique_id
                    .map(|g| g.to_string())
                    .unwrap_or_else(|| "-".into()),
                l.virtual_size,
                l.geometry
                    .as_deref()
                    .map(|g| format!("CHS {g}"))
                    .unwrap_or_else(|| "no CHS".into()),
                if l.saved_state {
                    ", saved-state flag set"
                } else {
                    ""
                }
            ));
        }
        match &d.undo {
            Some(u) => m.push_str(&format!(
                "* Undo disk: `{}` ({}), parent identity verified: **{}**\n",
                u.path,
                md_escape(&u.how_found),
                match u.choice {
                    UndoChoice::Merge => "merged (--merge-undo)",
                    UndoChoice::Discard => "discarded (--discard-undo)",
                    UndoChoice::Undecided => "pending: choose --merge-undo or --discard-undo",
                }
            )),
            None => m.push_str("* Undo disk: none\n"),
        }
        m.push_str(&format!(
            "* Guest size: {} bytes: {}\n",
            d.guest_size,
            md_escape(&d.size_note)
        ));
        m.push_str(&format!(
            "* Data: {} in use; output {} about {}\n",
            human_size(d.data_bytes),
            d.output_format.ext().to_uppercase(),
            human_size(d.need_bytes)
        ));
        if let Some(o) = r.converted.get(i) {
            m.push_str(&format!(
                "* Converted: {} bytes virtual, {} written{}{}\n",
                o.virtual_size,
                human_size(o.bytes_written),
                o.geometry
                    .as_deref()
                    .map(|g| format!(", CHS {g}"))
                    .unwrap_or_default(),
                o.note
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            ));
        }
        m.push('\n');
    }

    m.push_str("## Network adapters\n\n");
    if vm.nics.is_empty() {
        m.push_str("None.\n");
    }
    for n in &vm.nics {
        m.push_str(&format!(
            "* Adapter {}: MAC {}, network {:?}\n",
            n.index,
            n.mac
                .as_deref()
                .unwrap_or("(none; a new one will be picked)"),
            n.network.as_deref().unwrap_or("-")
        ));
    }
    m.push('\n');

    m.push_str("## Saved state\n\n");
    if p.saved_state.is_empty() {
        m.push_str("None found: the VM was shut down.\n\n");
    } else {
        for s in &p.saved_state {
            m.push_str(&format!(
                "* `{s}`: **cannot be migrated**, dropped (see below)\n"
            ));
        }
        m.push('\n');
    }

    m.push_str("## Merged\n\n");
    if r.merged.is_empty() {
        m.push_str("Nothing.\n");
    }
    for s in &r.merged {
        m.push_str(&format!("* {}\n", md_escape(s)));
    }
    m.push_str("\n## Dropped\n\n");
    if r.dropped.is_empty() {
        m.push_str("Nothing.\n");
    }
    for d in &r.dropped {
        m.push_str(&format!("* `{}`: {}\n", d.item, md_escape(&d.reason)));
    }
    if !p.warnings.is_empty() {
        m.push_str("\n## Warnings\n\n");
        for w in &p.warnings {
            m.push_str(&format!("* {}\n", md_escape(w)));
        }
    }
    m.push_str("\n## What to do in the guest\n\n");
    for (i, a) in r.guest_actions.iter().enumerate() {
        m.push_str(&format!("{}. {}\n", i + 1, a));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_escape() {
        assert_eq!(toml_str("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
        assert_eq!(toml_str("winxp"), "\"winxp\"");
    }
}

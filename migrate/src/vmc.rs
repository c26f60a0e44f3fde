//! The `.vmc` model: what Virtual PC 2004/2007 and Virtual Server 2005 record about a VM
//! (docs/vmc.md). Unknown elements are ignored; values that do not parse become warnings,
//! never guesses.

use std::path::Path;

use serde::Serialize;

use crate::xml::{self, Element, TextEncoding, XmlError};
use crate::Error;

/// Why `.vmc` bytes are not a VM configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VmcError {
    #[error(transparent)]
    Xml(#[from] XmlError),
    #[error("the root element is <{0}>, not <preferences>: not a Virtual PC / Virtual Server configuration")]
    NotPreferences(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    Ide,
    Scsi,
}

impl Bus {
    pub fn name(self) -> &'static str {
        match self {
            Bus::Ide => "ide",
            Bus::Scsi => "scsi",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriveKind {
    HardDisk,
    CdDvd,
    /// drive_type 0 (nothing attached) or a value we do not know.
    Other(i64),
}

/// One drive attachment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Drive {
    pub bus: Bus,
    /// IDE: 0 primary, 1 secondary. SCSI: the controller id.
    pub channel: u32,
    /// IDE: 0 master, 1 slave. SCSI: the target id.
    pub slot: u32,
    pub kind: DriveKind,
    pub absolute: Option<String>,
    pub relative: Option<String>,
    /// An undo disk path recorded for this drive, when the file names one.
    pub undo_absolute: Option<String>,
    pub undo_relative: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Nic {
    pub index: u32,
    /// `00:03:FF:12:34:56`, or None when the `.vmc` leaves it to be generated.
    pub mac: Option<String>,
    pub network: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UndoSettings {
    pub enabled: Option<bool>,
    /// `settings/undo_drives/default_action`, as recorded (its values are not documented).
    pub default_action: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Vmc {
    pub name: String,
    pub encoding: TextEncoding,
    pub version: Option<String>,
    pub memory_mib: u64,
    pub cpus: u32,
    pub drives: Vec<Drive>,
    pub nics: Vec<Nic>,
    pub undo: UndoSettings,
    pub warnings: Vec<String>,
}

/// Reads and parses a `.vmc` file (read-only).
pub fn load(path: &Path) -> Result<Vmc, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::ReadVmc {
        path: path.to_path_buf(),
        source,
    })?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vm".into());
    parse(&bytes, &name).map_err(|source| Error::BadVmc {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses `.vmc` bytes; `name` is the VM's name (Virtual PC uses the file name).
pub fn parse(bytes: &[u8], name: &str) -> Result<Vmc, VmcError> {
    let (text, encoding) = xml::decode(bytes)?;
    let root = xml::parse(&text)?;
    if !root.name.eq_ignore_ascii_case("preferences") {
        return Err(VmcError::NotPreferences(root.name));
    }
    let mut warnings = Vec::new();
    let hw = root.child("hardware");
    let memory_mib = match hw.and_then(|h| h.text_at(&["memory", "ram_size"])) {
        Some(t) => match t.parse::<u64>() {
            Ok(v) if v > 0 => v,
            _ => {
                warnings.push(format!(
                    "memory/ram_size {t:?} is not a positive integer; using 512 MiB"
                ));
                512
            }
        },
        None => {
            warnings.push("no memory/ram_size in the .vmc; using 512 MiB".into());
            512
        }
    };
    // Virtual PC and Virtual Server emulate one CPU; accept a count if a file has one.
    let cpus = hw
        .and_then(|h| {
            h.text_at(&["cpu", "count"])
                .or_else(|| h.text_at(&["cpu", "cpu_count"]))
                .or_else(|| h.text_at(&["processor", "count"]))
        })
        .and_then(|t| t.parse::<u32>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1);

    let mut drives = Vec::new();
    let pci = hw.and_then(|h| h.child("pci_bus"));
    // IDE: hardware/pci_bus/ide_adapter/ide_controller[id]/location[id]. Virtual Server:
    // scsi_adapter/scsi_controller[id]/location[id] (also accepted directly under hardware).
    for (bus, adapter, controller) in [
        (Bus::Ide, "ide_adapter", "ide_controller"),
        (Bus::Scsi, "scsi_adapter", "scsi_controller"),
    ] {
        let adapters = pci
            .into_iter()
            .chain(hw)
            .flat_map(|parent| parent.children_named(adapter));
        for (ai, ad) in adapters.enumerate() {
            // Usually adapter/controller[id]/location[id]; some files put the locations
            // directly under an adapter[id].
            let mut controllers: Vec<(u32, &Element)> = ad
                .children_named(controller)
                .enumerate()
                .map(|(ci, c)| (id_of(c, ci, &mut warnings), c))
                .collect();
            if controllers.is_empty() && ad.child("location").is_some() {
                controllers.push((id_of(ad, ai, &mut warnings), ad));
            }
            for (channel, ctl) in controllers {
                for (li, loc) in ctl.children_named("location").enumerate() {
                    let slot = id_of(loc, li, &mut warnings);
                    if let Some(d) = drive(bus, channel, slot, loc, &mut warnings) {
                        drives.push(d);
                    }
                }
            }
        }
    }
    drives.sort_by_key(|d| (d.bus == Bus::Scsi, d.channel, d.slot));
    drives.dedup_by_key(|d| (d.bus, d.channel, d.slot));

    let mut nics = Vec::new();
    if let Some(eth) = pci.and_then(|p| p.child("ethernet_adapter")) {
        for (i, c) in eth.children_named("ethernet_controller").enumerate() {
            let index = id_of(c, i, &mut warnings);
            let mac = match c.text_at(&["ethernet_card_address"]) {
                Some(hex) => match mac_from_hex(&hex) {
                    Some(m) => Some(m),
                    None => {
                        warnings.push(format!(
                            "network adapter {index}: ethernet_card_address {hex:?} is not 6 hex bytes; a new MAC will be needed"
                        ));
                        None
                    }
                },
                None => None,
            };
            let network = c.text_at(&["virtual_network", "name"]);
            nics.push(Nic {
                index,
                mac,
                network,
            });
        }
    }

    let undo_el = root.path(&["settings", "undo_drives"]);
    let undo = UndoSettings {
        enabled: undo_el
            .and_then(|u| u.text_at(&["enabled"]))
            .and_then(|t| parse_bool(&t)),
        default_action: undo_el
            .and_then(|u| u.text_at(&["default_action"]))
            .and_then(|t| t.parse().ok()),
    };

    Ok(Vmc {
        name: name.to_string(),
        encoding,
        version: root.text_at(&["version"]),
        memory_mib,
        cpus,
        drives,
        nics,
        undo,
        warnings,
    })
}

fn id_of(e: &Element, position: usize, warnings: &mut Vec<String>) -> u32 {
    match e.attr("id") {
        Some(v) => match v.trim().parse() {
            Ok(n) => n,
            Err(_) => {
                warnings.push(format!(
                    "<{} id={v:?}>: not a number; using its position {position}",
                    e.name
                ));
                position as u32
            }
        },
        None => position as u32,
    }
}

fn drive(
    bus: Bus,
    channel: u32,
    slot: u32,
    loc: &Element,
    warnings: &mut Vec<String>,
) -> Option<Drive> {
    let absolute = loc.text_at(&["pathname", "absolute"]);
    let relative = loc.text_at(&["pathname", "relative"]);
    let kind = match loc.text_at(&["drive_type"]) {
        Some(t) => match t.parse::<i64>() {
            Ok(1) => DriveKind::HardDisk,
            Ok(2) => DriveKind::CdDvd,
            Ok(n) => DriveKind::Other(n),
            Err(_) => {
                warnings.push(format!(
                    "{} {channel}:{slot}: drive_type {t:?} is not a number",
                    bus.name()
                ));
                DriveKind::Other(-1)
            }
        },
        // Virtual Server's SCSI locations carry no drive_type: a path means a hard disk.
        None if absolute.is_some() || relative.is_some() => DriveKind::HardDisk,
        None => return None,
    };
    if kind == DriveKind::Other(0) && absolute.is_none() && relative.is_none() {
        return None;
    }
    let undo = ["undo_pathname", "undo_drive", "undo"]
        .iter()
        .find_map(|n| loc.child(n));
    let (undo_absolute, undo_relative) = match undo {
        Some(u) => (
            u.text_at(&["absolute"])
                .or_else(|| u.text_at(&["pathname", "absolute"])),
            u.text_at(&["relative"])
                .or_else(|| u.text_at(&["pathname", "relative"])),
        ),
        None => (None, None),
    };
    Some(Drive {
        bus,
        channel,
        slot,
        kind,
        absolute,
        relative,
        undo_absolute,
        undo_relative,
    })
}

fn parse_bool(t: &str) -> Option<bool> {
    match t.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

/// `0003FF123456` (also with separators) to `00:03:FF:12:34:56`. All-zero means "none".
pub fn mac_from_hex(hex: &str) -> Option<String> {
    let digits: String = hex
        .chars()
        .filter(|c| !matches!(c, ':' | '-' | ' '))
        .collect();
    if digits.len() != 12 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    if digits.chars().all(|c| c == '0') {
        return None;
    }
    let up = digits.to_ascii_uppercase();
    Some(
        (0..6)
            .map(|i| &up[i * 2..i * 2 + 2])
            .collect::<Vec<_>>()
            .join(":"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use vpc_fixtures as fixtures;

    fn sample() -> String {
        fixtures::vmc_xml("C:\\VMs\\xp\\xp.vhd", ".\\xp.vhd", "0003ff123456")
    }

    #[test]
    fn parses_the_same_vmc_in_every_encoding() {
        let text = sample();
        let mut seen = Vec::new();
        for enc in [
            fixtures::Encoding::Utf16Le,
            fixtures::Encoding::Utf16Be,
            fixtures::Encoding::Utf8,
        ] {
            let v = parse(&fixtures::encode(&text, enc), "xp").unwrap();
            assert_eq!(v.name, "xp");
            assert_eq!(v.memory_mib, 512);
            assert_eq!(v.cpus, 1);
            assert_eq!(v.version.as_deref(), Some("2.0"));
            assert_eq!(v.drives.len(), 2);
            let d = &v.drives[0];
            assert_eq!(
                (d.bus, d.channel, d.slot, d.kind),
                (Bus::Ide, 0, 0, DriveKind::HardDisk)
            );
            assert_eq!(d.absolute.as_deref(), Some("C:\\VMs\\xp\\xp.vhd"));
            assert_eq!(d.relative.as_deref(), Some(".\\xp.vhd"));
            assert_eq!(v.drives[1].kind, DriveKind::CdDvd);
            assert_eq!((v.drives[1].channel, v.drives[1].slot), (1, 0));
            assert_eq!(v.nics.len(), 1);
            assert_eq!(v.nics[0].mac.as_deref(), Some("00:03:FF:12:34:56"));
            assert_eq!(
                v.nics[0].network.as_deref(),
                Some("Shared Networking (NAT) & more")
            );
            assert_eq!(v.undo.enabled, Some(true));
            assert_eq!(v.undo.default_action, Some(1));
            assert!(v.warnings.is_empty(), "{:?}", v.warnings);
            seen.push(v.encoding);
        }
        assert_eq!(
            seen,
            [
                TextEncoding::Utf16Le,
                TextEncoding::Utf16Be,
                TextEncoding::Utf8
            ]
        );
    }

    #[test]
    fn virtual_server_scsi_and_undo_paths() {
        let doc = r#"<preferences><hardware><memory><ram_size type="integer">2048</ram_size></memory>
<pci_bus><scsi_adapter><scsi_controller id="0"><location id="3">
<pathname><absolute type="string">\\nas\vms\db.vhd</absolute></pathname>
<undo_pathname><absolute type="string">\\nas\vms\db.vud</absolute></undo_pathname>
</location></scsi_controller></scsi_adapter>
<ide_adapter><ide_controller id="0"><location id="1"><drive_type type="integer">1</drive_type>
<pathname><relative type="string">.\boot.vhd</relative></pathname></location></ide_controller></ide_adapter>
<ethernet_adapter><ethernet_controller id="0"><ethernet_card_address type="bytes">000000000000</ethernet_card_address></ethernet_controller></ethernet_adapter>
</pci_bus></hardware></preferences>"#;
        let v = parse(doc.as_bytes(), "db").unwrap();
        assert_eq!(v.memory_mib, 2048);
        assert_eq!(v.drives.len(), 2);
        // IDE first (boot order), then SCSI.
        assert_eq!((v.drives[0].bus, v.drives[0].slot), (Bus::Ide, 1));
        let s = &v.drives[1];
        assert_eq!(
            (s.bus, s.channel, s.slot, s.kind),
            (Bus::Scsi, 0, 3, DriveKind::HardDisk)
        );
        assert_eq!(s.undo_absolute.as_deref(), Some("\\\\nas\\vms\\db.vud"));
        assert_eq!(v.nics[0].mac, None);
        assert_eq!(v.undo, UndoSettings::default());
    }

    #[test]
    fn locations_directly_under_an_adapter() {
        let doc = r#"<preferences><hardware><pci_bus>
<scsi_adapter id="1"><location id="2"><pathname><absolute>E:\\d.vhd</absolute></pathname></location></scsi_adapter>
</pci_bus></hardware></preferences>"#;
        let v = parse(doc.as_bytes(), "x").unwrap();
        assert_eq!(v.drives.len(), 1);
        assert_eq!(
            (v.drives[0].bus, v.drives[0].channel, v.drives[0].slot),
            (Bus::Scsi, 1, 2)
        );
    }

    #[test]
    fn bad_files_are_errors_and_odd_values_warnings() {
        assert!(parse(b"", "x").is_err());
        assert!(parse(b"<preferences><hardware>", "x").is_err());
        assert!(parse(b"<vm></vm>", "x").is_err());
        let v = parse(
            b"<preferences><hardware><memory><ram_size>lots</ram_size></memory></hardware></preferences>",
            "x",
        )
        .unwrap();
        assert_eq!(v.memory_mib, 512);
        assert_eq!(v.warnings.len(), 1);
        assert!(v.drives.is_empty());
    }

    #[test]
    fn macs() {
        assert_eq!(
            mac_from_hex("0003FFabcdef").as_deref(),
            Some("00:03:FF:AB:CD:EF")
        );
        assert_eq!(
            mac_from_hex("00-03-ff-ab-cd-ef").as_deref(),
            Some("00:03:FF:AB:CD:EF")
        );
        assert_eq!(mac_from_hex("0003FF"), None);
        assert_eq!(mac_from_hex("zz03FFabcdef"), None);
    }
}

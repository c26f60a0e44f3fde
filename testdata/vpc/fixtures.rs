//! Test-time generator for Virtual PC 2004/2007 style VMs (`viridian migrate` fixtures).
//!
//! The `vpc-fixtures` crate, a dev-dependency of `migrate` and `viridian`; std only. Every
//! byte of the VHD images is written here from the VHD 1.0 layout (the Virtual PC facts it
//! relies on are in docs/vmc.md), not by the code under test:
//!
//! * a dynamic VHD with creator `vpc `, host `Wi2k`, 2 MiB blocks, whose footer `current_size`
//!   (20 MiB) is larger than the capacity of its CHS geometry (602/4/17 = 20 959 232 bytes),
//!   with data in a few blocks, including bytes *past* the CHS capacity that the guest never
//!   saw;
//! * a `.vud` undo disk: a differencing VHD (creator `vpc `) whose parent unique id is the base's,
//!   with W2ku/W2ru locators, sector bitmaps that leave garbage in non-present sectors, and
//!   changes over the base;
//! * `.vmc` files in UTF-16LE, UTF-16BE (with BOM) or UTF-8, with absolute Windows paths and
//!   relative `.\` paths;
//! * optionally a `.vsv` saved-state file.
//!
//! The generator also returns the guest-visible bytes (base alone, and merged with the undo
//! disk) so tests can compare converted images with them.

use std::path::{Path, PathBuf};

pub const SECTOR: u64 = 512;
pub const BLOCK: u64 = 2 << 20;
/// The footer's current_size.
pub const CURRENT_SIZE: u64 = 20 << 20;

/// The VHD CHS algorithm (docs/vmc.md, "Disk size"), written independently of the vhd crate.
pub fn chs(total_sectors: u64) -> (u16, u8, u8) {
    let total = total_sectors.min(65535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255u64;
        heads = 16u64;
        cth = total / spt;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// The geometry of the fixture disk and the size the guest saw (C*H*S*512).
pub fn geometry() -> (u16, u8, u8) {
    chs(CURRENT_SIZE / SECTOR)
}

pub fn chs_size() -> u64 {
    let (c, h, s) = geometry();
    c as u64 * h as u64 * s as u64 * SECTOR
}

fn checksum(b: &[u8]) -> u32 {
    !b.iter().fold(0u32, |a, &x| a.wrapping_add(x as u32))
}

fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}
fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// One layer to write: which sectors it holds, and their bytes.
struct Layer {
    uid: [u8; 16],
    timestamp: u32,
    /// (sector, 512 bytes) in any order.
    sectors: Vec<(u64, [u8; 512])>,
    /// Differencing: (parent uid, parent timestamp, parent name, W2ku path, W2ru path).
    parent: Option<([u8; 16], u32, String, String, String)>,
    /// Dynamic disks: mark whole blocks present in the bitmap (as Virtual PC does).
    full_bitmaps: bool,
    /// Byte written into sectors the bitmap says are absent (must never be read).
    filler: u8,
}

fn footer(layer: &Layer) -> [u8; 512] {
    let mut f = [0u8; 512];
    f[0..8].copy_from_slice(b"conectix");
    put_u32(&mut f, 8, 2);
    put_u32(&mut f, 12, 0x0001_0000);
    put_u64(&mut f, 16, 512);
    put_u32(&mut f, 24, layer.timestamp);
    f[28..32].copy_from_slice(b"vpc ");
    put_u32(&mut f, 32, 0x0005_0003);
    f[36..40].copy_from_slice(b"Wi2k");
    put_u64(&mut f, 40, CURRENT_SIZE);
    put_u64(&mut f, 48, CURRENT_SIZE);
    let (c, h, s) = geometry();
    put_u16(&mut f, 56, c);
    f[58] = h;
    f[59] = s;
    put_u32(&mut f, 60, if layer.parent.is_some() { 4 } else { 3 });
    f[68..84].copy_from_slice(&layer.uid);
    let sum = checksum(&f);
    put_u32(&mut f, 64, sum);
    f
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Writes a dynamic (or, with a parent, differencing) VHD.
fn write_vhd(path: &Path, layer: &Layer) -> std::io::Result<()> {
    let entries = CURRENT_SIZE.div_ceil(BLOCK);
    let bat_off = 1536u64;
    let bat_len = (entries * 4).div_ceil(SECTOR) * SECTOR;
    let mut end = bat_off + bat_len;
    let mut header = [0u8; 1024];
    header[0..8].copy_from_slice(b"cxsparse");
    put_u64(&mut header, 8, u64::MAX);
    put_u64(&mut header, 16, bat_off);
    put_u32(&mut header, 24, 0x0001_0000);
    put_u32(&mut header, 28, entries as u32);
    put_u32(&mut header, 32, BLOCK as u32);
    let mut locator_data: Vec<(u64, Vec<u8>)> = Vec::new();
    if let Some((puid, pts, name, abs, rel)) = &layer.parent {
        header[40..56].copy_from_slice(puid);
        put_u32(&mut header, 56, *pts);
        for (i, u) in name.encode_utf16().take(256).enumerate() {
            put_u16(&mut header, 64 + i * 2, u);
        }
        for (slot, (code, text)) in [(b"W2ku", abs), (b"W2ru", rel)].into_iter().enumerate() {
            let data = utf16le(text);
            let space = (data.len() as u64).div_ceil(SECTOR) * SECTOR;
            let e = 576 + slot * 24;
            header[e..e + 4].copy_from_slice(code);
            put_u32(&mut header, e + 4, space as u32);
            put_u32(&mut header, e + 8, data.len() as u32);
            put_u64(&mut header, e + 16, end);
            locator_data.push((end, data));
            end += space;
        }
    }
    let sum = checksum(&header);
    put_u32(&mut header, 36, sum);

    // Group sectors by block.
    let spb = BLOCK / SECTOR;
    let mut blocks: Vec<u64> = layer.sectors.iter().map(|(s, _)| s / spb).collect();
    blocks.sort_unstable();
    blocks.dedup();
    let mut bat = vec![0xFFu8; bat_len as usize];
    let mut image: Vec<u8> = vec![0u8; end as usize];
    for (off, data) in &locator_data {
        image[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    for b in blocks {
        let block_start = image.len() as u64;
        put_u32(&mut bat, (b * 4) as usize, (block_start / SECTOR) as u32);
        let mut bitmap = [0u8; 512];
        let mut data = vec![layer.filler; BLOCK as usize];
        if layer.full_bitmaps {
            bitmap = [0xFF; 512];
            data.iter_mut().for_each(|x| *x = 0);
        }
        for (s, bytes) in layer.sectors.iter().filter(|(s, _)| s / spb == b) {
            let i = (s % spb) as usize;
            bitmap[i / 8] |= 0x80 >> (i % 8);
            data[i * 512..(i + 1) * 512].copy_from_slice(bytes);
        }
        image.extend_from_slice(&bitmap);
        image.extend_from_slice(&data);
    }
    let f = footer(layer);
    image[0..512].copy_from_slice(&f);
    image[512..1536].copy_from_slice(&header);
    image[bat_off as usize..(bat_off + bat_len) as usize].copy_from_slice(&bat);
    image.extend_from_slice(&f);
    std::fs::write(path, image)
}

fn pattern(tag: &str, sector: u64) -> [u8; 512] {
    let mut s = [0u8; 512];
    let text = format!("{tag} sector {sector} ");
    for (i, b) in s.iter_mut().enumerate() {
        *b = text.as_bytes()[i % text.len()];
    }
    s
}

/// Where the .vmc points at the disk, and how it is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Utf16Le,
    Utf16Be,
    Utf8,
}

pub struct Options {
    pub vm_name: String,
    pub encoding: Encoding,
    /// Put the .vhd under `<root>/store/` (reached through an absolute Windows path and a
    /// path map) instead of next to the .vmc (reached through the relative path).
    pub disk_elsewhere: bool,
    pub with_undo: bool,
    pub with_saved_state: bool,
    /// Make the .vmc name a disk that does not exist.
    pub missing_disk: bool,
}

impl Options {
    pub fn new(name: &str) -> Self {
        Options {
            vm_name: name.to_string(),
            encoding: Encoding::Utf16Le,
            disk_elsewhere: false,
            with_undo: true,
            with_saved_state: false,
            missing_disk: false,
        }
    }
}

pub struct Fixture {
    pub vm_dir: PathBuf,
    pub vmc: PathBuf,
    pub vhd: PathBuf,
    pub vud: Option<PathBuf>,
    pub vsv: Option<PathBuf>,
    /// The Windows directory the .vmc names (map it to `store_dir` with --path-map).
    pub windows_dir: String,
    pub store_dir: PathBuf,
    /// Guest-visible bytes (CHS size) of the base disk and of base + undo disk.
    pub base_view: Vec<u8>,
    pub merged_view: Vec<u8>,
    pub base_uid: [u8; 16],
    pub mac: String,
}

/// Writes a VM under `root` (`root/<vm>/` for the VM folder).
pub fn make(root: &Path, o: &Options) -> std::io::Result<Fixture> {
    let vm_dir = root.join(&o.vm_name);
    let store_dir = root.join("store");
    std::fs::create_dir_all(&vm_dir)?;
    std::fs::create_dir_all(&store_dir)?;
    let disk_dir = if o.disk_elsewhere {
        &store_dir
    } else {
        &vm_dir
    };
    let vhd_name = format!("{}.vhd", o.vm_name);
    let vhd = disk_dir.join(&vhd_name);
    let windows_dir = if o.disk_elsewhere {
        "C:\\VMs\\Store".to_string()
    } else {
        format!(
            "C:\\Documents and Settings\\user\\My Documents\\My Virtual Machines\\{}",
            o.vm_name
        )
    };
    let chs_sectors = chs_size() / SECTOR;
    let cur_sectors = CURRENT_SIZE / SECTOR;

    // Base: boot sector, a few scattered sectors, the last guest sector, and bytes past the
    // CHS capacity (inside current_size) that the guest never saw.
    let mut base_sectors: Vec<(u64, [u8; 512])> = Vec::new();
    for s in [0u64, 1, 2, 3, 63, 4096 + 7, 3 * 4096 + 100, chs_sectors - 1] {
        base_sectors.push((s, pattern("base", s)));
    }
    for s in chs_sectors..cur_sectors {
        base_sectors.push((s, pattern("beyond-chs", s)));
    }
    let base_uid = *b"VPC-BASE-UID-001";
    let base_ts = 0x1234_5678;
    write_vhd(
        &vhd,
        &Layer {
            uid: base_uid,
            timestamp: base_ts,
            sectors: base_sectors.clone(),
            parent: None,
            full_bitmaps: true,
            filler: 0,
        },
    )?;

    let guest = chs_size() as usize;
    let mut base_view = vec![0u8; guest];
    for (s, d) in &base_sectors {
        if *s < chs_sectors {
            base_view[*s as usize * 512..(*s as usize + 1) * 512].copy_from_slice(d);
        }
    }
    let mut merged_view = base_view.clone();

    let mut vud = None;
    if o.with_undo {
        let mut undo_sectors = Vec::new();
        for s in [
            1u64,
            2,
            5 * 4096 + 1,
            5 * 4096 + 2,
            4096 + 8,
            chs_sectors - 1,
        ] {
            undo_sectors.push((s, pattern("undo", s)));
        }
        // A sector the guest zeroed: present in the child, all zeros.
        undo_sectors.push((63, [0u8; 512]));
        for (s, d) in &undo_sectors {
            merged_view[*s as usize * 512..(*s as usize + 1) * 512].copy_from_slice(d);
        }
        let abs = format!("{windows_dir}\\{vhd_name}");
        let path = vm_dir.join(format!(
            "VirtualPCUndo_{}_0_0_20240101120000.vud",
            o.vm_name
        ));
        write_vhd(
            &path,
            &Layer {
                uid: *b"VPC-UNDO-UID-001",
                timestamp: base_ts + 100,
                sectors: undo_sectors,
                parent: Some((
                    base_uid,
                    base_ts,
                    abs.clone(),
                    abs,
                    format!(".\\{vhd_name}"),
                )),
                full_bitmaps: false,
                filler: 0xEE,
            },
        )?;
        vud = Some(path);
    }

    let mut vsv = None;
    if o.with_saved_state {
        let p = vm_dir.join(format!("{}.vsv", o.vm_name));
        std::fs::write(&p, b"saved state: not portable")?;
        vsv = Some(p);
    }

    let disk_file = if o.missing_disk {
        format!("{}-missing.vhd", o.vm_name)
    } else {
        vhd_name.clone()
    };
    let relative = if o.disk_elsewhere {
        format!(".\\not-here\\{disk_file}")
    } else {
        format!(".\\{disk_file}")
    };
    let mac = "00:03:FF:12:34:56".to_string();
    let vmc_text = vmc_xml(
        &format!("{windows_dir}\\{disk_file}"),
        &relative,
        "0003FF123456",
    );
    let vmc = vm_dir.join(format!("{}.vmc", o.vm_name));
    std::fs::write(&vmc, encode(&vmc_text, o.encoding))?;
    Ok(Fixture {
        vm_dir,
        vmc,
        vhd,
        vud,
        vsv,
        windows_dir,
        store_dir,
        base_view,
        merged_view,
        base_uid,
        mac,
    })
}

pub fn encode(text: &str, e: Encoding) -> Vec<u8> {
    match e {
        Encoding::Utf8 => text.as_bytes().to_vec(),
        Encoding::Utf16Le => {
            let mut v = vec![0xFF, 0xFE];
            v.extend(text.encode_utf16().flat_map(|u| u.to_le_bytes()));
            v
        }
        Encoding::Utf16Be => {
            let mut v = vec![0xFE, 0xFF];
            v.extend(text.encode_utf16().flat_map(|u| u.to_be_bytes()));
            v
        }
    }
}

/// A Virtual PC 2007 style `.vmc` (structure in docs/vmc.md): 512 MB, one NIC, the hard
/// disk on IDE 0:0, a CD drive on IDE 1:0, undo disks enabled.
pub fn vmc_xml(absolute: &str, relative: &str, mac_hex: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-16"?>
<!-- Microsoft Virtual Machine Options and Settings -->
<preferences>
    <version type="string">2.0</version>
    <hardware>
        <memory>
            <ram_size type="integer">512</ram_size>
        </memory>
        <pci_bus>
            <ethernet_adapter>
                <controller_count type="integer">1</controller_count>
                <ethernet_controller id="0">
                    <virtual_network>
                        <id type="bytes">0123456789ABCDEF0123456789ABCDEF</id>
                        <name type="string">Shared Networking (NAT) &amp; more</name>
                    </virtual_network>
                    <ethernet_card_address type="bytes">{mac_hex}</ethernet_card_address>
                </ethernet_controller>
            </ethernet_adapter>
            <ide_adapter>
                <ide_controller id="0">
                    <location id="0">
                        <drive_type type="integer">1</drive_type>
                        <pathname>
                            <absolute type="string">{absolute}</absolute>
                            <relative type="string">{relative}</relative>
                        </pathname>
                    </location>
                </ide_controller>
                <ide_controller id="1">
                    <location id="0">
                        <drive_type type="integer">2</drive_type>
                    </location>
                </ide_controller>
            </ide_adapter>
        </pci_bus>
    </hardware>
    <settings>
        <undo_drives>
            <enabled type="boolean">true</enabled>
            <default_action type="integer">1</default_action>
        </undo_drives>
    </settings>
</preferences>
"#
    )
}

//! The metadata region: its table of items and the system items (file parameters, virtual
//! size, page 83 id, sector sizes, parent locator). See docs/vhdx.md, "Metadata region".

use binrw::binrw;
use disk::{Error, Guid, Result};

use crate::codec::{decode, encode, encode_vec, guid_from_disk, guid_to_disk};
use crate::format::{MAX_SIZE, MIB};
use crate::locator::ParentLocator;

pub const GUID_FILE_PARAMS: Guid = Guid::from_str_const("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
pub const GUID_VDISK_SIZE: Guid = Guid::from_str_const("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
pub const GUID_PAGE83: Guid = Guid::from_str_const("BECA12AB-B2E6-4523-93EF-C309E000C746");
pub const GUID_LOGICAL_SECTOR: Guid = Guid::from_str_const("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
pub const GUID_PHYSICAL_SECTOR: Guid = Guid::from_str_const("CDA348C7-445D-4471-9CC9-E9885251C556");
pub const GUID_PARENT_LOCATOR: Guid = Guid::from_str_const("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");

/// Entry flags.
pub const META_IS_USER: u32 = 1;
pub const META_IS_VDISK: u32 = 2;
pub const META_IS_REQUIRED: u32 = 4;

/// The table occupies the region's first 64 KiB; items live after it.
const TABLE_SIZE: usize = 64 * 1024;
const MAX_ENTRIES: usize = 2047;

/// The table's first 32 bytes.
#[binrw]
#[brw(little, magic = b"metadata")]
struct MetadataTableHeader {
    reserved: u16,
    entry_count: u16,
    reserved2: [u8; 20],
}

/// One table entry (32 bytes, from offset 32). `offset` is relative to the region's start.
#[binrw]
#[brw(little)]
#[derive(Clone, Debug)]
pub struct MetaEntry {
    #[br(map = guid_from_disk)]
    #[bw(map = guid_to_disk)]
    pub guid: Guid,
    pub offset: u32,
    pub length: u32,
    pub flags: u32,
    pub reserved: u32,
}

const ENTRIES_AT: usize = 32;
const ENTRY_SIZE: usize = 32;

/// The file parameters item.
#[binrw]
#[brw(little)]
struct FileParameters {
    block_size: u32,
    /// Bit 0: leave blocks allocated (fixed); bit 1: has a parent (differencing).
    flags: u32,
}

#[binrw]
#[brw(little)]
struct VirtualDiskSize {
    size: u64,
}

#[binrw]
#[brw(little)]
struct Page83 {
    #[br(map = guid_from_disk)]
    #[bw(map = guid_to_disk)]
    id: Guid,
}

/// The logical or the physical sector size item.
#[binrw]
#[brw(little)]
struct SectorSize {
    size: u32,
}

/// The parsed system metadata.
#[derive(Clone, Debug)]
pub struct Metadata {
    pub block_size: u32,
    pub leave_blocks_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub page83: Guid,
    pub logical_sector: u32,
    pub physical_sector: u32,
    pub parent_locator: Option<ParentLocator>,
    pub entries: Vec<MetaEntry>,
}

/// The table entries as they stand (for in-place edits of a region validated at open): as many
/// as the header says and the table holds.
pub(crate) fn read_table(region: &[u8]) -> Vec<MetaEntry> {
    let Ok(head) = decode::<MetadataTableHeader>(region) else {
        return Vec::new();
    };
    (0..head.entry_count as usize)
        .map(|i| ENTRIES_AT + i * ENTRY_SIZE)
        .take_while(|&at| at + ENTRY_SIZE <= region.len())
        .filter_map(|at| decode(&region[at..at + ENTRY_SIZE]).ok())
        .collect()
}

/// Rewrites table entry `i` of `region`.
pub(crate) fn write_table_entry(region: &mut [u8], i: usize, e: &MetaEntry) {
    let at = ENTRIES_AT + i * ENTRY_SIZE;
    encode(e, &mut region[at..at + ENTRY_SIZE]);
}

/// The bytes of a virtual disk size item.
pub(crate) fn virtual_size_item(size: u64) -> Vec<u8> {
    encode_vec(&VirtualDiskSize { size })
}

/// The bytes of a sector size item.
pub(crate) fn sector_size_item(size: u32) -> Vec<u8> {
    encode_vec(&SectorSize { size })
}

/// The bytes of a page 83 item.
pub(crate) fn page83_item(id: Guid) -> Vec<u8> {
    encode_vec(&Page83 { id })
}

/// Parses the metadata region `region` (the whole region's bytes) at file offset `offset`.
pub fn parse_metadata(region: &[u8], offset: u64) -> Result<Metadata> {
    let corrupt = |d: String| Error::corrupt("VHDX metadata table", offset, d);
    if region.len() < TABLE_SIZE {
        return Err(corrupt("region shorter than 64 KiB".into()));
    }
    let head: MetadataTableHeader =
        decode(region).map_err(|_| corrupt("signature is not 'metadata'".into()))?;
    let count = head.entry_count as usize;
    if count > MAX_ENTRIES {
        return Err(corrupt(format!("entry count {count} exceeds 2047")));
    }
    let mut entries: Vec<MetaEntry> = Vec::new();
    for i in 0..count {
        let at = ENTRIES_AT + i * ENTRY_SIZE;
        let e: MetaEntry = decode(&region[at..at + ENTRY_SIZE])
            .map_err(|err| corrupt(format!("entry {i}: {err}")))?;
        if e.length > MIB as u32 {
            return Err(corrupt(format!(
                "item {} length {} exceeds 1 MiB",
                e.guid, e.length
            )));
        }
        if (e.length == 0) != (e.offset == 0)
            || (e.length > 0
                && (e.offset < TABLE_SIZE as u32
                    || e.offset as u64 + e.length as u64 > region.len() as u64))
        {
            return Err(corrupt(format!(
                "item {} at {:#x}+{:#x} lies outside the {:#x}-byte region",
                e.guid,
                e.offset,
                e.length,
                region.len()
            )));
        }
        if entries
            .iter()
            .any(|x| x.guid == e.guid && (x.flags & META_IS_USER) == (e.flags & META_IS_USER))
        {
            return Err(corrupt(format!("duplicate item {}", e.guid)));
        }
        entries.push(e);
    }
    let find = |guid: &Guid| {
        entries
            .iter()
            .find(|e| e.guid == *guid && e.flags & META_IS_USER == 0)
    };
    let item = |guid: &Guid, name: &str, min_len: u32| -> Result<&[u8]> {
        let e = find(guid).ok_or_else(|| corrupt(format!("required item {name} is missing")))?;
        if e.length < min_len {
            return Err(corrupt(format!(
                "item {name} length {} is below {min_len}",
                e.length
            )));
        }
        Ok(&region[e.offset as usize..(e.offset + e.length) as usize])
    };
    for e in &entries {
        let known = [
            GUID_FILE_PARAMS,
            GUID_VDISK_SIZE,
            GUID_PAGE83,
            GUID_LOGICAL_SECTOR,
            GUID_PHYSICAL_SECTOR,
            GUID_PARENT_LOCATOR,
        ];
        if e.flags & META_IS_REQUIRED != 0
            && (e.flags & META_IS_USER != 0 || !known.contains(&e.guid))
        {
            return Err(Error::Unsupported(format!(
                "VHDX metadata item {} is marked required but is unknown to this implementation",
                e.guid
            )));
        }
    }
    // The minimum lengths checked by `item` make these decodes infallible.
    let bad = |name: &'static str| move |err: binrw::Error| corrupt(format!("item {name}: {err}"));
    let fp: FileParameters =
        decode(item(&GUID_FILE_PARAMS, "file parameters", 8)?).map_err(bad("file parameters"))?;
    let block_size = fp.block_size;
    if !(MIB as u32..=256 * MIB as u32).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(corrupt(format!(
            "block size {block_size} is not a power of 2 in 1..256 MiB"
        )));
    }
    let virtual_size = decode::<VirtualDiskSize>(item(&GUID_VDISK_SIZE, "virtual disk size", 8)?)
        .map_err(bad("virtual disk size"))?
        .size;
    let page83 = decode::<Page83>(item(&GUID_PAGE83, "page 83 data", 16)?)
        .map_err(bad("page 83 data"))?
        .id;
    let logical_sector =
        decode::<SectorSize>(item(&GUID_LOGICAL_SECTOR, "logical sector size", 4)?)
            .map_err(bad("logical sector size"))?
            .size;
    let physical_sector =
        decode::<SectorSize>(item(&GUID_PHYSICAL_SECTOR, "physical sector size", 4)?)
            .map_err(bad("physical sector size"))?
            .size;
    if logical_sector != 512 && logical_sector != 4096 {
        return Err(corrupt(format!(
            "logical sector size {logical_sector}, expected 512 or 4096"
        )));
    }
    if physical_sector != 512 && physical_sector != 4096 {
        return Err(corrupt(format!(
            "physical sector size {physical_sector}, expected 512 or 4096"
        )));
    }
    if virtual_size > MAX_SIZE || !virtual_size.is_multiple_of(logical_sector as u64) {
        return Err(corrupt(format!(
            "virtual disk size {virtual_size} is not a multiple of {logical_sector} up to 64 TiB"
        )));
    }
    let has_parent = fp.flags & 2 != 0;
    let parent_locator = match find(&GUID_PARENT_LOCATOR) {
        Some(e) if has_parent => Some(ParentLocator::parse(
            &region[e.offset as usize..(e.offset + e.length) as usize],
            offset + e.offset as u64,
        )?),
        _ => None,
    };
    if has_parent && parent_locator.is_none() {
        return Err(corrupt(
            "HasParent is set but the parent locator item is missing".into(),
        ));
    }
    // The parent's identity is what makes a differencing disk safe to read: without a
    // readable `parent_linkage` any file could be taken for the parent.
    if let Some(loc) = &parent_locator {
        match loc.get("parent_linkage") {
            None => {
                return Err(corrupt(
                    "the parent locator has no parent_linkage (the parent's identity)".into(),
                ))
            }
            Some(v) if disk::Guid::parse(v).is_none() => {
                return Err(corrupt(format!(
                    "the parent locator's parent_linkage {v:?} is not a GUID"
                )))
            }
            Some(_) => {}
        }
    }
    Ok(Metadata {
        block_size,
        leave_blocks_allocated: fp.flags & 1 != 0,
        has_parent,
        virtual_size,
        page83,
        logical_sector,
        physical_sector,
        parent_locator,
        entries,
    })
}

/// Builds a metadata region (`len` bytes) with the system items and an optional locator.
pub fn build_metadata(m: &Metadata, len: usize) -> Vec<u8> {
    let mut r = vec![0u8; len];
    let fp = encode_vec(&FileParameters {
        block_size: m.block_size,
        flags: (m.leave_blocks_allocated as u32) | ((m.has_parent as u32) << 1),
    });
    let vdisk = META_IS_REQUIRED | META_IS_VDISK;
    let mut items: Vec<(Guid, Vec<u8>, u32)> = vec![
        (GUID_FILE_PARAMS, fp, META_IS_REQUIRED),
        (GUID_VDISK_SIZE, virtual_size_item(m.virtual_size), vdisk),
        (GUID_PAGE83, page83_item(m.page83), vdisk),
        (
            GUID_LOGICAL_SECTOR,
            sector_size_item(m.logical_sector),
            vdisk,
        ),
        (
            GUID_PHYSICAL_SECTOR,
            sector_size_item(m.physical_sector),
            vdisk,
        ),
    ];
    if let Some(pl) = &m.parent_locator {
        items.push((GUID_PARENT_LOCATOR, pl.serialize(), META_IS_REQUIRED));
    }
    encode(
        &MetadataTableHeader {
            reserved: 0,
            entry_count: items.len() as u16,
            reserved2: [0; 20],
        },
        &mut r,
    );
    let mut pos = TABLE_SIZE;
    for (i, (guid, data, flags)) in items.iter().enumerate() {
        write_table_entry(
            &mut r,
            i,
            &MetaEntry {
                guid: *guid,
                offset: pos as u32,
                length: data.len() as u32,
                flags: *flags,
                reserved: 0,
            },
        );
        r[pos..pos + data.len()].copy_from_slice(data);
        pos += data.len().div_ceil(8) * 8;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips() {
        let m = Metadata {
            block_size: 32 << 20,
            leave_blocks_allocated: false,
            has_parent: true,
            virtual_size: 10 << 30,
            page83: Guid::from_str_const("01234567-89ab-cdef-0123-456789abcdef"),
            logical_sector: 4096,
            physical_sector: 512,
            parent_locator: Some(ParentLocator {
                entries: vec![
                    (
                        "parent_linkage".into(),
                        "{01234567-89ab-cdef-0123-456789abcdef}".into(),
                    ),
                    ("relative_path".into(), "b.vhdx".into()),
                ],
            }),
            entries: Vec::new(),
        };
        let r = build_metadata(&m, MIB as usize);
        assert_eq!(&r[0..8], b"metadata");
        assert_eq!(r[10], 6, "entry count at offset 10");
        let p = parse_metadata(&r, 0).unwrap();
        assert_eq!(p.block_size, m.block_size);
        assert!(p.has_parent && !p.leave_blocks_allocated);
        assert_eq!(p.virtual_size, m.virtual_size);
        assert_eq!(p.page83, m.page83);
        assert_eq!((p.logical_sector, p.physical_sector), (4096, 512));
        assert_eq!(
            p.parent_locator.unwrap().get("relative_path"),
            Some("b.vhdx")
        );
        let t = read_table(&r);
        assert_eq!(t.len(), 6);
        assert_eq!(t[0].guid, GUID_FILE_PARAMS);
        assert_eq!(t[0].offset, 64 * 1024);
    }
}

//! The file layout of VHDX and the public face of its on-disk structures, for tools, fuzzers and
//! tests that build or damage images. Each structure is defined once, in its own module, as a
//! typed struct that both parses and writes; this module names where things are and re-exports
//! them. The facts are in docs/vhdx.md.

pub use crate::bat_entry::{
    bat_entry, bat_offset, bat_state, PB_FULLY_PRESENT, PB_NOT_PRESENT, PB_PARTIALLY_PRESENT,
    PB_UNDEFINED, PB_UNMAPPED, PB_UNMAPPED_V095, PB_ZERO, SB_PRESENT,
};
pub use crate::checksum::{crc32c, crc32c_skip};
pub use crate::geometry::Geometry;
pub use crate::header::{FileIdentifier, Header};
pub use crate::locator::{ParentLocator, GUID_LOCATOR_TYPE_VHDX};
pub use crate::metadata::{
    build_metadata, parse_metadata, MetaEntry, Metadata, GUID_FILE_PARAMS, GUID_LOGICAL_SECTOR,
    GUID_PAGE83, GUID_PARENT_LOCATOR, GUID_PHYSICAL_SECTOR, GUID_VDISK_SIZE, META_IS_REQUIRED,
    META_IS_USER, META_IS_VDISK,
};
pub use crate::region::{RegionEntry, RegionTable, GUID_BAT, GUID_METADATA};
pub use disk::Guid;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// The header section (the first 1 MiB): file type identifier at 0, two headers, two region
/// tables.
pub const HEADER1_OFFSET: u64 = 64 * KIB;
pub const HEADER2_OFFSET: u64 = 128 * KIB;
pub const RT1_OFFSET: u64 = 192 * KIB;
pub const RT2_OFFSET: u64 = 256 * KIB;
/// Bytes covered by a header's checksum.
pub const HEADER_SIZE: usize = 4096;
/// Bytes covered by a region table's checksum.
pub const RT_SIZE: usize = 64 * 1024;
/// The largest virtual disk.
pub const MAX_SIZE: u64 = 64 << 40;
/// The unit of the log and of metadata updates.
pub const PAGE: u64 = 4096;

/// The file type identifier's signature, at offset 0.
pub const SIG_FILE: &[u8; 8] = b"vhdxfile";

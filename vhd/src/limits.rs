//! Units and the size limits this crate enforces (docs/vhd.md, "Sizes and limits").

/// Every VHD offset and size counts 512-byte sectors.
pub const SECTOR: u64 = 512;
/// Largest CHS geometry (65535 cylinders, 16 heads, 255 sectors per track); qemu reads it as
/// "use current_size".
pub const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;
/// Largest dynamic or differencing disk Hyper-V and qemu accept (2040 GiB).
pub const MAX_DYNAMIC_SIZE: u64 = 0xff00_0000 * SECTOR;
/// Largest fixed VHD Azure accepts (32 TiB).
pub const MAX_FIXED_SIZE: u64 = 32 << 40;
/// Block sizes we accept when reading (qemu rejects 0x80000000; this keeps bitmaps small).
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Most BAT entries an image may use (a 256 MiB table; 2 TiB at 32 KiB blocks).
pub const MAX_BAT_ENTRIES: u64 = 1 << 26;
/// Longest parent locator payload we read (a 32K-unit UTF-16 path).
pub const MAX_LOCATOR_LEN: u32 = 64 << 10;

//! Partition tables: MBR (primary, extended and logical partitions) and GPT behind a protective
//! MBR.
//!
//! The input is treated as hostile: every loop is bounded, every offset is checked against the
//! disk size, GPT headers and entry arrays must pass their CRC32, partitions that start past the
//! end of the disk are dropped and partitions that run past it are clipped (both are reported in
//! [`Partition::clipped`] / [`PartitionTable::dropped`]).
//!
//! Numbering follows Linux: MBR primary slots are 1..=4 (empty slots leave gaps), logical
//! partitions start at 5 in chain order, GPT partitions are their entry index + 1.

use std::collections::HashSet;

use disk::BlockDevice;

/// Most logical partitions followed in an extended-partition chain (Linux stops far earlier in
/// practice; this bounds hostile chains).
pub const MAX_LOGICAL: usize = 128;
/// Largest GPT partition-entry array we read (the usual array is 16 KiB).
pub const MAX_GPT_ARRAY: u64 = 4 << 20;

/// Errors from [`partitions`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PartitionError {
    #[error("cannot read partition table: {0}")]
    Read(#[from] disk::Error),
    /// A protective MBR promises a GPT, but neither the primary nor the backup header is valid.
    #[error("invalid GPT: primary header: {primary}; backup header: {backup}")]
    InvalidGpt { primary: String, backup: String },
}

/// Which table a partition came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Mbr,
    Gpt,
}

/// What the table says about a partition's kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartitionKind {
    /// MBR entry: the system-ID byte, the boot flag, and whether it is a logical partition.
    Mbr {
        type_id: u8,
        bootable: bool,
        logical: bool,
    },
    /// GPT entry: type and unique GUIDs (as the 16 bytes stored on disk), attribute bits and name.
    Gpt {
        type_guid: [u8; 16],
        unique_guid: [u8; 16],
        attributes: u64,
        name: String,
    },
}

/// One partition: an exact byte range of the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Linux-style partition number (1-based; logical MBR partitions start at 5).
    pub number: u32,
    /// Byte offset of the first byte on the disk.
    pub start: u64,
    /// Length in bytes (after clipping to the disk end).
    pub len: u64,
    pub scheme: Scheme,
    pub kind: PartitionKind,
    /// The table entry ran past the end of the disk and was shortened to fit.
    pub clipped: bool,
}

impl Partition {
    /// File name used by the FUSE view: `p1`, `p2`, ...
    pub fn file_name(&self) -> String {
        format!("p{}", self.number)
    }
}

/// The result of parsing: partitions plus a note for every entry that was rejected.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionTable {
    /// `None` when the disk has no recognised partition table.
    pub scheme: Option<Scheme>,
    /// Partitions sorted by number.
    pub partitions: Vec<Partition>,
    /// Human-readable notes about entries that were dropped (start past the disk end, EBR loops,
    /// chain too long, ...).
    pub dropped: Vec<String>,
}

/// Parses the partition table of `disk` and returns its partitions (empty when there is none).
pub fn partitions(disk: &dyn BlockDevice) -> Result<Vec<Partition>, PartitionError> {
    Ok(read_table(disk)?.partitions)
}

/// Like [`partitions`], with the scheme and the notes about rejected entries.
pub fn read_table(disk: &dyn BlockDevice) -> Result<PartitionTable, PartitionError> {
    let size = disk.size();
    let sector = u64::from(disk.logical_sector_size().max(512));
    let mut table = PartitionTable::default();
    if size < 512 {
        return Ok(table);
    }
    let mut mbr = [0u8; 512];
    disk.read_at(&mut mbr, 0)?;
    if mbr[510] != 0x55 || mbr[511] != 0xAA {
        return Ok(table);
    }
    let entries: Vec<MbrEntry> = (0..4).map(|i| MbrEntry::parse(&mbr, i)).collect();
    if entries.iter().any(|e| e.type_id == 0xEE) {
        table.scheme = Some(Scheme::Gpt);
        read_gpt(disk, sector, &mut table)?;
    } else {
        // A FAT or NTFS boot sector also ends in 55 AA; require every used slot to have a
        // plausible boot flag, as Linux does.
        if entries
            .iter()
            .any(|e| e.type_id != 0 && e.status != 0 && e.status != 0x80)
        {
            return Ok(table);
        }
        table.scheme = Some(Scheme::Mbr);
        read_mbr(disk, sector, &entries, &mut table)?;
    }
    table.partitions.sort_by_key(|p| p.number);
    Ok(table)
}

#[derive(Clone, Copy, Debug)]
struct MbrEntry {
    status: u8,
    type_id: u8,
    lba: u32,
    sectors: u32,
}

impl MbrEntry {
    fn parse(sector: &[u8], index: usize) -> Self {
        let o = 446 + 16 * index;
        MbrEntry {
            status: sector[o],
            type_id: sector[o + 4],
            lba: le32(&sector[o + 8..o + 12]),
            sectors: le32(&sector[o + 12..o + 16]),
        }
    }

    fn is_extended(&self) -> bool {
        matches!(self.type_id, 0x05 | 0x0F | 0x85)
    }
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Adds a partition covering `first..first+count` sectors, clipping or dropping as needed.
fn push_range(
    table: &mut PartitionTable,
    disk_size: u64,
    sector: u64,
    number: u32,
    first: u64,
    count: u64,
    kind: PartitionKind,
) {
    let scheme = match kind {
        PartitionKind::Mbr { .. } => Scheme::Mbr,
        PartitionKind::Gpt { .. } => Scheme::Gpt,
    };
    let start = first.saturating_mul(sector);
    let len = count.saturating_mul(sector);
    if count == 0 {
        table
            .dropped
            .push(format!("partition {number}: zero length"));
        return;
    }
    if start >= disk_size {
        table.dropped.push(format!(
            "partition {number}: starts at byte {start}, past the end of the disk ({disk_size})"
        ));
        return;
    }
    let avail = disk_size - start;
    let clipped = len > avail;
    table.partitions.push(Partition {
        number,
        start,
        len: len.min(avail),
        scheme,
        kind,
        clipped,
    });
}

fn read_mbr(
    disk: &dyn BlockDevice,
    sector: u64,
    entries: &[MbrEntry],
    table: &mut PartitionTable,
) -> Result<(), PartitionError> {
    let size = disk.size();
    let mut extended: Option<MbrEntry> = None;
    for (i, e) in entries.iter().enumerate() {
        if e.type_id == 0 || e.sectors == 0 {
            continue;
        }
        if e.is_extended() {
            // Linux follows only the first extended partition; so do we.
            if extended.is_none() {
                extended = Some(*e);
            } else {
                table
                    .dropped
                    .push(format!("partition {}: second extended partition", i + 1));
            }
            continue;
        }
        push_range(
            table,
            size,
            sector,
            (i + 1) as u32,
            u64::from(e.lba),
            u64::from(e.sectors),
            PartitionKind::Mbr {
                type_id: e.type_id,
                bootable: e.status == 0x80,
                logical: false,
            },
        );
    }
    if let Some(ext) = extended {
        read_logical(disk, sector, ext, table)?;
    }
    Ok(())
}

/// Walks the chain of extended boot records inside the extended partition `ext`.
fn read_logical(
    disk: &dyn BlockDevice,
    sector: u64,
    ext: MbrEntry,
    table: &mut PartitionTable,
) -> Result<(), PartitionError> {
    let size = disk.size();
    let ext_start = u64::from(ext.lba);
    let ext_end = ext_start + u64::from(ext.sectors); // exclusive, in sectors
    let mut ebr_lba = ext_start;
    let mut seen = HashSet::new();
    let mut number = 5u32;
    let mut buf = [0u8; 512];
    for _ in 0..MAX_LOGICAL + 1 {
        if !seen.insert(ebr_lba) {
            table.dropped.push(format!(
                "extended partition: EBR chain loops back to sector {ebr_lba}"
            ));
            return Ok(());
        }
        if ebr_lba < ext_start || ebr_lba >= ext_end {
            table.dropped.push(format!(
                "extended partition: EBR at sector {ebr_lba} lies outside the extended partition"
            ));
            return Ok(());
        }
        let off = ebr_lba.saturating_mul(sector);
        if off.saturating_add(512) > size {
            table.dropped.push(format!(
                "extended partition: EBR at sector {ebr_lba} is past the end of the disk"
            ));
            return Ok(());
        }
        disk.read_at(&mut buf, off)?;
        if buf[510] != 0x55 || buf[511] != 0xAA {
            table.dropped.push(format!(
                "extended partition: EBR at sector {ebr_lba} has no 55 AA signature"
            ));
            return Ok(());
        }
        if number as usize - 5 >= MAX_LOGICAL {
            table.dropped.push(format!(
                "extended partition: more than {MAX_LOGICAL} logical partitions; rest ignored"
            ));
            return Ok(());
        }
        let data = MbrEntry::parse(&buf, 0);
        let link = MbrEntry::parse(&buf, 1);
        if data.type_id != 0 && data.sectors != 0 && !data.is_extended() {
            let first = ebr_lba + u64::from(data.lba);
            let mut count = u64::from(data.sectors);
            // A logical partition must stay inside its extended partition.
            if first >= ext_end {
                table.dropped.push(format!(
                    "partition {number}: starts outside the extended partition"
                ));
            } else {
                let mut clipped_ext = false;
                if first + count > ext_end {
                    count = ext_end - first;
                    clipped_ext = true;
                }
                push_range(
                    table,
                    size,
                    sector,
                    number,
                    first,
                    count,
                    PartitionKind::Mbr {
                        type_id: data.type_id,
                        bootable: data.status == 0x80,
                        logical: true,
                    },
                );
                if clipped_ext {
                    if let Some(p) = table.partitions.last_mut() {
                        if p.number == number {
                            p.clipped = true;
                        }
                    }
                }
            }
            number += 1;
        }
        if !link.is_extended() || link.lba == 0 {
            return Ok(());
        }
        ebr_lba = ext_start + u64::from(link.lba);
    }
    table.dropped.push(format!(
        "extended partition: chain longer than {MAX_LOGICAL} records; rest ignored"
    ));
    Ok(())
}

/// A validated GPT header.
struct GptHeader {
    first_usable: u64,
    last_usable: u64,
    entries_lba: u64,
    entry_count: u32,
    entry_size: u32,
    entries_crc: u32,
}

fn parse_gpt_header(
    disk: &dyn BlockDevice,
    sector: u64,
    lba: u64,
) -> Result<Result<GptHeader, String>, PartitionError> {
    let size = disk.size();
    let off = match lba.checked_mul(sector) {
        Some(o) if o.saturating_add(sector) <= size => o,
        _ => return Ok(Err(format!("sector {lba} is past the end of the disk"))),
    };
    let mut buf = vec![0u8; sector as usize];
    disk.read_at(&mut buf, off)?;
    if &buf[0..8] != b"EFI PART" {
        return Ok(Err(format!("no \"EFI PART\" signature at sector {lba}")));
    }
    let header_size = le32(&buf[12..16]) as usize;
    if header_size < 92 || header_size > buf.len() {
        return Ok(Err(format!("header size {header_size} out of range")));
    }
    let stored_crc = le32(&buf[16..20]);
    let mut h = buf[..header_size].to_vec();
    h[16..20].fill(0);
    let crc = crc32(&h);
    if crc != stored_crc {
        return Ok(Err(format!(
            "header CRC32 {stored_crc:#010x} does not match computed {crc:#010x}"
        )));
    }
    let my_lba = le64(&buf[24..32]);
    if my_lba != lba {
        return Ok(Err(format!(
            "header at sector {lba} says it is at sector {my_lba}"
        )));
    }
    let header = GptHeader {
        first_usable: le64(&buf[40..48]),
        last_usable: le64(&buf[48..56]),
        entries_lba: le64(&buf[72..80]),
        entry_count: le32(&buf[80..84]),
        entry_size: le32(&buf[84..88]),
        entries_crc: le32(&buf[88..92]),
    };
    if header.entry_size < 128 || !header.entry_size.is_power_of_two() {
        return Ok(Err(format!("entry size {} invalid", header.entry_size)));
    }
    let array = u64::from(header.entry_count) * u64::from(header.entry_size);
    if array > MAX_GPT_ARRAY {
        return Ok(Err(format!("entry array of {array} bytes is too large")));
    }
    match header.entries_lba.checked_mul(sector) {
        Some(o) if o.saturating_add(array) <= size => {}
        _ => return Ok(Err("entry array lies past the end of the disk".to_string())),
    }
    if header.first_usable > header.last_usable {
        return Ok(Err(
            "first usable LBA is after the last usable LBA".to_string()
        ));
    }
    Ok(Ok(header))
}

fn read_gpt(
    disk: &dyn BlockDevice,
    sector: u64,
    table: &mut PartitionTable,
) -> Result<(), PartitionError> {
    let size = disk.size();
    if size / sector < 3 {
        return Err(PartitionError::InvalidGpt {
            primary: "disk too small for a GPT".to_string(),
            backup: "disk too small for a GPT".to_string(),
        });
    }
    let last_lba = size / sector - 1;
    let header = match parse_gpt_header(disk, sector, 1)? {
        Ok(h) => match read_gpt_entries(disk, sector, &h)? {
            Ok(entries) => Some((h, entries)),
            Err(e) => {
                table.dropped.push(format!("primary GPT: {e}"));
                None
            }
        },
        Err(e) => {
            table.dropped.push(format!("primary GPT header: {e}"));
            None
        }
    };
    let (header, entries) = match header {
        Some(x) => x,
        None => {
            let primary = table.dropped.last().cloned().unwrap_or_default();
            let backup = match parse_gpt_header(disk, sector, last_lba)? {
                Ok(h) => match read_gpt_entries(disk, sector, &h)? {
                    Ok(entries) => {
                        table
                            .dropped
                            .push("using the backup GPT header".to_string());
                        return finish_gpt(table, size, sector, &h, &entries);
                    }
                    Err(e) => e,
                },
                Err(e) => e,
            };
            return Err(PartitionError::InvalidGpt { primary, backup });
        }
    };
    finish_gpt(table, size, sector, &header, &entries)
}

fn read_gpt_entries(
    disk: &dyn BlockDevice,
    sector: u64,
    h: &GptHeader,
) -> Result<Result<Vec<u8>, String>, PartitionError> {
    let len = u64::from(h.entry_count) * u64::from(h.entry_size);
    let mut buf = vec![0u8; len as usize];
    disk.read_at(&mut buf, h.entries_lba * sector)?;
    let crc = crc32(&buf);
    if crc != h.entries_crc {
        return Ok(Err(format!(
            "entry array CRC32 {:#010x} does not match computed {crc:#010x}",
            h.entries_crc
        )));
    }
    Ok(Ok(buf))
}

fn finish_gpt(
    table: &mut PartitionTable,
    size: u64,
    sector: u64,
    h: &GptHeader,
    entries: &[u8],
) -> Result<(), PartitionError> {
    let esize = h.entry_size as usize;
    for (i, e) in entries.chunks_exact(esize).enumerate() {
        let mut type_guid = [0u8; 16];
        type_guid.copy_from_slice(&e[0..16]);
        if type_guid == [0u8; 16] {
            continue;
        }
        let number = (i + 1) as u32;
        let mut unique_guid = [0u8; 16];
        unique_guid.copy_from_slice(&e[16..32]);
        let first = le64(&e[32..40]);
        let last = le64(&e[40..48]);
        let attributes = le64(&e[48..56]);
        let units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let name = String::from_utf16_lossy(&units);
        if last < first {
            table.dropped.push(format!(
                "partition {number}: last LBA {last} before first LBA {first}"
            ));
            continue;
        }
        if first < h.first_usable || last > h.last_usable {
            table.dropped.push(format!(
                "partition {number}: LBAs {first}..={last} outside the usable range {}..={} (kept)",
                h.first_usable, h.last_usable
            ));
        }
        push_range(
            table,
            size,
            sector,
            number,
            first,
            last - first + 1,
            PartitionKind::Gpt {
                type_guid,
                unique_guid,
                attributes,
                name,
            },
        );
    }
    Ok(())
}

/// CRC-32 (IEEE 802.3, reflected, as GPT uses), bitwise with a small nibble table.
pub fn crc32(data: &[u8]) -> u32 {
    const POLY: u32 = 0xEDB8_8320;
    const fn nibble_table() -> [u32; 16] {
        let mut t = [0u32; 16];
        let mut i = 0;
        while i < 16 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 4 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    const TABLE: [u32; 16] = nibble_table();
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        c = (c >> 4) ^ TABLE[(c & 0xF) as usize];
        c = (c >> 4) ^ TABLE[(c & 0xF) as usize];
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::RawDisk;

    fn mem(size: u64) -> disk::Disk {
        disk::Disk::new(std::sync::Arc::new(RawDisk::memory(size).unwrap()))
    }

    fn mbr_entry(sector: &mut [u8], slot: usize, status: u8, type_id: u8, lba: u32, count: u32) {
        let o = 446 + 16 * slot;
        sector[o] = status;
        sector[o + 4] = type_id;
        sector[o + 8..o + 12].copy_from_slice(&lba.to_le_bytes());
        sector[o + 12..o + 16].copy_from_slice(&count.to_le_bytes());
    }

    fn sig(sector: &mut [u8]) {
        sector[510] = 0x55;
        sector[511] = 0xAA;
    }

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn no_table() {
        let d = mem(1 << 20);
        assert!(partitions(&d).unwrap().is_empty());
        let d = mem(100);
        assert!(partitions(&d).unwrap().is_empty());
    }

    #[test]
    fn boot_sector_is_not_a_table() {
        let d = mem(1 << 20);
        let mut s = [0u8; 512];
        sig(&mut s);
        // A FAT boot sector has code/data where the entries would be.
        mbr_entry(&mut s, 0, 0x31, 0x06, 1, 10);
        d.write_at(&s, 0).unwrap();
        let t = read_table(&d).unwrap();
        assert_eq!(t.scheme, None);
    }

    #[test]
    fn mbr_primary_extended_logical() {
        let d = mem(64 << 20);
        let mut s = [0u8; 512];
        sig(&mut s);
        mbr_entry(&mut s, 0, 0x80, 0x83, 2048, 8192);
        mbr_entry(&mut s, 1, 0, 0x05, 16384, 65536);
        mbr_entry(&mut s, 3, 0, 0x07, 100_000, 1000);
        d.write_at(&s, 0).unwrap();
        // Three logical partitions, each EBR at the start of its slot.
        let ebrs = [
            (16384u32, 2048u32, 4096u32),
            (24576, 2048, 4096),
            (40960, 2048, 50000),
        ];
        for (i, (lba, rel, count)) in ebrs.iter().enumerate() {
            let mut e = [0u8; 512];
            sig(&mut e);
            mbr_entry(&mut e, 0, 0, 0x83, *rel, *count);
            if let Some(next) = ebrs.get(i + 1) {
                mbr_entry(&mut e, 1, 0, 0x05, next.0 - 16384, 8192);
            }
            d.write_at(&e, u64::from(*lba) * 512).unwrap();
        }
        let t = read_table(&d).unwrap();
        assert_eq!(t.scheme, Some(Scheme::Mbr));
        let nums: Vec<u32> = t.partitions.iter().map(|p| p.number).collect();
        assert_eq!(nums, vec![1, 4, 5, 6, 7]);
        let p1 = &t.partitions[0];
        assert_eq!((p1.start, p1.len), (2048 * 512, 8192 * 512));
        assert!(matches!(
            p1.kind,
            PartitionKind::Mbr {
                bootable: true,
                type_id: 0x83,
                logical: false
            }
        ));
        let p6 = &t.partitions[3];
        assert_eq!((p6.start, p6.len), ((24576 + 2048) * 512, 4096 * 512));
        assert!(matches!(p6.kind, PartitionKind::Mbr { logical: true, .. }));
        let p7 = &t.partitions[4];
        assert_eq!(p7.start, (40960 + 2048) * 512);
        // The last logical partition runs past the extended partition's end: clipped to it.
        assert_eq!(p7.start + p7.len, (16384 + 65536) * 512);
        assert!(p7.clipped);
        assert_eq!(t.partitions[1].file_name(), "p4");
    }

    #[test]
    fn ebr_loop_is_bounded() {
        let d = mem(16 << 20);
        let mut s = [0u8; 512];
        sig(&mut s);
        mbr_entry(&mut s, 0, 0, 0x0F, 2048, 20000);
        d.write_at(&s, 0).unwrap();
        // EBR A (sector 2048) links to EBR B (4096); B links to itself.
        for (lba, link) in [(2048u32, 2048u32), (4096, 2048)] {
            let mut e = [0u8; 512];
            sig(&mut e);
            mbr_entry(&mut e, 0, 0, 0x83, 1, 10);
            mbr_entry(&mut e, 1, 0, 0x05, link, 10);
            d.write_at(&e, u64::from(lba) * 512).unwrap();
        }
        let t = read_table(&d).unwrap();
        assert_eq!(t.partitions.len(), 2);
        assert!(
            t.dropped.iter().any(|m| m.contains("loops")),
            "{:?}",
            t.dropped
        );
    }

    #[test]
    fn long_ebr_chain_is_capped() {
        let d = mem(64 << 20);
        let mut s = [0u8; 512];
        sig(&mut s);
        mbr_entry(&mut s, 0, 0, 0x05, 2048, 120_000);
        d.write_at(&s, 0).unwrap();
        for i in 0..200u32 {
            let mut e = [0u8; 512];
            sig(&mut e);
            mbr_entry(&mut e, 0, 0, 0x83, 1, 100);
            mbr_entry(&mut e, 1, 0, 0x05, (i + 1) * 200, 200);
            d.write_at(&e, u64::from(2048 + i * 200) * 512).unwrap();
        }
        let t = read_table(&d).unwrap();
        assert_eq!(t.partitions.len(), MAX_LOGICAL);
        assert_eq!(t.partitions.last().unwrap().number, 4 + MAX_LOGICAL as u32);
    }

    #[test]
    fn entries_past_the_end() {
        let d = mem(1 << 20); // 2048 sectors
        let mut s = [0u8; 512];
        sig(&mut s);
        mbr_entry(&mut s, 0, 0, 0x83, 1024, 4096); // runs past the end: clipped
        mbr_entry(&mut s, 1, 0, 0x83, 5000, 10); // starts past the end: dropped
        mbr_entry(&mut s, 2, 0, 0x83, u32::MAX, u32::MAX); // overflow-prone: dropped
        mbr_entry(&mut s, 3, 0, 0x05, 0xFFFF_0000, 100); // extended past the end
        d.write_at(&s, 0).unwrap();
        let t = read_table(&d).unwrap();
        assert_eq!(t.partitions.len(), 1);
        let p = &t.partitions[0];
        assert_eq!((p.start, p.len, p.clipped), (1024 * 512, 1024 * 512, true));
        assert_eq!(t.dropped.len(), 3, "{:?}", t.dropped);
    }

    /// Writes a GPT (primary and backup) with the given (first, last, name) entries.
    fn write_gpt(d: &disk::Disk, parts: &[(u64, u64, &str)]) {
        let sectors = d.size() / 512;
        let mut s = [0u8; 512];
        sig(&mut s);
        mbr_entry(
            &mut s,
            0,
            0,
            0xEE,
            1,
            (sectors - 1).min(u64::from(u32::MAX)) as u32,
        );
        d.write_at(&s, 0).unwrap();
        let mut entries = vec![0u8; 128 * 128];
        for (i, (first, last, name)) in parts.iter().enumerate() {
            let e = &mut entries[i * 128..(i + 1) * 128];
            e[0..16].copy_from_slice(&[0xAF; 16]);
            e[16..32].copy_from_slice(&[i as u8 + 1; 16]);
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
            for (k, u) in name.encode_utf16().enumerate() {
                e[56 + 2 * k..58 + 2 * k].copy_from_slice(&u.to_le_bytes());
            }
        }
        let ecrc = crc32(&entries);
        for (my, alt, elba) in [(1, sectors - 1, 2), (sectors - 1, 1, sectors - 33)] {
            let mut h = [0u8; 512];
            h[0..8].copy_from_slice(b"EFI PART");
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&my.to_le_bytes());
            h[32..40].copy_from_slice(&alt.to_le_bytes());
            h[40..48].copy_from_slice(&34u64.to_le_bytes());
            h[48..56].copy_from_slice(&(sectors - 34).to_le_bytes());
            h[72..80].copy_from_slice(&elba.to_le_bytes());
            h[80..84].copy_from_slice(&128u32.to_le_bytes());
            h[84..88].copy_from_slice(&128u32.to_le_bytes());
            h[88..92].copy_from_slice(&ecrc.to_le_bytes());
            let c = crc32(&h[..92]);
            h[16..20].copy_from_slice(&c.to_le_bytes());
            d.write_at(&h, my * 512).unwrap();
            d.write_at(&entries, elba * 512).unwrap();
        }
    }

    #[test]
    fn gpt_parses_and_validates() {
        let d = mem(8 << 20);
        write_gpt(
            &d,
            &[(2048, 4095, "boot"), (4096, 16000, "root"), (0, 0, "")],
        );
        // Third entry: first == last == 0 with a nonzero type: a one-sector partition at LBA 0.
        let t = read_table(&d).unwrap();
        assert_eq!(t.scheme, Some(Scheme::Gpt));
        assert_eq!(t.partitions.len(), 3);
        let p2 = &t.partitions[1];
        assert_eq!(
            (p2.number, p2.start, p2.len),
            (2, 4096 * 512, (16000 - 4096 + 1) * 512)
        );
        match &p2.kind {
            PartitionKind::Gpt {
                name, unique_guid, ..
            } => {
                assert_eq!(name, "root");
                assert_eq!(unique_guid, &[2u8; 16]);
            }
            k => panic!("{k:?}"),
        }
        // Outside the usable range is kept but noted.
        assert!(t.dropped.iter().any(|m| m.contains("partition 3")));
    }

    #[test]
    fn gpt_bad_primary_uses_backup() {
        let d = mem(8 << 20);
        write_gpt(&d, &[(2048, 4095, "a")]);
        // Corrupt one byte of the primary header (covered by its CRC).
        d.write_at(&[0x99], 512 + 40).unwrap();
        let t = read_table(&d).unwrap();
        assert_eq!(t.partitions.len(), 1);
        assert!(
            t.dropped.iter().any(|m| m.contains("CRC32")),
            "{:?}",
            t.dropped
        );
        assert!(t.dropped.iter().any(|m| m.contains("backup")));
    }

    #[test]
    fn gpt_bad_entries_and_backup_is_an_error() {
        let d = mem(8 << 20);
        write_gpt(&d, &[(2048, 4095, "a")]);
        let sectors = d.size() / 512;
        // Corrupt the primary entry array and the backup header.
        d.write_at(&[1], 2 * 512 + 40).unwrap();
        d.write_at(&[1], (sectors - 1) * 512 + 40).unwrap();
        match read_table(&d) {
            Err(PartitionError::InvalidGpt { primary, backup }) => {
                assert!(primary.contains("entry array CRC32"), "{primary}");
                assert!(backup.contains("CRC32"), "{backup}");
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn gpt_hostile_sizes() {
        let d = mem(8 << 20);
        write_gpt(
            &d,
            &[
                (2048, 4095, "a"),
                (5000, 1 << 40, "huge"),
                (1 << 40, 1 << 41, "far"),
            ],
        );
        let t = read_table(&d).unwrap();
        let nums: Vec<u32> = t.partitions.iter().map(|p| p.number).collect();
        assert_eq!(nums, vec![1, 2]);
        assert!(t.partitions[1].clipped);
        assert_eq!(t.partitions[1].start + t.partitions[1].len, d.size());
    }

    /// Random garbage behind valid signatures never panics, never loops, and every partition
    /// returned lies inside the disk.
    #[test]
    fn random_tables_are_safe() {
        let mut x = 0x1234_5678_9ABC_DEF0u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..300 {
            let size = 512 * (64 + next() % 2048);
            let d = mem(size);
            let sectors = size / 512;
            // Random sectors, each with a 55 AA signature and random plausible entries.
            for i in 0..40 {
                let lba = if i == 0 { 0 } else { next() % sectors };
                let mut s = [0u8; 512];
                for b in s.iter_mut() {
                    *b = next() as u8;
                }
                sig(&mut s);
                for slot in 0..4 {
                    let ty = [0x05, 0x0F, 0x83, 0xEE, 0x00][(next() % 5) as usize];
                    let lba = (next() % (sectors + 10)) as u32;
                    let count = if next() % 4 == 0 {
                        u32::MAX
                    } else {
                        (next() % sectors) as u32
                    };
                    let status = if next() % 2 == 0 { 0 } else { 0x80 };
                    mbr_entry(&mut s, slot, status, ty, lba, count);
                }
                if next() % 3 == 0 {
                    s[0..8].copy_from_slice(b"EFI PART");
                }
                d.write_at(&s, lba * 512).unwrap();
            }
            if next() % 2 == 0 {
                let parts: Vec<(u64, u64, &str)> = (0..(next() % 6))
                    .map(|_| (next() % (sectors * 2), next() % (sectors * 2), "x"))
                    .collect();
                if sectors > 80 {
                    write_gpt(&d, &parts);
                }
            }
            if let Ok(t) = read_table(&d) {
                for p in &t.partitions {
                    assert!(p.len > 0 && p.start + p.len <= size, "{p:?}");
                }
                assert!(t.partitions.len() <= 4 + MAX_LOGICAL + 128);
            }
        }
    }
}

//! The BAT is paged on demand into a bounded cache: with a cache of two pages over a table of
//! 33, allocation, reads by many threads, flushes, resize and reopening all evict and reload
//! pages, and must read exactly what was written (dirty pages are never lost to eviction).

use std::path::Path;
use std::sync::Arc;
use std::thread;

use disk::check::Repair;
use disk::{Access, BlockDevice, FileStorage, Storage};
use vhdx::{CreateKind, CreateOptions, OpenOptions, VhdxDisk};

const MIB: u64 = 1 << 20;
/// 16384 blocks of 1 MiB: 33 BAT pages of 512 entries.
const SIZE: u64 = 16 << 30;
const TWO_PAGES: usize = 2 * 4096;
const PIECE: usize = 4096;

fn byte(block: u64, round: u64) -> u8 {
    (block.wrapping_mul(131).wrapping_add(round * 7) % 251 + 1) as u8
}

fn storage(p: &Path) -> Arc<dyn Storage> {
    Arc::new(FileStorage::open(p, Access::ReadWrite, true).unwrap())
}

/// Blocks spread over every page, in an order that keeps jumping between pages.
fn blocks() -> Vec<u64> {
    (0..32u64)
        .flat_map(|p| [p * 512 + 3, ((p * 17) % 32) * 512 + 500])
        .collect()
}

fn assert_block(d: &dyn BlockDevice, b: u64, v: u8) {
    let mut buf = vec![0u8; PIECE];
    d.read_at(&mut buf, b * MIB).unwrap();
    assert!(buf.iter().all(|&x| x == v), "block {b}: want {v:#x}");
}

#[test]
fn a_two_page_cache_keeps_every_write_under_concurrency_flush_and_resize() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.vhdx");
    drop(VhdxDisk::create(&p, &CreateOptions::new(CreateKind::Dynamic, SIZE)).unwrap());
    let rw = OpenOptions { read_only: false };
    let d = Arc::new(VhdxDisk::open_with_cache(storage(&p), &rw, TWO_PAGES).unwrap());
    // Written but not flushed: 64 dirty entries on 32 pages, far past the two-page bound.
    for &b in &blocks() {
        d.write_at(&vec![byte(b, 0); PIECE], b * MIB).unwrap();
    }
    for &b in &blocks() {
        assert_block(&*d, b, byte(b, 0));
    }
    // Readers on every page while a writer allocates more blocks and another thread flushes.
    let mut handles = Vec::new();
    for t in 0..3u64 {
        let d = d.clone();
        handles.push(thread::spawn(move || {
            for _ in 0..3 {
                for (k, &b) in blocks().iter().enumerate() {
                    if k as u64 % 3 == t {
                        assert_block(&*d, b, byte(b, 0));
                        assert_block(&*d, b + 1, 0);
                    }
                }
            }
        }));
    }
    let f = d.clone();
    handles.push(thread::spawn(move || {
        for _ in 0..5 {
            f.flush().unwrap();
        }
    }));
    for &b in &blocks() {
        d.write_at(&vec![byte(b + 2, 1); PIECE], (b + 2) * MIB)
            .unwrap();
    }
    for h in handles {
        h.join().unwrap();
    }
    // Grow (new table entries read as zeros) and shrink back, through the small cache.
    d.resize(SIZE * 2).unwrap();
    assert_block(&*d, SIZE / MIB + 7, 0);
    d.write_at(&vec![0x77; PIECE], SIZE + 7 * MIB).unwrap();
    assert_block(&*d, SIZE / MIB + 7, 0x77);
    // Shrinking needs the blocks past the new end released.
    d.discard(SIZE + 7 * MIB, MIB).unwrap();
    d.resize(SIZE).unwrap();
    d.resize(SIZE * 2).unwrap();
    assert_block(&*d, SIZE / MIB + 7, 0);
    // A table that outgrows its region (1 MiB: 131072 entries) moves to the end of the file.
    let bat_before = d.info().bat_offset;
    d.resize(256 << 30).unwrap();
    assert_ne!(d.info().bat_offset, bat_before);
    d.write_at(&vec![0x66; PIECE], 200 << 30).unwrap();
    for &b in &blocks() {
        assert_block(&*d, b, byte(b, 0));
        assert_block(&*d, b + 2, byte(b + 2, 1));
    }
    d.discard(200 << 30, MIB).unwrap();
    d.resize(SIZE).unwrap();
    d.close().unwrap();
    drop(d);

    // Reopened (default cache), every block reads what was written; check is clean.
    let d = VhdxDisk::open(storage(&p), &OpenOptions { read_only: true }).unwrap();
    for &b in &blocks() {
        assert_block(&d, b, byte(b, 0));
        assert_block(&d, b + 2, byte(b + 2, 1));
        assert_block(&d, b + 1, 0);
    }
    assert_eq!(d.size(), SIZE);
    drop(d);
    let r = vhdx::check(storage(&p), Repair::None).unwrap();
    assert_eq!(r.corruptions, 0, "{r:?}");
    assert_eq!(r.allocated_clusters, Some(2 * blocks().len() as u64));
}

/// A truncated image whose far BAT page (not read at open) points past the end of the file:
/// the block this session allocates at the end of the file must not become the data of that
/// entry too. Reading through the bad entry fails, and the new block keeps its own data.
#[test]
fn an_entry_past_the_end_at_open_never_aliases_a_block_allocated_later() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.vhdx");
    drop(VhdxDisk::create(&p, &CreateOptions::new(CreateKind::Dynamic, SIZE)).unwrap());
    let rw = OpenOptions { read_only: false };
    let far = 32 * 512 * MIB; // block 16384: the table's last page
    {
        let d = VhdxDisk::open(storage(&p), &rw).unwrap();
        d.write_at(&vec![0xa1; PIECE], 0).unwrap();
        d.write_at(&vec![0xa2; PIECE], far - MIB).unwrap();
        d.close().unwrap();
    }
    // Lose the last block, as an interrupted copy would.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(f.metadata().unwrap().len() - MIB).unwrap();
    drop(f);
    // One page of cache: the far page is not read at open.
    let d = VhdxDisk::open_with_cache(storage(&p), &rw, 4096).unwrap();
    d.write_at(&vec![0xb7; PIECE], 5 * MIB).unwrap();
    let mut buf = vec![0u8; PIECE];
    let err = d.read_at(&mut buf, far - MIB).unwrap_err();
    assert!(
        err.to_string().contains("points after end of file"),
        "{err}"
    );
    assert!(d.write_at(&vec![0xee; PIECE], far - MIB).is_err());
    assert_block(&d, 5, 0xb7);
    assert_block(&d, 0, 0xa1);
}

/// Entry `i` of the table of the image at `p`, read from the file.
fn read_entry(p: &Path, bat_offset: u64, i: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    let f = std::fs::File::open(p).unwrap();
    f.read_exact_at(&mut b, bat_offset + 8 * i).unwrap();
    u64::from_le_bytes(b)
}

fn write_entry(p: &Path, bat_offset: u64, i: u64, e: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&e.to_le_bytes(), bat_offset + 8 * i)
        .unwrap();
}

/// Two entries far apart in the table (pages not both read at open) that point at the same
/// block: the second one to be read is refused (corrupt image, naming the file and the
/// entry), in either order, so no write through one can change what the other reads.
#[test]
fn entries_far_apart_that_share_a_block_are_refused_when_first_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("o.vhdx");
    drop(VhdxDisk::create(&p, &CreateOptions::new(CreateKind::Dynamic, SIZE)).unwrap());
    let rw = OpenOptions { read_only: false };
    let (near, far) = (3u64, 10_000u64);
    let (bat_offset, ratio) = {
        let d = VhdxDisk::open(storage(&p), &rw).unwrap();
        d.write_at(&vec![0xa1; PIECE], near * MIB).unwrap();
        d.write_at(&vec![0xa2; PIECE], far * MIB).unwrap();
        d.close().unwrap();
        let i = d.info();
        (i.bat_offset, i.chunk_ratio)
    };
    let idx = |b: u64| b + b / ratio;
    assert!(
        idx(far) / 512 > 1,
        "the far entry is past the pages read at open"
    );
    let e = read_entry(&p, bat_offset, idx(near));
    write_entry(&p, bat_offset, idx(far), e);
    let far_entry_at = format!("{:#x}", bat_offset + 8 * idx(far));

    // The near page is read at open; the far one later.
    let d = VhdxDisk::open_with_cache(storage(&p), &rw, TWO_PAGES).unwrap();
    assert_block(&d, near, 0xa1);
    let mut buf = vec![0u8; PIECE];
    let err = d.read_at(&mut buf, far * MIB).unwrap_err().to_string();
    assert!(
        err.contains("corrupt")
            && err.contains(&format!("entry {}", idx(far)))
            && err.contains(&far_entry_at)
            && err.contains("o.vhdx"),
        "{err}"
    );
    assert!(d.write_at(&vec![0xee; PIECE], far * MIB).is_err());
    assert_block(&d, near, 0xa1);
    drop(d);

    // The far page first (reading it again after an error gives the same error), then near.
    let ro = OpenOptions { read_only: true };
    write_entry(&p, bat_offset, idx(near), 0);
    let near_entry_at = bat_offset + 8 * idx(near);
    write_entry(&p, bat_offset, idx(near) + 512, e);
    let d = VhdxDisk::open_with_cache(storage(&p), &ro, 4096).unwrap();
    assert_block(&d, far, 0xa1);
    assert_block(&d, far, 0xa1);
    let err = d
        .read_at(&mut buf, (near + 512) * MIB)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("entry {}", idx(near) + 512))
            && err.contains(&format!("{:#x}", near_entry_at + 8 * 512)),
        "{err}"
    );
    assert!(d.read_at(&mut buf, (near + 512) * MIB).is_err());
}

/// Block status merges fully present blocks into one extent only while they lie one after
/// another in the file: checked block by block against the table, across page boundaries and
/// across the sector-bitmap entries between chunks, with a one-page cache.
#[test]
fn block_status_runs_follow_the_file_layout_exactly() {
    use disk::Allocation;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.vhdx");
    drop(VhdxDisk::create(&p, &CreateOptions::new(CreateKind::Dynamic, SIZE)).unwrap());
    let rw = OpenOptions { read_only: false };
    let d = VhdxDisk::open_with_cache(storage(&p), &rw, 4096).unwrap();
    // Allocation appends, so the write order decides the layout: long contiguous runs
    // (crossing page 0/1 at block 511/512 and chunk 0/1 at 2047/2048), a run broken by an
    // out-of-order block, and single blocks.
    let mut order: Vec<u64> = (500..530).collect();
    order.extend(2040..2056);
    order.extend([3000, 3002, 3001, 3003, 9000, 7000, 7001]);
    for &b in &order {
        d.write_at(&vec![byte(b, 1); PIECE], b * MIB).unwrap();
    }
    let mut pos = 0u64;
    let mut extents = 0;
    while pos < SIZE {
        let e = d.block_status(pos, SIZE - pos).unwrap();
        assert!(e.len > 0 && pos + e.len <= SIZE);
        let first = pos / MIB;
        let last = (pos + e.len - 1) / MIB;
        match e.allocation {
            Allocation::Data {
                host_offset: Some(h),
            } => {
                for b in first..=last {
                    let entry = d.bat_entry(b).unwrap();
                    assert_eq!(entry & 7, 6, "block {b} in a data extent is not present");
                    assert_eq!(entry >> 20 << 20, h + (b - first) * MIB, "block {b}");
                }
                // Maximal: the next block does not continue the run.
                if let Some(next) = d.bat_entry(last + 1) {
                    assert!(
                        next & 7 != 6 || next >> 20 << 20 != h + (last + 1 - first) * MIB,
                        "extent at block {first} stops early at {last}"
                    );
                }
            }
            other => {
                for b in first..=last {
                    assert_ne!(d.bat_entry(b).unwrap() & 7, 6, "block {b}: {other:?}");
                }
            }
        }
        pos += e.len;
        extents += 1;
    }
    // 500..530 and 2040..2056 are one run each (appended in order), 3000 and 3002 stand alone
    // before 3001 and 3003 in the file, 9000, and 7000..7002 one run: 9 data extents, plus the
    // unallocated gaps between them.
    assert!(extents >= 9, "{extents} extents");
}

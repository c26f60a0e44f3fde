//! The BAT is paged on demand into a bounded cache: with a cache of two pages over a table of
//! 32, every path (allocation, reads by many threads, differencing reads, compact, resize)
//! evicts and reloads pages, and must read exactly what was written.

use std::sync::Arc;
use std::thread;

use disk::check::Repair;
use disk::{BlockDevice, MemStorage, Storage};
use vhd::{CreateKind, CreateOptions, OpenOptions, VhdDisk};

const BLOCK: u64 = 4096;
/// 32 BAT pages of 1024 entries.
const SIZE: u64 = 32 * 1024 * BLOCK;
const TWO_PAGES: usize = 2 * 4096;

fn byte(block: u64, round: u64) -> u8 {
    (block.wrapping_mul(131).wrapping_add(round * 7) % 251 + 1) as u8
}

fn open(s: &Arc<MemStorage>, read_only: bool) -> VhdDisk {
    VhdDisk::open_with_cache(
        s.clone(),
        &OpenOptions {
            read_only,
            ..Default::default()
        },
        TWO_PAGES,
    )
    .unwrap()
}

/// Blocks spread over every page, in an order that keeps jumping between pages.
fn blocks() -> Vec<u64> {
    (0..32u64)
        .flat_map(|p| [p * 1024 + 3, ((p * 17) % 32) * 1024 + 1000])
        .collect()
}

#[test]
fn a_two_page_cache_reads_back_every_block_from_many_threads() {
    let s = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(CreateKind::Dynamic, SIZE);
    o.block_size = BLOCK as u32;
    drop(VhdDisk::create_on(s.clone(), &o).unwrap());
    let d = Arc::new(open(&s, false));
    for &b in &blocks() {
        d.write_at(&vec![byte(b, 0); BLOCK as usize], b * BLOCK)
            .unwrap();
    }
    d.flush().unwrap();
    // Readers on every page at once while a writer allocates more blocks.
    let mut handles = Vec::new();
    for t in 0..4u64 {
        let d = d.clone();
        handles.push(thread::spawn(move || {
            let mut buf = vec![0u8; BLOCK as usize];
            for _ in 0..3 {
                for (k, &b) in blocks().iter().enumerate() {
                    if k as u64 % 4 != t {
                        continue;
                    }
                    d.read_at(&mut buf, b * BLOCK).unwrap();
                    assert!(buf.iter().all(|&x| x == byte(b, 0)), "block {b}");
                    // A neighbour never written reads zeros.
                    d.read_at(&mut buf, (b + 1) * BLOCK).unwrap();
                    assert!(buf.iter().all(|&x| x == 0), "block {}", b + 1);
                }
            }
        }));
    }
    for &b in &blocks() {
        d.write_at(&vec![byte(b + 2, 1); BLOCK as usize], (b + 2) * BLOCK)
            .unwrap();
    }
    for h in handles {
        h.join().unwrap();
    }
    d.flush().unwrap();
    assert_eq!(d.info().allocated_blocks, 2 * blocks().len() as u64);
    drop(d);

    // Reopened (default cache), every block reads what was written; check is clean.
    let d = VhdDisk::open(s.clone(), &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    for &b in &blocks() {
        d.read_at(&mut buf, b * BLOCK).unwrap();
        assert!(buf.iter().all(|&x| x == byte(b, 0)));
        d.read_at(&mut buf, (b + 2) * BLOCK).unwrap();
        assert!(buf.iter().all(|&x| x == byte(b + 2, 1)));
    }
    drop(d);
    let r = vhd::check(s.clone(), Repair::None).unwrap();
    assert_eq!(r.corruptions, 0, "{r:?}");
}

#[test]
fn differencing_compact_and_resize_through_a_small_cache() {
    let base = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(CreateKind::Dynamic, SIZE);
    o.block_size = BLOCK as u32;
    let p = VhdDisk::create_on(base.clone(), &o).unwrap();
    for &b in &blocks() {
        p.write_at(&vec![byte(b, 0); BLOCK as usize], b * BLOCK)
            .unwrap();
    }
    p.flush().unwrap();
    drop(p);
    let parent: Arc<dyn BlockDevice> = Arc::new(open(&base, true));

    // A child over it writes half of each block; the other half reads through.
    let child_s = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(
        CreateKind::Differencing {
            parent_path: "/nonexistent/base.vhd".into(),
            parent: parent.clone(),
        },
        0,
    );
    o.block_size = BLOCK as u32;
    drop(VhdDisk::create_on(child_s.clone(), &o).unwrap());
    let mut c = open(&child_s, false);
    c.attach_parent(parent.clone()).unwrap();
    for &b in &blocks() {
        c.write_at(&vec![0xEE; 2048], b * BLOCK).unwrap();
    }
    let mut buf = vec![0u8; BLOCK as usize];
    for &b in blocks().iter().rev() {
        c.read_at(&mut buf, b * BLOCK).unwrap();
        assert!(buf[..2048].iter().all(|&x| x == 0xEE));
        assert!(buf[2048..].iter().all(|&x| x == byte(b, 0)));
    }
    drop(c);

    // Compact a dynamic image whose blocks are zeros in every other page, then grow it.
    let s = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(CreateKind::Dynamic, SIZE);
    o.block_size = BLOCK as u32;
    drop(VhdDisk::create_on(s.clone(), &o).unwrap());
    let d = open(&s, false);
    for &b in &blocks() {
        let fill = if (b / 1024) % 2 == 0 { byte(b, 0) } else { 0 };
        let mut data = vec![fill; BLOCK as usize];
        data[0] = byte(b, 0); // allocated even when the rest is zero
        d.write_at(&data, b * BLOCK).unwrap();
        if fill == 0 {
            d.write_at(&vec![0; BLOCK as usize], b * BLOCK).unwrap();
        }
    }
    d.flush().unwrap();
    let st = d.compact().unwrap();
    assert_eq!(st.blocks_freed, blocks().len() as u64 / 2);
    d.resize(SIZE * 3).unwrap();
    d.write_at(&[0x42; BLOCK as usize], SIZE * 3 - BLOCK)
        .unwrap();
    d.flush().unwrap();
    drop(d);
    let d = open(&s, true);
    for &b in &blocks() {
        d.read_at(&mut buf, b * BLOCK).unwrap();
        let want = if (b / 1024) % 2 == 0 { byte(b, 0) } else { 0 };
        assert!(buf.iter().all(|&x| x == want), "block {b}");
    }
    d.read_at(&mut buf, SIZE * 3 - BLOCK).unwrap();
    assert!(buf.iter().all(|&x| x == 0x42));
    drop(d);
    let r = vhd::check(s.clone() as Arc<dyn Storage>, Repair::None).unwrap();
    assert_eq!(r.corruptions, 0, "{r:?}");
}

/// Entry `i` of the table, straight from the file.
fn entry(s: &MemStorage, bat: u64, i: u64) -> u32 {
    let mut b = [0u8; 4];
    s.read_at(&mut b, bat + 4 * i).unwrap();
    u32::from_be_bytes(b)
}

fn set_entry(s: &MemStorage, bat: u64, i: u64, e: u32) {
    s.write_at(&e.to_be_bytes(), bat + 4 * i).unwrap();
}

/// Two entries far apart in the table (pages not both read at open) whose blocks overlap, at
/// the same sector or shifted by a few sectors either way: the one read second is refused
/// (corrupt image naming the entry), in either order, and no write goes through it.
#[test]
fn entries_far_apart_whose_blocks_overlap_are_refused_when_first_read() {
    let (near, next, far) = (3u64, 5u64, 20_000u64);
    for delta in [-1i64, 0, 1, 8] {
        let s = Arc::new(MemStorage::new());
        let mut o = CreateOptions::new(CreateKind::Dynamic, SIZE);
        o.block_size = BLOCK as u32;
        drop(VhdDisk::create_on(s.clone(), &o).unwrap());
        let bat = {
            let d = open(&s, false);
            for b in [near, next, far] {
                d.write_at(&vec![byte(b, 0); BLOCK as usize], b * BLOCK)
                    .unwrap();
            }
            d.flush().unwrap();
            d.info().bat_offset.unwrap()
        };
        let e = entry(&s, bat, next);
        set_entry(&s, bat, far, (e as i64 + delta) as u32);
        let d = open(&s, false);
        let mut buf = vec![0u8; BLOCK as usize];
        d.read_at(&mut buf, next * BLOCK).unwrap();
        let err = d.read_at(&mut buf, far * BLOCK).unwrap_err().to_string();
        assert!(
            err.contains("corrupt") && err.contains(&format!("entry {far}")),
            "delta {delta}: {err}"
        );
        assert!(d
            .write_at(&vec![0xee; BLOCK as usize], far * BLOCK)
            .is_err());
        d.read_at(&mut buf, next * BLOCK).unwrap();
        assert!(buf.iter().all(|&x| x == byte(next, 0)), "delta {delta}");
        drop(d);
        // The far page first: then the near entry is the one refused.
        set_entry(&s, bat, next + 4096, e);
        set_entry(&s, bat, next, u32::MAX);
        let d = open(&s, true);
        d.read_at(&mut buf, far * BLOCK).unwrap();
        let err = d
            .read_at(&mut buf, (next + 4096) * BLOCK)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("entry {}", next + 4096)),
            "delta {delta}: {err}"
        );
    }
}

/// Open reads only the pages the cache holds: an entry past the data area in the table's last
/// page does not stop the open (it used to: open walked the whole table), only a read of that
/// block; `info` walks the table to count blocks and says why it could not.
#[test]
fn open_reads_only_the_first_pages_and_checks_the_others_when_read() {
    let s = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(CreateKind::Dynamic, SIZE);
    o.block_size = BLOCK as u32;
    drop(VhdDisk::create_on(s.clone(), &o).unwrap());
    let last = SIZE / BLOCK - 1;
    let bat = {
        let d = open(&s, false);
        d.write_at(&vec![0x42; BLOCK as usize], 0).unwrap();
        d.flush().unwrap();
        assert_eq!(d.info().allocated_blocks, 1);
        d.info().bat_offset.unwrap()
    };
    set_entry(&s, bat, last, 0x00FF_0000);
    let d = open(&s, false);
    let mut buf = vec![0u8; BLOCK as usize];
    d.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&x| x == 0x42));
    let err = d.read_at(&mut buf, last * BLOCK).unwrap_err().to_string();
    assert!(
        err.contains(&format!("entry {last}")) && err.contains("past the data area"),
        "{err}"
    );
    let i = d.info();
    assert!(
        i.warnings.iter().any(|w| w.contains("cannot count")),
        "{:?}",
        i.warnings
    );
    drop(d);
    let r = vhd::check(s.clone(), Repair::None).unwrap();
    assert!(r.corruptions > 0, "{r:?}");
}

//! Benchmarks for bench/vhdx/run.sh (not a test).
//!
//!   vhdx_bench write IMAGE COUNT STEP FLUSH_EVERY   4 KiB allocating writes, random order
//!   vhdx_bench read IMAGE RAW SIZE_MIB              sequential read vs the raw file
//!
//! Prints one line of JSON per run.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use disk::BlockDevice;
use vhdx::{CreateKind, CreateOptions, OpenOptions, VhdxDisk};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(|s| s.as_str()) {
        Some("write") => {
            let count: u64 = a[3].parse().unwrap();
            let step: u64 = a[4].parse().unwrap();
            let every: u64 = a[5].parse().unwrap();
            let size = count * step;
            let _ = std::fs::remove_file(&a[2]);
            let d = VhdxDisk::create(
                Path::new(&a[2]),
                &CreateOptions::new(CreateKind::Dynamic, size),
            )
            .unwrap();
            // A random permutation of the block offsets: every write allocates.
            let mut order: Vec<u64> = (0..count).collect();
            let mut r = disk::fault::SplitMix(42);
            for i in (1..order.len()).rev() {
                let j = r.below(i as u64 + 1) as usize;
                order.swap(i, j);
            }
            let buf = vec![0xa5u8; 4096];
            let t = Instant::now();
            for (i, &b) in order.iter().enumerate() {
                d.write_at(&buf, b * step).unwrap();
                if (i as u64 + 1).is_multiple_of(every) {
                    d.flush().unwrap();
                }
            }
            d.flush().unwrap();
            let secs = t.elapsed().as_secs_f64();
            d.close().unwrap();
            println!(
                "{{\"bench\":\"vhdx-write\",\"writes\":{count},\"seconds\":{secs:.3},\"writes_per_s\":{:.0},\"log_entries\":{}}}",
                count as f64 / secs,
                d.log_entries_written()
            );
        }
        Some("read") => {
            let mib: u64 = a[4].parse().unwrap();
            let size = mib << 20;
            let img = Path::new(&a[2]);
            let raw = Path::new(&a[3]);
            let _ = std::fs::remove_file(img);
            let mut o = CreateOptions::new(CreateKind::Dynamic, size);
            o.physical_sector_size = 512;
            let d = VhdxDisk::create(img, &o).unwrap();
            let chunk = vec![0x5au8; 1 << 20];
            let rf = std::fs::File::create(raw).unwrap();
            for i in 0..mib {
                d.write_at(&chunk, i << 20).unwrap();
                rf.write_all_at(&chunk, i << 20).unwrap();
            }
            d.close().unwrap();
            drop(d);
            drop(rf);
            let d = VhdxDisk::open_path(img, &OpenOptions { read_only: true }).unwrap();
            let rf = std::fs::File::open(raw).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut best = (f64::MAX, f64::MAX);
            for _round in 0..5 {
                let t = Instant::now();
                for i in 0..mib {
                    d.read_at(&mut buf, i << 20).unwrap();
                }
                let tv = t.elapsed().as_secs_f64();
                let t = Instant::now();
                for i in 0..mib {
                    rf.read_exact_at(&mut buf, i << 20).unwrap();
                }
                let tr = t.elapsed().as_secs_f64();
                best = (best.0.min(tv), best.1.min(tr));
            }
            println!(
                "{{\"bench\":\"seq-read\",\"mib\":{mib},\"vhdx_mib_s\":{:.0},\"raw_mib_s\":{:.0},\"vhdx_vs_raw\":{:.3}}}",
                mib as f64 / best.0,
                mib as f64 / best.1,
                best.1 / best.0
            );
        }
        _ => {
            eprintln!(
                "usage: vhdx_bench write IMAGE COUNT STEP FLUSH_EVERY | read IMAGE RAW SIZE_MIB"
            );
            std::process::exit(2);
        }
    }
}

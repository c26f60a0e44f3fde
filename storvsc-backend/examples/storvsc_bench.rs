//! Requests per second through the VMBus ring into the storvsc back end and a RAM disk.
//!
//! The simulated Linux guest of the integration tests (same code) keeps `--qd` requests in
//! flight; each request goes guest ring → VmbusServer → StorvscDevice → SCSI target → RawDisk
//! and back as a completion. Figures include the simulated guest's own work (building packets,
//! copying its data buffers), so they are a lower bound for the host side alone.
//!
//! Run: `cargo run --release -p storvsc-backend --example storvsc_bench -- [--backend ram|vhdx] [--size 4096]
//! [--qd 32] [--seconds 3] [--mode read|write|mixed] [--disk-mib 256]`

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Instant;

use common::guest::{server_with, Guest};
use common::workload::{self, Mix};
use disk::{BlockDevice, RawDisk};

fn main() {
    let mut size = 4096u32;
    let mut qd = 32usize;
    let mut seconds = 3.0f64;
    let mut mode = "read".to_string();
    let mut disk_mib = 256u64;
    let mut backend = "ram".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        match a.as_str() {
            "--size" => size = v.parse().expect("--size bytes"),
            "--qd" => qd = v.parse().expect("--qd n"),
            "--seconds" => seconds = v.parse().expect("--seconds s"),
            "--mode" => mode = v,
            "--disk-mib" => disk_mib = v.parse().expect("--disk-mib n"),
            "--backend" => backend = v,
            _ => {
                eprintln!("unknown argument {a}");
                std::process::exit(2);
            }
        }
    }
    let (read, write) = match mode.as_str() {
        "read" => (100, 0),
        "write" => (0, 100),
        "mixed" => (70, 30),
        m => {
            eprintln!("unknown mode {m}");
            std::process::exit(2);
        }
    };
    let disk: Arc<dyn BlockDevice> = match backend.as_str() {
        "ram" => Arc::new(RawDisk::memory(disk_mib << 20).expect("RAM disk")),
        // A dynamic VHDX (1 MiB blocks) kept in memory: measures the format's cost, not a disk's.
        "vhdx" => {
            let o = vhdx::CreateOptions::new(vhdx::CreateKind::Dynamic, disk_mib << 20);
            Arc::new(
                vhdx::VhdxDisk::create_on(Arc::new(disk::MemStorage::new()), &o).expect("VHDX"),
            )
        }
        b => {
            eprintln!("unknown backend {b} (ram, vhdx)");
            std::process::exit(2);
        }
    };
    // Touch the whole disk so reads do not measure first-touch page faults.
    let chunk = vec![0x5Au8; 1 << 20];
    for off in (0..disk.size()).step_by(chunk.len()) {
        disk.write_at(&chunk, off).unwrap();
    }
    let disks = vec![disk];
    let mut g = Guest::new(server_with(&disks), 256 << 20, 42);
    // Fault in guest memory up front too.
    for off in (0..256u64 << 20).step_by(chunk.len()) {
        vmbus::GuestMemory::write(&*g.mem, off, &chunk).unwrap();
    }
    g.bring_up(33, 33); // 128 KiB rings, as Linux's storvsc uses
    let luns = workload::scan(&mut g);
    let mix = Mix {
        read,
        write,
        unmap: 0,
        sync: 0,
        min_bytes: size,
        max_bytes: size,
        verify: false,
        scatter_offsets: false,
    };
    let mut models = vec![Vec::new()];
    // Warm up, then measure in batches until the time is up.
    workload::run(&mut g, &luns, &mut models, 2000, qd, mix);
    let start = Instant::now();
    let host0 = g.host_time;
    let mut ops = 0u64;
    let mut stats = workload::RunStats::default();
    while start.elapsed().as_secs_f64() < seconds {
        let st = workload::run(&mut g, &luns, &mut models, 5000, qd, mix);
        ops += 5000;
        stats.host_signals += st.host_signals;
        stats.interrupts += st.interrupts;
        stats.max_inflight = stats.max_inflight.max(st.max_inflight);
    }
    let secs = start.elapsed().as_secs_f64();
    let host_secs = (g.host_time - host0).as_secs_f64();
    let iops = ops as f64 / secs;
    println!(
        "storvsc {mode} {size} B qd {qd}: {ops} requests in {secs:.2} s = {iops:.0} req/s, \
         {:.1} MiB/s; host side alone {:.0} req/s ({:.2} us/request); max in flight {}, \
         {:.2} host signals and {:.2} guest interrupts per request",
        iops * size as f64 / (1 << 20) as f64,
        ops as f64 / host_secs,
        host_secs * 1e6 / ops as f64,
        stats.max_inflight,
        stats.host_signals as f64 / ops as f64,
        stats.interrupts as f64 / ops as f64
    );
}

//! Boots a kernel with raw disk images, for manual testing:
//!
//!     cargo run -p vmm --example boot -- VMLINUX [--disk IMG]... [--timeout SECS]
//!         [--memory MIB] [--cpus N] [--append "ARGS"] [--stop-on TEXT] [--verbose]

use std::sync::Arc;
use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(kernel) = args.next() else {
        eprintln!("usage: boot VMLINUX [--disk IMG]... [--timeout SECS] [--memory MIB] [--cpus N] [--append ARGS] [--stop-on TEXT] [--verbose]");
        std::process::exit(2);
    };
    let mut cfg = vmm::VmConfig::new(kernel);
    let mut append = String::new();
    while let Some(a) = args.next() {
        let mut val = || args.next().expect("missing value");
        match a.as_str() {
            "--disk" => {
                let p = val();
                let d = disk::RawDisk::open(std::path::Path::new(&p), disk::Access::ReadWrite)
                    .unwrap_or_else(|e| panic!("{p}: {e}"));
                cfg.disks.push(Arc::new(d).into());
            }
            "--timeout" => cfg.timeout = Some(Duration::from_secs(val().parse().unwrap())),
            "--memory" => cfg.memory = val().parse::<u64>().unwrap() << 20,
            "--cpus" => cfg.cpus = val().parse().unwrap(),
            "--append" => append = val(),
            "--stop-on" => cfg.stop_on.push(val()),
            "--verbose" => cfg.verbose = true,
            "--dilation" => cfg.time_dilation = val().parse().unwrap(),
            other => panic!("unknown argument {other}"),
        }
    }
    cfg.cmdline = vmm::default_cmdline(&append);
    match vmm::run(cfg) {
        Ok(s) => {
            eprintln!(
                "\n== guest ended: {:?} after {:.1}s",
                s.reason,
                s.elapsed.as_secs_f64()
            );
            for m in &s.milestones {
                eprintln!("   {:>16} at {:7.2}s", m.name, m.at.as_secs_f64());
            }
            for (i, d) in s.disk_stats.iter().enumerate() {
                eprintln!("   LUN {i}: {d:?}");
            }
            eprintln!("   {:?}", s.hv_stats);
        }
        Err(e) => {
            eprintln!("\n== {e}");
            std::process::exit(1);
        }
    }
}

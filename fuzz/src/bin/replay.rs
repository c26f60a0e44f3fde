//! Runs a fuzz target over files and directories (a corpus, or crash files), without libFuzzer.
//!
//!     replay TARGET PATH...
//!
//! Exits non-zero on the first panic (the panic message names the file).

use std::path::{Path, PathBuf};

fn files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        if let Ok(rd) = std::fs::read_dir(p) {
            let mut v: Vec<_> = rd.flatten().map(|e| e.path()).collect();
            v.sort();
            for e in v {
                files(&e, out);
            }
        }
    } else {
        out.push(p.to_path_buf());
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(name) = args.first() else {
        eprintln!("usage: replay TARGET PATH...");
        std::process::exit(2);
    };
    let Some(target) = viridian_fuzz::target(name) else {
        eprintln!("unknown target {name}");
        std::process::exit(2);
    };
    let mut list = Vec::new();
    for a in &args[1..] {
        files(Path::new(a), &mut list);
    }
    let start = std::time::Instant::now();
    for f in &list {
        let data = match std::fs::read(f) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{}: {e}", f.display());
                continue;
            }
        };
        eprintln!("replay {}", f.display());
        target(&data);
    }
    println!(
        "{name}: {} inputs replayed without a finding in {:.1?}",
        list.len(),
        start.elapsed()
    );
}

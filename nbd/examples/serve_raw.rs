//! Serves one raw image over NBD until the process is killed (the real CLI, `viridian serve`,
//! stops through a `ShutdownHandle` on SIGTERM/SIGINT). For benchmarks and manual tests:
//!
//!     serve_raw [--unix PATH | --tcp ADDR] [--name NAME] [--writable] [--workers N] FILE

use std::path::PathBuf;
use std::sync::Arc;

fn main() {
    if let Err(e) = real_main() {
        eprintln!("serve_raw: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut listen = None;
    let mut name = String::new();
    let mut writable = false;
    let mut file = None;
    let mut config = nbd::ServerConfig {
        verbose: std::env::var_os("NBD_VERBOSE").is_some(),
        ..Default::default()
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--unix" => listen = Some(nbd::Listen::Unix(PathBuf::from(next(&mut args, &a)?))),
            "--tcp" => listen = Some(nbd::Listen::Tcp(next(&mut args, &a)?.parse()?)),
            "--name" => name = next(&mut args, &a)?,
            "--writable" => writable = true,
            "--workers" => config.workers_per_connection = next(&mut args, &a)?.parse()?,
            _ if file.is_none() && !a.starts_with("--") => file = Some(PathBuf::from(a)),
            _ => return Err(format!("unexpected argument {a}").into()),
        }
    }
    let file =
        file.ok_or("usage: serve_raw [--unix PATH | --tcp ADDR] [--name N] [--writable] FILE")?;
    let access = if writable {
        disk::Access::ReadWrite
    } else {
        disk::Access::ReadOnly
    };
    let disk = Arc::new(disk::RawDisk::open(&file, access)?);
    let export = nbd::Export::new(name.clone(), disk)
        .description(format!("raw image {}", file.display()))
        .writable(writable);
    let listen =
        listen.unwrap_or_else(|| nbd::Listen::Tcp("127.0.0.1:10809".parse().expect("address")));
    let server = nbd::Server::new(vec![export], config)?;
    let bound = server.bind(&listen)?;
    eprintln!("serve_raw: serving {}", bound.uri(&name));
    bound.run()?;
    Ok(())
}

fn next(args: &mut impl Iterator<Item = String>, flag: &str) -> Result<String, String> {
    args.next().ok_or_else(|| format!("{flag} needs a value"))
}

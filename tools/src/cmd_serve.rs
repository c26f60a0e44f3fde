//! `viridian serve`: export images over NBD (Unix socket or TCP, 127.0.0.1 by default).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use chain::{OpenOptions, UndoDisk};
use disk::{BlockDevice, Disk};

use crate::common::{self, SizeRuleArg, UndoEnd};

#[derive(clap::Args)]
pub struct Args {
    /// An export: NAME=IMAGE (repeatable). A plain IMAGE argument is exported as "". (No
    /// short form: -e is qemu-nbd's connection limit.)
    #[arg(long = "export", value_name = "NAME=IMAGE")]
    exports: Vec<String>,
    /// Image format (raw, vhd/vpc or vhdx); probed when absent.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Serve on this Unix socket instead of TCP.
    #[arg(short = 'k', long = "socket")]
    socket: Option<PathBuf>,
    /// TCP address to listen on.
    #[arg(short = 'b', long = "bind", default_value = "127.0.0.1")]
    bind: IpAddr,
    /// TCP port to listen on.
    #[arg(short = 'p', long = "port", default_value_t = nbd::DEFAULT_PORT)]
    port: u16,
    /// Allow writes (default: read-only exports).
    #[arg(long)]
    rw: bool,
    /// Writes go to a throwaway child, committed or discarded when the server stops.
    #[arg(long)]
    undo: bool,
    /// With --undo: commit or discard the changes when the server stops.
    #[arg(long = "undo-end", value_enum, default_value_t = UndoEnd::Discard)]
    undo_end: UndoEnd,
    /// Like qemu-nbd --snapshot: writable, changes discarded at exit.
    #[arg(short = 's', long)]
    snapshot: bool,
    /// Most simultaneous client connections (qemu-nbd's -e/--shared).
    #[arg(
        short = 'e',
        long = "shared",
        visible_alias = "max-connections",
        value_name = "N",
        default_value_t = 16
    )]
    max_connections: usize,
    /// Description shown by nbdinfo.
    #[arg(short = 'D', long)]
    description: Option<String>,
    /// Log connections and errors to stderr.
    #[arg(short = 'v', long)]
    verbose: bool,
    /// The image file.
    image: Option<PathBuf>,
}

enum Opened {
    Plain(Disk),
    Undo(UndoDisk),
}

pub fn run(a: Args) -> Result<i32> {
    let mut specs: Vec<(String, PathBuf)> = Vec::new();
    for e in &a.exports {
        let (name, path) = e
            .split_once('=')
            .ok_or_else(|| anyhow!("--export {e:?}: expected NAME=IMAGE"))?;
        specs.push((name.to_string(), PathBuf::from(path)));
    }
    if let Some(img) = &a.image {
        specs.push((String::new(), img.clone()));
    }
    if specs.is_empty() {
        bail!("nothing to serve: give IMAGE or --export NAME=IMAGE");
    }
    let undo = a.undo || a.snapshot;
    let undo_end = if a.snapshot {
        UndoEnd::Discard
    } else {
        a.undo_end
    };
    let writable = a.rw || undo;
    let mut opened = Vec::new();
    let mut exports = Vec::new();
    for (name, path) in &specs {
        let mut opts = if a.rw && !undo {
            OpenOptions::read_write()
        } else {
            OpenOptions::read_only()
        };
        if let Some(f) = &a.format {
            opts.format = Some(common::parse_format(f)?);
        }
        let o = if undo {
            Opened::Undo(
                UndoDisk::open(path, &opts, None)
                    .with_context(|| format!("cannot open {} in undo mode", path.display()))?,
            )
        } else {
            Opened::Plain(common::open_with(path, None, SizeRuleArg::Auto, opts)?)
        };
        let disk = match &o {
            Opened::Plain(d) => d.clone(),
            Opened::Undo(u) => u.disk(),
        };
        let description = a
            .description
            .clone()
            .unwrap_or_else(|| format!("{} ({})", path.display(), disk.format()));
        exports.push(
            nbd::Export::new(name.clone(), disk)
                .description(description)
                .writable(writable),
        );
        opened.push(o);
    }
    let config = nbd::ServerConfig {
        max_connections: a.max_connections.max(1),
        verbose: a.verbose,
        ..nbd::ServerConfig::default()
    };
    let server = nbd::Server::new(exports, config).context("cannot set up the NBD server")?;
    let listen = match &a.socket {
        Some(p) => nbd::Listen::Unix(p.clone()),
        None => nbd::Listen::Tcp(SocketAddr::new(a.bind, a.port)),
    };
    let bound = server.bind(&listen).context("cannot listen")?;
    // The server's own copies of the exports: an undo session can only be committed once
    // every handle on its disk is gone.
    drop(server);
    let stop = bound.shutdown_handle();
    for (name, path) in &specs {
        eprintln!(
            "viridian: serving {} at {}",
            path.display(),
            bound.uri(name)
        );
    }
    let ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let ended = ended.clone();
        std::thread::spawn(move || {
            while !ended.load(std::sync::atomic::Ordering::SeqCst) {
                if common::interrupted() {
                    stop.shutdown();
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let served = bound.run();
    ended.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = watcher.join();
    let mut failed = served.is_err();
    if let Err(e) = served {
        // Name the image too: the export name alone may be "".
        let e = anyhow::Error::new(e);
        eprintln!("viridian: server error: {}", common::one_line(&e));
        for (name, path) in &specs {
            eprintln!("viridian: export {name:?} is {}", path.display());
        }
    }
    let mut finish_error = None;
    for o in opened {
        match o {
            Opened::Plain(d) => {
                if let Err(e) = d.close() {
                    let name = d.path().map(common::shown_path).unwrap_or_default();
                    eprintln!("viridian: cannot close {name}: {e}");
                    failed = true;
                }
            }
            Opened::Undo(u) => {
                if let Err(e) = common::finish_undo(u, undo_end, !failed) {
                    eprintln!("viridian: {}", common::one_line(&e));
                    finish_error.get_or_insert(e);
                }
            }
        }
    }
    if let Some(e) = finish_error {
        return Err(e);
    }
    Ok(if failed { 1 } else { 0 })
}

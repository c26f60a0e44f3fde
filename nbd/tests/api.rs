//! The library API the CLI uses: configuration checks, TCP and Unix listeners, shutdown.

mod common;

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use common::*;

fn mem_export(name: &str) -> nbd::Export {
    nbd::Export::new(name, Arc::new(disk::RawDisk::memory(1 << 20).unwrap()))
}

#[test]
fn configuration_errors_are_typed() {
    let cfg = nbd::ServerConfig::default;
    assert!(matches!(
        nbd::Server::new(vec![], cfg()),
        Err(nbd::Error::NoExports)
    ));
    assert!(matches!(
        nbd::Server::new(vec![mem_export("a"), mem_export("a")], cfg()),
        Err(nbd::Error::DuplicateExport(n)) if n == "a"
    ));
    assert!(matches!(
        nbd::Server::new(vec![mem_export(&"x".repeat(5000))], cfg()),
        Err(nbd::Error::BadString { .. })
    ));
    let ro = disk::RawDisk::new(Arc::new(disk::MemStorage::with_len(4096)), true).unwrap();
    assert!(matches!(
        nbd::Server::new(vec![nbd::Export::new("r", Arc::new(ro)).writable(true)], cfg()),
        Err(nbd::Error::ReadOnlyDisk(n)) if n == "r"
    ));
    let bad = nbd::ServerConfig {
        max_request: 100,
        ..cfg()
    };
    assert!(matches!(
        nbd::Server::new(vec![mem_export("a")], bad),
        Err(nbd::Error::Config(_))
    ));
}

#[test]
fn tcp_listener_serves_and_stops() {
    let server = nbd::Server::new(vec![mem_export("disk")], Default::default()).unwrap();
    let bound = server
        .bind(&nbd::Listen::Tcp("127.0.0.1:0".parse().unwrap()))
        .unwrap();
    let addr = bound.local_addr().unwrap();
    assert_ne!(addr.port(), 0);
    assert_eq!(
        bound.uri("disk"),
        format!("nbd://127.0.0.1:{}/disk", addr.port())
    );
    let stop = bound.shutdown_handle();
    let t = std::thread::spawn(move || bound.run());
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    drop(s);
    if have("nbdinfo") {
        let out = run(std::process::Command::new("nbdinfo")
            .arg("--size")
            .arg(format!("nbd://{addr}/disk")));
        assert_eq!(out.trim(), "1048576");
        let out = run(std::process::Command::new("nbdinfo")
            .arg("--size")
            .arg(nbd::Listen::Tcp(addr).uri("disk")));
        assert_eq!(out.trim(), "1048576");
    }
    stop.shutdown();
    stop.shutdown(); // idempotent
    t.join().unwrap().unwrap();
    assert!(std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err());
}

#[test]
fn unix_socket_paths_stale_busy_and_foreign() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    // A stale socket file (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = nbd::Server::new(vec![mem_export("")], Default::default()).unwrap();
    let running = server
        .bind(&nbd::Listen::Unix(path.clone()))
        .unwrap()
        .spawn()
        .unwrap();
    // A live server is not displaced.
    assert!(matches!(
        server.bind(&nbd::Listen::Unix(path.clone())),
        Err(nbd::Error::SocketPath { .. })
    ));
    // The default export answers the empty name.
    let mut c = Client::connect(&path);
    assert_eq!(c.go("").unwrap().0, 1 << 20);
    drop(c);
    running.stop().unwrap();
    assert!(!path.exists());
    // A regular file is never removed.
    std::fs::write(&path, b"precious").unwrap();
    assert!(matches!(
        server.bind(&nbd::Listen::Unix(path.clone())),
        Err(nbd::Error::SocketPath { .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

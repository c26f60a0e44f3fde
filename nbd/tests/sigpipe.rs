//! A client that hangs up in the middle of a large reply must not kill the process, even when
//! SIGPIPE has its default action (own test binary: the signal setting is process-wide).

mod common;

use std::io::Read;
use std::sync::Arc;

use common::*;

#[test]
fn client_hanging_up_mid_reply_does_not_raise_sigpipe() {
    // SAFETY: restores the default SIGPIPE action for this test process; no handler is
    // installed and nothing else in this binary depends on the previous disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let d = Arc::new(disk::RawDisk::memory(32 << 20).unwrap());
    let srv = TestServer::start(vec![nbd::Export::new("d", d)], Default::default());
    for _ in 0..5 {
        let (mut c, _, _) = Client::open(&srv.sock, "d");
        for i in 0..4 {
            c.request(0, CMD_READ, i, 0, 32 << 20);
        }
        let mut b = [0u8; 1000];
        c.s.read_exact(&mut b).unwrap();
        // Shutting down our reading side makes the server's next send fail with EPIPE (a
        // plain close would give ECONNRESET, which raises no signal).
        c.s.shutdown(std::net::Shutdown::Read).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(c);
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (mut c, _, _) = Client::open(&srv.sock, "d");
    assert_eq!(c.read(1, 4096, 4096).unwrap(), vec![0u8; 4096]);
}

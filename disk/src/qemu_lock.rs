//! Image locks that QEMU's tools see, and that see QEMU's.
//!
//! Viridian's own lock is a whole-file `flock`. QEMU (qemu-img, qemu-io, qemu-nbd,
//! qemu-system) does not look at `flock`: it takes open-file-description (OFD) byte-range locks
//! on single bytes of the image file, and the two kinds of lock never see each other. So that a
//! VM running in QEMU and `viridian serve --rw` cannot both write one image, we also take the
//! bytes QEMU checks (described in docs/RELIABILITY.md, "Locks shared with QEMU"):
//!
//! * byte `100 + p` shared-locked means "an opener holds permission `p`";
//! * byte `200 + p` shared-locked means "an opener does not let others have permission `p`";
//!
//! with `p` = 0 for consistent reads and 1 for writes. An opener that wants permission `p` first
//! tests that nobody holds byte `200 + p`; an opener that does not share `p` tests that nobody
//! holds byte `100 + p`. Viridian readers hold "read" and refuse others' writes (as qemu-img
//! does); writers hold "read" and "write" and refuse others' writes. The result matches the
//! `flock` rules: readers with readers, never a writer with anyone else.
//!
//! OFD locks belong to the open file description, like `flock`, and go away when it is closed.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::storage::Access;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_READ: i64 = 0;
const PERM_WRITE: i64 = 1;

/// What stopped the lock: another opener holds (or refuses) this permission.
#[derive(Debug)]
pub(crate) enum Conflict {
    /// Another process has the image open in a way this open must not share.
    Held,
    /// Locks do not work here (old kernel, file system without them): no conflict can be seen.
    Unsupported,
    Io(io::Error),
}

fn lock_struct(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l.l_start = byte as libc::off_t;
    l.l_len = 1;
    l
}

fn fcntl_lock(file: &File, cmd: libc::c_int, l: &mut libc::flock) -> io::Result<()> {
    // SAFETY: fcntl with an OFD lock command on an open descriptor owned by `file`; `l` is a
    // valid, exclusively borrowed `struct flock` the kernel reads and (for GETLK) writes.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, l as *mut libc::flock) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether another open file description holds a lock on `byte`.
fn held_by_other(file: &File, byte: i64) -> io::Result<bool> {
    let mut l = lock_struct(libc::F_WRLCK, byte);
    fcntl_lock(file, libc::F_OFD_GETLK, &mut l)?;
    Ok(l.l_type != libc::F_UNLCK as libc::c_short)
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP)
    )
}

/// Takes QEMU's lock bytes for an open with `access` and tests for conflicts. On a conflict
/// the bytes taken are released again, so a refused open leaves nothing behind even while its
/// descriptor stays open.
pub(crate) fn lock(file: &File, access: Access) -> Result<(), Conflict> {
    let r = try_lock(file, access);
    if r.is_err() {
        for byte in [PERM_BASE, PERM_BASE + 1, SHARED_BASE, SHARED_BASE + 1] {
            let _ = fcntl_lock(
                file,
                libc::F_OFD_SETLK,
                &mut lock_struct(libc::F_UNLCK, byte),
            );
        }
    }
    r
}

fn try_lock(file: &File, access: Access) -> Result<(), Conflict> {
    let (hold, must_be_free): (&[i64], &[i64]) = match access {
        // Reads; refuses others' writes: nobody may be writing.
        Access::ReadOnly => (
            &[PERM_BASE + PERM_READ, SHARED_BASE + PERM_WRITE],
            &[PERM_BASE + PERM_WRITE],
        ),
        // Reads and writes; refuses others' writes: nobody may be writing or refusing our
        // reads or writes.
        Access::ReadWrite => (
            &[
                PERM_BASE + PERM_READ,
                PERM_BASE + PERM_WRITE,
                SHARED_BASE + PERM_WRITE,
            ],
            &[
                PERM_BASE + PERM_WRITE,
                SHARED_BASE + PERM_READ,
                SHARED_BASE + PERM_WRITE,
            ],
        ),
    };
    let io_err = |e: io::Error| {
        if unsupported(&e) {
            Conflict::Unsupported
        } else {
            Conflict::Io(e)
        }
    };
    for &byte in hold {
        let mut l = lock_struct(libc::F_RDLCK, byte);
        fcntl_lock(file, libc::F_OFD_SETLK, &mut l).map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                Conflict::Held
            } else {
                io_err(e)
            }
        })?;
    }
    for &byte in must_be_free {
        if held_by_other(file, byte).map_err(io_err)? {
            return Err(Conflict::Held);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path, write: bool) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .unwrap()
    }

    #[test]
    fn readers_share_and_writers_are_alone() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let r1 = open(&p, false);
        let r2 = open(&p, false);
        lock(&r1, Access::ReadOnly).unwrap();
        lock(&r2, Access::ReadOnly).unwrap();
        let w = open(&p, true);
        assert!(matches!(lock(&w, Access::ReadWrite), Err(Conflict::Held)));
        drop((r1, r2, w));
        let w = open(&p, true);
        lock(&w, Access::ReadWrite).unwrap();
        let r = open(&p, false);
        assert!(matches!(lock(&r, Access::ReadOnly), Err(Conflict::Held)));
        let w2 = open(&p, true);
        assert!(matches!(lock(&w2, Access::ReadWrite), Err(Conflict::Held)));
        drop(w);
        // The refused opens released what they had taken although they are still open.
        let r3 = open(&p, false);
        lock(&r3, Access::ReadOnly).unwrap();
        drop((r, w2, r3));
        let r = open(&p, false);
        lock(&r, Access::ReadOnly).unwrap();
    }
}

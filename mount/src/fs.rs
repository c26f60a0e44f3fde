//! The FUSE filesystem: a flat directory holding `disk` and one file per partition.
//!
//! Cache policy (documented decision): read-only mounts open files with `FOPEN_KEEP_CACHE`
//! (nothing but us can change what the files show, and the image is not written), so page cache
//! survives re-opens. Writable mounts drop the cache on every open, because `disk` and `pN` alias
//! the same bytes through different inodes (just like a kernel block device and its partition
//! devices, their caches are not coherent while both are open for writing). A file opened with
//! `O_DIRECT` gets `FOPEN_DIRECT_IO` (and parallel direct writes): every read and write goes
//! straight to the virtual disk.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use disk::map::status_through_chain;
use disk::{BlockDevice, Disk, ZeroFlags};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};

/// How long the kernel may cache attributes and names. Sizes never change; `st_blocks` may lag
/// writes by this much.
const TTL: Duration = Duration::from_secs(1);

/// Preferred I/O size reported in `st_blksize` (cp and friends size their buffers from it).
const BLKSIZE: u32 = 1 << 20;

/// Upper bound on extents walked to compute `st_blocks`; past it the rest counts as allocated.
const MAX_EXTENTS_FOR_BLOCKS: usize = 1 << 20;

/// One regular file of the view: a byte range of the disk.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) start: u64,
    pub(crate) len: u64,
    /// Allocated bytes, computed lazily from block status; cleared by writes.
    allocated: Mutex<Option<u64>>,
}

impl Node {
    pub(crate) fn new(name: String, start: u64, len: u64) -> Self {
        Node {
            name,
            start,
            len,
            allocated: Mutex::new(None),
        }
    }
}

/// What the filesystem reports back to the mount handle when it goes away.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Set by the first close (by the session as it ends, or forced by the handle).
    done: AtomicBool,
    /// The outcome of that close, until the handle takes it.
    closed: Mutex<Option<Result<(), disk::Error>>>,
    /// The first write or flush that failed during the session: the mount then ends in an
    /// error even if the final flush succeeds (data was lost or never stored).
    failure: Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn take_result(&self) -> Option<Result<(), disk::Error>> {
        self.closed.lock().ok().and_then(|mut g| g.take())
    }

    /// Flushes (when writable) and closes `disk`, once for the whole mount. Returns false when
    /// it had already been done.
    pub(crate) fn close_once(&self, disk: &dyn BlockDevice, writable: bool) -> bool {
        if self.done.swap(true, Ordering::SeqCst) {
            return false;
        }
        let mut result = if writable { disk.flush() } else { Ok(()) };
        let closed = disk.close();
        if result.is_ok() {
            result = closed;
        }
        if result.is_ok() {
            if let Some(first) = self.failure.lock().ok().and_then(|g| g.clone()) {
                result = Err(disk::Error::io(
                    format!("a write or flush failed during the session ({first})"),
                    std::io::Error::from_raw_os_error(libc::EIO),
                ));
            }
        }
        if let Ok(mut g) = self.closed.lock() {
            *g = Some(result);
        }
        true
    }
}

#[derive(Debug)]
pub(crate) struct DiskFs {
    disk: Disk,
    writable: bool,
    nodes: Vec<Node>,
    uid: u32,
    gid: u32,
    time: SystemTime,
    /// Writes since the last flush (close-time flush is skipped when clean).
    dirty: AtomicBool,
    /// The kernel handshake happened (a failed mount must not close the caller's disk).
    started: AtomicBool,
    shared: Arc<Shared>,
}

const ROOT: u64 = 1;
const FIRST_FILE: u64 = 2;

thread_local! {
    static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn errno(e: &disk::Error) -> Errno {
    Errno::from_i32(e.errno())
}

impl DiskFs {
    pub(crate) fn new(disk: Disk, writable: bool, nodes: Vec<Node>, shared: Arc<Shared>) -> Self {
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        DiskFs {
            disk,
            writable,
            nodes,
            uid,
            gid,
            time: SystemTime::now(),
            dirty: AtomicBool::new(false),
            started: AtomicBool::new(false),
            shared,
        }
    }

    fn node(&self, ino: INodeNo) -> Option<&Node> {
        let i = ino.0.checked_sub(FIRST_FILE)?;
        self.nodes.get(usize::try_from(i).ok()?)
    }

    fn allocated(&self, n: &Node) -> u64 {
        if let Ok(g) = n.allocated.lock() {
            if let Some(v) = *g {
                return v;
            }
        }
        let v = count_allocated(self.disk.as_ref(), n.start, n.len);
        if let Ok(mut g) = n.allocated.lock() {
            *g = Some(v);
        }
        v
    }

    fn invalidate_allocation(&self) {
        for n in &self.nodes {
            if let Ok(mut g) = n.allocated.lock() {
                *g = None;
            }
        }
    }

    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(ROOT),
            size: 0,
            blocks: 0,
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file_attr(&self, index: usize, n: &Node) -> FileAttr {
        let allocated = self.allocated(n);
        FileAttr {
            ino: INodeNo(FIRST_FILE + index as u64),
            size: n.len,
            blocks: allocated.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind: FileType::RegularFile,
            perm: if self.writable { 0o644 } else { 0o444 },
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLKSIZE,
            flags: 0,
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        if ino.0 == ROOT {
            return Some(self.root_attr());
        }
        let i = usize::try_from(ino.0.checked_sub(FIRST_FILE)?).ok()?;
        let n = self.nodes.get(i)?;
        Some(self.file_attr(i, n))
    }

    fn flush_disk(&self) -> Result<(), Errno> {
        if !self.writable {
            return Ok(());
        }
        self.dirty.store(false, Ordering::SeqCst);
        self.disk.flush().map_err(|e| {
            self.dirty.store(true, Ordering::SeqCst);
            // Like a local file system's write-back failure: fsync/close report EIO, and the
            // mount remembers it so unmount fails too.
            self.note_failure(&e);
            Errno::EIO
        })
    }

    /// Remembers a failed write or flush (the first one) so the mount ends in an error.
    fn note_failure(&self, e: &disk::Error) {
        eprintln!("viridian: {e}");
        if let Ok(mut g) = self.shared.failure.lock() {
            g.get_or_insert_with(|| e.to_string());
        }
    }

    /// A write the disk could not store (no space, I/O error; not a bad request).
    fn note_storage_failure(&self, e: &disk::Error) {
        if matches!(e.errno(), libc::EIO | libc::ENOSPC | libc::EDQUOT) {
            self.note_failure(e);
        }
    }

    /// Flushes and closes the disk once; records the outcome for the mount handle.
    pub(crate) fn shutdown(&self) {
        self.shared.close_once(self.disk.as_ref(), self.writable);
    }
}

/// Bytes of `start..start+len` stored as data anywhere in the chain.
pub(crate) fn count_allocated(disk: &dyn BlockDevice, start: u64, len: u64) -> u64 {
    let mut pos = 0u64;
    let mut total = 0u64;
    let mut steps = 0usize;
    while pos < len {
        if steps >= MAX_EXTENTS_FOR_BLOCKS {
            return total + (len - pos);
        }
        steps += 1;
        match status_through_chain(disk, start + pos, len - pos) {
            Ok(e) => {
                let l = e.length.clamp(1, len - pos);
                if e.data || !e.zero {
                    total += l;
                }
                pos += l;
            }
            // Unknown allocation counts as allocated: du errs on the large side.
            Err(_) => return total + (len - pos),
        }
    }
    total
}

/// SEEK_DATA / SEEK_HOLE inside a file of `len` bytes starting at disk offset `start`.
pub(crate) fn seek_data_hole(
    disk: &dyn BlockDevice,
    start: u64,
    len: u64,
    offset: u64,
    want_data: bool,
) -> Result<u64, Errno> {
    if offset >= len {
        return Err(Errno::ENXIO);
    }
    let mut pos = offset;
    while pos < len {
        let e = status_through_chain(disk, start + pos, len - pos).map_err(|e| errno(&e))?;
        let l = e.length.clamp(1, len - pos);
        let is_data = e.data || !e.zero;
        if is_data == want_data {
            return Ok(pos);
        }
        pos += l;
    }
    if want_data {
        Err(Errno::ENXIO)
    } else {
        // The end of the file is an implicit hole.
        Ok(len)
    }
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Largest readahead the kernel allows: sequential buffered reads become big requests.
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        self.started.store(true, Ordering::SeqCst);
        // max_write stays at fuser's 16 MiB; the kernel clamps requests to max_pages (1 MiB on
        // current kernels), which fuser requests when the kernel offers FUSE_MAX_PAGES.
        Ok(())
    }

    fn destroy(&mut self) {
        self.shutdown();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        match self
            .nodes
            .iter()
            .enumerate()
            .find(|(_, n)| OsStr::new(&n.name) == name)
        {
            Some((i, n)) => reply.entry(&TTL, &self.file_attr(i, n), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(a) = self.attr(ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        // The files have the disk's fixed geometry: refuse resizing (this also makes an
        // accidental O_TRUNC fail instead of appearing to work). Mode and time changes are
        // accepted and ignored.
        if let Some(s) = size {
            if s != a.size {
                reply.error(if self.writable {
                    Errno::EPERM
                } else {
                    Errno::EROFS
                });
                return;
            }
        }
        reply.attr(&TTL, &a);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.node(ino).is_none() {
            reply.error(if ino.0 == ROOT {
                Errno::EISDIR
            } else {
                Errno::ENOENT
            });
            return;
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY && !self.writable {
            reply.error(Errno::EROFS);
            return;
        }
        let mut fopen = FopenFlags::empty();
        if flags.0 & libc::O_DIRECT != 0 {
            fopen |= FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
        } else if !self.writable {
            fopen |= FopenFlags::FOPEN_KEEP_CACHE;
        }
        reply.opened(FileHandle(0), fopen);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(n) = self.node(ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        if offset >= n.len {
            reply.data(&[]);
            return;
        }
        let count = u64::from(size).min(n.len - offset) as usize;
        BUF.with(|b| {
            let Ok(mut buf) = b.try_borrow_mut() else {
                reply.error(Errno::EIO);
                return;
            };
            if buf.len() < count {
                buf.resize(count, 0);
            }
            match self.disk.read_at(&mut buf[..count], n.start + offset) {
                Ok(()) => reply.data(&buf[..count]),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(n) = self.node(ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        if !self.writable {
            reply.error(Errno::EROFS);
            return;
        }
        if offset >= n.len {
            // Like a block device: no room past the end.
            reply.error(Errno::ENOSPC);
            return;
        }
        let count = (data.len() as u64).min(n.len - offset) as usize;
        self.dirty.store(true, Ordering::SeqCst);
        match self.disk.write_at(&data[..count], n.start + offset) {
            Ok(()) => {
                self.invalidate_allocation();
                reply.written(count as u32);
            }
            Err(e) => {
                self.note_storage_failure(&e);
                reply.error(errno(&e))
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): make what was written durable, so a close error reports a failed flush.
        if self.dirty.load(Ordering::SeqCst) {
            if let Err(e) = self.flush_disk() {
                reply.error(e);
                return;
            }
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.flush_disk() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.flush_disk() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let mut entries: Vec<(u64, FileType, &str)> = vec![
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
        ];
        for (i, n) in self.nodes.iter().enumerate() {
            entries.push((FIRST_FILE + i as u64, FileType::RegularFile, &n.name));
        }
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.disk.size().div_ceil(4096);
        let files = self.nodes.len() as u64 + 1;
        reply.statfs(blocks, 0, 0, files, 0, 4096, 255, 4096);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(n) = self.node(ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        if !self.writable {
            reply.error(Errno::EROFS);
            return;
        }
        let end = match offset.checked_add(length) {
            Some(e) => e,
            None => {
                reply.error(Errno::EINVAL);
                return;
            }
        };
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 || (punch && !keep_size) || (punch && zero) {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        if end > n.len && !keep_size {
            // The file cannot grow.
            reply.error(Errno::ENOSPC);
            return;
        }
        let end = end.min(n.len);
        if !(punch || zero) || offset >= end {
            // Plain preallocation: every byte of a virtual disk is already addressable.
            reply.ok();
            return;
        }
        self.dirty.store(true, Ordering::SeqCst);
        let r = self.disk.write_zeroes(
            n.start + offset,
            end - offset,
            ZeroFlags { may_unmap: punch },
        );
        self.invalidate_allocation();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Some(n) = self.node(ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        let Ok(off) = u64::try_from(offset) else {
            reply.error(Errno::ENXIO);
            return;
        };
        let want_data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => {
                reply.error(Errno::EINVAL);
                return;
            }
        };
        match seek_data_hole(self.disk.as_ref(), n.start, n.len, off, want_data) {
            Ok(p) => reply.offset(p as i64),
            Err(e) => reply.error(e),
        }
    }
}

impl Drop for DiskFs {
    fn drop(&mut self) {
        // fuser calls destroy() when a session ends; this covers sessions that end otherwise.
        if self.started.load(Ordering::SeqCst) {
            self.shutdown();
        }
    }
}

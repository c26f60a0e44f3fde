//! Sticky failures: once durability is in doubt, nothing may report success again.
//!
//! When fsync/fdatasync fails, Linux may already have marked the dirty pages clean and dropped
//! the failed writes: a later fsync then succeeds without having written them, so its success
//! proves nothing. The same holds for any layer that lost pending state on a failure it cannot
//! retry. [`FailLatch`] records the first such failure; every later flush (and, for devices
//! that cannot continue, every write) reports it until the file is reopened.
//! [`StickyFlush`] puts that rule over any [`Storage`] (FileStorage has it built in).

use std::io;
use std::path::Path;
use std::sync::Mutex;

use crate::storage::Storage;

/// Remembers the first failure that made durability unknowable.
#[derive(Debug, Default)]
pub struct FailLatch {
    first: Mutex<Option<String>>,
}

impl FailLatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `what` (kept only if it is the first failure).
    pub fn set(&self, what: impl Into<String>) {
        let mut g = self.first.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(what.into());
        }
    }

    /// The first recorded failure, if any.
    pub fn get(&self) -> Option<String> {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ok while nothing failed; afterwards an EIO error naming `file` and the first failure.
    pub fn check(&self, file: Option<&Path>) -> io::Result<()> {
        match self.get() {
            None => Ok(()),
            Some(first) => Err(io::Error::other(format!(
                "{}: an earlier flush failed ({first}); data written since the last successful \
                 flush may be lost, so no later flush can succeed until the image is reopened",
                file.map_or_else(|| "image".to_string(), |p| p.display().to_string())
            ))),
        }
    }
}

/// A store whose `flush` fails forever after its first failure (Linux fsync semantics made
/// safe). Every other operation passes through.
#[derive(Debug)]
pub struct StickyFlush<S> {
    inner: S,
    latch: FailLatch,
}

impl<S: Storage> StickyFlush<S> {
    pub fn new(inner: S) -> Self {
        StickyFlush {
            inner,
            latch: FailLatch::new(),
        }
    }
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

/// Flushes through `f` unless `latch` holds a failure; a failure of `f` is latched.
pub(crate) fn latched_flush(
    latch: &FailLatch,
    file: Option<&Path>,
    f: impl FnOnce() -> io::Result<()>,
) -> io::Result<()> {
    latch.check(file)?;
    f().inspect_err(|e| latch.set(e.to_string()))
}

impl<S: Storage> Storage for StickyFlush<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        latched_flush(&self.latch, self.inner.path(), || self.inner.flush())
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn data_run(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        self.inner.data_run(offset, len)
    }
    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
    fn file(&self) -> Option<&std::fs::File> {
        self.inner.file()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{FaultPlan, FaultyStorage};

    #[test]
    fn a_failed_flush_fails_every_later_flush() {
        let plan = FaultPlan {
            fail_flush: Some(1),
            ..Default::default()
        };
        let s = StickyFlush::new(FaultyStorage::new(Vec::new(), plan));
        s.write_at(b"a", 0).unwrap();
        assert!(s.flush().is_err());
        // The store itself would now succeed (a transient fault); the wrapper must not.
        assert!(s.inner().flush().is_ok());
        let e = s.flush().unwrap_err().to_string();
        assert!(e.contains("earlier flush failed"), "{e}");
        assert!(s.flush().is_err());
    }
}

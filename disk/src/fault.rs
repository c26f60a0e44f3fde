//! A fault-injecting, crash-simulating store for tests of crash safety.
//!
//! It keeps two images: `volatile` (what reads see, like the page cache) and `durable` (what is
//! on the platter after the last flush). Writes and truncations since the last flush are kept as
//! pending operations. [`FaultyStorage::crash_image`] builds the bytes a machine could find after
//! power loss: the durable image plus any subset of the pending operations, in order, with writes
//! possibly torn at 512-byte sector boundaries.
//!
//! Faults are planned by operation count ([`FaultPlan`]): fail the Nth write, fail the Nth flush,
//! make the Nth write short, or "crash" at the Nth operation, after which every call fails.
//! Planned faults fire once: the operations after them succeed (a transient fault), so callers
//! can be tested on retrying. A crash after a failed flush is [`FaultyStorage::crash_image`]
//! taken after it. With [`FaultPlan::lossy_failed_flush`] a failed flush behaves like Linux
//! fsync: each write pending at that moment independently either reached the disk or was
//! dropped (its pages marked clean, so no later flush writes it), while reads still see it.

use std::io;
use std::sync::Mutex;

use crate::storage::{mem_read, mem_write, Storage};

/// Which operation (counted from 0 over writes, set_len and flushes together) misbehaves.
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultPlan {
    /// This write returns EIO and changes nothing.
    pub fail_write: Option<u64>,
    /// This flush returns EIO and makes nothing durable.
    pub fail_flush: Option<u64>,
    /// This write stores only its first half, then returns EIO.
    pub short_write: Option<u64>,
    /// From this operation on, everything fails (the machine is gone).
    pub crash_at: Option<u64>,
    /// Fail with ENOSPC when the store would grow past this length.
    pub max_len: Option<u64>,
    /// When the planned flush fails, each pending write is kept or dropped at random (this
    /// seed): Linux's fsync-failure semantics. Without it a failed flush changes nothing.
    pub lossy_failed_flush: Option<u64>,
}

#[derive(Debug)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug)]
struct State {
    volatile: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Pending>,
    ops: u64,
    plan: FaultPlan,
    crashed: bool,
    faults_hit: u64,
    dropped: u64,
}

/// Applies one pending operation to a disk image.
fn apply(img: &mut Vec<u8>, op: &Pending) {
    match op {
        Pending::SetLen(len) => img.resize(*len as usize, 0),
        Pending::Write { offset, data } => {
            let _ = mem_write(img, data, *offset);
        }
    }
}

#[derive(Debug)]
pub struct FaultyStorage {
    state: Mutex<State>,
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("injected fault: {what}"))
}

/// A small deterministic generator (splitmix64) so crash tests are reproducible by seed.
#[derive(Clone, Debug)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

impl FaultyStorage {
    pub fn new(initial: Vec<u8>, plan: FaultPlan) -> Self {
        FaultyStorage {
            state: Mutex::new(State {
                volatile: initial.clone(),
                durable: initial,
                pending: Vec::new(),
                ops: 0,
                plan,
                crashed: false,
                faults_hit: 0,
                dropped: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the plan; operation counting continues.
    pub fn set_plan(&self, plan: FaultPlan) {
        self.lock().plan = plan;
    }

    /// Operations (writes, truncations, flushes) seen so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// How many planned faults actually fired.
    pub fn faults_hit(&self) -> u64 {
        self.lock().faults_hit
    }

    /// Whether the simulated machine has crashed.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// What readers see now.
    pub fn volatile(&self) -> Vec<u8> {
        self.lock().volatile.clone()
    }

    /// What survived the last flush.
    pub fn durable(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// A possible disk state after power loss now: durable bytes plus a random, in-order subset
    /// of pending operations, each write possibly torn to a prefix of whole 512-byte sectors.
    pub fn crash_image(&self, rng: &mut SplitMix) -> Vec<u8> {
        let st = self.lock();
        let mut img = st.durable.clone();
        for op in &st.pending {
            if rng.below(2) == 0 {
                continue;
            }
            match op {
                Pending::SetLen(len) => img.resize(*len as usize, 0),
                Pending::Write { offset, data } => {
                    let sectors = data.len().div_ceil(512) as u64;
                    let keep = if sectors > 1 && rng.below(4) == 0 {
                        (rng.below(sectors) as usize * 512).min(data.len())
                    } else {
                        data.len()
                    };
                    let _ = mem_write(&mut img, &data[..keep], *offset);
                }
            }
        }
        img
    }

    /// Pending operations the last lossy failed flush dropped (for test diagnostics).
    pub fn dropped_writes(&self) -> u64 {
        self.lock().dropped
    }

    fn begin_op(st: &mut State) -> io::Result<u64> {
        if st.crashed {
            return Err(eio("machine crashed"));
        }
        let n = st.ops;
        st.ops += 1;
        if st.plan.crash_at == Some(n) {
            st.crashed = true;
            st.faults_hit += 1;
            return Err(eio("crash"));
        }
        Ok(n)
    }
}

impl Storage for FaultyStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.lock();
        if st.crashed {
            return Err(eio("machine crashed"));
        }
        mem_read(&st.volatile, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.lock();
        let n = Self::begin_op(&mut st)?;
        if st.plan.fail_write == Some(n) {
            st.faults_hit += 1;
            return Err(eio("write failed"));
        }
        let end = offset.saturating_add(buf.len() as u64);
        if let Some(max) = st.plan.max_len {
            if end > max && end > st.volatile.len() as u64 {
                st.faults_hit += 1;
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        let data = if st.plan.short_write == Some(n) {
            st.faults_hit += 1;
            &buf[..buf.len() / 2]
        } else {
            buf
        };
        mem_write(&mut st.volatile, data, offset)?;
        st.pending.push(Pending::Write {
            offset,
            data: data.to_vec(),
        });
        if data.len() < buf.len() {
            return Err(eio("short write"));
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut st = self.lock();
        let n = Self::begin_op(&mut st)?;
        if st.plan.fail_flush == Some(n) {
            st.faults_hit += 1;
            if let Some(seed) = st.plan.lossy_failed_flush {
                // Each pending write either made it or is gone for good; reads still see it.
                let mut rng = SplitMix(seed ^ n);
                let pending = std::mem::take(&mut st.pending);
                for op in &pending {
                    if rng.below(2) == 0 {
                        st.dropped += 1;
                    } else {
                        apply(&mut st.durable, op);
                    }
                }
            }
            return Err(eio("flush failed"));
        }
        // Only what is pending reaches the disk: writes a lossy failed flush dropped stay lost.
        let pending = std::mem::take(&mut st.pending);
        for op in &pending {
            apply(&mut st.durable, op);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let st = self.lock();
        if st.crashed {
            return Err(eio("machine crashed"));
        }
        Ok(st.volatile.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        Self::begin_op(&mut st)?;
        if len > (1u64 << 40) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "too large"));
        }
        if let Some(max) = st.plan.max_len {
            if len > max && len > st.volatile.len() as u64 {
                st.faults_hit += 1;
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        st.volatile.resize(len as usize, 0);
        st.pending.push(Pending::SetLen(len));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unflushed_writes_may_vanish_flushed_ones_stay() {
        let s = FaultyStorage::new(vec![0; 4096], FaultPlan::default());
        s.write_at(&[1; 512], 0).unwrap();
        s.flush().unwrap();
        s.write_at(&[2; 512], 512).unwrap();
        let mut seen_without = false;
        let mut seen_with = false;
        let mut rng = SplitMix(7);
        for _ in 0..64 {
            let img = s.crash_image(&mut rng);
            assert_eq!(&img[..512], &[1; 512][..]);
            if img[512] == 2 {
                seen_with = true;
            } else {
                seen_without = true;
            }
        }
        assert!(seen_with && seen_without);
    }

    #[test]
    fn planned_faults_fire_once_each() {
        let plan = FaultPlan {
            fail_write: Some(0),
            fail_flush: Some(2),
            ..Default::default()
        };
        let s = FaultyStorage::new(Vec::new(), plan);
        assert!(s.write_at(b"abc", 0).is_err());
        s.write_at(b"abc", 0).unwrap();
        assert!(s.flush().is_err());
        s.flush().unwrap();
        assert_eq!(s.durable(), b"abc");
        assert_eq!(s.faults_hit(), 2);
    }

    #[test]
    fn lossy_failed_flush_drops_some_writes_for_good() {
        let mut lost_somewhere = false;
        for seed in 0..16 {
            let plan = FaultPlan {
                fail_flush: Some(4),
                lossy_failed_flush: Some(seed),
                ..Default::default()
            };
            let s = FaultyStorage::new(vec![0; 2048], plan);
            for i in 0..4u8 {
                s.write_at(&[i + 1; 512], i as u64 * 512).unwrap();
            }
            assert!(s.flush().is_err());
            // Reads still see every write; the next flush succeeds but cannot bring back the
            // dropped ones.
            assert_eq!(s.volatile()[1536], 4);
            s.flush().unwrap();
            let d = s.durable();
            let kept = (0..4).filter(|&i| d[i * 512] == i as u8 + 1).count() as u64;
            assert_eq!(kept + s.dropped_writes(), 4);
            lost_somewhere |= s.dropped_writes() > 0;
        }
        assert!(lost_somewhere);
    }

    #[test]
    fn crash_stops_everything() {
        let plan = FaultPlan {
            crash_at: Some(1),
            ..Default::default()
        };
        let s = FaultyStorage::new(Vec::new(), plan);
        s.write_at(b"a", 0).unwrap();
        assert!(s.write_at(b"b", 1).is_err());
        assert!(s.flush().is_err());
        let mut b = [0u8; 1];
        assert!(s.read_at(&mut b, 0).is_err());
        assert!(s.crashed());
    }
}

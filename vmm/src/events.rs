//! A bounded log of VMM events (hypercalls of note, MSR surprises, emulation fix-ups) that
//! goes into failure reports, and to stderr when verbose.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

const KEEP: usize = 200;

#[derive(Debug)]
pub struct EventLog {
    start: Instant,
    verbose: bool,
    inner: Mutex<VecDeque<String>>,
}

impl EventLog {
    pub fn new(verbose: bool) -> Self {
        EventLog {
            start: Instant::now(),
            verbose,
            inner: Mutex::new(VecDeque::new()),
        }
    }

    pub fn note(&self, msg: impl Into<String>) {
        let line = format!(
            "[{:9.3}s] {}",
            self.start.elapsed().as_secs_f64(),
            msg.into()
        );
        if self.verbose {
            eprintln!("vmm: {line}");
        }
        let mut q = crate::hv::lock(&self.inner);
        if q.len() >= KEEP {
            q.pop_front();
        }
        q.push_back(line);
    }

    pub fn lines(&self) -> Vec<String> {
        crate::hv::lock(&self.inner).iter().cloned().collect()
    }
}

//! Hostile images: every malformed image from `hostile/gen.rs` must be refused with a typed
//! error by every entry point (`info`, `check`, `convert`, `mount`, `serve` + nbdinfo): exit
//! status non-zero (check: 1, 2 or 3), never a panic, peak RSS under 256 MiB and under a
//! second of wall time per invocation (measured on the test binary, opt-level 1).

mod common;
#[path = "hostile/gen.rs"]
mod gen;

use common::*;
use std::time::Duration;

const MAX_RSS_KIB: u64 = 256 * 1024;
const MAX_WALL: Duration = Duration::from_secs(1);

struct Stats {
    runs: usize,
    worst_rss_kib: u64,
    worst_wall: Duration,
    failures: Vec<String>,
}

impl Stats {
    fn judge(&mut self, what: &str, m: &Measured, ok_codes: &dyn Fn(i32) -> bool) {
        self.runs += 1;
        self.worst_rss_kib = self.worst_rss_kib.max(m.max_rss_kib);
        self.worst_wall = self.worst_wall.max(m.wall);
        let first_line = m.stderr.lines().next().unwrap_or("").to_string();
        if m.panicked() {
            self.failures.push(format!(
                "{what}: panicked (code {}, signal {}): {}",
                m.code, m.signal, m.stderr
            ));
        } else if !ok_codes(m.code) {
            self.failures.push(format!(
                "{what}: exit {} (stdout {:?}, stderr {first_line:?})",
                m.code,
                m.stdout.lines().next().unwrap_or("")
            ));
        } else if m.code != 0 && m.stderr.trim().is_empty() && m.stdout.trim().is_empty() {
            self.failures
                .push(format!("{what}: failed without saying why"));
        }
        if m.max_rss_kib > MAX_RSS_KIB {
            self.failures.push(format!(
                "{what}: peak RSS {} KiB over 256 MiB",
                m.max_rss_kib
            ));
        }
        if m.wall > MAX_WALL {
            self.failures.push(format!("{what}: took {:?}", m.wall));
        }
    }
}

#[test]
fn every_hostile_image_is_refused_by_every_entry_point() {
    let dir = tmp();
    let images = gen::generate(dir.path());
    let refused = images
        .iter()
        .filter(|h| !matches!(h.expect, gen::Expect::Tolerated | gen::Expect::ReadAsRaw))
        .count();
    assert!(refused >= 40, "only {refused} hostile images");
    let fuse = fuse_usable();
    let nbdinfo = have("nbdinfo");
    let mut st = Stats {
        runs: 0,
        worst_rss_kib: 0,
        worst_wall: Duration::ZERO,
        failures: Vec::new(),
    };
    let mp = dir.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    for (i, h) in images.iter().enumerate() {
        let img = p(&h.path);
        let expect = h.expect;
        // What the reading entry points may answer.
        let nonzero = move |c: i32| match expect {
            gen::Expect::Refused | gen::Expect::ChainOnly => c != 0,
            gen::Expect::Tolerated => true,
            gen::Expect::ReadAsRaw => c == 0,
        };
        // info shows what the file itself says: a file that is sound but whose chain is
        // broken succeeds with a warning, as in qemu-img; --backing-chain fails on it.
        let info_codes = move |c: i32| match expect {
            gen::Expect::Refused => c != 0,
            gen::Expect::ChainOnly | gen::Expect::ReadAsRaw => c == 0,
            gen::Expect::Tolerated => true,
        };
        let m = viridian_measured(&["info", img]);
        st.judge(&format!("info {}", h.name), &m, &info_codes);
        let m = viridian_measured(&["info", "--backing-chain", img]);
        st.judge(&format!("info --backing-chain {}", h.name), &m, &nonzero);

        // check looks at one file: a sound file whose chain is broken may check clean.
        let check_codes = move |c: i32| match expect {
            gen::Expect::Refused => matches!(c, 1..=3),
            gen::Expect::ChainOnly | gen::Expect::Tolerated => matches!(c, 0..=3),
            gen::Expect::ReadAsRaw => c == 63,
        };
        let m = viridian_measured(&["check", img]);
        st.judge(&format!("check {}", h.name), &m, &check_codes);

        let target = dir.path().join(format!("out-{i}.raw"));
        let m = viridian_measured(&["convert", "-O", "raw", img, p(&target)]);
        st.judge(&format!("convert {}", h.name), &m, &nonzero);
        if m.code != 0 && target.exists() {
            st.failures
                .push(format!("convert {}: left a partial target behind", h.name));
        }
        let target = dir.path().join(format!("out-{i}.vhdx"));
        let m = viridian_measured(&["convert", "-O", "vhdx", img, p(&target)]);
        st.judge(&format!("convert -O vhdx {}", h.name), &m, &nonzero);
        if m.code != 0 && target.exists() {
            st.failures.push(format!(
                "convert -O vhdx {}: left a partial target behind",
                h.name
            ));
        }

        if fuse {
            let _guard = MountGuard(mp.clone());
            let m = viridian_measured(&["mount", img, p(&mp)]);
            st.judge(&format!("mount {}", h.name), &m, &nonzero);
        }

        let sock = dir.path().join(format!("s{i}.sock"));
        let start = std::time::Instant::now();
        match serve_start(&["--socket", p(&sock), img], &sock) {
            Ok(_guard) if !nonzero(0) => {
                // It should not have started; see what a client gets, then fail.
                if nbdinfo {
                    let uri = format!("nbd+unix:///?socket={}", p(&sock));
                    let o = tool("nbdinfo", &[&uri]);
                    st.failures.push(format!(
                        "serve {}: served the image (nbdinfo exit {:?})",
                        h.name,
                        o.status.code()
                    ));
                } else {
                    st.failures
                        .push(format!("serve {}: served the image", h.name));
                }
            }
            Ok(_guard) => st.runs += 1,
            Err((c, stderr)) => {
                st.runs += 1;
                let el = start.elapsed();
                st.worst_wall = st.worst_wall.max(el);
                if (c == 0 && !nonzero(0)) || c == 101 || stderr.contains("panicked") {
                    st.failures
                        .push(format!("serve {}: exit {c}: {stderr}", h.name));
                }
                if el > MAX_WALL {
                    st.failures.push(format!("serve {}: took {el:?}", h.name));
                }
                // Nothing may listen: a client gets a clean refusal.
                if nbdinfo && sock.exists() {
                    st.failures
                        .push(format!("serve {}: left its socket behind", h.name));
                }
            }
        }
    }
    eprintln!(
        "{} hostile images ({refused} refused, {} tolerated), {} invocations, worst peak RSS {} KiB, worst wall {:?}",
        images.len(),
        images.len() - refused,
        st.runs,
        st.worst_rss_kib,
        st.worst_wall
    );
    assert!(
        st.failures.is_empty(),
        "{} failures:\n{}",
        st.failures.len(),
        st.failures.join("\n")
    );
}

//! Cost at scale: an empty 64 TiB dynamic VHDX (1 MiB blocks, a 512 MiB BAT) must cost what
//! it holds, not what it could hold. Each step runs as its own child process and its peak
//! resident set (wait4's rusage) is bounded; the file stays small on disk.

mod common;

use common::*;

/// Peak RSS allowed for any one step. Holding the whole BAT would take 512 MiB; the binary
/// itself needs a few MiB.
const RSS_LIMIT_KIB: u64 = 32 * 1024;

fn step(args: &[&str]) -> Measured {
    let m = viridian_measured(args);
    assert_eq!(m.code, 0, "viridian {args:?} failed: {}", m.stderr);
    assert!(
        m.max_rss_kib <= RSS_LIMIT_KIB,
        "viridian {args:?} peaked at {} KiB resident, limit {RSS_LIMIT_KIB} KiB",
        m.max_rss_kib
    );
    m
}

#[test]
fn empty_64_tib_vhdx_costs_what_it_holds() {
    let d = tmp();
    let img = join(d.path(), "big.vhdx");
    let img = p(&img);
    step(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        img,
        "64T",
    ]);
    // The unused BAT is a hole: a few MiB on disk, not 512 MiB.
    let on_disk = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(img).expect("stat").blocks() * 512
    };
    assert!(
        on_disk <= 16 << 20,
        "empty 64 TiB image occupies {on_disk} bytes"
    );

    // A write in the middle allocates one block and dirties one BAT page.
    let mid = (32u64 << 40).to_string();
    step(&["io", "-c", &format!("write -P 0x5a {mid} 1M"), img]);
    step(&["io", "-r", "-c", &format!("read -P 0x5a {mid} 1M"), img]);
    let info = step(&["info", "--output", "json", img]);
    let v: serde_json::Value = serde_json::from_str(&info.stdout).expect("info JSON");
    assert_eq!(v["virtual-size"], 64u64 << 40);
    if have("qemu-img") {
        // qemu reads back what we wrote, at the place we wrote it.
        let out = tool(
            "qemu-io",
            &[
                "-f",
                "vhdx",
                "-r",
                "-c",
                &format!("read -P 0x5a {mid} 1M"),
                img,
            ],
        );
        assert!(
            out.status.success()
                && !String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"),
            "qemu-io: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

//! Cost at scale: an empty 64 TiB dynamic VHDX (1 MiB blocks, a 512 MiB BAT) and an empty
//! 2040 GiB dynamic VHD (a 4 MiB BAT with 2 MiB blocks, 16 MiB with 512 KiB blocks) must cost
//! what they hold, not what they could hold. Each step runs as its own child process and its
//! peak resident set (wait4's rusage) is bounded; the files stay small on disk.

mod common;

use common::*;

/// Peak RSS allowed for any one step. Holding the whole BAT would take 512 MiB; the binary
/// itself needs a few MiB.
const RSS_LIMIT_KIB: u64 = 32 * 1024;

fn step(args: &[&str]) -> Measured {
    step_named(&format!("viridian {args:?}"), args)
}

/// [`step`], naming the step `what` in its messages (for argument lists too long to print).
fn step_named(what: &str, args: &[&str]) -> Measured {
    let m = viridian_measured(args);
    assert_eq!(m.code, 0, "{what} failed: {}", m.stderr);
    assert!(
        m.max_rss_kib <= RSS_LIMIT_KIB,
        "{what} peaked at {} KiB resident, limit {RSS_LIMIT_KIB} KiB",
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

/// Peak RSS a step on a 2040 GiB VHD may add to the same step on an 8 MiB one: the BAT page
/// cache (1 MiB by default) and the open's bounded scan buffers, with room to spare. Holding the
/// table, as before, added about 8 MiB (2 MiB blocks) and 32 MiB (512 KiB blocks).
const VHD_EXTRA_KIB: u64 = 3 * 1024;

/// Runs `big`, which must succeed and peak at most [`VHD_EXTRA_KIB`] above `small`.
fn step_like(big: &[&str], small: &[&str]) -> Measured {
    let limit = viridian_measured(small).max_rss_kib + VHD_EXTRA_KIB;
    let m = viridian_measured(big);
    assert_eq!(m.code, 0, "viridian {big:?} failed: {}", m.stderr);
    assert!(
        m.max_rss_kib <= limit,
        "viridian {big:?} peaked at {} KiB resident, limit {limit} KiB ({small:?} + {VHD_EXTRA_KIB})",
        m.max_rss_kib
    );
    m
}

#[test]
fn empty_2040_gib_vhd_costs_what_it_holds() {
    let d = tmp();
    let mid = (1u64 << 40).to_string();
    for bs in ["2M", "512K"] {
        let opt = format!("block_size={bs}");
        let (small, img) = (join(d.path(), "small.vhd"), join(d.path(), "big.vhd"));
        let (small, img) = (p(&small), p(&img));
        // The small create runs first, so the small image exists for the steps below.
        let c_small = ["create", "-q", "-f", "vhd", "-o", &opt, small, "8M"];
        let c_big = ["create", "-q", "-f", "vhd", "-o", &opt, img, "2040G"];
        step_like(&c_big, &c_small);
        let write = format!("write -P 0x5a {mid} 1M");
        let read = format!("read -P 0x5a {mid} 1M");
        step_like(
            &["io", "-c", &write, img],
            &["io", "-c", "write -P 0x5a 4M 1M", small],
        );
        step_like(
            &["io", "-r", "-c", &read, img],
            &["io", "-r", "-c", "read -P 0x5a 4M 1M", small],
        );
        let info = step_like(
            &["info", "--output", "json", img],
            &["info", "--output", "json", small],
        );
        let j: serde_json::Value = serde_json::from_str(&info.stdout).expect("info JSON");
        assert_eq!(j["virtual-size"], 2040u64 << 30);
        if have("qemu-img") {
            // qemu reads back what we wrote, at the place we wrote it.
            let out = tool("qemu-io", &["-f", "vpc", "-r", "-c", &read, img]);
            assert!(
                out.status.success()
                    && !String::from_utf8_lossy(&out.stdout)
                        .contains("Pattern verification failed"),
                "qemu-io: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::fs::remove_file(img).expect("remove");
        std::fs::remove_file(small).expect("remove");
    }
}

/// Fills the BAT region of a dynamic VHDX without parent with entries that are all non-zero:
/// payload blocks PAYLOAD_BLOCK_ZERO (state 2, no file offset, so the file stays small on disk
/// apart from the table), sector-bitmap entries SB_BLOCK_PRESENT (state 6, offset 0, ignored
/// without a parent), as a hostile or foreign writer could.
fn fill_bat(img: &str, bat_offset: u64, entries: u64, chunk_ratio: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .expect("open image");
    f.seek(SeekFrom::Start(bat_offset)).expect("seek");
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    for i in 0..entries {
        let e: u64 = if i % (chunk_ratio + 1) == chunk_ratio {
            6
        } else {
            2
        };
        w.write_all(&e.to_le_bytes()).expect("write BAT");
    }
    w.flush().expect("flush BAT");
}

/// A 64 TiB VHDX whose every BAT entry is non-zero (a 128 MiB table with 4 MiB blocks; held
/// whole it would take 128 MiB): info, check and a 1 MiB write stay within the RSS bound, and
/// what they report shows they saw the whole table.
#[test]
fn fully_populated_64_tib_vhdx_stays_bounded() {
    let d = tmp();
    let img = join(d.path(), "full.vhdx");
    let img = p(&img);
    step(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=4M",
        img,
        "64T",
    ]);
    let info = step(&["info", "--output", "json", img]);
    let v: serde_json::Value = serde_json::from_str(&info.stdout).expect("info JSON");
    let data = &v["format-specific"]["data"];
    let bat_offset = data["bat-offset"].as_u64().expect("bat-offset");
    let chunk_ratio = data["chunk-ratio"].as_u64().expect("chunk-ratio");
    let blocks = (64u64 << 40) / (4 << 20);
    let entries = blocks + (blocks - 1) / chunk_ratio;
    fill_bat(img, bat_offset, entries, chunk_ratio);

    let info = step(&["info", "--output", "json", img]);
    let v: serde_json::Value = serde_json::from_str(&info.stdout).expect("info JSON");
    assert_eq!(
        v["format-specific"]["data"]["block-states"],
        serde_json::json!({ "zero": blocks }),
        "info counted every entry"
    );
    let check = step(&["check", "--output", "json", img]);
    let c: serde_json::Value = serde_json::from_str(&check.stdout).expect("check JSON");
    assert_eq!(c["total-clusters"], blocks);
    assert_eq!(c["allocated-clusters"], 0);
    // The first allocation walks the table once (blocks larger than 1 MiB may run past the
    // end of the file); the write then reads back, and the rest of the disk still reads zeros.
    let mid = (32u64 << 40).to_string();
    step(&["io", "-c", &format!("write -P 0x5a {mid} 1M"), img]);
    step(&["io", "-r", "-c", &format!("read -P 0x5a {mid} 1M"), img]);
    step(&["io", "-r", "-c", "read -P 0 0 4M", img]);
    let check = step(&["check", "--output", "json", img]);
    let c: serde_json::Value = serde_json::from_str(&check.stdout).expect("check JSON");
    assert_eq!(c["allocated-clusters"], 1);
}

/// A writer that never flushes: every write lands in another BAT page, and dirty pages are
/// pinned until a log entry carries them, so without a flush of its own the image would hold
/// them all (about 10 KiB each, 4,000 here). It flushes by itself past 4 MiB of them.
#[test]
fn unflushed_writes_across_many_bat_pages_stay_bounded() {
    let d = tmp();
    let img = join(d.path(), "spread.vhdx");
    let img = p(&img);
    step(&["create", "-q", "-f", "vhdx", img, "64T"]);
    let stride: u64 = 16 << 30;
    let cmds: Vec<String> = (0..4000u64)
        .map(|k| format!("write -q -P 0x{:02x} {} 4k", k % 251 + 1, k * stride))
        .collect();
    let mut args = vec!["--bat-cache", "4k", "io"];
    for c in &cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img);
    step_named("4,000 unflushed writes", &args);
    for k in [0u64, 1, 1999, 3999] {
        let c = format!("read -P 0x{:02x} {} 4k", k % 251 + 1, k * stride);
        step(&["io", "-r", "-c", &c, img]);
    }
    let out = viridian(&["check", img]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Runs `args` with `--bat-cache 64M` and with `--bat-cache 4k`: both succeed, and the big
/// cache holds at least 8 MiB more (the 16 MiB table is read at open up to the bound), so the
/// verb follows the global option.
fn follows_bat_cache(what: &str, args: impl Fn(&str) -> Vec<String>) {
    let run = |cache: &str| {
        let a = args(cache);
        let mut full = vec!["--bat-cache", cache];
        full.extend(a.iter().map(String::as_str));
        let m = viridian_measured(&full);
        assert_eq!(m.code, 0, "{what} --bat-cache {cache}: {}", m.stderr);
        m.max_rss_kib
    };
    let (big, small) = (run("64M"), run("4k"));
    assert!(
        big >= small + 8 * 1024,
        "{what}: --bat-cache 64M peaked at {big} KiB, 4k at {small} KiB: the option was ignored"
    );
}

/// `create` and `check` open images without chain::OpenOptions; they follow `--bat-cache`
/// too (a 2040 GiB VHD with 512 KiB blocks and an 8 TiB VHDX with 4 MiB blocks whose every
/// entry is set: 16 MiB tables).
#[test]
fn create_and_check_follow_the_bat_cache_option() {
    let d = tmp();
    let vhd = |c: &str| p(&join(d.path(), &format!("c{c}.vhd"))).to_string();
    follows_bat_cache("create vhd", |c| {
        [
            "create",
            "-q",
            "-f",
            "vhd",
            "-o",
            "block_size=512K",
            &vhd(c),
            "2040G",
        ]
        .map(String::from)
        .to_vec()
    });
    let img = vhd("64M");
    follows_bat_cache("check vhd", |_| vec!["check".into(), img.clone()]);

    let x = join(d.path(), "c.vhdx");
    let x = p(&x);
    step(&["create", "-q", "-f", "vhdx", "-o", "block_size=4M", x, "8T"]);
    let info = step(&["info", "--output", "json", x]);
    let v: serde_json::Value = serde_json::from_str(&info.stdout).expect("info JSON");
    let data = &v["format-specific"]["data"];
    let bat_offset = data["bat-offset"].as_u64().expect("bat-offset");
    let chunk_ratio = data["chunk-ratio"].as_u64().expect("chunk-ratio");
    let blocks = (8u64 << 40) / (4 << 20);
    fill_bat(
        x,
        bat_offset,
        blocks + (blocks - 1) / chunk_ratio,
        chunk_ratio,
    );
    follows_bat_cache("check vhdx", |_| vec!["check".into(), x.to_string()]);
}

/// Points every BAT entry of the dynamic VHD at `img` at a block of its own after the table
/// and moves the footer past the last one (a sparse file of about 2 TiB): a fully allocated
/// table without 2 TiB of data. Returns the number of entries.
fn fill_vhd_bat(img: &str) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .expect("open image");
    let mut footer = [0u8; 512];
    f.read_exact_at(&mut footer, 0).expect("footer copy");
    let mut h = [0u8; 1024];
    f.read_exact_at(&mut h, 512).expect("dynamic header");
    let table = u64::from_be_bytes(h[16..24].try_into().unwrap());
    let entries = u32::from_be_bytes(h[28..32].try_into().unwrap()) as u64;
    let block = u32::from_be_bytes(h[32..36].try_into().unwrap()) as u64;
    let slot = block + (block / 512).div_ceil(8).div_ceil(512) * 512;
    let data = (table + entries * 4).div_ceil(512) * 512;
    let raw: Vec<u8> = (0..entries)
        .flat_map(|i| (((data + i * slot) / 512) as u32).to_be_bytes())
        .collect();
    f.write_all_at(&raw, table).expect("write BAT");
    let end = data + entries * slot;
    f.set_len(end + 512).expect("extend");
    f.write_all_at(&footer, end).expect("footer");
    entries
}

/// A 2040 GiB VHD whose every entry is allocated (a 4 MiB table): open reads only the pages the
/// cache holds, so a read with a one-page cache peaks no higher than on an 8 MiB image (open
/// walked the whole table before: 8 MiB more); info walks the table to count the blocks.
#[test]
fn fully_allocated_2040_gib_vhd_opens_without_reading_its_table() {
    let d = tmp();
    let (small, img) = (join(d.path(), "small.vhd"), join(d.path(), "full.vhd"));
    let (small, img) = (p(&small), p(&img));
    step(&["create", "-q", "-f", "vhd", small, "8M"]);
    step(&["create", "-q", "-f", "vhd", img, "2040G"]);
    let entries = fill_vhd_bat(img);
    step_like(
        &[
            "--bat-cache",
            "4k",
            "io",
            "-r",
            "-c",
            "read -q -P 0 1T 4k",
            img,
        ],
        &[
            "--bat-cache",
            "4k",
            "io",
            "-r",
            "-c",
            "read -q -P 0 4M 4k",
            small,
        ],
    );
    let info = step(&["info", "--output", "json", img]);
    let v: serde_json::Value = serde_json::from_str(&info.stdout).expect("info JSON");
    assert_eq!(v["format-specific"]["data"]["allocated-blocks"], entries);
}

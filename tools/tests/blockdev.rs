//! Block devices (loop devices) as sources and targets: true size from the kernel, sector
//! sizes, `convert` from and onto them, `serve` and `mount`, with raw, VHD and VHDX content.
//! Skipped with a message where loop devices cannot be set up; VIRIDIAN_REQUIRE_ALL=1 makes
//! that a failure. Every device is detached on drop.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// An attached loop device, detached on drop.
struct Loop(PathBuf);

impl Loop {
    /// `losetup --find --show [extra] FILE`; None (after a SKIP message) when loop devices do
    /// not work here.
    fn attach(file: &Path, extra: &[&str]) -> Option<Loop> {
        let mut args = vec!["--find", "--show"];
        args.extend_from_slice(extra);
        args.push(p(file));
        let o = std::process::Command::new("losetup").args(&args).output();
        match o {
            Ok(o) if o.status.success() => {
                let dev = stdout_of(&o).trim().to_string();
                Some(Loop(PathBuf::from(dev)))
            }
            other => {
                let why = match other {
                    Ok(o) => stderr_of(&o).trim().to_string(),
                    Err(e) => e.to_string(),
                };
                if require_all() {
                    panic!("loop devices are required (VIRIDIAN_REQUIRE_ALL=1): losetup: {why}");
                }
                eprintln!("SKIP: cannot set up a loop device: {why}");
                None
            }
        }
    }
    fn path(&self) -> &str {
        p(&self.0)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", p(&self.0)])
            .status();
    }
}

fn sector_sizes(v: &Value) -> (u64, u64) {
    let data = &v["format-specific"]["data"];
    let l = data
        .get("logical-sector-size")
        .or_else(|| data.get("logical_sector_size"))
        .and_then(Value::as_u64)
        .unwrap();
    let ph = data
        .get("physical-sector-size")
        .or_else(|| data.get("physical_sector_size"))
        .and_then(Value::as_u64)
        .unwrap();
    (l, ph)
}

/// Waits until a background mount process has let go of `image`.
fn wait_released(image: &str) {
    for _ in 0..400 {
        if code(&["info", image]) == 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("{image} still in use after unmount");
}

fn ready() -> bool {
    have("losetup")
}

#[test]
fn raw_loop_device_is_a_source_and_a_target() {
    if !ready() {
        return;
    }
    let d = tmp();
    let back = join(d.path(), "back.raw");
    patterned_raw(&back, 8 << 20, 3);
    let Some(dev) = Loop::attach(&back, &[]) else {
        return;
    };
    let v = ok_json(&["info", "--output", "json", dev.path()]);
    assert_eq!(v["format"], "raw", "{v}");
    assert_eq!(v["virtual-size"], 8u64 << 20, "{v}");
    assert_eq!(v["block-device"], true, "{v}");
    assert_eq!(sector_sizes(&v), (512, 512));
    // From the device: a VHDX with the device's bytes.
    let x = join(d.path(), "x.vhdx");
    ok(&["convert", "-O", "vhdx", dev.path(), p(&x)]);
    let back_out = join(d.path(), "x.raw");
    ok(&["convert", "-O", "raw", p(&x), p(&back_out)]);
    assert!(
        read_all(&back_out) == read_all(&back),
        "convert from the device lost data"
    );
    // Onto the device (-n): other content, written through, zeros included.
    let other = join(d.path(), "other.raw");
    patterned_raw(&other, 8 << 20, 77);
    let other_vhd = join(d.path(), "other.vhd");
    ok(&["convert", "-O", "vhd", p(&other), p(&other_vhd)]);
    ok(&["convert", "-n", "-O", "raw", p(&other_vhd), dev.path()]);
    let dev_bytes = std::fs::read(dev.path()).unwrap();
    assert!(
        dev_bytes == read_all(&other),
        "convert -n onto the device differs"
    );
    // serve: the export has the device's size and bytes.
    if have("nbdinfo") && have("nbdcopy") {
        let sock = join(d.path(), "s.sock");
        let _s = serve_start(&["--socket", p(&sock), dev.path()], &sock).expect("serve");
        let uri = format!("nbd+unix:///?socket={}", p(&sock));
        assert_eq!(
            tool_ok("nbdinfo", &["--size", &uri]).trim(),
            (8u64 << 20).to_string()
        );
        let copy = join(d.path(), "nbd.raw");
        tool_ok("nbdcopy", &[&uri, p(&copy)]);
        assert!(read_all(&copy) == read_all(&other));
    }
    // mount shows the device's bytes.
    if fuse_usable() {
        let mp = mount_point(d.path(), "mnt");
        ok(&["mount", dev.path(), p(&mp)]);
        let seen = {
            let _m = MountGuard(mp.clone());
            std::fs::read(mp.join("disk")).unwrap()
        };
        assert!(seen == read_all(&other), "mount view of the device differs");
        wait_released(dev.path());
    }
    // io writes and zeroes on the device (BLKZEROOUT path).
    ok(&[
        "io",
        "-f",
        "raw",
        "-c",
        "zero 1M 64k",
        "-c",
        "discard 3M 1M",
        dev.path(),
    ]);
    let dev_bytes = std::fs::read(dev.path()).unwrap();
    assert!(dev_bytes[1 << 20..(1 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0));
    // Discard is a hint: old bytes or zeros, nothing else (a loop device punches a hole).
    let old = read_all(&other);
    for (i, (&now, &was)) in dev_bytes[3 << 20..4 << 20]
        .iter()
        .zip(&old[3 << 20..4 << 20])
        .enumerate()
    {
        assert!(
            now == 0 || now == was,
            "byte {i} of the discarded range is neither"
        );
    }
    // Everything else is untouched.
    assert!(dev_bytes[..1 << 20] == old[..1 << 20]);
    assert!(dev_bytes[4 << 20..] == old[4 << 20..]);
}

#[test]
fn vhd_and_vhdx_on_loop_devices_open_with_their_true_size() {
    if !ready() {
        return;
    }
    let d = tmp();
    // Data everywhere, so every block of the images is allocated: a device cannot grow, so
    // writes go into existing blocks.
    let src = join(d.path(), "src.raw");
    let data: Vec<u8> = (0..6u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8 | 1)
        .collect();
    std::fs::write(&src, &data).unwrap();
    for (fmt, opts) in [
        ("vhd", "subformat=fixed"),
        ("vhd", "subformat=dynamic"),
        ("vhdx", "subformat=dynamic"),
    ] {
        let img = join(d.path(), &format!("img-{}.{fmt}", opts.len()));
        ok(&["convert", "-O", fmt, "-o", opts, p(&src), p(&img)]);
        let Some(dev) = Loop::attach(&img, &[]) else {
            return;
        };
        let v = ok_json(&["info", "--output", "json", dev.path()]);
        let want = if fmt == "vhd" { "vpc" } else { "vhdx" };
        assert_eq!(v["format"], want, "{fmt} {opts}: {v}");
        assert_eq!(v["virtual-size"], 6u64 << 20, "{v}");
        // Read-write open with the true size: a write into allocated data, read back.
        ok(&["io", "-c", "write -P 0x3d 4096 4096", dev.path()]);
        let out = fresh_path(d.path(), "read.raw");
        ok(&["convert", "-O", "raw", dev.path(), p(&out)]);
        let mut want_bytes = read_all(&src);
        want_bytes[4096..8192].fill(0x3d);
        assert!(
            read_all(&out) == want_bytes,
            "{fmt} {opts} on a device reads wrong"
        );
        // mount shows the virtual disk.
        if fuse_usable() {
            let mp = mount_point(d.path(), "mnt");
            ok(&["mount", dev.path(), p(&mp)]);
            let seen = {
                let _m = MountGuard(mp.clone());
                std::fs::read(mp.join("disk")).unwrap()
            };
            assert!(seen == want_bytes, "{fmt} {opts}: mount view differs");
            wait_released(dev.path());
        }
        drop(dev);
        let _ = std::fs::remove_file(&img);
    }
}

#[test]
fn a_4096_byte_sector_device_keeps_its_geometry() {
    if !ready() {
        return;
    }
    let d = tmp();
    let back = join(d.path(), "4k.raw");
    patterned_raw(&back, 8 << 20, 8);
    let Some(dev) = Loop::attach(&back, &["-b", "4096"]) else {
        return;
    };
    let v = ok_json(&["info", "--output", "json", dev.path()]);
    assert_eq!(sector_sizes(&v).0, 4096, "{v}");
    let x = join(d.path(), "4k.vhdx");
    ok(&["convert", "-O", "vhdx", dev.path(), p(&x)]);
    let v = ok_json(&["info", "--output", "json", p(&x)]);
    assert_eq!(sector_sizes(&v).0, 4096, "{v}");
    // (qemu-img cannot open VHDX with 4096-byte logical sectors: "Operation not supported".)
    let out = join(d.path(), "4k.out");
    ok(&["convert", "-O", "raw", p(&x), p(&out)]);
    assert!(read_all(&out) == read_all(&back));
}

/// A device cannot grow: a write that needs a new block fails with a clear message, and the
/// image stays consistent.
#[test]
fn a_full_device_refuses_growth_cleanly() {
    if !ready() {
        return;
    }
    let d = tmp();
    for fmt in ["vhd", "vhdx"] {
        let img = image_in(d.path(), &format!("empty.{fmt}"), fmt, "8M");
        let Some(dev) = Loop::attach(&img, &[]) else {
            return;
        };
        let o = viridian(&["io", "-c", "write -P 0x11 0 4k", dev.path()]);
        // io prints a failed command's error as qemu-io does ("write failed: ..." on stdout).
        let err = format!("{}{}", stdout_of(&o), stderr_of(&o));
        assert_eq!(o.status.code(), Some(1), "{fmt}: {err}");
        assert!(
            err.contains("block device of fixed size") || err.contains("No space left"),
            "{fmt}: {err}"
        );
        assert_eq!(
            code(&["check", dev.path()]),
            0,
            "{fmt}: check after the failed write"
        );
        let v = ok_json(&["info", "--output", "json", dev.path()]);
        assert_eq!(v["virtual-size"], 8u64 << 20);
    }
}

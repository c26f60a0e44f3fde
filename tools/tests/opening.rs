//! Safe opening: guest data must not choose the format of a raw disk (qemu's CVE-2008-2004
//! class). Each attack is written the way a guest would, through `serve --rw` with real NBD
//! clients (nbdsh, qemu-io) and through `mount --rw`; afterwards `info`, `convert`, `serve`,
//! `snapshot` and `run --disk` (its open path, `--dry-run`) still see the same raw disk of the
//! same size and open no other file. The same writes with an explicit raw format succeed.

mod common;

use common::*;
use std::path::{Path, PathBuf};

const DISK: u64 = 16 << 20;

/// The bytes a guest writes, and where.
struct Attack {
    name: &'static str,
    offset: u64,
    data: Vec<u8>,
}

fn last_512(path: &Path) -> Vec<u8> {
    let b = read_all(path);
    b[b.len() - 512..].to_vec()
}

/// The attacks of the issue, built from real images made by our own `create`/`convert`.
fn attacks(dir: &Path) -> Vec<Attack> {
    // 1. A fixed-VHD footer for 1 MiB in the last sector (turned 16 MiB raw into 1 MiB VHD).
    let small = join(dir, "small-fixed.vhd");
    create_with("vhd", "subformat=fixed", &small, "1M");
    // 2. A footer that agrees with the disk's size (16 MiB - 512 + 512): the strict probe rule
    //    would accept it, so only the write guard stands in its way.
    let exact = join(dir, "exact-fixed.vhd");
    let exact_size = (DISK - 512).to_string();
    create_with("vhd", "subformat=fixed", &exact, &exact_size);
    // 3. A whole 2 MiB VHDX written from offset 0.
    let vhdx = image_in(dir, "two.vhdx", "vhdx", "2M");
    // 4. A differencing VHD (footer copy + header + locators) naming a host file beside the
    //    disk as its parent, written from offset 0.
    let secret = join(dir, "secret.vhd");
    let secret_raw = join(dir, "secret.raw");
    std::fs::write(&secret_raw, vec![0x5eu8; 1 << 20]).unwrap();
    ok(&["convert", "-O", "vhd", p(&secret_raw), p(&secret)]);
    let diff = join(dir, "diff.vhd");
    ok(&["create", "-f", "vhd", "-b", p(&secret), p(&diff)]);
    let diff_bytes = read_all(&diff);
    // The footer in a larger aligned write: 4 KiB ending at the end of the disk.
    let mut tail = vec![0u8; 4096];
    tail[4096 - 512..].copy_from_slice(&last_512(&exact));
    vec![
        Attack {
            name: "fixed footer for 1 MiB in the last sector",
            offset: DISK - 512,
            data: last_512(&small),
        },
        Attack {
            name: "fixed footer agreeing with the size, inside a 4 KiB write",
            offset: DISK - 4096,
            data: tail,
        },
        Attack {
            name: "VHDX image at offset 0",
            offset: 0,
            data: read_all(&vhdx),
        },
        Attack {
            name: "differencing VHD at offset 0",
            offset: 0,
            data: diff_bytes[..diff_bytes.len() - 512].to_vec(),
        },
    ]
}

/// A 16 MiB raw disk with a recognisable pattern.
fn raw_disk(dir: &Path, name: &str) -> PathBuf {
    let img = join(dir, name);
    patterned_raw(&img, DISK, 5);
    img
}

fn uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", p(socket))
}

/// Writes like a guest through nbdsh (libnbd); returns whether the server accepted it.
fn nbdsh_write(socket: &Path, a: &Attack, dir: &Path) -> bool {
    let payload = join(dir, "payload.bin");
    std::fs::write(&payload, &a.data).unwrap();
    let script = format!(
        "buf = open({:?}, 'rb').read()\nh.pwrite(buf, {})\nh.flush()\n",
        p(&payload),
        a.offset
    );
    let o = nbdsh(&["-u", &uri(socket), "-c", &script]);
    o.status.success()
}

/// nbdsh runs `python3 -m nbd`: the module is Debian's python3-libnbd, so Debian's python3
/// must come first on PATH (a pyenv python3 has no such module).
fn nbdsh(args: &[&str]) -> std::process::Output {
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    std::process::Command::new("nbdsh")
        .env("PATH", path)
        .args(args)
        .output()
        .expect("run nbdsh")
}

/// nbdsh installed and able to import its module.
fn nbdsh_ready() -> bool {
    if !have("nbdsh") {
        return false;
    }
    let o = nbdsh(&["-c", "pass"]);
    if !o.status.success() {
        let why = stderr_of(&o).trim().to_string();
        if require_all() {
            panic!("nbdsh is required (VIRIDIAN_REQUIRE_ALL=1) but does not run: {why}");
        }
        eprintln!("SKIP: nbdsh does not run: {why}");
        return false;
    }
    true
}

/// Writes like a guest through qemu-io's NBD client; returns whether it was accepted.
fn qemu_io_write(socket: &Path, a: &Attack, dir: &Path) -> bool {
    let payload = join(dir, "payload.bin");
    std::fs::write(&payload, &a.data).unwrap();
    let cmd = format!("write -s {} {} {}", p(&payload), a.offset, a.data.len());
    let o = tool("qemu-io", &["-f", "raw", "-c", &cmd, &uri(socket)]);
    let out = stdout_of(&o) + &stderr_of(&o);
    o.status.success() && !out.contains("failed")
}

/// Everything that opens the disk by probing sees the same raw disk of the same size, and
/// the bytes are the guest's own (no other file is read into it).
fn assert_still_raw(dir: &Path, img: &Path, expected: &[u8]) {
    let v = ok_json(&["info", "--output", "json", p(img)]);
    assert_eq!(v["format"], "raw", "{v}");
    assert_eq!(v["virtual-size"], DISK, "{v}");
    assert_eq!(v["format-probed"], true, "{v}");
    assert!(v.get("backing-filename").is_none(), "{v}");
    // convert reads exactly the disk's bytes.
    let out = fresh_path(dir, "converted.raw");
    ok(&["convert", "-O", "raw", p(img), p(&out)]);
    assert!(
        read_all(&out) == expected,
        "convert did not copy the raw disk as it is"
    );
    // serve exports the raw size.
    let sock = fresh_path(dir, "check.sock");
    {
        let _s = serve_start(&["--socket", p(&sock), p(img)], &sock).expect("serve");
        let size = tool_ok("nbdinfo", &["--size", &uri(&sock)]);
        assert_eq!(size.trim(), DISK.to_string());
    }
    // snapshot sees raw (and says so) instead of a VHD/VHDX with a parent.
    let child = join(dir, "snap.vhd");
    let o = viridian(&["snapshot", "-c", p(&child), p(img)]);
    assert!(!o.status.success());
    assert!(stderr_of(&o).contains("is raw"), "{}", stderr_of(&o));
    assert!(!child.exists());
    // run opens it as the same raw disk.
    let disk_arg = p(img).to_string();
    let out = ok(&["run", "--dry-run", "--disk", &disk_arg]);
    assert!(out.contains(&format!("format=raw size={DISK} rw")), "{out}");
}

#[test]
fn guest_writes_through_nbd_cannot_change_a_probed_raw_disk() {
    if !nbdsh_ready() || !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let d = tmp();
    for (ai, a) in attacks(d.path()).iter().enumerate() {
        for client in ["nbdsh", "qemu-io"] {
            let img = raw_disk(d.path(), "guest.raw");
            let before = read_all(&img);
            let sock = fresh_path(d.path(), "g.sock");
            {
                let _s = serve_start(&["--socket", p(&sock), "--rw", p(&img)], &sock)
                    .expect("serve --rw");
                let accepted = match client {
                    "nbdsh" => nbdsh_write(&sock, a, d.path()),
                    _ => qemu_io_write(&sock, a, d.path()),
                };
                assert!(!accepted, "{client}: {} was written", a.name);
                // The rest of the disk stays writable.
                let ok_write = Attack {
                    name: "ordinary",
                    offset: 1 << 20,
                    data: vec![0xa5; 4096],
                };
                assert!(
                    nbdsh_write(&sock, &ok_write, d.path()),
                    "ordinary write refused"
                );
            }
            let mut expected = before.clone();
            expected[1 << 20..(1 << 20) + 4096].fill(0xa5);
            assert!(
                read_all(&img) == expected,
                "{client}: {}: disk changed",
                a.name
            );
            assert_still_raw(d.path(), &img, &expected);
            std::fs::remove_file(&img).unwrap();
            eprintln!("attack {ai} via {client}: refused, disk still raw");
        }
    }
}

#[test]
fn the_same_writes_with_an_explicit_raw_format_succeed() {
    if !nbdsh_ready() {
        return;
    }
    let d = tmp();
    for a in attacks(d.path()) {
        let img = raw_disk(d.path(), "explicit.raw");
        let sock = fresh_path(d.path(), "e.sock");
        {
            let _s = serve_start(&["--socket", p(&sock), "--rw", "-f", "raw", p(&img)], &sock)
                .expect("serve -f raw --rw");
            assert!(
                nbdsh_write(&sock, &a, d.path()),
                "{} refused with -f raw",
                a.name
            );
        }
        let b = read_all(&img);
        let at = a.offset as usize;
        assert!(
            b[at..at + a.data.len()] == a.data[..],
            "{} did not land",
            a.name
        );
        let v = ok_json(&["info", "--output", "json", "-f", "raw", p(&img)]);
        assert_eq!(v["virtual-size"], DISK);
        assert_eq!(v["format-probed"], false);
        // run's format=raw opens it as raw whatever the bytes now say.
        let arg = format!("{},format=raw", p(&img));
        let out = ok(&["run", "--dry-run", "--disk", &arg]);
        assert!(out.contains(&format!("format=raw size={DISK} rw")), "{out}");
        // So does `format = "raw"` in a VM description.
        let vm = join(d.path(), "vm.toml");
        std::fs::write(
            &vm,
            format!("[[disk]]\npath = {:?}\nformat = \"raw\"\n", p(&img)),
        )
        .unwrap();
        let out = ok(&["run", "--dry-run", p(&vm)]);
        assert!(out.contains(&format!("format=raw size={DISK} rw")), "{out}");
        std::fs::remove_file(&img).unwrap();
    }
}

/// The FUSE path: a guest-like program writing the mounted disk file.
#[test]
fn guest_writes_through_mount_cannot_change_a_probed_raw_disk() {
    if !fuse_usable() {
        return;
    }
    use std::os::unix::fs::FileExt;
    let d = tmp();
    for a in attacks(d.path()) {
        for explicit in [false, true] {
            let img = raw_disk(d.path(), "m.raw");
            let before = read_all(&img);
            let mp = mount_point(d.path(), "mnt");
            let mut args = vec!["mount", "--rw"];
            if explicit {
                args.extend(["-f", "raw"]);
            }
            args.extend([p(&img), p(&mp)]);
            ok(&args);
            let result = {
                let _m = MountGuard(mp.clone());
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(mp.join("disk"))
                    .unwrap();
                // The error may come from the write or, with write-back caching, the sync.
                f.write_all_at(&a.data, a.offset).and_then(|_| f.sync_all())
            };
            wait_gone(&img);
            if explicit {
                assert!(result.is_ok(), "{}: {result:?}", a.name);
                let b = read_all(&img);
                let at = a.offset as usize;
                assert!(
                    b[at..at + a.data.len()] == a.data[..],
                    "{} did not land",
                    a.name
                );
            } else {
                assert!(result.is_err(), "{}: accepted through the mount", a.name);
                assert!(read_all(&img) == before, "{}: disk changed", a.name);
                assert_still_raw(d.path(), &img, &before);
            }
            std::fs::remove_file(&img).unwrap();
        }
    }
}

/// Waits until the mount's background process has released the image.
fn wait_gone(img: &Path) {
    for _ in 0..400 {
        if code(&["info", p(img)]) == 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("{} still locked after unmount", img.display());
}

#[test]
fn a_size_mismatched_trailing_footer_reads_as_raw() {
    let d = tmp();
    // 64 MiB of guest data whose last sector holds a valid fixed-VHD footer for 10 MiB.
    let img = join(d.path(), "big.raw");
    patterned_raw(&img, 64 << 20, 9);
    let ten = join(d.path(), "ten.vhd");
    create_with("vhd", "subformat=fixed", &ten, "10M");
    let footer = last_512(&ten);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&footer, (64 << 20) - 512).unwrap();
    }
    let v = ok_json(&["info", "--output", "json", p(&img)]);
    assert_eq!(v["format"], "raw", "{v}");
    assert_eq!(v["virtual-size"], 64u64 << 20);
    assert!(v["format-rule"].as_str().unwrap().contains("raw"), "{v}");
    let out = join(d.path(), "out.raw");
    ok(&["convert", "-O", "raw", p(&img), p(&out)]);
    assert!(read_all(&out) == read_all(&img), "convert dropped data");
    // Stated as VHD it still reads (tolerant reading when the user says so).
    let v = ok_json(&["info", "--output", "json", "-f", "vhd", p(&img)]);
    assert_eq!(v["format"], "vpc");
    // A real fixed VHD is still recognised, and info says by which rule.
    let v = ok_json(&["info", "--output", "json", p(&ten)]);
    assert_eq!(v["format"], "vpc");
    assert!(
        v["format-rule"]
            .as_str()
            .unwrap()
            .contains("file size = current size + 512"),
        "{v}"
    );
}

#[test]
fn a_parent_is_opened_only_as_its_childs_format() {
    let d = tmp();
    // A raw file where a VHD child expects its parent: refused, never read as raw.
    let base = image_in(d.path(), "base.vhd", "vhd", "4M");
    let child = join(d.path(), "child.vhd");
    ok(&["create", "-f", "vhd", "-b", p(&base), p(&child)]);
    std::fs::remove_file(&base).unwrap();
    std::fs::write(&base, vec![0x11u8; 4 << 20]).unwrap();
    // Following the chain is what fails (plain `info` shows the child's own facts and only
    // warns, as qemu-img does).
    let o = viridian(&["info", "--backing-chain", p(&child)]);
    assert!(!o.status.success());
    let err = stderr_of(&o);
    assert!(err.contains("needs a vhd parent"), "{err}");
    // A VHDX where a VHD parent should be: refused likewise.
    std::fs::remove_file(&base).unwrap();
    create("vhdx", &base, "4M");
    let o = viridian(&["info", "--backing-chain", p(&child)]);
    assert!(!o.status.success());
}

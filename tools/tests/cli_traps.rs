//! The traps a qemu-img or Hyper-V user falls into in the first hour: each test drives the
//! built binary and asserts what really happens (exit codes, files left behind, messages).

mod common;

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs viridian with stdout on a pipe whose reader is already gone: every write gets EPIPE.
fn run_into_closed_pipe(args: &[&str]) -> std::process::Output {
    let mut fds = [0i32; 2];
    // SAFETY: pipe() fills two new descriptors we own; the read end is closed at once.
    let write_end = unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::close(fds[0]);
        OwnedFd::from_raw_fd(fds[1])
    };
    Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(args)
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn a_closed_stdout_ends_quietly_for_every_printing_verb() {
    let d = tmp();
    let img = image_in(d.path(), "a.vhdx", "vhdx", "8M");
    ok(&["io", "-c", "write -P 7 0 1M", p(&img)]);
    let cases: Vec<Vec<&str>> = vec![
        vec!["info", p(&img)],
        vec!["info", "--output", "json", p(&img)],
        vec!["map", p(&img)],
        vec!["map", "--output", "json", p(&img)],
        vec!["check", p(&img)],
        vec!["measure", "-O", "vhdx", p(&img)],
        vec!["snapshot", "-l", p(&img)],
        vec!["--help"],
        vec!["completions", "bash"],
        vec!["completions", "fish"],
        vec!["man"],
    ];
    for args in cases {
        let o = run_into_closed_pipe(&args);
        let err = stderr_of(&o);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert!(!err.contains("Broken pipe"), "{args:?}: {err}");
    }
}

#[test]
fn usage_errors_exit_1_as_in_qemu_img_and_name_unsupported_flags() {
    let d = tmp();
    let img = image_in(d.path(), "a.vhdx", "vhdx", "8M");
    // check's 2 means "corruption found": a typo must not look like that.
    for args in [
        vec!["check", "--bogus", p(&img)],
        vec!["check"],
        vec!["convert", p(&img)],
        vec!["info", "--output", "yaml", p(&img)],
        vec!["no-such-verb"],
        vec![],
        vec!["undo"],
        vec!["--bogus"],
    ] {
        let o = viridian(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr_of(&o));
    }
    let o = viridian(&["convert", "-c", p(&img), "x.raw"]);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("'-c' is not supported"), "{err}");
    assert!(!err.contains("-- -c"), "clap's misleading hint: {err}");
    assert!(!Path::new("x.raw").exists());
    assert_eq!(code(&["--help"]), 0);
    assert_eq!(code(&["check", "--help"]), 0);
    // -o help needs no FILE.
    let o = viridian(&["create", "-f", "vhdx", "-o", "help"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    assert!(stdout_of(&o).contains("block_size"));
    assert_eq!(code(&["create", "-f", "vhdx"]), 1);
    assert_eq!(code(&["--version"]), 0);
}

#[test]
fn a_failed_create_or_convert_leaves_no_target_so_the_retry_works() {
    let d = tmp();
    let t = join(d.path(), "t.vhdx");
    for opt in [
        "block_size=3M",
        "logical_sector_size=1024",
        // Rejected by the VHDX writer after it created the file.
        "log_size=1536k",
    ] {
        let o = viridian(&["create", "-f", "vhdx", "-o", opt, p(&t), "64M"]);
        assert_eq!(o.status.code(), Some(1), "{opt}");
        assert!(!t.exists(), "create -o {opt} left {}", t.display());
    }
    let o = viridian(&["create", "-f", "vhdx", p(&t), "65T"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr_of(&o).contains("64 TiB"), "{}", stderr_of(&o));
    assert!(!t.exists());
    create("vhdx", &t, "64M");

    let src = join(d.path(), "s.raw");
    patterned_raw(&src, 8 << 20, 3);
    let out = join(d.path(), "o.vhdx");
    for opt in ["block_size=3M", "log_size=1536k"] {
        let o = viridian(&["convert", "-O", "vhdx", "-o", opt, p(&src), p(&out)]);
        assert_eq!(o.status.code(), Some(1), "{opt}");
        assert!(!out.exists(), "convert -o {opt} left {}", out.display());
    }
    ok(&["convert", "-O", "vhdx", p(&src), p(&out)]);
    // An existing target is refused and kept.
    let before = std::fs::metadata(&out).unwrap().len();
    assert_eq!(code(&["convert", "-O", "vhdx", p(&src), p(&out)]), 1);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), before);
}

/// A running `viridian serve --rw`, which holds its image's write lock; stopped on drop.
struct Server(std::process::Child);

impl Server {
    fn start(args: &[&str], socket: &Path) -> (Server, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_viridian"))
            .arg("serve")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(Instant::now() < deadline, "server socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        let err = child.stderr.take().unwrap();
        // The "serving" lines are printed right after binding.
        std::thread::sleep(Duration::from_millis(100));
        let mut lines = String::new();
        {
            use std::io::Read;
            // SAFETY: makes our own pipe end non-blocking so a quiet server does not hang us.
            unsafe {
                use std::os::fd::AsRawFd;
                libc::fcntl(err.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
            }
            let mut err = err;
            let _ = err.read_to_string(&mut lines);
        }
        (Server(child), lines)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

#[test]
fn force_share_reads_an_image_that_serve_rw_holds() {
    let d = tmp();
    let img = join(d.path(), "a.vhdx");
    let other = join(d.path(), "b.vhdx");
    create("vhdx", &img, "8M");
    create("vhdx", &other, "8M");
    ok(&["io", "-c", "write -P 9 1M 1M", p(&img)]);
    let sock = join(d.path(), "nbd.sock");
    let (_server, said) = Server::start(
        &[
            "--rw",
            "-e",
            "2",
            "--socket",
            p(&sock),
            "--export",
            &format!("one={}", p(&img)),
            "--export",
            &format!("two={}", p(&other)),
        ],
        &sock,
    );
    // serve names every export, and -e is qemu-nbd's connection limit, not an export.
    assert!(said.contains("a.vhdx") && said.contains("b.vhdx"), "{said}");

    let out = join(d.path(), "copy.raw");
    let o = viridian(&["convert", "-O", "raw", p(&img), p(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr_of(&o).contains("locked"), "{}", stderr_of(&o));
    assert!(!out.exists());

    ok(&["convert", "-U", "-O", "raw", p(&img), p(&out)]);
    let data = read_all(&out);
    assert!(data[1 << 20..2 << 20].iter().all(|&b| b == 9));
    assert_eq!(code(&["compare", "-U", p(&img), p(&out)]), 0);
    let map = ok(&["map", "-U", "--output", "json", p(&img)]);
    assert!(map.contains("\"data\": true"), "{map}");
    let m = ok(&["measure", "-U", "-O", "vhdx", p(&img)]);
    assert!(m.contains("required size"), "{m}");
    // Without -U they are refused, as qemu-img refuses.
    for verb in ["compare", "map", "measure"] {
        let args: Vec<&str> = match verb {
            "compare" => vec![verb, p(&img), p(&out)],
            _ => vec![verb, p(&img)],
        };
        let o = viridian(&args);
        assert_ne!(o.status.code(), Some(0), "{verb} without -U");
        assert!(
            stderr_of(&o).contains("locked"),
            "{verb}: {}",
            stderr_of(&o)
        );
    }
}

#[test]
fn snapshot_says_it_makes_an_external_child_and_a_broken_child_says_why() {
    let d = tmp();
    let base = image_in(d.path(), "base.vhdx", "vhdx", "8M");
    // A qemu user's internal-snapshot name is refused, and no file is made.
    let o = viridian_in(d.path(), &["snapshot", "-c", "before-upgrade", "base.vhdx"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr_of(&o);
    assert!(err.contains("no internal snapshots"), "{err}");
    assert!(err.contains("before-upgrade.vhdx"), "{err}");
    assert!(!join(d.path(), "before-upgrade").exists());

    let child = join(d.path(), "snap1.vhdx");
    let said = ok(&["snapshot", "-c", p(&child), p(&base)]);
    assert!(said.contains("differencing child"), "{said}");
    assert!(said.contains(p(&child)), "{said}");
    ok(&["io", "-c", "write -P 1 0 64k", p(&child)]);
    // Writing the parent afterwards changes its identity: the child must say so, not claim
    // the parent is missing.
    ok(&["io", "-c", "write -P 2 0 64k", p(&base)]);
    // As qemu-img: the image's own info succeeds and names the problem; following the
    // chain (--backing-chain) fails.
    let o = viridian(&["info", p(&child)]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout_of(&o);
    assert!(out.contains("identity changed"), "{out}");
    assert!(!out.contains("(not found)"), "{out}");
    let o = viridian(&["info", "--backing-chain", p(&child)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
}

fn mount_background(args: &[&str]) -> std::process::Output {
    viridian(&[&["mount"], args].concat())
}

#[test]
fn mount_says_when_it_is_ready_and_warns_that_background_undo_discards() {
    if !fuse_usable() {
        return;
    }
    let d = tmp();
    let img = image_in(d.path(), "a.vhdx", "vhdx", "8M");
    let mp = mount_point(d.path(), "mnt");
    let o = mount_background(&["--undo", p(&img), p(&mp)]);
    let _guard = MountGuard(mp.clone());
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    let err = stderr_of(&o);
    assert!(err.contains("mounted") && err.contains(p(&mp)), "{err}");
    assert!(err.contains("DISCARDED at unmount"), "{err}");
    ok(&["unmount", p(&mp)]);

    // Foreground: the ready line appears while the mount runs.
    let mut child = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(["mount", "--foreground", p(&img), p(&mp)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !mp.join("disk").exists() {
        assert!(Instant::now() < deadline, "foreground mount never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    ok(&["unmount", p(&mp)]);
    let _ = child.wait();
    let said = reader.join().unwrap();
    assert!(
        said.contains("mounted") && said.contains("read-only"),
        "{said}"
    );
}

/// A raw disk with a primary GPT (512-byte sectors) holding one partition.
fn gpt_disk(path: &Path, size: u64) {
    let sectors = size / 512;
    let mut img = vec![0u8; 34 * 512];
    // Protective MBR.
    img[446 + 4] = 0xEE;
    img[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    img[446 + 12..446 + 16].copy_from_slice(&((sectors - 1) as u32).to_le_bytes());
    img[510] = 0x55;
    img[511] = 0xAA;
    // One entry: a Linux filesystem partition at LBA 2048..4095.
    let mut entries = vec![0u8; 128 * 128];
    entries[0..16].copy_from_slice(&[
        0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D,
        0xE4,
    ]);
    entries[16..32].copy_from_slice(&[7u8; 16]);
    entries[32..40].copy_from_slice(&2048u64.to_le_bytes());
    entries[40..48].copy_from_slice(&4095u64.to_le_bytes());
    let mut h = [0u8; 92];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&1u64.to_le_bytes());
    h[32..40].copy_from_slice(&(sectors - 1).to_le_bytes());
    h[40..48].copy_from_slice(&34u64.to_le_bytes());
    h[48..56].copy_from_slice(&(sectors - 34).to_le_bytes());
    h[56..72].copy_from_slice(&[5u8; 16]);
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&128u32.to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    h[88..92].copy_from_slice(&mount::partition::crc32(&entries).to_le_bytes());
    let crc = mount::partition::crc32(&h);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    img[512..512 + 92].copy_from_slice(&h);
    img[1024..1024 + entries.len()].copy_from_slice(&entries);
    std::fs::write(path, &img).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(size).unwrap();
}

#[test]
fn a_sector_size_change_under_a_partition_table_is_refused_without_the_flag() {
    let d = tmp();
    let src = join(d.path(), "gpt.raw");
    gpt_disk(&src, 8 << 20);
    let out = join(d.path(), "out.vhdx");
    let o = viridian(&[
        "convert",
        "-O",
        "vhdx",
        "-o",
        "logical_sector_size=4096",
        p(&src),
        p(&out),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr_of(&o).contains("partition table"),
        "{}",
        stderr_of(&o)
    );
    assert!(!out.exists());
    // Same sector size: no complaint.
    let same = join(d.path(), "same.vhdx");
    let o = viridian(&["convert", "-O", "vhdx", p(&src), p(&same)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    assert!(!stderr_of(&o).contains("partition table"));

    let o = viridian(&[
        "convert",
        "-O",
        "vhdx",
        "-o",
        "logical_sector_size=4096",
        "--allow-sector-size-change",
        p(&src),
        p(&out),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    assert!(stderr_of(&o).contains("warning"), "{}", stderr_of(&o));

    // The converted disk's table no longer parses; --partitions still offers `disk`.
    if !fuse_usable() {
        return;
    }
    let mp = mount_point(d.path(), "mnt");
    let o = mount_background(&["--partitions", p(&out), p(&mp)]);
    let _guard = MountGuard(mp.clone());
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("does not parse"),
        "{}",
        stderr_of(&o)
    );
    assert!(mp.join("disk").exists());
    ok(&["unmount", p(&mp)]);
}

// Ctrl-C during convert (exit 130, partial target removed): tools/tests/cli.rs
// interrupted_convert_removes_the_target_and_keeps_the_source.

#[test]
fn convert_without_o_follows_the_target_name_and_measure_assumes_raw() {
    let d = tmp();
    let src = join(d.path(), "s.raw");
    patterned_raw(&src, 4 << 20, 5);
    let x = join(d.path(), "x.vhdx");
    let o = viridian(&["convert", p(&src), p(&x)]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stderr_of(&o).contains("writing vhdx"), "{}", stderr_of(&o));
    assert!(ok(&["info", p(&x)]).contains("file format: vhdx"));
    let y = join(d.path(), "y.img");
    ok(&["convert", p(&src), p(&y)]);
    assert!(ok(&["info", p(&y)]).contains("file format: raw"));
    // A format that contradicts the name is written, with a warning.
    let z = join(d.path(), "z.vhd");
    let o = viridian(&["convert", "-O", "raw", p(&src), p(&z)]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stderr_of(&o).contains("warning"), "{}", stderr_of(&o));
    // measure's default target is raw, as in qemu-img: the virtual size exactly.
    let m = ok(&["measure", "--size", "1G"]);
    assert!(m.contains("required size: 1073741824"), "{m}");
}

#[test]
fn a_relative_backing_file_is_relative_to_the_child_as_in_qemu_img() {
    let d = tmp();
    std::fs::create_dir(d.path().join("sub")).unwrap();
    create("vhdx", &d.path().join("sub/p.vhdx"), "8M");
    let o = viridian_in(
        d.path(),
        &["create", "-f", "vhdx", "-b", "p.vhdx", "sub/c.vhdx"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    let info = ok(&["info", p(&d.path().join("sub/c.vhdx"))]);
    assert!(info.contains("sub/p.vhdx"), "{info}");
    // A same-named file in the working directory is not what the child links to.
    create("vhdx", &d.path().join("p.vhdx"), "16M");
    let o = viridian_in(
        d.path(),
        &["create", "-f", "vhdx", "-b", "p.vhdx", "sub/c2.vhdx"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    let info = ok(&["info", p(&d.path().join("sub/c2.vhdx"))]);
    assert!(info.contains("(8388608 bytes)"), "{info}");
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn compact_never_allocates_more_and_keeps_the_holes_of_moved_blocks() {
    let d = tmp();
    for fmt in ["vhdx", "vhd"] {
        let img = image_in(d.path(), &format!("c.{fmt}"), fmt, "64M");
        // 16 blocks holding 4 KiB each (the rest of each block a hole in the file)...
        let mut args = vec!["io".to_string()];
        for i in 0..16 {
            args.push("-c".into());
            args.push(format!("write -P {} {}M 4k", i + 1, i * 4));
        }
        // ...and the first four emptied again, so compaction frees them and moves later
        // blocks down into their place.
        for i in 0..4 {
            args.push("-c".into());
            args.push(format!("write -P 0 {}M 4k", i * 4));
        }
        args.push(p(&img).to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&args);
        let copy = join(d.path(), &format!("before-{fmt}.raw"));
        ok(&["convert", "-O", "raw", p(&img), p(&copy)]);
        let (len0, alloc0) = (std::fs::metadata(&img).unwrap().len(), allocated(&img));
        let said = ok(&["compact", p(&img)]);
        let (len1, alloc1) = (std::fs::metadata(&img).unwrap().len(), allocated(&img));
        assert!(said.contains("moved"), "{fmt}: {said}");
        assert!(len1 < len0, "{fmt}: file size {len0} -> {len1}");
        assert!(
            alloc1 <= alloc0,
            "{fmt}: allocated {alloc0} -> {alloc1}\n{said}"
        );
        assert!(
            said.contains(&format!("{alloc0} -> {alloc1}")),
            "{fmt}: the report must give allocated bytes before and after: {said}"
        );
        assert_eq!(code(&["compare", p(&img), p(&copy)]), 0, "{fmt}");
        assert_eq!(code(&["check", p(&img)]), 0, "{fmt}");
        if have("qemu-img") {
            let q = tool("qemu-img", &["compare", p(&img), p(&copy)]);
            assert!(q.status.success(), "{fmt}: qemu-img compare: {q:?}");
        }
    }
    let fixed = join(d.path(), "f.vhdx");
    create_with("vhdx", "subformat=fixed", &fixed, "8M");
    let said = ok(&["compact", p(&fixed)]);
    assert!(said.contains("Nothing to do"), "{said}");
}

/// Points the VHDX BAT entry of payload block `block` at nothing (its data stays in the file:
/// a leak in the middle).
fn forget_vhdx_block(path: &Path, block: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut rt = vec![0u8; 64 << 10];
    f.seek(SeekFrom::Start(192 << 10)).unwrap();
    f.read_exact(&mut rt).unwrap();
    assert_eq!(&rt[..4], b"regi");
    let n = u32::from_le_bytes(rt[8..12].try_into().unwrap()) as usize;
    let bat_guid = [
        0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A,
        0x08,
    ];
    let bat = (0..n)
        .map(|i| &rt[16 + 32 * i..48 + 32 * i])
        .find(|e| e[..16] == bat_guid)
        .map(|e| u64::from_le_bytes(e[16..24].try_into().unwrap()))
        .expect("BAT region");
    f.seek(SeekFrom::Start(bat + 8 * block)).unwrap();
    f.write_all(&[0u8; 8]).unwrap();
}

#[test]
fn check_repair_reports_what_is_left_and_the_repaired_end_offset() {
    let d = tmp();
    let img = image_in(d.path(), "l.vhdx", "vhdx", "8M");
    ok(&[
        "io",
        "-c",
        "write -P 1 0 4k",
        "-c",
        "write -P 2 1M 4k",
        "-c",
        "write -P 3 2M 4k",
        p(&img),
    ]);
    // A leak at the tail: check -r returns it, and reports the end offset after the repair.
    let len = std::fs::metadata(&img).unwrap().len();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.seek(SeekFrom::Start(len)).unwrap();
        f.write_all(&vec![0xAB; 2 << 20]).unwrap();
    }
    assert_eq!(code(&["check", p(&img)]), 3);
    let o = viridian(&["check", "-r", "leaks", p(&img)]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout_of(&o));
    let out = stdout_of(&o);
    assert!(out.contains("found and repaired"), "{out}");
    assert!(out.contains(&format!("Image end offset: {len}")), "{out}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), len);

    // A leak in the middle cannot be returned by check: exit 3 and say so.
    forget_vhdx_block(&img, 1);
    let o = viridian(&["check", "-r", "all", p(&img)]);
    let out = stdout_of(&o);
    assert_eq!(o.status.code(), Some(3), "{out}");
    assert!(out.contains("Could not repair"), "{out}");
    assert!(out.contains("viridian compact"), "{out}");
    // ...and compact does return it.
    ok(&["compact", "-q", p(&img)]);
    assert_eq!(code(&["check", p(&img)]), 0);
}

#[test]
fn messages_say_things_once_and_in_qemu_img_words() {
    let d = tmp();
    let missing = join(d.path(), "nothere.vhdx");
    let o = viridian(&["info", p(&missing)]);
    let err = stderr_of(&o);
    assert_eq!(err.matches("cannot open").count(), 1, "{err}");
    // A missing source is missing, not "the same file" as a missing target.
    let o = viridian(&["convert", p(&missing), p(&join(d.path(), "o.raw"))]);
    let err = stderr_of(&o);
    assert!(!err.contains("same file"), "{err}");
    assert!(err.contains("No such file"), "{err}");

    let (a, b) = (join(d.path(), "a.vhdx"), join(d.path(), "b.vhdx"));
    create("vhdx", &a, "8M");
    create("vhdx", &b, "16M");
    let ours = viridian(&["compare", p(&a), p(&b)]);
    assert_eq!(ours.status.code(), Some(0));
    assert!(stdout_of(&ours).contains("Warning: Image size mismatch!"));
    if have("qemu-img") {
        let q = tool("qemu-img", &["compare", p(&a), p(&b)]);
        assert_eq!(stdout_of(&q), stdout_of(&ours));
    }

    // Paths read as typed: no "././base.vhdx", no Windows ".\\base.vhdx" on Linux.
    let run_in = |args: &[&str]| {
        let o = viridian_in(d.path(), args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr_of(&o));
        stdout_of(&o)
    };
    run_in(&["create", "-q", "-f", "vhdx", "-b", "./a.vhdx", "./ch.vhdx"]);
    for out in [
        run_in(&["info", "--backing-chain", "./ch.vhdx"]),
        run_in(&["snapshot", "-l", "./ch.vhdx"]),
    ] {
        // The lines that name files (format-specific data keeps the stored locators).
        let named: Vec<&str> = out
            .lines()
            .filter(|l| {
                l.starts_with("image:")
                    || l.starts_with("backing file:")
                    || l.starts_with(|c: char| c.is_ascii_digit())
            })
            .collect();
        assert!(named.len() >= 2, "{out}");
        for l in &named {
            assert!(!l.contains("././") && !l.contains(".\\"), "{l}");
        }
        assert!(named.iter().any(|l| l.contains("./a.vhdx")), "{out}");
    }

    let empty = join(d.path(), "empty");
    std::fs::create_dir(&empty).unwrap();
    let said = ok(&["undo", "list", p(&empty)]);
    assert!(said.contains("No undo disks"), "{said}");
}

#[test]
fn convert_salvage_turns_read_errors_into_zeros_and_keeps_the_rest() {
    if !fuse_usable() {
        return;
    }
    // A real read error: a VHD served through `viridian mount`, truncated underneath the
    // mount so its last block's data is gone; the FUSE file answers EIO there.
    let d = tmp();
    let img = image_in(d.path(), "damaged.vhd", "vhd", "8M");
    ok(&[
        "io",
        "-c",
        "write -P 1 0 2M",
        "-c",
        "write -P 3 4M 2M",
        p(&img),
    ]);
    // Cut the file right after the first block's data: the second block is lost whole.
    let map: serde_json::Value =
        serde_json::from_str(&ok(&["map", "--output", "json", p(&img)])).unwrap();
    let first_data_end = map[0]["offset"].as_u64().unwrap() + (2 << 20);
    let mp = mount_point(d.path(), "mnt");
    ok(&["mount", p(&img), p(&mp)]);
    let _guard = MountGuard(mp.clone());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(first_data_end)
        .unwrap();
    let src = mp.join("disk");
    let out = join(d.path(), "out.raw");
    let o = viridian(&["convert", "-f", "raw", "-O", "raw", p(&src), p(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr_of(&o).contains("Input/output error"),
        "{}",
        stderr_of(&o)
    );
    assert!(!out.exists());

    let o = viridian(&[
        "convert",
        "--salvage",
        "-f",
        "raw",
        "-O",
        "raw",
        p(&src),
        p(&out),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    let err = stderr_of(&o);
    assert!(err.contains("writing zeros there"), "{err}");
    let data = read_all(&out);
    assert_eq!(data.len(), 8 << 20);
    assert!(data[..2 << 20].iter().all(|&b| b == 1), "the intact block");
    assert!(
        data[4 << 20..6 << 20].iter().all(|&b| b == 0),
        "the lost block"
    );
    ok(&["unmount", p(&mp)]);
}

#[test]
fn preallocation_is_honoured_and_fixed_images_are_allocated_like_new_vhd_fixed() {
    let d = tmp();
    let size = 16u64 << 20;
    let cases: &[(&str, &[&str], bool)] = &[
        ("r-off.raw", &["-f", "raw"], false),
        (
            "r-falloc.raw",
            &["-f", "raw", "-o", "preallocation=falloc"],
            true,
        ),
        (
            "r-full.raw",
            &["-f", "raw", "-o", "preallocation=full"],
            true,
        ),
        ("fixed.vhd", &["-f", "vhd", "-o", "subformat=fixed"], true),
        ("fixed.vhdx", &["-f", "vhdx", "-o", "subformat=fixed"], true),
        (
            "fixed-off.vhdx",
            &["-f", "vhdx", "-o", "subformat=fixed,preallocation=off"],
            false,
        ),
        (
            "fixed-full.vhd",
            &["-f", "vhd", "-o", "subformat=fixed,preallocation=full"],
            true,
        ),
    ];
    for (name, args, full) in cases {
        let path = join(d.path(), name);
        let mut v = vec!["create", "-q"];
        v.extend_from_slice(args);
        v.extend([p(&path), "16M"]);
        ok(&v);
        let alloc = allocated(&path);
        if *full {
            assert!(alloc >= size, "{name}: {alloc} bytes allocated");
        } else {
            assert!(alloc < size / 2, "{name}: {alloc} bytes allocated");
        }
        assert_eq!(
            code(&["check", p(&path)]),
            if name.ends_with(".raw") { 63 } else { 0 }
        );
    }
    // A dynamic image cannot be preallocated; raw has no metadata. Nothing is left behind.
    for (name, fmt, opt) in [
        ("dyn.vhdx", "vhdx", "preallocation=full"),
        ("dyn.vhd", "vhd", "preallocation=falloc"),
        ("meta.raw", "raw", "preallocation=metadata"),
        ("bad.raw", "raw", "preallocation=lots"),
    ] {
        let path = join(d.path(), name);
        let o = viridian(&["create", "-f", fmt, "-o", opt, p(&path), "16M"]);
        assert_eq!(o.status.code(), Some(1), "{name}");
        assert!(stderr_of(&o).contains("preallocation"), "{}", stderr_of(&o));
        assert!(!path.exists(), "{name}");
    }
    // convert honours it too.
    let src = join(d.path(), "s.raw");
    patterned_raw(&src, size, 9);
    let out = join(d.path(), "c.vhdx");
    ok(&[
        "convert",
        "-O",
        "vhdx",
        "-o",
        "subformat=fixed",
        p(&src),
        p(&out),
    ]);
    assert!(allocated(&out) >= size);
    assert_eq!(code(&["compare", p(&src), p(&out)]), 0);
}

#[test]
fn completions_and_man_pages_come_from_the_real_definitions() {
    let verbs = [
        "info", "create", "convert", "check", "compare", "map", "measure", "commit", "rebase",
        "resize", "compact", "snapshot", "io", "undo", "mount", "unmount", "serve", "migrate",
        "run", "vm",
    ];
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(&["completions", shell]);
        for v in verbs {
            assert!(script.contains(v), "{shell} completion lacks {v}");
        }
        assert!(script.contains("--salvage"), "{shell}: convert's flags");
    }
    if have("bash") {
        let d = tmp();
        let f = join(d.path(), "viridian.bash");
        std::fs::write(&f, ok(&["completions", "bash"])).unwrap();
        tool_ok("bash", &["-n", p(&f)]);
    }
    let d = tmp();
    ok(&["man", "--dir", p(d.path())]);
    assert!(d.path().join("viridian.1").exists());
    for v in verbs {
        let page = std::fs::read_to_string(d.path().join(format!("viridian-{v}.1"))).unwrap();
        assert!(page.contains(".TH"), "{v}");
    }
    let page = ok(&["man", "convert"]);
    assert!(
        page.contains("salvage") && page.contains("viridian\\-convert"),
        "{page}"
    );
    assert_eq!(code(&["man", "no-such-verb"]), 1);
}

#[test]
fn rebase_resolves_a_relative_backing_name_from_the_image_folder_as_qemu_img() {
    let d = tmp();
    let base = d.path().join("p/base");
    let kids = d.path().join("p/kids");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(&kids).unwrap();
    let a = join(&base, "a.vhd");
    let b = join(&base, "b.vhd");
    let c = join(&kids, "c1.vhd");
    create("vhd", &a, "4M");
    create("vhd", &b, "4M");
    ok(&["create", "-q", "-f", "vhd", "-b", "../base/a.vhd", p(&c)]);
    // Run from elsewhere: "../base/b.vhd" means p/base/b.vhd (the child's folder), not the cwd.
    ok(&["rebase", "-u", "-b", "../base/b.vhd", p(&c)]);
    let out = ok(&["info", "--output", "json", p(&c)]);
    assert!(out.contains("b.vhd"), "{out}");
}

#[test]
fn io_changes_nothing_when_a_request_runs_past_the_end() {
    let d = tmp();
    let img = join(d.path(), "v.raw");
    std::fs::write(&img, vec![0u8; 24 << 20]).unwrap();
    let o = viridian(&["io", "-f", "raw", "-c", "write -P 0x55 8M 17M", p(&img)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(
        std::fs::read(&img).unwrap().iter().all(|&b| b == 0),
        "a refused write changed the image"
    );
}

#[test]
fn undo_discard_refuses_after_an_interrupted_commit() {
    let d = tmp();
    let img = d.path().join("guest.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let undo = d.path().join("guest.undo");
    let mut opts = chain::OpenOptions::read_only();
    opts.format = Some(chain::Format::Raw);
    let u = chain::UndoDisk::open(&img, &opts, Some(&undo)).unwrap();
    u.disk().write_at(&[0xab; 4096], 0).unwrap();
    let kept = u.keep().unwrap();
    // What a commit killed after it started writing the base leaves behind.
    std::fs::write(chain::undo::commit_marker(&kept), b"").unwrap();
    let o = viridian(&["undo", "discard", p(&kept)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(stderr_of(&o).contains("interrupted"), "{}", stderr_of(&o));
    assert!(
        kept.exists(),
        "the undo file must stay for the commit to finish"
    );
    // Running the commit again finishes it and clears the marker.
    let o = viridian(&["undo", "commit", p(&kept)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    assert!(!kept.exists() && !chain::undo::commit_marker(&kept).exists());
    assert_eq!(&std::fs::read(&img).unwrap()[..4096], &[0xab; 4096][..]);
}

/// `io write -z` without `-u` over allocated blocks (issue 18, F4): the blocks stay and read as
/// zeros; nothing leaks (check exits 0, qemu-img check agrees for VHDX), including a partly
/// present block of a differencing VHDX, which must not show its parent again.
#[test]
fn zeroing_without_unmap_keeps_the_blocks_and_leaks_nothing() {
    let d = tmp();
    for fmt in ["vhdx", "vpc"] {
        let img = join(d.path(), &format!("z.{fmt}"));
        create(fmt, &img, "64M");
        ok(&["io", "-c", "write -q -P 0x11 0 8M", p(&img)]);
        ok(&["io", "-c", "write -q -z 2M 4M", p(&img)]);
        let out = viridian(&["check", p(&img)]);
        assert_eq!(out.status.code(), Some(0), "{fmt}: {}", stdout_of(&out));
        ok(&["io", "-r", "-c", "read -q -P 0 2M 4M", p(&img)]);
        ok(&["io", "-r", "-c", "read -q -P 0x11 0 2M", p(&img)]);
        ok(&["io", "-r", "-c", "read -q -P 0x11 6M 2M", p(&img)]);
        if fmt == "vhdx" && have("qemu-img") {
            let q = tool("qemu-img", &["check", p(&img)]);
            assert_eq!(q.status.code(), Some(0), "{}", stdout_of(&q));
            tool_ok("qemu-io", &["-r", "-c", "read -P 0 2M 4M", p(&img)]);
        }
    }
    // Differencing VHDX: the child holds part of block 1; zeroing the whole block keeps it.
    let base = join(d.path(), "base.vhdx");
    create("vhdx", &base, "64M");
    ok(&["io", "-c", "write -q -P 0x22 0 8M", p(&base)]);
    let child = join(d.path(), "child.vhdx");
    ok(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-b",
        p(&base),
        "-F",
        "vhdx",
        p(&child),
    ]);
    ok(&["io", "-c", "write -q -P 0x33 1M 64k", p(&child)]);
    ok(&["io", "-c", "write -q -z 1M 1M", p(&child)]);
    let out = viridian(&["check", p(&child)]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout_of(&out));
    ok(&["io", "-r", "-c", "read -q -P 0 1M 1M", p(&child)]);
    ok(&["io", "-r", "-c", "read -q -P 0x22 0 1M", p(&child)]);
    // (qemu refuses differencing VHDX, so only viridian reads the child.)
}

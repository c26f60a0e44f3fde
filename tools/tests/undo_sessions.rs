//! `serve --undo` sessions for raw, VHD and VHDX: they end in a commit or a discard when the
//! server stops, and a SIGKILLed session leaves an undo file that `viridian undo` finds,
//! commits or discards.

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn image(dir: &Path, fmt: &str) -> PathBuf {
    let img = dir.join(format!("disk.{fmt}"));
    ok(&["create", "-q", "-f", fmt, p(&img), "32M"]);
    ok(&["io", "-c", "write -P 0x41 0 8M", p(&img)]);
    img
}

fn nbd_uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", p(sock))
}

/// Writes 0x99 over 1M..3M and 0x98 over 20M..20M+64k through NBD, flushing.
fn client_writes(sock: &Path) {
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x99 1M 2M",
            "-c",
            "write -P 0x98 20M 64k",
            "-c",
            "flush",
            &nbd_uri(sock),
        ],
    );
}

/// The expected contents after the client's writes, as a raw file.
fn expected(dir: &Path, img: &Path) -> PathBuf {
    let e = dir.join("expected.raw");
    ok(&["convert", "-O", "raw", p(img), p(&e)]);
    ok(&[
        "io",
        "-c",
        "write -P 0x99 1M 2M",
        "-c",
        "write -P 0x98 20M 64k",
        p(&e),
    ]);
    e
}

fn stop(mut g: ServeGuard, signal: i32) -> (i32, String) {
    use std::io::Read;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(g.0.id() as i32, signal) };
    let st = g.0.wait().unwrap();
    let mut e = String::new();
    if let Some(mut s) = g.0.stderr.take() {
        let _ = s.read_to_string(&mut e);
    }
    (st.code().unwrap_or(-1), e)
}

fn undo_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".undo-"))
        .collect();
    v.sort();
    v
}

#[test]
fn serve_undo_end_commit_and_discard_for_every_format() {
    if !have("qemu-io") {
        return;
    }
    for fmt in ["raw", "vhd", "vhdx"] {
        for end in ["commit", "discard"] {
            let d = tmp();
            let img = image(d.path(), fmt);
            let before = read_all(&img);
            let want = expected(d.path(), &img);
            let sock = d.path().join("s.sock");
            let g = serve_start(
                &["--undo", "--undo-end", end, "-k", p(&sock), p(&img)],
                &sock,
            )
            .unwrap_or_else(|(c, e)| panic!("{fmt}: serve exited {c}: {e}"));
            client_writes(&sock);
            let (code, err) = stop(g, libc::SIGTERM);
            assert_eq!(code, 0, "{fmt} {end}: serve exited {code}: {err}");
            if end == "commit" {
                assert_eq!(
                    code_of(&["compare", p(&img), p(&want)]),
                    0,
                    "{fmt}: the committed image lacks the changes ({err})"
                );
                if fmt != "raw" {
                    assert_eq!(code_of(&["check", p(&img)]), 0, "{fmt}: check after commit");
                }
            } else {
                assert!(read_all(&img) == before, "{fmt}: discard changed the image");
            }
            assert!(
                undo_files(d.path()).is_empty(),
                "{fmt} {end}: undo file left: {:?}",
                undo_files(d.path())
            );
        }
    }
}

fn code_of(args: &[&str]) -> i32 {
    code(args)
}

#[test]
fn killed_serve_undo_session_is_committed_or_discarded_with_viridian_undo() {
    if !have("qemu-io") {
        return;
    }
    for fmt in ["raw", "vhd", "vhdx"] {
        for end in ["commit", "discard"] {
            let d = tmp();
            let img = image(d.path(), fmt);
            let before = read_all(&img);
            let want = expected(d.path(), &img);
            let sock = d.path().join("s.sock");
            let g = serve_start(
                &["--undo", "--undo-end", "commit", "-k", p(&sock), p(&img)],
                &sock,
            )
            .unwrap_or_else(|(c, e)| panic!("{fmt}: serve exited {c}: {e}"));
            client_writes(&sock);
            stop(g, libc::SIGKILL);
            assert!(
                read_all(&img) == before,
                "{fmt}: killed session changed the image"
            );
            let found = undo_files(d.path());
            assert_eq!(found.len(), 1, "{fmt}: undo files: {found:?}");
            let listed = ok(&["undo", "list", p(d.path())]);
            assert!(
                listed.contains(p(&found[0])) && listed.contains("changed: 2.06"),
                "{fmt}: undo list did not show the session: {listed}"
            );
            ok(&["undo", end, "-q", p(&found[0])]);
            assert!(!found[0].exists(), "{fmt}: undo {end} left the file");
            if end == "commit" {
                assert_eq!(
                    code_of(&["compare", p(&img), p(&want)]),
                    0,
                    "{fmt}: undo commit lost the acknowledged writes"
                );
            } else {
                assert!(read_all(&img) == before, "{fmt}: discard changed the image");
            }
        }
    }
}

/// `undo list` and `undo show` say when a commit of an undo disk was interrupted, in words and
/// in JSON, so nobody discards an undo disk whose changes are half in the base.
#[test]
fn undo_list_and_show_report_an_interrupted_commit() {
    let d = tmp();
    let (_, kept) = kept_raw_undo(d.path());

    let listed = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&ok(&["undo", "list", "--output", "json", p(dir)])).unwrap()
    };
    assert_eq!(listed(d.path())[0]["commit-interrupted"], false);
    assert!(!ok(&["undo", "show", p(&kept)]).contains("interrupted"));

    // What a commit killed after it started writing the base leaves behind.
    std::fs::write(chain::undo::commit_marker(&kept), b"").unwrap();
    assert_eq!(listed(d.path())[0]["commit-interrupted"], true);
    let shown = ok(&["undo", "show", p(&kept)]);
    assert!(shown.contains("commit was interrupted"), "{shown}");
    assert!(ok(&["undo", "list", p(d.path())]).contains("COMMIT INTERRUPTED"));
    let j: serde_json::Value =
        serde_json::from_str(&ok(&["undo", "show", "--output", "json", p(&kept)])).unwrap();
    assert_eq!(j["commit-interrupted"], true);
}

/// A kept raw undo file whose base was written after the session started is not committed
/// over the newer data unless forced; an unchanged base commits as before.
#[test]
fn a_raw_undo_commit_refuses_a_base_written_since() {
    let d = tmp();
    let (img, kept) = kept_raw_undo(d.path());
    // Someone else writes the base afterwards (a later session, another tool).
    ok(&["io", "-f", "raw", "-c", "write -P 0x55 512k 8k", p(&img)]);
    let before = read_all(&img);
    let o = viridian(&["undo", "commit", p(&kept)]);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("changed after the undo session"), "{e}");
    assert!(
        read_all(&img) == before,
        "the refused commit wrote the base"
    );
    assert!(kept.exists(), "the refused commit removed the undo file");
    ok(&["undo", "commit", "--force", p(&kept)]);
    let after = read_all(&img);
    assert!(after[..4096].iter().all(|&b| b == 0xab));
    assert!(after[512 << 10..(512 << 10) + 8192]
        .iter()
        .all(|&b| b == 0x55));
    assert!(!kept.exists());
}

/// A kept VHD undo disk whose base was written after the disk was made is not committed over
/// the newer data unless forced (VHD has no identity that changes on write; the child's
/// Parent Time Stamp stands in).
#[test]
fn a_vhd_undo_commit_refuses_a_base_written_since() {
    let d = tmp();
    let img = d.path().join("guest.vhd");
    ok(&["create", "-q", "-f", "vhd", p(&img), "8M"]);
    let undo = d.path().join("guest.vud");
    let u = chain::UndoDisk::open(&img, &chain::OpenOptions::read_only(), Some(&undo)).unwrap();
    u.disk().write_at(&[0xab; 4096], 0).unwrap();
    let kept = u.keep().unwrap();
    ok(&["io", "-f", "vhd", "-c", "write -P 0x55 4M 64k", p(&img)]);
    // The write's time, pushed past the second the undo disk recorded.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let o = viridian(&["undo", "commit", p(&kept)]);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("changed after the undo disk"), "{e}");
    assert!(kept.exists());
    ok(&["undo", "commit", "--force", p(&kept)]);
    ok(&[
        "io",
        "-f",
        "vhd",
        "-c",
        "read -P 0xab 0 4k",
        "-c",
        "read -P 0x55 4M 64k",
        p(&img),
    ]);
}

/// A commit killed after it removed the undo disk but before its marker leaves only the
/// marker: `undo list` does not mistake it for an undo disk, and `undo commit` clears it.
#[test]
fn a_leftover_commit_marker_is_not_an_undo_disk_and_is_cleared() {
    let d = tmp();
    let undo = d.path().join(".disk.vhdx.undo-1.vhdx");
    let marker = chain::undo::commit_marker(&undo);
    std::fs::write(&marker, b"").unwrap();
    let o = viridian(&["undo", "list", p(d.path())]);
    assert_eq!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("skipping"), "{err}");
    let said = ok(&["undo", "commit", p(&undo)]);
    assert!(said.contains("already finished"), "{said}");
    assert!(!marker.exists());
}

/// A 1 MiB raw image with a kept raw undo file (`guest.vud`) whose session wrote 0xab over
/// the first 4 KiB: what a killed or kept session leaves. Returns (image, undo file).
fn kept_raw_undo(dir: &Path) -> (PathBuf, PathBuf) {
    let img = dir.join("guest.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let undo = dir.join("guest.vud");
    let mut opts = chain::OpenOptions::read_only();
    opts.format = Some(chain::Format::Raw);
    let u = chain::UndoDisk::open(&img, &opts, Some(&undo)).unwrap();
    u.disk().write_at(&[0xab; 4096], 0).unwrap();
    (img, u.keep().unwrap())
}

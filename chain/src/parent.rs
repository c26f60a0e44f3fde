//! Parent resolution, one rule for every format (docs/chains.md): where to look for a
//! differencing layer's parent ([`parent_candidates`]), which files may be opened as one, and
//! the identity check. The formats only report what their locators record
//! ([`disk::ParentLink`]); reading parent data (zeros past a smaller parent's end) is
//! [`disk::read_parent`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use disk::{BlockDevice, Error, LocatorKind, ParentLink, Result};

use crate::{canonical, open_layer, Format, OpenOptions, MAX_CHAIN_DEPTH};

/// Where to look for the parent of the child at `child` (None for a child without a file, such
/// as a memory store: relative entries then stay relative), best first:
/// 1. each relative locator, normalised, joined to the child's directory;
/// 2. each absolute locator as recorded, then normalised when that differs;
/// 3. the file name of the parent's recorded name, beside the child.
///
/// Normalising turns backslashes into slashes, drops a `\\?\` prefix and any leading `./`.
/// Empty paths and repeats are left out. Nothing is probed or opened here.
pub fn parent_candidates(child: Option<&Path>, link: &ParentLink) -> Vec<PathBuf> {
    let dir = child.and_then(Path::parent).unwrap_or(Path::new(""));
    let mut out: Vec<PathBuf> = Vec::new();
    let mut push = |p: PathBuf| {
        if !p.as_os_str().is_empty() && !out.contains(&p) {
            out.push(p);
        }
    };
    for l in &link.locators {
        if l.kind == LocatorKind::Relative {
            let rel = normalise(&l.path);
            if !rel.is_empty() {
                push(dir.join(rel));
            }
        }
    }
    // An absolute locator that is not absolute here (a Windows path such as `C:\vms\p.vhdx`)
    // would resolve against the caller's working directory: it is skipped, and its file name
    // is still tried beside the child below.
    for l in &link.locators {
        if l.kind == LocatorKind::Absolute {
            for p in [PathBuf::from(&l.path), PathBuf::from(normalise(&l.path))] {
                if p.is_absolute() {
                    push(p);
                }
            }
        }
    }
    let name = link.name.replace('\\', "/");
    if let Some(file) = name.rsplit('/').next().filter(|f| !f.is_empty()) {
        push(dir.join(file));
    }
    out
}

/// A recorded path in local form: `\\?\` dropped, backslashes to slashes, leading `./` dropped.
fn normalise(recorded: &str) -> String {
    let s = recorded.strip_prefix("\\\\?\\").unwrap_or(recorded);
    let s = s.replace('\\', "/");
    let mut rest = s.as_str();
    while let Some(r) = rest.strip_prefix("./") {
        rest = r.trim_start_matches('/');
    }
    rest.to_string()
}

/// What a file that is not a regular file is, for messages.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

pub(crate) fn is_block_device(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    meta.file_type().is_block_device()
}

/// Finds, opens and verifies the parent a child's locators describe.
pub(crate) fn open_parent(
    child: &Path,
    link: &ParentLink,
    opts: &OpenOptions,
    depth: usize,
    seen: &mut HashSet<PathBuf>,
    parent_override: Option<&Path>,
) -> Result<Arc<dyn BlockDevice>> {
    if depth + 1 >= MAX_CHAIN_DEPTH {
        return Err(Error::Unsupported(format!(
            "the parent of {} would be image {} of the chain, and a chain may have at most \
             {MAX_CHAIN_DEPTH} images",
            child.display(),
            depth + 2
        )));
    }
    let candidates: Vec<PathBuf> = match parent_override {
        Some(p) => vec![p.to_path_buf()],
        None => parent_candidates(Some(child), link),
    };
    let mut tried = Vec::new();
    let mut unusable = Vec::new();
    let mut mismatch: Option<Error> = None;
    for cand in candidates {
        if tried.contains(&cand) {
            continue;
        }
        tried.push(cand.clone());
        let meta = match std::fs::metadata(&cand) {
            Ok(m) => m,
            Err(_) => continue,
        };
        // Locators are data of the child: they may name only regular files. A device is used
        // only when the caller names it as the parent.
        let explicit = parent_override.is_some();
        let usable = meta.is_file() || (explicit && is_block_device(&meta));
        if !usable && explicit {
            return Err(Error::InvalidArgument(format!(
                "{} is {}: a parent must be a regular file or a block device",
                cand.display(),
                file_kind(&meta)
            )));
        }
        if !usable {
            unusable.push((cand.clone(), file_kind(&meta)));
            continue;
        }
        if seen.contains(&canonical(&cand)) {
            return Err(Error::ParentCycle {
                child: child.to_path_buf(),
                parent: cand,
            });
        }
        // The parent's format is the child's (a VHD's parent is a VHD, a VHDX's a VHDX): never
        // probed, so a file that is not one is refused rather than read as raw.
        let want = Format::parse(link.format).ok_or_else(|| {
            Error::Unsupported(format!(
                "parent format {} of {}",
                link.format,
                child.display()
            ))
        })?;
        let parent = match open_layer(
            &cand,
            opts,
            Some(want),
            opts.parents_writable,
            depth + 1,
            seen,
            None,
        ) {
            Ok(p) => p.device(),
            Err(Error::WrongFormat { detail, .. }) => {
                seen.remove(&canonical(&cand));
                mismatch.get_or_insert(Error::ParentMismatch {
                    child: child.to_path_buf(),
                    parent: cand.clone(),
                    detail: format!(
                        "the child needs a {} parent, this file is not one ({detail})",
                        link.format
                    ),
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        let found_id = parent.unique_id();
        if found_id.is_none()
            || (found_id != Some(link.expected_id) && found_id != link.also_accepted)
        {
            mismatch.get_or_insert(Error::ParentMismatch {
                child: child.to_path_buf(),
                parent: cand.clone(),
                detail: format!(
                    "the child was made against identity {}, this file has {}",
                    link.expected_id,
                    found_id
                        .map(|i| i.to_string())
                        .unwrap_or_else(|| "none".into())
                ),
            });
        } else {
            return Ok(parent);
        }
        // Not ours: release it (and its place in the cycle set) and try the next candidate.
        remove_subtree(seen, &parent);
    }
    Err(mismatch.unwrap_or_else(|| Error::ParentNotFound {
        child: child.to_path_buf(),
        name: link.name.clone(),
        tried,
        unusable: unusable.into(),
    }))
}

fn remove_subtree(seen: &mut HashSet<PathBuf>, d: &Arc<dyn BlockDevice>) {
    let mut cur: Option<&Arc<dyn BlockDevice>> = Some(d);
    while let Some(layer) = cur {
        if let Some(p) = layer.path() {
            seen.remove(&canonical(p));
        }
        cur = layer.backing();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::{Guid, LocatorPath};

    fn link(format: &'static str, name: &str, locators: &[(LocatorKind, &str)]) -> ParentLink {
        ParentLink {
            name: name.into(),
            locators: locators
                .iter()
                .map(|(kind, path)| LocatorPath {
                    kind: *kind,
                    path: path.to_string(),
                })
                .collect(),
            expected_id: Guid::NIL,
            also_accepted: None,
            format,
        }
    }

    fn paths(v: &[&str]) -> Vec<PathBuf> {
        v.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn relative_first_then_absolute_then_the_name_beside_the_child() {
        use LocatorKind::*;
        // Recorded absolute first (as Windows writes a VHD): relative is still tried first.
        let l = link(
            "vhd",
            "C:\\vms\\base.vhd",
            &[
                (Absolute, "C:\\vms\\base.vhd"),
                (Relative, ".\\.\\sub\\base.vhd"),
            ],
        );
        assert_eq!(
            parent_candidates(Some(Path::new("/x/child.vhd")), &l),
            // The Windows path is not absolute here: only its file name is tried, beside
            // the child, never against the working directory.
            paths(&["/x/sub/base.vhd", "/x/base.vhd"])
        );
    }

    #[test]
    fn both_formats_follow_the_same_rule() {
        use LocatorKind::*;
        let recorded = [
            (Relative, "..\\base\\p.img"),
            (Absolute, "\\\\?\\D:\\vms\\p.img"),
            (Absolute, "/Users/me/my vms/p.img"),
        ];
        let want = paths(&["/x/c/../base/p.img", "/Users/me/my vms/p.img", "/x/c/p.img"]);
        for format in ["vhd", "vhdx"] {
            let l = link(format, "..\\base\\p.img", &recorded);
            assert_eq!(
                parent_candidates(Some(Path::new("/x/c/child")), &l),
                want,
                "{format}"
            );
        }
    }

    #[test]
    fn dot_prefixes_and_backslashes_are_normalised() {
        for (recorded, want) in [
            (".\\base.vhdx", "/d/base.vhdx"),
            ("./base.vhdx", "/d/base.vhdx"),
            (".\\.\\.//base.vhdx", "/d/base.vhdx"),
            ("sub\\deeper\\base.vhdx", "/d/sub/deeper/base.vhdx"),
            (".\\..\\up\\base.vhdx", "/d/../up/base.vhdx"),
        ] {
            let l = link("vhdx", recorded, &[(LocatorKind::Relative, recorded)]);
            let got = parent_candidates(Some(Path::new("/d/child.vhdx")), &l);
            // Compare as text: Path equality would forgive a leftover "./".
            assert_eq!(
                got[0].to_str().unwrap(),
                want,
                "{recorded:?} resolved to {got:?}"
            );
        }
    }

    #[test]
    fn nothing_recorded_nothing_tried_and_no_child_file_keeps_paths_relative() {
        assert!(parent_candidates(Some(Path::new("/d/c.vhd")), &link("vhd", "", &[])).is_empty());
        let l = link("vhd", "p.vhd", &[(LocatorKind::Relative, ".\\p.vhd")]);
        assert_eq!(parent_candidates(None, &l), paths(&["p.vhd"]));
    }
}

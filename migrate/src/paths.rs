//! Windows paths from a `.vmc` to paths on this host.
//!
//! * `--path-map 'C:\VMs=/srv/vms'` (repeatable): a Windows prefix (drive letter path or UNC
//!   `\\server\share\...`) and the local directory it now lives in. Prefixes compare per
//!   component and ignore ASCII case, as Windows does; the longest matching prefix wins.
//! * Relative paths (`.\disk.vhd`, `..\disks\disk.vhd`) are relative to the `.vmc`'s folder.
//! * A component that is not found with its exact case is looked up case-insensitively (files
//!   copied from Windows keep their case, the `.vmc` may spell it differently).

use std::path::{Path, PathBuf};

use crate::Error;

/// What is wrong with a `--path-map` value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathMapError {
    #[error("expected WINDOWS_PREFIX=LOCAL_DIR, e.g. 'C:\\VMs=/srv/vms'")]
    NoEquals,
    #[error("{0:?} is not an absolute Windows path (C:\\dir or \\\\server\\share)")]
    NotWindows(String),
    #[error("the local directory is empty")]
    EmptyLocal,
}

/// One `--path-map FROM=TO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathMap {
    /// Root (`c:` or `\\server\share`, lower case) and lower-case components of FROM.
    root: String,
    components: Vec<String>,
    pub from: String,
    pub to: PathBuf,
}

impl PathMap {
    pub fn parse(s: &str) -> Result<PathMap, Error> {
        let bad = |problem| Error::PathMap {
            spec: s.to_string(),
            problem,
        };
        let Some((from, to)) = s.split_once('=') else {
            return Err(bad(PathMapError::NoEquals));
        };
        let Some(w) = WinPath::parse(from.trim()) else {
            return Err(bad(PathMapError::NotWindows(from.to_string())));
        };
        if to.trim().is_empty() {
            return Err(bad(PathMapError::EmptyLocal));
        }
        Ok(PathMap {
            root: w.root.to_ascii_lowercase(),
            components: w
                .components
                .iter()
                .map(|c| c.to_ascii_lowercase())
                .collect(),
            from: from.trim().to_string(),
            to: PathBuf::from(to.trim()),
        })
    }

    /// The local path for `win`, when this map's prefix covers it.
    fn apply(&self, win: &WinPath) -> Option<PathBuf> {
        if win.root.to_ascii_lowercase() != self.root
            || win.components.len() < self.components.len()
        {
            return None;
        }
        let matches = self
            .components
            .iter()
            .zip(&win.components)
            .all(|(a, b)| a.eq_ignore_ascii_case(b));
        if !matches {
            return None;
        }
        Some(resolve_components(
            &self.to,
            &win.components[self.components.len()..],
        ))
    }
}

/// An absolute Windows path split into its root and components.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WinPath {
    /// `C:` or `\\server\share`.
    pub root: String,
    pub components: Vec<String>,
}

impl WinPath {
    /// Parses `C:\a\b`, `C:/a/b`, `\\server\share\a`, `\\?\C:\a` and `\\?\UNC\server\share\a`.
    pub fn parse(s: &str) -> Option<WinPath> {
        let s = s.trim();
        let s = if let Some(r) = s.strip_prefix("\\\\?\\UNC\\") {
            std::borrow::Cow::Owned(format!("\\\\{r}"))
        } else if let Some(r) = s.strip_prefix("\\\\?\\") {
            std::borrow::Cow::Borrowed(r)
        } else {
            std::borrow::Cow::Borrowed(s)
        };
        let is_sep = |c: char| c == '\\' || c == '/';
        let b = s.as_bytes();
        let (root, rest) = if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
            if b.len() > 2 && !is_sep(b[2] as char) {
                return None; // "C:foo" is relative to the drive's current directory
            }
            (s[..2].to_ascii_uppercase(), &s[2..])
        } else if s.starts_with("\\\\") || s.starts_with("//") {
            let mut parts = s[2..].split(is_sep).filter(|p| !p.is_empty());
            let server = parts.next()?;
            let share = parts.next()?;
            let root = format!("\\\\{server}\\{share}");
            let comps = parts.map(str::to_string).collect::<Vec<_>>();
            return Some(WinPath {
                root,
                components: normalize(comps),
            });
        } else {
            return None;
        };
        let comps = rest
            .split(is_sep)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        Some(WinPath {
            root,
            components: normalize(comps),
        })
    }

    pub fn file_name(&self) -> Option<&str> {
        self.components.last().map(String::as_str)
    }
}

/// Drops `.` and folds `..` (never above the root).
fn normalize(comps: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in comps {
        match c.as_str() {
            "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(c),
        }
    }
    out
}

/// Joins components onto `base`, matching each one case-insensitively when the exact name does
/// not exist.
pub fn resolve_components(base: &Path, comps: &[String]) -> PathBuf {
    let mut cur = base.to_path_buf();
    for c in comps {
        if c == ".." {
            // Lexical, as Windows resolves `..` (callers pass absolute bases).
            if cur.file_name().is_none() || !cur.pop() {
                cur.push("..");
            }
            continue;
        }
        let exact = cur.join(c);
        if exact.exists() {
            cur = exact;
            continue;
        }
        let found = std::fs::read_dir(&cur).ok().and_then(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .find(|n| n.to_str().is_some_and(|n| n.eq_ignore_ascii_case(c)))
        });
        cur = match found {
            Some(n) => cur.join(n),
            None => exact,
        };
    }
    cur
}

/// How a `.vmc` path was turned into a candidate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub path: PathBuf,
    pub how: String,
}

/// The local files a `.vmc` drive entry may mean, best first: the absolute path through a path
/// map (or as is when it is a local absolute path), the relative path from the `.vmc`'s folder,
/// then the bare file name in the `.vmc`'s folder.
pub fn candidates(
    absolute: Option<&str>,
    relative: Option<&str>,
    vmc_dir: &Path,
    maps: &[PathMap],
) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    let mut push = |path: PathBuf, how: String| {
        if !out.iter().any(|c| c.path == path) {
            out.push(Candidate { path, how });
        }
    };
    let mut file_name: Option<String> = None;
    if let Some(abs) = absolute {
        if let Some(w) = WinPath::parse(abs) {
            file_name = w.file_name().map(str::to_string);
            let mut best: Option<(&PathMap, PathBuf)> = None;
            for m in maps {
                if let Some(p) = m.apply(&w) {
                    if best
                        .as_ref()
                        .is_none_or(|(b, _)| m.components.len() > b.components.len())
                    {
                        best = Some((m, p));
                    }
                }
            }
            if let Some((m, p)) = best {
                push(
                    p,
                    format!(
                        "absolute path {abs:?} through --path-map {}={}",
                        m.from,
                        m.to.display()
                    ),
                );
            }
        } else if abs.starts_with('/') {
            let p = PathBuf::from(abs);
            file_name = p.file_name().map(|f| f.to_string_lossy().into_owned());
            push(p, format!("absolute path {abs:?}"));
        }
    }
    if let Some(rel) = relative {
        if WinPath::parse(rel).is_none() && !rel.starts_with('/') {
            let comps: Vec<String> = rel
                .split(['\\', '/'])
                .filter(|p| !p.is_empty() && *p != ".")
                .map(str::to_string)
                .collect();
            if let Some(last) = comps.last() {
                file_name.get_or_insert_with(|| last.clone());
            }
            if !comps.is_empty() {
                push(
                    resolve_components(vmc_dir, &comps),
                    format!("relative path {rel:?} from the .vmc's folder"),
                );
            }
        }
    }
    if let Some(name) = file_name.filter(|n| n != "." && n != "..") {
        push(
            resolve_components(vmc_dir, std::slice::from_ref(&name)),
            format!("file name {name:?} in the .vmc's folder"),
        );
    }
    out
}

/// Writes a path for messages and the report.
pub fn show(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_paths_parse() {
        let w = WinPath::parse("c:\\VMs\\.\\a\\..\\XP\\disk.vhd").unwrap();
        assert_eq!(w.root, "C:");
        assert_eq!(w.components, ["VMs", "XP", "disk.vhd"]);
        let u = WinPath::parse("\\\\Server\\Share\\vms\\x.vhd").unwrap();
        assert_eq!(u.root, "\\\\Server\\Share");
        assert_eq!(u.components, ["vms", "x.vhd"]);
        assert_eq!(WinPath::parse("\\\\?\\D:\\x.vhd").unwrap().root, "D:");
        assert_eq!(
            WinPath::parse("\\\\?\\UNC\\srv\\sh\\x.vhd").unwrap().root,
            "\\\\srv\\sh"
        );
        assert!(WinPath::parse(".\\x.vhd").is_none());
        assert!(WinPath::parse("C:x.vhd").is_none());
        assert!(WinPath::parse("/srv/x.vhd").is_none());
        assert!(WinPath::parse("\\\\server").is_none());
    }

    #[test]
    fn maps_apply_case_insensitively_and_longest_prefix_wins() {
        let maps = vec![
            PathMap::parse("C:\\VMs=/srv/vms").unwrap(),
            PathMap::parse("c:\\vms\\Big=/big").unwrap(),
            PathMap::parse("\\\\nas\\vpc\\=/mnt/nas").unwrap(),
        ];
        let dir = Path::new("/nonexistent-vmc-dir");
        let c = candidates(Some("C:\\vms\\xp\\XP.vhd"), None, dir, &maps);
        assert_eq!(c[0].path, PathBuf::from("/srv/vms/xp/XP.vhd"));
        assert_eq!(c[1].path, dir.join("XP.vhd"));
        let c = candidates(Some("C:\\VMS\\BIG\\d.vhd"), None, dir, &maps);
        assert_eq!(c[0].path, PathBuf::from("/big/d.vhd"));
        let c = candidates(Some("\\\\NAS\\VPC\\a\\b.vhd"), None, dir, &maps);
        assert_eq!(c[0].path, PathBuf::from("/mnt/nas/a/b.vhd"));
        // A prefix must match whole components.
        let c = candidates(Some("C:\\VMsOld\\d.vhd"), None, dir, &maps);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].path, dir.join("d.vhd"));
        // Unmapped drive: only the file-name fallback.
        let c = candidates(Some("D:\\x\\y.vhd"), None, dir, &maps);
        assert_eq!(c.len(), 1);
        assert!(PathMap::parse("C:\\VMs").is_err());
        assert!(PathMap::parse("relative=/x").is_err());
        assert!(PathMap::parse("C:\\x=").is_err());
    }

    #[test]
    fn relative_paths_follow_the_vmc_folder_and_fold_case() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("Disks")).unwrap();
        std::fs::write(t.path().join("Disks").join("WinXP.VHD"), b"x").unwrap();
        let vm = t.path().join("vm");
        std::fs::create_dir(&vm).unwrap();
        let c = candidates(
            Some("C:\\Nowhere\\winxp.vhd"),
            Some("..\\disks\\winxp.vhd"),
            &vm,
            &[],
        );
        assert_eq!(c[0].path, t.path().join("Disks").join("WinXP.VHD"));
        assert!(c[0].how.contains("relative"));
        assert_eq!(c[1].path, vm.join("winxp.vhd"));
        let c = candidates(Some("/abs/local.vhd"), Some(".\\local.vhd"), &vm, &[]);
        assert_eq!(c[0].path, PathBuf::from("/abs/local.vhd"));
        assert_eq!(c[1].path, vm.join("local.vhd"));
        assert_eq!(c.len(), 2);
    }
}

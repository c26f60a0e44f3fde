//! Path helpers shared by the formats' parent locators.

use std::path::{Component, Path};

/// Windows paths of a parent, for the locators that hold absolute Windows paths (VHD W2ku and
/// header parent name, VHDX `absolute_win32_path` and `volume_path`). Written only when known:
/// a POSIX path there is useless to Windows and to readers that take the name after the last
/// backslash (libvhdi); without them readers use the relative locator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentWindowsPaths {
    /// `D:\VMs\base.vhdx`.
    pub absolute: Option<String>,
    /// `\\?\Volume{GUID}\VMs\base.vhdx` (VHDX only).
    pub volume: Option<String>,
}

/// The Windows path of `target` when the host folder `host_root` is the Windows folder
/// `windows_root` (`--windows-root`): `D:\VMs` + the path of `target` below `host_root`.
/// None when `target` is not inside `host_root`. Both host paths should be absolute.
pub fn windows_path_under(windows_root: &str, host_root: &Path, target: &Path) -> Option<String> {
    let norm = |p: &Path| -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for c in p.components() {
            match c {
                Component::Normal(n) => out.push(n.to_string_lossy().into_owned()),
                Component::ParentDir => {
                    out.pop();
                }
                _ => {}
            }
        }
        out
    };
    let (root, t) = (norm(host_root), norm(target));
    if t.len() <= root.len() || t[..root.len()] != root[..] {
        return None;
    }
    let mut w = windows_root
        .trim_end_matches(['\\', '/'])
        .replace('/', "\\");
    for part in &t[root.len()..] {
        w.push('\\');
        w.push_str(part);
    }
    Some(w)
}

/// The Windows-style relative path (`.\x.vhd`, `..\base\x.vhdx`) from directory `from_dir` to
/// `to`, as VHD W2ru and VHDX relative_path locators store it. Both paths should be absolute.
pub fn windows_relative_path(from_dir: &Path, to: &Path) -> String {
    let a: Vec<_> = from_dir.components().collect();
    let b: Vec<_> = to.components().collect();
    let common = a.iter().zip(b.iter()).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = Vec::new();
    if common == a.len() {
        parts.push(".".into());
    }
    for _ in common..a.len() {
        parts.push("..".into());
    }
    for c in &b[common..] {
        parts.push(c.as_os_str().to_string_lossy().into_owned());
    }
    parts.join("\\")
}

#[cfg(test)]
mod tests {
    use super::windows_relative_path as rel;
    use std::path::Path;

    #[test]
    fn windows_root_maps_a_host_folder() {
        use super::windows_path_under as under;
        assert_eq!(
            under(
                "D:\\VMs",
                Path::new("/srv/vm"),
                Path::new("/srv/vm/base.vhdx")
            )
            .as_deref(),
            Some("D:\\VMs\\base.vhdx")
        );
        assert_eq!(
            under(
                "D:\\VMs\\",
                Path::new("/srv/vm"),
                Path::new("/srv/vm/a/../b/p.vhd")
            )
            .as_deref(),
            Some("D:\\VMs\\b\\p.vhd")
        );
        assert_eq!(
            under("D:\\VMs", Path::new("/srv/vm"), Path::new("/srv/x.vhd")),
            None
        );
    }

    #[test]
    fn relative_paths_look_like_windows_writes_them() {
        assert_eq!(
            rel(Path::new("/vm"), Path::new("/vm/base.vhd")),
            ".\\base.vhd"
        );
        assert_eq!(
            rel(Path::new("/vm/kids"), Path::new("/vm/base.vhd")),
            "..\\base.vhd"
        );
        assert_eq!(
            rel(Path::new("/vm"), Path::new("/vm/sub/base.vhdx")),
            ".\\sub\\base.vhdx"
        );
        assert_eq!(
            rel(Path::new("/a/b"), Path::new("/c/d.vhd")),
            "..\\..\\c\\d.vhd"
        );
    }
}

//! Path helpers shared by the formats' parent locators.

use std::path::Path;

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

//! The share directory (`-s`): validated, created if missing and packed as
//! a plain tar archive whose member names are relative to the directory,
//! like the reference client's.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Checks the share directory: created when missing; an error when the path
/// exists and is not a directory.
pub fn prepare_dir(dir: &Path) -> Result<(), String> {
    if dir.is_dir() {
        return Ok(());
    }
    if dir.exists() {
        return Err(format!(
            "The share directory '{}' is not a folder",
            dir.display()
        ));
    }
    fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create the share directory '{}': {e}", dir.display()))
}

/// Packs `dir` into an uncompressed tar archive (symbolic links kept as
/// links, entries sorted by name).
pub fn pack(dir: &Path) -> io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(dir.join(&rel))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = rel.join(entry.file_name());
            let path = entry.path();
            builder.append_path_with_name(&path, &name)?;
            if entry.file_type()?.is_dir() {
                stack.push(name);
            }
        }
    }
    builder.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_relative_names() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        fs::write(d.path().join("a.txt"), b"hello").unwrap();
        fs::write(d.path().join("sub/b.txt"), b"world").unwrap();
        let data = pack(d.path()).unwrap();
        let mut ar = tar::Archive::new(&data[..]);
        let mut names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["a.txt", "sub", "sub/b.txt"]);
    }

    #[test]
    fn refuses_a_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        fs::write(&f, b"").unwrap();
        assert!(prepare_dir(&f).unwrap_err().contains("is not a folder"));
        let new = d.path().join("new/dir");
        prepare_dir(&new).unwrap();
        assert!(new.is_dir());
    }
}

//! Paths inside the image's root, resolved from outside it: symlinks are followed as the
//! container would see them (absolute targets and `..` stay inside the root), so a hostile
//! image cannot point the agent at the guest's own files.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Most symlinks followed in one resolution (the kernel's limit).
const MAX_LINKS: usize = 40;
/// Default `PATH` when the spec's environment has none (the OCI/Docker default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RootPathError {
    #[error("too many levels of symbolic links resolving `{0}` in the image")]
    Loop(String),
    #[error("executable `{name}` not found in PATH {path} of the image")]
    NotInPath { name: String, path: String },
    #[error("executable `{0}` does not exist in the image")]
    Missing(String),
    #[error("`{0}` in the image is not an executable regular file")]
    NotExecutable(String),
    #[error("empty command: the run spec has no args and the image no entrypoint or cmd")]
    Empty,
}

/// Resolves container path `path` (absolute, or relative to container dir `cwd`) to a
/// path on this side under `root`, following symlinks confined to `root`. Components
/// that do not exist are appended as they are.
pub fn resolve(root: &Path, cwd: &str, path: &str) -> Result<PathBuf, RootPathError> {
    let full = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{}/{}", cwd.trim_end_matches('/'), path)
    };
    // Components still to walk, in reverse (a stack).
    let mut todo: Vec<Vec<u8>> = split(full.as_bytes());
    todo.reverse();
    let mut cur: Vec<Vec<u8>> = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c == b".." {
            cur.pop();
            continue;
        }
        cur.push(c);
        let here = join(root, &cur);
        let Ok(md) = std::fs::symlink_metadata(&here) else {
            continue;
        };
        if !md.file_type().is_symlink() {
            continue;
        }
        links += 1;
        if links > MAX_LINKS {
            return Err(RootPathError::Loop(path.to_owned()));
        }
        let target =
            std::fs::read_link(&here).map_err(|_| RootPathError::Missing(path.to_owned()))?;
        cur.pop();
        let t = target.as_os_str().as_bytes();
        if t.starts_with(b"/") {
            cur.clear();
        }
        for part in split(t).into_iter().rev() {
            todo.push(part);
        }
    }
    Ok(join(root, &cur))
}

fn split(p: &[u8]) -> Vec<Vec<u8>> {
    Path::new(OsStr::from_bytes(p))
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.as_bytes().to_vec()),
            Component::ParentDir => Some(b"..".to_vec()),
            _ => None,
        })
        .collect()
}

fn join(root: &Path, parts: &[Vec<u8>]) -> PathBuf {
    let mut p = root.to_owned();
    for part in parts {
        p.push(OsStr::from_bytes(part));
    }
    p
}

fn is_executable_file(p: &Path) -> Option<bool> {
    let md = std::fs::metadata(p).ok()?;
    Some(md.is_file() && md.permissions().mode() & 0o111 != 0)
}

/// The `PATH` of an environment list, or [`DEFAULT_PATH`].
pub fn path_of(env: &[String]) -> &str {
    env.iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
}

/// Finds `name` (args[0]) as the container will exec it: looked up in `path_var` when it
/// has no `/`, else taken relative to `cwd`. Returns the container path.
pub fn find_executable(
    root: &Path,
    cwd: &str,
    name: &str,
    path_var: &str,
) -> Result<String, RootPathError> {
    if name.is_empty() {
        return Err(RootPathError::Empty);
    }
    if name.contains('/') {
        let host = resolve(root, cwd, name)?;
        return match is_executable_file(&host) {
            Some(true) => Ok(name.to_owned()),
            Some(false) => Err(RootPathError::NotExecutable(name.to_owned())),
            None => Err(RootPathError::Missing(name.to_owned())),
        };
    }
    for dir in path_var.split(':').filter(|d| !d.is_empty()) {
        let candidate = format!("{}/{name}", dir.trim_end_matches('/'));
        let host = resolve(root, cwd, &candidate)?;
        if is_executable_file(&host) == Some(true) {
            return Ok(candidate);
        }
    }
    Err(RootPathError::NotInPath {
        name: name.to_owned(),
        path: path_var.to_owned(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for dir in ["bin", "usr/bin", "usr/local/bin", "etc", "app"] {
            std::fs::create_dir_all(r.join(dir)).unwrap();
        }
        let exe = |p: &str, mode: u32| {
            std::fs::write(r.join(p), b"#!/bin/sh\n").unwrap();
            std::fs::set_permissions(r.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
        };
        exe("bin/busybox", 0o755);
        exe("usr/bin/python3", 0o755);
        exe("usr/local/bin/notexec", 0o644);
        exe("app/run.sh", 0o755);
        symlink("/bin/busybox", r.join("bin/sh")).unwrap();
        symlink("../../bin/busybox", r.join("usr/bin/env")).unwrap();
        // Escapes: must stay inside the root.
        symlink("/etc/passwd", r.join("etc/hostlink")).unwrap();
        symlink("../../../../../../../bin", r.join("app/up")).unwrap();
        symlink("loop2", r.join("app/loop1")).unwrap();
        symlink("loop1", r.join("app/loop2")).unwrap();
        d
    }

    #[test]
    fn symlinks_stay_inside_the_root() {
        let d = tree();
        let r = d.path();
        assert_eq!(resolve(r, "/", "/bin/sh").unwrap(), r.join("bin/busybox"));
        assert_eq!(
            resolve(r, "/", "/usr/bin/env").unwrap(),
            r.join("bin/busybox")
        );
        assert_eq!(
            resolve(r, "/", "/etc/hostlink").unwrap(),
            r.join("etc/passwd")
        );
        assert_eq!(resolve(r, "/app", "up/sh").unwrap(), r.join("bin/busybox"));
        assert_eq!(resolve(r, "/", "/../../..").unwrap(), r.to_owned());
        assert_eq!(
            resolve(r, "/", "/app/missing/x").unwrap(),
            r.join("app/missing/x")
        );
        assert!(matches!(
            resolve(r, "/", "/app/loop1"),
            Err(RootPathError::Loop(_))
        ));
    }

    #[test]
    fn path_lookup_inside_a_root() {
        let d = tree();
        let r = d.path();
        let path = "/usr/local/bin:/usr/bin:/bin";
        assert_eq!(
            find_executable(r, "/", "python3", path).unwrap(),
            "/usr/bin/python3"
        );
        assert_eq!(find_executable(r, "/", "sh", path).unwrap(), "/bin/sh");
        // The non-executable earlier in PATH is skipped.
        std::fs::write(r.join("bin/notexec"), b"").unwrap();
        std::fs::set_permissions(
            r.join("bin/notexec"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        assert_eq!(
            find_executable(r, "/", "notexec", path).unwrap(),
            "/bin/notexec"
        );
        let e = find_executable(r, "/", "foo", "/usr/bin:/bin").unwrap_err();
        assert_eq!(
            e.to_string(),
            "executable `foo` not found in PATH /usr/bin:/bin of the image"
        );
        // With a slash: relative to cwd, no PATH search.
        assert_eq!(
            find_executable(r, "/app", "./run.sh", path).unwrap(),
            "./run.sh"
        );
        assert!(matches!(
            find_executable(r, "/", "./run.sh", path),
            Err(RootPathError::Missing(_))
        ));
        assert!(matches!(
            find_executable(r, "/", "/usr/local/bin/notexec", path),
            Err(RootPathError::NotExecutable(_))
        ));
        // A directory is not an executable.
        assert!(matches!(
            find_executable(r, "/", "/app", path),
            Err(RootPathError::NotExecutable(_))
        ));
        assert_eq!(find_executable(r, "/", "", path), Err(RootPathError::Empty));
    }

    #[test]
    fn path_comes_from_the_environment() {
        assert_eq!(path_of(&["A=1".into(), "PATH=/x:/y".into()]), "/x:/y");
        assert_eq!(path_of(&["A=1".into()]), DEFAULT_PATH);
    }
}

//! The driver disk: a read-only erofs image holding a flavour's kernel modules, GSP
//! firmware and userspace, flattened:
//!
//! ```text
//! gpucell-driver.json                     what the agent needs to know (DriverInfo)
//! lib/modules/<release>/{drm,nvidia,nvidia-uvm}.ko
//! lib/firmware/nvidia/<version>/gsp_*.bin
//! usr/lib/   libcuda.so.<V> + SONAME links, libnvidia-*, the C library, ld-linux
//! usr/bin/   nvidia-smi, nvidia-persistenced, gpucell-cuda-version
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::DriverError;

/// The driver disk's description of itself, at its root.
pub const INFO_FILE: &str = "gpucell-driver.json";
/// The disk's virtio-blk serial, by which the agent finds it.
pub const DISK_SERIAL: &str = "gpucell-driver";
pub const DISK_FILE: &str = "driver.erofs";

/// What the agent reads from the disk (`gpucell-driver.json`): one type shared with the
/// agent, in the protocol crate.
pub use gpucell_protocol::driver::DriverInfo;

/// One entry of the disk: a file with its digest, or a symlink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

fn copy_file(from: &Path, to: &Path, mode: u32) -> Result<u64, DriverError> {
    if let Some(p) = to.parent() {
        fs::create_dir_all(p).map_err(|e| DriverError::io(p, e))?;
    }
    let n = fs::copy(from, to).map_err(|e| DriverError::io(from, e))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .map_err(|e| DriverError::io(to, e))?;
    Ok(n)
}

/// Whether a file name is a shared library (`libx.so`, `libx.so.1.2`).
pub fn is_shared_lib(name: &str) -> bool {
    name.starts_with("lib") && (name.ends_with(".so") || name.contains(".so."))
        || name.starts_with("ld-linux")
}

/// Copies the shared libraries (files and the symlinks between them) found directly in
/// `dirs` (relative to `root`) into `dest`, flat. A symlink is kept only when it leads
/// (by basename, through other links) to a copied file. Returns the bytes copied.
pub fn flatten_libs(root: &Path, dirs: &[&str], dest: &Path) -> Result<u64, DriverError> {
    fs::create_dir_all(dest).map_err(|e| DriverError::io(dest, e))?;
    let mut files = BTreeMap::new();
    let mut links = BTreeMap::new();
    for d in dirs {
        let dir = root.join(d);
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if !is_shared_lib(&name) {
                continue;
            }
            let meta =
                fs::symlink_metadata(e.path()).map_err(|err| DriverError::io(&e.path(), err))?;
            if meta.file_type().is_symlink() {
                let target =
                    fs::read_link(e.path()).map_err(|err| DriverError::io(&e.path(), err))?;
                let base = target
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                links.insert(name, base);
            } else if meta.is_file() {
                files.insert(name, e.path());
            }
        }
    }
    let mut total = 0;
    for (name, path) in &files {
        total += copy_file(path, &dest.join(name), 0o755)?;
    }
    // A link is kept when its chain of links (by basename) ends at a copied file.
    for (name, target) in &links {
        let mut t = target;
        let mut hops = 0;
        while !files.contains_key(t) && hops < 8 {
            match links.get(t) {
                Some(next) => t = next,
                None => break,
            }
            hops += 1;
        }
        if files.contains_key(t) && !files.contains_key(name) {
            let link = dest.join(name);
            std::os::unix::fs::symlink(target, &link).map_err(|e| DriverError::io(&link, e))?;
        }
    }
    Ok(total)
}

/// The first regular file named `name` under `root` (depth-first, sorted).
pub fn find_file(root: &Path, name: &str) -> Option<PathBuf> {
    find_file_where(root, name, &|_| true)
}

/// The first file (sorted walk) under `root` whose name ends with `suffix`.
pub fn find_file_ext(root: &Path, suffix: &str) -> Option<PathBuf> {
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() && e.file_name().to_string_lossy().ends_with(suffix) {
                return Some(e.path());
            }
        }
    }
    None
}

fn is_elf(p: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// [`find_file`] among the files `ok` accepts.
fn find_file_where(root: &Path, name: &str, ok: &dyn Fn(&Path) -> bool) -> Option<PathBuf> {
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() && e.file_name() == name && ok(&e.path()) {
                return Some(e.path());
            }
        }
    }
    None
}

/// Copies `gsp_*.bin` of `version` from an unpacked firmware package (`lib/firmware` or
/// `usr/lib/firmware`) into the tree. Returns the bytes copied.
pub fn copy_firmware(root: &Path, version: &str, tree: &Path) -> Result<u64, DriverError> {
    let rel = format!("nvidia/{version}");
    let src = ["usr/lib/firmware", "lib/firmware"]
        .iter()
        .map(|d| root.join(d).join(&rel))
        .find(|p| p.is_dir())
        .ok_or_else(|| {
            DriverError::Missing(format!("firmware dir {rel} in firmware-nvidia-gsp"))
        })?;
    let dest = tree.join("lib/firmware").join(&rel);
    let mut total = 0;
    let rd = fs::read_dir(&src).map_err(|e| DriverError::io(&src, e))?;
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("gsp") && e.file_type().is_ok_and(|t| t.is_file()) {
            total += copy_file(&e.path(), &dest.join(&name), 0o644)?;
        }
    }
    if total == 0 {
        return Err(DriverError::Missing(format!(
            "gsp_*.bin in {}",
            src.display()
        )));
    }
    Ok(total)
}

/// Copies a named executable found anywhere under `root` to `tree/usr/bin/`.
pub fn copy_tool(root: &Path, name: &str, tree: &Path) -> Result<u64, DriverError> {
    // Packages also ship files of the same name that are not the program (lintian
    // overrides, bug scripts): only an ELF executable is taken.
    let src = find_file_where(root, name, &is_elf)
        .ok_or_else(|| DriverError::Missing(format!("ELF executable {name}")))?;
    copy_file(&src, &tree.join("usr/bin").join(name), 0o755)
}

/// Every file and symlink under `tree`, sorted by path, files with their SHA-256.
pub fn list_entries(tree: &Path) -> Result<Vec<DiskEntry>, DriverError> {
    let mut out = Vec::new();
    let mut stack = vec![tree.to_owned()];
    while let Some(dir) = stack.pop() {
        let rd = fs::read_dir(&dir).map_err(|e| DriverError::io(&dir, e))?;
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            let rel = p
                .strip_prefix(tree)
                .map(|r| r.to_string_lossy().into_owned())
                .unwrap_or_default();
            let ft = e.file_type().map_err(|err| DriverError::io(&p, err))?;
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_symlink() {
                let t = fs::read_link(&p).map_err(|err| DriverError::io(&p, err))?;
                out.push(DiskEntry {
                    path: rel,
                    sha256: None,
                    size: None,
                    link: Some(t.to_string_lossy().into_owned()),
                });
            } else {
                let size = e.metadata().map_err(|err| DriverError::io(&p, err))?.len();
                out.push(DiskEntry {
                    path: rel,
                    sha256: Some(crate::deb::sha256_file(&p)?),
                    size: Some(size),
                    link: None,
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Sum of the file sizes under `prefix` in `entries`.
pub fn bytes_under(entries: &[DiskEntry], prefix: &str) -> u64 {
    entries
        .iter()
        .filter(|e| e.path.starts_with(prefix))
        .filter_map(|e| e.size)
        .sum()
}

/// `mkfs.erofs` with lz4hc compression, files owned by root, fixed timestamps.
pub fn make_erofs(tree: &Path, image: &Path) -> Result<(), DriverError> {
    let out = Command::new("mkfs.erofs")
        .args(["--quiet", "-zlz4hc", "-T0", "--all-root"])
        .arg(image)
        .arg(tree)
        .output()
        .map_err(|e| DriverError::Tool("mkfs.erofs (erofs-utils)".into(), e))?;
    if !out.status.success() {
        return Err(DriverError::Missing(format!(
            "mkfs.erofs failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn libraries_are_flattened_with_their_soname_links() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("root");
        let nv = r.join("usr/lib/x86_64-linux-gnu/nvidia/current");
        fs::create_dir_all(&nv).unwrap();
        fs::write(nv.join("libcuda.so.550.163.01"), b"elf").unwrap();
        symlink("libcuda.so.550.163.01", nv.join("libcuda.so.1")).unwrap();
        symlink("libcuda.so.1", nv.join("libcuda.so")).unwrap();
        symlink("/elsewhere/libgone.so.1", nv.join("libgone.so")).unwrap();
        fs::write(nv.join("README"), b"x").unwrap();
        let libc = r.join("lib/x86_64-linux-gnu");
        fs::create_dir_all(&libc).unwrap();
        fs::write(libc.join("libc.so.6"), b"libc").unwrap();
        fs::write(libc.join("ld-linux-x86-64.so.2"), b"ld").unwrap();
        let dest = d.path().join("tree/usr/lib");
        let n = flatten_libs(
            &r,
            &[
                "usr/lib/x86_64-linux-gnu/nvidia/current",
                "lib/x86_64-linux-gnu",
            ],
            &dest,
        )
        .unwrap();
        assert_eq!(n, 3 + 4 + 2);
        assert_eq!(
            fs::read_link(dest.join("libcuda.so.1")).unwrap(),
            Path::new("libcuda.so.550.163.01")
        );
        // libcuda.so → libcuda.so.1 → the file: kept; a link out of the tree is not.
        assert_eq!(
            fs::read_link(dest.join("libcuda.so")).unwrap(),
            Path::new("libcuda.so.1")
        );
        assert!(!dest.join("libgone.so").exists());
        assert!(!dest.join("README").exists());
        let entries = list_entries(&d.path().join("tree")).unwrap();
        let paths: Vec<_> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "usr/lib/ld-linux-x86-64.so.2",
                "usr/lib/libc.so.6",
                "usr/lib/libcuda.so",
                "usr/lib/libcuda.so.1",
                "usr/lib/libcuda.so.550.163.01"
            ]
        );
        assert_eq!(entries[3].link.as_deref(), Some("libcuda.so.550.163.01"));
        assert_eq!(entries[4].size, Some(3));
        assert_eq!(bytes_under(&entries, "usr/lib/"), 9);
    }

    #[test]
    fn tools_are_the_elf_files_of_that_name() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("root");
        fs::create_dir_all(r.join("usr/share/lintian/overrides")).unwrap();
        fs::write(
            r.join("usr/share/lintian/overrides/nvidia-smi"),
            b"nvidia-smi: x",
        )
        .unwrap();
        fs::create_dir_all(r.join("usr/lib/nvidia/current")).unwrap();
        fs::write(r.join("usr/lib/nvidia/current/nvidia-smi"), b"\x7fELF....").unwrap();
        let tree = d.path().join("tree");
        assert_eq!(copy_tool(&r, "nvidia-smi", &tree).unwrap(), 8);
        assert_eq!(
            fs::read(tree.join("usr/bin/nvidia-smi")).unwrap(),
            b"\x7fELF...."
        );
        assert!(copy_tool(&r, "nvidia-persistenced", &tree).is_err());
    }

    #[test]
    fn firmware_goes_under_its_version() {
        let d = tempfile::tempdir().unwrap();
        let fw = d.path().join("root/usr/lib/firmware/nvidia/550.163.01");
        fs::create_dir_all(&fw).unwrap();
        fs::write(fw.join("gsp_ga10x.bin"), b"ga").unwrap();
        fs::write(fw.join("gsp_tu10x.bin"), b"tu").unwrap();
        let tree = d.path().join("tree");
        assert_eq!(
            copy_firmware(&d.path().join("root"), "550.163.01", &tree).unwrap(),
            4
        );
        assert!(tree
            .join("lib/firmware/nvidia/550.163.01/gsp_tu10x.bin")
            .is_file());
        let err = copy_firmware(&d.path().join("root"), "535.1.1", &tree).unwrap_err();
        assert!(err.to_string().contains("nvidia/535.1.1"), "{err}");
    }
}

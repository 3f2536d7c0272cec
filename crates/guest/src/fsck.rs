//! `gpucell fsck` for built guest flavours (`<state>/guest/<flavour>/`): the manifest
//! must parse and the kernel, init image and driver disk must have the sizes and
//! SHA-256 it names. A damaged flavour is removed with `repair` (under the build lock):
//! the next `gpucell guest build` makes it again from its cached inputs.

use std::path::Path;

use gpucell_common::fsck::{remove_path, Finding};

use crate::manifest::{MANIFEST_FILE, VMLINUX_FILE};

/// Checks every built flavour under `state_dir`.
pub fn fsck(state_dir: &Path, repair: bool) -> Vec<Finding> {
    let guest = state_dir.join("guest");
    let Ok(entries) = std::fs::read_dir(&guest) else {
        return Vec::new();
    };
    let mut dirs: Vec<_> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .filter(|p| p.join(MANIFEST_FILE).exists() || p.join(VMLINUX_FILE).exists())
        .collect();
    dirs.sort();
    let lock = match repair {
        true => Some(gpucell_common::FileLock::exclusive(&guest.join(".lock"))),
        false => None,
    };
    let mut out = Vec::new();
    for dir in dirs {
        let flavour = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (file, problem) = match crate::load(state_dir, &flavour).and_then(|a| {
            crate::verify(&a)?;
            Ok(a)
        }) {
            Ok(_) => continue,
            Err(crate::Error::NotBuilt { .. }) => (
                dir.join(MANIFEST_FILE),
                "missing: the build did not finish".to_string(),
            ),
            Err(crate::Error::Damaged { path, .. }) => (
                path,
                "its size or SHA-256 is not the one the manifest names (truncated or corrupt)"
                    .to_string(),
            ),
            Err(e) => (dir.join(MANIFEST_FILE), gpucell_common::chain_string(&e)),
        };
        let action = format!(
            "remove the flavour directory {} (rebuild it with `gpucell guest build --flavour {flavour}`)",
            dir.display()
        );
        let locked = match &lock {
            Some(Err(e)) => Err(std::io::Error::other(e.to_string())),
            _ => Ok(()),
        };
        out.push(Finding::repairable(
            file,
            "guest flavour file",
            problem,
            &action,
            repair,
            || locked.and_then(|()| remove_path(&dir)),
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::manifest::{FileDigest, Manifest, INITRAMFS_FILE, MANIFEST_SCHEMA};
    use gpucell_common::fsck::Outcome;

    fn digest(dir: &Path, file: &str) -> FileDigest {
        let path = dir.join(file);
        FileDigest {
            file: file.into(),
            sha256: crate::deb::sha256_file(&path).unwrap(),
            size: std::fs::metadata(&path).unwrap().len(),
        }
    }

    /// A flavour directory with a kernel, an init image and their manifest.
    fn flavour(state: &Path, name: &str) -> std::path::PathBuf {
        let dir = state.join("guest").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(VMLINUX_FILE), vec![0x7f; 4096]).unwrap();
        std::fs::write(dir.join(INITRAMFS_FILE), vec![0x30; 2048]).unwrap();
        let m = Manifest {
            schema: MANIFEST_SCHEMA,
            builder: "test".into(),
            flavour: name.into(),
            kernel_release: "6.1.0-test".into(),
            kernel_package: "linux-image-test".into(),
            kernel_package_version: "1".into(),
            deb: digest(&dir, VMLINUX_FILE),
            vmlinux: digest(&dir, VMLINUX_FILE),
            initramfs: digest(&dir, INITRAMFS_FILE),
            agent: digest(&dir, INITRAMFS_FILE),
            requested_modules: vec![],
            modules: vec![],
            module_conditions: Default::default(),
            builtin_modules: vec![],
            extra_packages: vec![],
            driver: None,
        };
        std::fs::write(dir.join(MANIFEST_FILE), m.to_json()).unwrap();
        dir
    }

    #[test]
    fn damaged_flavours_are_named_and_removed_on_repair() {
        let state = tempfile::tempdir().unwrap();
        let state = state.path();
        assert!(
            fsck(state, false).is_empty(),
            "no guest dir: nothing to say"
        );
        let good = flavour(state, "default");
        let short = flavour(state, "cut");
        let flipped = flavour(state, "flipped");
        let garbled = flavour(state, "garbled");
        std::fs::create_dir_all(state.join("guest/cache")).unwrap();
        assert!(fsck(state, false).is_empty());
        // A truncated init image, a kernel with one byte changed (same size), a
        // manifest cut short.
        std::fs::write(short.join(INITRAMFS_FILE), vec![0x30; 100]).unwrap();
        let mut k = std::fs::read(flipped.join(VMLINUX_FILE)).unwrap();
        k[100] ^= 1;
        std::fs::write(flipped.join(VMLINUX_FILE), k).unwrap();
        let text = std::fs::read(garbled.join(MANIFEST_FILE)).unwrap();
        std::fs::write(garbled.join(MANIFEST_FILE), &text[..text.len() / 2]).unwrap();

        let found = fsck(state, false);
        let files: Vec<_> = found.iter().map(|f| f.file.clone()).collect();
        assert_eq!(
            files,
            vec![
                short.join(INITRAMFS_FILE),
                flipped.join(VMLINUX_FILE),
                garbled.join(MANIFEST_FILE)
            ],
            "{found:#?}"
        );
        assert!(
            found[2].problem.contains("malformed"),
            "{}",
            found[2].problem
        );
        assert!(
            matches!(&found[0].outcome, Outcome::Repairable(a) if a.contains("--flavour cut")),
            "{:?}",
            found[0].outcome
        );
        let repaired = fsck(state, true);
        assert!(repaired
            .iter()
            .all(|f| matches!(f.outcome, Outcome::Repaired(_))));
        assert!(!short.exists() && !flipped.exists() && !garbled.exists());
        assert!(
            good.join(MANIFEST_FILE).exists(),
            "an intact flavour is kept"
        );
        assert!(fsck(state, false).is_empty());
    }
}

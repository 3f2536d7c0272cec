//! Where a run's root filesystem comes from: an image of the store (what `gpucell run`
//! does), or a directory someone else prepared, such as the rootfs containerd mounts in a
//! task's bundle. A directory is written into a read-only guest disk by the image store's
//! filesystem writer, for this run only; the disk is removed when the run ends.

use std::path::{Path, PathBuf};

use gpucell_image::{GuestDisk, Image, ImageConfig};

/// A run's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RootfsSource {
    /// The request's `image`, fetched into the image store.
    #[default]
    Image,
    /// A prepared directory. The request's `image` then only names the run in its
    /// report, and the process comes from the request alone (entrypoint, command,
    /// env, user, workdir): there is no image config to fill in defaults.
    Directory(PathBuf),
}

/// Errors making a guest disk from a directory.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("the rootfs directory {} is not a directory: check the bundle's rootfs mounts", path.display())]
    NotADirectory { path: PathBuf },
    #[error("creating a scratch directory for the rootfs disk under {}", dir.display())]
    Scratch {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the rootfs directory {} into a guest disk", tree.display())]
    Build {
        tree: PathBuf,
        #[source]
        source: gpucell_image::fsimage::FsImageError,
    },
}

/// A guest disk made from a directory, removed when dropped.
pub(crate) struct DirectoryDisk {
    pub disk: GuestDisk,
    pub image: Image,
    _scratch: tempfile::TempDir,
}

/// Writes `tree` into a read-only disk of `fs` under `<state_dir>/tmp`, and a stand-in
/// image whose config carries the request's environment (so that the driver choice
/// sees `NVIDIA_REQUIRE_*` as it would in an image's config).
pub(crate) fn directory_disk(
    state_dir: &Path,
    tree: &Path,
    fs: gpucell_image::FsType,
    reference: &str,
    env: &[String],
) -> Result<DirectoryDisk, RootfsError> {
    if !tree.is_dir() {
        return Err(RootfsError::NotADirectory {
            path: tree.to_path_buf(),
        });
    }
    let dir = state_dir.join("tmp");
    let scratch = std::fs::create_dir_all(&dir)
        .and_then(|()| {
            tempfile::Builder::new()
                .prefix("rootfs-disk-")
                .tempdir_in(&dir)
        })
        .map_err(|source| RootfsError::Scratch {
            dir: dir.clone(),
            source,
        })?;
    let path = scratch.path().join(format!("rootfs.{}", fs.as_str()));
    gpucell_image::fsimage::build(tree, &path, fs).map_err(|source| RootfsError::Build {
        tree: tree.to_path_buf(),
        source,
    })?;
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let image = Image {
        reference: reference.to_string(),
        digest: String::new(),
        config: ImageConfig {
            env: env.to_vec(),
            os: "linux".into(),
            architecture: "amd64".into(),
            ..ImageConfig::default()
        },
        config_digest: String::new(),
        layers: Vec::new(),
        size,
        created: None,
    };
    Ok(DirectoryDisk {
        disk: GuestDisk {
            path,
            fstype: fs.as_str().to_string(),
            size,
        },
        image,
        _scratch: scratch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_directory_is_named() {
        let state = tempfile::tempdir().unwrap();
        let missing = state.path().join("no-such-rootfs");
        let err = directory_disk(
            state.path(),
            &missing,
            gpucell_image::FsType::Ext4,
            "x",
            &[],
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("no-such-rootfs"), "{err}");
    }

    #[test]
    fn a_directory_becomes_a_disk_that_goes_away_with_it() {
        let state = tempfile::tempdir().unwrap();
        let tree = state.path().join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/hello"), b"hi").unwrap();
        let env = vec!["NVIDIA_REQUIRE_CUDA=cuda>=12.4".to_string()];
        let d = match directory_disk(
            state.path(),
            &tree,
            gpucell_image::FsType::Ext4,
            "containerd:ns/t1",
            &env,
        ) {
            Ok(d) => d,
            Err(RootfsError::Build {
                source: gpucell_image::fsimage::FsImageError::Spawn { .. },
                ..
            }) => {
                eprintln!("skipping: mkfs.ext4 is not installed");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert!(d.disk.path.is_file());
        assert!(d.disk.size > 0);
        assert_eq!(d.disk.fstype, "ext4");
        assert_eq!(d.image.config.env, env);
        assert_eq!(d.image.reference, "containerd:ns/t1");
        let path = d.disk.path.clone();
        drop(d);
        assert!(!path.exists());
    }
}

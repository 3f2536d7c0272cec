//! The directory a task's root filesystem is in, as containerd hands it over.

use std::path::{Path, PathBuf};

use containerd_shim_protos::api::Mount;

/// The directory that holds the task's rootfs: the source of a single bind mount as it
/// is (containerd's native snapshotter), else `root` with the mounts mounted on it (the
/// shim then unmounts it on delete), else `root` as containerd left it.
pub(super) fn rootfs_dir(
    mounts: &[Mount],
    root: &Path,
) -> Result<(PathBuf, Option<PathBuf>), String> {
    match mounts {
        [] => Ok((root.to_path_buf(), None)),
        [m] if m.type_ == "bind" || m.type_ == "rbind" => Ok((PathBuf::from(&m.source), None)),
        _ => {
            for m in mounts {
                containerd_shim::mount::mount_rootfs(
                    Some(m.type_.as_str()).filter(|t| !t.is_empty()),
                    Some(m.source.as_str()).filter(|s| !s.is_empty()),
                    &m.options,
                    root,
                )
                .map_err(|e| {
                    // What was mounted before this one comes off again.
                    unmount(root);
                    format!(
                        "mounting the task's rootfs ({} {}) on {}: {e}",
                        m.type_,
                        m.source,
                        root.display()
                    )
                })?;
            }
            Ok((root.to_path_buf(), Some(root.to_path_buf())))
        }
    }
}

pub(super) fn unmount(path: &Path) {
    if let Err(e) = containerd_shim::mount::umount_recursive(path.to_str(), libc::MNT_DETACH) {
        tracing::warn!(path = %path.display(), error = %e, "unmounting the task's rootfs");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(type_: &str, source: &str) -> Mount {
        Mount {
            type_: type_.into(),
            source: source.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_single_bind_mount_is_used_where_it_is() {
        let root = Path::new("/bundle/rootfs");
        let (dir, mounted) = rootfs_dir(&[mount("bind", "/snapshots/7/fs")], root).unwrap();
        assert_eq!(dir, PathBuf::from("/snapshots/7/fs"));
        assert_eq!(mounted, None);
        let (dir, mounted) = rootfs_dir(&[], root).unwrap();
        assert_eq!(dir, root);
        assert_eq!(mounted, None);
    }

    #[test]
    fn a_failed_mount_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mounts = [
            mount("no-such-fs", "/nowhere/a"),
            mount("no-such-fs", "/nowhere/b"),
        ];
        let err = rootfs_dir(&mounts, dir.path()).unwrap_err();
        assert!(
            err.contains("no-such-fs") && err.contains("/nowhere/a"),
            "{err}"
        );
    }
}

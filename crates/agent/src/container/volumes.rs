//! A container's volumes in the guest (docs/guest.md): content volumes are written into
//! a directory of the container's own, a pod's emptyDirs are tmpfs mounts shared by the
//! containers that name them, and each is bound into the container's root at its
//! destination, resolved inside that root (a symlink in the image cannot send a mount
//! out of it).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use gpucell_protocol::{Volume, VolumeEntry, VolumeNode, VolumeSource};
use nix::mount::{mount, MsFlags};

use super::ContainerError;
use crate::rootpath;

/// Where the pod's emptyDirs are mounted, one tmpfs each, named after the volume.
pub const EMPTY_DIR_BASE: &str = "/mnt/empty-dir";

/// A bind the container's child makes before it enters its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    /// The guest path bound.
    pub source: PathBuf,
    /// Absolute path inside the container.
    pub destination: String,
    pub read_only: bool,
    /// The source is a file (the mount point is made a file).
    pub file: bool,
}

fn fail(what: impl std::fmt::Display) -> ContainerError {
    ContainerError::Volume(what.to_string())
}

/// Writes the content volumes of `volumes` under `own` (removed first: the container's
/// own directory), makes the emptyDirs under `shared` (a tmpfs of at most `empty_dir_bytes`
/// each, kernel default when `None`) and returns the binds to make in the container.
pub fn stage(
    volumes: &[Volume],
    own: &Path,
    shared: &Path,
    empty_dir_bytes: Option<u64>,
) -> Result<Vec<VolumeMount>, ContainerError> {
    if let Some(problem) = gpucell_protocol::volumes_problem(volumes) {
        return Err(fail(problem));
    }
    if volumes.is_empty() {
        return Ok(Vec::new());
    }
    let _ = fs::remove_dir_all(own);
    fs::create_dir_all(own).map_err(|e| fail(format!("creating {}: {e}", own.display())))?;
    let mut out = Vec::new();
    for (i, v) in volumes.iter().enumerate() {
        let here = own.join(i.to_string());
        let (source, read_only, file) = match &v.source {
            VolumeSource::Content { name, entries } => {
                let file = write_content(&here, entries)
                    .map_err(|e| fail(format!("writing volume {name} at {}: {e}", v.target())))?;
                (here, true, file)
            }
            VolumeSource::EmptyDir { name } => {
                (empty_dir(shared, name, empty_dir_bytes)?, false, false)
            }
            VolumeSource::ScratchFile => {
                fs::File::create(&here)
                    .map_err(|e| fail(format!("creating {}: {e}", here.display())))?;
                fs::set_permissions(&here, fs::Permissions::from_mode(0o666))
                    .map_err(|e| fail(format!("{}: {e}", here.display())))?;
                (here, false, true)
            }
        };
        out.push(VolumeMount {
            source,
            destination: v.target().to_owned(),
            read_only,
            file,
        });
    }
    Ok(out)
}

/// The emptyDir `name` under `shared`: mounted (a tmpfs) by the first container that
/// names it, the same directory for the others.
fn empty_dir(shared: &Path, name: &str, bytes: Option<u64>) -> Result<PathBuf, ContainerError> {
    let dir = shared.join(name);
    if dir.is_dir() {
        return Ok(dir);
    }
    fs::create_dir_all(&dir).map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
    let opts = match bytes {
        Some(b) => format!("mode=0777,size={b}"),
        None => "mode=0777".into(),
    };
    mount(
        Some("tmpfs"),
        &dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(|source| {
        let _ = fs::remove_dir(&dir);
        ContainerError::Mount {
            what: format!("the emptyDir {name}"),
            target: dir.display().to_string(),
            source,
        }
    })?;
    Ok(dir)
}

/// Writes `entries` at `at` (a new directory, or a file when the volume is one file);
/// returns whether it is a file. Entries are checked already: plain relative paths and
/// links that go down. Each entry's parents must be directories written here, never a
/// link, so nothing is written outside `at`.
fn write_content(at: &Path, entries: &[VolumeEntry]) -> std::io::Result<bool> {
    if let [VolumeEntry {
        path,
        node: VolumeNode::File { mode, data },
    }] = entries
    {
        if path.is_empty() {
            write_file(at, *mode, data)?;
            return Ok(true);
        }
    }
    fs::create_dir(at)?;
    fs::set_permissions(at, fs::Permissions::from_mode(0o755))?;
    for e in entries {
        let target = at.join(&e.path);
        if let Some(parent) = target.parent() {
            if !fs::symlink_metadata(parent)?.is_dir() {
                return Err(std::io::Error::other(format!(
                    "the parent of {} is not a directory of the volume",
                    e.path
                )));
            }
        }
        match &e.node {
            VolumeNode::Dir { mode } => {
                fs::create_dir(&target)?;
                fs::set_permissions(&target, fs::Permissions::from_mode(mode & 0o777))?;
            }
            VolumeNode::File { mode, data } => write_file(&target, *mode, data)?,
            VolumeNode::Symlink { target: to } => symlink(to, &target)?,
        }
    }
    Ok(false)
}

fn write_file(path: &Path, mode: u32, data: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o777)
        .open(path)?;
    f.write_all(data)?;
    // The umask may have taken bits away.
    f.set_permissions(fs::Permissions::from_mode(mode & 0o777))
}

/// In the container's child, before it enters `root`: binds `v` at its destination
/// resolved inside `root`, read-only when it says so.
pub fn bind(root: &Path, v: &VolumeMount) -> Result<(), String> {
    let target = mount_point(root, v)?;
    let m = |flags: MsFlags| {
        mount(Some(&v.source), &target, None::<&str>, flags, None::<&str>)
            .map_err(|e| format!("binding the volume at {}: {e}", v.destination))
    };
    m(MsFlags::MS_BIND)?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if v.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    m(flags)
}

/// The mount point of `v` under `root`, made (a file for a file volume): its
/// destination resolved as the container would see it, symlinks kept inside `root`.
fn mount_point(root: &Path, v: &VolumeMount) -> Result<PathBuf, String> {
    let target = rootpath::resolve(root, "/", &v.destination)
        .map_err(|e| format!("the volume at {}: {e}", v.destination))?;
    let made = if v.file {
        target
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| {
                fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&target)
                    .map(drop)
            })
    } else {
        fs::create_dir_all(&target)
    };
    made.map_err(|e| {
        format!(
            "making the mount point of the volume at {}: {e}",
            v.destination
        )
    })?;
    Ok(target)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(path: &str, node: VolumeNode) -> VolumeEntry {
        VolumeEntry {
            path: path.into(),
            node,
        }
    }

    #[test]
    fn content_is_written_with_the_kubelet_layout_and_a_scratch_file_made() {
        let dir = tempfile::tempdir().unwrap();
        let own = dir.path().join("own");
        let vols = vec![
            Volume {
                destination: "/etc/cfg".into(),
                source: VolumeSource::Content {
                    name: "cfg".into(),
                    entries: vec![
                        entry("..ts", VolumeNode::Dir { mode: 0o755 }),
                        entry(
                            "..ts/key",
                            VolumeNode::File {
                                mode: 0o600,
                                data: b"v".to_vec(),
                            },
                        ),
                        entry(
                            "..data",
                            VolumeNode::Symlink {
                                target: "..ts".into(),
                            },
                        ),
                        entry(
                            "key",
                            VolumeNode::Symlink {
                                target: "..data/key".into(),
                            },
                        ),
                    ],
                },
            },
            Volume {
                destination: "/one".into(),
                source: VolumeSource::Content {
                    name: "one".into(),
                    entries: vec![entry(
                        "",
                        VolumeNode::File {
                            mode: 0o644,
                            data: b"1".to_vec(),
                        },
                    )],
                },
            },
            Volume {
                destination: "/dev/termination-log".into(),
                source: VolumeSource::ScratchFile,
            },
        ];
        let m = stage(&vols, &own, &dir.path().join("shared"), None).unwrap();
        assert_eq!(fs::read_to_string(own.join("0/key")).unwrap(), "v");
        assert_eq!(
            fs::read_link(own.join("0/..data")).unwrap(),
            Path::new("..ts")
        );
        let mode = fs::metadata(own.join("0/..ts/key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(fs::read_to_string(own.join("1")).unwrap(), "1");
        assert_eq!(fs::read(own.join("2")).unwrap(), b"");
        assert_eq!(
            m.iter().map(|m| (m.read_only, m.file)).collect::<Vec<_>>(),
            [(true, false), (true, true), (false, true)]
        );
        assert_eq!(m[0].destination, "/etc/cfg");
    }

    #[test]
    fn a_hostile_list_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let own = dir.path().join("own");
        let bad = |entries: Vec<VolumeEntry>| {
            vec![Volume {
                destination: "/c".into(),
                source: VolumeSource::Content {
                    name: "c".into(),
                    entries,
                },
            }]
        };
        let out = bad(vec![entry(
            "l",
            VolumeNode::Symlink {
                target: "/etc".into(),
            },
        )]);
        let err = stage(&out, &own, dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("does not stay inside"), "{err}");
        assert!(!own.exists());
        // A file written through a link of the volume (`l` -> `d`, then `l/f`).
        let through = bad(vec![
            entry("d", VolumeNode::Dir { mode: 0o755 }),
            entry("l", VolumeNode::Symlink { target: "d".into() }),
            entry(
                "l/f",
                VolumeNode::File {
                    mode: 0o644,
                    data: vec![],
                },
            ),
        ]);
        let err = stage(&through, &own, dir.path(), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a directory of the volume"), "{err}");
    }

    #[test]
    fn an_images_symlinks_keep_mount_points_inside_its_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        // The image points /etc/cfg and /run at the guest's own directories.
        symlink(&outside, root.join("etc/cfg")).unwrap();
        symlink("../../..", root.join("run")).unwrap();
        let v = |dest: &str, file: bool| VolumeMount {
            source: PathBuf::from("/unused"),
            destination: dest.into(),
            read_only: true,
            file,
        };
        let p = mount_point(&root, &v("/etc/cfg/game", false)).unwrap();
        assert!(p.starts_with(&root) && p.is_dir(), "{}", p.display());
        let p = mount_point(&root, &v("/run/secrets/token", true)).unwrap();
        assert_eq!(p, root.join("secrets/token"));
        assert!(p.is_file());
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }
}

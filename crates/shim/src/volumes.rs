//! The OCI spec's bind mounts, sorted by what they are. The VM gets no host path: the
//! kubelet's read-only volumes (ConfigMap, Secret, projected, downward API) travel by
//! content, an `emptyDir` becomes a directory the agent makes in the guest, the kubelet's
//! `/dev/termination-log` an empty file there; any other host path is refused. The CRI's
//! `/etc` files are [`crate::bundle`]'s; mounts that are not binds (proc, sysfs, tmpfs,
//! devpts, mqueue, cgroup) are the agent's own business, as is `/dev/shm`.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use gpucell_protocol::{
    Volume, VolumeEntry, VolumeNode, VolumeSource, MAX_CONTAINER_VOLUME_BYTES, MAX_VOLUME_BYTES,
    MAX_VOLUME_ENTRIES, MAX_VOLUME_FILE,
};
use oci_spec::runtime::{Mount, Spec};

/// The kubelet's plugins whose volumes are read-only files it writes (`kubernetes.io~NAME`).
pub const CONTENT_PLUGINS: [&str; 4] = ["configmap", "secret", "projected", "downward-api"];
/// The kubelet's plugin of pod-shared scratch directories.
pub const EMPTY_DIR_PLUGIN: &str = "empty-dir";
/// The kubelet's per-container file whose contents it would read after an exit.
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// Destinations the agent fills itself, whatever the spec binds there.
const AGENT_OWNED: [&str; 4] = [
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/hostname",
    "/dev/shm",
];

/// A bind mount gpucell will not or cannot give the VM.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("the OCI spec's bind mount of {} on {}: {problem}", source_path.display(), destination.display())]
    Mount {
        destination: PathBuf,
        source_path: PathBuf,
        problem: String,
    },
    #[error("the OCI spec's volumes: {0}")]
    Volumes(String),
}

/// What a bind mount's source is, by the kubelet's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `.../volumes/kubernetes.io~<plugin>/<name>` (or a path below it) of a content plugin.
    Content { name: String },
    /// `.../volumes/kubernetes.io~empty-dir/<name>`.
    EmptyDir { name: String },
    /// Another host path; the reason it is refused.
    Refused(String),
}

const VOLUMES: &str = "/volumes/kubernetes.io~";
const SUBPATHS: &str = "/volume-subpaths/";

/// The plugin of the kubelet's volume `vol` of the pod whose directory is `pod`.
fn plugin_of(pod: &str, vol: &str) -> Option<String> {
    let dirs = fs::read_dir(Path::new(pod).join("volumes")).ok()?;
    dirs.flatten()
        .filter(|d| d.path().join(vol).exists())
        .find_map(|d| {
            d.file_name()
                .to_str()?
                .strip_prefix("kubernetes.io~")
                .map(str::to_owned)
        })
}

/// Sorts a bind mount's host path: a kubelet volume (`.../pods/<uid>/volumes/
/// kubernetes.io~<plugin>/<name>`), a kubelet `subPath` of one (`.../pods/<uid>/
/// volume-subpaths/<name>/...`, whose plugin is looked up beside it) or anything else.
pub fn classify(source: &str) -> Kind {
    let (plugin, name, below) = if let Some((_, rest)) = source.split_once(VOLUMES) {
        let mut parts = rest.splitn(3, '/');
        let plugin = parts.next().unwrap_or_default().to_owned();
        let name = parts.next().unwrap_or_default().to_owned();
        let below = parts.next().is_some_and(|b| !b.is_empty());
        (plugin, name, below)
    } else if let Some((pod, rest)) = source.split_once(SUBPATHS) {
        let name = rest.split('/').next().unwrap_or_default().to_owned();
        match plugin_of(pod, &name) {
            Some(plugin) => (plugin, name, true),
            None => {
                return Kind::Refused(format!(
                    "a subPath of the kubelet's volume {name:?}, whose kind is not found under {pod}/volumes"
                ))
            }
        }
    } else {
        return Kind::Refused(
            "host paths do not reach the VM (its tenant gets no host directory); \
             use a ConfigMap, Secret, projected, downward-API or emptyDir volume"
                .into(),
        );
    };
    if name.is_empty() {
        return Kind::Refused("the kubelet volume path names no volume".into());
    }
    if CONTENT_PLUGINS.contains(&plugin.as_str()) {
        Kind::Content { name }
    } else if plugin == EMPTY_DIR_PLUGIN && !below {
        Kind::EmptyDir { name }
    } else if plugin == EMPTY_DIR_PLUGIN {
        Kind::Refused(format!(
            "a subPath of the emptyDir {name:?} is not supported; mount the whole emptyDir"
        ))
    } else {
        Kind::Refused(format!(
            "kubernetes.io~{plugin} volumes do not reach the VM (only configmap, secret, \
             projected, downward-api and empty-dir do)"
        ))
    }
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

/// The volumes of the spec's bind mounts, content read now (a snapshot), or the first
/// bind mount that cannot be given to the VM.
pub fn from_spec(spec: &Spec) -> Result<Vec<Volume>, MountError> {
    let mut out = Vec::new();
    let mut budget = Budget::default();
    for m in spec.mounts().iter().flatten().filter(|m| is_bind(m)) {
        let dest = m.destination();
        let dest_str = dest.to_string_lossy();
        let dest_str = dest_str.trim_end_matches('/');
        if AGENT_OWNED.contains(&dest_str) {
            continue;
        }
        let source = m.source().clone().unwrap_or_default();
        let fail = |problem: String| MountError::Mount {
            destination: dest.clone(),
            source_path: source.clone(),
            problem,
        };
        if let Some(problem) = gpucell_protocol::destination_problem(&dest.to_string_lossy()) {
            return Err(fail(problem));
        }
        let volume = if dest_str == TERMINATION_LOG {
            VolumeSource::ScratchFile
        } else {
            match classify(&source.to_string_lossy()) {
                Kind::Content { name } => {
                    let entries = walk(&source, &name, &mut budget).map_err(fail)?;
                    VolumeSource::Content { name, entries }
                }
                Kind::EmptyDir { name } => VolumeSource::EmptyDir { name },
                Kind::Refused(why) => return Err(fail(why)),
            }
        };
        out.retain(|v: &Volume| v.target() != dest_str);
        out.push(Volume {
            destination: dest.to_string_lossy().into_owned(),
            source: volume,
        });
    }
    if let Some(problem) = gpucell_protocol::volumes_problem(&out) {
        return Err(MountError::Volumes(problem));
    }
    Ok(out)
}

/// What the content volumes read so far have used of the container's limits.
#[derive(Default)]
pub struct Budget {
    bytes: u64,
    entries: usize,
}

/// The entries of content volume `name` at `root` (a directory, or one file), parents
/// first: regular files, directories and symlinks that only go down; anything else, and
/// any limit passed, is an error naming the file or the limit.
pub fn walk(root: &Path, name: &str, budget: &mut Budget) -> Result<Vec<VolumeEntry>, String> {
    let md = fs::metadata(root).map_err(|e| format!("volume {name}: {e}"))?;
    let mut w = Walk {
        name,
        budget,
        bytes: 0,
        out: Vec::new(),
    };
    if md.is_file() {
        let data = w.read(root, "")?;
        w.out.push(VolumeEntry {
            path: String::new(),
            node: VolumeNode::File {
                mode: md.permissions().mode() & 0o777,
                data,
            },
        });
    } else if md.is_dir() {
        w.dir(root, "")?;
    } else {
        return Err(format!("volume {name}: not a file or directory"));
    }
    Ok(w.out)
}

struct Walk<'a> {
    name: &'a str,
    budget: &'a mut Budget,
    bytes: u64,
    out: Vec<VolumeEntry>,
}

impl Walk<'_> {
    fn dir(&mut self, dir: &Path, rel: &str) -> Result<(), String> {
        let name = self.name;
        let mut entries: Vec<_> = fs::read_dir(dir)
            .and_then(|d| d.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("volume {name}: reading {}: {e}", dir.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let file_name = e.file_name();
            let Some(file_name) = file_name.to_str() else {
                return Err(format!(
                    "volume {name}: {} is not a UTF-8 name",
                    e.path().display()
                ));
            };
            let path = if rel.is_empty() {
                file_name.to_owned()
            } else {
                format!("{rel}/{file_name}")
            };
            self.budget.entries += 1;
            if self.budget.entries > MAX_VOLUME_ENTRIES {
                return Err(format!(
                    "volume {name}: the container's volumes have over {MAX_VOLUME_ENTRIES} entries, the most"
                ));
            }
            let md = fs::symlink_metadata(e.path())
                .map_err(|err| format!("volume {name}: {}: {err}", e.path().display()))?;
            let mode = md.permissions().mode() & 0o777;
            let ft = md.file_type();
            let node = if ft.is_symlink() {
                let target = fs::read_link(e.path())
                    .map_err(|err| format!("volume {name}: {}: {err}", e.path().display()))?;
                let target = target.to_string_lossy().into_owned();
                if !gpucell_protocol::is_plain_relative(&target) {
                    return Err(format!(
                        "volume {name}: the symlink {} points to {target:?}, out of the volume \
                         (only relative links that go down are copied)",
                        e.path().display()
                    ));
                }
                VolumeNode::Symlink { target }
            } else if ft.is_dir() {
                self.out.push(VolumeEntry {
                    path: path.clone(),
                    node: VolumeNode::Dir { mode },
                });
                self.dir(&e.path(), &path)?;
                continue;
            } else if ft.is_file() {
                let data = self.read(&e.path(), &path)?;
                VolumeNode::File { mode, data }
            } else {
                let what = if ft.is_fifo() {
                    "a fifo"
                } else if ft.is_socket() {
                    "a socket"
                } else {
                    "a device"
                };
                return Err(format!(
                    "volume {name}: {} is {what}; only files, directories and symlinks are copied",
                    e.path().display()
                ));
            };
            self.out.push(VolumeEntry { path, node });
        }
        Ok(())
    }

    /// The contents of regular file `file`, within the limits.
    fn read(&mut self, file: &Path, rel: &str) -> Result<Vec<u8>, String> {
        let name = self.name;
        let mut data = Vec::new();
        fs::File::open(file)
            .and_then(|f| f.take(MAX_VOLUME_FILE + 1).read_to_end(&mut data))
            .map_err(|e| format!("volume {name}: {}: {e}", file.display()))?;
        let len = data.len() as u64;
        if len > MAX_VOLUME_FILE {
            return Err(format!(
                "volume {name}: file {rel} is over {MAX_VOLUME_FILE} bytes, the most for one file"
            ));
        }
        self.bytes += len;
        self.budget.bytes += len;
        if self.bytes > MAX_VOLUME_BYTES {
            return Err(format!(
                "volume {name}: its files are over {MAX_VOLUME_BYTES} bytes, the most for one volume"
            ));
        }
        if self.budget.bytes > MAX_CONTAINER_VOLUME_BYTES {
            return Err(format!(
                "volume {name}: the container's volumes are over {MAX_CONTAINER_VOLUME_BYTES} bytes, the most"
            ));
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A volume as the kubelet's atomic writer lays it out: the files in a timestamped
    /// directory, `..data` linked to it, each key linked into `..data`.
    fn kubelet_volume(base: &Path, plugin: &str, name: &str) -> PathBuf {
        let vol = base
            .join("pods/uid-1/volumes")
            .join(format!("kubernetes.io~{plugin}"))
            .join(name);
        let ts = vol.join("..2026_12_03_11_00_00.1");
        fs::create_dir_all(ts.join("sub")).unwrap();
        fs::write(ts.join("game.conf"), "lives=3\n").unwrap();
        fs::write(ts.join("sub/deep"), "d").unwrap();
        symlink("..2026_12_03_11_00_00.1", vol.join("..data")).unwrap();
        symlink("..data/game.conf", vol.join("game.conf")).unwrap();
        symlink("..data/sub", vol.join("sub")).unwrap();
        vol
    }

    #[test]
    fn kubelet_paths_are_sorted_by_plugin() {
        let k = |s: &str| classify(s);
        let pods = "/var/lib/kubelet/pods/u1/volumes";
        for plugin in CONTENT_PLUGINS {
            assert_eq!(
                k(&format!("{pods}/kubernetes.io~{plugin}/cfg")),
                Kind::Content { name: "cfg".into() }
            );
        }
        assert_eq!(
            k(&format!("{pods}/kubernetes.io~configmap/cfg/game.conf")),
            Kind::Content { name: "cfg".into() }
        );
        assert_eq!(
            k(&format!("{pods}/kubernetes.io~empty-dir/cache")),
            Kind::EmptyDir {
                name: "cache".into()
            }
        );
        for (src, want) in [
            ("/srv/data", "host paths do not reach the VM"),
            (
                &format!("{pods}/kubernetes.io~nfs/n") as &str,
                "kubernetes.io~nfs",
            ),
            (
                &format!("{pods}/kubernetes.io~empty-dir/c/x"),
                "subPath of the emptyDir",
            ),
            (
                &format!("{pods}/kubernetes.io~configmap/"),
                "names no volume",
            ),
        ] {
            match k(src) {
                Kind::Refused(why) => assert!(why.contains(want), "{src}: {why}"),
                other => panic!("{src}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_subpath_takes_its_volumes_plugin() {
        let dir = tempfile::tempdir().unwrap();
        kubelet_volume(dir.path(), "configmap", "cfg");
        let pod = dir.path().join("pods/uid-1");
        let sub = pod.join("volume-subpaths/cfg/app/0");
        fs::create_dir_all(sub.parent().unwrap()).unwrap();
        fs::write(&sub, "one file").unwrap();
        assert_eq!(
            classify(sub.to_str().unwrap()),
            Kind::Content { name: "cfg".into() }
        );
        let entries = walk(&sub, "cfg", &mut Budget::default()).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].path, "");
        let other = pod.join("volume-subpaths/nope/app/0");
        assert!(matches!(
            classify(other.to_str().unwrap()),
            Kind::Refused(_)
        ));
    }

    #[test]
    fn the_walk_keeps_the_kubelet_layout() {
        let dir = tempfile::tempdir().unwrap();
        let vol = kubelet_volume(dir.path(), "configmap", "cfg");
        let entries = walk(&vol, "cfg", &mut Budget::default()).unwrap();
        let paths: Vec<_> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "..2026_12_03_11_00_00.1",
                "..2026_12_03_11_00_00.1/game.conf",
                "..2026_12_03_11_00_00.1/sub",
                "..2026_12_03_11_00_00.1/sub/deep",
                "..data",
                "game.conf",
                "sub"
            ]
        );
        assert_eq!(
            entries[5].node,
            VolumeNode::Symlink {
                target: "..data/game.conf".into()
            }
        );
        assert!(matches!(&entries[1].node, VolumeNode::File { data, .. } if data == b"lives=3\n"));
    }

    #[test]
    fn links_out_odd_files_and_limits_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let vol = kubelet_volume(dir.path(), "secret", "tok");
        symlink("/etc/shadow", vol.join("evil")).unwrap();
        let err = walk(&vol, "tok", &mut Budget::default()).unwrap_err();
        assert!(
            err.contains("evil") && err.contains("out of the volume"),
            "{err}"
        );
        fs::remove_file(vol.join("evil")).unwrap();
        symlink("..data/../../x", vol.join("up")).unwrap();
        let err = walk(&vol, "tok", &mut Budget::default()).unwrap_err();
        assert!(err.contains("up"), "{err}");
        fs::remove_file(vol.join("up")).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(vol.join("pipe"))
            .status()
            .unwrap();
        assert!(made.success());
        let err = walk(&vol, "tok", &mut Budget::default()).unwrap_err();
        assert!(err.contains("pipe") && err.contains("fifo"), "{err}");
        fs::remove_file(vol.join("pipe")).unwrap();
        let big = vol.join("big");
        fs::write(&big, vec![0u8; MAX_VOLUME_FILE as usize + 1]).unwrap();
        let err = walk(&vol, "tok", &mut Budget::default()).unwrap_err();
        assert!(
            err.contains("tok") && err.contains("most for one file"),
            "{err}"
        );
        fs::remove_file(&big).unwrap();
        for i in 0..5 {
            fs::write(
                vol.join(format!("f{i}")),
                vec![0u8; MAX_VOLUME_FILE as usize],
            )
            .unwrap();
        }
        let err = walk(&vol, "tok", &mut Budget::default()).unwrap_err();
        assert!(err.contains("most for one volume"), "{err}");
        // The container's limits span its volumes.
        let mut budget = Budget {
            bytes: MAX_CONTAINER_VOLUME_BYTES,
            entries: 0,
        };
        let small = kubelet_volume(dir.path(), "projected", "p");
        let err = walk(&small, "p", &mut budget).unwrap_err();
        assert!(err.contains("container's volumes are over"), "{err}");
        let mut budget = Budget {
            bytes: 0,
            entries: MAX_VOLUME_ENTRIES,
        };
        let err = walk(&small, "p", &mut budget).unwrap_err();
        assert!(err.contains("entries"), "{err}");
    }

    fn spec_with(mounts: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.1.0","process":{{"args":["true"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
                "root":{{"path":"rootfs"}},"mounts":[{mounts}]}}"#
        ))
        .unwrap()
    }

    fn bind(dest: &str, src: &Path) -> String {
        format!(
            r#"{{"destination":"{dest}","type":"bind","source":"{}","options":["rbind","ro"]}}"#,
            src.display()
        )
    }

    #[test]
    fn a_pods_mounts_become_volumes_and_a_host_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = kubelet_volume(dir.path(), "configmap", "cfg");
        let cache = dir
            .path()
            .join("pods/uid-1/volumes/kubernetes.io~empty-dir/cache");
        let mounts = [
            bind("/etc/cfg", &cfg),
            bind("/cache", &cache),
            bind(
                TERMINATION_LOG,
                &dir.path().join("pods/uid-1/containers/app/1"),
            ),
            bind("/etc/hosts", &dir.path().join("etc-hosts")),
            bind("/dev/shm", Path::new("/run/containerd/sandboxes/x/shm")),
            r#"{"destination":"/proc","type":"proc","source":"proc"}"#.to_string(),
            r#"{"destination":"/run","type":"tmpfs","source":"tmpfs","options":["nosuid"]}"#
                .to_string(),
        ];
        let v = from_spec(&spec_with(&mounts.join(","))).unwrap();
        let kinds: Vec<_> = v
            .iter()
            .map(|v| (v.destination.as_str(), &v.source))
            .collect();
        assert_eq!(kinds.len(), 3, "{kinds:?}");
        assert!(
            matches!(kinds[0], ("/etc/cfg", VolumeSource::Content { name, entries }) if name == "cfg" && entries.len() == 7)
        );
        assert_eq!(
            kinds[1],
            (
                "/cache",
                &VolumeSource::EmptyDir {
                    name: "cache".into()
                }
            )
        );
        assert_eq!(kinds[2], (TERMINATION_LOG, &VolumeSource::ScratchFile));
        let err = from_spec(&spec_with(&bind("data/../x", &cache)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("data/../x") && err.contains("absolute path"),
            "{err}"
        );
        let host = dir.path().join("srv");
        let err = from_spec(&spec_with(&bind("/data", &host)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/data")
                && err.contains(host.to_str().unwrap())
                && err.contains("host paths"),
            "{err}"
        );
    }
}

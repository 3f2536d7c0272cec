//! A container's volumes: what the host mounts into the container besides its image and
//! `/etc` files. The host has no paths of its own to give the guest (an untrusted tenant
//! gets no host directory): a read-only volume travels by content, a pod's shared
//! scratch directory is made empty in the guest.
//!
//! Both sides check a volume list with [`volumes_problem`]: the host before it sends a
//! run, the agent before it writes anything.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

/// Most bytes of one file of a content volume (Kubernetes caps a whole ConfigMap or
/// Secret at 1 MiB).
pub const MAX_VOLUME_FILE: u64 = 1 << 20;
/// Most bytes of the files of one content volume.
pub const MAX_VOLUME_BYTES: u64 = 4 << 20;
/// Most bytes of the files of all content volumes of one container.
pub const MAX_CONTAINER_VOLUME_BYTES: u64 = 16 << 20;
/// Most entries (files, directories, symlinks) of all content volumes of one container.
pub const MAX_VOLUME_ENTRIES: usize = 4096;
/// Most volumes of one container.
pub const MAX_VOLUMES: usize = 64;
/// Longest destination path or entry path.
pub const MAX_VOLUME_PATH: usize = 4096;
/// Most bytes of a container's volumes as JSON (file contents in base64): with the rest
/// of the run spec, they fit a `Run` frame ([`crate::MAX_RUN_PAYLOAD`]).
pub const MAX_VOLUMES_JSON: usize = 22 << 20;
/// Longest name of a pod's scratch directory (a Kubernetes volume name is a DNS label).
pub const MAX_EMPTY_DIR_NAME: usize = 63;

/// A volume mounted at `destination` (absolute, inside the container).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub destination: String,
    pub source: VolumeSource,
}

/// What a volume holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum VolumeSource {
    /// Read-only files, a snapshot taken when the container is created (a Kubernetes
    /// ConfigMap, Secret, projected or downward-API volume). `name` names the volume in
    /// errors. The entries come parents first; one entry with an empty path makes the
    /// volume a single file (a `subPath` mount).
    Content {
        name: String,
        entries: Vec<VolumeEntry>,
    },
    /// A writable directory shared by the pod's containers that name it alike, empty
    /// when the first of them starts (a Kubernetes `emptyDir`).
    EmptyDir { name: String },
    /// A writable empty file of the container's own (the kubelet's
    /// `/dev/termination-log`).
    ScratchFile,
}

/// One file, directory or symlink of a content volume, at `path` relative to the
/// volume's root (`a/b`: plain components only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeEntry {
    pub path: String,
    pub node: VolumeNode,
}

/// The kinds of entry a content volume may hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum VolumeNode {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        #[serde(with = "base64_bytes")]
        data: Vec<u8>,
    },
    /// A relative target that only goes down (plain components: no `..`, no `.`), as the
    /// kubelet's `..data` and key links are: it cannot leave the volume.
    Symlink {
        target: String,
    },
}

mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

/// True when `path` is relative and made of plain components only (no `.`, `..`, empty
/// component, NUL), e.g. `..data/key` or `a/b`.
pub fn is_plain_relative(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= MAX_VOLUME_PATH
        && !path.contains('\0')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// True for a name of a pod's scratch directory: 1 to [`MAX_EMPTY_DIR_NAME`] bytes of
/// ASCII letters, digits, `-`, `_` and `.`, not `.` or `..`.
pub fn valid_empty_dir_name(name: &str) -> bool {
    (1..=MAX_EMPTY_DIR_NAME).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn short(s: &str) -> String {
    s.chars().take(128).collect()
}

/// What is wrong with a volume's destination, if anything: it must be absolute, with
/// plain components, and not `/`.
pub fn destination_problem(d: &str) -> Option<String> {
    let rel = d.strip_prefix('/').unwrap_or("");
    (!d.starts_with('/') || !is_plain_relative(rel.trim_end_matches('/'))).then(|| {
        format!(
            "the volume destination {:?} must be an absolute path below / without `.` or `..`",
            short(d)
        )
    })
}

impl Volume {
    /// The destination without a trailing `/`.
    pub fn target(&self) -> &str {
        let t = self.destination.trim_end_matches('/');
        if t.is_empty() {
            "/"
        } else {
            t
        }
    }
}

/// Bytes and entries of the content volumes seen so far.
#[derive(Default)]
struct Totals {
    bytes: u64,
    entries: usize,
}

fn content_problem(
    dest: &str,
    name: &str,
    entries: &[VolumeEntry],
    totals: &mut Totals,
) -> Option<String> {
    let at = |what: String| Some(format!("volume {} at {}: {what}", short(name), short(dest)));
    let mut seen = HashSet::new();
    let mut bytes = 0u64;
    let single = entries.first().is_some_and(|e| e.path.is_empty());
    if single && (entries.len() != 1 || !matches!(entries[0].node, VolumeNode::File { .. })) {
        return at("a single-file volume must be one regular file".into());
    }
    for e in entries {
        totals.entries += 1;
        if totals.entries > MAX_VOLUME_ENTRIES {
            return at(format!(
                "the container's volumes have over {MAX_VOLUME_ENTRIES} entries, the most"
            ));
        }
        if !single && (!is_plain_relative(&e.path) || !seen.insert(e.path.as_str())) {
            return at(format!(
                "entry {:?} is not a plain relative path or comes twice",
                short(&e.path)
            ));
        }
        match &e.node {
            VolumeNode::File { data, .. } => {
                let len = data.len() as u64;
                if len > MAX_VOLUME_FILE {
                    return at(format!(
                        "file {} is {len} bytes, over the most for one file, {MAX_VOLUME_FILE}",
                        short(&e.path)
                    ));
                }
                bytes += len;
                totals.bytes += len;
                if bytes > MAX_VOLUME_BYTES {
                    return at(format!(
                        "its files are over {MAX_VOLUME_BYTES} bytes, the most for one volume"
                    ));
                }
                if totals.bytes > MAX_CONTAINER_VOLUME_BYTES {
                    return at(format!(
                        "the container's volumes are over {MAX_CONTAINER_VOLUME_BYTES} bytes, the most"
                    ));
                }
            }
            VolumeNode::Symlink { target } if !is_plain_relative(target) => {
                return at(format!(
                    "symlink {} points to {:?}, which does not stay inside the volume",
                    short(&e.path),
                    short(target)
                ));
            }
            _ => {}
        }
    }
    None
}

/// What is wrong with a container's volume list, if anything: destinations absolute,
/// without `..` and each once; entries and sizes within the limits above.
pub fn volumes_problem(volumes: &[Volume]) -> Option<String> {
    if volumes.len() > MAX_VOLUMES {
        return Some(format!(
            "{} volumes, over the most, {MAX_VOLUMES}",
            volumes.len()
        ));
    }
    let mut dests = HashSet::new();
    let mut totals = Totals::default();
    for v in volumes {
        if let Some(p) = destination_problem(&v.destination) {
            return Some(p);
        }
        if !dests.insert(v.target()) {
            return Some(format!("two volumes at {}", short(v.target())));
        }
        let problem = match &v.source {
            VolumeSource::Content { name, entries } => {
                content_problem(v.target(), name, entries, &mut totals)
            }
            VolumeSource::EmptyDir { name } => (!valid_empty_dir_name(name)).then(|| {
                format!(
                    "the emptyDir name {:?} at {} is not 1 to {MAX_EMPTY_DIR_NAME} letters, digits, `-`, `_` or `.`",
                    short(name),
                    short(v.target())
                )
            }),
            VolumeSource::ScratchFile => None,
        };
        if problem.is_some() {
            return problem;
        }
    }
    None
}

/// [`volumes_problem`], and the volumes' JSON within [`MAX_VOLUMES_JSON`] (the host
/// checks this before it sends them; names that JSON must escape make it larger).
pub fn volumes_wire_problem(volumes: &[Volume]) -> Option<String> {
    volumes_problem(volumes).or_else(|| {
        let size = serde_json::to_vec(volumes).map_or(usize::MAX, |v| v.len());
        (size > MAX_VOLUMES_JSON).then(|| {
            format!("the volumes take {size} bytes on the wire, over the most, {MAX_VOLUMES_JSON}")
        })
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn file(path: &str, len: usize) -> VolumeEntry {
        VolumeEntry {
            path: path.into(),
            node: VolumeNode::File {
                mode: 0o644,
                data: vec![b'x'; len],
            },
        }
    }

    fn content(dest: &str, entries: Vec<VolumeEntry>) -> Volume {
        Volume {
            destination: dest.into(),
            source: VolumeSource::Content {
                name: "cfg".into(),
                entries,
            },
        }
    }

    #[test]
    fn the_kubelet_layout_passes_and_round_trips_through_json() {
        let v = content(
            "/etc/cfg/",
            vec![
                VolumeEntry {
                    path: "..2026_12_03".into(),
                    node: VolumeNode::Dir { mode: 0o755 },
                },
                file("..2026_12_03/key", 3),
                VolumeEntry {
                    path: "..data".into(),
                    node: VolumeNode::Symlink {
                        target: "..2026_12_03".into(),
                    },
                },
                VolumeEntry {
                    path: "key".into(),
                    node: VolumeNode::Symlink {
                        target: "..data/key".into(),
                    },
                },
            ],
        );
        let all = vec![
            v.clone(),
            Volume {
                destination: "/cache".into(),
                source: VolumeSource::EmptyDir {
                    name: "cache".into(),
                },
            },
            Volume {
                destination: "/dev/termination-log".into(),
                source: VolumeSource::ScratchFile,
            },
        ];
        assert_eq!(volumes_wire_problem(&all), None);
        assert_eq!(v.target(), "/etc/cfg");
        let json = serde_json::to_string(&all).unwrap();
        assert!(json.contains(r#""data":"eHh4""#), "{json}");
        assert_eq!(serde_json::from_str::<Vec<Volume>>(&json).unwrap(), all);
    }

    #[test]
    fn bad_destinations_links_and_sizes_are_named() {
        let check = |v: Vec<Volume>, want: &str| {
            let p = volumes_problem(&v).unwrap();
            assert!(p.contains(want), "{p} (want {want})");
        };
        for dest in ["rel", "/", "/a/../b", "/a//b", "/./a"] {
            check(vec![content(dest, vec![])], "absolute path");
        }
        check(
            vec![content("/a", vec![]), content("/a/", vec![])],
            "two volumes at /a",
        );
        for target in ["/etc/shadow", "../x", "a/../../x", ""] {
            let link = VolumeEntry {
                path: "l".into(),
                node: VolumeNode::Symlink {
                    target: target.into(),
                },
            };
            check(vec![content("/c", vec![link])], "does not stay inside");
        }
        check(vec![content("/c", vec![file("../x", 1)])], "plain relative");
        check(
            vec![content("/c", vec![file("a", 1), file("a", 1)])],
            "comes twice",
        );
        check(
            vec![content(
                "/c",
                vec![file("big", (MAX_VOLUME_FILE + 1) as usize)],
            )],
            "most for one file",
        );
        let mib = MAX_VOLUME_FILE as usize;
        let many: Vec<_> = (0..5).map(|i| file(&format!("f{i}"), mib)).collect();
        check(vec![content("/c", many)], "most for one volume");
        let vols: Vec<_> = (0..5)
            .map(|i| {
                content(
                    &format!("/v{i}"),
                    (0..4).map(|j| file(&format!("f{j}"), mib)).collect(),
                )
            })
            .collect();
        check(vols, "the container's volumes are over");
        let lots: Vec<_> = (0..=MAX_VOLUME_ENTRIES)
            .map(|i| file(&format!("f{i}"), 0))
            .collect();
        check(vec![content("/c", lots)], "entries");
        check(
            vec![content("/c", vec![file("", 1), file("b", 1)])],
            "single-file",
        );
        check(
            vec![Volume {
                destination: "/s".into(),
                source: VolumeSource::EmptyDir {
                    name: "../x".into(),
                },
            }],
            "emptyDir name",
        );
    }
}

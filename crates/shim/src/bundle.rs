//! A task's bundle, as containerd prepares it: `config.json` (the OCI runtime spec) and
//! the rootfs. The spec becomes a [`RunRequest`]: the process (args, env, cwd, user),
//! the hostname, the VM's size from `linux.resources`, and the VFIO devices of
//! `linux.devices`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use gpucell_runtime::request::DEFAULT_MEMORY_MIB;
use gpucell_runtime::{AccelRequest, RunRequest};
use oci_spec::runtime::Spec;

/// The annotation containerd's CRI plugin sets to the pod sandbox's id.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// The annotation with which containerd's CRI plugin tells a pod's containers apart.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
/// The annotation that names the guest flavour of a task (default: the node's).
pub const GUEST_ANNOTATION: &str = "io.gpucell.guest";
/// The annotation that names the NVIDIA driver branch or flavour of a task.
pub const DRIVER_ANNOTATION: &str = "io.gpucell.driver";
/// The smallest VM a task gets, whatever its memory limit says: the guest kernel and
/// agent need room of their own.
pub const MIN_MEMORY_MIB: u64 = DEFAULT_MEMORY_MIB;

/// Errors reading a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("reading the OCI spec {}: is this a containerd bundle?", path.display())]
    Spec {
        path: PathBuf,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("the OCI spec {} has no process: containerd always sets one, so the bundle is damaged", path.display())]
    NoProcess { path: PathBuf },
    #[error("the OCI spec {} has an empty process.args: give the container a command", path.display())]
    NoArgs { path: PathBuf },
    #[error("the OCI spec's mount of {} from {}: {problem}", destination.display(), from.display())]
    EtcMount {
        destination: PathBuf,
        from: PathBuf,
        problem: String,
    },
    #[error(transparent)]
    Volume(#[from] crate::volumes::MountError),
}

/// What a task's OCI spec asks for, in the terms of a gpucell run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// `uid:gid`.
    pub user: String,
    pub hostname: Option<String>,
    /// From `linux.resources.memory.limit`, at least [`MIN_MEMORY_MIB`].
    pub memory_mib: u64,
    /// From `linux.resources.cpu` quota / period, rounded up; 1 without a quota.
    pub cpus: u32,
    /// The paths of `linux.devices` (the VFIO ones among them become passed devices).
    pub devices: Vec<PathBuf>,
    /// The rootfs directory named by `root.path`, made absolute against the bundle.
    pub root: PathBuf,
    pub terminal: bool,
    pub annotations: HashMap<String, String>,
    /// The path of `linux.namespaces`' network entry: the pod's network namespace
    /// (`ctr run --with-ns network:PATH`, the CRI sandbox's CNI namespace).
    pub netns: Option<PathBuf>,
    /// The files bind-mounted on `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname`
    /// (the CRI writes them for each pod): their contents go into the container.
    pub etc_files: Vec<gpucell_protocol::EtcFile>,
    /// The other bind mounts, as volumes ([`crate::volumes`]): read-only contents
    /// snapshotted now, a pod's emptyDirs, the kubelet's termination log.
    pub volumes: Vec<gpucell_protocol::Volume>,
}

/// The contents of the regular files the spec bind-mounts on the `/etc` files a run may
/// set (the VM gets no host bind mounts: their contents travel instead). Other mounts
/// are not this function's business.
fn etc_files(spec: &Spec) -> Result<Vec<gpucell_protocol::EtcFile>, BundleError> {
    use std::io::Read;
    let mut out = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let dest = m.destination();
        let Some(name) = dest
            .strip_prefix("/etc")
            .ok()
            .and_then(|n| n.to_str())
            .filter(|n| gpucell_protocol::ETC_FILE_NAMES.contains(n))
        else {
            continue;
        };
        let Some(source) = m.source().as_ref() else {
            continue;
        };
        let problem = |problem: String| BundleError::EtcMount {
            destination: dest.clone(),
            from: source.clone(),
            problem,
        };
        let mut content = String::new();
        std::fs::File::open(source)
            .and_then(|f| {
                f.take(gpucell_protocol::MAX_ETC_FILE as u64 + 1)
                    .read_to_string(&mut content)
            })
            .map_err(|e| problem(e.to_string()))?;
        let file = gpucell_protocol::EtcFile {
            name: name.to_string(),
            content,
        };
        if let Some(p) = file.problem() {
            return Err(problem(p));
        }
        out.retain(|f: &gpucell_protocol::EtcFile| f.name != file.name);
        out.push(file);
    }
    Ok(out)
}

/// The pod of the task `task_id` whose bundle is `bundle`, from its spec's annotations
/// alone (a spec the task's create will refuse still finds its pod's shim, which then
/// says why); the task's own id when the spec cannot be read.
pub fn pod_of(bundle: &Path, task_id: &str) -> String {
    Spec::load(bundle.join("config.json"))
        .ok()
        .and_then(|s| s.annotations().clone())
        .and_then(|a| a.get(SANDBOX_ID_ANNOTATION).cloned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| task_id.to_owned())
}

/// The rootfs directory of the bundle's spec (`root.path` against the bundle), from
/// the spec alone: nothing else is read (a volume's source may be gone by then).
pub fn root_of(bundle: &Path) -> Option<PathBuf> {
    let spec = Spec::load(bundle.join("config.json")).ok()?;
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| PathBuf::from("rootfs"));
    Some(bundle.join(root))
}

impl TaskSpec {
    /// Reads `<bundle>/config.json`.
    pub fn load(bundle: &Path) -> Result<TaskSpec, BundleError> {
        let path = bundle.join("config.json");
        let spec = Spec::load(&path).map_err(|source| BundleError::Spec {
            path: path.clone(),
            source,
        })?;
        Self::from_spec(&spec, bundle, &path)
    }

    /// The task spec of `spec`, whose rootfs is relative to `bundle`; `path` names the
    /// spec in errors.
    pub fn from_spec(spec: &Spec, bundle: &Path, path: &Path) -> Result<TaskSpec, BundleError> {
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| BundleError::NoProcess {
                path: path.to_path_buf(),
            })?;
        let args = process.args().clone().unwrap_or_default();
        if args.first().is_none_or(|a| a.is_empty()) {
            return Err(BundleError::NoArgs {
                path: path.to_path_buf(),
            });
        }
        let user = process.user();
        let linux = spec.linux().as_ref();
        let resources = linux.and_then(|l| l.resources().as_ref());
        let memory_mib = resources
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit())
            .filter(|l| *l > 0)
            .map(|l| (l as u64).div_ceil(1 << 20).max(MIN_MEMORY_MIB))
            .unwrap_or(DEFAULT_MEMORY_MIB);
        let cpus = resources
            .and_then(|r| r.cpu().as_ref())
            .and_then(|c| match (c.quota(), c.period()) {
                (Some(q), Some(p)) if q > 0 && p > 0 => Some((q as u64).div_ceil(p)),
                _ => None,
            })
            .map(|n| n.clamp(1, u64::from(gpucell_runtime::request::MAX_CPUS)) as u32)
            .unwrap_or(1);
        let devices = linux
            .and_then(|l| l.devices().as_ref())
            .map(|d| d.iter().map(|d| d.path().clone()).collect())
            .unwrap_or_default();
        let netns = linux
            .and_then(|l| l.namespaces().as_ref())
            .and_then(|n| {
                n.iter()
                    .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
            })
            .and_then(|n| n.path().clone())
            .filter(|p| !p.as_os_str().is_empty());
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        Ok(TaskSpec {
            args,
            env: process.env().clone().unwrap_or_default(),
            cwd: process.cwd().to_string_lossy().into_owned(),
            user: format!("{}:{}", user.uid(), user.gid()),
            hostname: spec.hostname().clone().filter(|h| !h.is_empty()),
            memory_mib,
            cpus,
            devices,
            root: bundle.join(root),
            terminal: process.terminal().unwrap_or(false),
            annotations: spec.annotations().clone().unwrap_or_default(),
            netns,
            etc_files: etc_files(spec)?,
            volumes: crate::volumes::from_spec(spec)?,
        })
    }

    /// The pod this task belongs to: the CRI sandbox id, else the task's own id (a plain
    /// `ctr run` is a pod of one).
    pub fn pod_id<'a>(&'a self, task_id: &'a str) -> &'a str {
        self.annotations
            .get(SANDBOX_ID_ANNOTATION)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or(task_id)
    }

    /// True for a CRI pod's sandbox (pause) container.
    pub fn is_pod_sandbox(&self) -> bool {
        self.annotations
            .get(CONTAINER_TYPE_ANNOTATION)
            .is_some_and(|t| t == "sandbox")
    }

    /// A CRI pod's network namespace reaches its application containers through its
    /// sandbox container: the sandbox's spec names the CNI namespace, while an
    /// application container's names `/proc/<sandbox pid>/ns/net`, the shim's own (the
    /// sandbox "process" is the shim), which [`TaskSpec::request`] leaves out. `known`
    /// maps pod ids to their namespaces: a sandbox container records its own, an
    /// application container without one of its own takes its pod's.
    pub fn join_pod_netns(
        &self,
        task_id: &str,
        request: &mut RunRequest,
        known: &mut HashMap<String, PathBuf>,
    ) {
        let pod = self.pod_id(task_id).to_string();
        if self.is_pod_sandbox() {
            if let Some(ns) = &request.network.pod_netns {
                known.insert(pod, ns.clone());
            }
        } else if request.network.pod_netns.is_none() {
            if let Some(ns) = known.get(&pod) {
                request.network.pod_netns = Some(ns.clone());
                request.network.mode = None;
            }
        }
    }

    /// The run request of this task. `name` names the run in its report (the image field
    /// of a request from a directory); the devices are filled in by the caller.
    pub fn request(&self, name: &str, accel: AccelRequest) -> RunRequest {
        let mut r = RunRequest::new(name);
        // The OCI process is complete: no image config fills anything in.
        r.entrypoint = Some(self.args[0].clone());
        r.command = self.args[1..].to_vec();
        r.env = self.env.clone();
        r.workdir = Some(self.cwd.clone());
        r.user = Some(self.user.clone());
        r.hostname = self.hostname.clone();
        r.cpus = self.cpus;
        r.memory_mib = self.memory_mib;
        r.accel = accel;
        r.etc_files = self.etc_files.clone();
        r.volumes = self.volumes.clone();
        r.guest = self.annotations.get(GUEST_ANNOTATION).cloned();
        r.driver = self.annotations.get(DRIVER_ANNOTATION).cloned();
        // A pod's network belongs to the CRI and its CNI plugins (or to whoever gave the
        // task a network namespace): the VM is attached to that namespace, and never
        // gets gpucell's own private network beside the pod's. The shim's own namespace
        // (the node's: a CRI container names its sandbox's pid, which is the shim's) is
        // not a pod's: no network device then.
        match self
            .netns
            .as_ref()
            .filter(|p| !gpucell_net::pod::is_own_netns(p))
        {
            Some(ns) => r.network.pod_netns = Some(ns.clone()),
            None => r.network.mode = Some(gpucell_net::NetworkMode::None),
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<TaskSpec, BundleError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), json).unwrap();
        TaskSpec::load(dir.path()).map(|mut t| {
            // The tempdir goes away: keep only the relative part to compare.
            t.root = t.root.strip_prefix(dir.path()).unwrap().to_path_buf();
            t
        })
    }

    const FULL: &str = r#"{
      "ociVersion": "1.1.0",
      "process": {"args": ["/bin/sh", "-c", "echo hi"], "env": ["PATH=/bin", "A=b"],
                  "cwd": "/work", "user": {"uid": 1000, "gid": 100}, "terminal": false},
      "root": {"path": "rootfs", "readonly": true},
      "hostname": "pod-a",
      "annotations": {"io.kubernetes.cri.sandbox-id": "sb1", "io.gpucell.guest": "default"},
      "linux": {
        "resources": {"memory": {"limit": 2147483648}, "cpu": {"quota": 150000, "period": 100000}},
        "devices": [{"path": "/dev/vfio/12", "type": "c", "major": 243, "minor": 0}]
      }
    }"#;

    #[test]
    fn the_oci_process_becomes_the_request() {
        let t = spec(FULL).unwrap();
        assert_eq!(t.args, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(t.user, "1000:100");
        assert_eq!(t.memory_mib, 2048);
        assert_eq!(t.cpus, 2);
        assert_eq!(t.devices, [PathBuf::from("/dev/vfio/12")]);
        assert_eq!(t.root, PathBuf::from("rootfs"));
        assert_eq!(t.pod_id("c1"), "sb1");
        let r = t.request("containerd:default/c1", AccelRequest::Tcg);
        assert_eq!(r.entrypoint.as_deref(), Some("/bin/sh"));
        assert_eq!(r.command, ["-c", "echo hi"]);
        assert_eq!(r.env, ["PATH=/bin", "A=b"]);
        assert_eq!(r.workdir.as_deref(), Some("/work"));
        assert_eq!(r.hostname.as_deref(), Some("pod-a"));
        assert_eq!(r.guest.as_deref(), Some("default"));
        assert_eq!(r.memory_mib, 2048);
        r.validate().unwrap();
    }

    #[test]
    fn a_network_namespace_path_is_the_pods_unless_it_is_the_shims_own() {
        let with_ns = |path: &str| {
            spec(&format!(
                r#"{{"ociVersion":"1.1.0","process":{{"args":["true"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
                    "root":{{"path":"rootfs"}},"linux":{{"namespaces":[{{"type":"pid"}},{{"type":"network","path":"{path}"}}]}}}}"#
            ))
            .unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("ns");
        std::fs::write(&other, "").unwrap();
        let t = with_ns(other.to_str().unwrap());
        assert_eq!(t.netns.as_deref(), Some(other.as_path()));
        let r = t.request("c", AccelRequest::Tcg);
        assert_eq!(r.network.pod_netns.as_deref(), Some(other.as_path()));
        assert_eq!(r.network.mode, None);
        // The node's namespace (a CRI container names its sandbox's pid: the shim's).
        let own = format!("/proc/{}/ns/net", std::process::id());
        let r = with_ns(&own).request("c", AccelRequest::Tcg);
        assert_eq!(r.network.pod_netns, None);
        assert_eq!(r.network.mode, Some(gpucell_net::NetworkMode::None));
        // No namespace entry at all: no network device.
        let r = spec(FULL).unwrap().request("c", AccelRequest::Tcg);
        assert_eq!(r.network.mode, Some(gpucell_net::NetworkMode::None));
    }

    #[test]
    fn a_cri_container_joins_the_network_namespace_of_its_pods_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let cni = dir.path().join("cni-1");
        std::fs::write(&cni, "").unwrap();
        let own = format!("/proc/{}/ns/net", std::process::id());
        let task = |kind: &str, ns: &str| {
            spec(&format!(
                r#"{{"ociVersion":"1.1.0","process":{{"args":["true"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
                    "root":{{"path":"rootfs"}},
                    "annotations":{{"io.kubernetes.cri.sandbox-id":"sb1","io.kubernetes.cri.container-type":"{kind}"}},
                    "linux":{{"namespaces":[{{"type":"network","path":"{ns}"}}]}}}}"#
            ))
            .unwrap()
        };
        let mut known = HashMap::new();
        let sandbox = task("sandbox", cni.to_str().unwrap());
        let mut r = sandbox.request("sb1", AccelRequest::Tcg);
        sandbox.join_pod_netns("sb1", &mut r, &mut known);
        assert_eq!(known.get("sb1"), Some(&cni));
        let app = task("container", &own);
        let mut r = app.request("c1", AccelRequest::Tcg);
        assert_eq!(r.network.pod_netns, None);
        app.join_pod_netns("c1", &mut r, &mut known);
        assert_eq!(r.network.pod_netns.as_deref(), Some(cni.as_path()));
        assert_eq!(r.network.mode, None);
        r.validate().unwrap();
        // Another pod's container gets nothing from sb1.
        let mut other = HashMap::new();
        let mut r = app.request("c1", AccelRequest::Tcg);
        app.join_pod_netns("c1", &mut r, &mut other);
        assert_eq!(r.network.pod_netns, None);
    }

    #[test]
    fn defaults_without_resources_and_a_pod_of_one() {
        let t = spec(
            r#"{"ociVersion":"1.1.0","process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}},
                "root":{"path":"rootfs"},"linux":{"resources":{"memory":{"limit":1048576}}}}"#,
        )
        .unwrap();
        assert_eq!(t.memory_mib, MIN_MEMORY_MIB);
        assert_eq!(t.cpus, 1);
        assert_eq!(t.pod_id("c1"), "c1");
        assert!(t.devices.is_empty());
    }

    #[test]
    fn the_pods_etc_files_travel_by_content_and_mounts_that_are_not_binds_are_left() {
        let dir = tempfile::tempdir().unwrap();
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(
            &resolv,
            "search ns1.svc.cluster.local\nnameserver 10.96.0.10\n",
        )
        .unwrap();
        let big = dir.path().join("hosts");
        std::fs::write(&big, "x".repeat(gpucell_protocol::MAX_ETC_FILE + 1)).unwrap();
        let with_mounts = |mounts: &str| {
            spec(&format!(
                r#"{{"ociVersion":"1.1.0","process":{{"args":["true"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
                    "root":{{"path":"rootfs"}},"mounts":[{mounts}]}}"#
            ))
        };
        let bind = |dest: &str, src: &std::path::Path| {
            format!(
                r#"{{"destination":"{dest}","type":"bind","source":"{}","options":["rbind","ro"]}}"#,
                src.display()
            )
        };
        let t = with_mounts(
            &[
                bind("/etc/resolv.conf", &resolv),
                r#"{"destination":"/run","type":"tmpfs","source":"tmpfs"}"#.to_string(),
                r#"{"destination":"/proc","type":"proc","source":"proc"}"#.to_string(),
            ]
            .join(","),
        )
        .unwrap();
        assert_eq!(t.etc_files.len(), 1, "{:?}", t.etc_files);
        assert_eq!(t.etc_files[0].name, "resolv.conf");
        assert!(t.etc_files[0]
            .content
            .contains("search ns1.svc.cluster.local"));
        let r = t.request("c1", AccelRequest::Tcg);
        assert_eq!(r.etc_files, t.etc_files);
        let err = with_mounts(&bind("/etc/hosts", &big))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/etc/hosts") && err.contains("over the most"),
            "{err}"
        );
        let err = with_mounts(&bind("/etc/hostname", &dir.path().join("missing")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn a_refused_spec_still_names_its_pod() {
        let dir = tempfile::tempdir().unwrap();
        let spec = r#"{"ociVersion":"1.1.0","process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}},
            "root":{"path":"rootfs"},"annotations":{"io.kubernetes.cri.sandbox-id":"sb9"},
            "mounts":[{"destination":"/data","type":"bind","source":"/srv","options":["rbind"]}]}"#;
        std::fs::write(dir.path().join("config.json"), spec).unwrap();
        assert!(TaskSpec::load(dir.path()).is_err());
        assert_eq!(pod_of(dir.path(), "c1"), "sb9");
        assert_eq!(pod_of(&dir.path().join("none"), "c1"), "c1");
        assert_eq!(root_of(dir.path()), Some(dir.path().join("rootfs")));
    }

    #[test]
    fn bad_specs_are_named() {
        let err = spec(r#"{"ociVersion":"1.1.0","root":{"path":"rootfs"}}"#).unwrap_err();
        assert!(err.to_string().contains("no process"), "{err}");
        let err = spec(
            r#"{"ociVersion":"1.1.0","process":{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("process.args"), "{err}");
        let err = spec("{not json").unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}

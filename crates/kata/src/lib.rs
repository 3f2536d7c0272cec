//! Exports a gpucell guest flavour for Kata Containers users: a Kata QEMU configuration
//! (`configuration-qemu-gpucell-<flavour>.toml`) in the keys of current Kata releases
//! (checked against Kata 4.1.0's `configuration-qemu-nvidia-gpu.toml.in`), the matching
//! Kubernetes RuntimeClass and the containerd runtime entry that points at the file.
//!
//! What it sets, following the node's GPUs (read under the host root):
//! - `kernel`, `initrd`: the flavour's PVH vmlinux and init image (or others given);
//! - `cold_plug_vfio = "root-port"`, `hot_plug_vfio = "no-port"`: GPUs are cold-plugged
//!   on root ports, the only mode NVIDIA supports; `pcie_root_port`: one per GPU of the
//!   node (at least one, at most Kata's 16);
//! - `enable_mem_prealloc = true`: VFIO pins all guest memory anyway; preallocating it
//!   makes the cost visible at boot instead of at first touch;
//! - the 64-bit PCI hole: Kata has no key for it; the size gpucell would give QEMU
//!   (`pci-hole64-size`, from the BARs of the node's GPUs) is written as a comment, and
//!   the guest kernel parameters `pci=realloc pci=nocrs` let the guest place BARs that
//!   the firmware could not;
//! - the NVIDIA profile's runtime settings: `static_sandbox_resource_mgmt`, long
//!   timeouts, the kubelet's pod-resources socket for cold-plug at sandbox creation.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use gpucell_host::bar::BarKind;
use gpucell_host::gpu::GpuInventory;
use gpucell_host::HostRoot;

/// Kata's limit on root ports.
pub const MAX_ROOT_PORTS: u32 = 16;
/// Space in the 64-bit hole besides the GPUs' BARs (as gpucell's own runs reserve).
pub const HOLE64_BASE: u64 = 32 << 30;
/// QEMU's default 64-bit hole on q35.
pub const QEMU_DEFAULT_HOLE64: u64 = 32 << 30;
/// The guest kernel parameters for passed GPUs (gpucell's own runs use the same).
pub const KERNEL_PARAMS: &str = "pci=realloc pci=nocrs";
/// The kubelet's pod-resources socket (Kata reads GPU allocations from it).
pub const POD_RESOURCES_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";
/// Seconds Kata's NVIDIA profile allows for the agent and container creation (a GPU VM
/// pins all its memory before it boots).
pub const NVIDIA_TIMEOUT_S: i64 = 1200;

/// Errors exporting.
#[derive(Debug, thiserror::Error)]
pub enum KataError {
    #[error("cannot read the node's GPUs under {}", root.display())]
    Inventory {
        root: PathBuf,
        #[source]
        source: gpucell_host::gpu::GpuError,
    },
    #[error("--root-ports {0}: Kata takes 1 to {MAX_ROOT_PORTS}")]
    RootPorts(u32),
    #[error("--memory {0} MiB: give at least 256")]
    Memory(u32),
    #[error("--vcpus 0: give at least 1")]
    Vcpus,
    #[error("runtime class name `{0}` is not a DNS label (a-z 0-9 -, at most 63, starting and ending with a letter or digit)")]
    Name(String),
    #[error("{what} path {} is not absolute; Kata needs absolute paths", path.display())]
    Relative { what: &'static str, path: PathBuf },
    #[error("{what} path {} is not valid UTF-8", path.display())]
    NotUtf8 { what: &'static str, path: PathBuf },
    #[error("cannot encode the Kata configuration")]
    Encode(#[source] toml::ser::Error),
    #[error("cannot create the output directory {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The guest a configuration boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KataGuest {
    pub flavour: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// What the node's GPUs ask of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeGpus {
    pub count: u32,
    /// The 64-bit hole gpucell would give a VM holding all of them.
    pub hole64_bytes: u64,
}

impl NodeGpus {
    /// Reads the node's NVIDIA GPUs under `root`.
    pub fn read(root: &HostRoot) -> Result<Self, KataError> {
        let inv = GpuInventory::read(root).map_err(|source| KataError::Inventory {
            root: root.path().to_owned(),
            source,
        })?;
        let sizes: Vec<u64> = inv
            .gpus
            .iter()
            .map(|g| {
                g.function
                    .bars
                    .iter()
                    .flatten()
                    .filter(|b| b.kind == BarKind::Memory && b.is_64bit)
                    .fold(0u64, |acc, b| acc.saturating_add(b.size))
            })
            .collect();
        Ok(Self {
            count: u32::try_from(inv.gpus.len()).unwrap_or(u32::MAX),
            hole64_bytes: hole64(&sizes),
        })
    }
}

/// The 64-bit hole for devices whose 64-bit BARs sum to `sizes`: each rounded up to a
/// power of two (a root port's window is aligned to its largest BAR), summed, plus the
/// largest again (alignment of the first window) and 32 GiB for everything else; never
/// below QEMU's default. The rule of gpucell's own runs.
pub fn hole64(sizes: &[u64]) -> u64 {
    let rounded: Vec<u64> = sizes
        .iter()
        .filter(|s| **s > 0)
        .map(|s| s.checked_next_power_of_two().unwrap_or(1 << 63))
        .collect();
    let Some(largest) = rounded.iter().copied().max() else {
        return QEMU_DEFAULT_HOLE64;
    };
    rounded
        .iter()
        .fold(0u64, |a, s| a.saturating_add(*s))
        .saturating_add(largest)
        .saturating_add(HOLE64_BASE)
        .max(QEMU_DEFAULT_HOLE64)
}

/// Choices of the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    pub qemu_path: PathBuf,
    /// Guest memory besides the pod's limits (Kata's `default_memory`), MiB.
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Root ports; `None`: one per GPU of the node.
    pub root_ports: Option<u32>,
    /// RuntimeClass name and containerd handler; `None`: `kata-gpucell-<flavour>`.
    pub name: Option<String>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            qemu_path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            memory_mib: 8192,
            vcpus: 1,
            root_ports: None,
            name: None,
        }
    }
}

/// The exported files' contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// RuntimeClass name = containerd runtime handler.
    pub name: String,
    pub config_toml: String,
    pub runtime_class_yaml: String,
    pub root_ports: u32,
    pub hole64_bytes: u64,
}

fn utf8<'a>(what: &'static str, p: &'a Path) -> Result<&'a str, KataError> {
    if !p.is_absolute() {
        return Err(KataError::Relative {
            what,
            path: p.to_owned(),
        });
    }
    p.to_str().ok_or_else(|| KataError::NotUtf8 {
        what,
        path: p.to_owned(),
    })
}

fn check_name(name: &str) -> Result<(), KataError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first().is_some_and(|c| *c != b'-')
        && b.last().is_some_and(|c| *c != b'-');
    if ok {
        Ok(())
    } else {
        Err(KataError::Name(gpucell_host::sysfs::printable(name)))
    }
}

/// The configuration's tables: `[hypervisor.qemu]`, `[agent.kata]`, `[runtime]`.
pub fn config_tables(
    guest: &KataGuest,
    opts: &ExportOptions,
    root_ports: u32,
) -> Result<toml::Table, KataError> {
    use toml::Value::{Array, Boolean, Integer, String as S};
    let qemu = utf8("QEMU", &opts.qemu_path)?.to_owned();
    let mut hv = toml::Table::new();
    let put = |t: &mut toml::Table, k: &str, v: toml::Value| {
        t.insert(k.to_owned(), v);
    };
    put(&mut hv, "path", S(qemu.clone()));
    put(&mut hv, "valid_hypervisor_paths", Array(vec![S(qemu)]));
    put(
        &mut hv,
        "kernel",
        S(utf8("kernel", &guest.kernel)?.to_owned()),
    );
    put(
        &mut hv,
        "initrd",
        S(utf8("initrd", &guest.initrd)?.to_owned()),
    );
    put(&mut hv, "machine_type", S("q35".into()));
    put(&mut hv, "kernel_params", S(KERNEL_PARAMS.into()));
    put(&mut hv, "default_vcpus", Integer(i64::from(opts.vcpus)));
    put(
        &mut hv,
        "default_memory",
        Integer(i64::from(opts.memory_mib)),
    );
    put(&mut hv, "enable_mem_prealloc", Boolean(true));
    put(&mut hv, "disable_image_nvdimm", Boolean(true));
    put(&mut hv, "hot_plug_vfio", S("no-port".into()));
    put(&mut hv, "cold_plug_vfio", S("root-port".into()));
    put(&mut hv, "pcie_root_port", Integer(i64::from(root_ports)));
    let mut agent = toml::Table::new();
    put(&mut agent, "dial_timeout", Integer(NVIDIA_TIMEOUT_S));
    put(&mut agent, "kernel_modules", Array(Vec::new()));
    let mut runtime = toml::Table::new();
    put(&mut runtime, "static_sandbox_resource_mgmt", Boolean(true));
    put(&mut runtime, "sandbox_cgroup_only", Boolean(true));
    put(
        &mut runtime,
        "create_container_timeout",
        Integer(NVIDIA_TIMEOUT_S),
    );
    put(
        &mut runtime,
        "pod_resource_api_sock",
        S(POD_RESOURCES_SOCKET.into()),
    );
    let mut hypervisor = toml::Table::new();
    hypervisor.insert("qemu".into(), toml::Value::Table(hv));
    let mut agents = toml::Table::new();
    agents.insert("kata".into(), toml::Value::Table(agent));
    let mut doc = toml::Table::new();
    doc.insert("hypervisor".into(), toml::Value::Table(hypervisor));
    doc.insert("agent".into(), toml::Value::Table(agents));
    doc.insert("runtime".into(), toml::Value::Table(runtime));
    Ok(doc)
}

/// Builds the configuration, RuntimeClass and containerd entry for `guest` on a node
/// with `gpus`.
pub fn export(
    guest: &KataGuest,
    gpus: NodeGpus,
    opts: &ExportOptions,
) -> Result<Export, KataError> {
    if opts.memory_mib < 256 {
        return Err(KataError::Memory(opts.memory_mib));
    }
    if opts.vcpus == 0 {
        return Err(KataError::Vcpus);
    }
    let root_ports = opts
        .root_ports
        .unwrap_or(gpus.count.clamp(1, MAX_ROOT_PORTS));
    if !(1..=MAX_ROOT_PORTS).contains(&root_ports) {
        return Err(KataError::RootPorts(root_ports));
    }
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| format!("kata-gpucell-{}", guest.flavour.to_ascii_lowercase()));
    check_name(&name)?;
    let body =
        toml::to_string(&config_tables(guest, opts, root_ports)?).map_err(KataError::Encode)?;
    let mut config_toml = String::new();
    let _ = writeln!(
        config_toml,
        "# Kata Containers QEMU configuration for gpucell guest flavour `{}`,\n\
         # written by `gpucell kata export`. RuntimeClass and containerd handler: {name}.\n\
         #\n\
         # The node has {} NVIDIA GPU(s): {root_ports} root port(s) for cold-plug.\n\
         # 64-bit PCI hole that gpucell gives QEMU for all of them: {} bytes ({} GiB)\n\
         # (-global q35-pcihost.pci-hole64-size={}). Kata has no key for it; the guest\n\
         # kernel parameters below let the guest place the BARs itself.\n",
        guest.flavour,
        gpus.count,
        gpus.hole64_bytes,
        gpus.hole64_bytes >> 30,
        gpus.hole64_bytes,
    );
    config_toml.push_str(&body);
    let runtime_class_yaml = format!(
        "# RuntimeClass for gpucell guest flavour `{flavour}` under Kata Containers\n\
         # (written by `gpucell kata export`).\n\
         apiVersion: node.k8s.io/v1\n\
         kind: RuntimeClass\n\
         metadata:\n  name: {name}\n\
         handler: {name}\n\
         overhead:\n  podFixed:\n    memory: \"{mem}Mi\"\n    cpu: \"{cpu}\"\n",
        flavour = guest.flavour,
        mem = opts.memory_mib,
        cpu = opts.vcpus,
    );
    Ok(Export {
        name,
        config_toml,
        runtime_class_yaml,
        root_ports,
        hole64_bytes: gpus.hole64_bytes,
    })
}

/// File names inside the output directory.
pub fn file_names(export: &Export) -> (String, String, String) {
    (
        format!("configuration-qemu-{}.toml", export.name),
        format!("runtimeclass-{}.yaml", export.name),
        format!("containerd-{}.toml", export.name),
    )
}

/// The containerd runtime entry for `name` with its configuration at `config_path`.
pub fn containerd_entry(name: &str, config_path: &Path) -> String {
    format!(
        "# containerd runtime entry for the RuntimeClass {name} (merge into\n\
         # /etc/containerd/config.toml; config version 2, containerd 1.6 and 1.7).\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{name}]\n\
         \x20 runtime_type = \"io.containerd.kata.v2\"\n\
         \x20 privileged_without_host_devices = true\n\
         \x20 pod_annotations = [\"io.katacontainers.*\"]\n\
         \x20 [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{name}.options]\n\
         \x20   ConfigPath = \"{}\"\n",
        config_path.display()
    )
}

/// The written files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub config: PathBuf,
    pub runtime_class: PathBuf,
    pub containerd: PathBuf,
}

/// Writes the three files into `dir` (created if needed), each atomically. The containerd
/// entry names the configuration by its absolute path.
pub fn write(export: &Export, dir: &Path) -> Result<Written, KataError> {
    std::fs::create_dir_all(dir).map_err(|source| KataError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let dir = std::fs::canonicalize(dir).map_err(|source| KataError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let (c, r, d) = file_names(export);
    let written = Written {
        config: dir.join(c),
        runtime_class: dir.join(r),
        containerd: dir.join(d),
    };
    let containerd = containerd_entry(&export.name, &written.config);
    for (path, text) in [
        (&written.config, export.config_toml.as_str()),
        (&written.runtime_class, export.runtime_class_yaml.as_str()),
        (&written.containerd, containerd.as_str()),
    ] {
        gpucell_common::write_atomic(path, text.as_bytes(), 0o644).map_err(|source| {
            KataError::Write {
                path: path.clone(),
                source,
            }
        })?;
    }
    Ok(written)
}

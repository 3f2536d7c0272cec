//! What a run needs to know about the node it runs on, besides the request: where the
//! host's files are, where gpucell keeps its state, which QEMU to start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;

/// The node a run runs on. Built once by a front end from its flags and the
/// configuration file.
#[derive(Debug, Clone)]
pub struct Node {
    /// Root under which every sysfs, procfs and /etc path of the host is read.
    pub host_root: PathBuf,
    /// Images, guest artifacts, allocation records, run directories.
    pub state_dir: PathBuf,
    /// The QEMU binary, looked up in `PATH` when it is a bare name.
    pub qemu: PathBuf,
    /// Guest flavour of requests that name none.
    pub default_guest: String,
    /// Limit of the KVM probe boot (`None`: the probe's default).
    pub kvm_probe_timeout: Option<Duration>,
    /// Where processes that own devices are looked up (`/` except in tests that fake it).
    pub process_root: PathBuf,
    /// The image store's settings.
    pub store: gpucell_image::StoreOptions,
    /// Sandbox networks (`[network]` of the configuration file).
    pub network: gpucell_net::NetworkConfig,
    /// Preallocation threads and page size of preallocated guest memory (`[run]
    /// prealloc_threads`, default all host CPUs up to 8; `[run] hugepage_size`).
    pub memory: gpucell_sandbox::memory::MemoryOptions,
    /// The QEMU jail (`[jail]` of the configuration file).
    pub jail: gpucell_sandbox::jail::JailConfig,
}

impl Node {
    /// A node with the configuration file's defaults; `qemu` (a flag) wins over the file.
    pub fn new(
        host_root: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
        qemu: Option<&Path>,
        config: &Config,
    ) -> Node {
        let qemu = qemu
            .map(Path::to_path_buf)
            .or_else(|| config.run.qemu.clone())
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
        Node {
            host_root: host_root.into(),
            state_dir: state_dir.into(),
            qemu: find_in_path(&qemu),
            default_guest: config
                .run
                .guest
                .clone()
                .unwrap_or_else(|| gpucell_guest::DEFAULT_FLAVOUR.to_string()),
            kvm_probe_timeout: config.kvm_probe_timeout(),
            process_root: PathBuf::from("/"),
            store: config.image.clone(),
            network: config.network.clone(),
            memory: gpucell_sandbox::memory::MemoryOptions {
                prealloc_threads: Some(config.run.prealloc_threads.unwrap_or_else(|| {
                    gpucell_sandbox::memory::default_prealloc_threads(
                        std::thread::available_parallelism().map_or(1, usize::from),
                    )
                })),
                hugepage_size: config.run.hugepage_size.unwrap_or_default(),
            },
            jail: config.jail.clone(),
        }
    }
}

/// `bin` as is when it has a directory part, else the first match in `PATH` (or `bin`
/// unchanged, so that spawning it names what was missing).
pub fn find_in_path(bin: &Path) -> PathBuf {
    if bin.components().count() > 1 {
        return bin.to_path_buf();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(bin))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| bin.to_path_buf())
}

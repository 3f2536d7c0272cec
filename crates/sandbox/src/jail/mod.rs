//! The jailed QEMU: each QEMU runs in its own mount, pid, ipc, uts and network
//! namespaces, seeing only what its run needs ([`qemu_view`]), as a uid of its own
//! ([`uids`]), with no capability, under cgroup limits ([`cgroup`]), and with its
//! seccomp filter checked to be in force once it runs ([`status`]).
//!
//! - [`view`]: the list of host paths the jail shows, and the steps that build it;
//! - [`exec`]: the spawn (namespaces, root, privileges), as a `pre_exec` hook;
//! - [`libs`]: the libraries a binary loads (`ldd`), behind a trait;
//! - [`uids`]: per-sandbox uids from a range, in a locked registry file;
//! - [`cgroup`]: memory, cpu and pids limits on cgroup v1 or v2;
//! - [`status`]: the check of `/proc/<pid>/status` after the spawn.

pub mod cgroup;
pub mod exec;
pub mod libs;
pub mod status;
pub mod uids;
pub mod view;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::args::{Accel, Device, MemoryBackend, QemuCommand};
use cgroup::{Cgroup, CgroupFs, CgroupLimits};
use exec::{JailSpec, Prepared};
use libs::Libraries;
use status::Expected;
use uids::UidClaim;
use view::{EntryKind, View};

/// The staging directory of the jail's root, inside the run directory (empty as the
/// host sees it: the root is mounted there in the jail's own mount namespace only).
pub const STAGING_DIR: &str = ".jail-root";
/// Where QEMU's loadable modules may be (TCG is a module in Debian's build).
const MODULE_DIRS: [&str; 3] = [
    "/usr/lib/x86_64-linux-gnu/qemu",
    "/usr/lib64/qemu",
    "/usr/lib/qemu",
];
/// Firmware and option ROMs QEMU loads (SeaBIOS, `linuxboot_dma.bin`...).
const DATA_DIRS: [&str; 3] = [
    "/usr/share/qemu",
    "/usr/share/seabios",
    "/usr/lib/ipxe/qemu",
];
/// Device nodes every QEMU gets.
const BASE_DEVICES: [&str; 3] = ["/dev/null", "/dev/zero", "/dev/urandom"];
/// Tasks a QEMU may have besides one per vCPU (main loop, RCU, I/O workers; QEMU's
/// thread pool stops at 64).
const PIDS_BASE: u64 = 128;

/// `[jail]` of the configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailConfig {
    /// Jail QEMU when gpucell runs as root (the default); `false` opts out.
    pub enabled: bool,
    /// First and last uid (and gid) given to sandboxes, one each.
    pub uids: [u32; 2],
    /// The registry of claimed uids, shared by every gpucell on the host.
    pub registry: PathBuf,
    /// Where the cgroup hierarchies are mounted.
    pub cgroup_root: PathBuf,
    /// Memory QEMU may use beyond the guest's RAM, MiB (measured: BENCHMARKS.md).
    pub memory_overhead_mib: u64,
    /// Refuse to run (the default) when `cgroup_root` holds no cgroup hierarchy and
    /// the kernel's cannot be mounted in the run's own place either; `false` runs
    /// without limits and warns.
    pub require_cgroups: bool,
}

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            enabled: true,
            uids: [3_000_000, 3_065_535],
            registry: PathBuf::from("/run/gpucell/jail-uids"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            memory_overhead_mib: 512,
            require_cgroups: true,
        }
    }
}

impl JailConfig {
    /// A problem with the values: `(key, problem)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let [first, last] = self.uids;
        if first == 0 || first > last {
            return Err((
                "jail.uids",
                format!("[{first}, {last}] must be a range above 0"),
            ));
        }
        for (key, p) in [
            ("jail.registry", &self.registry),
            ("jail.cgroup_root", &self.cgroup_root),
        ] {
            if !p.is_absolute() {
                return Err((key, format!("{} must be an absolute path", p.display())));
            }
        }
        Ok(())
    }
}

/// What a run says when the jail is enabled but gpucell is not root (so QEMU runs
/// unjailed, as the caller); `None` when the jail applies or is turned off.
pub fn unjailed_warning(cfg: &JailConfig) -> Option<String> {
    (cfg.enabled && !nix::unistd::Uid::effective().is_root()).then(|| {
        "gpucell is not running as root: QEMU runs unjailed, as this user ([jail] in the configuration)".to_string()
    })
}

#[derive(Debug, thiserror::Error)]
pub enum JailSetupError {
    #[error(transparent)]
    Uid(#[from] uids::UidError),
    #[error(transparent)]
    Libs(#[from] libs::LibsError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Jail(#[from] exec::JailError),
    #[error("the jailed QEMU (uid {uid}) could not read {path:?} (mode {mode:o}); make it readable by others (the jail shows it read-only), or set [jail] enabled = false")]
    Unreadable { path: PathBuf, uid: u32, mode: u32 },
    #[error("cannot prepare {path:?} for the jail")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the jailed QEMU of one run holds: released when dropped, after QEMU is reaped.
#[derive(Debug)]
pub struct JailResources {
    // Dropped in this order: the cgroup (empty once QEMU is gone), then the uid.
    cgroup: Option<Cgroup>,
    uid: UidClaim,
    /// What the status check read once QEMU ran.
    seen: std::sync::OnceLock<status::Seen>,
}

/// The jail of a run, as its report shows it (`jail` of `gpucell run --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JailFacts {
    pub uid: u32,
    pub gid: u32,
    /// `null`: no cgroup (`[jail] require_cgroups = false` where none could be had).
    pub cgroup: Option<CgroupFacts>,
    /// What `/proc/<qemu>/status` showed once QEMU's monitor answered.
    pub status: Option<status::Seen>,
}

/// The sandbox's cgroup and the limits set on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupFacts {
    /// The hierarchy root: `[jail] cgroup_root`, or where the run mounted the kernel's
    /// hierarchies (a mount namespace that showed none).
    pub root: PathBuf,
    /// The group's directories (one per v1 hierarchy, one on v2).
    pub dirs: Vec<PathBuf>,
    pub memory_bytes: u64,
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
    pub pids_max: u64,
}

impl JailResources {
    pub fn uid(&self) -> u32 {
        self.uid.uid()
    }

    pub fn cgroup_dirs(&self) -> &[PathBuf] {
        self.cgroup.as_ref().map(|c| c.dirs()).unwrap_or_default()
    }

    /// Keeps what the status check read (the first time only).
    pub fn record_status(&self, seen: status::Seen) {
        let _ = self.seen.set(seen);
    }

    /// The facts of this jail for the run report.
    pub fn facts(&self) -> JailFacts {
        let cgroup = self.cgroup.as_ref().and_then(|c| {
            let l = c.limits()?;
            let (cpu_quota_us, cpu_period_us) = cgroup::cpu_quota(l.cpus);
            Some(CgroupFacts {
                root: c.root().to_path_buf(),
                dirs: c.dirs().to_vec(),
                memory_bytes: l.memory_bytes,
                cpu_quota_us,
                cpu_period_us,
                pids_max: l.pids,
            })
        });
        JailFacts {
            uid: self.uid(),
            gid: self.uid(),
            cgroup,
            status: self.seen.get().cloned(),
        }
    }
}

/// A jail ready to be installed on QEMU's spawn.
#[derive(Debug)]
pub struct QemuJail {
    pub prepared: Prepared,
    pub expected: Expected,
    pub resources: JailResources,
    pub view: View,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> JailSetupError + '_ {
    move |source| JailSetupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `bin` when it names a directory, else where `PATH` finds it (the jail shows it at
/// that path, and `PATH` finds it there again).
fn resolve(bin: &Path) -> PathBuf {
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

/// Everything `cmd` needs to see: QEMU, its libraries, modules and firmware, the
/// guest's kernel, initrd and disks, the run directory (writable: QEMU makes its
/// sockets there), and the device nodes the run uses.
pub fn qemu_view(
    cmd: &QemuCommand,
    run_dir: &Path,
    libs: &dyn Libraries,
) -> Result<View, JailSetupError> {
    let mut v = View::new();
    let binary = resolve(&cmd.binary);
    let mut files: std::collections::BTreeSet<PathBuf> = libs.of(&binary)?.into_iter().collect();
    files.insert(binary);
    for dir in MODULE_DIRS.iter().map(Path::new).filter(|d| d.is_dir()) {
        v.add(dir, EntryKind::Dir, false);
        let entries = std::fs::read_dir(dir).map_err(io_err(dir))?;
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with("accel-") {
                files.extend(libs.of(&e.path())?);
            }
        }
    }
    files.retain(|f| !MODULE_DIRS.iter().any(|d| f.starts_with(d)));
    for f in files {
        v.add(f, EntryKind::File, false);
    }
    for dir in DATA_DIRS.iter().map(Path::new).filter(|d| d.is_dir()) {
        v.add(dir, EntryKind::Dir, false);
    }
    if let Some(boot) = &cmd.boot {
        v.add(&boot.kernel, EntryKind::File, false);
        v.add(&boot.initrd, EntryKind::File, false);
    }
    for d in &cmd.drives {
        v.add(&d.path, EntryKind::File, !d.readonly);
    }
    v.add(run_dir, EntryKind::Dir, true);
    let mut devices: Vec<PathBuf> = BASE_DEVICES.iter().map(PathBuf::from).collect();
    if cmd.accel == Accel::Kvm {
        devices.push("/dev/kvm".into());
    }
    let mut sysfs = false;
    let mut vfio: Vec<PathBuf> = Vec::new();
    for d in &cmd.devices {
        match d {
            Device::VhostVsock { .. } => devices.push("/dev/vhost-vsock".into()),
            Device::TapNetdev { vhost: true, .. } => devices.push("/dev/vhost-net".into()),
            Device::VfioPci { host, .. } => {
                // A function with no IOMMU group (no VFIO here, a fake host) gets no
                // node: QEMU then refuses it itself, naming it.
                let link = Path::new("/sys/bus/pci/devices")
                    .join(host)
                    .join("iommu_group");
                let group = std::fs::read_link(&link).ok();
                if let Some(n) = group.as_deref().and_then(Path::file_name) {
                    vfio.push(Path::new("/dev/vfio").join(n));
                }
                sysfs = true;
            }
            Device::Memory(MemoryBackend::HugePages { mem_path, .. }) => {
                v.add(mem_path, EntryKind::Dir, true);
            }
            _ => {}
        }
    }
    if sysfs {
        // QEMU reads the passed function's sysfs (its IOMMU group link, resources).
        vfio.push("/dev/vfio/vfio".into());
        v.add("/sys", EntryKind::Dir, false);
    }
    devices.extend(vfio.into_iter().filter(|n| n.exists()));
    devices.sort();
    devices.dedup();
    for d in devices {
        v.add_device(&d).map_err(io_err(&d))?;
    }
    Ok(v)
}

/// Where a run mounts the cgroup hierarchies its mount namespace does not show:
/// `cgroup/` of the state directory (the run directory is `<state>/run/<id>`).
fn cgroup_mount_base(run_dir: &Path) -> PathBuf {
    let state = run_dir.parent().and_then(Path::parent).unwrap_or(run_dir);
    state.join("cgroup")
}

/// Checks that every read-only file and directory of `view` can be read by a uid that
/// is neither its owner nor in its group (which the sandbox's uid never is).
fn readable_by_others(view: &View, uid: u32) -> Result<(), JailSetupError> {
    for e in view.entries().iter().filter(|e| !e.writable) {
        let meta = std::fs::metadata(&e.host).map_err(io_err(&e.host))?;
        let mode = meta.permissions().mode() & 0o7777;
        let need = if meta.is_dir() { 0o005 } else { 0o004 };
        if mode & need != need {
            return Err(JailSetupError::Unreadable {
                path: e.host.clone(),
                uid,
                mode,
            });
        }
    }
    Ok(())
}

/// Claims a uid, builds the view, makes the run directory usable by that uid (group
/// owner, mode 01770: QEMU may create its sockets, but not remove or replace the
/// `owner` file, which is root's) and creates the cgroup.
pub fn prepare(
    cfg: &JailConfig,
    cmd: &QemuCommand,
    run_dir: &Path,
    id: &str,
    libs: &dyn Libraries,
    cgroups: Box<dyn CgroupFs>,
) -> Result<QemuJail, JailSetupError> {
    let [first, last] = cfg.uids;
    let claim = uids::claim(&cfg.registry, first, last, id, &uids::process_alive)?;
    let uid = claim.uid();
    let view = qemu_view(cmd, run_dir, libs)?;
    readable_by_others(&view, uid)?;
    let staging = run_dir.join(STAGING_DIR);
    match std::fs::create_dir(&staging) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(io_err(&staging)(e)),
        _ => {}
    }
    std::os::unix::fs::chown(run_dir, Some(0), Some(uid)).map_err(io_err(run_dir))?;
    std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o1770))
        .map_err(io_err(run_dir))?;
    let limits = CgroupLimits {
        memory_bytes: (cmd.resources.memory_mib + cfg.memory_overhead_mib) << 20,
        // Exactly the requested vCPUs, QEMU's own threads included (a TCG guest so
        // throttled once failed the kernel's IO-APIC timer check at boot; the guest's
        // `no_timer_check` ended that: docs/security.md, *The jail*).
        cpus: cmd.resources.cpus,
        pids: PIDS_BASE + u64::from(cmd.resources.cpus),
    };
    // A mount namespace without cgroups (`ip netns exec` remounts /sys) gets the
    // kernel's hierarchies mounted in `<state dir>/cgroup/<id>`.
    let mount_base = cgroup_mount_base(run_dir);
    let stale = claim.reclaimed();
    let made = Cgroup::create_or_mount(cgroups, &cfg.cgroup_root, &mount_base, id, limits, stale);
    let cgroup = match made {
        Ok(c) => Some(c),
        Err(e) if e.is_missing() && !cfg.require_cgroups => {
            tracing::warn!(
                "{e}; QEMU runs without memory, cpu and pids limits ([jail] require_cgroups = false)"
            );
            None
        }
        Err(e) => return Err(e.into()),
    };
    let spec = JailSpec {
        view: view.clone(),
        uid,
        gid: uid,
        new_net: true,
        hostname: "gpucell".into(),
        staging,
        cgroup_procs: cgroup
            .as_ref()
            .map(|c| c.procs_files().to_vec())
            .unwrap_or_default(),
    };
    Ok(QemuJail {
        prepared: Prepared::new(&spec)?,
        expected: Expected {
            uid,
            gid: uid,
            seccomp: cmd.seccomp.is_some(),
        },
        resources: JailResources {
            cgroup,
            uid: claim,
            seen: std::sync::OnceLock::new(),
        },
        view,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{qemu_command, ChannelLayout, CommandInput};

    /// Every binary loads one library, named after it.
    struct FakeLibs;

    impl Libraries for FakeLibs {
        fn of(&self, binary: &Path) -> Result<Vec<PathBuf>, libs::LibsError> {
            let name = binary.file_name().unwrap_or_default().to_string_lossy();
            Ok(vec![PathBuf::from(format!("/lib/lib-of-{name}.so"))])
        }
    }

    #[test]
    fn the_view_is_qemu_its_libraries_the_guest_files_the_run_dir_and_base_devices() {
        let mut input = CommandInput::bare(
            "/opt/q/qemu".into(),
            "gpucell-x".into(),
            Accel::Tcg,
            "/s/vmlinux".into(),
            "/s/initrd".into(),
        );
        input.disk = Some("/s/disk.erofs".into());
        input.qmp_socket = Some("/s/run/x/qmp.sock".into());
        input.channel = Some(ChannelLayout::Serial {
            socket: "/s/run/x/agent.sock".into(),
        });
        input.seccomp = true;
        let cmd = qemu_command(&input).unwrap();
        let view = qemu_view(&cmd, Path::new("/s/run/x"), &FakeLibs).unwrap();
        let shown: Vec<(String, bool)> = view
            .entries()
            .iter()
            .filter(|e| {
                !MODULE_DIRS
                    .iter()
                    .chain(&DATA_DIRS)
                    .any(|d| e.jail.starts_with(d))
                    && !e.jail.to_string_lossy().starts_with("/lib/lib-of-accel")
            })
            .map(|e| (e.jail.display().to_string(), e.writable))
            .collect();
        let want = [
            ("/lib/lib-of-qemu.so", false),
            ("/opt/q/qemu", false),
            ("/s/vmlinux", false),
            ("/s/initrd", false),
            ("/s/disk.erofs", false),
            ("/s/run/x", true),
            ("/dev/null", true),
            ("/dev/urandom", true),
            ("/dev/zero", true),
        ];
        let want: Vec<(String, bool)> = want.iter().map(|(p, w)| (p.to_string(), *w)).collect();
        assert_eq!(shown, want);
        assert!(view
            .entries()
            .iter()
            .all(|e| !e.jail.starts_with("/dev/kvm") && !e.jail.starts_with("/sys")));
    }

    #[test]
    fn a_passed_function_brings_sysfs_and_only_the_vfio_nodes_that_exist() {
        let input = CommandInput::bare(
            "/opt/q/qemu".into(),
            "gpucell-x".into(),
            Accel::Tcg,
            "/s/vmlinux".into(),
            "/s/initrd".into(),
        );
        let mut cmd = qemu_command(&input).unwrap();
        // No such function: no IOMMU group, so no group node (QEMU refuses it itself).
        cmd.devices.push(Device::VfioPci {
            host: "0000:ff:1f.7".into(),
            bus: "rp0".into(),
        });
        let view = qemu_view(&cmd, Path::new("/s/run/x"), &FakeLibs).unwrap();
        let sys = view.entries().iter().find(|e| e.jail == Path::new("/sys"));
        assert!(sys.is_some_and(|e| !e.writable && e.kind == EntryKind::Dir));
        let vfio: Vec<_> = view
            .entries()
            .iter()
            .filter(|e| e.jail.starts_with("/dev/vfio"))
            .map(|e| e.jail.clone())
            .collect();
        assert!(
            vfio.iter().all(|p| p == Path::new("/dev/vfio/vfio")),
            "{vfio:?}"
        );
    }

    #[test]
    fn config_values_are_checked() {
        let ok = JailConfig::default();
        ok.validate().unwrap();
        let bad = JailConfig {
            uids: [0, 5],
            ..ok.clone()
        };
        assert_eq!(bad.validate().unwrap_err().0, "jail.uids");
        let bad = JailConfig {
            cgroup_root: "cg".into(),
            ..ok
        };
        assert_eq!(bad.validate().unwrap_err().0, "jail.cgroup_root");
    }
}

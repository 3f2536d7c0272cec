//! The sandbox's cgroup: memory (guest RAM plus QEMU's own overhead), cpu (a quota of
//! the requested vCPUs) and pids, on cgroup v1 (one hierarchy per controller, as on
//! the project's machines) or v2 (one unified hierarchy). The jailed child writes
//! itself into the `cgroup.procs` files before it forks, so QEMU and every thread it
//! starts are counted. Every filesystem touch goes through [`CgroupFs`]; [`Cgroup`]
//! removes its directories when dropped (after QEMU is reaped).
//!
//! Where the configured root shows no hierarchy (under `ip netns exec`, which mounts a
//! new sysfs on `/sys` and so hides `/sys/fs/cgroup`), [`Cgroup::create_or_mount`]
//! mounts the hierarchies that hold the memory, cpu and pids controllers itself, in a
//! directory of the run's own, with the controller sets `/proc/cgroups` lists: the
//! kernel then hands back the host's own hierarchies, so the limits are the host's.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The cgroup filesystem, so tests can pass a fake.
pub trait CgroupFs: std::fmt::Debug + Send + Sync {
    fn exists(&self, path: &Path) -> bool;
    fn mkdir(&self, path: &Path) -> std::io::Result<()>;
    fn write(&self, path: &Path, value: &str) -> std::io::Result<()>;
    fn rmdir(&self, path: &Path) -> std::io::Result<()>;
    /// The text of a file (`/proc/cgroups`).
    fn read(&self, path: &Path) -> std::io::Result<String>;
    /// Mounts a `cgroup` filesystem with `options` (v1: its controllers), or `cgroup2`,
    /// on the existing directory `target`.
    fn mount(&self, fstype: &str, options: &str, target: &Path) -> std::io::Result<()>;
    /// Detaches the mount on `target`.
    fn unmount(&self, target: &Path) -> std::io::Result<()>;
    /// SIGKILL to process `pid` (what is left in a crashed run's group).
    fn kill(&self, pid: i32);
}

/// The real cgroup filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealCgroupFs;

impl CgroupFs for RealCgroupFs {
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn mkdir(&self, path: &Path) -> std::io::Result<()> {
        match std::fs::create_dir(path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            r => r,
        }
    }
    fn write(&self, path: &Path, value: &str) -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(value.as_bytes())
    }
    fn rmdir(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_dir(path)
    }
    fn kill(&self, pid: i32) {
        // SAFETY: kill(2) of a process listed in a crashed run's own cgroup.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    fn read(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
    fn mount(&self, fstype: &str, options: &str, target: &Path) -> std::io::Result<()> {
        let flags = nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC;
        let data = (!options.is_empty()).then_some(options);
        nix::mount::mount(Some(fstype), target, Some(fstype), flags, data)
            .map_err(std::io::Error::from)
    }
    fn unmount(&self, target: &Path) -> std::io::Result<()> {
        nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH).map_err(std::io::Error::from)
    }
}

/// What the sandbox may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    pub cpus: u32,
    pub pids: u64,
}

/// cfs period (both versions): quota = cpus × period.
const CPU_PERIOD_US: u64 = 100_000;
/// The directory every sandbox's cgroup goes under, in each hierarchy.
pub const PARENT: &str = "gpucell";
const V1_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot set up the sandbox's cgroup: {what} {path:?}; check that {root:?} is a writable cgroup mount, or set [jail] enabled = false")]
    Io {
        what: &'static str,
        path: PathBuf,
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup hierarchy under {0:?} (neither v2 cgroup.controllers nor v1 memory, cpu and pids)")]
    NoHierarchy(PathBuf),
    #[error("no cgroup hierarchy under {root:?}, and the kernel's cannot be mounted under {base:?}: {what}; set [jail] require_cgroups = false to run QEMU without memory, cpu and pids limits")]
    Mount {
        root: PathBuf,
        base: PathBuf,
        what: String,
        #[source]
        source: Option<std::io::Error>,
    },
}

impl CgroupError {
    /// The hierarchies are missing (as opposed to present but unusable): what
    /// `[jail] require_cgroups = false` tolerates.
    pub fn is_missing(&self) -> bool {
        matches!(
            self,
            CgroupError::NoHierarchy(_) | CgroupError::Mount { .. }
        )
    }
}

/// A cgroup filesystem to mount: `fstype`, `options`, and the directory under the
/// mount base (`memory`, `cpu`, `pids` on v1, the base itself on v2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub fstype: &'static str,
    pub options: String,
    pub dir: &'static str,
}

/// What to mount for the memory, cpu and pids controllers, from the text of
/// `/proc/cgroups` (`name hierarchy num_cgroups enabled`): on v1 each controller's
/// hierarchy with every controller it holds (`cpu,cpuacct` where they are co-mounted;
/// the kernel refuses another set), on v2 (hierarchy 0 for all three) one `cgroup2`.
pub fn mount_specs(proc_cgroups: &str) -> Result<Vec<MountSpec>, String> {
    let rows: Vec<(&str, &str, &str)> = proc_cgroups
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4).then(|| (f[0], f[1], f[3]))
        })
        .collect();
    let mut hierarchies = Vec::new();
    for ctrl in V1_CONTROLLERS {
        match rows.iter().find(|r| r.0 == ctrl) {
            Some((_, h, "1")) => hierarchies.push(*h),
            _ => {
                return Err(format!(
                    "the {ctrl} controller is not enabled in this kernel"
                ))
            }
        }
    }
    if hierarchies.iter().all(|h| *h == "0") {
        return Ok(vec![MountSpec {
            fstype: "cgroup2",
            options: String::new(),
            dir: "",
        }]);
    }
    if hierarchies.contains(&"0") {
        return Err("memory, cpu and pids are split between cgroup v1 and v2".to_string());
    }
    Ok(V1_CONTROLLERS
        .iter()
        .zip(hierarchies)
        .map(|(ctrl, h)| MountSpec {
            fstype: "cgroup",
            options: rows
                .iter()
                .filter(|r| r.1 == h && r.2 == "1")
                .map(|r| r.0)
                .collect::<Vec<_>>()
                .join(","),
            dir: ctrl,
        })
        .collect())
}

/// The cfs quota and period (µs) of `cpus` CPUs.
pub fn cpu_quota(cpus: u32) -> (u64, u64) {
    (u64::from(cpus.max(1)) * CPU_PERIOD_US, CPU_PERIOD_US)
}

/// Whether `root` holds a v2 hierarchy or the three v1 ones.
fn has_hierarchy(fs: &dyn CgroupFs, root: &Path) -> bool {
    fs.exists(&root.join("cgroup.controllers"))
        || V1_CONTROLLERS.iter().all(|c| fs.exists(&root.join(c)))
}

/// A sandbox's cgroup, removed when dropped.
#[derive(Debug)]
pub struct Cgroup {
    fs: Box<dyn CgroupFs>,
    /// Directories created, deepest last.
    dirs: Vec<PathBuf>,
    procs: Vec<PathBuf>,
    /// Hierarchies this run mounted itself (detached when dropped), and the
    /// directory holding them (removed last).
    mounts: Vec<PathBuf>,
    mount_base: Option<PathBuf>,
    /// The hierarchy root the group was made under.
    root: PathBuf,
    limits: Option<CgroupLimits>,
}

impl Cgroup {
    /// Creates `<root>/…/gpucell/<name>` with `limits`, on v2 when `<root>` has
    /// `cgroup.controllers`, else on v1's `memory`, `cpu` and `pids` hierarchies.
    pub fn create(
        fs: Box<dyn CgroupFs>,
        root: &Path,
        name: &str,
        limits: CgroupLimits,
    ) -> Result<Cgroup, CgroupError> {
        let cg = Cgroup {
            fs,
            dirs: Vec::new(),
            procs: Vec::new(),
            mounts: Vec::new(),
            mount_base: None,
            root: root.to_path_buf(),
            limits: Some(limits),
        };
        cg.fill(root, name, limits)
    }

    /// [`Cgroup::create`] under `root`; where `root` shows no hierarchy, under the
    /// kernel's own hierarchies mounted in `<mount_base>/<name>` (removed when dropped).
    /// Either way the cgroups of the crashed runs `stale` are removed first.
    pub fn create_or_mount(
        fs: Box<dyn CgroupFs>,
        root: &Path,
        mount_base: &Path,
        name: &str,
        limits: CgroupLimits,
        stale: &[String],
    ) -> Result<Cgroup, CgroupError> {
        Cgroup::remove_stale_mounts(&*fs, mount_base, stale);
        if has_hierarchy(&*fs, root) {
            Cgroup::remove_stale(&*fs, root, stale);
            return Cgroup::create(fs, root, name, limits);
        }
        let base = mount_base.join(name);
        let mount_err = |what: String, source| CgroupError::Mount {
            root: root.to_path_buf(),
            base: base.clone(),
            what,
            source,
        };
        let text = fs
            .read(Path::new("/proc/cgroups"))
            .map_err(|e| mount_err("cannot read /proc/cgroups".into(), Some(e)))?;
        let specs = mount_specs(&text).map_err(|what| mount_err(what, None))?;
        for dir in [mount_base, &base] {
            fs.mkdir(dir)
                .map_err(|e| mount_err(format!("cannot create {}", dir.display()), Some(e)))?;
        }
        let mut cg = Cgroup {
            fs,
            dirs: Vec::new(),
            procs: Vec::new(),
            mounts: Vec::new(),
            mount_base: Some(base.clone()),
            root: base.clone(),
            limits: Some(limits),
        };
        for spec in specs {
            let target = base.join(spec.dir);
            if target != base {
                cg.fs.mkdir(&target).map_err(|e| {
                    mount_err(format!("cannot create {}", target.display()), Some(e))
                })?;
            }
            cg.fs
                .mount(spec.fstype, &spec.options, &target)
                .map_err(|e| {
                    mount_err(
                        format!("mount -t {} -o {:?}", spec.fstype, spec.options),
                        Some(e),
                    )
                })?;
            cg.mounts.push(target);
        }
        tracing::info!(root = %root.display(), base = %base.display(), "no cgroup hierarchy in this mount namespace: mounted the kernel's");
        Cgroup::remove_stale(&*cg.fs, &base, stale);
        cg.fill(&base, name, limits)
    }

    /// Makes the group under `root` and sets `limits`; on an error, `self` is dropped
    /// (and with it what was made).
    fn fill(
        mut self,
        root: &Path,
        name: &str,
        limits: CgroupLimits,
    ) -> Result<Cgroup, CgroupError> {
        let cg = &mut self;
        let io = |what, path: &Path| {
            let (path, root) = (path.to_path_buf(), root.to_path_buf());
            move |source| CgroupError::Io {
                what,
                path,
                root,
                source,
            }
        };
        let (quota, _) = cpu_quota(limits.cpus);
        // The group's weight is that of as many busy tasks as CPUs it may use (as
        // QEMU's threads would have outside a group), not that of a single task.
        let shares = 1024 * u64::from(limits.cpus.max(1));
        let weight = (100 * u64::from(limits.cpus.max(1))).min(10_000);
        if cg.fs.exists(&root.join("cgroup.controllers")) {
            let parent = root.join(PARENT);
            cg.fs.mkdir(&parent).map_err(io("mkdir", &parent))?;
            for dir in [root, parent.as_path()] {
                let ctl = dir.join("cgroup.subtree_control");
                cg.fs
                    .write(&ctl, "+memory +cpu +pids")
                    .map_err(io("write", &ctl))?;
            }
            let dir = parent.join(name);
            cg.fs.mkdir(&dir).map_err(io("mkdir", &dir))?;
            cg.dirs.push(dir.clone());
            let settings = [
                ("memory.max", limits.memory_bytes.to_string()),
                ("memory.swap.max", "0".to_string()),
                ("cpu.max", format!("{quota} {CPU_PERIOD_US}")),
                ("cpu.weight", weight.to_string()),
                ("pids.max", limits.pids.to_string()),
            ];
            cg.apply(&dir, &settings, root)?;
            cg.procs.push(dir.join("cgroup.procs"));
            return Ok(self);
        }
        if !V1_CONTROLLERS.iter().all(|c| cg.fs.exists(&root.join(c))) {
            return Err(CgroupError::NoHierarchy(root.to_path_buf()));
        }
        for ctrl in V1_CONTROLLERS {
            let parent = root.join(ctrl).join(PARENT);
            cg.fs.mkdir(&parent).map_err(io("mkdir", &parent))?;
            let dir = parent.join(name);
            cg.fs.mkdir(&dir).map_err(io("mkdir", &dir))?;
            cg.dirs.push(dir.clone());
            let settings: Vec<(&str, String)> = match ctrl {
                "memory" => vec![("memory.limit_in_bytes", limits.memory_bytes.to_string())],
                "cpu" => vec![
                    ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                    ("cpu.cfs_quota_us", quota.to_string()),
                    ("cpu.shares", shares.to_string()),
                ],
                _ => vec![("pids.max", limits.pids.to_string())],
            };
            cg.apply(&dir, &settings, root)?;
            cg.procs.push(dir.join("cgroup.procs"));
        }
        Ok(self)
    }

    fn apply(
        &self,
        dir: &Path,
        settings: &[(&str, String)],
        root: &Path,
    ) -> Result<(), CgroupError> {
        for (file, value) in settings {
            let path = dir.join(file);
            // v2 without swap accounting has no memory.swap.max: nothing to limit.
            if *file == "memory.swap.max" && !self.fs.exists(&path) {
                continue;
            }
            self.fs
                .write(&path, value)
                .map_err(|source| CgroupError::Io {
                    what: "write",
                    path,
                    root: root.to_path_buf(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Removes the cgroups of sandboxes `names` (crashed runs: their QEMU is gone),
    /// wherever they are; a cgroup still in use stays (the kernel refuses).
    pub fn remove_stale(fs: &dyn CgroupFs, root: &Path, names: &[String]) {
        for name in names {
            let v2 = root.join(PARENT).join(name);
            let v1 = V1_CONTROLLERS
                .iter()
                .map(|c| root.join(c).join(PARENT).join(name));
            for dir in std::iter::once(v2).chain(v1).filter(|d| fs.exists(d)) {
                match remove_emptied(fs, &dir) {
                    Ok(()) => {
                        tracing::info!(dir = %dir.display(), "removed the cgroup of a crashed run")
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the cgroup of a crashed run")
                    }
                }
            }
        }
    }

    /// Detaches and removes the hierarchies crashed runs `names` mounted under
    /// `mount_base` (a mount in a namespace that is gone is only a directory).
    pub fn remove_stale_mounts(fs: &dyn CgroupFs, mount_base: &Path, names: &[String]) {
        for base in names
            .iter()
            .map(|n| mount_base.join(n))
            .filter(|b| fs.exists(b))
        {
            unmount_all(fs, &base);
            tracing::info!(dir = %base.display(), "removed the cgroup mounts of a crashed run");
        }
    }

    /// The hierarchy root the group is under (`[jail] cgroup_root`, or where this run
    /// mounted the hierarchies).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The limits set.
    pub fn limits(&self) -> Option<CgroupLimits> {
        self.limits
    }

    /// The `cgroup.procs` files the jailed child joins.
    pub fn procs_files(&self) -> &[PathBuf] {
        &self.procs
    }

    /// The cgroup's directories (one per v1 hierarchy, or one on v2).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // A process killed a moment ago may still be leaving the group.
        let deadline = Instant::now() + Duration::from_secs(2);
        for dir in self.dirs.iter().rev() {
            loop {
                match self.fs.rmdir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() >= deadline => {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the sandbox's cgroup");
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        if let Some(base) = &self.mount_base {
            unmount_all(&*self.fs, base);
        }
    }
}

/// Removes a crashed run's group `dir`: what is still in it (its jail's helper, a
/// QEMU on its way out: the run's owner is dead) gets SIGKILL, and the removal is
/// retried for up to 2 s while the kernel lets them go.
fn remove_emptied(fs: &dyn CgroupFs, dir: &Path) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs.rmdir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {
                let procs = fs.read(&dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    if pid > 1 {
                        fs.kill(pid);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Detaches the hierarchies mounted in `base` (v1: one per controller directory; v2:
/// on `base` itself) and removes the directories.
fn unmount_all(fs: &dyn CgroupFs, base: &Path) {
    for ctrl in V1_CONTROLLERS {
        let dir = base.join(ctrl);
        if fs.exists(&dir) {
            let _ = fs.unmount(&dir);
            let _ = fs.rmdir(&dir);
        }
    }
    let _ = fs.unmount(base);
    if let Err(e) = fs.rmdir(base) {
        tracing::warn!(dir = %base.display(), error = %e, "cannot remove the cgroup mount directory");
    }
}

#[cfg(test)]
mod tests;

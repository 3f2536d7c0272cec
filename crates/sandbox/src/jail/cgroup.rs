//! The sandbox's cgroup: memory (guest RAM plus QEMU's own overhead), cpu (a quota of
//! the requested vCPUs) and pids, on cgroup v1 (one hierarchy per controller, as on
//! the project's machines) or v2 (one unified hierarchy). The jailed child writes
//! itself into the `cgroup.procs` files before it forks, so QEMU and every thread it
//! starts are counted. Every filesystem touch goes through [`CgroupFs`]; [`Cgroup`]
//! removes its directories when dropped (after QEMU is reaped).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The cgroup filesystem, so tests can pass a fake.
pub trait CgroupFs: std::fmt::Debug + Send + Sync {
    fn exists(&self, path: &Path) -> bool;
    fn mkdir(&self, path: &Path) -> std::io::Result<()>;
    fn write(&self, path: &Path, value: &str) -> std::io::Result<()>;
    fn rmdir(&self, path: &Path) -> std::io::Result<()>;
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
}

/// A sandbox's cgroup, removed when dropped.
#[derive(Debug)]
pub struct Cgroup {
    fs: Box<dyn CgroupFs>,
    /// Directories created, deepest last.
    dirs: Vec<PathBuf>,
    procs: Vec<PathBuf>,
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
        let mut cg = Cgroup {
            fs,
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        let io = |what, path: &Path| {
            let (path, root) = (path.to_path_buf(), root.to_path_buf());
            move |source| CgroupError::Io {
                what,
                path,
                root,
                source,
            }
        };
        let quota = u64::from(limits.cpus.max(1)) * CPU_PERIOD_US;
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
            return Ok(cg);
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
        Ok(cg)
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
                match fs.rmdir(&dir) {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    /// Directories and written values, in memory.
    #[derive(Debug, Default, Clone)]
    struct FakeFs {
        dirs: Arc<Mutex<Vec<PathBuf>>>,
        files: Arc<Mutex<BTreeMap<PathBuf, String>>>,
        fail_on: Option<&'static str>,
    }

    impl CgroupFs for FakeFs {
        fn exists(&self, p: &Path) -> bool {
            self.dirs.lock().unwrap().iter().any(|d| d == p)
                || self.files.lock().unwrap().contains_key(p)
        }
        fn mkdir(&self, p: &Path) -> std::io::Result<()> {
            let mut d = self.dirs.lock().unwrap();
            if !d.iter().any(|x| x == p) {
                d.push(p.to_path_buf());
            }
            Ok(())
        }
        fn write(&self, p: &Path, v: &str) -> std::io::Result<()> {
            if self.fail_on.is_some_and(|f| p.ends_with(f)) {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.files
                .lock()
                .unwrap()
                .insert(p.to_path_buf(), v.to_string());
            Ok(())
        }
        fn rmdir(&self, p: &Path) -> std::io::Result<()> {
            self.dirs.lock().unwrap().retain(|d| d != p);
            Ok(())
        }
    }

    const LIMITS: CgroupLimits = CgroupLimits {
        memory_bytes: 1 << 30,
        cpus: 2,
        pids: 130,
    };

    fn v1() -> FakeFs {
        let fs = FakeFs::default();
        for c in V1_CONTROLLERS {
            fs.mkdir(&Path::new("/cg").join(c)).unwrap();
        }
        fs
    }

    #[test]
    fn v1_sets_each_hierarchy_and_removes_it() {
        let fs = v1();
        let cg = Cgroup::create(Box::new(fs.clone()), Path::new("/cg"), "abc", LIMITS).unwrap();
        let files = fs.files.lock().unwrap().clone();
        let get = |p: &str| files.get(Path::new(p)).cloned();
        assert_eq!(
            get("/cg/memory/gpucell/abc/memory.limit_in_bytes").as_deref(),
            Some("1073741824")
        );
        assert_eq!(
            get("/cg/cpu/gpucell/abc/cpu.cfs_quota_us").as_deref(),
            Some("200000")
        );
        assert_eq!(
            get("/cg/cpu/gpucell/abc/cpu.cfs_period_us").as_deref(),
            Some("100000")
        );
        assert_eq!(get("/cg/pids/gpucell/abc/pids.max").as_deref(), Some("130"));
        assert_eq!(
            get("/cg/cpu/gpucell/abc/cpu.shares").as_deref(),
            Some("2048")
        );
        assert_eq!(cg.procs_files().len(), 3);
        drop(cg);
        assert!(!fs.exists(Path::new("/cg/memory/gpucell/abc")));
        assert!(!fs.exists(Path::new("/cg/pids/gpucell/abc")));
        // A crashed run's cgroup (its guard never dropped) goes with remove_stale.
        let cg = Cgroup::create(Box::new(fs.clone()), Path::new("/cg"), "old", LIMITS).unwrap();
        std::mem::forget(cg);
        assert!(fs.exists(Path::new("/cg/cpu/gpucell/old")));
        Cgroup::remove_stale(&fs, Path::new("/cg"), &["old".to_string()]);
        for c in V1_CONTROLLERS {
            assert!(!fs.exists(&Path::new("/cg").join(c).join("gpucell/old")));
        }
    }

    #[test]
    fn v2_enables_controllers_and_sets_limits() {
        let fs = FakeFs::default();
        fs.write(Path::new("/cg/cgroup.controllers"), "memory cpu pids")
            .unwrap();
        let cg = Cgroup::create(Box::new(fs.clone()), Path::new("/cg"), "abc", LIMITS).unwrap();
        let files = fs.files.lock().unwrap().clone();
        let get = |p: &str| files.get(Path::new(p)).cloned();
        assert_eq!(
            get("/cg/cgroup.subtree_control").as_deref(),
            Some("+memory +cpu +pids")
        );
        assert_eq!(
            get("/cg/gpucell/cgroup.subtree_control").as_deref(),
            Some("+memory +cpu +pids")
        );
        assert_eq!(
            get("/cg/gpucell/abc/memory.max").as_deref(),
            Some("1073741824")
        );
        assert_eq!(
            get("/cg/gpucell/abc/cpu.max").as_deref(),
            Some("200000 100000")
        );
        assert_eq!(get("/cg/gpucell/abc/cpu.weight").as_deref(), Some("200"));
        assert_eq!(get("/cg/gpucell/abc/pids.max").as_deref(), Some("130"));
        assert_eq!(
            cg.procs_files(),
            [PathBuf::from("/cg/gpucell/abc/cgroup.procs")]
        );
        drop(cg);
        assert!(!fs.exists(Path::new("/cg/gpucell/abc")));
    }

    #[test]
    fn a_failed_setting_is_named_and_leaves_nothing() {
        let mut fs = v1();
        fs.fail_on = Some("pids.max");
        let err =
            Cgroup::create(Box::new(fs.clone()), Path::new("/cg"), "abc", LIMITS).unwrap_err();
        assert!(err.to_string().contains("pids.max"), "{err}");
        for c in V1_CONTROLLERS {
            assert!(!fs.exists(&Path::new("/cg").join(c).join("gpucell/abc")));
        }
        let none = FakeFs::default();
        assert!(matches!(
            Cgroup::create(Box::new(none), Path::new("/cg"), "abc", LIMITS),
            Err(CgroupError::NoHierarchy(_))
        ));
    }
}

use super::*;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Directories and written values, in memory.
#[derive(Debug, Default, Clone)]
struct FakeFs {
    dirs: Arc<Mutex<Vec<PathBuf>>>,
    files: Arc<Mutex<BTreeMap<PathBuf, String>>>,
    fail_on: Option<&'static str>,
    /// `(fstype, options, target)` of each mount in place.
    mounts: Arc<Mutex<Vec<(String, String, PathBuf)>>>,
    proc_cgroups: String,
    /// Processes still in a group (its rmdir fails with EBUSY until they are killed).
    busy: Arc<Mutex<BTreeMap<PathBuf, Vec<i32>>>>,
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
        if self.mounts.lock().unwrap().iter().any(|m| m.2 == p)
            || self
                .busy
                .lock()
                .unwrap()
                .get(p)
                .is_some_and(|v| !v.is_empty())
        {
            return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
        }
        self.dirs.lock().unwrap().retain(|d| d != p);
        Ok(())
    }
    fn read(&self, p: &Path) -> std::io::Result<String> {
        if p.file_name() == Some(std::ffi::OsStr::new("cgroup.procs")) {
            let busy = self.busy.lock().unwrap();
            let pids = p
                .parent()
                .and_then(|d| busy.get(d))
                .cloned()
                .unwrap_or_default();
            return Ok(pids.iter().map(|p| format!("{p}\n")).collect());
        }
        assert_eq!(p, Path::new("/proc/cgroups"));
        Ok(self.proc_cgroups.clone())
    }
    fn kill(&self, pid: i32) {
        for pids in self.busy.lock().unwrap().values_mut() {
            pids.retain(|p| *p != pid);
        }
    }
    fn mount(&self, fstype: &str, options: &str, target: &Path) -> std::io::Result<()> {
        if !self.exists(target) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        }
        if fstype == "cgroup2" {
            self.write(&target.join("cgroup.controllers"), "memory cpu pids")?;
        }
        let m = (
            fstype.to_string(),
            options.to_string(),
            target.to_path_buf(),
        );
        self.mounts.lock().unwrap().push(m);
        Ok(())
    }
    fn unmount(&self, target: &Path) -> std::io::Result<()> {
        let mut mounts = self.mounts.lock().unwrap();
        let before = mounts.len();
        mounts.retain(|m| m.2 != target);
        if mounts.len() == before {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }
}

/// `/proc/cgroups` of the project's machines: cpu and cpuacct apart.
const V1_APART: &str = "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpuset\t3\t1\t1\ncpu\t1\t2\t1\ncpuacct\t2\t1\t1\nmemory\t4\t85\t1\npids\t8\t2\t1\nnet_cls\t0\t1\t1\n";

#[test]
fn mount_specs_follow_the_kernels_hierarchies() {
    let spec = |fstype, options: &str, dir| MountSpec {
        fstype,
        options: options.to_string(),
        dir,
    };
    assert_eq!(
        mount_specs(V1_APART).unwrap(),
        [
            spec("cgroup", "memory", "memory"),
            spec("cgroup", "cpu", "cpu"),
            spec("cgroup", "pids", "pids")
        ]
    );
    // Co-mounted controllers are mounted together (the kernel refuses a subset).
    let together = V1_APART.replace("cpuacct\t2", "cpuacct\t1");
    assert_eq!(
        mount_specs(&together).unwrap()[1],
        spec("cgroup", "cpu,cpuacct", "cpu")
    );
    let v2 = "#h\nmemory\t0\t1\t1\ncpu\t0\t1\t1\npids\t0\t1\t1\n";
    assert_eq!(mount_specs(v2).unwrap(), [spec("cgroup2", "", "")]);
    let off = V1_APART.replace("pids\t8\t2\t1", "pids\t8\t2\t0");
    assert!(mount_specs(&off).unwrap_err().contains("pids"));
    let split = V1_APART.replace("memory\t4", "memory\t0");
    assert!(mount_specs(&split).unwrap_err().contains("split"));
}

#[test]
fn a_hidden_hierarchy_is_mounted_under_the_base_used_and_unmounted() {
    let fs = FakeFs {
        proc_cgroups: V1_APART.to_string(),
        ..FakeFs::default()
    };
    let (root, base) = (Path::new("/sys/fs/cgroup"), Path::new("/state/cgroup"));
    let cg = Cgroup::create_or_mount(Box::new(fs.clone()), root, base, "abc", LIMITS, &[]).unwrap();
    assert_eq!(cg.root(), Path::new("/state/cgroup/abc"));
    let mounts = fs.mounts.lock().unwrap().clone();
    assert_eq!(mounts.len(), 3);
    assert_eq!(mounts[1].1, "cpu");
    assert_eq!(mounts[1].2, Path::new("/state/cgroup/abc/cpu"));
    let files = fs.files.lock().unwrap().clone();
    assert_eq!(
        files.get(Path::new("/state/cgroup/abc/pids/gpucell/abc/pids.max")),
        Some(&"130".to_string())
    );
    assert_eq!(
        cg.procs_files()[0],
        Path::new("/state/cgroup/abc/memory/gpucell/abc/cgroup.procs")
    );
    drop(cg);
    assert!(fs.mounts.lock().unwrap().is_empty());
    assert!(!fs.exists(Path::new("/state/cgroup/abc")));
    // v2: one cgroup2 on the base itself.
    let fs = FakeFs {
        proc_cgroups: "memory\t0\t1\t1\ncpu\t0\t1\t1\npids\t0\t1\t1\n".into(),
        ..FakeFs::default()
    };
    let cg = Cgroup::create_or_mount(Box::new(fs.clone()), root, base, "v2", LIMITS, &[]).unwrap();
    assert_eq!(
        fs.mounts.lock().unwrap()[0].2,
        Path::new("/state/cgroup/v2")
    );
    assert_eq!(cg.dirs(), [PathBuf::from("/state/cgroup/v2/gpucell/v2")]);
    drop(cg);
    assert!(fs.mounts.lock().unwrap().is_empty());
    assert!(!fs.exists(Path::new("/state/cgroup/v2")));
}

#[test]
fn a_failed_mount_names_the_opt_out_and_leaves_nothing() {
    let fs = FakeFs {
        proc_cgroups: V1_APART.replace("memory\t4\t85\t1", "memory\t4\t85\t0"),
        ..FakeFs::default()
    };
    let err = Cgroup::create_or_mount(
        Box::new(fs.clone()),
        Path::new("/sys/fs/cgroup"),
        Path::new("/state/cgroup"),
        "abc",
        LIMITS,
        &[],
    )
    .unwrap_err();
    assert!(err.is_missing());
    let msg = err.to_string();
    assert!(
        msg.contains("require_cgroups = false") && msg.contains("memory"),
        "{msg}"
    );
    assert!(fs.mounts.lock().unwrap().is_empty());
    assert!(!fs.exists(Path::new("/state/cgroup/abc")));
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
    // Its jail's helper is still on its way out of the memory group: it is killed.
    fs.busy
        .lock()
        .unwrap()
        .insert(PathBuf::from("/cg/memory/gpucell/old"), vec![4242]);
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
    let err = Cgroup::create(Box::new(fs.clone()), Path::new("/cg"), "abc", LIMITS).unwrap_err();
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

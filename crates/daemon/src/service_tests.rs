//! The service's bookkeeping with a fake launcher: supervisors are entries in a table,
//! their progress is written by the test. The VM tests (tests/daemon_vm.rs) do the same
//! with real processes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use gpucell_api::{DeployRequest, Desired, RestartPolicy, SandboxState};
use gpucell_host::devices::record::Owner;

use crate::launcher::{LaunchError, Launcher};
use crate::service::{Service, Settings};
use crate::supervise::Progress;

#[derive(Default)]
struct Table {
    alive: HashMap<u32, bool>,
    signals: Vec<(u32, i32)>,
    reclaimed: Vec<u32>,
    next_pid: u32,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Table>>);

impl Launcher for Fake {
    fn launch(&self, _dir: &Path) -> Result<Owner, LaunchError> {
        let mut t = self.0.lock().unwrap();
        t.next_pid += 1;
        let pid = 1000 + t.next_pid;
        t.alive.insert(pid, true);
        Ok(Owner { pid, start_time: 7 })
    }
    fn signal(&self, owner: &Owner, signal: i32) {
        self.0.lock().unwrap().signals.push((owner.pid, signal));
    }
    fn alive(&self, owner: &Owner) -> bool {
        self.0.lock().unwrap().alive.get(&owner.pid) == Some(&true)
    }
    fn reclaim_devices(&self, owner: &Owner) -> Vec<String> {
        self.0.lock().unwrap().reclaimed.push(owner.pid);
        Vec::new()
    }
}

impl Fake {
    fn kill(&self, pid: u32) {
        self.0.lock().unwrap().alive.insert(pid, false);
    }
    fn launches(&self) -> u32 {
        self.0.lock().unwrap().next_pid
    }
    fn signals(&self) -> Vec<(u32, i32)> {
        self.0.lock().unwrap().signals.clone()
    }
}

struct Setup {
    dir: tempfile::TempDir,
    fake: Fake,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("guest/default")).unwrap();
        std::fs::write(dir.path().join("guest/default/manifest.json"), "{}").unwrap();
        Setup {
            dir,
            fake: Fake::default(),
        }
    }

    fn service(&self) -> Arc<Service> {
        let settings = Settings {
            state_dir: self.dir.path().to_path_buf(),
            host_root: self.dir.path().to_path_buf(),
            default_guest: "default".into(),
            proc_dir: self.dir.path().join("proc"),
        };
        let s = Service::open(settings, Box::new(self.fake.clone())).unwrap();
        s.reconcile();
        s
    }

    fn progress(&self, s: &Service, id: &str, state: SandboxState, exit: Option<i32>) {
        let mut p = Progress {
            state: Some(state),
            ..Progress::default()
        };
        if let Some(code) = exit {
            p.done = true;
            p.exit_code = Some(code);
            p.report = Some(serde_json::json!({"exit_code": code}));
        }
        p.write(&s.sandbox_dir(id)).unwrap();
    }
}

fn request(id: &str, restart: RestartPolicy) -> DeployRequest {
    let mut r = DeployRequest::new(gpucell_runtime::RunRequest::new("oci:/images/x:y"));
    r.id = Some(id.into());
    r.restart = restart;
    r
}

fn pid_of(s: &Service, id: &str) -> u32 {
    s.lock().records[id].supervisor.unwrap().pid
}

#[test]
fn progress_exit_and_restart_with_backoff() {
    let t = Setup::new();
    let s = t.service();
    let (created, st) = s.deploy(request("a", RestartPolicy::OnFailure)).unwrap();
    assert!(created);
    assert_eq!(st.state, SandboxState::Pending);
    let pid = pid_of(&s, "a");
    t.progress(&s, "a", SandboxState::Running, None);
    s.tick();
    assert_eq!(s.get("a").unwrap().state, SandboxState::Running);
    // Exits 3: restarted after a backoff, not at once.
    t.progress(&s, "a", SandboxState::Exited, Some(3));
    t.fake.kill(pid);
    s.tick();
    let st = s.get("a").unwrap();
    assert_eq!(
        (st.state, st.restarts, st.exit_code),
        (SandboxState::Pending, 1, Some(3))
    );
    assert!(st.timestamps.contains_key(&SandboxState::Exited));
    assert_eq!(t.fake.launches(), 1);
    s.lock().records.get_mut("a").unwrap().next_start_ms = Some(0);
    s.tick();
    assert_eq!(t.fake.launches(), 2);
    // Exits 0: on-failure leaves it.
    let pid = pid_of(&s, "a");
    t.progress(&s, "a", SandboxState::Exited, Some(0));
    t.fake.kill(pid);
    s.tick();
    let st = s.get("a").unwrap();
    assert_eq!(
        (st.state, st.restarts, st.exit_code),
        (SandboxState::Exited, 1, Some(0))
    );
}

#[test]
fn a_supervisor_that_dies_mid_run_fails_the_sandbox() {
    let t = Setup::new();
    let s = t.service();
    s.deploy(request("b", RestartPolicy::Never)).unwrap();
    t.progress(&s, "b", SandboxState::Booting, None);
    s.tick();
    t.fake.kill(pid_of(&s, "b"));
    s.tick();
    let st = s.get("b").unwrap();
    assert_eq!(st.state, SandboxState::Failed);
    assert_eq!(
        t.fake.0.lock().unwrap().reclaimed.len(),
        1,
        "its devices were not reclaimed"
    );
    assert!(st.error.unwrap().contains("supervisor"));
    assert!(st.timestamps.contains_key(&SandboxState::Booting));
}

#[test]
fn a_new_daemon_adopts_live_supervisors_and_settles_dead_ones() {
    let t = Setup::new();
    {
        let s = t.service();
        s.deploy(request("live", RestartPolicy::Never)).unwrap();
        s.deploy(request("dead", RestartPolicy::Always)).unwrap();
        t.progress(&s, "live", SandboxState::Running, None);
        t.progress(&s, "dead", SandboxState::Running, None);
        s.tick();
        t.fake.kill(pid_of(&s, "dead"));
    }
    let s = t.service();
    assert!(s.is_ready());
    let live = s.get("live").unwrap();
    assert_eq!(live.state, SandboxState::Running);
    let dead = s.get("dead").unwrap();
    assert_eq!((dead.state, dead.restarts), (SandboxState::Pending, 1));
    assert_eq!(t.fake.launches(), 2, "the live one was started again");
}

#[test]
fn stop_signals_then_kills_after_the_grace_and_is_never_restarted() {
    let t = Setup::new();
    let s = t.service();
    let mut r = request("c", RestartPolicy::Always);
    r.stop_grace_ms = Some(0);
    s.deploy(r).unwrap();
    t.progress(&s, "c", SandboxState::Running, None);
    s.tick();
    let pid = pid_of(&s, "c");
    let st = s.stop("c", false).unwrap().unwrap();
    assert_eq!(
        (st.state, st.desired),
        (SandboxState::Stopping, Desired::Stopped)
    );
    assert_eq!(t.fake.signals(), [(pid, libc::SIGTERM)]);
    // The progress file still says running: the stop stays.
    s.tick();
    assert_eq!(s.get("c").unwrap().state, SandboxState::Stopping);
    assert!(t.fake.signals().contains(&(pid, libc::SIGKILL)));
    t.fake.kill(pid);
    s.tick();
    let st = s.get("c").unwrap();
    assert_eq!(
        (st.state, st.exit_code, st.restarts),
        (SandboxState::Exited, Some(137), 0)
    );
    // Removing forgets it; a second deploy with its id is new.
    assert!(s.stop("c", true).unwrap().is_none());
    assert!(s.get("c").is_err());
}

#[test]
fn deploys_are_idempotent_by_id_and_devices_are_exclusive() {
    let t = Setup::new();
    let s = t.service();
    let mut r = request("d", RestartPolicy::Never);
    r.run.devices.functions = vec!["0000:00:05.0".into()];
    assert!(s.deploy(r.clone()).unwrap().0);
    assert!(!s.deploy(r.clone()).unwrap().0);
    assert_eq!(t.fake.launches(), 1);
    let mut other = r.clone();
    other.run.memory_mib = 1024;
    assert_eq!(s.deploy(other).unwrap_err().status(), 409);
    let mut e = r.clone();
    e.id = Some("e".into());
    e.run.devices.functions = vec!["00:05.0".into()];
    let err = s.deploy(e.clone()).unwrap_err();
    assert_eq!(err.body().holder.as_deref(), Some("d"));
    // Once d has ended, the device is free for e.
    t.progress(&s, "d", SandboxState::Exited, Some(0));
    t.fake.kill(pid_of(&s, "d"));
    s.tick();
    assert!(s.deploy(e).unwrap().0);
}

#[test]
fn health_results_change_the_status() {
    let t = Setup::new();
    let s = t.service();
    s.deploy(request("h", RestartPolicy::Never)).unwrap();
    s.record_health("h", 1, Err("not yet".into()));
    assert!(
        s.get("h").unwrap().health.is_none(),
        "checked before running"
    );
    t.progress(&s, "h", SandboxState::Running, None);
    s.tick();
    s.record_health("h", 2, Err("refused".into()));
    assert!(s.get("h").unwrap().health.unwrap().healthy);
    s.record_health("h", 2, Err("refused".into()));
    let h = s.get("h").unwrap().health.unwrap();
    assert!(!h.healthy && h.consecutive_failures == 2);
    s.record_health("h", 2, Ok(()));
    assert!(s.get("h").unwrap().health.unwrap().healthy);
}

#[test]
fn a_locked_directory_is_adopted_never_started_twice() {
    let t = Setup::new();
    let s = t.service();
    // A supervisor a dead daemon started but never recorded holds the lock.
    let dir = s.sandbox_dir("orphan");
    std::fs::create_dir_all(&dir).unwrap();
    let held = crate::supervise::lock(&dir).unwrap();
    s.deploy(request("orphan", RestartPolicy::Never)).unwrap();
    s.tick();
    assert_eq!(t.fake.launches(), 0, "a second supervisor was started");
    assert!(s.lock().records["orphan"].supervisor.is_none());
    // Once it has said who it is, it is adopted.
    t.fake.0.lock().unwrap().alive.insert(4242, true);
    let owner = Owner {
        pid: 4242,
        start_time: 7,
    };
    std::fs::write(
        dir.join(crate::supervise::OWNER),
        serde_json::to_vec(&owner).unwrap(),
    )
    .unwrap();
    s.tick();
    assert_eq!(pid_of(&s, "orphan"), 4242);
    assert_eq!(t.fake.launches(), 0);
    drop(held);
}

//! One VM per CRI pod. The pod's sandbox container is held by the shim and boots
//! nothing; the pod's VM boots when its first application container starts, with that
//! container's devices cold-plugged and spare ports for the containers that follow. The
//! VM's own process is the pod's sandbox process (the agent holds, as `pause` does); each
//! application container joins the VM on a disk of its own root filesystem
//! ([`Launcher::add_container`]). Stopping the sandbox container stops the VM.
//!
//! A plain `ctr run` (no CRI sandbox) is not a pod here: its task boots its own VM.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gpucell_runtime::{Observer, RunReport};
use gpucell_sandbox::{EventSender, SessionIo};

use crate::launcher::{Launch, Launcher};

/// Containers a pod's VM takes after its first (one spare PCIe port each).
pub const POD_SLOTS: u8 = 8;
/// The file in the sandbox container's bundle that receives the pod VM's run report.
pub const POD_REPORT_FILE: &str = "gpucell-pod-report.json";
/// How long an application container waits for its pod's VM to boot.
const BOOT_WAIT: Duration = Duration::from_secs(600);
/// How often a waiting container looks whether the VM died meanwhile.
const POLL: Duration = Duration::from_millis(250);

/// A CRI pod served by this shim.
pub struct Pod {
    id: String,
    /// The sandbox container's bundle (the pod VM's report goes there).
    bundle: PathBuf,
    state: Mutex<State>,
    changed: Condvar,
}

enum State {
    /// Known from its sandbox container; no VM yet.
    Waiting(Box<Launch>),
    Booting {
        stop: bool,
    },
    /// The VM boots or runs: its handle (its process may not run yet).
    Up {
        vm: EventSender,
        stop: bool,
    },
    /// The VM ended, or cannot boot: why.
    Gone(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Pod {
    /// A pod whose sandbox container is `sandbox` (its rootfs, network and defaults).
    pub fn new(id: &str, bundle: PathBuf, sandbox: Launch) -> Arc<Pod> {
        Arc::new(Pod {
            id: id.to_string(),
            bundle,
            state: Mutex::new(State::Waiting(Box::new(sandbox))),
            changed: Condvar::new(),
        })
    }

    /// The pod's running VM, booted for `first` (its devices, cpus, memory, guest and
    /// driver) when the pod has none yet. Waits until the VM's own process runs.
    pub fn vm(
        self: &Arc<Self>,
        launcher: &Arc<dyn Launcher>,
        first: &Launch,
    ) -> Result<EventSender, String> {
        let mut s = lock(&self.state);
        if let State::Waiting(_) = &*s {
            let State::Waiting(sandbox) =
                std::mem::replace(&mut *s, State::Booting { stop: false })
            else {
                unreachable!("matched above")
            };
            if let Err(why) = self.boot(launcher, pod_launch(*sandbox, first)) {
                *s = State::Gone(why.clone());
                return Err(why);
            }
        } else if has_devices(first) {
            return Err(format!(
                "pod {}: its VM is already running; a pod's GPUs and PCI functions are given to its first application container",
                self.id
            ));
        }
        let deadline = Instant::now() + BOOT_WAIT;
        let vm = loop {
            match &*s {
                State::Up { vm, .. } => break vm.clone(),
                State::Gone(why) => return Err(format!("pod {}: {why}", self.id)),
                State::Waiting(_) | State::Booting { .. } => {}
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "pod {}: its VM did not start within {BOOT_WAIT:?}",
                    self.id
                ));
            }
            s = match self.changed.wait_timeout(s, POLL) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        };
        drop(s);
        // The VM's process runs once the guest has booted; the VM may die meanwhile.
        loop {
            match vm.wait_running(POLL) {
                Ok(()) => return Ok(vm),
                Err(gpucell_runtime::ExecError::NotRunning) => {}
                Err(e) => return Err(format!("pod {}: {e}", self.id)),
            }
            if let State::Gone(why) = &*lock(&self.state) {
                return Err(format!("pod {}: {why}", self.id));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "pod {}: its VM did not boot within {BOOT_WAIT:?}",
                    self.id
                ));
            }
        }
    }

    /// Runs the pod's VM on a thread of its own until it ends. Called with the state
    /// locked: the thread waits for it.
    fn boot(self: &Arc<Self>, launcher: &Arc<dyn Launcher>, launch: Launch) -> Result<(), String> {
        let (pod, launcher) = (Arc::clone(self), Arc::clone(launcher));
        let spawned = std::thread::Builder::new()
            .name(format!("pod-{}", self.id))
            .spawn(move || {
                let mut obs = PodObserver(Arc::clone(&pod));
                let report = launcher.run(launch, silent_io(), &mut obs);
                pod.ended(&report);
            });
        spawned
            .map(|_| ())
            .map_err(|e| format!("starting the pod VM's thread: {e}"))
    }

    fn ended(&self, report: &RunReport) {
        let path = self.bundle.join(POD_REPORT_FILE);
        match serde_json::to_vec_pretty(report) {
            Ok(json) => {
                if let Err(e) = std::fs::write(&path, json) {
                    tracing::warn!(path = %path.display(), error = %e, "writing the pod VM's report");
                }
            }
            Err(e) => tracing::warn!(error = %e, "serializing the pod VM's report"),
        }
        let why = match &report.error {
            Some(e) => format!("the pod's VM failed: {e}"),
            None => format!(
                "the pod's VM stopped (its sandbox process exited {})",
                report.exit_code
            ),
        };
        *lock(&self.state) = State::Gone(why);
        self.changed.notify_all();
    }

    /// The sandbox container stopped: the VM's own process is told to end (so the VM
    /// powers off, and every container in it ends), and this waits up to `wait` for it.
    pub fn stop(&self, wait: Duration) {
        let mut s = lock(&self.state);
        match &mut *s {
            State::Waiting(_) => {
                *s = State::Gone("the pod's sandbox was stopped".into());
                return;
            }
            State::Booting { stop } => *stop = true,
            State::Up { vm, stop } => {
                *stop = true;
                vm.signal(libc::SIGTERM);
            }
            State::Gone(_) => return,
        }
        let deadline = Instant::now() + wait;
        while !matches!(&*s, State::Gone(_)) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                tracing::warn!(pod = %self.id, "the pod's VM did not stop within {wait:?}");
                return;
            };
            s = match self.changed.wait_timeout(s, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

/// Hands the VM's handle to the pod once its sandbox starts.
struct PodObserver(Arc<Pod>);

impl Observer for PodObserver {
    fn warning(&mut self, message: &str) {
        tracing::warn!(pod = %self.0.id, "{message}");
    }

    fn sandbox_starting(&mut self, vm: EventSender) {
        let mut s = lock(&self.0.state);
        let stop = matches!(&*s, State::Booting { stop: true });
        if stop {
            // Stopped while booting: the signal waits in the queue for the workload.
            vm.signal(libc::SIGTERM);
        }
        *s = State::Up { vm, stop };
        self.0.changed.notify_all();
    }
}

/// The pod VM's own process has no streams worth keeping.
fn silent_io() -> SessionIo {
    SessionIo {
        stdout: Box::new(std::io::sink()),
        stderr: Box::new(std::io::sink()),
        stdin: None,
    }
}

fn has_devices(l: &Launch) -> bool {
    let d = &l.request.devices;
    d.gpus.is_some() || !d.functions.is_empty()
}

/// The pod VM's launch: the sandbox container's rootfs, network and process, with the
/// first application container's devices, guest, driver and the larger of the two's
/// cpus and memory.
fn pod_launch(sandbox: Launch, first: &Launch) -> Launch {
    let mut request = sandbox.request;
    let f = &first.request;
    request.devices = f.devices.clone();
    request.cpus = request.cpus.max(f.cpus);
    request.memory_mib = request.memory_mib.max(f.memory_mib);
    request.guest = f.guest.clone().or(request.guest);
    request.driver = f.driver.clone().or(request.driver);
    request.pod_slots = POD_SLOTS;
    Launch {
        request,
        rootfs: sandbox.rootfs,
        sandbox: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpucell_runtime::RunRequest;

    fn launch(image: &str) -> Launch {
        Launch {
            request: RunRequest::new(image),
            rootfs: PathBuf::from(format!("/rootfs/{image}")),
            sandbox: false,
        }
    }

    #[test]
    fn the_pod_vm_has_the_sandbox_rootfs_and_the_first_containers_devices() {
        let mut sandbox = launch("pause");
        sandbox.sandbox = true;
        sandbox.request.network.pod_netns = Some("/run/netns/p1".into());
        let mut first = launch("app");
        first.request.devices.functions = vec!["0000:41:00.0".into()];
        first.request.memory_mib = 4096;
        first.request.cpus = 4;
        first.request.driver = Some("550".into());
        let l = pod_launch(sandbox, &first);
        assert_eq!(l.rootfs, PathBuf::from("/rootfs/pause"));
        assert!(!l.sandbox, "the pod VM is a VM, not a held sandbox");
        assert_eq!(l.request.devices.functions, ["0000:41:00.0"]);
        assert_eq!((l.request.cpus, l.request.memory_mib), (4, 4096));
        assert_eq!(l.request.driver.as_deref(), Some("550"));
        assert_eq!(l.request.pod_slots, POD_SLOTS);
        assert_eq!(
            l.request.network.pod_netns.as_deref(),
            Some(std::path::Path::new("/run/netns/p1"))
        );
    }
}

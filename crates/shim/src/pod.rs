//! One VM per CRI pod. The pod's sandbox container is held by the shim and boots
//! nothing; the pod's VM boots when its first application container starts, with the
//! pod's devices cold-plugged (that container's, and every container's that the kubelet's
//! PodResources lists for the pod) and spare ports for the containers that follow. The
//! VM's own process is the pod's sandbox process (the agent holds, as `pause` does); each
//! application container joins the VM on a disk of its own root filesystem
//! ([`Launcher::add_container`]). Stopping the sandbox container stops the VM.
//!
//! A plain `ctr run` (no CRI sandbox) is not a pod here: its task boots its own VM.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gpucell_host::HostRoot;
use gpucell_runtime::{Observer, RunReport};
use gpucell_sandbox::{EventSender, SessionIo};

use crate::devices::Passed;
use crate::launcher::{Launch, Launcher};
use crate::pod_resources::{PodName, PodResources};

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
    /// The pod's name and namespace (CRI annotations), to ask the kubelet by.
    name: Option<PodName>,
    /// The functions cold-plugged into the VM.
    plugged: Mutex<Passed>,
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
    /// A pod whose sandbox container is `sandbox` (its rootfs, network and defaults),
    /// named `name` to the kubelet.
    pub fn new(id: &str, bundle: PathBuf, sandbox: Launch, name: Option<PodName>) -> Arc<Pod> {
        Arc::new(Pod {
            id: id.to_string(),
            bundle,
            name,
            plugged: Mutex::new(Passed::default()),
            state: Mutex::new(State::Waiting(Box::new(sandbox))),
            changed: Condvar::new(),
        })
    }

    /// The pod's running VM for `launch`, and `launch` as it joins the VM (its devices
    /// are the VM's). The VM is booted for `launch` (its devices with the pod's from
    /// `learn`, cpus, memory, guest and driver) when the pod has none yet; a later
    /// container's devices must be among those the VM was booted with. Waits until the
    /// VM's own process runs.
    pub fn join(
        self: &Arc<Self>,
        launcher: &Arc<dyn Launcher>,
        mut launch: Launch,
        learn: &Learn<'_>,
    ) -> Result<(EventSender, Launch), String> {
        let d = &launch.request.devices;
        let wanted = crate::devices::from_fields(d.gpus.as_deref(), &d.functions)
            .map_err(|e| format!("pod {}: {e}", self.id))?;
        let mut s = lock(&self.state);
        if let State::Waiting(_) = &*s {
            let all = self.pod_devices(wanted, learn)?;
            let State::Waiting(sandbox) =
                std::mem::replace(&mut *s, State::Booting { stop: false })
            else {
                unreachable!("matched above")
            };
            let pod_vm = pod_launch(*sandbox, &launch, &all);
            *lock(&self.plugged) = all;
            if let Err(why) = self.boot(launcher, pod_vm) {
                *s = State::Gone(why.clone());
                return Err(why);
            }
        } else {
            self.check_plugged(&wanted)?;
        }
        drop(s);
        let vm = self.running()?;
        launch.request.devices.gpus = None;
        launch.request.devices.functions.clear();
        Ok((vm, launch))
    }

    /// `first`'s devices and those the kubelet gave the pod's other containers.
    fn pod_devices(&self, first: Passed, learn: &Learn<'_>) -> Result<Passed, String> {
        let (Some(name), Some(source)) = (&self.name, learn.resources) else {
            return Ok(first);
        };
        let mut all = first;
        let learnt = source
            .functions(name)
            .map_err(|e| format!("pod {}: {}", self.id, gpucell_runtime::error_chain(&e)))?;
        crate::devices::add_functions(learn.root, &mut all, &learnt)
            .map_err(|e| format!("pod {}: {}", self.id, gpucell_runtime::error_chain(&e)))?;
        if !learnt.is_empty() {
            tracing::info!(pod = %self.id, kubelet_pod = %name, functions = ?learnt, "devices from the kubelet's PodResources");
        }
        Ok(all)
    }

    /// A later container's devices are among the VM's.
    fn check_plugged(&self, wanted: &Passed) -> Result<(), String> {
        let plugged = lock(&self.plugged);
        let missing: Vec<String> = wanted
            .gpus
            .iter()
            .chain(&wanted.functions)
            .filter(|b| !plugged.gpus.contains(b) && !plugged.functions.contains(b))
            .map(|b| b.to_string())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(format!(
            "pod {}: its VM is already running without {}: a pod's devices are cold-plugged when its VM boots, so they must be its first application container's or listed for the pod by the kubelet's PodResources API",
            self.id,
            missing.join(", ")
        ))
    }

    /// Waits until the pod's VM runs its own process.
    fn running(&self) -> Result<EventSender, String> {
        let mut s = lock(&self.state);
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

/// Where a booting pod learns its devices.
pub struct Learn<'a> {
    pub root: &'a HostRoot,
    /// The kubelet's PodResources API; none outside Kubernetes.
    pub resources: Option<&'a dyn PodResources>,
}

/// The pod VM's launch: the sandbox container's rootfs, network and process, with the
/// pod's devices `all`, the first application container's guest, driver and device
/// options, and the larger of the two's cpus and memory.
fn pod_launch(sandbox: Launch, first: &Launch, all: &Passed) -> Launch {
    let mut request = sandbox.request;
    let f = &first.request;
    request.devices = f.devices.clone();
    request.devices.gpus = all.gpus_field();
    request.devices.functions = all.functions_field();
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
        let all = crate::devices::from_fields(
            first.request.devices.gpus.as_deref(),
            &first.request.devices.functions,
        )
        .unwrap();
        let l = pod_launch(sandbox, &first, &all);
        assert_eq!(l.rootfs, PathBuf::from("/rootfs/pause"));
        assert!(!l.sandbox, "the pod VM is a VM, not a held sandbox");
        assert_eq!(l.request.devices.functions, ["0000:41:00.0"]);
        assert_eq!((l.request.cpus, l.request.memory_mib), (4, 4096));
        assert_eq!(l.request.driver.as_deref(), Some("550"));
        assert_eq!(l.request.pod_slots, POD_SLOTS);
        assert_eq!(l.request.devices.gpus, None);
        assert_eq!(
            l.request.network.pod_netns.as_deref(),
            Some(std::path::Path::new("/run/netns/p1"))
        );
    }

    #[test]
    fn a_later_container_may_name_only_devices_the_vm_booted_with() {
        let pod = Pod::new("sb1", PathBuf::from("/b"), launch("pause"), None);
        *lock(&pod.plugged) = crate::devices::from_fields(
            Some("0000:41:00.0,0000:42:00.0"),
            &["0000:00:05.0".into()],
        )
        .unwrap();
        let within =
            crate::devices::from_fields(Some("0000:42:00.0"), &["0000:00:05.0".into()]).unwrap();
        pod.check_plugged(&within).unwrap();
        pod.check_plugged(&Passed::default()).unwrap();
        let outside = crate::devices::from_fields(Some("0000:41:00.0,0000:43:00.0"), &[]).unwrap();
        let err = pod.check_plugged(&outside).unwrap_err();
        assert!(
            err.contains("0000:43:00.0")
                && !err.contains("0000:41:00.0")
                && err.contains("PodResources"),
            "{err}"
        );
    }
}

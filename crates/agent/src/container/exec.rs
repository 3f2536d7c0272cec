//! An exec: a process started in a running container. It joins the container's uts and
//! mount namespaces (so its root is the container's) in the child, and is born in the
//! container's pid namespace: the agent enters that one for the clone and returns to its
//! own at once (a single-threaded PID 1 may always go back to its own). The user, the
//! executable and the environment are resolved in the container's root through
//! `/proc/<pid>/root`, as for the workload.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use gpucell_protocol::{ProcSpec, RootfsSpec, RunSpec};
use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::unistd::{self, Pid};

use super::{
    prepare, spawn_with, spawn_with_terminal, user_and_exec, ChildIo, ContainerError, Prepared,
    Stdio,
};

/// The namespaces an exec joins, opened before the clone.
struct Namespaces {
    pid: OwnedFd,
    mnt: OwnedFd,
    uts: OwnedFd,
    own_pid: OwnedFd,
}

fn open_ns(path: String) -> Result<OwnedFd, ContainerError> {
    File::open(&path).map(OwnedFd::from).map_err(|e| {
        ContainerError::Child(format!(
            "opening {path}: {e} (the container is no longer running)"
        ))
    })
}

impl Namespaces {
    fn of(target: Pid) -> Result<Self, ContainerError> {
        let ns = |name: &str| open_ns(format!("/proc/{target}/ns/{name}"));
        Ok(Namespaces {
            pid: ns("pid")?,
            mnt: ns("mnt")?,
            uts: ns("uts")?,
            own_pid: open_ns("/proc/self/ns/pid".into())?,
        })
    }
}

/// The exec spec as the run spec that [`prepare`] checks and resolves.
fn as_run_spec(spec: &ProcSpec) -> RunSpec {
    RunSpec {
        args: spec.args.clone(),
        env: spec.env.clone(),
        cwd: spec.cwd.clone(),
        user: spec.user.clone(),
        hostname: String::new(),
        rootfs: RootfsSpec {
            device: String::new(),
            fstype: String::new(),
        },
        overlay_bytes: None,
        devices: Vec::new(),
        device_wait_ms: 0,
        gpu: None,
        pod_sandbox: false,
        etc_files: Vec::new(),
        terminal: spec.terminal,
        window: spec.window,
        volumes: Vec::new(),
    }
}

/// Starts `spec` in the container whose first process is `target`. Returns its pid (in
/// the agent's namespace) and its stdio, as [`super::spawn`] does.
pub fn spawn_exec(target: Pid, spec: &ProcSpec) -> Result<(Pid, Stdio), ContainerError> {
    let root = PathBuf::from(format!("/proc/{target}/root"));
    let prepared = prepare(&root, &as_run_spec(spec))?;
    let ns = Namespaces::of(target)?;
    let pid_ns = Some((&ns.pid, &ns.own_pid));
    let body = |io| exec_child(&prepared, &ns, io);
    if prepared.terminal.is_some() {
        return spawn_with_terminal(CloneFlags::empty(), pid_ns, &body);
    }
    spawn_with(CloneFlags::empty(), pid_ns, &body)
}

/// Runs in the cloned child; returns only on failure, with a message for the host.
fn exec_child(p: &Prepared, ns: &Namespaces, io: ChildIo) -> Result<(), String> {
    let sys = |what: &'static str| move |e: Errno| format!("{what}: {e}");
    unistd::setsid().map_err(sys("setsid"))?;
    io.pipes("the exec")?;
    nix::sched::setns(&ns.uts, CloneFlags::CLONE_NEWUTS)
        .map_err(sys("setns into the container's uts namespace"))?;
    nix::sched::setns(&ns.mnt, CloneFlags::CLONE_NEWNS)
        .map_err(sys("setns into the container's mount namespace"))?;
    unistd::chdir("/").map_err(sys("chdir / in the container"))?;
    io.terminal(p)?;
    user_and_exec(p)
}

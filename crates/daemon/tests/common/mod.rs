//! A real `gpucelld` process on a private state dir and unix socket, borrowing the guest
//! artifacts of `GPUCELL_TEST_STATE_DIR`, with the busybox demo image; and checks that
//! nothing of it is left behind.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpucell_api::{Client, DeployRequest, LogLine, SandboxState, SandboxStatus};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub struct Env {
    pub state: tempfile::TempDir,
    pub image: String,
    pub socket: PathBuf,
    pub daemon: Option<Child>,
    pub rt: tokio::runtime::Runtime,
    /// Flags after `serve --socket S`.
    pub serve_args: Vec<String>,
}

/// `None` (with the reason printed) without guest artifacts, QEMU or the image tools.
pub fn env(need_qemu: bool) -> Option<Env> {
    env_with(need_qemu, &[])
}

/// [`env`] with more `serve` flags.
pub fn env_with(need_qemu: bool, serve_args: &[&str]) -> Option<Env> {
    let Some(shared) = std::env::var_os("GPUCELL_TEST_STATE_DIR").map(PathBuf::from) else {
        eprintln!("skipping: GPUCELL_TEST_STATE_DIR is not set (make test sets it after `gpucell guest build`)");
        return None;
    };
    let guest = shared.join("guest");
    if !guest.join("default/manifest.json").is_file() {
        eprintln!("skipping: no guest artifacts in {}", guest.display());
        return None;
    }
    if need_qemu && !Path::new("/usr/bin/qemu-system-x86_64").exists() {
        eprintln!("skipping: qemu-system-x86_64 is not installed");
        return None;
    }
    let state = tempfile::Builder::new()
        .prefix("gd")
        .tempdir_in("/tmp")
        .ok()?;
    let layout = state.path().join("oci");
    let out = Command::new(repo_root().join("scripts/make-demo-image.sh"))
        .arg(&layout)
        .arg("demo")
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "skipping: scripts/make-demo-image.sh failed (needs umoci and busybox-static): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    std::os::unix::fs::symlink(&guest, state.path().join("guest")).ok()?;
    let socket = state.path().join("d.sock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut env = Env {
        image: format!("oci:{}:demo", layout.display()),
        state,
        socket,
        daemon: None,
        rt,
        serve_args: serve_args.iter().map(|s| s.to_string()).collect(),
    };
    env.start_daemon();
    Some(env)
}

impl Env {
    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    pub fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.path().join("gpucelld.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gpucelld"))
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("serve")
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.serve_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self.rt.block_on(async {
                let c = self.client();
                match c.send(hyper::Method::GET, "/readyz", None).await {
                    Ok(r) => r.status() == 200,
                    Err(_) => false,
                }
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gpucelld not ready: {}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9` of the daemon (its supervisors are left alone).
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("gpucelld.log")).unwrap_or_default()
    }

    pub fn request(&self, command: &[&str]) -> DeployRequest {
        let mut run = gpucell_runtime::RunRequest::new(self.image.clone());
        run.command = command.iter().map(|s| s.to_string()).collect();
        run.accel = gpucell_runtime::AccelRequest::Tcg;
        // No network in the machine's own namespace (private networks are tested in
        // namespaces of their own).
        run.network.mode = Some(gpucell_net::NetworkMode::None);
        DeployRequest::new(run)
    }

    pub fn deploy(&self, req: &DeployRequest) -> SandboxStatus {
        self.rt
            .block_on(self.client().deploy(req))
            .unwrap_or_else(|e| panic!("deploy: {e}"))
    }

    pub fn get(&self, id: &str) -> SandboxStatus {
        self.rt.block_on(self.client().get(id)).unwrap()
    }

    pub fn logs(&self, id: &str) -> Vec<LogLine> {
        let mut out = Vec::new();
        self.rt
            .block_on(self.client().logs(id, None, false, |l| out.push(l)))
            .unwrap();
        out
    }

    pub fn stdout_of(&self, id: &str) -> String {
        self.logs(id)
            .into_iter()
            .filter(|l| l.stream == "stdout")
            .map(|l| l.line + "\n")
            .collect()
    }

    /// Waits until `pred` holds of the sandbox; panics with its status and log after
    /// `secs`.
    pub fn wait_for(
        &self,
        id: &str,
        secs: u64,
        what: &str,
        pred: impl Fn(&SandboxStatus, &Env) -> bool,
    ) -> SandboxStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let st = self.get(id);
            if pred(&st, self) {
                return st;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}: {st:#?}\nlogs: {:?}\ndaemon: {}",
                    self.logs(id),
                    self.daemon_log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn wait_state(&self, id: &str, state: SandboxState, secs: u64) -> SandboxStatus {
        self.wait_for(id, secs, state.as_str(), |s, _| s.state == state)
    }

    /// Pids of processes whose command line mentions this state dir (supervisors, QEMU).
    pub fn processes(&self, what: &str) -> Vec<u32> {
        processes_mentioning(&self.state.path().to_string_lossy(), what)
    }

    /// No QEMU, supervisor or run directory of this state dir is left.
    pub fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let qemu = self.processes("qemu-system");
            let sup = self.processes("supervise");
            let runs: Vec<_> = std::fs::read_dir(self.state.path().join("run"))
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            if qemu.is_empty() && sup.is_empty() && runs.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind: qemu {qemu:?} supervisors {sup:?} run dirs {runs:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.kill_daemon();
        for pid in self.processes("supervise") {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        for pid in self.processes("qemu-system") {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    }
}

pub fn processes_mentioning(needle: &str, what: &str) -> Vec<u32> {
    gpucell_host::testing::processes_with(&[what, needle])
}

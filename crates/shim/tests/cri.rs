//! Pods through containerd's CRI plugin, as the kubelet runs them: a real containerd
//! (Debian's, fetched by scripts/fetch-containerd.sh into target/containerd, or the
//! directory named by GPUCELL_TEST_CONTAINERD) with its own config, root and state, the
//! native snapshotter, the CRI plugin on with a runtime handler `gpucell` →
//! `io.containerd.gpucell.v1`, and the demo busybox image imported offline into the
//! `k8s.io` namespace (it is the pod's sandbox image too: the gpucell shim runs nothing
//! for a sandbox container). The test drives containerd with the CRI v1 client of
//! `gpucell-cri-client`: a pod in the node's network namespace (no CNI needed) with a
//! container that exits 7; then a pod network: `ctr run --with-ns` into namespaces of the
//! test's own, and a CRI pod whose namespace a CNI plugin of the test's own wires to a
//! peer. `cri_exec_sync` checks ExecSync; `cri_a_tty_container_has_a_terminal` a container
//! with `tty: true`.
//!
//! Skips with a printed reason when not root, without guest artifacts
//! (GPUCELL_TEST_STATE_DIR), QEMU, umoci/busybox-static, or containerd.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use gpucell_cri_client::v1::{ContainerState, Mount, NamespaceMode, PodSandboxConfig};
use gpucell_cri_client::{container_config, log_lines, pod_config, CriClient};

mod common;
use common::{demo_image_archive, processes_mentioning, IMAGE};
const HANDLER: &str = "gpucell";

#[path = "cri/netns.rs"]
mod netns;
use netns::*;

/// A containerd of the test's own, with the CRI plugin.
struct Env {
    dir: tempfile::TempDir,
    bin: PathBuf,
    containerd: Option<Child>,
}

fn setup() -> Option<Env> {
    let common::Prepared { dir, bin } = common::prepare("gc", &["cni/bin", "cni/conf", "logs"])?;
    let mut env = Env {
        dir,
        bin,
        containerd: None,
    };
    env.write_config();
    env.start();
    if !env.import_image() {
        return None;
    }
    Some(env)
}

impl Env {
    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn sock(&self) -> String {
        self.p("c.sock").display().to_string()
    }

    /// containerd 1.6/1.7's config (version 2) with the CRI plugin and the gpucell
    /// runtime handler, as docs/kubernetes.md tells a node to have.
    fn write_config(&self) {
        let d = self.dir.path().display();
        let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/st\"\n\
             [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n\
             [{cri}]\n  sandbox_image = \"{IMAGE}\"\n\
             [{cri}.cni]\n  bin_dir = \"{d}/cni/bin\"\n  conf_dir = \"{d}/cni/conf\"\n\
             [{cri}.containerd]\n  snapshotter = \"native\"\n  default_runtime_name = \"{HANDLER}\"\n\
             [{cri}.containerd.runtimes.{HANDLER}]\n  runtime_type = \"io.containerd.gpucell.v1\"\n\
             \x20 pod_annotations = [\"io.gpucell.*\"]\n"
        );
        std::fs::write(self.p("config.toml"), config).unwrap();
        self.write_cni();
    }

    /// A CNI plugin of the test's own (`gctest`, a shell script) for pods with a network
    /// of their own: ADD makes a veth pair in the peer namespace ([`PodNetns`]), moves
    /// one end into the pod's namespace as its interface with `CNI_POD_ADDR`/24 and a
    /// default route via the peer's `CNI_PEER_ADDR`; DEL deletes the pair.
    fn write_cni(&self) {
        let peer = peer_netns_name();
        let made = self.p("cni/netns.list").display().to_string();
        let script = format!(
            r#"#!/bin/sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin
case "$CNI_COMMAND" in
VERSION) echo '{{"cniVersion":"0.4.0","supportedVersions":["0.3.0","0.3.1","0.4.0"]}}' ;;
ADD)
  echo "$CNI_NETNS" >> {made}
  ip -n {peer} link del vb2 2>/dev/null
  ip -n {peer} link add cnitmp0 type veth peer name vb2 >&2 || exit 1
  ip -n {peer} addr add {CNI_PEER_ADDR}/24 dev vb2 >&2 && ip -n {peer} link set vb2 up >&2 || exit 1
  ip -n {peer} link set cnitmp0 netns "$CNI_NETNS" >&2 || exit 1
  nsenter --net="$CNI_NETNS" sh -c "ip link set cnitmp0 name $CNI_IFNAME && ip addr add {CNI_POD_ADDR}/24 dev $CNI_IFNAME && ip link set $CNI_IFNAME up && ip link set lo up && ip route add default via {CNI_PEER_ADDR}" >&2 || exit 1
  mac=$(nsenter --net="$CNI_NETNS" ip -br link show "$CNI_IFNAME" | awk '{{print $3}}')
  printf '{{"cniVersion":"0.4.0","interfaces":[{{"name":"%s","mac":"%s","sandbox":"%s"}}],"ips":[{{"version":"4","address":"{CNI_POD_ADDR}/24","gateway":"{CNI_PEER_ADDR}","interface":0}}]}}' "$CNI_IFNAME" "$mac" "$CNI_NETNS"
  ;;
DEL) ip -n {peer} link del vb2 2>/dev/null; exit 0 ;;
*) exit 0 ;;
esac
"#
        );
        let bin = self.p("cni/bin/gctest");
        std::fs::write(&bin, script).unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        // containerd's CRI sets up the pod's loopback through a plugin too.
        let lo = self.p("cni/bin/loopback");
        std::fs::write(
            &lo,
            "#!/bin/sh\nPATH=/usr/sbin:/usr/bin:/sbin:/bin\n\
             [ \"$CNI_COMMAND\" = ADD ] || exit 0\n\
             nsenter --net=\"$CNI_NETNS\" ip link set lo up >&2 || exit 1\n\
             printf '{\"cniVersion\":\"0.4.0\",\"interfaces\":[{\"name\":\"lo\",\"sandbox\":\"%s\"}]}' \"$CNI_NETNS\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&lo, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::write(
            self.p("cni/conf/10-gctest.conflist"),
            r#"{"cniVersion":"0.4.0","name":"gctest","plugins":[{"type":"gctest"}]}"#,
        )
        .unwrap();
    }

    /// Starts containerd and waits until its CRI service answers.
    fn start(&mut self) {
        let log = std::fs::File::create(self.p("containerd.log")).unwrap();
        let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-gpucell-v1"));
        let path = format!(
            "{}:{}:{}",
            shim.parent().unwrap().display(),
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new(self.bin.join("containerd"));
        cmd.arg("--config")
            .arg(self.p("config.toml"))
            .env("PATH", path)
            .env("GPUCELL_STATE_DIR", self.p("state"))
            .env(
                "GPUCELL_SHIM_LOG",
                std::env::var("GPUCELL_SHIM_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if std::env::var_os("GPUCELL_ACCEL").is_none() {
            cmd.env("GPUCELL_ACCEL", "tcg");
        }
        self.containerd = Some(cmd.spawn().unwrap());
        let t = Instant::now();
        loop {
            let answer = CriClient::connect(&self.p("c.sock")).and_then(|c| c.version());
            match answer {
                Ok(v) => {
                    assert_eq!(v.runtime_name, "containerd");
                    return;
                }
                Err(e) => assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "containerd's CRI service does not answer: {e}\n{}",
                    self.log()
                ),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.p("containerd.log")).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new(self.bin.join("ctr"))
            .arg("-a")
            .arg(self.sock())
            .args(["-n", "k8s.io"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// The demo image (umoci, busybox), named for containerd, imported offline into the
    /// namespace of the CRI plugin.
    fn import_image(&self) -> bool {
        let Some(tar) = demo_image_archive(self.dir.path(), IMAGE) else {
            return false;
        };
        let out = self.ctr(&[
            "images",
            "import",
            "--snapshotter",
            "native",
            tar.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        true
    }

    fn cri(&self) -> CriClient {
        CriClient::connect(&self.p("c.sock")).unwrap()
    }

    /// Waits until container `id` has exited; returns its status.
    fn wait_exited(
        &self,
        cri: &CriClient,
        id: &str,
        limit: Duration,
    ) -> gpucell_cri_client::v1::ContainerStatus {
        let t = Instant::now();
        loop {
            let s = cri.container_status(id).unwrap();
            if s.state == ContainerState::ContainerExited as i32 {
                return s;
            }
            assert!(
                t.elapsed() < limit,
                "container {id} did not exit (state {}); containerd log:\n{}",
                s.state,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Shim processes serving this containerd.
    fn shims(&self) -> Vec<u32> {
        processes_mentioning(&self.sock(), "containerd-shim-gpucell")
    }

    /// No VM, shim, disk or run directory is left.
    fn assert_clean(&self) {
        let t = Instant::now();
        while !self.shims().is_empty() {
            assert!(t.elapsed() < Duration::from_secs(20), "a shim is left");
            std::thread::sleep(Duration::from_millis(250));
        }
        let state = self.p("state").display().to_string();
        assert!(
            processes_mentioning(&state, "qemu-system").is_empty(),
            "QEMU left behind"
        );
        for d in ["state/tmp", "state/run"] {
            let left: Vec<_> = std::fs::read_dir(self.p(d))
                .map(|r| r.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "left behind in {d}: {left:?}");
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut c) = self.containerd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Shims a failed step left: they were started for this test only.
        for pid in self.shims() {
            // SAFETY: plain kill(2) of a process this test's containerd started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        // Pod namespaces a killed containerd could not remove (the CNI plugin lists
        // those it configured).
        let made = std::fs::read_to_string(self.p("cni/netns.list")).unwrap_or_default();
        for ns in made.lines().filter(|l| Path::new(l).exists()) {
            if let Some(name) = Path::new(ns).file_name().and_then(|n| n.to_str()) {
                let _ = ip(&["netns", "del", name]);
            }
        }
        // The CRI plugin mounts the sandbox's /dev/shm under its state directory.
        let st = self.p("st");
        for m in mounts_under(&st) {
            let Ok(c) = std::ffi::CString::new(m) else {
                continue;
            };
            // SAFETY: umount2 of a path this test's containerd mounted.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Mount points under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<String> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.len()));
    out
}

/// A pod with one container that prints a line to its log and exits 7.
fn pod_with_one_container(env: &Env) {
    let cri = env.cri();
    let logs = env.p("logs/p1");
    let pod = pod_config("p1", &logs);
    let pod_id = cri.run_pod_sandbox(pod.clone(), HANDLER).unwrap();
    let config = container_config(
        "c1",
        IMAGE,
        &["sh", "-c", "echo hello-from-a-pod; exit 7"],
        "c1.log",
    );
    let id = cri.create_container(&pod_id, config, pod.clone()).unwrap();
    cri.start_container(&id).unwrap();
    let status = env.wait_exited(&cri, &id, Duration::from_secs(240));
    assert_eq!(status.exit_code, 7, "{status:?}");
    let log = std::fs::read_to_string(logs.join("c1.log")).unwrap_or_default();
    assert!(
        log_lines(&log).iter().any(|l| l == "hello-from-a-pod"),
        "the container's log: {log:?}"
    );
    cri.remove_container(&id).unwrap();
    // Removed: containerd no longer knows the container.
    assert!(cri.container_status(&id).is_err());
    cri.stop_pod_sandbox(&pod_id).unwrap();
    cri.remove_pod_sandbox(&pod_id).unwrap();
}

/// The first `boot:<id>` line of container `id`'s log, waiting up to 240 s for it; a
/// container that exits first fails the test at once, with its log.
fn boot_id_in_log(env: &Env, cri: &CriClient, id: &str, log_path: &Path) -> String {
    let t = Instant::now();
    loop {
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        if let Some(b) = log_lines(&log)
            .iter()
            .find_map(|l| l.strip_prefix("boot:").map(|b| b.trim().to_string()))
        {
            return b;
        }
        let status = cri.container_status(id).unwrap();
        assert!(
            status.state != ContainerState::ContainerExited as i32,
            "{} exited without its boot line: {status:?}\n{log}\n{}",
            log_path.display(),
            env.log()
        );
        assert!(
            t.elapsed() < Duration::from_secs(240),
            "{} has no boot line: {log}\n{}",
            log_path.display(),
            env.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The QEMU processes of this test's containerd.
fn qemus(env: &Env) -> Vec<u32> {
    processes_mentioning(&env.p("state").display().to_string(), "qemu-system")
}

/// ExecSync in a running container: the exit code and output come back, and the
/// process ran in the container's VM (the guest's boot_id, not the host's).
fn exec_sync_runs_in_the_containers_vm(
    env: &Env,
    cri: &CriClient,
    pod_id: &str,
    pod: &PodSandboxConfig,
    logs: &Path,
) {
    let config = container_config(
        "c3",
        IMAGE,
        &[
            "sh",
            "-c",
            "echo boot:$(cat /proc/sys/kernel/random/boot_id); sleep 600",
        ],
        "c3.log",
    );
    let id = cri.create_container(pod_id, config, pod.clone()).unwrap();
    cri.start_container(&id).unwrap();
    let boot = boot_id_in_log(env, cri, &id, &logs.join("c3.log"));
    let host = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_ne!(boot.trim(), host.trim(), "the container runs in a VM");
    let out = cri
        .exec_sync(
            &id,
            &[
                "sh",
                "-c",
                "cat /proc/sys/kernel/random/boot_id; echo exec-err >&2; exit 4",
            ],
            60,
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", env.log()));
    assert_eq!(out.exit_code, 4, "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        boot.trim(),
        "the exec ran in c3's VM"
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "exec-err\n");
    cri.stop_container(&id, 2).unwrap();
    let status = env.wait_exited(cri, &id, Duration::from_secs(60));
    assert_ne!(status.exit_code, 0, "stopped: {status:?}");
    cri.remove_container(&id).unwrap();
}

/// `ctr run --with-ns network:PATH` through the shim: the VM takes over the pod's
/// interface (its address, MAC and gateway) and reaches an HTTP server on the veth's
/// other end; afterwards the pod's namespace holds no tap and no redirect.
fn pod_network_reaches_its_peer(env: &Env) {
    let web = env.p("web");
    std::fs::create_dir_all(&web).unwrap();
    std::fs::write(web.join("hello.txt"), "hello-from-the-peer\n").unwrap();
    let ns = match PodNetns::new(&web) {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("skipping the pod network step: {e}");
            return;
        }
    };
    let mac = ns.show(&["cat", "/sys/class/net/eth0/address"]);
    let with_ns = format!("network:{}", ns.path());
    // nc, as the static busybox's wget crashes.
    let script = format!(
        "ip addr show eth0; for i in 1 2 3 4 5; do \
         printf 'GET /hello.txt HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {PEER_ADDR} 8080 | grep hello && exit 0; \
         sleep 1; done; exit 9"
    );
    let out = env.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "native",
        "--runtime",
        "io.containerd.gpucell.v1",
        "--with-ns",
        &with_ns,
        IMAGE,
        "n1",
        "sh",
        "-c",
        &script,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.log()
    );
    assert!(stdout.contains("hello-from-the-peer"), "{stdout}");
    assert!(
        stdout.contains(&format!("{POD_ADDR}/24")),
        "the guest's eth0: {stdout}"
    );
    assert!(
        !mac.trim().is_empty() && stdout.contains(mac.trim()),
        "the guest's eth0 has the pod interface's MAC {mac:?}: {stdout}"
    );
    let links = ns.show(&["ip", "link", "show"]);
    assert!(!links.contains("gctap0"), "the tap is left: {links}");
    let qdiscs = ns.show(&["tc", "qdisc", "show", "dev", "eth0"]);
    assert!(
        !qdiscs.contains("ingress"),
        "the redirect is left: {qdiscs}"
    );
    cri_pod_with_a_cni_network(env);
}

/// A CRI pod with a network of its own (the test's CNI plugin): the application
/// container's spec names the sandbox's pid (the shim's), yet its VM gets the pod's
/// CNI interface and reaches the peer.
fn cri_pod_with_a_cni_network(env: &Env) {
    let cri = env.cri();
    let logs = env.p("logs/p2");
    let mut pod = pod_config("p2", &logs);
    if let Some(ns) = pod
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
    {
        ns.network = NamespaceMode::Pod as i32;
    }
    let pod_id = cri
        .run_pod_sandbox(pod.clone(), HANDLER)
        .unwrap_or_else(|e| panic!("{e}\n{}", env.log()));
    let script = format!(
        "ip addr show eth0; for i in 1 2 3 4 5; do \
         printf 'GET /hello.txt HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {CNI_PEER_ADDR} 8080 | grep hello && exit 0; \
         sleep 1; done; exit 9"
    );
    let config = container_config("c2", IMAGE, &["sh", "-c", &script], "c2.log");
    let id = cri.create_container(&pod_id, config, pod.clone()).unwrap();
    cri.start_container(&id).unwrap();
    let status = env.wait_exited(&cri, &id, Duration::from_secs(240));
    let log = std::fs::read_to_string(logs.join("c2.log")).unwrap_or_default();
    assert_eq!(status.exit_code, 0, "{status:?}\nlog: {log}");
    let lines = log_lines(&log);
    assert!(
        lines.iter().any(|l| l.contains("hello-from-the-peer")),
        "{log}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("{CNI_POD_ADDR}/24"))),
        "the guest's eth0: {log}"
    );
    cri.remove_container(&id).unwrap();
    cri.stop_pod_sandbox(&pod_id).unwrap();
    cri.remove_pod_sandbox(&pod_id).unwrap();
}

/// Two containers of one pod run in one VM: the same guest boot_id (not the host's),
/// one QEMU; an exec reaches the second; the first ends while the second runs on; the
/// pod's stop ends the VM and the second container with it. Their volumes: the second
/// reads what the first wrote in their emptyDir and finds a ConfigMap read-only; a
/// hostPath is refused by name.
#[test]
fn cri_containers_of_a_pod_share_its_vm() {
    let Some(env) = setup() else { return };
    let cri = env.cri();
    let logs = env.p("logs/p4");
    let mut pod = pod_config("p4", &logs);
    // The pod's DNS, as the kubelet sets it: containerd writes the pod's resolv.conf and
    // bind-mounts it into each container; its content reaches the containers in the VM.
    pod.dns_config = Some(gpucell_cri_client::v1::DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["ns1.svc.cluster.local".into()],
        options: vec![],
    });
    let pod_id = cri.run_pod_sandbox(pod.clone(), HANDLER).unwrap();
    assert!(
        qemus(&env).is_empty(),
        "a pod's sandbox boots no VM by itself"
    );
    // The pod's volumes, as the kubelet lays them out: c1 writes into the emptyDir, c2
    // reads it and finds the ConfigMap read-only.
    let mounts = kubelet_volumes(&env);
    let script = |name: &str| {
        let volumes = if name == "c1" {
            "echo shared-by-c1 > /cache/from-c1"
        } else {
            "for i in $(seq 60); do [ -f /cache/from-c1 ] && break; sleep 1; done; \
             echo c2-cache:$(cat /cache/from-c1); echo c2-cfg:$(cat /etc/cfg/game.conf); \
             touch /etc/cfg/x 2>/dev/null && echo c2-cfg:writable || echo c2-cfg:read-only; \
             echo bye > /dev/termination-log && echo c2-term:$(cat /dev/termination-log)"
        };
        format!(
            "{volumes}; echo boot:$(cat /proc/sys/kernel/random/boot_id); echo {name}:$(hostname); \
             sed 's/^/{name}-resolv:/' /etc/resolv.conf; sleep 600"
        )
    };
    let mut ids = Vec::new();
    for name in ["c1", "c2"] {
        let mut config = container_config(
            name,
            IMAGE,
            &["sh", "-c", &script(name)],
            &format!("{name}.log"),
        );
        config.mounts = mounts.clone();
        let id = cri.create_container(&pod_id, config, pod.clone()).unwrap();
        cri.start_container(&id)
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", env.log()));
        ids.push(id);
    }
    let b1 = boot_id_in_log(&env, &cri, &ids[0], &logs.join("c1.log"));
    let b2 = boot_id_in_log(&env, &cri, &ids[1], &logs.join("c2.log"));
    let host = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_ne!(b1, host.trim(), "the pod runs in a VM");
    assert_eq!(b1, b2, "both containers run in the pod's one VM");
    for name in ["c1", "c2"] {
        let mut wanted: Vec<String> = ["search ns1.svc.cluster.local", "nameserver 10.96.0.10"]
            .map(|w| format!("{name}-resolv:{w}"))
            .to_vec();
        if name == "c2" {
            wanted.extend(
                [
                    "c2-cache:shared-by-c1",
                    "c2-cfg:lives=3",
                    "c2-cfg:read-only",
                    "c2-term:bye",
                ]
                .map(String::from),
            );
        }
        wait_for_lines(&logs.join(format!("{name}.log")), &wanted);
    }
    host_path_is_refused(&env, &cri, &pod_id, &pod);
    assert_eq!(qemus(&env).len(), 1, "one QEMU for the pod");
    // The first container ends; the second runs on in the VM and takes an exec.
    cri.stop_container(&ids[0], 2).unwrap();
    let status = env.wait_exited(&cri, &ids[0], Duration::from_secs(60));
    assert_ne!(status.exit_code, 0, "stopped: {status:?}");
    let out = cri
        .exec_sync(
            &ids[1],
            &["sh", "-c", "cat /proc/sys/kernel/random/boot_id; ls /"],
            60,
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", env.log()));
    assert_eq!(out.exit_code, 0, "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().next(),
        Some(b1.as_str()),
        "the exec ran in the pod's VM"
    );
    let c2 = cri.container_status(&ids[1]).unwrap();
    assert_eq!(c2.state, ContainerState::ContainerRunning as i32, "{c2:?}");
    ports_are_reused(&env, &cri, &pod_id, &pod);
    // Stopping the pod stops its VM, and the container in it.
    cri.stop_pod_sandbox(&pod_id).unwrap();
    let status = env.wait_exited(&cri, &ids[1], Duration::from_secs(60));
    assert_ne!(status.exit_code, 0, "{status:?}");
    for id in &ids {
        cri.remove_container(id).unwrap();
    }
    cri.remove_pod_sandbox(&pod_id).unwrap();
    env.assert_clean();
}

/// Waits up to 30 s until the container log at `path` has every line of `wanted`.
fn wait_for_lines(path: &Path, wanted: &[String]) {
    let t = Instant::now();
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        let lines = log_lines(&log);
        if wanted.iter().all(|w| lines.contains(w)) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{}: /etc/resolv.conf or volumes are not the pod's: {log}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// More containers than the pod's VM has spare ports, one after another (a restarting
/// container does this): an ended container's disk is unplugged and its port taken again.
fn ports_are_reused(env: &Env, cri: &CriClient, pod_id: &str, pod: &PodSandboxConfig) {
    let logs = Path::new(&pod.log_directory);
    for n in 0..=gpucell_shim::pod::POD_SLOTS {
        let name = format!("r{n}");
        let config = container_config(
            &name,
            IMAGE,
            &["sh", "-c", "exit 3"],
            &format!("{name}.log"),
        );
        let id = cri.create_container(pod_id, config, pod.clone()).unwrap();
        cri.start_container(&id).unwrap();
        let status = env.wait_exited(cri, &id, Duration::from_secs(120));
        let log = std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap_or_default();
        assert_eq!(
            status.exit_code,
            3,
            "{name}: {status:?}\n{log}\n{}",
            env.log()
        );
        cri.remove_container(&id).unwrap();
    }
}

/// A ConfigMap (the kubelet's `..data` layout), an emptyDir and a termination log under
/// a kubelet-like pod directory of the test's own, as the CRI mounts of a container.
fn kubelet_volumes(env: &Env) -> Vec<Mount> {
    let vols = env.p("kubelet/pods/uid-p4/volumes");
    let cfg = vols.join("kubernetes.io~configmap/cfg");
    let ts = cfg.join("..2026_12_03_11_00_00.1");
    std::fs::create_dir_all(&ts).unwrap();
    std::fs::write(ts.join("game.conf"), "lives=3\n").unwrap();
    std::os::unix::fs::symlink("..2026_12_03_11_00_00.1", cfg.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/game.conf", cfg.join("game.conf")).unwrap();
    let cache = vols.join("kubernetes.io~empty-dir/cache");
    std::fs::create_dir_all(&cache).unwrap();
    let mount = |dest: &str, src: &Path, readonly: bool| Mount {
        container_path: dest.into(),
        host_path: src.display().to_string(),
        readonly,
        ..Default::default()
    };
    let log = env.p("kubelet/pods/uid-p4/containers/c/0");
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    std::fs::write(&log, "").unwrap();
    vec![
        mount("/etc/cfg", &cfg, true),
        mount("/cache", &cache, false),
        mount("/dev/termination-log", &log, false),
    ]
}

/// A host directory (a hostPath volume) is refused when the container's task is
/// created, by name; the pod runs on.
fn host_path_is_refused(env: &Env, cri: &CriClient, pod_id: &str, pod: &PodSandboxConfig) {
    let srv = env.p("srv");
    std::fs::create_dir_all(&srv).unwrap();
    let mut config = container_config("h", IMAGE, &["true"], "h.log");
    config.mounts = vec![Mount {
        container_path: "/data".into(),
        host_path: srv.display().to_string(),
        ..Default::default()
    }];
    let id = cri.create_container(pod_id, config, pod.clone()).unwrap();
    let err = cri.start_container(&id).unwrap_err().to_string();
    assert!(
        err.contains("/data") && err.contains(srv.to_str().unwrap()) && err.contains("host paths"),
        "{err}"
    );
    cri.remove_container(&id).unwrap();
}

/// ExecSync answers once the exec's output streams close: the host closes an exec's
/// writers (containerd's FIFOs) as soon as the agent reports its end.
#[test]
fn cri_exec_sync() {
    let Some(env) = setup() else { return };
    let cri = env.cri();
    let logs = env.p("logs/p3");
    let pod = pod_config("p3", &logs);
    let pod_id = cri.run_pod_sandbox(pod.clone(), HANDLER).unwrap();
    exec_sync_runs_in_the_containers_vm(&env, &cri, &pod_id, &pod, &logs);
    cri.stop_pod_sandbox(&pod_id).unwrap();
    cri.remove_pod_sandbox(&pod_id).unwrap();
    env.assert_clean();
}

#[test]
fn cri_pod_runs_in_a_gpucell_vm() {
    let Some(env) = setup() else { return };
    pod_with_one_container(&env);
    pod_network_reaches_its_peer(&env);
    env.assert_clean();
}

/// A container with `tty: true` (as `kubectl run -t` asks): it is added to its pod's VM
/// with a terminal, whose output (stdout and stderr merged) reaches the container's log.
#[test]
fn cri_a_tty_container_has_a_terminal() {
    let Some(env) = setup() else { return };
    let cri = env.cri();
    let logs = env.p("logs/p5");
    let pod = pod_config("p5", &logs);
    let pod_id = cri.run_pod_sandbox(pod.clone(), HANDLER).unwrap();
    let mut config = container_config(
        "t1",
        IMAGE,
        &["sh", "-c", "echo tty:$(tty); echo err-line >&2; exit 5"],
        "t1.log",
    );
    config.tty = true;
    let id = cri.create_container(&pod_id, config, pod.clone()).unwrap();
    cri.start_container(&id).unwrap();
    let status = env.wait_exited(&cri, &id, Duration::from_secs(240));
    let log = std::fs::read_to_string(logs.join("t1.log")).unwrap_or_default();
    assert_eq!(status.exit_code, 5, "{status:?}\n{log}\n{}", env.log());
    let lines = log_lines(&log);
    assert!(
        lines.iter().any(|l| l.starts_with("tty:/dev/pts/")),
        "the container's log: {log:?}"
    );
    // A terminal has no stderr: the line comes on stdout.
    assert!(
        log.lines()
            .any(|l| l.contains(" stdout ") && l.contains("err-line")),
        "{log:?}"
    );
    cri.remove_container(&id).unwrap();
    cri.stop_pod_sandbox(&pod_id).unwrap();
    cri.remove_pod_sandbox(&pod_id).unwrap();
    env.assert_clean();
}

//! `gpucell run --network private` end to end, in network namespaces this test makes:
//!
//! ```text
//!  "internet" ns           gpucell's ns (the "host")                 "LAN" ns
//!  203.0.113.1 ── veth ── 203.0.113.2 (only uplink)
//!  httpd :80               192.168.50.2 ─────────── veth ──────────── 192.168.50.1
//!                          httpd :9000 (a host service)               169.254.169.254 (lo)
//!                          taps of the sandboxes (10.200.0.0/16)      httpd :80
//! ```
//! gpucell runs inside the "host" namespace (`ip netns exec`), so every route, rule and
//! tap of these tests lives in namespaces they made, and no packet can leave them:
//! nothing is added to the machine's own namespace. Skips (with the reason printed)
//! without root, `ip`, `nft`, /dev/net/tun, or the VM test prerequisites.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{qemu_processes_mentioning, stderr, stdout, summary, vm_env, VmEnv};

/// The namespaces, links and servers of one test; all removed on drop.
struct Topo {
    host: String,
    inet: String,
    lan: String,
    servers: Vec<Child>,
    _www: tempfile::TempDir,
}

fn sh(args: &[&str]) -> Output {
    Command::new(args[0]).args(&args[1..]).output().unwrap()
}

fn ok(args: &[&str]) {
    let out = sh(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
}

fn skip_reason() -> Option<String> {
    if !nix_root() {
        return Some("needs root (network namespaces, taps, nftables)".into());
    }
    for tool in ["ip", "nft", "curl"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("no `{tool}` (scripts/install-deps.sh installs it)"));
        }
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    None
}

fn nix_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

impl Topo {
    fn new(tag: &str) -> Option<Topo> {
        if let Some(why) = skip_reason() {
            eprintln!("skipping: {why}");
            return None;
        }
        let n = format!("{}{tag}", std::process::id() % 100_000);
        let www = tempfile::tempdir().unwrap();
        let t = Topo {
            host: format!("gct-h{n}"),
            inet: format!("gct-i{n}"),
            lan: format!("gct-l{n}"),
            servers: Vec::new(),
            _www: www,
        };
        t.build(&n);
        Some(t)
    }

    fn build(&self, n: &str) {
        for ns in [&self.host, &self.inet, &self.lan] {
            ok(&["ip", "netns", "add", ns]);
            ok(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let (u0, i0, l0, l1) = (
            format!("gu{n}"),
            format!("gi{n}"),
            format!("gl{n}"),
            format!("gm{n}"),
        );
        ok(&[
            "ip", "-n", &self.host, "link", "add", &u0, "type", "veth", "peer", "name", &i0,
            "netns", &self.inet,
        ]);
        ok(&[
            "ip", "-n", &self.host, "link", "add", &l0, "type", "veth", "peer", "name", &l1,
            "netns", &self.lan,
        ]);
        let cfg: &[(&str, &str, &str)] = &[
            (&self.host, &u0, "203.0.113.2/24"),
            (&self.inet, &i0, "203.0.113.1/24"),
            (&self.host, &l0, "192.168.50.2/24"),
            (&self.lan, &l1, "192.168.50.1/24"),
        ];
        for (ns, dev, addr) in cfg {
            ok(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
            ok(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        ok(&[
            "ip",
            "-n",
            &self.host,
            "route",
            "add",
            "default",
            "via",
            "203.0.113.1",
        ]);
        ok(&[
            "ip",
            "-n",
            &self.host,
            "route",
            "add",
            "169.254.169.254/32",
            "via",
            "192.168.50.1",
        ]);
        ok(&[
            "ip",
            "-n",
            &self.lan,
            "addr",
            "add",
            "169.254.169.254/32",
            "dev",
            "lo",
        ]);
        ok(&[
            "ip",
            "netns",
            "exec",
            &self.host,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
    }

    /// A busybox httpd in `ns` on `addr` serving one page saying `body`.
    fn serve(&mut self, ns: &str, addr: &str, body: &str) {
        let dir = self._www.path().join(body);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("index.html"), format!("{body}\n")).unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "/bin/busybox",
                "httpd",
                "-f",
                "-p",
                addr,
                "-h",
            ])
            .arg(&dir)
            .spawn()
            .unwrap();
        self.servers.push(child);
    }

    /// `wget` of `url` from namespace `ns`: the body, or `None`.
    fn fetch(&self, ns: &str, url: &str) -> Option<String> {
        let out = sh(&["ip", "netns", "exec", ns, "curl", "-sf", "-m", "5", url]);
        out.status.success().then(|| stdout(&out))
    }

    /// [`Topo::fetch`], retried for a few seconds (a server just started).
    fn fetch_soon(&self, ns: &str, url: &str) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.fetch(ns, url);
            if got.is_some() || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Taps and gpucell tables in the host namespace.
    fn leftovers(&self) -> (Vec<String>, String) {
        let links = stdout(&sh(&["ip", "-n", &self.host, "-o", "link", "show"]));
        let taps = links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .filter(|n| n.starts_with("gcn"))
            .map(str::to_string)
            .collect();
        let tables = stdout(&sh(&[
            "ip", "netns", "exec", &self.host, "nft", "list", "tables",
        ]));
        (
            taps,
            tables
                .lines()
                .filter(|l| l.contains("gpucell_"))
                .collect::<Vec<_>>()
                .join("\n"),
        )
    }

    fn assert_nothing_left(&self, env: &VmEnv) {
        let (taps, tables) = self.leftovers();
        assert!(taps.is_empty(), "taps left: {taps:?}");
        assert!(tables.is_empty(), "tables left: {tables}");
        let recs: Vec<_> = std::fs::read_dir(env.state.path().join("net"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name())
                    .filter(|n| n != ".lock")
                    .collect()
            })
            .unwrap_or_default();
        assert!(recs.is_empty(), "records left: {recs:?}");
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        for ns in [&self.host, &self.inet, &self.lan] {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

/// The node's configuration: private networks by default, the "internet" as resolver.
fn config(env: &VmEnv) -> PathBuf {
    let p = env.state.path().join("config.toml");
    std::fs::write(
        &p,
        "[network]\ndefault = \"private\"\ndns = [\"203.0.113.1\"]\n",
    )
    .unwrap();
    p
}

/// `gpucell run ARGS` inside the host namespace.
fn gpucell(topo: &Topo, env: &VmEnv, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &topo.host, env!("CARGO_BIN_EXE_gpucell")])
        .arg("--state-dir")
        .arg(env.state.path())
        .arg("--config")
        .arg(config(env))
        .args(["run", "--accel", "tcg", "--timeout", "240s"])
        .args(args);
    c
}

/// A running sandbox whose stdout lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn start(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Running { child, lines }
    }

    /// Lines up to and including the first equal to `marker`.
    fn until(&self, marker: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(240);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_secs(1)) {
                Ok(l) => {
                    let done = l == marker;
                    seen.push(l);
                    if done {
                        return seen;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!("no {marker:?} from the workload; it printed {seen:?}");
    }

    fn finish(mut self) -> (Output, Vec<String>) {
        if let Some(mut i) = self.child.stdin.take() {
            let _ = i.write_all(b"done\n");
        }
        let out = self.child.wait_with_output().unwrap();
        let rest = self.lines.try_iter().collect();
        (out, rest)
    }
}

/// The workload's HTTP client (`get HOST PORT` prints the body's last line; busybox
/// nc, as the static busybox's wget crashes) and its probe of each `HOST:PORT` target:
/// `reach T` or `refused T`.
const PROBE: &str = r#"get() { printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 "$1" "$2" | tail -n 1; }
for t in $TARGETS; do
  if printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 "${t%:*}" "${t#*:}" >/dev/null 2>&1; then echo "reach $t"; else echo "refused $t"; fi
done"#;

#[test]
fn egress_policy_published_ports_and_isolation() {
    let Some(env) = vm_env() else { return };
    let Some(mut topo) = Topo::new("a") else {
        return;
    };
    topo.serve(&topo.inet.clone(), "203.0.113.1:80", "internet-ok");
    topo.serve(&topo.lan.clone(), "0.0.0.0:80", "lan-ok");
    topo.serve(&topo.host.clone(), "0.0.0.0:9000", "host-ok");
    // The refusals below are the policy's: without it, the host reaches them all.
    for (url, body) in [
        ("http://203.0.113.1/", "internet-ok"),
        ("http://192.168.50.1/", "lan-ok"),
        ("http://169.254.169.254/", "lan-ok"),
    ] {
        assert_eq!(
            topo.fetch_soon(&topo.host, url).as_deref(),
            Some(format!("{body}\n").as_str()),
            "{url}"
        );
    }
    // Sandbox A: downloads from the internet, probes what it must not reach, serves
    // on its published port until told to stop.
    let script_a = format!(
        "TARGETS='192.168.50.1:80 169.254.169.254:80 10.200.0.1:9000 203.0.113.2:9000 192.168.50.2:9000'; {PROBE}; get 203.0.113.1 80; \
         cat /etc/resolv.conf; mkdir -p /tmp/www; echo served-by-a > /tmp/www/index.html; \
         httpd -p 80 -h /tmp/www; echo up; read x; echo bye"
    );
    let a = Running::start(gpucell(
        &topo,
        &env,
        &[
            "--json", "-p", "8080:80", &env.image, "--", "sh", "-c", &script_a,
        ],
    ));
    let a_lines = a.until("up");
    assert!(a_lines.contains(&"internet-ok".to_string()), "{a_lines:?}");
    for t in [
        "192.168.50.1:80",
        "169.254.169.254:80",
        "10.200.0.1:9000",
        "203.0.113.2:9000",
        "192.168.50.2:9000",
    ] {
        assert!(
            a_lines.contains(&format!("refused {t}")),
            "{t}: {a_lines:?}"
        );
    }
    assert!(
        a_lines.contains(&"nameserver 203.0.113.1".to_string()),
        "{a_lines:?}"
    );
    // The published port answers from outside and from the host itself.
    assert_eq!(
        topo.fetch(&topo.inet, "http://203.0.113.2:8080/")
            .as_deref(),
        Some("served-by-a\n")
    );
    assert_eq!(
        topo.fetch(&topo.host, "http://203.0.113.2:8080/")
            .as_deref(),
        Some("served-by-a\n")
    );
    // A port already published, or held by a host process, is refused with its holder.
    let out = gpucell(&topo, &env, &["-p", "8080:80", &env.image, "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("already published by sandbox"),
        "{}",
        stderr(&out)
    );
    let out = gpucell(&topo, &env, &["-p", "9000:80", &env.image, "--", "true"])
        .output()
        .unwrap();
    assert!(stderr(&out).contains("busybox"), "{}", stderr(&out));
    // Sandbox B, at the same time, on another port: cannot reach A, directly or
    // through A's published port, but reaches the internet.
    let script_b = format!("TARGETS='10.200.0.2:80 203.0.113.2:8080 203.0.113.1:80'; {PROBE}");
    let b = gpucell(
        &topo,
        &env,
        &["-p", "8081:81", &env.image, "--", "sh", "-c", &script_b],
    )
    .output()
    .unwrap();
    assert_eq!(b.status.code(), Some(0), "{}", stderr(&b));
    let b_out = stdout(&b);
    for line in [
        "refused 10.200.0.2:80",
        "refused 203.0.113.2:8080",
        "reach 203.0.113.1:80",
    ] {
        assert!(b_out.contains(line), "{line}: {b_out}");
    }
    let (out, rest) = a.finish();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(rest.contains(&"bye".to_string()), "{rest:?}");
    let s = summary(&out);
    assert_eq!(s["network"]["mode"], "private");
    assert_eq!(s["network"]["guest_address"], "10.200.0.2");
    assert_eq!(s["network"]["egress"]["ipv6"], "refused");
    assert!(s["network"]["setup_ms"].as_u64().is_some(), "{s}");
    assert!(s["network"]["egress"]["refused"]
        .to_string()
        .contains("169.254.169.254/32"));
    topo.assert_nothing_left(&env);
    env.assert_clean();
}

/// Starts a sandbox that runs until killed, waits for its tap.
fn start_long(topo: &Topo, env: &VmEnv) -> Running {
    let r = Running::start(gpucell(
        topo,
        env,
        &[&env.image, "--", "sh", "-c", "echo up; sleep 600"],
    ));
    r.until("up");
    assert_eq!(topo.leftovers().0.len(), 1, "the sandbox has its tap");
    r
}

fn wait_clean(topo: &Topo, env: &VmEnv) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (taps, tables) = topo.leftovers();
        if (taps.is_empty() && tables.is_empty()) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    topo.assert_nothing_left(env);
}

#[test]
fn kill_9_of_qemu_or_of_gpucell_leaves_no_tap_or_rule() {
    let Some(env) = vm_env() else { return };
    let Some(topo) = Topo::new("k") else { return };
    let needle = env.state.path().to_string_lossy().to_string();
    // QEMU killed: gpucell notices and removes everything.
    let r = start_long(&topo, &env);
    let qemu = qemu_processes_mentioning(&needle);
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    common::kill("KILL", qemu[0]);
    let (out, _) = r.finish();
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    topo.assert_nothing_left(&env);
    // gpucell killed: QEMU dies with it, its tap with QEMU, and the cleanup watcher
    // removes the table and the record.
    let mut r = start_long(&topo, &env);
    r.child.kill().unwrap();
    let _ = r.child.wait();
    wait_clean(&topo, &env);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !qemu_processes_mentioning(&needle).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(qemu_processes_mentioning(&needle).is_empty());
    // What doctor says about this namespace afterwards: nothing left.
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.host, env!("CARGO_BIN_EXE_gpucell")])
        .arg("--state-dir")
        .arg(env.state.path())
        .args(["--json", "doctor", "--no-kvm-probe"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let left = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "net-leftovers")
        .cloned();
    assert_eq!(left.unwrap()["status"], "pass");
}

#[test]
fn dry_run_prints_the_policy_and_sets_nothing_up() {
    let Some(env) = vm_env() else { return };
    let Some(topo) = Topo::new("d") else { return };
    let out = gpucell(
        &topo,
        &env,
        &[
            "--dry-run",
            "--json",
            "-p",
            "8080:80",
            "--allow-cidr",
            "192.168.50.0/24",
            &env.image,
        ],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let n = &v["network"];
    assert_eq!(
        n["tap"].as_str().map(|t| t.starts_with("gcn")),
        Some(true),
        "{v}"
    );
    assert_eq!(
        n["egress"]["exceptions"],
        serde_json::json!(["192.168.50.0/24"])
    );
    assert_eq!(n["egress"]["dns"], serde_json::json!(["203.0.113.1"]));
    let refused = n["egress"]["refused"].to_string();
    for c in [
        "10.200.0.0/16",
        "203.0.113.2/32",
        "192.168.50.2/32",
        "169.254.169.254/32",
        "100.64.0.0/10",
    ] {
        assert!(refused.contains(c), "{c}: {refused}");
    }
    let args = v["qemu_args"].to_string();
    assert!(
        args.contains("tap,id=net0,fd=3,vhost=off") && args.contains("gpucell.net=10.200.0.2/30"),
        "{args}"
    );
    topo.assert_nothing_left(&env);
    // --network none: no device, no network section.
    let out = gpucell(
        &topo,
        &env,
        &["--dry-run", "--json", "--network", "none", &env.image],
    )
    .output()
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(v.get("network").is_none() && !v["qemu_args"].to_string().contains("netdev"));
}

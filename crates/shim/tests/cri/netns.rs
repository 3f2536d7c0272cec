//! The network namespaces of the CRI tests' pods and their peers.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Two network namespaces of the test's own, joined by a veth pair: the pod's
/// (`10.213.7.2/24`, default route via the peer) and the peer's (`10.213.7.1/24`, a
/// busybox httpd). Dropping it stops httpd and deletes both namespaces (and the veth).
pub struct PodNetns {
    pod: String,
    peer: String,
    httpd: Option<Child>,
}

pub const POD_ADDR: &str = "10.213.7.2";
pub const PEER_ADDR: &str = "10.213.7.1";
/// The addresses the test's CNI plugin gives a CRI pod and its peer.
pub const CNI_POD_ADDR: &str = "10.213.8.2";
pub const CNI_PEER_ADDR: &str = "10.213.8.1";

/// The peer namespace's name (known to the CNI plugin before it exists).
pub fn peer_netns_name() -> String {
    format!("gcpeer{}", std::process::id())
}

pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl PodNetns {
    pub fn new(web_root: &Path) -> Result<PodNetns, String> {
        let tag = std::process::id();
        let mut n = PodNetns {
            pod: format!("gcpod{tag}"),
            peer: peer_netns_name(),
            httpd: None,
        };
        let (pod, peer) = (n.pod.clone(), n.peer.clone());
        ip(&["netns", "add", &pod])?;
        ip(&["netns", "add", &peer])?;
        ip(&[
            "-n", &pod, "link", "add", "eth0", "type", "veth", "peer", "name", "vb", "netns", &peer,
        ])?;
        ip(&[
            "-n",
            &pod,
            "addr",
            "add",
            &format!("{POD_ADDR}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &peer,
            "addr",
            "add",
            &format!("{PEER_ADDR}/24"),
            "dev",
            "vb",
        ])?;
        for (ns, dev) in [(&pod, "eth0"), (&pod, "lo"), (&peer, "vb"), (&peer, "lo")] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&["-n", &pod, "route", "add", "default", "via", PEER_ADDR])?;
        // This kernel must redirect with tc (u32 + mirred), as the shim will.
        let tc = |args: &[&str]| {
            Command::new("ip")
                .args(["netns", "exec", &pod, "tc"])
                .args(args)
                .output()
                .map_err(|e| format!("tc: {e}"))
                .and_then(|o| {
                    o.status
                        .success()
                        .then_some(())
                        .ok_or_else(|| String::from_utf8_lossy(&o.stderr).trim().to_string())
                })
        };
        tc(&["qdisc", "add", "dev", "lo", "ingress"])?;
        let probe = tc(&[
            "filter", "add", "dev", "lo", "parent", "ffff:", "protocol", "all", "prio", "1", "u32",
            "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", "eth0",
        ]);
        tc(&["qdisc", "del", "dev", "lo", "ingress"])?;
        probe.map_err(|e| {
            format!("this kernel cannot redirect with tc (cls_u32, act_mirred): {e}")
        })?;
        n.httpd = Some(
            Command::new("ip")
                .args([
                    "netns", "exec", &peer, "busybox", "httpd", "-f", "-p", "8080",
                ])
                .arg("-h")
                .arg(web_root)
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| format!("busybox httpd: {e}"))?,
        );
        Ok(n)
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.pod)
    }

    /// `ip -n POD what show` as text.
    pub fn show(&self, what: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.pod])
            .args(what)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        if let Some(mut h) = self.httpd.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        let _ = ip(&["netns", "del", &self.pod]);
        let _ = ip(&["netns", "del", &self.peer]);
    }
}

//! A pod's network: the VM joins a network namespace that someone else made (containerd's
//! CRI and its CNI plugins, or `ctr run --with-ns network:PATH`) instead of gpucell's
//! private network.
//!
//! ```text
//! pod netns:  eth0 (veth, the pod's IP/MAC) ──tc ingress: mirred redirect──► gctap0 ──► QEMU
//!             eth0 ◄──tc ingress: mirred redirect── gctap0 ◄── QEMU (the guest's eth0)
//! ```
//! The tap is made inside the pod's namespace, and every frame is redirected both ways
//! between it and the pod's interface (tc ingress qdisc, u32 match-all filter, mirred
//! redirect), as Kata's `tcfilter` model does. The guest's eth0 gets the interface's MAC,
//! address, prefix and default gateway, so the pod's peers see the same endpoint the
//! CNI plugin set up. Nothing is touched outside that namespace.
//!
//! Every touch goes through [`PodOps`]: [`SystemPodOps`] runs `ip` and `tc` in the
//! namespace (`nsenter --net=PATH`) and creates the tap from a thread that entered it;
//! [`FakePodOps`] records the calls for unit tests.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

/// The tap's name inside the pod's namespace (one VM per pod, so one tap).
pub const POD_TAP: &str = "gctap0";

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("cannot open the pod's network namespace {0:?}")]
    OpenNetns(PathBuf, #[source] std::io::Error),
    #[error("cannot enter the pod's network namespace {0:?} (setns)")]
    Setns(PathBuf, #[source] std::io::Error),
    #[error(
        "cannot run {tool} in the pod's network namespace; is nsenter (util-linux) installed?"
    )]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed in the pod's network namespace {netns:?}: {stderr}")]
    Command {
        command: String,
        netns: PathBuf,
        stderr: String,
    },
    #[error("cannot read `{what}` of the pod's network namespace: {detail}")]
    Parse { what: &'static str, detail: String },
    #[error("the pod's network namespace {0:?} has no interface with an IPv4 address: did the CNI plugin run?")]
    NoInterface(PathBuf),
    #[error("the pod's network namespace {0:?} has no IPv4 default route: the guest would have no gateway")]
    NoGateway(PathBuf),
    #[error("cannot redirect traffic between {iface:?} and the VM's tap with tc: this kernel may lack the u32 classifier or the mirred action (modules cls_u32, act_mirred)")]
    Redirect {
        iface: String,
        #[source]
        source: Box<PodError>,
    },
    #[error("{0:?} is this process's own network namespace (the node's), not a pod's: its interfaces are not given to a VM")]
    OwnNetns(PathBuf),
    #[error("creating the VM's tap in the pod's network namespace")]
    Tap(#[source] crate::ops::OpsError),
    #[error("cannot duplicate the pod tap's queue for QEMU")]
    TapDup(#[source] std::io::Error),
}

/// Whether the namespace file `ns` is this process's own network namespace (same device
/// and inode as `/proc/self/ns/net`); false when either cannot be read.
pub fn is_own_netns(ns: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::metadata(ns),
        std::fs::metadata("/proc/self/ns/net"),
    ) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// What attaching a VM to a pod's namespace touches.
pub trait PodOps {
    /// Creates tap `name` (no packet info, with virtio-net headers) inside `netns` and
    /// returns its queue; the tap lives while a copy of the descriptor is open.
    fn create_tap(&self, netns: &Path, name: &str) -> Result<OwnedFd, PodError>;
    /// Runs `tool args` (`ip`, `tc`) in `netns`; returns its standard output.
    fn exec(&self, netns: &Path, tool: &str, args: &[&str]) -> Result<String, PodError>;
}

/// The real host: `nsenter --net=NETNS` and `/dev/net/tun` from a thread that entered
/// the namespace.
#[derive(Debug, Default, Clone)]
pub struct SystemPodOps;

impl PodOps for SystemPodOps {
    fn create_tap(&self, netns: &Path, name: &str) -> Result<OwnedFd, PodError> {
        let file =
            std::fs::File::open(netns).map_err(|e| PodError::OpenNetns(netns.to_path_buf(), e))?;
        let (ns, name) = (netns.to_path_buf(), name.to_string());
        // setns(2) moves only the calling thread: a thread of its own enters the
        // namespace, creates the tap there and ends.
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on an open namespace file; affects this thread only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(PodError::Setns(ns, std::io::Error::last_os_error()));
            }
            crate::ops::HostNet::create_tap(&crate::ops::SystemNet::default(), &name)
                .map_err(PodError::Tap)
        })
        .join()
        .unwrap_or_else(|_| {
            Err(PodError::Setns(
                netns.to_path_buf(),
                std::io::Error::other("the thread that entered the namespace panicked"),
            ))
        })
    }

    fn exec(&self, netns: &Path, tool: &str, args: &[&str]) -> Result<String, PodError> {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .arg("--")
            .arg(tool)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| PodError::Spawn {
                tool: tool.to_string(),
                source,
            })?;
        if !out.status.success() {
            return Err(PodError::Command {
                command: format!("{tool} {}", args.join(" ")),
                netns: netns.to_path_buf(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The pod's interface, as the guest's eth0 takes it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    pub name: String,
    pub mac: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

#[derive(Deserialize)]
struct IpLink {
    ifname: String,
    #[serde(default)]
    link_type: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    addr_info: Vec<IpAddr>,
}

#[derive(Deserialize)]
struct IpAddr {
    family: String,
    local: String,
    prefixlen: u8,
}

#[derive(Deserialize)]
struct IpRoute {
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    dev: String,
}

/// The pod's interface from `ip -j addr show` and `ip -j -4 route show default`: the
/// Ethernet interface that carries the default route (else the first with an IPv4
/// address), never the VM's own tap.
pub fn pod_interface(netns: &Path, addrs: &str, routes: &str) -> Result<PodInterface, PodError> {
    let parse = |what, e: serde_json::Error| PodError::Parse {
        what,
        detail: e.to_string(),
    };
    let links: Vec<IpLink> = serde_json::from_str(addrs).map_err(|e| parse("ip addr", e))?;
    let routes: Vec<IpRoute> = serde_json::from_str(routes).map_err(|e| parse("ip route", e))?;
    let candidates: Vec<(&IpLink, &IpAddr)> = links
        .iter()
        .filter(|l| l.link_type == "ether" && l.ifname != POD_TAP)
        .filter_map(|l| {
            l.addr_info
                .iter()
                .find(|a| a.family == "inet")
                .map(|a| (l, a))
        })
        .collect();
    let route = routes.iter().find(|r| r.gateway.is_some());
    let (link, addr) = route
        .and_then(|r| candidates.iter().find(|(l, _)| l.ifname == r.dev))
        .or_else(|| candidates.first())
        .ok_or_else(|| PodError::NoInterface(netns.to_path_buf()))?;
    let gateway = route
        .and_then(|r| r.gateway.as_deref())
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| PodError::NoGateway(netns.to_path_buf()))?;
    let address = addr.local.parse().map_err(|_| PodError::Parse {
        what: "ip addr",
        detail: format!("{:?} is not an IPv4 address", addr.local),
    })?;
    if addr.prefixlen > 32 {
        return Err(PodError::Parse {
            what: "ip addr",
            detail: format!("prefix length {}", addr.prefixlen),
        });
    }
    Ok(PodInterface {
        name: link.ifname.clone(),
        mac: link.address.clone(),
        address,
        prefix_len: addr.prefixlen,
        gateway,
        mtu: if link.mtu == 0 { 1500 } else { link.mtu },
    })
}

/// The `tc` arguments that redirect every frame arriving on `from` out of `to`.
pub fn redirect_args<'a>(from: &'a str, to: &'a str) -> [Vec<&'a str>; 2] {
    [
        vec!["qdisc", "add", "dev", from, "ingress"],
        vec![
            "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "prio", "1", "u32",
            "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
        ],
    ]
}

/// A VM attached to a pod's namespace; dropping it removes the redirect (the tap goes
/// with the last descriptor of its queue, QEMU's included).
pub struct PodNet {
    pub netns: PathBuf,
    pub iface: PodInterface,
    tap: Option<OwnedFd>,
    ops: Arc<dyn PodOps + Send + Sync>,
}

impl std::fmt::Debug for PodNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodNet")
            .field("netns", &self.netns)
            .field("iface", &self.iface)
            .finish_non_exhaustive()
    }
}

impl PodNet {
    /// Attaches a VM to the pod's namespace `netns`: reads its interface, creates the
    /// tap there and redirects traffic both ways. On failure nothing is left.
    pub fn attach(ops: Arc<dyn PodOps + Send + Sync>, netns: &Path) -> Result<PodNet, PodError> {
        if is_own_netns(netns) {
            return Err(PodError::OwnNetns(netns.to_path_buf()));
        }
        let addrs = ops.exec(netns, "ip", &["-j", "addr", "show"])?;
        let routes = ops.exec(netns, "ip", &["-j", "-4", "route", "show", "default"])?;
        let iface = pod_interface(netns, &addrs, &routes)?;
        let tap = ops.create_tap(netns, POD_TAP)?;
        let pod = PodNet {
            netns: netns.to_path_buf(),
            iface,
            tap: Some(tap),
            ops,
        };
        let mtu = pod.iface.mtu.to_string();
        pod.ops.exec(
            netns,
            "ip",
            &["link", "set", "dev", POD_TAP, "mtu", &mtu, "up"],
        )?;
        let name = pod.iface.name.clone();
        for (from, to) in [(name.as_str(), POD_TAP), (POD_TAP, name.as_str())] {
            for args in redirect_args(from, to) {
                pod.ops
                    .exec(netns, "tc", &args)
                    .map_err(|e| PodError::Redirect {
                        iface: name.clone(),
                        source: Box::new(e),
                    })?;
            }
        }
        Ok(pod)
    }

    /// The tap's queue.
    pub fn tap_fd(&self) -> Option<BorrowedFd<'_>> {
        self.tap.as_ref().map(|f| f.as_fd())
    }

    /// A copy of the tap's queue for QEMU to inherit.
    pub fn tap_for_qemu(&self) -> Result<Option<OwnedFd>, PodError> {
        self.tap
            .as_ref()
            .map(|f| f.try_clone())
            .transpose()
            .map_err(PodError::TapDup)
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        drop(self.tap.take());
        // The pod's interface stays the CNI plugin's: only gpucell's ingress qdisc (and
        // its filter) goes. The tap is gone with its last descriptor.
        let args = ["qdisc", "del", "dev", self.iface.name.as_str(), "ingress"];
        if let Err(e) = self.ops.exec(&self.netns, "tc", &args) {
            tracing::warn!(
                "could not remove the redirect from the pod's interface: {}",
                gpucell_common::chain_string(&e)
            );
        }
    }
}

/// Records what was asked; answers `ip` queries with the given JSON.
#[derive(Default)]
pub struct FakePodOps {
    pub calls: Mutex<Vec<String>>,
    pub addrs: String,
    pub routes: String,
    /// A call whose text contains this fails.
    pub fail_on: Option<&'static str>,
}

impl PodOps for FakePodOps {
    fn create_tap(&self, netns: &Path, name: &str) -> Result<OwnedFd, PodError> {
        self.record(format!("tap {name} in {}", netns.display()))?;
        std::fs::File::open("/dev/null")
            .map(OwnedFd::from)
            .map_err(|e| PodError::OpenNetns(netns.to_path_buf(), e))
    }

    fn exec(&self, _netns: &Path, tool: &str, args: &[&str]) -> Result<String, PodError> {
        let call = format!("{tool} {}", args.join(" "));
        self.record(call.clone())?;
        Ok(match call.as_str() {
            "ip -j addr show" => self.addrs.clone(),
            c if c.starts_with("ip -j -4 route") => self.routes.clone(),
            _ => String::new(),
        })
    }
}

impl FakePodOps {
    fn record(&self, call: String) -> Result<(), PodError> {
        let fail = self.fail_on.is_some_and(|f| call.contains(f));
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(call.clone());
        if fail {
            return Err(PodError::Command {
                command: call,
                netns: PathBuf::from("fake"),
                stderr: "Error: TC classifier not found.".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const ADDRS: &str = r#"[
      {"ifindex":1,"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00","mtu":65536,
       "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
      {"ifindex":3,"ifname":"eth0","link_type":"ether","address":"aa:bb:cc:00:11:22","mtu":1450,
       "addr_info":[{"family":"inet","local":"10.244.1.7","prefixlen":24},
                    {"family":"inet6","local":"fe80::1","prefixlen":64}]}]"#;
    const ROUTES: &str = r#"[{"dst":"default","gateway":"10.244.1.1","dev":"eth0","flags":[]}]"#;

    fn fake(fail_on: Option<&'static str>) -> Arc<FakePodOps> {
        Arc::new(FakePodOps {
            addrs: ADDRS.into(),
            routes: ROUTES.into(),
            fail_on,
            ..Default::default()
        })
    }

    #[test]
    fn the_interface_with_the_default_route_is_the_pods() {
        let i = pod_interface(Path::new("/ns"), ADDRS, ROUTES).unwrap();
        assert_eq!(
            i,
            PodInterface {
                name: "eth0".into(),
                mac: "aa:bb:cc:00:11:22".into(),
                address: Ipv4Addr::new(10, 244, 1, 7),
                prefix_len: 24,
                gateway: Ipv4Addr::new(10, 244, 1, 1),
                mtu: 1450,
            }
        );
    }

    #[test]
    fn no_address_or_no_gateway_is_a_clear_error() {
        let lo_only = r#"[{"ifname":"lo","link_type":"loopback","addr_info":[]}]"#;
        let e = pod_interface(Path::new("/ns"), lo_only, ROUTES).unwrap_err();
        assert!(e.to_string().contains("CNI plugin"), "{e}");
        let e = pod_interface(Path::new("/ns"), ADDRS, "[]").unwrap_err();
        assert!(e.to_string().contains("no IPv4 default route"), "{e}");
        let e = pod_interface(Path::new("/ns"), "not json", ROUTES).unwrap_err();
        assert!(e.to_string().contains("ip addr"), "{e}");
    }

    #[test]
    fn attach_redirects_both_ways_and_drop_removes_the_redirect() {
        let ops = fake(None);
        let pod = PodNet::attach(ops.clone(), Path::new("/run/netns/p1")).unwrap();
        assert!(pod.tap_for_qemu().unwrap().is_some());
        drop(pod);
        let calls = ops.calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            [
                "ip -j addr show",
                "ip -j -4 route show default",
                "tap gctap0 in /run/netns/p1",
                "ip link set dev gctap0 mtu 1450 up",
                "tc qdisc add dev eth0 ingress",
                "tc filter add dev eth0 parent ffff: protocol all prio 1 u32 match u32 0 0 action mirred egress redirect dev gctap0",
                "tc qdisc add dev gctap0 ingress",
                "tc filter add dev gctap0 parent ffff: protocol all prio 1 u32 match u32 0 0 action mirred egress redirect dev eth0",
                "tc qdisc del dev eth0 ingress",
            ]
        );
    }

    #[test]
    fn the_nodes_own_namespace_is_refused_before_anything_is_touched() {
        let ops = fake(None);
        let own = PathBuf::from(format!("/proc/{}/ns/net", std::process::id()));
        let e = PodNet::attach(ops.clone(), &own).unwrap_err();
        assert!(matches!(e, PodError::OwnNetns(_)), "{e}");
        assert!(ops.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn a_kernel_without_mirred_fails_naming_the_modules_and_cleans_up() {
        let ops = fake(Some("mirred"));
        let e = PodNet::attach(ops.clone(), Path::new("/run/netns/p1")).unwrap_err();
        let msg = gpucell_common::chain_string(&e);
        assert!(msg.contains("act_mirred"), "{msg}");
        let calls = ops.calls.lock().unwrap().clone();
        assert_eq!(
            calls.last().map(String::as_str),
            Some("tc qdisc del dev eth0 ingress")
        );
    }
}

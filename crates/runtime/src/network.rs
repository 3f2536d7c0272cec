//! The run's network: the mode from the request and the node's default, the host side
//! set up before the sandbox starts and torn down after QEMU is gone (docs/network.md);
//! or a pod's network namespace the VM is attached to.

use std::sync::Arc;

use gpucell_net::{ActiveNet, NetEnv, NetPlan, NetworkMode, PodNet, SystemPodOps};
use gpucell_sandbox::NetLayout;
use serde::Serialize;

use crate::node::Node;
use crate::request::ValidRequest;
use crate::RunFailure;

/// The `network` part of the run report and of the dry run's.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkReport {
    #[serde(flatten)]
    pub plan: NetPlan,
    /// Time the host side took to set up, in milliseconds (runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_ms: Option<u64>,
    /// Leftovers of killed runs this run's setup removed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reconciled: Vec<gpucell_net::Leftover>,
}

/// The mode of this run: the request's, else the node's default.
pub(crate) fn mode(node: &Node, req: &ValidRequest) -> Result<NetworkMode, RunFailure> {
    req.request
        .network
        .resolve(node.network.default)
        .map_err(RunFailure::NetworkRequest)
}

fn env(node: &Node) -> NetEnv {
    NetEnv::system(node.network.clone(), &node.state_dir, &node.host_root)
}

/// What QEMU and the guest get from the plan.
pub(crate) fn layout(plan: &NetPlan) -> NetLayout {
    NetLayout {
        mac: plan.mac.clone(),
        vhost: plan.vhost,
        address: plan.guest_address,
        prefix_len: plan.prefix_len,
        gateway: plan.gateway,
        dns: plan.egress.dns.clone(),
    }
}

/// The plan a dry run shows (nothing set up), with its warnings.
pub(crate) fn preview(
    node: &Node,
    req: &ValidRequest,
    id: &str,
) -> Result<Option<(NetworkReport, Vec<String>)>, RunFailure> {
    if mode(node, req)? == NetworkMode::None {
        return Ok(None);
    }
    let p = gpucell_net::plan(&env(node), id, &req.request.network).map_err(RunFailure::Network)?;
    let report = NetworkReport {
        plan: p.plan,
        setup_ms: None,
        reconciled: Vec::new(),
    };
    Ok(Some((report, p.warnings)))
}

/// Sets the host side up for a private network; `None` for `none`.
pub(crate) fn set_up(
    node: &Node,
    req: &ValidRequest,
    id: &str,
) -> Result<Option<ActiveNet>, RunFailure> {
    if mode(node, req)? == NetworkMode::None {
        return Ok(None);
    }
    gpucell_net::setup(&env(node), id, &req.request.network)
        .map(Some)
        .map_err(RunFailure::Network)
}

/// Attaches the VM to the pod's network namespace when the request names one
/// (docs/network.md, "A pod's network").
pub(crate) fn attach_pod(req: &ValidRequest) -> Result<Option<PodNet>, RunFailure> {
    let Some(ns) = &req.request.network.pod_netns else {
        return Ok(None);
    };
    PodNet::attach(Arc::new(SystemPodOps), ns)
        .map(Some)
        .map_err(RunFailure::PodNetwork)
}

/// What QEMU and the guest get from a pod's interface: its MAC, address and gateway
/// (no vhost: the tap is in another namespace, and vhost-net is optional anyway).
pub(crate) fn pod_layout(pod: &PodNet) -> NetLayout {
    NetLayout {
        mac: pod.iface.mac.clone(),
        vhost: false,
        address: pod.iface.address,
        prefix_len: pod.iface.prefix_len,
        gateway: pod.iface.gateway,
        dns: Vec::new(),
    }
}

/// The report of a set-up network.
pub(crate) fn report(net: &ActiveNet) -> NetworkReport {
    NetworkReport {
        plan: net.plan.clone(),
        setup_ms: Some(net.setup_ms),
        reconciled: net.reconciled.clone(),
    }
}

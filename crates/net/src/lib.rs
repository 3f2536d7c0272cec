//! gpucell's sandbox network on the host (docs/network.md): a tap per sandbox, a /30
//! from the node's range with the gateway on the host side, one nftables table per
//! sandbox with the egress policy, NAT and published ports, an optional tc policer, and
//! a record per sandbox so that what a killed run left behind is removed by the next;
//! or, for a pod, the VM attached to the pod's own network namespace ([`pod`]).

pub mod cidr;
pub mod doctor;
pub mod fsck;
pub mod nft;
pub mod ops;
pub mod pod;
pub mod policy;
pub mod spec;
pub mod tc;

pub use cidr::Cidr;
pub use ops::{FakeNet, HostNet, SystemNet};
pub use pod::{PodNet, PodOps, SystemPodOps};
pub use policy::{EgressPolicy, NetPlan};
pub use spec::{NetworkConfig, NetworkMode, NetworkRequest, Proto, Publish};
pub mod ports;
pub mod record;
pub mod setup;

pub use setup::{
    leftovers, plan, reconcile, setup, ActiveNet, Leftover, NetEnv, NetError, Planned,
};

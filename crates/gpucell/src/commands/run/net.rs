//! `gpucell run`'s network flags (docs/network.md).

use gpucell_net::spec::parse_rate;
use gpucell_net::{NetworkMode, NetworkRequest, Publish};

#[derive(clap::Args, Debug, Default)]
pub struct NetArgs {
    /// `private`: a network of the sandbox's own, egress to public addresses only,
    /// reachable only on published ports; `none`: no network device. Default: the
    /// configuration file's `[network] default`, else private.
    #[arg(long, value_name = "private|none", env = "GPUCELL_NETWORK")]
    pub network: Option<String>,
    /// Open a host port to the workload: HOST_PORT:GUEST_PORT[/tcp|udp]; repeatable.
    #[arg(long = "publish", short = 'p', value_name = "HOST:GUEST[/tcp|udp]")]
    pub publish: Vec<String>,
    /// Let the workload reach this otherwise refused network (a.b.c.d/n); repeatable.
    #[arg(long = "allow-cidr", value_name = "CIDR")]
    pub allow_cidr: Vec<String>,
    /// Limit what the workload sends, in bits per second (e.g. 100m, 1g).
    #[arg(long, value_name = "RATE")]
    pub egress_rate: Option<String>,
}

impl NetArgs {
    /// The flags as the request's network part; errors name the flag.
    pub fn to_request(&self) -> anyhow::Result<NetworkRequest> {
        let mode = self
            .network
            .as_deref()
            .map(str::parse::<NetworkMode>)
            .transpose()?;
        let publish = self
            .publish
            .iter()
            .map(|p| p.parse::<Publish>())
            .collect::<Result<Vec<_>, _>>()?;
        let allow_cidrs = self
            .allow_cidr
            .iter()
            .map(|c| c.parse().map_err(gpucell_net::spec::SpecError::Allow))
            .collect::<Result<Vec<_>, _>>()?;
        let egress_rate_bps = self.egress_rate.as_deref().map(parse_rate).transpose()?;
        Ok(NetworkRequest {
            mode,
            publish,
            allow_cidrs,
            egress_rate_bps,
            pod_netns: None,
        })
    }
}

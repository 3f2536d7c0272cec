//! `--egress-rate` with tc over netlink: what the sandbox sends arrives on its tap's
//! *ingress*, so it is policed there (an ingress qdisc and a u32 match-all filter with
//! a `police` action that drops what exceeds the rate), the equivalent of
//!
//! ```text
//! tc qdisc add dev TAP ingress
//! tc filter add dev TAP parent ffff: protocol all prio 1 u32 match u32 0 0 \
//!     action police rate RATE burst BURST mtu 128k drop
//! ```
//!
//! rtnetlink has no typed `police` action, so its attributes are built here
//! ([`police_parms`], pure and tested) from the kernel's `struct tc_police`.

use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionOption, TcFilterU32Option, TcU32Key, TcU32Selector,
    TcU32SelectorFlag,
};
use netlink_packet_utils::nla::DefaultNla;

use crate::ops::OpsError;

const TCA_POLICE_TBF: u16 = 1;
const TCA_POLICE_RATE: u16 = 2;
const TCA_POLICE_RATE64: u16 = 8;
const TC_POLICE_SHOT: i32 = 2;
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// Size of the rate table the kernel insists on (it only reads the rate spec).
const TC_RTAB_SIZE: usize = 1024;
/// Largest packet the policer passes: GSO packets from virtio-net reach 64 KiB.
const POLICE_MTU: u32 = 128 * 1024;
/// The kernel's scheduler clock: one tick is 64 ns (`PSCHED_SHIFT` 6).
const NS_PER_TICK: u64 = 64;

/// Bucket size for `bits_per_s`: 50 ms worth of traffic, at least two GSO packets.
pub fn burst_bytes(bits_per_s: u64) -> u64 {
    (bits_per_s / 8 / 20).max(2 * u64::from(POLICE_MTU))
}

/// `struct tc_police` (56 bytes, host order) for `bits_per_s`.
pub fn police_parms(bits_per_s: u64) -> Vec<u8> {
    let bytes_per_s = (bits_per_s / 8).max(1);
    let burst = burst_bytes(bits_per_s);
    let burst_ticks =
        (u128::from(burst) * 1_000_000_000 / u128::from(bytes_per_s) / u128::from(NS_PER_TICK))
            .min(u128::from(u32::MAX)) as u32;
    let mut b = Vec::with_capacity(56);
    b.extend(0u32.to_ne_bytes()); // index
    b.extend(TC_POLICE_SHOT.to_ne_bytes()); // action on exceed: drop
    b.extend(0u32.to_ne_bytes()); // limit
    b.extend(burst_ticks.to_ne_bytes());
    b.extend(POLICE_MTU.to_ne_bytes());
    // rate: cell_log, linklayer, overhead, cell_align, mpu, rate (bytes/s, saturated;
    // the full value goes in TCA_POLICE_RATE64).
    b.push(3);
    b.push(TC_LINKLAYER_ETHERNET);
    b.extend(0u16.to_ne_bytes());
    b.extend((-1i16).to_ne_bytes());
    b.extend(0u16.to_ne_bytes());
    b.extend((bytes_per_s.min(u64::from(u32::MAX)) as u32).to_ne_bytes());
    b.extend([0u8; 12]); // peakrate: none
    b.extend(0i32.to_ne_bytes()); // refcnt
    b.extend(0i32.to_ne_bytes()); // bindcnt
    b.extend(0u32.to_ne_bytes()); // capab
    b
}

/// The `police` action's attributes for `bits_per_s`.
pub fn police_action(bits_per_s: u64) -> TcAction {
    let mut options = vec![
        TcActionOption::Other(DefaultNla::new(TCA_POLICE_TBF, police_parms(bits_per_s))),
        TcActionOption::Other(DefaultNla::new(TCA_POLICE_RATE, vec![0u8; TC_RTAB_SIZE])),
    ];
    let bytes_per_s = bits_per_s / 8;
    if bytes_per_s > u64::from(u32::MAX) {
        options.push(TcActionOption::Other(DefaultNla::new(
            TCA_POLICE_RATE64,
            bytes_per_s.to_ne_bytes().to_vec(),
        )));
    }
    let mut action = TcAction::default();
    action.tab = 1;
    action.attributes = vec![
        TcActionAttribute::Kind("police".to_string()),
        TcActionAttribute::Options(options),
    ];
    action
}

/// Adds the ingress qdisc and the policing filter to link `index`.
pub(crate) async fn police_ingress(
    h: &rtnetlink::Handle,
    index: u32,
    bits_per_s: u64,
    name: &str,
) -> Result<(), OpsError> {
    let err = |what: &str| {
        let what = format!("{what} on {name:?}");
        move |e: rtnetlink::Error| OpsError::Netlink {
            what,
            source: crate::ops::netlink_cause(e),
        }
    };
    let h = h.clone();
    h.qdisc()
        .add(index as i32)
        .ingress()
        .execute()
        .await
        .map_err(err("adding the ingress qdisc"))?;
    let mut selector = TcU32Selector::default();
    selector.flags = vec![TcU32SelectorFlag::Terminal];
    selector.nkeys = 1;
    selector.keys = vec![TcU32Key::default()];
    let options = [
        TcFilterU32Option::Selector(selector),
        TcFilterU32Option::Action(vec![police_action(bits_per_s)]),
    ];
    h.traffic_filter(index as i32)
        .add()
        .parent(0xffff_0000)
        .priority(1)
        .protocol(0x0003u16.to_be())
        .u32(&options)
        .map_err(err("building the policing filter"))?
        .execute()
        .await
        .map_err(|e| match &e {
            // ENOENT / EOPNOTSUPP: no such classifier or action in this kernel.
            rtnetlink::Error::NetlinkError(m)
                if matches!(m.raw_code(), c if c == -libc::ENOENT || c == -libc::EOPNOTSUPP) =>
            {
                OpsError::NoPolicer(name.to_string())
            }
            _ => err("adding the policing filter")(e),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn police_parameters_match_struct_tc_police() {
        let p = police_parms(80_000_000); // 10 MB/s
        assert_eq!(p.len(), 56);
        let u32_at = |o: usize| u32::from_ne_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]]);
        assert_eq!(u32_at(4), 2); // drop
                                  // 500 KB at 10 MB/s = 50 ms = 781250 ticks of 64 ns.
        assert_eq!(burst_bytes(80_000_000), 500_000);
        assert_eq!(u32_at(12), 781_250);
        assert_eq!(u32_at(16), POLICE_MTU);
        assert_eq!(p[20], 3);
        assert_eq!(u32_at(28), 10_000_000);
        // Slow rates still pass two full GSO packets per bucket.
        assert_eq!(burst_bytes(1_000_000), 262_144);
        let a = police_action(100_000_000_000);
        let TcActionAttribute::Options(o) = &a.attributes[1] else {
            panic!("no options")
        };
        assert_eq!(o.len(), 3, "over 4 GB/s needs RATE64");
    }
}

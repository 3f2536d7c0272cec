//! A sandbox's network from plan to teardown, and the reconciliation of what killed
//! runs left behind.
//!
//! ```text
//! plan (reads only) ─► lock records ─► reconcile dead ones ─► slot ─► reserve ports
//!   ─► write record ─► unlock ─► tap ─► address, up ─► nft table ─► tc policer
//!   (a watcher process, started first, deletes the table and the record should this
//!   process die before its teardown)
//! teardown: tap closed (QEMU gone) ─► table deleted ─► ports freed ─► record removed
//! ```
//! The tap is not persistent: it disappears when the last descriptor (this process's
//! and QEMU's copy) closes, so even `kill -9` of both leaves no tap. The table and the
//! record stay after a `kill -9` of gpucell and are removed by the next setup (or
//! reported by `gpucell doctor`).

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::ops::{HostNet, OpsError};
use crate::policy::{EgressPolicy, NetPlan, TABLE_PREFIX, TAP_PREFIX};
use crate::ports::PortError;
use crate::record::{current_netns, NetRecord, RecordError, Records};
use crate::spec::{NetworkConfig, NetworkRequest, SANDBOX_PREFIX};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("net.ipv4.ip_forward is {0} on this host and [network] manage_forwarding is off, so a sandbox's traffic cannot be routed: set it to 1 (sysctl -w net.ipv4.ip_forward=1, persist it in /etc/sysctl.d), let gpucell do it (manage_forwarding = true) or run with --network none")]
    IpForwardOff(String),
    #[error("net.ipv4.ip_forward is {0} on this host and gpucell could not switch it on; run with --network none or set it yourself")]
    EnableForwarding(String, #[source] OpsError),
    #[error("the sandbox range {range} is full ({slots} sandboxes): widen [network] range")]
    RangeFull { range: String, slots: u64 },
    #[error("the sandbox range {range} overlaps this host's address {addr}: pick another [network] range")]
    RangeOverlap { range: String, addr: Ipv4Addr },
    #[error(
        "--publish: host port {port}/{proto} is already published by sandbox {run_id} (pid {pid})"
    )]
    PublishedByOther {
        port: u16,
        proto: crate::spec::Proto,
        run_id: String,
        pid: u32,
    },
    #[error("cannot duplicate the queue of tap {0:?} for QEMU")]
    TapDup(String, #[source] std::io::Error),
    #[error(transparent)]
    Port(#[from] PortError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("setting up the sandbox network")]
    Ops(#[from] OpsError),
}

/// What a network setup reads and touches.
#[derive(Clone)]
pub struct NetEnv {
    pub ops: Arc<dyn HostNet + Send + Sync>,
    pub config: NetworkConfig,
    pub state_dir: PathBuf,
    /// `/proc` (owners, namespaces, port holders).
    pub proc_dir: PathBuf,
    /// Root under which `/etc/resolv.conf` and `/dev/vhost-net` are looked at.
    pub host_root: PathBuf,
}

impl NetEnv {
    /// The real host, with `config`.
    pub fn system(config: NetworkConfig, state_dir: &Path, host_root: &Path) -> NetEnv {
        NetEnv {
            ops: Arc::new(crate::ops::SystemNet::default()),
            config,
            state_dir: state_dir.to_path_buf(),
            proc_dir: "/proc".into(),
            host_root: host_root.to_path_buf(),
        }
    }
}

/// Nameservers in a resolv.conf text: IPv4, not loopback (a guest cannot reach the
/// host's loopback resolver, e.g. systemd-resolved's 127.0.0.53).
pub fn resolvers(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback() && !a.is_unspecified())
        .take(3)
        .collect()
}

/// A network plan plus what the run should warn about.
#[derive(Debug, Clone)]
pub struct Planned {
    pub plan: NetPlan,
    pub warnings: Vec<String>,
}

/// The plan of run `id` with slot `slot`: reads host addresses and resolvers only.
fn plan_with_slot(
    env: &NetEnv,
    id: &str,
    req: &NetworkRequest,
    slot: u64,
) -> Result<Planned, NetError> {
    let cfg = &env.config;
    let mut warnings = Vec::new();
    let addrs = env.ops.host_addresses()?;
    if let Some(a) = addrs
        .iter()
        .find(|a| cfg.range.contains(**a) && !is_sandbox_gateway(cfg, **a))
    {
        return Err(NetError::RangeOverlap {
            range: cfg.range.to_string(),
            addr: *a,
        });
    }
    let host: Vec<Ipv4Addr> = addrs
        .into_iter()
        .filter(|a| !a.is_loopback() && !cfg.range.contains(*a))
        .collect();
    let dns = if cfg.dns.is_empty() {
        let path = env.host_root.join("etc/resolv.conf");
        resolvers(&std::fs::read_to_string(&path).unwrap_or_default())
    } else {
        cfg.dns.clone()
    };
    if dns.is_empty() {
        warnings.push(
            "no resolver for the guest: the host's /etc/resolv.conf has none it can reach; set [network] dns"
                .to_string(),
        );
    }
    let mut exceptions = cfg.allow_cidrs.clone();
    exceptions.extend(req.allow_cidrs.iter().copied());
    let egress = EgressPolicy::new(cfg.range, &host, &exceptions, &dns, req.egress_rate_bps);
    let vhost = cfg.vhost && env.host_root.join("dev/vhost-net").exists();
    let slots = cfg.range.size() >> (32 - u32::from(SANDBOX_PREFIX));
    let plan = NetPlan::new(id, cfg.range, slot, vhost, req.publish.clone(), egress).ok_or(
        NetError::RangeFull {
            range: cfg.range.to_string(),
            slots,
        },
    )?;
    Ok(Planned { plan, warnings })
}

/// Whether `a` is the host side of some sandbox's /30 (another run's tap).
fn is_sandbox_gateway(cfg: &NetworkConfig, a: Ipv4Addr) -> bool {
    let off = u32::from(a).wrapping_sub(u32::from(cfg.range.addr()));
    off % 4 == 1
}

/// What `--dry-run` shows: the plan a run would set up now (the first free slot;
/// nothing reserved, written or created).
pub fn plan(env: &NetEnv, id: &str, req: &NetworkRequest) -> Result<Planned, NetError> {
    let records = crate::record::read_unlocked(&env.state_dir);
    let slot = free_slot(&records, &env.proc_dir, current_netns(&env.proc_dir));
    plan_with_slot(env, id, req, slot)
}

fn live(r: &NetRecord, proc_dir: &Path) -> bool {
    r.owner.is_alive(proc_dir)
}

fn free_slot(records: &[NetRecord], proc_dir: &Path, netns: u64) -> u64 {
    let taken: std::collections::BTreeSet<u64> = records
        .iter()
        .filter(|r| r.netns == netns && live(r, proc_dir))
        .map(|r| r.slot)
        .collect();
    (0..).find(|s| !taken.contains(s)).unwrap_or(0)
}

/// A leftover removed (or found, for doctor).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Leftover {
    /// `record`, `table` or `tap`.
    pub kind: &'static str,
    pub name: String,
    /// The run that left it, when known.
    pub run_id: Option<String>,
}

/// Removes what dead runs of this namespace left (tables, taps, records). Takes the
/// records lock.
pub fn reconcile(env: &NetEnv) -> Result<Vec<Leftover>, NetError> {
    let records = Records::lock(&env.state_dir)?;
    reconcile_locked(env, &records)
}

fn reconcile_locked(env: &NetEnv, records: &Records) -> Result<Vec<Leftover>, NetError> {
    let netns = current_netns(&env.proc_dir);
    let mut removed = Vec::new();
    for r in records.all() {
        if r.netns != netns || live(&r, &env.proc_dir) {
            continue;
        }
        remove_table(env.ops.as_ref(), &r.table)?;
        env.ops.delete_link(&r.tap)?;
        records.remove(&r.run_id)?;
        tracing::warn!(run_id = %r.run_id, "removed the network a killed run left behind");
        removed.push(Leftover {
            kind: "record",
            name: format!("{} (table {}, tap {})", r.run_id, r.table, r.tap),
            run_id: Some(r.run_id.clone()),
        });
    }
    Ok(removed)
}

/// Deletes `table` when it exists.
fn remove_table(ops: &dyn HostNet, table: &str) -> Result<(), OpsError> {
    let tables = crate::nft::gpucell_tables(&ops.nft_tables()?);
    if tables.iter().any(|t| t == table) {
        ops.nft_apply(&crate::nft::delete_table(table))?;
    }
    Ok(())
}

/// What dead or unknown sandboxes left in this namespace, removing nothing.
pub fn leftovers(env: &NetEnv) -> Result<Vec<Leftover>, OpsError> {
    let netns = current_netns(&env.proc_dir);
    let records = crate::record::read_unlocked(&env.state_dir);
    let live_recs: Vec<&NetRecord> = records.iter().filter(|r| live(r, &env.proc_dir)).collect();
    let mut out: Vec<Leftover> = records
        .iter()
        .filter(|r| r.netns == netns && !live(r, &env.proc_dir))
        .map(|r| Leftover {
            kind: "record",
            name: format!("{} (table {}, tap {})", r.run_id, r.table, r.tap),
            run_id: Some(r.run_id.clone()),
        })
        .collect();
    for t in crate::nft::gpucell_tables(&env.ops.nft_tables()?) {
        if !live_recs.iter().any(|r| r.table == t) {
            let run_id = t.strip_prefix(TABLE_PREFIX).map(str::to_string);
            out.push(Leftover {
                kind: "table",
                name: format!("inet {t}"),
                run_id,
            });
        }
    }
    for l in env.ops.links()? {
        if l.starts_with(TAP_PREFIX) && !live_recs.iter().any(|r| r.tap == l) {
            out.push(Leftover {
                kind: "tap",
                name: l,
                run_id: None,
            });
        }
    }
    Ok(out)
}

/// A sandbox network that is set up; dropping it tears it down.
pub struct ActiveNet {
    pub plan: NetPlan,
    pub warnings: Vec<String>,
    /// What the setup removed that killed runs had left.
    pub reconciled: Vec<Leftover>,
    /// How long the setup took, in milliseconds.
    pub setup_ms: u64,
    env: NetEnv,
    tap: Option<OwnedFd>,
    ports: Vec<OwnedFd>,
    /// Closing it lets the cleanup watcher run (see [`HostNet::watch_exit`]).
    watcher: Option<OwnedFd>,
    torn_down: bool,
}

impl ActiveNet {
    /// The tap's queue, for QEMU.
    pub fn tap_fd(&self) -> Option<BorrowedFd<'_>> {
        self.tap.as_ref().map(|f| f.as_fd())
    }

    /// A copy of the tap's queue for QEMU to inherit.
    pub fn tap_for_qemu(&self) -> Result<Option<OwnedFd>, NetError> {
        self.tap
            .as_ref()
            .map(|f| f.try_clone())
            .transpose()
            .map_err(|e| NetError::TapDup(self.plan.tap.clone(), e))
    }

    /// Removes everything this setup made; the record goes last, and stays when
    /// something could not be removed (the next setup tries again).
    pub fn teardown(&mut self) -> Result<(), NetError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        drop(self.tap.take());
        let table = remove_table(self.env.ops.as_ref(), &self.plan.table);
        let link = self.env.ops.delete_link(&self.plan.tap);
        self.ports.clear();
        table?;
        link?;
        let records = Records::lock(&self.env.state_dir)?;
        let id = self.plan.table.trim_start_matches(TABLE_PREFIX).to_string();
        records.remove(&id)?;
        // Everything is gone: the watcher finds nothing left to do.
        drop(self.watcher.take());
        Ok(())
    }
}

impl Drop for ActiveNet {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!(
                "the sandbox network was not fully removed (the next run retries): {}",
                gpucell_common::chain_string(&e)
            );
        }
    }
}

/// Routing needs `net.ipv4.ip_forward = 1`. With `[network] manage_forwarding` (the
/// default) gpucell switches it on, as docker does for its bridge, and says so once.
fn ensure_forwarding(env: &NetEnv, fwd: &str) -> Result<Option<String>, NetError> {
    if fwd == "1" {
        return Ok(None);
    }
    if !env.config.manage_forwarding {
        return Err(NetError::IpForwardOff(fwd.to_string()));
    }
    env.ops
        .set_sysctl("net/ipv4/ip_forward", "1")
        .map_err(|e| NetError::EnableForwarding(fwd.to_string(), e))?;
    Ok(Some(format!(
        "net.ipv4.ip_forward was {fwd}: gpucell set it to 1 so that sandbox traffic is routed \
         (persist it in /etc/sysctl.d, or set [network] manage_forwarding = false to manage it yourself)"
    )))
}

/// Sets up run `id`'s network. On failure nothing is left (what was made is torn down).
pub fn setup(env: &NetEnv, id: &str, req: &NetworkRequest) -> Result<ActiveNet, NetError> {
    let t0 = std::time::Instant::now();
    let fwd = env
        .ops
        .sysctl("net/ipv4/ip_forward")
        .unwrap_or_else(|| "unreadable".into());
    let forwarding_note = ensure_forwarding(env, &fwd)?;
    let records = Records::lock(&env.state_dir)?;
    let reconciled = reconcile_locked(env, &records)?;
    let netns = current_netns(&env.proc_dir);
    let all = records.all();
    for p in &req.publish {
        if let Some(r) = all.iter().find(|r| {
            r.netns == netns
                && live(r, &env.proc_dir)
                && r.publish
                    .iter()
                    .any(|q| q.host_port == p.host_port && q.proto == p.proto)
        }) {
            return Err(NetError::PublishedByOther {
                port: p.host_port,
                proto: p.proto,
                run_id: r.run_id.clone(),
                pid: r.owner.pid,
            });
        }
    }
    let slot = free_slot(&all, &env.proc_dir, netns);
    let Planned { plan, mut warnings } = plan_with_slot(env, id, req, slot)?;
    warnings.extend(forwarding_note);
    let ports = crate::ports::reserve(&plan.publish, &env.proc_dir)?;
    records.write(&NetRecord {
        run_id: id.to_string(),
        owner: crate::record::this_owner(&env.proc_dir)?,
        netns,
        tap: plan.tap.clone(),
        table: plan.table.clone(),
        slot,
        guest: plan.guest_address,
        publish: plan.publish.clone(),
    })?;
    drop(records);
    let mut active = ActiveNet {
        plan,
        warnings,
        reconciled,
        setup_ms: 0,
        env: env.clone(),
        tap: None,
        ports,
        watcher: None,
        torn_down: false,
    };
    // From here a failure drops `active`, which removes what was made. The watcher
    // comes first, so that a `kill -9` at any later point still removes the table.
    let record = env
        .state_dir
        .join(crate::record::RECORD_DIR)
        .join(format!("{id}.json"));
    let delete = crate::nft::delete_table(&active.plan.table);
    active.watcher = env.ops.watch_exit(&delete, &record)?;
    let p = &active.plan;
    let tap = env.ops.create_tap(&p.tap)?;
    active.tap = Some(tap);
    env.ops.configure_tap(&p.tap, p.gateway, p.prefix_len)?;
    env.ops.nft_apply(&crate::nft::ruleset(p))?;
    if let Some(rate) = p.egress.rate_bps {
        env.ops.limit_ingress(&p.tap, rate)?;
    }
    active.setup_ms = t0.elapsed().as_millis().min(u128::from(u64::MAX)) as u64;
    Ok(active)
}

//! Every touch of the host's network goes through [`HostNet`]: the tap (`/dev/net/tun`),
//! links and addresses (netlink, through the rtnetlink crate), nftables (the `nft`
//! tool's `-f` input) and the sysctls. [`SystemNet`] is the real thing; [`FakeNet`]
//! records what was asked, for unit tests.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(
        "cannot open {path:?} to create the sandbox's tap; load the tun module (modprobe tun)"
    )]
    TunOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create tap {name:?} (TUNSETIFF)")]
    TunSetIff {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink: {what}")]
    Netlink {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("this kernel cannot police {0:?} for --egress-rate: it lacks the tc u32 classifier or the police action (modules cls_u32, act_police); load them or run without --egress-rate")]
    NoPolicer(String),
    #[error("network link {0:?} not found")]
    NoLink(String),
    #[error("cannot run {tool:?}; install nftables (scripts/install-deps.sh)")]
    NftSpawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nft refused the rules ({status}): {stderr}")]
    Nft { status: String, stderr: String },
    #[error("cannot write {path:?}")]
    Sysctl {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The host's network, as a sandbox network needs it.
pub trait HostNet {
    /// Creates tap `name` (no packet info, with virtio-net headers) and returns its
    /// queue. The tap lives while the returned descriptor (or a copy in QEMU) is open.
    fn create_tap(&self, name: &str) -> Result<OwnedFd, OpsError>;
    /// Gives link `name` the address `gateway/prefix`, turns IPv6 off on it and sets it up.
    fn configure_tap(&self, name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<(), OpsError>;
    /// Polices what arrives from the sandbox on link `name` to `bits_per_s` (tc).
    fn limit_ingress(&self, name: &str, bits_per_s: u64) -> Result<(), OpsError>;
    /// Deletes link `name`; a missing link is fine.
    fn delete_link(&self, name: &str) -> Result<(), OpsError>;
    /// The names of every link.
    fn links(&self) -> Result<Vec<String>, OpsError>;
    /// Every IPv4 address of this host (network namespace).
    fn host_addresses(&self) -> Result<Vec<Ipv4Addr>, OpsError>;
    /// Applies an `nft -f` script atomically.
    fn nft_apply(&self, script: &str) -> Result<(), OpsError>;
    /// `nft -j list tables`.
    fn nft_tables(&self) -> Result<String, OpsError>;
    /// Reads a file under /proc/sys (`net/ipv4/ip_forward`).
    fn sysctl(&self, key: &str) -> Option<String>;
    /// Writes `value` to a file under /proc/sys.
    fn set_sysctl(&self, key: &str, value: &str) -> Result<(), OpsError>;
    /// Starts a watcher, in a session of its own, that applies the `nft -f` script
    /// `nft_script` and removes `record` once the returned descriptor (its stdin's other
    /// end) is closed: when this process ends, however it ends. `None`: no watcher.
    fn watch_exit(&self, nft_script: &str, record: &Path) -> Result<Option<OwnedFd>, OpsError>;
}

/// The real host: `/dev/net/tun`, rtnetlink, `nft`, `/proc/sys`.
#[derive(Debug, Clone)]
pub struct SystemNet {
    pub tun: PathBuf,
    pub nft: PathBuf,
    pub proc_sys: PathBuf,
}

impl Default for SystemNet {
    fn default() -> Self {
        SystemNet {
            tun: "/dev/net/tun".into(),
            nft: "nft".into(),
            proc_sys: "/proc/sys".into(),
        }
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> OpsError {
    let what = what.into();
    move |e| OpsError::Netlink {
        what,
        source: netlink_cause(e),
    }
}

/// The kernel's errno for a netlink error (its message echoes the whole request).
pub(crate) fn netlink_cause(e: rtnetlink::Error) -> Box<dyn std::error::Error + Send + Sync> {
    match e {
        rtnetlink::Error::NetlinkError(m) => match m.code {
            Some(c) => Box::new(std::io::Error::from_raw_os_error(-c.get())),
            None => Box::new(std::io::Error::other("netlink error without a code")),
        },
        other => Box::new(other),
    }
}

/// Runs `f` with a netlink handle on a one-thread runtime of its own.
fn with_netlink<T>(f: impl AsyncFnOnceHandle<T>) -> Result<T, OpsError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| OpsError::Netlink {
            what: "starting the netlink runtime".into(),
            source: Box::new(e),
        })?;
    rt.block_on(async move {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| OpsError::Netlink {
            what: "opening a netlink socket".into(),
            source: Box::new(e),
        })?;
        let task = tokio::spawn(conn);
        let out = f.call(handle).await;
        task.abort();
        out
    })
}

/// An async closure over a netlink handle (stable Rust has no `AsyncFnOnce` bound in
/// this toolchain's MSRV).
pub trait AsyncFnOnceHandle<T> {
    fn call(
        self,
        h: rtnetlink::Handle,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, OpsError>>>>;
}

impl<T, F, Fut> AsyncFnOnceHandle<T> for F
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T, OpsError>> + 'static,
{
    fn call(
        self,
        h: rtnetlink::Handle,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, OpsError>>>> {
        Box::pin(self(h))
    }
}

async fn link_index(h: &rtnetlink::Handle, name: &str) -> Result<Option<u32>, OpsError> {
    use futures::TryStreamExt;
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(m)) => Ok(Some(m.header.index)),
        Ok(None) => Ok(None),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("looking up link {name:?}"))(e)),
    }
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

impl HostNet for SystemNet {
    fn create_tap(&self, name: &str) -> Result<OwnedFd, OpsError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&self.tun)
            .map_err(|source| OpsError::TunOpen {
                path: self.tun.clone(),
                source,
            })?;
        let fd = OwnedFd::from(file);
        let bad = |source| OpsError::TunSetIff {
            name: name.to_string(),
            source,
        };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(bad(std::io::Error::from(std::io::ErrorKind::InvalidInput)));
        }
        // SAFETY: ifreq is plain data, zeroed; the name fits with its NUL (checked above).
        let res = unsafe {
            let mut req: libc::ifreq = std::mem::zeroed();
            for (i, b) in name.bytes().enumerate() {
                req.ifr_name[i] = b as libc::c_char;
            }
            req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
            libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&fd), TUNSETIFF as _, &req)
        };
        if res != 0 {
            return Err(bad(std::io::Error::last_os_error()));
        }
        Ok(fd)
    }

    fn configure_tap(&self, name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<(), OpsError> {
        // No IPv6 on the tap: not even a link-local address for the guest to talk to.
        let v6 = self
            .proc_sys
            .join(format!("net/ipv6/conf/{name}/disable_ipv6"));
        if v6.exists() {
            std::fs::write(&v6, "1").map_err(|source| OpsError::Sysctl { path: v6, source })?;
        }
        let name = name.to_string();
        with_netlink(move |h: rtnetlink::Handle| async move {
            let index = link_index(&h, &name)
                .await?
                .ok_or_else(|| OpsError::NoLink(name.clone()))?;
            h.address()
                .add(index, gateway.into(), prefix)
                .execute()
                .await
                .map_err(nl(format!("adding {gateway}/{prefix} to {name:?}")))?;
            h.link()
                .set(index)
                .up()
                .execute()
                .await
                .map_err(nl(format!("setting {name:?} up")))
        })
    }

    fn limit_ingress(&self, name: &str, bits_per_s: u64) -> Result<(), OpsError> {
        let name = name.to_string();
        with_netlink(move |h: rtnetlink::Handle| async move {
            let index = link_index(&h, &name)
                .await?
                .ok_or_else(|| OpsError::NoLink(name.clone()))?;
            crate::tc::police_ingress(&h, index, bits_per_s, &name).await
        })
    }

    fn delete_link(&self, name: &str) -> Result<(), OpsError> {
        let name = name.to_string();
        with_netlink(move |h: rtnetlink::Handle| async move {
            match link_index(&h, &name).await? {
                Some(index) => match h.link().del(index).execute().await {
                    Ok(()) => Ok(()),
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                        Ok(())
                    }
                    Err(e) => Err(nl(format!("deleting link {name:?}"))(e)),
                },
                None => Ok(()),
            }
        })
    }

    fn links(&self) -> Result<Vec<String>, OpsError> {
        use futures::TryStreamExt;
        use netlink_packet_route::link::LinkAttribute;
        with_netlink(|h: rtnetlink::Handle| async move {
            let msgs: Vec<_> = h
                .link()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(nl("listing links"))?;
            Ok(msgs
                .iter()
                .filter_map(|m| {
                    m.attributes.iter().find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })
                })
                .collect())
        })
    }

    fn host_addresses(&self) -> Result<Vec<Ipv4Addr>, OpsError> {
        use futures::TryStreamExt;
        use netlink_packet_route::address::AddressAttribute;
        with_netlink(|h: rtnetlink::Handle| async move {
            let msgs: Vec<_> = h
                .address()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(nl("listing addresses"))?;
            let mut out: Vec<Ipv4Addr> = msgs
                .iter()
                .flat_map(|m| m.attributes.iter())
                .filter_map(|a| match a {
                    AddressAttribute::Local(std::net::IpAddr::V4(v4))
                    | AddressAttribute::Address(std::net::IpAddr::V4(v4)) => Some(*v4),
                    _ => None,
                })
                .collect();
            out.sort();
            out.dedup();
            Ok(out)
        })
    }

    fn nft_apply(&self, script: &str) -> Result<(), OpsError> {
        run_nft(&self.nft, &["-f", "-"], Some(script)).map(|_| ())
    }

    fn nft_tables(&self) -> Result<String, OpsError> {
        run_nft(&self.nft, &["-j", "list", "tables"], None)
    }

    fn sysctl(&self, key: &str) -> Option<String> {
        std::fs::read_to_string(self.proc_sys.join(key))
            .ok()
            .map(|s| s.trim().to_string())
    }

    fn set_sysctl(&self, key: &str, value: &str) -> Result<(), OpsError> {
        let path = self.proc_sys.join(key);
        std::fs::write(&path, value).map_err(|source| OpsError::Sysctl { path, source })
    }

    fn watch_exit(&self, nft_script: &str, record: &Path) -> Result<Option<OwnedFd>, OpsError> {
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};
        let spawn_err = |source| OpsError::NftSpawn {
            tool: "/bin/sh (network cleanup watcher)".into(),
            source,
        };
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| spawn_err(std::io::Error::from(e)))?;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(watcher_script(&self.nft, nft_script, record))
            .stdin(Stdio::from(read))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe. Its own session: a signal to gpucell's
        // process group (Ctrl-C) does not stop the cleanup.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        // Not waited for: it outlives this process by design, and init reaps it.
        let child = cmd.spawn().map_err(spawn_err)?;
        drop(child);
        Ok(Some(write))
    }
}

/// The watcher's shell script: wait for EOF, then clean up (errors ignored: a normal
/// teardown has usually removed everything already).
pub fn watcher_script(nft: &Path, nft_script: &str, record: &Path) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    format!(
        "cat >/dev/null; printf %s {} | {} -f - 2>/dev/null; rm -f {}",
        q(nft_script),
        q(&nft.display().to_string()),
        q(&record.display().to_string())
    )
}

fn run_nft(tool: &std::path::Path, args: &[&str], input: Option<&str>) -> Result<String, OpsError> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let spawn_err = |source| OpsError::NftSpawn {
        tool: tool.display().to_string(),
        source,
    };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A write error shows as nft's own failure below.
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(OpsError::Nft {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', " / "),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Records every call; state (links, tables) is kept so that setup, teardown and
/// reconciliation can be checked end to end. `fail_on` makes the named operation fail.
#[derive(Debug, Default)]
pub struct FakeNet {
    pub calls: Mutex<Vec<String>>,
    pub links: Mutex<Vec<String>>,
    pub tables: Mutex<Vec<String>>,
    pub addresses: Vec<Ipv4Addr>,
    pub ip_forward: Option<String>,
    /// What `set_sysctl` wrote to `net/ipv4/ip_forward` (read back by `sysctl`).
    pub ip_forward_set: Mutex<Option<String>>,
    pub fail_on: Option<&'static str>,
}

impl FakeNet {
    /// A host with one address and forwarding on.
    pub fn new() -> Self {
        FakeNet {
            addresses: vec![Ipv4Addr::new(198, 51, 100, 2)],
            ip_forward: Some("1".into()),
            ..Default::default()
        }
    }

    fn record(&self, op: &'static str, call: String) -> Result<(), OpsError> {
        if let Ok(mut c) = self.calls.lock() {
            c.push(call);
        }
        if self.fail_on == Some(op) {
            return Err(OpsError::Nft {
                status: "fake".into(),
                stderr: format!("{op} fails"),
            });
        }
        Ok(())
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl HostNet for FakeNet {
    fn create_tap(&self, name: &str) -> Result<OwnedFd, OpsError> {
        self.record("create_tap", format!("create_tap {name}"))?;
        if let Ok(mut l) = self.links.lock() {
            l.push(name.to_string());
        }
        let f = std::fs::File::open("/dev/null").map_err(|source| OpsError::TunOpen {
            path: "/dev/null".into(),
            source,
        })?;
        Ok(OwnedFd::from(f))
    }

    fn configure_tap(&self, name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<(), OpsError> {
        self.record(
            "configure_tap",
            format!("configure_tap {name} {gateway}/{prefix}"),
        )
    }

    fn limit_ingress(&self, name: &str, bits_per_s: u64) -> Result<(), OpsError> {
        self.record(
            "limit_ingress",
            format!("limit_ingress {name} {bits_per_s}"),
        )
    }

    fn delete_link(&self, name: &str) -> Result<(), OpsError> {
        self.record("delete_link", format!("delete_link {name}"))?;
        if let Ok(mut l) = self.links.lock() {
            l.retain(|x| x != name);
        }
        Ok(())
    }

    fn links(&self) -> Result<Vec<String>, OpsError> {
        Ok(self.links.lock().map(|l| l.clone()).unwrap_or_default())
    }

    fn host_addresses(&self) -> Result<Vec<Ipv4Addr>, OpsError> {
        Ok(self.addresses.clone())
    }

    fn nft_apply(&self, script: &str) -> Result<(), OpsError> {
        let first = script.lines().next().unwrap_or_default().to_string();
        self.record("nft_apply", format!("nft {first}"))?;
        let mut t = self
            .tables
            .lock()
            .map_err(|_| OpsError::NoLink("lock".into()))?;
        if let Some(rest) = first.strip_prefix("table inet ") {
            t.push(rest.trim_end_matches(" {").to_string());
        } else if let Some(name) = first.strip_prefix("delete table inet ") {
            if !t.iter().any(|x| x == name) {
                return Err(OpsError::Nft {
                    status: "exit status: 1".into(),
                    stderr: "Error: No such file or directory".into(),
                });
            }
            t.retain(|x| x != name);
        }
        Ok(())
    }

    fn nft_tables(&self) -> Result<String, OpsError> {
        let t = self.tables.lock().map(|t| t.clone()).unwrap_or_default();
        let items: Vec<serde_json::Value> = t
            .iter()
            .map(|n| serde_json::json!({"table": {"family": "inet", "name": n}}))
            .collect();
        Ok(serde_json::json!({ "nftables": items }).to_string())
    }

    fn watch_exit(&self, nft_script: &str, record: &Path) -> Result<Option<OwnedFd>, OpsError> {
        let first = nft_script.lines().next().unwrap_or_default();
        self.record(
            "watch_exit",
            format!("watch_exit {first} {}", record.display()),
        )?;
        Ok(None)
    }

    fn sysctl(&self, key: &str) -> Option<String> {
        if key != "net/ipv4/ip_forward" {
            return None;
        }
        let set = self.ip_forward_set.lock().ok().and_then(|s| s.clone());
        set.or_else(|| self.ip_forward.clone())
    }

    fn set_sysctl(&self, key: &str, value: &str) -> Result<(), OpsError> {
        self.record("set_sysctl", format!("set_sysctl {key}={value}"))?;
        if key == "net/ipv4/ip_forward" {
            if let Ok(mut s) = self.ip_forward_set.lock() {
                *s = Some(value.to_string());
            }
        }
        Ok(())
    }
}

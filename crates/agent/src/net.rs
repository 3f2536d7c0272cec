//! The guest's network, as the host planned it: `gpucell.net=ADDRESS/PREFIX,GATEWAY,MAC`
//! and `gpucell.dns=A,B` on the kernel command line. At boot, before the channel opens
//! and so before any workload, the agent finds the NIC by its MAC, gives it the address,
//! sets it up, adds the default route and turns IPv6 off on it; it writes the resolvers
//! to its own `/etc/resolv.conf`, which [`install_resolv_conf`] copies into the
//! container's root when the workload starts. No word: no network (loopback only).

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;

const NET_KEY: &str = "gpucell.net";
const DNS_KEY: &str = "gpucell.dns";
/// Tag of the NIC's modules in the init image's module order.
const MODULE_TAG: &str = "net=virtio";
const SYS_NET: &str = "/sys/class/net";
/// The agent's own copy of the resolvers.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// How long the NIC may take to appear after its driver loaded.
const NIC_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("kernel command line: `{NET_KEY}={0}` is not ADDRESS/PREFIX,GATEWAY,MAC")]
    BadNet(String),
    #[error("kernel command line: `{DNS_KEY}={0}` is not a list of IPv4 addresses")]
    BadDns(String),
    #[error("no network interface with MAC {0} appeared within {NIC_WAIT:?} (is virtio_net in the guest's modules?)")]
    NoNic(String),
    #[error("{0} reported no carrier within {NIC_WAIT:?} (is the host's tap up?)")]
    NoCarrier(String),
    #[error("{what} on {ifname}")]
    Sys {
        what: &'static str,
        ifname: String,
        #[source]
        source: Errno,
    },
    #[error("the run's /etc files: {0}")]
    EtcFile(String),
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The guest's network, from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub mac: String,
    pub dns: Vec<Ipv4Addr>,
}

impl GuestNet {
    /// The network the command line names; the last word of a key wins.
    pub fn from_cmdline(text: &str) -> Result<Option<GuestNet>, NetError> {
        let mut net = None;
        let mut dns = Vec::new();
        for word in text.split_ascii_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            if key == NET_KEY {
                net = Some(parse_net(value)?);
            } else if key == DNS_KEY {
                dns = value
                    .split(',')
                    .map(|a| a.parse::<Ipv4Addr>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| NetError::BadDns(value.chars().take(128).collect()))?;
            }
        }
        Ok(net.map(|(address, prefix, gateway, mac)| GuestNet {
            address,
            prefix,
            gateway,
            mac,
            dns,
        }))
    }
}

fn parse_net(value: &str) -> Result<(Ipv4Addr, u8, Ipv4Addr, String), NetError> {
    let bad = || NetError::BadNet(value.chars().take(128).collect());
    let parts: Vec<&str> = value.split(',').collect();
    let [cidr, gw, mac] = parts.as_slice() else {
        return Err(bad());
    };
    let (a, p) = cidr.split_once('/').ok_or_else(bad)?;
    let address = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(bad)?;
    let gateway = gw.parse().map_err(|_| bad())?;
    let ok_mac = mac.len() == 17
        && mac
            .split(':')
            .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()));
    if !ok_mac {
        return Err(bad());
    }
    Ok((address, prefix, gateway, mac.to_ascii_lowercase()))
}

/// Whether this boot needs the modules tagged `tag`: the NIC's only with a network.
pub fn wants_modules(net: Option<&GuestNet>, tag: &str) -> bool {
    tag != MODULE_TAG || net.is_some()
}

/// The interface whose MAC is `mac`, waiting up to [`NIC_WAIT`] for it to appear.
fn find_nic(mac: &str) -> Result<String, NetError> {
    let deadline = Instant::now() + NIC_WAIT;
    loop {
        if let Ok(entries) = fs::read_dir(SYS_NET) {
            for e in entries.filter_map(Result::ok) {
                let addr = fs::read_to_string(e.path().join("address")).unwrap_or_default();
                if addr.trim().eq_ignore_ascii_case(mac) {
                    return Ok(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(NetError::NoNic(mac.to_string()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// A datagram socket for the interface ioctls, closed on drop.
struct Ctl(std::os::fd::OwnedFd);

impl Ctl {
    fn open(ifname: &str) -> Result<Ctl, NetError> {
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(sys("socket", ifname));
        }
        // SAFETY: fd is a new descriptor this value now owns.
        Ok(Ctl(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    fn ifreq(ifname: &str) -> libc::ifreq {
        // SAFETY: ifreq is plain data; the name is truncated to fit with its NUL.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (i, b) in ifname.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
            req.ifr_name[i] = b as libc::c_char;
        }
        req
    }

    fn ioctl<T>(
        &self,
        req: libc::c_ulong,
        arg: &mut T,
        what: &'static str,
        ifname: &str,
    ) -> Result<(), NetError> {
        // SAFETY: `arg` is the structure this request reads or writes.
        let res = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&self.0),
                req as _,
                arg as *mut T,
            )
        };
        if res != 0 {
            return Err(sys(what, ifname));
        }
        Ok(())
    }
}

fn sys(what: &'static str, ifname: &str) -> NetError {
    NetError::Sys {
        what,
        ifname: ifname.to_string(),
        source: Errno::last(),
    }
}

fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

/// Configures the NIC, the default route and the agent's resolv.conf.
pub fn configure(net: &GuestNet) -> Result<String, NetError> {
    let ifname = find_nic(&net.mac)?;
    // No IPv6 on the sandbox network: the host routes none (docs/network.md).
    let _ = fs::write(
        format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
        "1",
    );
    let ctl = Ctl::open(&ifname)?;
    let mut req = Ctl::ifreq(&ifname);
    req.ifr_ifru.ifru_addr = sockaddr(net.address);
    ctl.ioctl(libc::SIOCSIFADDR, &mut req, "setting the address", &ifname)?;
    let mut req = Ctl::ifreq(&ifname);
    req.ifr_ifru.ifru_netmask = sockaddr(netmask(net.prefix));
    ctl.ioctl(
        libc::SIOCSIFNETMASK,
        &mut req,
        "setting the netmask",
        &ifname,
    )?;
    let mut req = Ctl::ifreq(&ifname);
    ctl.ioctl(libc::SIOCGIFFLAGS, &mut req, "reading the flags", &ifname)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    ctl.ioctl(libc::SIOCSIFFLAGS, &mut req, "setting it up", &ifname)?;
    // SAFETY: rtentry is plain data.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr(net.gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    ctl.ioctl(
        libc::SIOCADDRT,
        &mut rt,
        "adding the default route",
        &ifname,
    )?;
    write_resolv_conf(Path::new(RESOLV_CONF), &net.dns)?;
    wait_for_carrier(&ifname)?;
    Ok(ifname)
}

/// Waits until the NIC reports its link up: virtio-net announces the carrier some time
/// after the driver bound (long under TCG), and packets sent before are lost, so the
/// workload starts only once it is there.
fn wait_for_carrier(ifname: &str) -> Result<(), NetError> {
    let path = format!("{SYS_NET}/{ifname}/carrier");
    let deadline = Instant::now() + NIC_WAIT;
    loop {
        if fs::read_to_string(&path)
            .map(|c| c.trim() == "1")
            .unwrap_or(false)
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(NetError::NoCarrier(ifname.to_string()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// resolv.conf text for `dns`.
pub fn resolv_conf(dns: &[Ipv4Addr]) -> String {
    let mut s = String::from("# written by gpucell-agent from the host's resolvers\n");
    for d in dns {
        s.push_str(&format!("nameserver {d}\n"));
    }
    s
}

fn write_resolv_conf(path: &Path, dns: &[Ipv4Addr]) -> Result<(), NetError> {
    let err = |source| NetError::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    fs::write(path, resolv_conf(dns)).map_err(err)
}

/// Puts the agent's resolv.conf at the container's `/etc/resolv.conf` (in the writable
/// overlay), replacing what the image has there. A symlink in the image is replaced,
/// never followed. Nothing to do without a network.
pub fn install_resolv_conf(root: &Path) -> Result<(), NetError> {
    let Ok(text) = fs::read(RESOLV_CONF) else {
        return Ok(());
    };
    write_etc_file(root, "resolv.conf", &text)
}

/// Writes the run's own `/etc` files (a pod's resolv.conf, hosts, hostname) into the
/// container at `root`, over the image's and the agent's.
pub fn install_etc_files(root: &Path, files: &[gpucell_protocol::EtcFile]) -> Result<(), NetError> {
    for f in files {
        if let Some(problem) = f.problem() {
            return Err(NetError::EtcFile(problem));
        }
        write_etc_file(root, &f.name, f.content.as_bytes())?;
    }
    Ok(())
}

/// `<root>/etc/<name>` (the container's `/etc` resolved inside `root`) replaced by
/// `bytes`; a symlink there is replaced, never followed; a directory is left alone.
fn write_etc_file(root: &Path, name: &str, bytes: &[u8]) -> Result<(), NetError> {
    let etc = crate::rootpath::resolve(root, "/", "/etc").unwrap_or_else(|_| root.join("etc"));
    let target = etc.join(name);
    let err = |source| NetError::Write {
        path: target.display().to_string(),
        source,
    };
    fs::create_dir_all(&etc).map_err(err)?;
    match fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => fs::remove_file(&target).map_err(err)?,
        Err(_) => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&target)
        .map_err(err)?;
    std::io::Write::write_all(&mut f, bytes).map_err(err)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_etc_files_replace_the_images_and_bad_ones_are_refused() {
        use gpucell_protocol::EtcFile;
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("outside"), "keep").unwrap();
        // The image's resolv.conf is a link out of the container: replaced, not followed.
        std::os::unix::fs::symlink("../outside", root.join("etc/resolv.conf")).unwrap();
        let file = |name: &str, content: &str| EtcFile {
            name: name.into(),
            content: content.into(),
        };
        let files = [
            file(
                "resolv.conf",
                "search ns1.svc.cluster.local\nnameserver 10.96.0.10\n",
            ),
            file("hostname", "pod-a\n"),
        ];
        install_etc_files(root, &files).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("etc/resolv.conf")).unwrap(),
            files[0].content
        );
        assert_eq!(
            fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "pod-a\n"
        );
        assert_eq!(fs::read_to_string(root.join("outside")).unwrap(), "keep");
        for (bad, says) in [
            (file("passwd", "root::0:0::/:/bin/sh\n"), "cannot be set"),
            (file("../outside", "x"), "cannot be set"),
            (
                file("hosts", &"x".repeat(gpucell_protocol::MAX_ETC_FILE + 1)),
                "over the most",
            ),
            (file("hosts", "a\0b"), "NUL"),
        ] {
            let err = install_etc_files(root, &[bad]).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        }
        assert_eq!(fs::read_to_string(root.join("outside")).unwrap(), "keep");
        assert!(!root.join("etc/passwd").exists());
    }

    #[test]
    fn parses_the_host_words() {
        let n = GuestNet::from_cmdline(
            "console=ttyS0 gpucell.net=10.200.0.2/30,10.200.0.1,52:54:00:AB:cd:01 gpucell.dns=1.1.1.1,203.0.113.53",
        )
        .unwrap()
        .unwrap();
        assert_eq!(n.address, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!((n.prefix, n.gateway), (30, Ipv4Addr::new(10, 200, 0, 1)));
        assert_eq!(n.mac, "52:54:00:ab:cd:01");
        assert_eq!(n.dns.len(), 2);
        assert_eq!(GuestNet::from_cmdline("console=ttyS0").unwrap(), None);
        for bad in [
            "gpucell.net=10.200.0.2,10.200.0.1,52:54:00:ab:cd:01",
            "gpucell.net=10.200.0.2/33,10.200.0.1,52:54:00:ab:cd:01",
            "gpucell.net=10.200.0.2/30,gw,52:54:00:ab:cd:01",
            "gpucell.net=10.200.0.2/30,10.200.0.1,52:54:00:ab:cd",
            "gpucell.net=10.200.0.2/30,10.200.0.1",
        ] {
            assert!(
                matches!(GuestNet::from_cmdline(bad), Err(NetError::BadNet(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            GuestNet::from_cmdline("gpucell.dns=1.1.1.1,x"),
            Err(NetError::BadDns(_))
        ));
        assert_eq!(netmask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
    }

    #[test]
    fn the_nic_module_only_with_a_network() {
        let n = GuestNet::from_cmdline("gpucell.net=10.200.0.2/30,10.200.0.1,52:54:00:ab:cd:01")
            .unwrap();
        assert!(wants_modules(n.as_ref(), "net=virtio"));
        assert!(!wants_modules(None, "net=virtio"));
        assert!(wants_modules(None, "always"));
        assert_eq!(
            resolv_conf(&[Ipv4Addr::new(1, 1, 1, 1)]),
            "# written by gpucell-agent from the host's resolvers\nnameserver 1.1.1.1\n"
        );
    }
}

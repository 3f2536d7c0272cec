//! Published ports: each is reserved on the host for the run's length by a bound (not
//! listening) socket on every address, so that nothing else on the host can take it
//! while traffic to it goes to the sandbox; a port already bound is refused with its
//! holder named (from `/proc/net/*` and the processes' descriptors).

use std::os::fd::OwnedFd;
use std::path::Path;

use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, SockaddrIn};

use crate::spec::{Proto, Publish};

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("--publish {publish}: host port {port}/{proto} is taken by {holder}; pick another host port or stop it")]
    Taken {
        publish: Publish,
        port: u16,
        proto: Proto,
        holder: String,
    },
    #[error("--publish {publish}: cannot reserve host port {port}/{proto}")]
    Bind {
        publish: Publish,
        port: u16,
        proto: Proto,
        #[source]
        source: nix::errno::Errno,
    },
}

/// Binds every published host port; fails on the first that is taken.
pub fn reserve(publish: &[Publish], proc_dir: &Path) -> Result<Vec<OwnedFd>, PortError> {
    publish.iter().map(|p| reserve_one(p, proc_dir)).collect()
}

fn reserve_one(p: &Publish, proc_dir: &Path) -> Result<OwnedFd, PortError> {
    let ty = match p.proto {
        Proto::Tcp => SockType::Stream,
        Proto::Udp => SockType::Datagram,
    };
    let bind_err = |source| PortError::Bind {
        publish: *p,
        port: p.host_port,
        proto: p.proto,
        source,
    };
    let fd = socket(AddressFamily::Inet, ty, SockFlag::SOCK_CLOEXEC, None).map_err(bind_err)?;
    let addr = SockaddrIn::new(0, 0, 0, 0, p.host_port);
    match bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
        Ok(()) => Ok(fd),
        Err(nix::errno::Errno::EADDRINUSE) => Err(PortError::Taken {
            publish: *p,
            port: p.host_port,
            proto: p.proto,
            holder: holder(proc_dir, p.host_port, p.proto),
        }),
        Err(e) => Err(bind_err(e)),
    }
}

/// Socket inodes bound to local `port` in a `/proc/net/{tcp,udp}{,6}` table.
pub fn inodes_on_port(table: &str, port: u16) -> Vec<u64> {
    let want = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = f.get(1)?;
            (local.ends_with(&want)).then(|| f.get(9)?.parse().ok())?
        })
        .filter(|i| *i != 0)
        .collect()
}

/// `pid N (comm)` of the process holding `port`, or a phrase saying it is unknown.
pub fn holder(proc_dir: &Path, port: u16, proto: Proto) -> String {
    let mut inodes = Vec::new();
    for t in [proto.as_str().to_string(), format!("{}6", proto.as_str())] {
        if let Ok(text) = std::fs::read_to_string(proc_dir.join("net").join(t)) {
            inodes.extend(inodes_on_port(&text, port));
        }
    }
    if inodes.is_empty() {
        return "another socket (its owner is not visible here)".into();
    }
    let Ok(procs) = std::fs::read_dir(proc_dir) else {
        return "another process".into();
    };
    for p in procs.filter_map(Result::ok) {
        let name = p.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let l = link.to_string_lossy();
            if inodes.iter().any(|i| l == format!("socket:[{i}]")) {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                return format!("pid {name} ({})", comm.trim());
            }
        }
    }
    format!(
        "a socket (inode {}) of a process not visible here",
        inodes[0]
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tables() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                 0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n\
                 1: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 999 1\n";
        assert_eq!(inodes_on_port(t, 8080), vec![12345]);
        assert_eq!(inodes_on_port(t, 80), vec![999]);
        assert!(inodes_on_port(t, 81).is_empty());
    }

    #[test]
    fn a_taken_port_names_its_holder() {
        // A port this test holds itself: the holder is this process.
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let p = Publish {
            host_port: port,
            guest_port: 80,
            proto: Proto::Tcp,
        };
        let err = reserve(&[p], Path::new("/proc")).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(l);
        let held = reserve(&[p], Path::new("/proc")).unwrap();
        // While reserved, nobody else binds it.
        assert!(std::net::TcpListener::bind(("0.0.0.0", port)).is_err());
        drop(held);
        assert!(std::net::TcpListener::bind(("0.0.0.0", port)).is_ok());
    }
}

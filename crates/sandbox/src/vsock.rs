//! The vsock channel: the host listens on a port the kernel picks for this sandbox
//! (passed to the agent as `gpucell.vsock_port=N`) and accepts only the connection
//! from the sandbox's guest CID. Used where the host has `/dev/vhost-vsock`.
//!
//! One port per sandbox: concurrent sandboxes never compete for a listener.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    accept, bind, getpeername, getsockname, listen, socket, AddressFamily, Backlog, SockFlag,
    SockType, VsockAddr,
};

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cannot listen on vsock port {}", port_name(*.port))]
    Listen {
        port: u32,
        #[source]
        source: nix::Error,
    },
    #[error("waiting for the agent's vsock connection failed")]
    Accept(#[source] nix::Error),
    #[error("the agent did not connect over vsock within {0:?}")]
    Timeout(Duration),
}

/// A listening vsock socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
    port: u32,
}

fn port_name(port: u32) -> String {
    if port == libc::VMADDR_PORT_ANY {
        "(any free port)".to_string()
    } else {
        port.to_string()
    }
}

impl VsockListener {
    /// Listens on a free port the kernel picks; [`VsockListener::port`] says which.
    pub fn bind_any() -> Result<Self, VsockError> {
        Self::bind(libc::VMADDR_PORT_ANY)
    }

    /// Listens on `port` (`VMADDR_PORT_ANY`: one the kernel picks).
    pub fn bind(port: u32) -> Result<Self, VsockError> {
        let err = |source| VsockError::Listen { port, source };
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(err)?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port)).map_err(err)?;
        listen(&fd, Backlog::new(4).map_err(err)?).map_err(err)?;
        let port = getsockname::<VsockAddr>(fd.as_raw_fd())
            .map_err(err)?
            .port();
        Ok(VsockListener { fd, port })
    }

    pub fn port(&self) -> u32 {
        self.port
    }

    /// Accepts the connection from `guest_cid`, refusing others, until `deadline`.
    /// `alive` is polled between waits; returning false stops the wait.
    pub fn accept_from(
        &self,
        guest_cid: u32,
        deadline: Instant,
        alive: &mut dyn FnMut() -> bool,
    ) -> Result<File, VsockError> {
        let start = Instant::now();
        loop {
            let now = Instant::now();
            if now >= deadline || !alive() {
                return Err(VsockError::Timeout(start.elapsed()));
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            let ms = PollTimeout::try_from(wait.as_millis() as i32).unwrap_or(PollTimeout::ZERO);
            match poll(&mut fds, ms) {
                Ok(0) | Err(nix::Error::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(VsockError::Accept(e)),
            }
            let raw = match accept(self.fd.as_raw_fd()) {
                Ok(fd) => fd,
                Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(VsockError::Accept(e)),
            };
            // SAFETY: accept returned a new descriptor that nothing else owns.
            let conn = unsafe { OwnedFd::from_raw_fd(raw) };
            match getpeername::<VsockAddr>(conn.as_raw_fd()) {
                Ok(peer) if peer.cid() == guest_cid => {
                    // Back to blocking mode for the relay's reader thread.
                    let flags = nix::fcntl::fcntl(conn.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
                        .map_err(VsockError::Accept)?;
                    let mut flags = nix::fcntl::OFlag::from_bits_truncate(flags);
                    flags.remove(nix::fcntl::OFlag::O_NONBLOCK);
                    nix::fcntl::fcntl(conn.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))
                        .map_err(VsockError::Accept)?;
                    return Ok(File::from(conn));
                }
                Ok(peer) => {
                    tracing::warn!(
                        cid = peer.cid(),
                        expected = guest_cid,
                        "refused a vsock connection from another guest"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "vsock peer without an address"),
            }
        }
    }
}

/// Bounds every write on `conn` (`SO_SNDTIMEO`): a guest that stops reading its end of
/// the channel makes a host write fail after `timeout` instead of blocking it for ever
/// (the stdin relay, a forwarded signal, the final shutdown request).
pub fn set_send_timeout(conn: &impl AsFd, timeout: Duration) -> nix::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt::SendTimeout};
    let tv = nix::sys::time::TimeVal::new(
        libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        libc::suseconds_t::from(timeout.subsec_micros()),
    );
    setsockopt(conn, SendTimeout, &tv)
}

/// A guest CID for a new VM: random in the range the kernel allows (3 and up).
pub fn random_cid() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    3 + (u32::from_le_bytes(b) % 0x7fff_0000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_timeout_bounds_writes_to_a_peer_that_never_reads() {
        use std::io::Write;
        let (mut ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        set_send_timeout(&ours, Duration::from_millis(200)).unwrap();
        let start = Instant::now();
        let chunk = vec![0u8; 64 * 1024];
        let err = loop {
            if let Err(e) = ours.write_all(&chunk) {
                break e;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "writes never blocked"
            );
        };
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock, "{err}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_taken_port_is_an_error_and_accept_gives_up_on_time() {
        let port = 40_000 + (random_cid() % 20_000);
        let first = match VsockListener::bind(port) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("skipping: this host has no AF_VSOCK: {e}");
                return;
            }
        };
        assert_eq!(first.port(), port);
        // A taken port is refused, naming it.
        let err = VsockListener::bind(port).unwrap_err();
        assert!(matches!(err, VsockError::Listen { .. }));
        assert!(err.to_string().contains(&port.to_string()), "{err}");
        // Concurrent sandboxes each get a port of their own.
        let a = VsockListener::bind_any().unwrap();
        let b = VsockListener::bind_any().unwrap();
        assert_ne!(a.port(), b.port());
        assert_ne!(a.port(), libc::VMADDR_PORT_ANY);
        assert_ne!(a.port(), port);
        let start = Instant::now();
        let err = first
            .accept_from(7, Instant::now() + Duration::from_millis(300), &mut || true)
            .unwrap_err();
        assert!(matches!(err, VsockError::Timeout(_)), "{err}");
        assert!(start.elapsed() < Duration::from_secs(2));
        // A dead VM stops the wait at once.
        let start = Instant::now();
        let err = first
            .accept_from(7, Instant::now() + Duration::from_secs(30), &mut || false)
            .unwrap_err();
        assert!(matches!(err, VsockError::Timeout(_)));
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(random_cid() >= 3);
    }
}

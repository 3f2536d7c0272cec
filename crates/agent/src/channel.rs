//! Opens the byte stream to the host: the named virtio-serial port, or vsock to CID 2.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use gpucell_protocol::VIRTIO_SERIAL_PORT_NAME;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};

use crate::cmdline::Channel;

/// How long the agent looks for its channel before giving up.
pub const CHANNEL_TIMEOUT: Duration = Duration::from_secs(10);
const RETRY: Duration = Duration::from_millis(20);
/// The host's vsock CID.
const HOST_CID: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("no virtio-serial port named `{VIRTIO_SERIAL_PORT_NAME}` appeared under /sys/class/virtio-ports within {0:?}")]
    NoPort(Duration),
    #[error("virtio-serial port {0} exists but the host did not connect within {1:?}")]
    HostAbsent(String, Duration),
    #[error("opening {0} failed")]
    Open(String, #[source] std::io::Error),
    #[error("could not connect to the host on vsock port {1} within {0:?}: {2}")]
    Vsock(Duration, u32, nix::errno::Errno),
}

/// Opens the channel, waiting up to [`CHANNEL_TIMEOUT`].
pub fn open(kind: Channel) -> Result<File, ChannelError> {
    let deadline = Instant::now() + CHANNEL_TIMEOUT;
    match kind {
        Channel::Serial => open_serial(
            Path::new("/sys/class/virtio-ports"),
            Path::new("/dev"),
            deadline,
        ),
        Channel::Vsock { port } => open_vsock(port, deadline),
    }
}

/// Finds the device node of the port named [`VIRTIO_SERIAL_PORT_NAME`].
pub fn find_port(class_dir: &Path) -> Option<String> {
    let mut ports: Vec<String> = fs::read_dir(class_dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ports.sort();
    ports.into_iter().find(|p| {
        let name = fs::read(class_dir.join(p).join("name")).unwrap_or_default();
        name.len() < 256
            && name.strip_suffix(b"\n").unwrap_or(&name) == VIRTIO_SERIAL_PORT_NAME.as_bytes()
    })
}

fn open_serial(class_dir: &Path, dev: &Path, deadline: Instant) -> Result<File, ChannelError> {
    let port = loop {
        if let Some(p) = find_port(class_dir) {
            break p;
        }
        if Instant::now() >= deadline {
            return Err(ChannelError::NoPort(CHANNEL_TIMEOUT));
        }
        std::thread::sleep(RETRY);
    };
    let node = dev.join(&port);
    let shown = node.display().to_string();
    // devtmpfs creates the node asynchronously after the port appears.
    let file = loop {
        match OpenOptions::new().read(true).write(true).open(&node) {
            Ok(f) => break f,
            Err(e) if Instant::now() >= deadline => return Err(ChannelError::Open(shown, e)),
            Err(_) => std::thread::sleep(RETRY),
        }
    };
    // Until the host opens its end, the port polls as hung up and reads return EOF.
    loop {
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLOUT)];
        let hung_up = match poll(&mut fds, PollTimeout::from(50u16)) {
            Ok(_) => fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
            Err(_) => true,
        };
        if !hung_up {
            return Ok(file);
        }
        if Instant::now() >= deadline {
            return Err(ChannelError::HostAbsent(shown, CHANNEL_TIMEOUT));
        }
        std::thread::sleep(RETRY);
    }
}

fn open_vsock(port: u32, deadline: Instant) -> Result<File, ChannelError> {
    let addr = VsockAddr::new(HOST_CID, port);
    loop {
        let attempt = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .and_then(|fd| connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).map(|_| fd));
        match attempt {
            Ok(fd) => return Ok(File::from(fd)),
            Err(e) if Instant::now() >= deadline => {
                return Err(ChannelError::Vsock(CHANNEL_TIMEOUT, port, e))
            }
            Err(_) => std::thread::sleep(RETRY),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn port_is_found_by_name() {
        let d = tempfile::tempdir().unwrap();
        for (port, name) in [
            ("vport0p0", "org.other\n"),
            ("vport0p1", "org.gpucell.agent.0\n"),
            ("vport1p1", "x"),
        ] {
            fs::create_dir(d.path().join(port)).unwrap();
            fs::write(d.path().join(port).join("name"), name).unwrap();
        }
        assert_eq!(find_port(d.path()).as_deref(), Some("vport0p1"));
        fs::write(d.path().join("vport0p1/name"), "org.gpucell.agent.0.evil\n").unwrap();
        assert_eq!(find_port(d.path()), None);
        assert_eq!(find_port(&d.path().join("missing")), None);
    }
}

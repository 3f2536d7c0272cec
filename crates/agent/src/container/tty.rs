//! A process's terminal. The child makes it itself, once it sees the container's root:
//! it opens `/dev/ptmx` (the container's own devpts instance, so that `tty` names a
//! `/dev/pts/N` that exists in the container), takes the slave as its stdin, stdout,
//! stderr and controlling terminal, and passes the master to the agent over a socket
//! (SCM_RIGHTS) before it executes the workload. The agent reads the master as the
//! process's output, writes stdin to it and sets its size.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use gpucell_protocol::WindowSize;
use nix::errno::Errno;
use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};

use super::ContainerError;

/// The end-of-file character when the terminal's settings cannot be read (^D).
const DEFAULT_VEOF: u8 = 4;

/// The socket pair the master travels through: the agent's end, the child's end.
pub(super) fn channel() -> Result<(OwnedFd, OwnedFd), ContainerError> {
    socket::socketpair(
        socket::AddressFamily::Unix,
        socket::SockType::Stream,
        None,
        socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| ContainerError::Sys("socketpair for the terminal", e))
}

/// In the child, inside the container's root: a new pty whose slave becomes stdin,
/// stdout, stderr and the controlling terminal (the child has called `setsid`), owned
/// by `owner` (uid, gid), sized `window`; the master goes to the agent over `sock`.
pub(super) fn attach_in_child(
    sock: RawFd,
    window: Option<WindowSize>,
    owner: (u32, u32),
) -> Result<(), String> {
    let sys = |what: &'static str| move |e: Errno| format!("{what}: {e}");
    let master = nix::fcntl::open(
        "/dev/ptmx",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(sys("opening /dev/ptmx in the container"))?;
    // SAFETY: `open` returned this descriptor and nothing else owns it.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the pointer, which lives across the call.
    Errno::result(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })
        .map_err(sys("unlocking the pty"))?;
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new descriptor.
    let slave = Errno::result(unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY,
        )
    })
    .map_err(sys("opening the pty's slave"))?;
    // SAFETY: the ioctl returned this new descriptor.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    // The user of the process owns its terminal, as a login would give it.
    let _ = nix::unistd::fchown(
        slave.as_raw_fd(),
        Some(nix::unistd::Uid::from_raw(owner.0)),
        Some(nix::unistd::Gid::from_raw(owner.1)),
    );
    if let Some(size) = window {
        set_size(&master, size).map_err(sys("setting the terminal's size"))?;
    }
    // SAFETY: TIOCSCTTY takes an int by value.
    Errno::result(unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) })
        .map_err(sys("making the pty the controlling terminal"))?;
    for i in 0..3 {
        nix::unistd::dup2(slave.as_raw_fd(), i).map_err(sys("dup2 of the pty"))?;
    }
    let fds = [master.as_raw_fd()];
    let iov = [std::io::IoSlice::new(b"t")];
    socket::sendmsg::<()>(
        sock,
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(sys("passing the pty to the agent"))?;
    Ok(())
}

/// In the agent: the master the child passed over `sock`; `None` when the child sent
/// none (it failed before, and says why on its report pipe).
pub(super) fn receive(sock: &OwnedFd) -> Option<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .ok()?;
    let mut got = None;
    for c in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel installed this descriptor for us; nothing else owns it.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                got.get_or_insert(fd);
            }
        }
    }
    got
}

/// TIOCSWINSZ on a pty's master: the kernel sends SIGWINCH to the terminal's
/// foreground process group.
pub fn set_size(master: &impl AsRawFd, size: WindowSize) -> Result<(), Errno> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives across the call.
    Errno::result(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// The terminal's end-of-file character (VEOF, ^D unless the process changed it).
pub fn eof_char(master: &impl AsRawFd) -> u8 {
    // SAFETY: the borrowed descriptor stays open for the duration of the call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(master.as_raw_fd()) };
    match nix::sys::termios::tcgetattr(fd) {
        Ok(t) => match t.control_chars[libc::VEOF] {
            0 => DEFAULT_VEOF,
            c => c,
        },
        Err(_) => DEFAULT_VEOF,
    }
}

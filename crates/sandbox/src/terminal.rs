//! The host's terminal when a workload has one (`gpucell run -t`): its size, raw mode for
//! the length of the run (restored when the guard drops, on every way out), and SIGWINCH
//! forwarded as a resize of the workload's terminal.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::thread::JoinHandle;

use gpucell_protocol::WindowSize;
use nix::sys::termios::{self, SetArg, Termios};
use signal_hook::consts::SIGWINCH;
use signal_hook::iterator::{Handle, Signals};

use crate::channel::EventSender;

#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("reading the terminal's settings")]
    Get(#[source] nix::Error),
    #[error("putting the terminal in raw mode")]
    Set(#[source] nix::Error),
    #[error("cannot install the SIGWINCH handler")]
    Signal(#[source] std::io::Error),
}

/// The size of the terminal `fd` is, or `None` when it is not one or has no size.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<WindowSize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize to the pointer, which lives across the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    let size = WindowSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    };
    (rc == 0 && size.problem().is_none()).then_some(size)
}

/// A terminal in raw mode (no echo, no line editing, no signals from ^C: every byte goes
/// to the workload's terminal, which does all that) until dropped.
pub struct RawMode {
    fd: OwnedFd,
    saved: Termios,
}

impl RawMode {
    /// Puts the terminal `fd` in raw mode; its settings come back when the guard drops.
    pub fn enter(fd: BorrowedFd<'_>) -> Result<Self, TerminalError> {
        let fd = fd
            .try_clone_to_owned()
            .map_err(|e| TerminalError::Get(nix::Error::from_raw(e.raw_os_error().unwrap_or(0))))?;
        let saved = termios::tcgetattr(&fd).map_err(TerminalError::Get)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&fd, SetArg::TCSANOW, &raw).map_err(TerminalError::Set)?;
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Err(e) = termios::tcsetattr(self.fd.as_fd(), SetArg::TCSANOW, &self.saved) {
            tracing::warn!(error = %e, "restoring the terminal's settings");
        }
    }
}

/// Forwards the host terminal's size to the workload's on every SIGWINCH, until dropped.
pub struct ResizeForwarder {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

impl ResizeForwarder {
    /// Watches SIGWINCH; each time, the size of `tty` goes to `events`.
    pub fn install(events: EventSender, tty: OwnedFd) -> Result<Self, TerminalError> {
        let mut signals = Signals::new([SIGWINCH]).map_err(TerminalError::Signal)?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("sigwinch".into())
            .spawn(move || {
                for _ in signals.forever() {
                    if let Some(size) = window_size(tty.as_fd()) {
                        let _ = events.resize(size.rows, size.cols);
                    }
                }
            })
            .map_err(TerminalError::Signal)?;
        Ok(ResizeForwarder {
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for ResizeForwarder {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use nix::sys::termios::LocalFlags;

    #[test]
    fn the_size_of_a_pty_is_read_and_a_pipe_has_none() {
        let ws = nix::pty::Winsize {
            ws_row: 42,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&ws), None).unwrap();
        assert_eq!(
            window_size(pty.slave.as_fd()),
            Some(WindowSize {
                rows: 42,
                cols: 120
            })
        );
        let unsized_pty = nix::pty::openpty(None, None).unwrap();
        assert_eq!(window_size(unsized_pty.slave.as_fd()), None);
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert_eq!(window_size(r.as_fd()), None);
    }

    #[test]
    fn raw_mode_lasts_as_long_as_the_guard() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let cooked = termios::tcgetattr(&pty.slave).unwrap();
        assert!(cooked
            .local_flags
            .contains(LocalFlags::ICANON | LocalFlags::ECHO));
        let guard = RawMode::enter(pty.slave.as_fd()).unwrap();
        let raw = termios::tcgetattr(&pty.slave).unwrap();
        assert!(!raw
            .local_flags
            .intersects(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG));
        drop(guard);
        let back = termios::tcgetattr(&pty.slave).unwrap();
        assert_eq!(back.local_flags, cooked.local_flags);
        assert_eq!(back.input_flags, cooked.input_flags);
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(matches!(
            RawMode::enter(r.as_fd()),
            Err(TerminalError::Get(_))
        ));
    }
}

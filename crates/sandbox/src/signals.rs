//! Forwarding of SIGINT and SIGTERM to the workload while a sandbox runs.
//!
//! The handlers only queue the signal number (signal-hook's self-pipe); a thread hands
//! it to the relay, which sends it to the agent. QEMU runs in its own process group, so
//! a terminal's ^C reaches gpucell only, never QEMU directly.

use std::thread::JoinHandle;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

use crate::channel::EventSender;

#[derive(Debug, thiserror::Error)]
#[error("cannot install the SIGINT/SIGTERM handlers")]
pub struct SignalError(#[source] std::io::Error);

/// Forwards SIGINT and SIGTERM to `events` until dropped.
pub struct SignalForwarder {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

impl SignalForwarder {
    pub fn install(events: EventSender) -> Result<Self, SignalError> {
        let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(SignalError)?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    tracing::debug!(signal = sig, "received signal");
                    events.signal(sig);
                }
            })
            .map_err(SignalError)?;
        Ok(SignalForwarder {
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for SignalForwarder {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

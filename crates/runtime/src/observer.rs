//! How a front end follows a run while it happens: phases as they begin, warnings, and
//! the handle that forwards signals to the workload. Output itself streams through the
//! writers of [`gpucell_sandbox::SessionIo`].

use gpucell_sandbox::EventSender;
use serde::Serialize;

/// The phases of a run, in order. A run that fails stops at the phase it failed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Checking the request.
    Validate,
    /// Fetching the image and building its disk.
    Image,
    /// Loading the guest flavour's kernel and init image.
    Guest,
    /// Choosing the accelerator (a cached probe under `auto`).
    Accel,
    /// Taking the devices (allocation, binding).
    Devices,
    /// QEMU started; the guest boots, then the workload runs.
    Sandbox,
    /// Resetting and returning the devices.
    Release,
    /// The report is complete.
    Done,
}

/// Receives a run's progress. Every method has a default, so a front end implements
/// only what it shows.
pub trait Observer {
    fn phase(&mut self, _phase: Phase) {}
    /// Something the user should know that does not stop the run.
    fn warning(&mut self, message: &str) {
        tracing::warn!("{message}");
    }
    /// The sandbox is about to start: `events` forwards signals to the workload until the
    /// run returns.
    fn sandbox_starting(&mut self, _events: EventSender) {}
}

/// An observer that only logs.
pub struct Quiet;

impl Observer for Quiet {}

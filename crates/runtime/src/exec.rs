//! A process started in a running sandbox beside its workload (`docker exec`'s job):
//! the run core's entry for front ends (the containerd shim's `exec`). The sandbox
//! handle comes from [`crate::Observer::sandbox_starting`].

use gpucell_protocol::ProcSpec;
use gpucell_sandbox::EventSender;

pub use gpucell_sandbox::{ExecError, ExecHandle, ProcIo};

/// Starts `spec` in the container of the sandbox behind `sandbox` and returns once the
/// guest runs it: its pid, a signal, its exit. Its output goes to `io` as it comes; its
/// stdin is forwarded until EOF. Fails when the workload is not running.
pub fn exec_in(sandbox: &EventSender, spec: ProcSpec, io: ProcIo) -> Result<ExecHandle, ExecError> {
    sandbox.exec(spec, io)
}

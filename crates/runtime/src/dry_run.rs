//! `--dry-run`: a run up to the point of no return.
use crate::node::Node;
use crate::observer::Observer;
use crate::report::DryRunReport;
use crate::request::RunRequest;
use crate::RunFailure;

/// Resolves the image, the guest, the accelerator, the devices a run would take and
/// its QEMU command line, and stops: no VM started, nothing held.
pub fn dry_run(
    _node: &Node,
    _request: RunRequest,
    _obs: &mut dyn Observer,
) -> Result<DryRunReport, RunFailure> {
    Err(RunFailure::Request(crate::RequestError::field(
        "dry_run",
        "not available in this build yet",
    )))
}

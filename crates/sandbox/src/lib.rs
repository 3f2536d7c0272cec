//! The sandbox: the QEMU launcher and QMP client, the accelerator probe, and the
//! lifecycle of one microVM running one workload.
//!
//! - [`args`]: QEMU command lines from typed structs.
//! - [`command`]: the one pure function that builds a QEMU command from its inputs.
//! - [`process`]: the QEMU child (own process group, parent-death signal, bounded
//!   console capture), killed on drop.
//! - [`qmp`]: a small QMP client with timeouts.
//! - [`rundir`]: the per-run directory and its cleanup.
//! - [`channel`]: the host side of the agent protocol, with limits.
//! - [`exec`]: processes besides the workload (execs, added containers) in a session.
//! - [`accel`]: KVM/TCG selection by probe boot, cached.
//! - [`spec`]: docker's rules from image config and flags to the agent's run request.
//! - [`devices`]: PCI passthrough wiring, 64-bit hole sizing, vCPU pinning.
//! - [`jail`]: the jailed QEMU (namespaces, own root, own uid, no capabilities,
//!   cgroup limits, seccomp checked).
//! - [`memory`]: preallocated and hugepage guest memory.
//! - [`sandbox`]: the whole lifecycle of one VM.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod accel;
pub mod args;
mod cachefile;
pub mod caps;
pub mod channel;
pub mod command;
pub mod console;
pub mod devices;
pub mod exec;
pub mod hotplug;
pub mod jail;
pub mod memory;
pub mod process;
pub mod qmp;
pub mod rundir;
pub mod sandbox;
pub mod signals;
pub mod spec;
pub mod terminal;
pub mod vsock;

pub use accel::{probe, AccelChoice, ProbeInput, ProbeResult, Selection};
pub use args::{Accel, QemuCommand, ToArgs};
pub use channel::{
    event_channel, EventReceiver, EventSender, Limits, SessionError, SessionIo, SessionReport,
};
pub use command::{qemu_command, ChannelKind, ChannelLayout, CommandInput, NetLayout};
pub use exec::{ExecError, ExecHandle, ProcIo};
pub use sandbox::{
    ChannelChoice, Plan, RunAsPolicy, RunError, RunOutcome, Sandbox, SandboxError, Timings,
    VmConfig,
};
pub use signals::SignalForwarder;
pub use terminal::{window_size, RawMode, ResizeForwarder, TerminalError};

//! The host ↔ agent protocol.
//!
//! One byte stream (a virtio-serial port or a vsock connection) carries frames:
//!
//! ```text
//! +----------------+-----------+------------------------------+
//! | length: u32 BE | kind: u8  | payload: length - 1 bytes    |
//! +----------------+-----------+------------------------------+
//! ```
//!
//! `length` counts the kind byte and the payload. The stdio frames of processes besides
//! the workload (`ProcStdin`, `ProcStdout`, `ProcStderr`, `ProcStdinEof`) start their
//! payload with the process id, 4 bytes big-endian. Control messages carry a JSON
//! payload; stdout/stderr/stdin chunks carry raw bytes. Every length is checked
//! against a hard limit *before* anything is allocated: the guest may be fully
//! compromised and the host must stay bounded whatever it sends.
//!
//! The first frame each side sends is a `Hello` naming [`PROTOCOL_VERSION`];
//! a peer with another major version is refused.

// Layers, each built only on the ones below it: `kind` (frame kinds and their limits),
// `frame` (length-prefixed framing), `message` (typed messages in frames).
pub mod driver;
mod frame;
mod kind;
mod message;
mod proc;
mod volume;

pub use frame::{FrameError, FrameReader, FrameWriter, RawFrame};
pub use kind::{
    Kind, MAX_CONTROL_PAYLOAD, MAX_DATA_PAYLOAD, MAX_RESIZE_PAYLOAD, MAX_RUN_PAYLOAD, PROC_ID_LEN,
};
pub use message::{
    DeviceInfo, DeviceMatch, DriverReport, EtcFile, ExitStatus, FromGuest, FromHost, GpuFacts,
    GpuInjection, GpuReport, GuestHello, HostHello, RootfsSpec, RunSpec, WindowSize,
    ETC_FILE_NAMES, MAX_ETC_FILE, MAX_WINDOW_DIMENSION,
};
pub use proc::{
    valid_disk_serial, ContainerAdd, ProcSpec, ProcStart, DISK_SERIAL_PREFIX, MAX_DISK_SERIAL,
    MAX_PROCS,
};
pub use volume::{
    destination_problem, is_plain_relative, valid_empty_dir_name, volumes_problem,
    volumes_wire_problem, Volume, VolumeEntry, VolumeNode, VolumeSource,
    MAX_CONTAINER_VOLUME_BYTES, MAX_EMPTY_DIR_NAME, MAX_VOLUMES, MAX_VOLUMES_JSON,
    MAX_VOLUME_BYTES, MAX_VOLUME_ENTRIES, MAX_VOLUME_FILE, MAX_VOLUME_PATH,
};

/// Version of the wire protocol. Bumped on any incompatible change.
/// 2: processes besides the workload (`Proc*` frames) and `ContainerAdd`.
/// 3: terminals (`terminal` and `window` in `RunSpec` and `ProcSpec`, `Resize`) and a
/// run's volumes (`RunSpec::volumes`), which make `Run` and `ContainerAdd` frames larger
/// ([`MAX_RUN_PAYLOAD`]).
pub const PROTOCOL_VERSION: u32 = 3;

/// Name of the virtio-serial port the agent looks for in the guest
/// (`/sys/class/virtio-ports/*/name`).
pub const VIRTIO_SERIAL_PORT_NAME: &str = "org.gpucell.agent.0";

/// vsock port the agent connects to (on CID 2) when the command line names none.
/// The host gives every sandbox its own port (see [`CMDLINE_VSOCK_PORT_KEY`]) so
/// that concurrent sandboxes never compete for one listener.
pub const VSOCK_PORT: u32 = 1024;

/// Kernel command line key naming the image filesystem of this boot
/// (`gpucell.rootfs=erofs` or `ext4`): the agent loads only that filesystem's modules.
/// Absent: it loads every filesystem it has.
pub const CMDLINE_ROOTFS_KEY: &str = "gpucell.rootfs";

/// Kernel command line key naming the host's vsock port for this sandbox:
/// `gpucell.vsock_port=N`.
pub const CMDLINE_VSOCK_PORT_KEY: &str = "gpucell.vsock_port";

/// Kernel command line key the host sets to tell the agent which channel to use:
/// `gpucell.channel=serial` or `gpucell.channel=vsock`.
pub const CMDLINE_CHANNEL_KEY: &str = "gpucell.channel";

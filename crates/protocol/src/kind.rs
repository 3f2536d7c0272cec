//! Frame kinds and how much each may carry. The lowest layer: framing and messages
//! build on it.

/// Largest JSON payload of a control message (a run spec with a big environment fits).
pub const MAX_CONTROL_PAYLOAD: usize = 256 * 1024;
/// Largest JSON payload of a `Run` or `ContainerAdd`: its volumes' files travel in it
/// (at most 16 MiB, base64-encoded, plus the entries' JSON). Only the agent's reader
/// takes them that large (`FrameReader::taking_runs`); any other holds them to
/// [`MAX_CONTROL_PAYLOAD`], so a guest cannot make the host allocate more.
pub const MAX_RUN_PAYLOAD: usize = 24 << 20;
/// Largest raw payload of one stdout/stderr/stdin chunk.
pub const MAX_DATA_PAYLOAD: usize = 64 * 1024;

/// Largest payload of a `Resize` (its JSON is at most about 45 bytes).
pub const MAX_RESIZE_PAYLOAD: usize = 96;

/// Bytes of the big-endian process id that starts every `Proc*` data frame.
pub const PROC_ID_LEN: usize = 4;

/// Frame kind byte. Host→guest kinds are below 0x40, guest→host kinds from 0x40.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    HostHello = 0x01,
    Run = 0x02,
    Stdin = 0x03,
    StdinEof = 0x04,
    Signal = 0x05,
    Shutdown = 0x06,
    ProcStart = 0x07,
    ProcStdin = 0x08,
    ProcStdinEof = 0x09,
    ProcSignal = 0x0a,
    ContainerAdd = 0x0b,
    Resize = 0x0c,
    GuestHello = 0x41,
    Devices = 0x42,
    Started = 0x43,
    Stdout = 0x44,
    Stderr = 0x45,
    Exited = 0x46,
    Error = 0x47,
    Log = 0x48,
    Driver = 0x49,
    ProcStarted = 0x4a,
    ProcStdout = 0x4b,
    ProcStderr = 0x4c,
    ProcExited = 0x4d,
    ProcError = 0x4e,
}

impl Kind {
    pub fn from_byte(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            0x01 => HostHello,
            0x02 => Run,
            0x03 => Stdin,
            0x04 => StdinEof,
            0x05 => Signal,
            0x06 => Shutdown,
            0x07 => ProcStart,
            0x08 => ProcStdin,
            0x09 => ProcStdinEof,
            0x0a => ProcSignal,
            0x0b => ContainerAdd,
            0x0c => Resize,
            0x41 => GuestHello,
            0x42 => Devices,
            0x43 => Started,
            0x44 => Stdout,
            0x45 => Stderr,
            0x46 => Exited,
            0x47 => Error,
            0x48 => Log,
            0x49 => Driver,
            0x4a => ProcStarted,
            0x4b => ProcStdout,
            0x4c => ProcStderr,
            0x4d => ProcExited,
            0x4e => ProcError,
            _ => return None,
        })
    }

    /// Largest payload a frame of this kind may carry.
    pub fn payload_limit(self) -> usize {
        match self {
            Kind::Stdin | Kind::Stdout | Kind::Stderr => MAX_DATA_PAYLOAD,
            Kind::ProcStdin | Kind::ProcStdout | Kind::ProcStderr => PROC_ID_LEN + MAX_DATA_PAYLOAD,
            Kind::ProcStdinEof => PROC_ID_LEN,
            Kind::StdinEof | Kind::Shutdown => 0,
            Kind::Resize => MAX_RESIZE_PAYLOAD,
            Kind::Run | Kind::ContainerAdd => MAX_RUN_PAYLOAD,
            _ => MAX_CONTROL_PAYLOAD,
        }
    }

    pub fn is_from_host(self) -> bool {
        (self as u8) < 0x40
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_maps_to_at_most_one_kind_and_back() {
        let mut kinds = 0;
        for b in 0..=u8::MAX {
            if let Some(k) = Kind::from_byte(b) {
                assert_eq!(k as u8, b);
                assert_eq!(k.is_from_host(), b < 0x40);
                kinds += 1;
            }
        }
        assert_eq!(kinds, 26);
    }

    #[test]
    fn only_a_run_or_an_added_container_may_be_large() {
        for b in 0..=u8::MAX {
            let Some(k) = Kind::from_byte(b) else {
                continue;
            };
            let big = matches!(k, Kind::Run | Kind::ContainerAdd);
            assert_eq!(k.payload_limit() == MAX_RUN_PAYLOAD, big, "{k:?}");
            assert!(!big || k.is_from_host(), "{k:?}");
        }
    }
}

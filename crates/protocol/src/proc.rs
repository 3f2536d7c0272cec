//! Processes besides the main workload: an exec in a running container and the main
//! process of a container added to the pod. Each has a host-chosen id; its stdio frames
//! carry the id as a 4-byte big-endian prefix of the data, its control frames in JSON.

use serde::{Deserialize, Serialize};

use crate::frame::FrameError;
use crate::kind::{Kind, PROC_ID_LEN};
use crate::message::{ExitStatus, RunSpec};

/// Most processes (execs and added containers) a session runs at once besides the main
/// workload; the agent refuses more with `ProcError`.
pub const MAX_PROCS: usize = 64;

/// `RootfsSpec::device` of an added container: `serial:NAME` names the hot-plugged disk
/// by its virtio serial, since its guest name (`/dev/vdX`) depends on discovery order.
pub const DISK_SERIAL_PREFIX: &str = "serial:";
/// Longest virtio-blk serial (the guest sees at most this many bytes).
pub const MAX_DISK_SERIAL: usize = 20;

/// A disk serial gpucell gives and accepts: 1 to [`MAX_DISK_SERIAL`] bytes of ASCII
/// letters, digits and `-`.
pub fn valid_disk_serial(s: &str) -> bool {
    (1..=MAX_DISK_SERIAL).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A process to start in a running container (an exec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcSpec {
    /// argv; `args[0]` is looked up in the container's `PATH` when it has no `/`.
    pub args: Vec<String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    /// Working directory inside the container; empty means `/`.
    #[serde(default)]
    pub cwd: String,
    /// `user`, `uid`, `user:group` or `uid:gid`; empty means root.
    #[serde(default)]
    pub user: String,
    /// The id of the added container (`ContainerAdd`) to run in; `None`: the main one.
    #[serde(default)]
    pub container: Option<u32>,
    /// The process gets a terminal, as [`RunSpec::terminal`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminal: bool,
    /// The terminal's first size, as [`RunSpec::window`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<crate::message::WindowSize>,
}

/// `ProcStart`: start `spec` as process `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcStart {
    pub id: u32,
    pub spec: ProcSpec,
}

/// `ContainerAdd`: mount the container's root filesystem (a disk the host has just
/// plugged in) and start its process as process `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerAdd {
    pub id: u32,
    pub spec: RunSpec,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct SignalBody {
    pub id: u32,
    pub signal: i32,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct StartedBody {
    pub id: u32,
    pub pid: i32,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct ExitedBody {
    pub id: u32,
    pub status: ExitStatus,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    pub id: u32,
    pub message: String,
}

/// Splits a `Proc*` data payload into its process id and the data.
pub(crate) fn split_id(kind: Kind, mut payload: Vec<u8>) -> Result<(u32, Vec<u8>), FrameError> {
    if payload.len() < PROC_ID_LEN {
        return Err(FrameError::NoProcId(kind));
    }
    let id = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
    payload.drain(..PROC_ID_LEN);
    Ok((id, payload))
}

/// The payload of `ProcStdinEof`: the id alone.
pub(crate) fn id_only(kind: Kind, payload: &[u8]) -> Result<u32, FrameError> {
    let bytes: [u8; PROC_ID_LEN] = payload.try_into().map_err(|_| FrameError::NoProcId(kind))?;
    Ok(u32::from_be_bytes(bytes))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::frame::{FrameReader, FrameWriter, RawFrame};
    use crate::kind::MAX_DATA_PAYLOAD;
    use crate::message::{FromGuest, FromHost, RootfsSpec};

    fn proc_spec() -> ProcSpec {
        ProcSpec {
            args: vec!["sh".into(), "-c".into(), "id".into()],
            env: vec!["A=b".into()],
            cwd: "/tmp".into(),
            user: "1:1".into(),
            container: Some(3),
            terminal: true,
            window: Some(crate::message::WindowSize { rows: 24, cols: 80 }),
        }
    }

    fn run_spec() -> RunSpec {
        RunSpec {
            args: vec!["/bin/true".into()],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
            hostname: "b".into(),
            rootfs: RootfsSpec {
                device: "/dev/vdb".into(),
                fstype: "ext4".into(),
            },
            overlay_bytes: None,
            devices: vec![],
            device_wait_ms: 0,
            gpu: None,
            pod_sandbox: false,
            etc_files: Vec::new(),
            terminal: false,
            window: None,
            volumes: Vec::new(),
        }
    }

    /// Sends `msgs` into one buffer and decodes them back with `decode`.
    fn round_trip<M>(
        msgs: &[M],
        send: fn(&M, &mut FrameWriter<&mut Vec<u8>>) -> Result<(), FrameError>,
        decode: fn(crate::frame::RawFrame) -> Result<M, FrameError>,
    ) -> Vec<M> {
        let mut buf = Vec::new();
        let mut w = FrameWriter::new(&mut buf);
        for m in msgs {
            send(m, &mut w).unwrap();
        }
        let mut r = FrameReader::new(&buf[..]);
        let mut got = Vec::new();
        loop {
            match r.read_frame() {
                Ok(f) => got.push(decode(f).unwrap()),
                Err(FrameError::Closed) => return got,
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn round_trip_host(msgs: &[FromHost]) -> Vec<FromHost> {
        round_trip(msgs, |m, w| m.send(w), FromHost::decode)
    }

    fn round_trip_guest(msgs: &[FromGuest]) -> Vec<FromGuest> {
        round_trip(msgs, |m, w| m.send(w), FromGuest::decode)
    }

    #[test]
    fn every_host_proc_kind_round_trips() {
        let msgs = vec![
            FromHost::ProcStart(Box::new(ProcStart {
                id: 7,
                spec: proc_spec(),
            })),
            FromHost::ProcStdin {
                id: 7,
                data: b"abc".to_vec(),
            },
            FromHost::ProcStdinEof { id: 7 },
            FromHost::ProcSignal { id: 7, signal: 9 },
            FromHost::ContainerAdd(Box::new(ContainerAdd {
                id: u32::MAX,
                spec: run_spec(),
            })),
        ];
        assert_eq!(round_trip_host(&msgs), msgs);
    }

    #[test]
    fn every_guest_proc_kind_round_trips() {
        let msgs = vec![
            FromGuest::ProcStarted { id: 1, pid: 42 },
            FromGuest::ProcStdout {
                id: 1,
                data: b"out".to_vec(),
            },
            FromGuest::ProcStderr {
                id: 0x0102_0304,
                data: b"err".to_vec(),
            },
            FromGuest::ProcExited {
                id: 1,
                status: ExitStatus {
                    code: Some(3),
                    signal: None,
                },
            },
            FromGuest::ProcError {
                id: 2,
                message: "no such file".into(),
            },
        ];
        assert_eq!(round_trip_guest(&msgs), msgs);
    }

    #[test]
    fn the_id_is_a_big_endian_prefix_and_large_data_is_split() {
        let mut buf = Vec::new();
        FromGuest::ProcStdout {
            id: 0x0102_0304,
            data: b"x".to_vec(),
        }
        .send(&mut FrameWriter::new(&mut buf))
        .unwrap();
        assert_eq!(buf, [0, 0, 0, 6, Kind::ProcStdout as u8, 1, 2, 3, 4, b'x']);

        let big = vec![5u8; MAX_DATA_PAYLOAD * 2 + 1];
        let got = round_trip_host(&[FromHost::ProcStdin {
            id: 9,
            data: big.clone(),
        }]);
        assert_eq!(got.len(), 3);
        let mut all = Vec::new();
        for m in got {
            match m {
                FromHost::ProcStdin { id: 9, data } => all.extend(data),
                m => panic!("unexpected {m:?}"),
            }
        }
        assert_eq!(all, big);
    }

    #[test]
    fn a_data_frame_without_an_id_is_refused() {
        for (kind, payload) in [
            (Kind::ProcStdout, vec![0u8, 0, 1]),
            (Kind::ProcStderr, vec![]),
        ] {
            let raw = RawFrame { kind, payload };
            assert!(matches!(FromGuest::decode(raw), Err(FrameError::NoProcId(k)) if k == kind));
        }
        let raw = RawFrame {
            kind: Kind::ProcStdin,
            payload: vec![1],
        };
        assert!(matches!(
            FromHost::decode(raw),
            Err(FrameError::NoProcId(Kind::ProcStdin))
        ));
        for payload in [vec![0u8, 0, 0], vec![]] {
            let raw = RawFrame {
                kind: Kind::ProcStdinEof,
                payload,
            };
            assert!(matches!(
                FromHost::decode(raw),
                Err(FrameError::NoProcId(Kind::ProcStdinEof))
            ));
        }
    }

    #[test]
    fn truncated_oversized_and_misdirected_proc_frames_are_refused() {
        // Announces 5 bytes, carries 2.
        let mut r = FrameReader::new(&[0, 0, 0, 6, Kind::ProcStdout as u8, 0, 0][..]);
        assert!(matches!(r.read_frame(), Err(FrameError::Truncated)));
        // One byte over id + the largest chunk.
        let len = (1 + PROC_ID_LEN + MAX_DATA_PAYLOAD + 1) as u32;
        let mut buf = len.to_be_bytes().to_vec();
        buf.push(Kind::ProcStderr as u8);
        let err = FrameReader::new(&buf[..]).read_frame().unwrap_err();
        assert!(matches!(
            err,
            FrameError::TooLarge {
                kind: Kind::ProcStderr,
                ..
            }
        ));
        // An id and one more byte is too much for a StdinEof.
        let mut r = FrameReader::new(&[0, 0, 0, 6, Kind::ProcStdinEof as u8, 0, 0, 0, 1, 0][..]);
        assert!(matches!(r.read_frame(), Err(FrameError::TooLarge { .. })));
        // Bad JSON, and control frames whose id is missing.
        for (kind, payload) in [
            (Kind::ProcExited, &b"{\"id\":1}"[..]),
            (Kind::ProcStarted, &b"{\"pid\":1}"[..]),
            (Kind::ProcError, &b"{"[..]),
        ] {
            let raw = RawFrame {
                kind,
                payload: payload.to_vec(),
            };
            assert!(matches!(
                FromGuest::decode(raw),
                Err(FrameError::BadPayload { .. })
            ));
        }
        for (kind, payload) in [
            (Kind::ProcStart, &b"{\"id\":1}"[..]),
            (Kind::ProcSignal, &b"{\"id\":-1,\"signal\":9}"[..]),
            (Kind::ContainerAdd, &b"[]"[..]),
        ] {
            let raw = RawFrame {
                kind,
                payload: payload.to_vec(),
            };
            assert!(matches!(
                FromHost::decode(raw),
                Err(FrameError::BadPayload { .. })
            ));
        }
        // Each side refuses the other's proc kinds.
        let raw = RawFrame {
            kind: Kind::ProcStdin,
            payload: vec![0; 5],
        };
        assert!(matches!(
            FromGuest::decode(raw),
            Err(FrameError::WrongDirection(Kind::ProcStdin))
        ));
        let raw = RawFrame {
            kind: Kind::ProcStdout,
            payload: vec![0; 5],
        };
        assert!(matches!(
            FromHost::decode(raw),
            Err(FrameError::WrongDirection(Kind::ProcStdout))
        ));
    }

    #[test]
    fn an_older_spec_without_the_container_field_parses() {
        let json = r#"{"args":["ls"],"env":[]}"#;
        let s: ProcSpec = serde_json::from_str(json).unwrap();
        assert_eq!(s.container, None);
        assert_eq!(s.cwd, "");
    }
}

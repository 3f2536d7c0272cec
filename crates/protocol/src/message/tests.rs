//! The messages' encoding: round trips, limits, and what is refused.

use super::*;
use crate::frame::FrameReader;
use crate::kind::MAX_DATA_PAYLOAD;

fn spec() -> RunSpec {
    RunSpec {
        args: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
        env: vec!["PATH=/bin".into()],
        cwd: "/".into(),
        user: "1000:1000".into(),
        hostname: "cell".into(),
        rootfs: RootfsSpec {
            device: "/dev/vda".into(),
            fstype: "erofs".into(),
        },
        overlay_bytes: Some(64 << 20),
        devices: vec![DeviceMatch {
            vendor: 0x1234,
            device: 0x11e8,
        }],
        device_wait_ms: 5000,
        gpu: None,
        pod_sandbox: false,
        etc_files: Vec::new(),
        terminal: false,
        window: None,
        volumes: Vec::new(),
    }
}

#[test]
fn host_messages_round_trip() {
    let msgs = vec![
        FromHost::Hello(HostHello {
            version: crate::PROTOCOL_VERSION,
        }),
        FromHost::Run(Box::new(spec())),
        FromHost::Stdin(b"abc".to_vec()),
        FromHost::StdinEof,
        FromHost::Signal(15),
        FromHost::Shutdown,
        FromHost::Resize {
            id: None,
            size: WindowSize { rows: 24, cols: 80 },
        },
        FromHost::Resize {
            id: Some(u32::MAX),
            size: WindowSize {
                rows: MAX_WINDOW_DIMENSION,
                cols: 1,
            },
        },
    ];
    let mut buf = Vec::new();
    let mut w = FrameWriter::new(&mut buf);
    for m in &msgs {
        m.send(&mut w).unwrap();
    }
    let mut r = FrameReader::new(&buf[..]);
    for m in &msgs {
        assert_eq!(&FromHost::decode(r.read_frame().unwrap()).unwrap(), m);
    }
    assert!(matches!(r.read_frame(), Err(FrameError::Closed)));
}

#[test]
fn guest_messages_round_trip_and_large_output_is_split() {
    let big = vec![7u8; MAX_DATA_PAYLOAD * 2 + 10];
    let mut buf = Vec::new();
    let mut w = FrameWriter::new(&mut buf);
    FromGuest::Stdout(big.clone()).send(&mut w).unwrap();
    FromGuest::Exited(ExitStatus {
        code: None,
        signal: Some(9),
    })
    .send(&mut w)
    .unwrap();
    let mut r = FrameReader::new(&buf[..]);
    let mut got = Vec::new();
    for _ in 0..3 {
        match FromGuest::decode(r.read_frame().unwrap()).unwrap() {
            FromGuest::Stdout(d) => {
                assert!(d.len() <= MAX_DATA_PAYLOAD);
                got.extend(d)
            }
            m => panic!("unexpected {m:?}"),
        }
    }
    assert_eq!(got, big);
    match FromGuest::decode(r.read_frame().unwrap()).unwrap() {
        FromGuest::Exited(s) => assert_eq!(s.shell_code(), 137),
        m => panic!("unexpected {m:?}"),
    }
}

#[test]
fn the_gpu_injection_is_optional_and_round_trips() {
    // JSON from a host without the field: no injection; and it is not sent when absent.
    let mut v = serde_json::to_value(spec()).unwrap();
    assert!(v.get("gpu").is_none());
    v.as_object_mut().unwrap().remove("gpu");
    let old: RunSpec = serde_json::from_value(v).unwrap();
    assert_eq!(old.gpu, None);
    let mut s = spec();
    s.gpu = Some(GpuInjection {
        visible_devices: Some("none".into()),
        cuda_version: Some("13.0".into()),
        gpus: vec![GpuFacts {
            arch: "9.0".into(),
            brand: "NVIDIA".into(),
        }],
        ..Default::default()
    });
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<RunSpec>(&json).unwrap(), s);
    // Every field of the request may be left out.
    let bare: GpuInjection = serde_json::from_str("{}").unwrap();
    assert_eq!(bare, GpuInjection::default());
}

#[test]
fn driver_report_round_trips() {
    let d = DriverReport {
        flavour: "nvidia-550".into(),
        driver_version: "550.163.01".into(),
        cuda_version: "12.4".into(),
        gpus: vec![GpuReport {
            bdf: "0000:01:00.0".into(),
            name: "NVIDIA H200".into(),
            uuid: "GPU-0".into(),
            memory_mib: 143771,
            driver_version: "550.163.01".into(),
            cuda_version: "12.4".into(),
        }],
        driver_ready_ms: 4200,
        message: String::new(),
    };
    let mut buf = Vec::new();
    FromGuest::Driver(d.clone())
        .send(&mut FrameWriter::new(&mut buf))
        .unwrap();
    assert!(buf.contains(&0x49), "the Driver kind byte");
    let mut r = FrameReader::new(&buf[..]);
    match FromGuest::decode(r.read_frame().unwrap()).unwrap() {
        FromGuest::Driver(got) => assert_eq!(got, d),
        m => panic!("unexpected {m:?}"),
    }
}

fn decode_resize(payload: &[u8]) -> Result<FromHost, FrameError> {
    let mut buf = u32::try_from(payload.len() + 1)
        .unwrap()
        .to_be_bytes()
        .to_vec();
    buf.push(Kind::Resize as u8);
    buf.extend_from_slice(payload);
    FromHost::decode(FrameReader::new(&buf[..]).read_frame()?)
}

#[test]
fn a_resize_out_of_bounds_truncated_or_oversized_is_refused() {
    for bad in [
        &br#"{"rows":0,"cols":80}"#[..],
        br#"{"rows":24,"cols":0}"#,
        br#"{"id":1,"rows":10001,"cols":80}"#,
        br#"{"rows":24,"cols":65535}"#,
    ] {
        let err = decode_resize(bad).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::Invalid {
                    kind: Kind::Resize,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("1 to 10000"), "{err}");
    }
    for bad in [&br#"{"rows":24,"co"#[..], br#"{"rows":-1,"cols":80}"#, b""] {
        let err = decode_resize(bad).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::BadPayload {
                    kind: Kind::Resize,
                    ..
                }
            ),
            "{err}"
        );
    }
    let big = format!(r#"{{"rows":24,"cols":80,"pad":"{}"}}"#, "x".repeat(100));
    let err = decode_resize(big.as_bytes()).unwrap_err();
    assert!(
        matches!(
            err,
            FrameError::TooLarge {
                kind: Kind::Resize,
                ..
            }
        ),
        "{err}"
    );
    // A header cut short of its payload.
    let mut r = FrameReader::new(&[0, 0, 0, 20, Kind::Resize as u8, b'{'][..]);
    assert!(matches!(r.read_frame(), Err(FrameError::Truncated)));
    assert_eq!(
        decode_resize(br#"{"rows":1,"cols":10000}"#).unwrap(),
        FromHost::Resize {
            id: None,
            size: WindowSize {
                rows: 1,
                cols: 10000
            }
        }
    );
}

#[test]
fn a_spec_without_terminal_fields_has_no_terminal() {
    let v = serde_json::to_value(spec()).unwrap();
    assert!(v.get("terminal").is_none() && v.get("window").is_none());
    let old: RunSpec = serde_json::from_value(v).unwrap();
    assert!(!old.terminal && old.window.is_none());
    let mut s = spec();
    s.terminal = true;
    s.window = Some(WindowSize {
        rows: 50,
        cols: 132,
    });
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<RunSpec>(&json).unwrap(), s);
}

#[test]
fn garbage_is_refused() {
    let mut r = FrameReader::new(&[0, 0, 0, 2, 0xee, 0][..]);
    assert!(matches!(r.read_frame(), Err(FrameError::UnknownKind(0xee))));
    let mut r = FrameReader::new(&[0, 0, 0, 0, 1][..]);
    assert!(matches!(r.read_frame(), Err(FrameError::Empty)));
    let mut r = FrameReader::new(&[0, 0, 0, 9, Kind::Stdout as u8, 1, 2][..]);
    assert!(matches!(r.read_frame(), Err(FrameError::Truncated)));
    let mut r = FrameReader::new(&[0, 0][..]);
    assert!(matches!(r.read_frame(), Err(FrameError::Truncated)));
    // Valid frame, invalid JSON.
    let mut r = FrameReader::new(&[0, 0, 0, 3, Kind::Exited as u8, b'{', b'x'][..]);
    let err = FromGuest::decode(r.read_frame().unwrap()).unwrap_err();
    assert!(matches!(
        err,
        FrameError::BadPayload {
            kind: Kind::Exited,
            ..
        }
    ));
    // A guest may not send host kinds.
    let raw = RawFrame {
        kind: Kind::Run,
        payload: b"{}".to_vec(),
    };
    assert!(matches!(
        FromGuest::decode(raw),
        Err(FrameError::WrongDirection(Kind::Run))
    ));
    // Zero-payload kinds refuse a payload.
    let mut r = FrameReader::new(&[0, 0, 0, 2, Kind::Shutdown as u8, 1][..]);
    assert!(matches!(r.read_frame(), Err(FrameError::TooLarge { .. })));
}

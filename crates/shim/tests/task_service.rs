//! The task service without containerd or a VM: a fake launcher stands in for the run
//! core (it prints, then exits or waits for a signal), and the events are read from the
//! service's channel instead of containerd's socket.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::{api, TtrpcContext};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::{self, Code};
use containerd_shim_protos::types::task::Status;
use gpucell_host::HostRoot;
use gpucell_runtime::{AccelRequest, Observer, RunReport};
use gpucell_sandbox::{event_channel, SessionIo};
use gpucell_shim::events::{self, EventRx};
use gpucell_shim::launcher::{Launch, Launcher};
use gpucell_shim::task::{Settings, REPORT_FILE};
use gpucell_shim::TaskService;

/// `exit N`: prints and exits N. `wait`: exits 128+N on signal N (or 99 after 10 s).
struct Fake;

impl Launcher for Fake {
    fn run(&self, launch: Launch, mut io: SessionIo, obs: &mut dyn Observer) -> RunReport {
        let mut report = RunReport::default();
        let entry = launch.request.entrypoint.clone().unwrap_or_default();
        // The sandbox first, then the line: a test that has read the line knows the
        // task's sandbox is attached.
        let (tx, rx) = event_channel();
        obs.sandbox_starting(tx);
        let _ = writeln!(
            io.stdout,
            "ran {entry} {}",
            launch.request.command.join(" ")
        );
        let _ = io.stdout.flush();
        report.exit_code = match entry.as_str() {
            "exit" => launch.request.command[0].parse().unwrap(),
            _ => rx
                .next_signal(Duration::from_secs(10))
                .map(|s| 128 + s)
                .unwrap_or(99),
        };
        report
    }
}

fn ctx() -> TtrpcContext {
    TtrpcContext {
        mh: Default::default(),
        metadata: Default::default(),
        timeout_nano: 0,
    }
}

struct Harness {
    dir: tempfile::TempDir,
    service: TaskService,
    events: EventRx,
    exit: Arc<ExitSignal>,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let (tx, events) = events::channel();
    let exit = Arc::new(ExitSignal::default());
    let settings = Settings {
        launcher: Arc::new(Fake),
        host_root: HostRoot::new(dir.path()),
        accel: AccelRequest::Tcg,
        pod_resources: None,
        error: None,
    };
    Harness {
        service: TaskService::new(settings, tx, Arc::clone(&exit)),
        dir,
        events,
        exit,
    }
}

impl Harness {
    /// A bundle whose process is `args`, with a stdout file.
    fn bundle(&self, id: &str, args: &[&str]) -> api::CreateTaskRequest {
        self.bundle_with(id, args, serde_json::json!({}))
    }

    fn bundle_with(
        &self,
        id: &str,
        args: &[&str],
        annotations: serde_json::Value,
    ) -> api::CreateTaskRequest {
        let b = self.dir.path().join(id);
        std::fs::create_dir_all(b.join("rootfs")).unwrap();
        let spec = serde_json::json!({
            "ociVersion": "1.1.0",
            "process": {"args": args, "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "annotations": annotations
        });
        std::fs::write(b.join("config.json"), spec.to_string()).unwrap();
        api::CreateTaskRequest {
            id: id.into(),
            bundle: b.display().to_string(),
            stdout: b.join("stdout").display().to_string(),
            ..Default::default()
        }
    }

    async fn topics(&mut self, n: usize) -> Vec<&'static str> {
        let mut out = Vec::new();
        for _ in 0..n {
            let e = tokio::time::timeout(Duration::from_secs(10), self.events.recv())
                .await
                .unwrap()
                .unwrap();
            self.events.done();
            out.push(e.topic);
        }
        out
    }

    async fn wait(&self, id: &str) -> u32 {
        let req = api::WaitRequest {
            id: id.into(),
            ..Default::default()
        };
        self.service.wait(&ctx(), req).await.unwrap().exit_status
    }

    async fn state(&self, id: &str) -> api::StateResponse {
        let req = api::StateRequest {
            id: id.into(),
            ..Default::default()
        };
        self.service.state(&ctx(), req).await.unwrap()
    }
}

fn code(e: ttrpc::Error) -> Code {
    match e {
        ttrpc::Error::RpcStatus(s) => s.code(),
        other => panic!("not a status: {other:?}"),
    }
}

fn start(id: &str) -> api::StartRequest {
    api::StartRequest {
        id: id.into(),
        ..Default::default()
    }
}

fn kill(id: &str, signal: u32) -> api::KillRequest {
    api::KillRequest {
        id: id.into(),
        signal,
        ..Default::default()
    }
}

fn delete(id: &str) -> api::DeleteRequest {
    api::DeleteRequest {
        id: id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_task_runs_exits_and_is_deleted_with_its_events() {
    let mut h = harness();
    let req = h.bundle("t1", &["exit", "3"]);
    let bundle = req.bundle.clone();
    h.service.create(&ctx(), req).await.unwrap();
    assert_eq!(h.state("t1").await.status.enum_value(), Ok(Status::CREATED));
    h.service.start(&ctx(), start("t1")).await.unwrap();
    assert_eq!(h.wait("t1").await, 3);
    let s = h.state("t1").await;
    assert_eq!(s.status.enum_value(), Ok(Status::STOPPED));
    assert_eq!(s.exit_status, 3);
    let out = std::fs::read_to_string(Path::new(&bundle).join("stdout")).unwrap();
    assert_eq!(out, "ran exit 3\n");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(&bundle).join(REPORT_FILE)).unwrap())
            .unwrap();
    assert_eq!(report["exit_code"], 3);
    let d = h.service.delete(&ctx(), delete("t1")).await.unwrap();
    assert_eq!(d.exit_status, 3);
    assert_eq!(
        h.topics(4).await,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    let req = api::StateRequest {
        id: "t1".into(),
        ..Default::default()
    };
    let err = h.service.state(&ctx(), req).await.unwrap_err();
    assert_eq!(code(err), Code::NOT_FOUND);
}

#[tokio::test]
async fn kill_reaches_the_workload_and_a_running_task_is_not_deleted() {
    let mut h = harness();
    h.service
        .create(&ctx(), h.bundle("t2", &["wait"]))
        .await
        .unwrap();
    h.service.start(&ctx(), start("t2")).await.unwrap();
    let err = h.service.delete(&ctx(), delete("t2")).await.unwrap_err();
    assert_eq!(code(err), Code::FAILED_PRECONDITION);
    let req = api::PidsRequest {
        id: "t2".into(),
        ..Default::default()
    };
    let pids = h.service.pids(&ctx(), req).await.unwrap();
    assert_eq!(pids.processes.len(), 1);
    h.service.kill(&ctx(), kill("t2", 15)).await.unwrap();
    assert_eq!(h.wait("t2").await, 143);
    let err = h.service.kill(&ctx(), kill("t2", 9)).await.unwrap_err();
    assert_eq!(code(err), Code::NOT_FOUND);
    assert_eq!(
        h.topics(3).await,
        ["/tasks/create", "/tasks/start", "/tasks/exit"]
    );
}

#[tokio::test]
async fn a_task_killed_before_start_exits_and_cannot_start() {
    let mut h = harness();
    h.service
        .create(&ctx(), h.bundle("t3", &["wait"]))
        .await
        .unwrap();
    h.service.kill(&ctx(), kill("t3", 9)).await.unwrap();
    assert_eq!(h.wait("t3").await, 137);
    let err = h.service.start(&ctx(), start("t3")).await.unwrap_err();
    assert_eq!(code(err), Code::FAILED_PRECONDITION);
    assert_eq!(h.topics(2).await, ["/tasks/create", "/tasks/exit"]);
    let err = h.service.kill(&ctx(), kill("t3", 0)).await.unwrap_err();
    assert_eq!(code(err), Code::INVALID_ARGUMENT);
}

#[tokio::test]
async fn refusals_name_what_is_wrong() {
    let h = harness();
    h.service
        .create(&ctx(), h.bundle("t4", &["exit", "0"]))
        .await
        .unwrap();
    let err = h
        .service
        .create(&ctx(), h.bundle("t4", &["exit", "0"]))
        .await
        .unwrap_err();
    assert_eq!(code(err), Code::ALREADY_EXISTS);
    // An exec needs a running task.
    let exec = api::ExecProcessRequest {
        id: "t4".into(),
        exec_id: "e1".into(),
        ..Default::default()
    };
    let err = h.service.exec(&ctx(), exec).await.unwrap_err();
    let msg = format!("{err:?}");
    assert_eq!(code(err), Code::FAILED_PRECONDITION);
    assert!(msg.contains("the task is not running"), "{msg}");
    let mut bad = h.bundle("t5", &["exit", "0"]);
    std::fs::write(Path::new(&bad.bundle).join("config.json"), "{").unwrap();
    bad.id = "t5".into();
    let err = h.service.create(&ctx(), bad).await.unwrap_err();
    let msg = format!("{err:?}");
    assert_eq!(code(err), Code::INVALID_ARGUMENT);
    assert!(msg.contains("config.json"), "{msg}");
    let mut stdio = h.bundle("t6", &["exit", "0"]);
    stdio.stdout = "binary:///usr/bin/logger".into();
    h.service.create(&ctx(), stdio).await.unwrap();
    h.service.start(&ctx(), start("t6")).await.unwrap();
    assert_eq!(h.wait("t6").await, gpucell_runtime::EXIT_RUN_FAILED as u32);
}

#[tokio::test]
async fn shutdown_waits_for_the_last_task() {
    let h = harness();
    h.service
        .create(&ctx(), h.bundle("t7", &["exit", "0"]))
        .await
        .unwrap();
    let c = ctx();
    let shutdown = || h.service.shutdown(&c, api::ShutdownRequest::default());
    shutdown().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), h.exit.wait())
            .await
            .is_err(),
        "the shim must not exit while it has a task"
    );
    h.service.delete(&ctx(), delete("t7")).await.unwrap();
    shutdown().await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), h.exit.wait())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_pod_sandbox_container_runs_no_vm_and_ends_on_sigterm() {
    let h = harness();
    let annotations = serde_json::json!({
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-id": "pod1"
    });
    let req = h.bundle_with("pod1", &["/pause"], annotations);
    let bundle = req.bundle.clone();
    h.service.create(&ctx(), req).await.unwrap();
    h.service.start(&ctx(), start("pod1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        h.state("pod1").await.status.enum_value(),
        Ok(Status::RUNNING)
    );
    h.service.kill(&ctx(), kill("pod1", 15)).await.unwrap();
    assert_eq!(h.wait("pod1").await, 0);
    // The fake launcher never ran: nothing was printed.
    let out = std::fs::read_to_string(Path::new(&bundle).join("stdout")).unwrap_or_default();
    assert_eq!(out, "");
}

/// Keeps what it was asked to run, and exits 0.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<Launch>>);

impl Launcher for Recorder {
    fn run(&self, launch: Launch, _io: SessionIo, _obs: &mut dyn Observer) -> RunReport {
        self.0.lock().unwrap().push(launch);
        RunReport::default()
    }
}

#[tokio::test]
async fn vfio_devices_of_the_spec_reach_the_run_request_as_pci_functions() {
    use gpucell_host::testing::{FakeFunction, FakeHost};
    let host = FakeHost::new().unwrap();
    host.add(
        &FakeFunction::h100("0000:41:00.0")
            .driver("vfio-pci")
            .iommu_group(12),
    )
    .unwrap();
    host.add(
        &FakeFunction::new("0000:00:05.0", 0x1234, 0x11e8, 0x00ff00)
            .driver("vfio-pci")
            .iommu_group(7),
    )
    .unwrap();
    let recorder = Arc::new(Recorder::default());
    let (tx, _rx) = events::channel();
    let settings = Settings {
        launcher: Arc::clone(&recorder) as Arc<dyn Launcher>,
        host_root: host.root(),
        accel: AccelRequest::Tcg,
        pod_resources: None,
        error: None,
    };
    let service = TaskService::new(settings, tx, Arc::new(ExitSignal::default()));
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("g1");
    std::fs::create_dir_all(b.join("rootfs")).unwrap();
    let spec = serde_json::json!({
        "ociVersion": "1.1.0",
        "process": {"args": ["nvidia-smi"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                    "env": ["NVIDIA_VISIBLE_DEVICES=all"]},
        "root": {"path": "rootfs"},
        "linux": {"devices": [
            {"path": "/dev/vfio/vfio", "type": "c", "major": 10, "minor": 196},
            {"path": "/dev/vfio/12", "type": "c", "major": 243, "minor": 0},
            {"path": "/dev/vfio/7", "type": "c", "major": 243, "minor": 1}
        ]}
    });
    std::fs::write(b.join("config.json"), spec.to_string()).unwrap();
    let req = api::CreateTaskRequest {
        id: "g1".into(),
        bundle: b.display().to_string(),
        ..Default::default()
    };
    service.create(&ctx(), req).await.unwrap();
    service.start(&ctx(), start("g1")).await.unwrap();
    let wait = api::WaitRequest {
        id: "g1".into(),
        ..Default::default()
    };
    service.wait(&ctx(), wait).await.unwrap();
    let launch = recorder.0.lock().unwrap()[0].clone();
    let r = &launch.request;
    assert_eq!(r.devices.gpus.as_deref(), Some("0000:41:00.0"));
    assert_eq!(r.devices.functions, ["0000:00:05.0"]);
    assert_eq!(r.entrypoint.as_deref(), Some("nvidia-smi"));
    assert_eq!(launch.rootfs, b.join("rootfs"));
    // A group this host does not have fails the create, naming the entry.
    let bad = serde_json::json!({
        "ociVersion": "1.1.0",
        "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "linux": {"devices": [{"path": "/dev/vfio/99", "type": "c", "major": 243, "minor": 9}]}
    });
    std::fs::write(b.join("config.json"), bad.to_string()).unwrap();
    let req = api::CreateTaskRequest {
        id: "g2".into(),
        bundle: b.display().to_string(),
        ..Default::default()
    };
    let err = service.create(&ctx(), req).await.unwrap_err();
    assert!(format!("{err:?}").contains("/dev/vfio/99"), "{err:?}");
}

fn exec_req(id: &str, exec_id: &str, process: &str) -> api::ExecProcessRequest {
    let mut any = containerd_shim_protos::protobuf::well_known_types::any::Any::new();
    any.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process".into();
    any.value = process.as_bytes().to_vec();
    api::ExecProcessRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        spec: Some(any).into(),
        ..Default::default()
    }
}

/// Creates and starts task `id` running `wait` (until signalled), and waits until the
/// launcher's thread has attached its sandbox.
async fn running_task(h: &Harness, id: &str) {
    h.service
        .create(&ctx(), h.bundle(id, &["wait"]))
        .await
        .unwrap();
    h.service.start(&ctx(), start(id)).await.unwrap();
    // The start returns before the launcher's thread attaches the sandbox; its line
    // says it has.
    let out = h.dir.path().join(id).join("stdout");
    let t = std::time::Instant::now();
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("ran wait")
    {
        assert!(t.elapsed() < Duration::from_secs(10), "{id} never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const EXEC_PROCESS: &str =
    r#"{"args":["ls","/"],"cwd":"/","user":{"uid":0,"gid":0},"env":["A=b"]}"#;

#[tokio::test]
async fn terminals_are_taken_and_resize_pty_is_checked() {
    let mut h = harness();
    running_task(&h, "t10").await;
    // A terminal is taken (the agent gives the process a pty).
    let mut tty = exec_req("t10", "e-tty", EXEC_PROCESS);
    tty.terminal = true;
    h.service.exec(&ctx(), tty).await.unwrap();
    // ResizePty: the task's and an exec's (not started: nothing to size) are taken; a
    // size out of bounds and an unknown exec are refused.
    let resize = |exec_id: &str, height: u32, width: u32| api::ResizePtyRequest {
        id: "t10".into(),
        exec_id: exec_id.into(),
        height,
        width,
        ..Default::default()
    };
    h.service
        .resize_pty(&ctx(), resize("", 24, 80))
        .await
        .unwrap();
    h.service
        .resize_pty(&ctx(), resize("e-tty", 50, 132))
        .await
        .unwrap();
    for (req, want) in [
        (resize("", 0, 80), Code::INVALID_ARGUMENT),
        (resize("", 24, 70_000), Code::INVALID_ARGUMENT),
        (resize("nope", 24, 80), Code::NOT_FOUND),
    ] {
        let err = h.service.resize_pty(&ctx(), req).await.unwrap_err();
        let msg = format!("{err:?}");
        assert_eq!(code(err), want, "{msg}");
    }
    assert_eq!(
        h.topics(3).await,
        ["/tasks/create", "/tasks/start", "/tasks/exec-added"]
    );
    h.service.kill(&ctx(), kill("t10", 9)).await.unwrap();
    assert_eq!(h.wait("t10").await, 137);
}

#[tokio::test]
async fn execs_are_checked_recorded_and_started_in_the_task_sandbox() {
    let mut h = harness();
    running_task(&h, "t9").await;
    let process = EXEC_PROCESS;
    // A missing spec, a spec that is not a process, empty args: refused.
    let mut no_spec = exec_req("t9", "e0", process);
    no_spec.spec = None.into();
    for (req, says) in [
        (no_spec, "no process spec"),
        (exec_req("t9", "e0", "{"), "not an OCI process"),
        (
            exec_req(
                "t9",
                "e0",
                r#"{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}"#,
            ),
            "empty args",
        ),
    ] {
        let err = h.service.exec(&ctx(), req).await.unwrap_err();
        let msg = format!("{err:?}");
        assert_eq!(code(err), Code::INVALID_ARGUMENT, "{msg}");
        assert!(msg.contains(says), "{msg}");
    }
    h.service
        .exec(&ctx(), exec_req("t9", "e1", process))
        .await
        .unwrap();
    let err = h
        .service
        .exec(&ctx(), exec_req("t9", "e1", process))
        .await
        .unwrap_err();
    assert_eq!(code(err), Code::ALREADY_EXISTS);
    let state = h
        .service
        .state(
            &ctx(),
            api::StateRequest {
                id: "t9".into(),
                exec_id: "e1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(state.status, Status::CREATED.into());
    // The fake launcher runs no agent: the start reaches the sandbox and is refused
    // there, and the exec ends as failed.
    let mut req = start("t9");
    req.exec_id = "e1".into();
    let err = h.service.start(&ctx(), req).await.unwrap_err();
    let msg = format!("{err:?}");
    assert_eq!(code(err), Code::FAILED_PRECONDITION);
    assert!(msg.contains("workload is not running"), "{msg}");
    let wait = api::WaitRequest {
        id: "t9".into(),
        exec_id: "e1".into(),
        ..Default::default()
    };
    let exit = h.service.wait(&ctx(), wait).await.unwrap().exit_status;
    assert_eq!(exit, gpucell_runtime::EXIT_RUN_FAILED as u32);
    let unknown = api::KillRequest {
        id: "t9".into(),
        exec_id: "nope".into(),
        signal: 9,
        ..Default::default()
    };
    let err = h.service.kill(&ctx(), unknown).await.unwrap_err();
    assert_eq!(code(err), Code::NOT_FOUND);
    let del = api::DeleteRequest {
        id: "t9".into(),
        exec_id: "e1".into(),
        ..Default::default()
    };
    h.service.delete(&ctx(), del).await.unwrap();
    assert_eq!(
        h.topics(4).await,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exit"
        ]
    );
    h.service.kill(&ctx(), kill("t9", 9)).await.unwrap();
    assert_eq!(h.wait("t9").await, 137);
}

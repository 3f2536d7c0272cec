//! A pod's devices from the kubelet's PodResources API: a fake kubelet built from the same
//! vendored proto serves `List` on a Unix socket (real gRPC), the shim's client asks it,
//! and a pod's VM boots with every container's devices.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::{api, TtrpcContext};
use containerd_shim_protos::shim_async::Task;
use gpucell_host::testing::{FakeFunction, FakeHost};
use gpucell_runtime::{AccelRequest, Observer, ProcIo, RunReport};
use gpucell_sandbox::{EventSender, SessionIo};
use gpucell_shim::events;
use gpucell_shim::launcher::{Launch, Launcher, Member};
use gpucell_shim::pod_resources::api::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use gpucell_shim::pod_resources::api::{
    AllocatableResourcesRequest, AllocatableResourcesResponse, ContainerDevices,
    ContainerResources, GetPodResourcesRequest, GetPodResourcesResponse, ListPodResourcesRequest,
    ListPodResourcesResponse, PodResources as PodEntry,
};
use gpucell_shim::pod_resources::{Kubelet, PodName, PodResources, DEFAULT_PREFIX};
use gpucell_shim::task::Settings;
use gpucell_shim::TaskService;
use tonic::{Request, Response, Status};

/// Answers `List` with its pods, or with `fail`'s status.
struct FakeKubelet {
    pods: Vec<PodEntry>,
    fail: Option<String>,
    calls: Arc<Mutex<u32>>,
}

#[tonic::async_trait]
impl PodResourcesLister for FakeKubelet {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        *self.calls.lock().unwrap() += 1;
        if let Some(why) = &self.fail {
            return Err(Status::unavailable(why.clone()));
        }
        Ok(Response::new(ListPodResourcesResponse {
            pod_resources: self.pods.clone(),
        }))
    }
    async fn get_allocatable_resources(
        &self,
        _: Request<AllocatableResourcesRequest>,
    ) -> Result<Response<AllocatableResourcesResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
    async fn get(
        &self,
        _: Request<GetPodResourcesRequest>,
    ) -> Result<Response<GetPodResourcesResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
}

fn entry(ns: &str, name: &str, containers: &[(&str, &[&str])]) -> PodEntry {
    PodEntry {
        name: name.into(),
        namespace: ns.into(),
        containers: containers
            .iter()
            .map(|(c, ids)| ContainerResources {
                name: (*c).into(),
                devices: if ids.is_empty() {
                    Vec::new()
                } else {
                    vec![ContainerDevices {
                        resource_name: "gpucell.io/H100".into(),
                        device_ids: ids.iter().map(|s| (*s).into()).collect(),
                        topology: None,
                    }]
                },
                ..Default::default()
            })
            .collect(),
    }
}

/// Serves `kubelet` on `socket` until the runtime ends; returns its call count.
fn serve(socket: &Path, pods: Vec<PodEntry>, fail: Option<&str>) -> Arc<Mutex<u32>> {
    let calls = Arc::new(Mutex::new(0));
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    let kubelet = FakeKubelet {
        pods,
        fail: fail.map(str::to_string),
        calls: Arc::clone(&calls),
    };
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(PodResourcesListerServer::new(kubelet))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
    calls
}

fn name(ns: &str, n: &str) -> PodName {
    PodName {
        namespace: ns.into(),
        name: n.into(),
    }
}

fn kubelet(socket: &Path) -> Kubelet {
    Kubelet {
        socket: socket.to_owned(),
        prefixes: vec![DEFAULT_PREFIX.into()],
    }
}

/// The client runs on a thread of its own, as the shim's pod does.
async fn ask(k: Kubelet, pod: PodName) -> Result<Vec<String>, String> {
    tokio::task::spawn_blocking(move || {
        k.functions(&pod)
            .map(|v| v.iter().map(ToString::to_string).collect())
            .map_err(|e| gpucell_runtime::error_chain(&e))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_lists_a_pods_devices_over_the_kubelets_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kubelet.sock");
    let calls = serve(
        &socket,
        vec![
            entry("ml", "train", &[("init", &[]), ("main", &["0000-41-00.0"])]),
            entry("ml", "other", &[("main", &["0000-42-00.0"])]),
        ],
        None,
    );
    let got = ask(kubelet(&socket), name("ml", "train")).await.unwrap();
    assert_eq!(got, ["0000:41:00.0"]);
    let none = ask(kubelet(&socket), name("ml", "absent")).await.unwrap();
    assert!(none.is_empty(), "{none:?}");
    assert_eq!(*calls.lock().unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_dead_kubelet_is_an_error_naming_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kubelet.sock");
    serve(&socket, Vec::new(), Some("kubelet is restarting"));
    let err = ask(kubelet(&socket), name("a", "b")).await.unwrap_err();
    assert!(
        err.contains("kubelet is restarting") && err.contains("kubelet.sock"),
        "{err}"
    );
    // A socket file nobody listens on (a kubelet that died).
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let err = ask(kubelet(&stale), name("a", "b")).await.unwrap_err();
    assert!(err.contains("stale.sock"), "{err}");
}

/// Keeps what it was asked to run, and ends at once (the pod's VM "stops").
#[derive(Default)]
struct Recorder(Mutex<Vec<Launch>>);

impl Launcher for Recorder {
    fn run(&self, launch: Launch, _io: SessionIo, _obs: &mut dyn Observer) -> RunReport {
        self.0.lock().unwrap().push(launch);
        RunReport::default()
    }
}

fn ctx() -> TtrpcContext {
    TtrpcContext {
        mh: Default::default(),
        metadata: Default::default(),
        timeout_nano: 0,
    }
}

fn bundle(dir: &Path, id: &str, annotations: serde_json::Value) -> api::CreateTaskRequest {
    let b = dir.join(id);
    std::fs::create_dir_all(b.join("rootfs")).unwrap();
    let spec = serde_json::json!({
        "ociVersion": "1.1.0",
        "process": {"args": ["/app"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "annotations": annotations
    });
    std::fs::write(b.join("config.json"), spec.to_string()).unwrap();
    api::CreateTaskRequest {
        id: id.into(),
        bundle: b.display().to_string(),
        ..Default::default()
    }
}

fn start(id: &str) -> api::StartRequest {
    api::StartRequest {
        id: id.into(),
        ..Default::default()
    }
}

fn h100(bdf: &str, group: u32) -> FakeFunction {
    FakeFunction::h100(bdf)
        .driver("vfio-pci")
        .iommu_group(group)
}

/// A task service whose pods ask the kubelet at `socket` (pod `ml/train` is `sb1`),
/// with `sb1`'s sandbox container started.
async fn pod_service(
    host: &FakeHost,
    socket: &Path,
    launcher: Arc<dyn Launcher>,
    dir: &Path,
) -> TaskService {
    let (tx, _rx) = events::channel();
    let settings = Settings {
        launcher,
        host_root: host.root(),
        accel: AccelRequest::Tcg,
        pod_resources: Some(Arc::new(kubelet(socket)) as Arc<dyn PodResources>),
        error: None,
    };
    let service = TaskService::new(settings, tx, Arc::new(ExitSignal::default()));
    let sandbox = serde_json::json!({
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-id": "sb1",
        "io.kubernetes.cri.sandbox-name": "train",
        "io.kubernetes.cri.sandbox-namespace": "ml"
    });
    service
        .create(&ctx(), bundle(dir, "sb1", sandbox))
        .await
        .unwrap();
    service.start(&ctx(), start("sb1")).await.unwrap();
    service
}

/// The annotations of an application container of `sb1`.
fn member() -> serde_json::Value {
    serde_json::json!({
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": "sb1"
    })
}

/// Creates and starts `req`, and waits for its end: its exit status.
async fn run(service: &TaskService, req: api::CreateTaskRequest) -> u32 {
    let id = req.id.clone();
    service.create(&ctx(), req).await.unwrap();
    service.start(&ctx(), start(&id)).await.unwrap();
    let wait = api::WaitRequest {
        id,
        ..Default::default()
    };
    tokio::time::timeout(Duration::from_secs(30), service.wait(&ctx(), wait))
        .await
        .unwrap()
        .unwrap()
        .exit_status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_vm_boots_with_the_devices_of_all_its_containers() {
    let host = FakeHost::new().unwrap();
    host.add(&h100("0000:41:00.0", 12)).unwrap();
    host.add(&h100("0000:42:00.0", 13)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kubelet.sock");
    // The pod's init container has no GPU; its two GPU containers come later.
    serve(
        &socket,
        vec![entry(
            "ml",
            "train",
            &[
                ("init", &[]),
                ("a", &["0000-41-00.0"]),
                ("b", &["0000-42-00.0"]),
            ],
        )],
        None,
    );
    let recorder = Arc::new(Recorder::default());
    let service = pod_service(&host, &socket, Arc::clone(&recorder) as _, dir.path()).await;
    // The recorder's VM ends at once: the init container fails to join it.
    run(&service, bundle(dir.path(), "init", member())).await;
    let launches = recorder.0.lock().unwrap().clone();
    assert_eq!(launches.len(), 1, "one VM for the pod");
    let vm = &launches[0].request;
    assert_eq!(
        vm.devices.gpus.as_deref(),
        Some("0000:41:00.0,0000:42:00.0")
    );
    assert!(vm.devices.functions.is_empty());
    assert_eq!(launches[0].rootfs, dir.path().join("sb1/rootfs"));
}

/// A pod VM that "runs" until signalled, and containers that end at once with 0; it
/// keeps what it was asked to boot and to add.
#[derive(Default)]
struct PodVm {
    booted: Mutex<Vec<Launch>>,
    added: Mutex<Vec<Launch>>,
}

struct Ended;

impl Member for Ended {
    fn pid(&self) -> i32 {
        7
    }
    fn container(&self) -> u32 {
        1
    }
    fn signal(&self, _: i32) -> Result<(), String> {
        Ok(())
    }
    fn wait(&self) -> Result<i32, String> {
        Ok(0)
    }
}

impl Launcher for PodVm {
    fn run(&self, launch: Launch, _io: SessionIo, obs: &mut dyn Observer) -> RunReport {
        self.booted.lock().unwrap().push(launch);
        let (tx, rx) = gpucell_sandbox::channel::running_event_channel();
        obs.sandbox_starting(tx);
        let _ = rx.next_signal(Duration::from_secs(30));
        RunReport::default()
    }
    fn add_container(
        &self,
        _vm: &EventSender,
        launch: Launch,
        _io: ProcIo,
    ) -> Result<Arc<dyn Member>, String> {
        self.added.lock().unwrap().push(launch);
        Ok(Arc::new(Ended))
    }
}

fn with_devices(mut req: api::CreateTaskRequest, groups: &[u32]) -> api::CreateTaskRequest {
    let config = Path::new(&req.bundle).join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let devices: Vec<serde_json::Value> = groups
        .iter()
        .map(|g| serde_json::json!({"path": format!("/dev/vfio/{g}"), "type": "c", "major": 243, "minor": g}))
        .collect();
    spec["linux"] = serde_json::json!({ "devices": devices });
    std::fs::write(&config, spec.to_string()).unwrap();
    req.stderr = Path::new(&req.bundle).join("stderr").display().to_string();
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_containers_join_with_the_pods_devices_and_others_are_refused() {
    let host = FakeHost::new().unwrap();
    host.add(&h100("0000:41:00.0", 12)).unwrap();
    host.add(&h100("0000:42:00.0", 13)).unwrap();
    host.add(&h100("0000:43:00.0", 14)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kubelet.sock");
    serve(
        &socket,
        vec![entry(
            "ml",
            "train",
            &[("init", &[]), ("a", &["0000-41-00.0"])],
        )],
        None,
    );
    let vm = Arc::new(PodVm::default());
    let service = pod_service(&host, &socket, Arc::clone(&vm) as _, dir.path()).await;
    // The init container (no device) boots the VM with the kubelet's GPU for "a".
    assert_eq!(run(&service, bundle(dir.path(), "init", member())).await, 0);
    // "a" names that GPU's group: it joins without plugging anything.
    let a = with_devices(bundle(dir.path(), "a", member()), &[12]);
    assert_eq!(run(&service, a).await, 0);
    // "x" names a GPU the pod was not given: refused, naming it.
    let x = with_devices(bundle(dir.path(), "x", member()), &[14]);
    let stderr = dir.path().join("x/stderr");
    std::fs::File::create(&stderr).unwrap();
    assert_ne!(run(&service, x).await, 0);
    let said = std::fs::read_to_string(&stderr).unwrap();
    assert!(
        said.contains("0000:43:00.0") && said.contains("PodResources"),
        "{said}"
    );
    let booted = vm.booted.lock().unwrap().clone();
    assert_eq!(booted.len(), 1, "one VM for the pod");
    assert_eq!(
        booted[0].request.devices.gpus.as_deref(),
        Some("0000:41:00.0")
    );
    let added = vm.added.lock().unwrap().clone();
    assert_eq!(added.len(), 2, "init and a joined; x did not");
    for l in &added {
        assert_eq!(
            l.request.devices.gpus, None,
            "devices are the VM's, not plugged again"
        );
    }
    service
        .kill(
            &ctx(),
            api::KillRequest {
                id: "sb1".into(),
                signal: 15,
                ..Default::default()
            },
        )
        .await
        .unwrap();
}

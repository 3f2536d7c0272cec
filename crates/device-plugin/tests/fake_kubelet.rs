//! The device plugin against a fake kubelet built from the same proto, over unix sockets
//! in a temp dir, on a fake host tree: registration, list and watch, health following the
//! allocator's quarantine, preferred allocation, allocate with its CDI spec, and
//! registration again after the kubelet's socket is recreated.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use gpucell_device_plugin::api::device_plugin_client::DevicePluginClient;
use gpucell_device_plugin::api::registration_server::{Registration, RegistrationServer};
use gpucell_device_plugin::api::{
    AllocateRequest, ContainerAllocateRequest, ContainerPreferredAllocationRequest, Empty,
    ListAndWatchResponse, PreferredAllocationRequest, RegisterRequest,
};
use gpucell_device_plugin::{runner, Naming, PluginConfig};
use gpucell_host::devices::record::{save_quarantine, QuarantineFile};
use gpucell_host::devices::QuarantineEntry;
use gpucell_host::testing::{FakeFunction, FakeHost};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status, Streaming};

const WAIT: Duration = Duration::from_secs(20);

/// The kubelet's Registration service: like the kubelet, it dials the plugin's endpoint
/// (in its own directory) and asks for the plugin's options before accepting; then it
/// passes the request to the test.
struct FakeKubelet {
    dir: PathBuf,
    seen: mpsc::UnboundedSender<RegisterRequest>,
}

#[tonic::async_trait]
impl Registration for FakeKubelet {
    async fn register(&self, r: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let r = r.into_inner();
        if r.version != "v1beta1" {
            return Err(Status::invalid_argument("unsupported version"));
        }
        let endpoint = self.dir.join(&r.endpoint);
        let opts = connect(endpoint)
            .await
            .get_device_plugin_options(Empty {})
            .await?;
        if !opts.get_ref().get_preferred_allocation_available {
            return Err(Status::failed_precondition(
                "options differ from the registration",
            ));
        }
        let _ = self.seen.send(r);
        Ok(Response::new(Empty {}))
    }
}

/// Serves a fake kubelet on `socket` until the returned sender is dropped or fired.
fn start_kubelet(
    socket: &Path,
) -> (
    oneshot::Sender<()>,
    mpsc::UnboundedReceiver<RegisterRequest>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (stop, stopped) = oneshot::channel::<()>();
    let listener = UnixListener::bind(socket).unwrap();
    let socket = socket.to_owned();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(FakeKubelet {
                dir: socket.parent().unwrap().to_owned(),
                seen: tx,
            }))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
    });
    (stop, rx)
}

async fn connect(socket: PathBuf) -> DevicePluginClient<Channel> {
    let channel = Endpoint::from_static("http://plugin.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = socket.clone();
            async move { UnixStream::connect(p).await.map(TokioIo::new) }
        }))
        .await
        .unwrap();
    DevicePluginClient::new(channel)
}

async fn next(stream: &mut Streaming<ListAndWatchResponse>) -> Vec<(String, String)> {
    let msg = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("no ListAndWatch message in time")
        .unwrap()
        .expect("stream ended");
    msg.devices.into_iter().map(|d| (d.id, d.health)).collect()
}

async fn registrations(
    rx: &mut mpsc::UnboundedReceiver<RegisterRequest>,
    n: usize,
) -> Vec<(String, String)> {
    let mut got = Vec::new();
    for _ in 0..n {
        let r = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("no registration in time")
            .unwrap();
        got.push((r.resource_name, r.endpoint));
    }
    got.sort();
    got
}

/// Three H200s (two on NUMA node 1) and an RTX 4090, all on vfio-pci, each alone in its
/// IOMMU group with its /dev/vfio node.
fn host() -> FakeHost {
    let host = FakeHost::bare_metal_intel().unwrap();
    let h200 = |a: &str, g: u32, numa: i32| {
        FakeFunction::new(a, 0x10de, 0x2335, 0x030200)
            .driver("vfio-pci")
            .iommu_group(g)
            .numa_node(numa)
            .reset_method("flr")
    };
    host.add(&h200("0000:41:00.0", 41, 0)).unwrap();
    host.add(&h200("0000:81:00.0", 81, 1)).unwrap();
    host.add(&h200("0000:82:00.0", 82, 1)).unwrap();
    host.add(
        &FakeFunction::rtx4090("0000:c1:00.0")
            .driver("vfio-pci")
            .iommu_group(90),
    )
    .unwrap();
    for g in [41, 81, 82, 90] {
        host.dev_node(&format!("vfio/{g}")).unwrap();
    }
    host
}

fn quarantine(state: &Path, bdf: &str) {
    let mut q = QuarantineFile {
        version: 1,
        devices: Vec::new(),
    };
    q.put(QuarantineEntry {
        bdf: bdf.parse().unwrap(),
        vendor: 0x10de,
        device: 0x2335,
        reason: "reset failed: config space reads 0xffff".into(),
        since_unix: 1,
        sandbox: Some("pod-a".into()),
    });
    save_quarantine(state, &q).unwrap();
}

fn release_all(state: &Path) {
    save_quarantine(
        state,
        &QuarantineFile {
            version: 1,
            devices: Vec::new(),
        },
    )
    .unwrap();
}

/// Allocate: VFIO nodes plus CDI names and the CDI spec that resolves them; unknown
/// and unhealthy devices refused, naming them.
async fn allocate_and_refuse(
    client: &mut DevicePluginClient<Channel>,
    watch: &mut Streaming<ListAndWatchResponse>,
    state: &Path,
    cdi_dir: &Path,
    all_healthy: &[(String, String)],
) {
    // Allocate: VFIO nodes plus CDI names, and the CDI spec that resolves them.
    let alloc = client
        .allocate(AllocateRequest {
            container_requests: vec![ContainerAllocateRequest {
                devices_ids: vec!["0000-41-00.0".into()],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let c = &alloc.container_responses[0];
    let nodes: Vec<&str> = c.devices.iter().map(|d| d.host_path.as_str()).collect();
    assert_eq!(nodes, vec!["/dev/vfio/vfio", "/dev/vfio/41"]);
    assert_eq!(c.cdi_devices[0].name, "gpucell.io/H200=0000-41-00.0");
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cdi_dir.join("gpucell.io-H200.json")).unwrap())
            .unwrap();
    assert_eq!(spec["kind"], "gpucell.io/H200");
    assert_eq!(spec["cdiVersion"], "0.5.0");
    let dev = spec["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "0000-41-00.0")
        .unwrap();
    assert_eq!(
        dev["containerEdits"]["deviceNodes"][0]["path"],
        "/dev/vfio/41"
    );
    assert_eq!(
        spec["containerEdits"]["deviceNodes"][0]["path"],
        "/dev/vfio/vfio"
    );
    // No temporary files left beside the specs.
    let names: Vec<String> = std::fs::read_dir(cdi_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // Unknown and unhealthy devices are refused, naming them.
    let err = client
        .allocate(AllocateRequest {
            container_requests: vec![ContainerAllocateRequest {
                devices_ids: vec!["0000-99-00.0".into()],
            }],
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("0000-99-00.0"), "{}", err.message());
    quarantine(state, "0000:41:00.0");
    let mut expect = all_healthy.to_vec();
    expect[0].1 = "Unhealthy".into();
    assert_eq!(next(watch).await, expect);
    let err = client
        .allocate(AllocateRequest {
            container_requests: vec![ContainerAllocateRequest {
                devices_ids: vec!["0000-41-00.0".into()],
            }],
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("unhealthy"), "{}", err.message());
    release_all(state);
    assert_eq!(next(watch).await, all_healthy.to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_against_a_fake_kubelet() {
    let host = host();
    let tmp = tempfile::tempdir().unwrap();
    let plugins = tmp.path().join("device-plugins");
    let cdi_dir = tmp.path().join("cdi");
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::create_dir_all(state.join("devices")).unwrap();
    let kubelet_sock = plugins.join("kubelet.sock");
    let (kubelet, mut seen) = start_kubelet(&kubelet_sock);

    let config = PluginConfig {
        root: host.root(),
        state_dir: state.clone(),
        naming: Naming::default(),
        plugin_dir: plugins.clone(),
        cdi_dir: cdi_dir.clone(),
        poll: Duration::from_millis(50),
    };
    let (stop_plugin, plugin_stopped) = oneshot::channel::<()>();
    let plugin = tokio::spawn(runner::run(config, async {
        let _ = plugin_stopped.await;
    }));

    // Registration: one resource per model, each on its own socket.
    assert_eq!(
        registrations(&mut seen, 2).await,
        vec![
            ("gpucell.io/H200".to_owned(), "gpucell-H200.sock".to_owned()),
            (
                "gpucell.io/RTX-4090".to_owned(),
                "gpucell-RTX-4090.sock".to_owned()
            ),
        ]
    );
    let mut client = connect(plugins.join("gpucell-H200.sock")).await;
    let opts = client
        .get_device_plugin_options(Empty {})
        .await
        .unwrap()
        .into_inner();
    assert!(opts.get_preferred_allocation_available);
    assert!(!opts.pre_start_required);

    // List and watch, with NUMA topology.
    let mut watch = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    let healthy = |id: &str| (id.to_owned(), "Healthy".to_owned());
    let all_healthy = vec![
        healthy("0000-41-00.0"),
        healthy("0000-81-00.0"),
        healthy("0000-82-00.0"),
    ];
    assert_eq!(next(&mut watch).await, all_healthy);

    // A quarantined GPU turns Unhealthy; released, it is Healthy again.
    quarantine(&state, "0000:81:00.0");
    let mut expect = all_healthy.clone();
    expect[1].1 = "Unhealthy".into();
    assert_eq!(next(&mut watch).await, expect);
    release_all(&state);
    assert_eq!(next(&mut watch).await, all_healthy);

    // Preferred allocation: two GPUs from the NUMA node that holds two.
    let ids: Vec<String> = all_healthy.iter().map(|d| d.0.clone()).collect();
    let pref = client
        .get_preferred_allocation(PreferredAllocationRequest {
            container_requests: vec![ContainerPreferredAllocationRequest {
                available_device_i_ds: ids.clone(),
                must_include_device_i_ds: vec![],
                allocation_size: 2,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pref.container_responses[0].device_i_ds,
        vec!["0000-81-00.0", "0000-82-00.0"]
    );

    allocate_and_refuse(&mut client, &mut watch, &state, &cdi_dir, &all_healthy).await;

    // The kubelet restarts: it wipes the directory and creates its socket anew. The
    // plugin serves again and registers both resources again.
    let _ = kubelet.send(());
    for e in std::fs::read_dir(&plugins).unwrap() {
        let _ = std::fs::remove_file(e.unwrap().path());
    }
    let (kubelet2, mut seen2) = start_kubelet(&kubelet_sock);
    assert_eq!(registrations(&mut seen2, 2).await.len(), 2);
    // The old stream ended with the old server; a new one lists the devices.
    let mut client = connect(plugins.join("gpucell-H200.sock")).await;
    let mut watch = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(next(&mut watch).await, all_healthy);

    // Shutdown: the plugin stops and removes its sockets.
    let _ = stop_plugin.send(());
    tokio::time::timeout(WAIT, plugin)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!plugins.join("gpucell-H200.sock").exists());
    assert!(!plugins.join("gpucell-RTX-4090.sock").exists());
    let _ = kubelet2.send(());
}

#[tokio::test]
async fn no_gpu_is_an_error_naming_the_root() {
    // No GPU at all: refused at once, naming the host root.
    let empty = FakeHost::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut config = PluginConfig::new(tmp.path().join("state"));
    config.root = empty.root();
    config.plugin_dir = tmp.path().to_owned();
    config.cdi_dir = tmp.path().join("cdi");
    let err = runner::run(config, async {}).await.unwrap_err();
    assert!(err.to_string().contains("no NVIDIA GPU"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_waited_for_and_a_model_bound_later_is_served() {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.add(
        &FakeFunction::new("0000:41:00.0", 0x10de, 0x2335, 0x030200)
            .driver("vfio-pci")
            .iommu_group(41),
    )
    .unwrap();
    host.dev_node("vfio/41").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let plugins = tmp.path().join("device-plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let mut config = PluginConfig::new(tmp.path().join("state"));
    config.root = host.root();
    config.plugin_dir = plugins.clone();
    config.cdi_dir = tmp.path().join("cdi");
    config.poll = Duration::from_millis(50);
    let (stop, stopped) = oneshot::channel::<()>();
    let plugin = tokio::spawn(runner::run(config, async {
        let _ = stopped.await;
    }));
    // No kubelet yet: the plugin waits for its socket, serving nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!plugins.join("gpucell-H200.sock").exists());
    let (kubelet, mut seen) = start_kubelet(&plugins.join("kubelet.sock"));
    assert_eq!(registrations(&mut seen, 1).await[0].0, "gpucell.io/H200");
    // An RTX 4090 appears (bound to vfio-pci later): both resources are registered.
    host.add(
        &FakeFunction::rtx4090("0000:c1:00.0")
            .driver("vfio-pci")
            .iommu_group(90),
    )
    .unwrap();
    host.dev_node("vfio/90").unwrap();
    let names: Vec<String> = registrations(&mut seen, 2)
        .await
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(names, vec!["gpucell.io/H200", "gpucell.io/RTX-4090"]);
    assert!(tmp.path().join("cdi/gpucell.io-RTX-4090.json").is_file());
    let _ = stop.send(());
    tokio::time::timeout(WAIT, plugin)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = kubelet.send(());
}

//! `gpucell-test-cri-pod`: runs one pod through containerd's CRI plugin as the kubelet
//! would, for the nested test host (scenario 49-shim-pod-edu).
//!
//! It serves a fake kubelet PodResources API (`List`) on `--kubelet-socket` that gives the
//! pod's `probe` container the PCI function `--device-id` of resource `--resource`, then
//! runs the pod: its sandbox, an `init` container that asks for no device, then `probe`,
//! which asks for the VFIO node `--device` (as the device plugin's Allocate hands it out).
//! Both run `--command`. For each container it prints `NAME exit=N` and then its log's
//! lines prefixed with `NAME| `, stops and removes the pod, and exits 0 when the CRI calls
//! succeeded (the containers' exits are for the caller to judge).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use gpucell_cri_client::v1::{ContainerState, Device};
use gpucell_cri_client::{container_config, log_lines, pod_config, CriClient};
use gpucell_shim::pod_resources::api::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use gpucell_shim::pod_resources::api::{
    AllocatableResourcesRequest, AllocatableResourcesResponse, ContainerDevices,
    ContainerResources, GetPodResourcesRequest, GetPodResourcesResponse, ListPodResourcesRequest,
    ListPodResourcesResponse, PodResources,
};
use tonic::{Request, Response, Status};

#[derive(Parser)]
struct Args {
    /// containerd's gRPC socket (its CRI plugin enabled).
    #[arg(long)]
    cri_socket: PathBuf,
    /// Where the fake kubelet serves PodResources (none: no kubelet).
    #[arg(long)]
    kubelet_socket: Option<PathBuf>,
    /// The CRI runtime handler.
    #[arg(long, default_value = "gpucell")]
    handler: String,
    #[arg(long)]
    image: String,
    /// The pod's log directory.
    #[arg(long)]
    logs: PathBuf,
    /// The VFIO node the `probe` container asks for (`/dev/vfio/N`).
    #[arg(long)]
    device: PathBuf,
    /// The device ID the kubelet lists for `probe` (the function's address).
    #[arg(long)]
    device_id: String,
    #[arg(long, default_value = "gpucell.io/edu")]
    resource: String,
    /// What both containers run.
    #[arg(long, num_args = 1.., required = true)]
    command: Vec<String>,
}

const POD: &str = "edu-pod";
const NAMESPACE: &str = "default";
const WAIT: Duration = Duration::from_secs(240);

/// Lists one pod, whose `probe` container has one device.
struct FakeKubelet {
    resource: String,
    device_id: String,
}

#[tonic::async_trait]
impl PodResourcesLister for FakeKubelet {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        let probe = ContainerResources {
            name: "probe".into(),
            devices: vec![ContainerDevices {
                resource_name: self.resource.clone(),
                device_ids: vec![self.device_id.clone()],
                topology: None,
            }],
            ..Default::default()
        };
        let init = ContainerResources {
            name: "init".into(),
            ..Default::default()
        };
        Ok(Response::new(ListPodResourcesResponse {
            pod_resources: vec![PodResources {
                name: POD.into(),
                namespace: NAMESPACE.into(),
                containers: vec![init, probe],
            }],
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

/// Serves the fake kubelet on `socket` from a thread of its own, until the process ends.
fn serve_kubelet(socket: &Path, kubelet: FakeKubelet) -> Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(socket);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let listener = rt
        .block_on(async { tokio::net::UnixListener::bind(socket) })
        .with_context(|| format!("listening on {}", socket.display()))?;
    std::thread::spawn(move || {
        rt.block_on(async move {
            let served = tonic::transport::Server::builder()
                .add_service(PodResourcesListerServer::new(kubelet))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await;
            if let Err(e) = served {
                eprintln!("fake kubelet: {e}");
            }
        });
    });
    Ok(())
}

/// Runs container `name` of the pod to its end; prints its exit and log.
fn run_container(
    cri: &CriClient,
    args: &Args,
    pod_id: &str,
    name: &str,
    devices: Vec<Device>,
) -> Result<()> {
    let command: Vec<&str> = args.command.iter().map(String::as_str).collect();
    let log = format!("{name}.log");
    let mut config = container_config(name, &args.image, &command, &log);
    config.devices = devices;
    let pod = pod_config(POD, &args.logs);
    let id = cri
        .create_container(pod_id, config, pod)
        .with_context(|| format!("creating {name}"))?;
    cri.start_container(&id)
        .with_context(|| format!("starting {name}"))?;
    let t = Instant::now();
    let status = loop {
        let s = cri.container_status(&id)?;
        if s.state == ContainerState::ContainerExited as i32 {
            break s;
        }
        if t.elapsed() > WAIT {
            bail!("{name} did not exit within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    println!("{name} exit={}", status.exit_code);
    let text = std::fs::read_to_string(args.logs.join(&log)).unwrap_or_default();
    for line in log_lines(&text) {
        println!("{name}| {line}");
    }
    cri.remove_container(&id)?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(socket) = &args.kubelet_socket {
        serve_kubelet(
            socket,
            FakeKubelet {
                resource: args.resource.clone(),
                device_id: args.device_id.clone(),
            },
        )?;
    }
    std::fs::create_dir_all(&args.logs)?;
    let cri = CriClient::connect(&args.cri_socket)?;
    let mut pod = pod_config(POD, &args.logs);
    if let Some(m) = pod.metadata.as_mut() {
        m.namespace = NAMESPACE.into();
    }
    let pod_id = cri
        .run_pod_sandbox(pod, &args.handler)
        .context("running the pod's sandbox")?;
    let device = Device {
        container_path: args.device.display().to_string(),
        host_path: args.device.display().to_string(),
        permissions: "rw".into(),
    };
    let ran = run_container(&cri, &args, &pod_id, "init", Vec::new())
        .and_then(|()| run_container(&cri, &args, &pod_id, "probe", vec![device]));
    let stopped = cri.stop_pod_sandbox(&pod_id);
    let removed = cri.remove_pod_sandbox(&pod_id);
    ran?;
    stopped?;
    removed?;
    Ok(())
}

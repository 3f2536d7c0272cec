//! The `DevicePlugin` gRPC service of one resource: options, ListAndWatch (the device list
//! with health, sent again on every change), GetPreferredAllocation, Allocate (VFIO device
//! nodes plus CDI device names; the CDI spec written first) and PreStartContainer.

use std::path::PathBuf;
use std::pin::Pin;

use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::api::device_plugin_server::DevicePlugin;
use crate::api::{
    AllocateRequest, AllocateResponse, CdiDevice, ContainerAllocateResponse,
    ContainerPreferredAllocationResponse, Device, DevicePluginOptions, DeviceSpec, Empty,
    ListAndWatchResponse, NumaNode, PreStartContainerRequest, PreStartContainerResponse,
    PreferredAllocationRequest, PreferredAllocationResponse, TopologyInfo,
};
use crate::cdi;
use crate::resources::Resource;

/// Most device IDs accepted in one request (a node has far fewer GPUs).
const MAX_IDS: usize = 1024;

/// The options this plugin registers with.
pub fn options() -> DevicePluginOptions {
    DevicePluginOptions {
        pre_start_required: false,
        get_preferred_allocation_available: true,
    }
}

/// Serves one resource. `state` always holds its current devices and their health;
/// `stop` ends every open ListAndWatch stream when it turns true (so the server can stop).
#[derive(Debug, Clone)]
pub struct PluginService {
    state: watch::Receiver<Resource>,
    stop: watch::Receiver<bool>,
    cdi_dir: PathBuf,
}

impl PluginService {
    pub fn new(
        state: watch::Receiver<Resource>,
        stop: watch::Receiver<bool>,
        cdi_dir: PathBuf,
    ) -> Self {
        Self {
            state,
            stop,
            cdi_dir,
        }
    }
}

/// The ListAndWatch message for `r`.
pub fn list_response(r: &Resource) -> ListAndWatchResponse {
    ListAndWatchResponse {
        devices: r
            .devices
            .iter()
            .map(|d| Device {
                id: d.id.clone(),
                health: d.health.api_str().to_owned(),
                topology: d.numa_node.map(|n| TopologyInfo {
                    nodes: vec![NumaNode { id: i64::from(n) }],
                }),
            })
            .collect(),
    }
}

fn check_ids(ids: &[String]) -> Result<(), Status> {
    if ids.len() > MAX_IDS {
        return Err(Status::invalid_argument(format!(
            "{} device IDs in one request; at most {MAX_IDS}",
            ids.len()
        )));
    }
    Ok(())
}

/// The allocation of one container: the VFIO nodes and CDI names of `ids`.
fn allocate_one(r: &Resource, ids: &[String]) -> Result<ContainerAllocateResponse, Status> {
    check_ids(ids)?;
    let mut devices = vec![DeviceSpec {
        container_path: cdi::VFIO_CONTAINER_NODE.to_owned(),
        host_path: cdi::VFIO_CONTAINER_NODE.to_owned(),
        permissions: "rw".to_owned(),
    }];
    let mut cdi_devices = Vec::new();
    for id in ids {
        let shown = gpucell_host::sysfs::printable(id);
        let d = r.devices.iter().find(|d| &d.id == id).ok_or_else(|| {
            Status::not_found(format!("{}: no device `{shown}` on this node", r.name))
        })?;
        if let crate::resources::Health::Unhealthy(why) = &d.health {
            return Err(Status::failed_precondition(format!(
                "{} device {shown} ({}) is unhealthy: {why}",
                r.name, d.bdf
            )));
        }
        let node = d.vfio_node().ok_or_else(|| {
            Status::failed_precondition(format!("{} device {shown} has no IOMMU group", r.name))
        })?;
        let node = node.to_string_lossy().into_owned();
        devices.push(DeviceSpec {
            container_path: node.clone(),
            host_path: node,
            permissions: "rw".to_owned(),
        });
        cdi_devices.push(CdiDevice {
            name: cdi::qualified_name(&r.name, id),
        });
    }
    Ok(ContainerAllocateResponse {
        devices,
        cdi_devices,
        ..Default::default()
    })
}

/// Completes when `stop` turns true or its sender is gone.
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for PluginService {
    async fn get_device_plugin_options(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(options()))
    }

    type ListAndWatchStream = ListStream;

    async fn list_and_watch(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut state = self.state.clone();
        let stop = self.stop.clone();
        // The current list first, then one message per change; the stream ends when the
        // server stops or the kubelet goes away.
        state.mark_changed();
        tokio::spawn(async move {
            let stopped = stopped(stop);
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    () = &mut stopped => break,
                    () = tx.closed() => break,
                    changed = state.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let msg = list_response(&state.borrow_and_update());
                        if tx.send(Ok(msg)).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        let r = self.state.borrow().clone();
        let mut container_responses = Vec::new();
        for c in &request.get_ref().container_requests {
            check_ids(&c.available_device_i_ds)?;
            check_ids(&c.must_include_device_i_ds)?;
            let size = usize::try_from(c.allocation_size.max(0)).unwrap_or(0);
            let device_i_ds = crate::prefer::preferred(
                &r.devices,
                &c.available_device_i_ds,
                &c.must_include_device_i_ds,
                size,
            );
            container_responses.push(ContainerPreferredAllocationResponse { device_i_ds });
        }
        Ok(Response::new(PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        request: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        let r = self.state.borrow().clone();
        let container_responses = request
            .get_ref()
            .container_requests
            .iter()
            .map(|c| allocate_one(&r, &c.devices_ids))
            .collect::<Result<Vec<_>, Status>>()?;
        // The names handed out must resolve before the runtime looks them up.
        let dir = self.cdi_dir.clone();
        let written = tokio::task::spawn_blocking(move || cdi::write_spec(&dir, &r))
            .await
            .map_err(|e| Status::internal(format!("writing the CDI spec failed: {e}")))?;
        if let Err(e) = written {
            let msg = gpucell_common::chain_string(&e);
            tracing::error!("{msg}");
            return Err(Status::internal(msg));
        }
        Ok(Response::new(AllocateResponse {
            container_responses,
        }))
    }

    async fn pre_start_container(
        &self,
        _: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        Ok(Response::new(PreStartContainerResponse {}))
    }
}

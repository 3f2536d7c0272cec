//! A pod's further containers: each joins the VM its pod already runs (booted with
//! spare ports, [`crate::RunRequest::pod_slots`]) instead of booting one of its own.
//! Its root filesystem, a directory someone else prepared (containerd's rootfs), is
//! written into a read-only disk as a run's is, plugged into the running VM, and the
//! agent starts the container's process on it beside the others.

use std::os::fd::AsFd;
use std::path::Path;

use gpucell_protocol::RootfsSpec;
use gpucell_sandbox::EventSender;

use crate::exec::{ExecError, ExecHandle, ProcIo};
use crate::node::Node;
use crate::request::{RequestError, RunRequest};
use crate::RunFailure;

/// Why a container could not join its pod's VM.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("a container added to a running pod VM cannot bring devices ({0}): a pod's GPUs and PCI functions are given to its VM when it boots, with the pod's first container")]
    Devices(String),
    #[error("preparing the container")]
    Prepare(#[source] Box<RunFailure>),
    #[error("opening the container's disk {}", path.display())]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the container in the pod's VM")]
    Start(#[source] ExecError),
}

/// A container running in a pod's VM beside others.
#[derive(Debug)]
pub struct AddedContainer {
    /// Its process: guest pid, signals, its end.
    pub handle: ExecHandle,
    /// The virtio serial of its disk in the VM.
    pub disk: String,
    vm: EventSender,
}

impl AddedContainer {
    /// Unplugs the container's disk once it has ended (the agent has unmounted it), so
    /// that its port takes another container; a disk the guest keeps keeps its port.
    pub fn release(&self) -> Result<(), ExecError> {
        self.vm.remove_container_disk(&self.disk)
    }
}

/// Starts `request` (its process, env, user and workdir; its image names it only) on
/// the root filesystem `rootfs` in the running VM behind `vm`, with its streams on `io`.
/// Returns once the agent runs it. The disk is gone from the host when this returns
/// (QEMU holds it open until [`AddedContainer::release`] or the VM's end).
pub fn add_container(
    node: &Node,
    vm: &EventSender,
    request: RunRequest,
    rootfs: &Path,
    io: ProcIo,
) -> Result<AddedContainer, AddError> {
    let devices = &request.devices;
    if devices.gpus.is_some() || !devices.functions.is_empty() {
        let mut named: Vec<String> = devices.gpus.iter().map(|g| format!("gpus {g}")).collect();
        named.extend(devices.functions.iter().cloned());
        return Err(AddError::Devices(named.join(", ")));
    }
    let req = request.validate()?;
    let disk = crate::rootfs::directory_disk(
        &node.state_dir,
        rootfs,
        node.store.fs_type,
        &req.request.image,
        &req.request.env,
    )
    .map_err(|e| AddError::Prepare(Box::new(e.into())))?;
    let placeholder = RootfsSpec {
        device: String::new(),
        fstype: disk.disk.fstype.clone(),
    };
    let spec = crate::run::spec_for(&req, &disk.image, placeholder, "pod")
        .map_err(|e| AddError::Prepare(Box::new(e)))?;
    let file = std::fs::File::open(&disk.disk.path).map_err(|source| AddError::Open {
        path: disk.disk.path.clone(),
        source,
    })?;
    let (handle, disk) = vm
        .add_container_on_disk(file.as_fd(), spec, io)
        .map_err(AddError::Start)?;
    Ok(AddedContainer {
        handle,
        disk,
        vm: vm.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn null_io() -> ProcIo {
        ProcIo {
            stdout: Box::new(std::io::sink()),
            stderr: Box::new(std::io::sink()),
            stdin: None,
        }
    }

    #[test]
    fn an_added_container_brings_no_devices() {
        let state = tempfile::tempdir().unwrap();
        let node = Node::new("/", state.path(), None, &Default::default());
        let (vm, _rx) = gpucell_sandbox::event_channel();
        let mut r = RunRequest::new("containerd:c2");
        r.devices.functions = vec!["0000:41:00.0".into()];
        let err = add_container(&node, &vm, r, state.path(), null_io()).unwrap_err();
        assert!(err.to_string().contains("0000:41:00.0"), "{err}");
    }

    #[test]
    fn a_vm_without_spare_ports_is_named_and_no_disk_is_left() {
        let state = tempfile::tempdir().unwrap();
        let tree = state.path().join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/x"), b"x").unwrap();
        let node = Node::new("/", state.path(), None, &Default::default());
        let (vm, _rx) = gpucell_sandbox::event_channel();
        let mut r = RunRequest::new("containerd:c2");
        r.entrypoint = Some("/bin/x".into());
        let err = match add_container(&node, &vm, r, &tree, null_io()) {
            Err(AddError::Prepare(e)) if crate::error_chain(&e).contains("mkfs") => {
                eprintln!(
                    "skipping: no filesystem writer here: {}",
                    crate::error_chain(&e)
                );
                return;
            }
            Err(e) => e,
            Ok(_) => panic!("a VM that is not running took a container"),
        };
        assert!(crate::error_chain(&err).contains("not running"), "{err}");
        let left: Vec<_> = std::fs::read_dir(state.path().join("tmp"))
            .unwrap()
            .flatten()
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

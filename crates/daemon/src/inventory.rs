//! `GET /v1/node`: the node's GPUs and their state (as `gpucell gpu list --json` shows
//! them), the guest flavours built, its capacity, and its sandboxes by state. Also sets
//! the GPU gauges of `/metrics`.

use std::collections::BTreeMap;
use std::path::Path;

use gpucell_host::gpu::GpuInventory;
use gpucell_host::gpu_state::DeviceRecords;
use gpucell_host::gpu_view::GpuList;
use gpucell_host::HostRoot;
use serde_json::{json, Value};

use crate::metrics::StateLabel;
use crate::service::Service;

/// Guest flavours with a manifest under `<state>/guest/`.
pub fn flavours(state_dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(state_dir.join("guest"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("manifest.json").is_file())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    out.sort();
    out
}

fn cpus(root: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(root.join("proc/cpuinfo")).ok()?;
    Some(text.lines().filter(|l| l.starts_with("processor")).count())
}

pub fn inventory(service: &Service) -> Value {
    let s = &service.settings;
    let root = HostRoot::new(&s.host_root);
    let records = DeviceRecords::read(&s.state_dir);
    let gpus = match GpuInventory::read(&root) {
        Ok(inv) => {
            let list = GpuList::new(&inv, &records);
            set_gpu_gauges(service, &list);
            serde_json::to_value(&list).unwrap_or(Value::Null)
        }
        Err(e) => json!({ "error": gpucell_common::chain_string(&e) }),
    };
    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    for st in service.list().sandboxes {
        *states.entry(st.state.as_str()).or_default() += 1;
    }
    json!({
        "schema": "gpucell.node/v1",
        "gpus": gpus,
        "flavours": flavours(&s.state_dir),
        "default_flavour": s.default_guest,
        "capacity": {
            "cpus": cpus(&s.host_root),
            "memory_mib": crate::validate::host_memory_mib(&s.host_root),
        },
        "sandboxes": states,
        "ready": service.is_ready(),
        "version": env!("CARGO_PKG_VERSION"),
    })
}

fn set_gpu_gauges(service: &Service, list: &GpuList) {
    let mut counts: BTreeMap<&str, i64> = [
        ("free", 0),
        ("held", 0),
        ("quarantined", 0),
        ("unusable", 0),
    ]
    .into();
    for g in &list.gpus {
        let key = match g.passthrough.state {
            "ready" => "free",
            "allocated" => "held",
            "quarantined" => "quarantined",
            _ => "unusable",
        };
        *counts.entry(key).or_default() += 1;
    }
    for (state, n) in counts {
        service
            .metrics
            .gpus
            .get_or_create(&StateLabel {
                state: state.into(),
            })
            .set(n);
    }
}

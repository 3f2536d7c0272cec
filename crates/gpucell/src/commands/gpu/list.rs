//! `gpucell gpu list`: one row per NVIDIA GPU with its passthrough state.

use anyhow::Context;
use gpucell_host::devices::record::format_utc;
use gpucell_host::gpu::GpuInventory;
use gpucell_host::gpu_state::{DeviceRecords, GpuState};
use gpucell_host::gpu_view::{GpuList, GpuRow};
use gpucell_host::HostRoot;

use crate::commands::{write_stdout, Global};

#[derive(clap::Args, Debug)]
pub struct ListArgs {}

pub fn run(global: &Global, _args: ListArgs) -> anyhow::Result<u8> {
    let root = HostRoot::new(&global.host_root);
    let inventory = GpuInventory::read(&root)
        .with_context(|| format!("cannot list GPUs under {}", global.host_root.display()))?;
    // A damaged record is a warning in the list, not a failure of `gpu list`.
    let records = DeviceRecords::read(&global.state_dir);
    let list = GpuList::new(&inventory, &records);
    if global.json {
        // Through a Value: the document's keys are sorted, as they always were.
        let value = serde_json::to_value(&list)?;
        write_stdout(&(serde_json::to_string_pretty(&value)? + "\n"))?;
    } else {
        write_stdout(&(render_text(&list) + &record_notes(&records)))?;
        for w in &list.warnings {
            eprintln!("warning: {w}");
        }
    }
    if let Some(value) = &list.acs_override {
        eprintln!(
            "warning: the kernel command line has pcie_acs_override={value}: IOMMU groups are \
             split without real isolation, so a passed-through GPU may reach other devices. \
             Remove it on hosts that run untrusted workloads."
        );
    }
    Ok(0)
}

/// One line per quarantined or allocated function (GPU or not), for under the table.
fn record_notes(records: &DeviceRecords) -> String {
    let mut out = String::new();
    for q in &records.quarantine {
        out.push_str(&format!(
            "{}: quarantined since {}: {}; check it, then `gpucell gpu release {}`\n",
            q.bdf,
            format_utc(q.since_unix),
            q.reason,
            q.bdf
        ));
    }
    for a in &records.allocations {
        out.push_str(&format!(
            "{}: allocated to sandbox {} (pid {}) since {}\n",
            a.bdf,
            a.sandbox,
            a.owner.pid,
            format_utc(a.since_unix)
        ));
    }
    if out.is_empty() {
        out
    } else {
        format!("\n{out}")
    }
}

/// The product name inside `[...]` of a PCI ID name (`GH100 [H200 SXM 141GB]`), else all of it.
fn short_name(name: &str) -> &str {
    match (name.find('['), name.rfind(']')) {
        (Some(a), Some(b)) if a < b => &name[a + 1..b],
        _ => name,
    }
}

fn dash<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn row_cells(g: &GpuRow) -> Vec<String> {
    let companions = if g.companions.is_empty() {
        "-".to_string()
    } else {
        g.companions
            .iter()
            .map(|c| {
                format!(
                    "{}({})",
                    c.bdf
                        .split_once(':')
                        .map_or(c.bdf.as_str(), |(_, rest)| rest),
                    c.kind
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let driver = match (g.driver.as_deref(), g.driver_state) {
        (Some(d), _) => d.to_string(),
        (None, "unknown") => "unknown".to_string(),
        (None, _) => "none".to_string(),
    };
    let reset = match &g.reset_methods {
        Some(m) if !m.is_empty() => m.join(","),
        _ => "none".to_string(),
    };
    vec![
        g.bdf.clone(),
        short_name(&g.name).to_string(),
        g.id.clone(),
        dash(g.architecture.as_deref()),
        dash(g.largest_bar.as_ref().map(|b| b.human.clone())),
        dash(g.iommu_group),
        companions,
        driver,
        dash(g.numa_node),
        reset,
        g.passthrough.state.to_string(),
    ]
}

/// The text table and, under it, one line per GPU that is not ready saying why.
pub fn render_text(list: &GpuList) -> String {
    if list.gpus.is_empty() {
        return "no NVIDIA GPUs found\n".to_string();
    }
    let header: Vec<String> = [
        "BDF",
        "NAME",
        "ID",
        "ARCH",
        "BAR",
        "GROUP",
        "COMPANIONS",
        "DRIVER",
        "NUMA",
        "RESET",
        "STATE",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut rows = vec![header];
    rows.extend(list.gpus.iter().map(row_cells));
    let cols = rows[0].len();
    let widths: Vec<usize> = (0..cols)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let mut notes = Vec::new();
    let mut no_iommu = Vec::new();
    for g in &list.gpus {
        let who = |fs: &[gpucell_host::gpu_view::MemberRow]| {
            fs.iter()
                .map(|m| {
                    format!(
                        "{} ({})",
                        m.bdf,
                        m.driver.as_deref().unwrap_or(m.driver_state)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        match g.state {
            GpuState::NeedsBind { .. } => notes.push(format!(
                "{}: bind to vfio-pci first: {} (gpucell gpu bind {})",
                g.bdf,
                who(&g.passthrough.functions),
                g.bdf
            )),
            GpuState::GroupNotViable { .. } => notes.push(format!(
                "{}: IOMMU group {} also holds devices bound to other drivers: {}; move the GPU \
                 to another slot or unbind them",
                g.bdf,
                dash(g.iommu_group),
                who(&g.passthrough.functions)
            )),
            GpuState::NoIommu => no_iommu.push(g.bdf.as_str()),
            _ => {}
        }
        if let (Some(w), Some(m)) = (g.link_width, g.link_max_width) {
            if w < m {
                notes.push(format!(
                    "{}: PCIe link runs at x{w} of x{m}; reseat the card or check the slot/riser",
                    g.bdf
                ));
            }
        }
    }
    if !no_iommu.is_empty() {
        notes.push(format!(
            "{}: no IOMMU group; turn the IOMMU on (intel_iommu=on or amd_iommu=on, and \
             VT-d/AMD-Vi in firmware); see `gpucell doctor`",
            no_iommu.join(", ")
        ));
    }
    if !notes.is_empty() {
        out.push('\n');
        for n in notes {
            out.push_str(&n);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod held_tests {
    use super::*;

    /// The captured H200 host: GPUs 0000:00:06.0 to 0000:00:09.0.
    fn h200_list(records: &DeviceRecords) -> GpuList {
        let root = HostRoot::new(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/hosts/h200x4-vm"),
        );
        GpuList::new(&GpuInventory::read(&root).unwrap(), records)
    }

    #[test]
    fn quarantined_and_allocated_rows() {
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(state.path().join("devices")).unwrap();
        std::fs::write(
            state.path().join("devices/quarantine.json"),
            r#"{"version":1,"devices":[{"bdf":"0000:00:06.0","vendor":4318,"device":9008,"reason":"reset failed","since_unix":0,"sandbox":"a"}]}"#,
        )
        .unwrap();
        std::fs::write(
            state.path().join("devices/allocations.json"),
            r#"{"version":1,"allocations":[{"bdf":"0000:00:07.0","vendor":4318,"device":9008,"iommu_group":2,"sandbox":"b","owner":{"pid":7,"start_time":1},"since_unix":0}]}"#,
        )
        .unwrap();
        let records = DeviceRecords::read(state.path());
        let warnings = &records.warnings;
        assert!(warnings.is_empty(), "{warnings:?}");
        let list = h200_list(&records);
        let states: Vec<_> = list.gpus.iter().map(|g| g.passthrough.state).collect();
        assert_eq!(&states[..3], ["quarantined", "allocated", "no-iommu"]);
        let text = render_text(&list) + &record_notes(&records);
        assert!(text.contains(
            "0000:00:06.0: quarantined since 1970-01-01T00:00:00Z: reset failed; check it, then `gpucell gpu release 0000:00:06.0`"
        ), "{text}");
        assert!(
            text.contains("0000:00:07.0: allocated to sandbox b (pid 7)"),
            "{text}"
        );
        let value = serde_json::to_value(&list).unwrap();
        assert_eq!(value["gpus"][0]["quarantine"]["reason"], "reset failed");
        assert_eq!(value["gpus"][0]["allocation"], serde_json::Value::Null);
        assert_eq!(value["gpus"][1]["allocation"]["sandbox"], "b");
        assert_eq!(value["gpus"][2]["quarantine"], serde_json::Value::Null);
        // A damaged record is a warning, not a failure of `gpu list`.
        std::fs::write(state.path().join("devices/quarantine.json"), "{").unwrap();
        let warnings = DeviceRecords::read(state.path()).warnings;
        assert!(
            warnings[0].contains("quarantine.json is damaged"),
            "{warnings:?}"
        );
    }
}

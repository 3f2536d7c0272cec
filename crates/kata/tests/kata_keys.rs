//! The export's keys against Kata 4.1.0's QEMU NVIDIA GPU configuration
//! (`tests/fixtures/kata-qemu-nvidia-gpu-keys.txt`, with its source): every key written
//! is one that template sets (or, for `initrd`, one Kata's configuration parser reads),
//! and the NVIDIA-relevant keys are all written. The node's GPUs come from fake sysfs
//! trees and the captured 4 × H200 host.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use gpucell_host::testing::{FakeFunction, FakeHost};
use gpucell_host::HostRoot;
use gpucell_kata::{export, hole64, write, ExportOptions, KataGuest, NodeGpus};

/// Keys written that the NVIDIA template does not set, with why.
const NOT_IN_TEMPLATE: &[(&str, &str)] = &[(
    "hypervisor.qemu.initrd",
    "gpucell's guest is an init image; the NVIDIA template boots a disk `image`",
)];

/// The keys that make a GPU VM: each must be in the template and in the export.
const NVIDIA_KEYS: &[&str] = &[
    "hypervisor.qemu.kernel",
    "hypervisor.qemu.machine_type",
    "hypervisor.qemu.kernel_params",
    "hypervisor.qemu.default_memory",
    "hypervisor.qemu.enable_mem_prealloc",
    "hypervisor.qemu.hot_plug_vfio",
    "hypervisor.qemu.cold_plug_vfio",
    "hypervisor.qemu.pcie_root_port",
    "agent.kata.dial_timeout",
    "runtime.static_sandbox_resource_mgmt",
    "runtime.create_container_timeout",
    "runtime.pod_resource_api_sock",
];

fn fixture() -> (BTreeSet<String>, BTreeSet<String>) {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kata-qemu-nvidia-gpu-keys.txt"),
    )
    .unwrap();
    let (mut template, mut parser) = (BTreeSet::new(), BTreeSet::new());
    let mut into = &mut template;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        match line {
            "[template]" => into = &mut template,
            "[parser]" => into = &mut parser,
            key => {
                into.insert(key.to_owned());
            }
        }
    }
    assert!(
        template.len() > 100 && parser.len() > 50,
        "fixture looks truncated"
    );
    (template, parser)
}

fn keys(prefix: &str, t: &toml::Table, out: &mut BTreeSet<String>) {
    for (k, v) in t {
        let full = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(inner) => keys(&full, inner, out),
            _ => {
                out.insert(full);
            }
        }
    }
}

fn guest() -> KataGuest {
    KataGuest {
        flavour: "nvidia-550".into(),
        kernel: PathBuf::from("/var/lib/gpucell/guest/nvidia-550/vmlinux"),
        initrd: PathBuf::from("/var/lib/gpucell/guest/nvidia-550/initramfs.cpio"),
    }
}

fn h200_capture() -> HostRoot {
    HostRoot::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hosts/h200x4-vm"),
    )
}

#[test]
fn written_keys_exist_in_kata_and_cover_the_nvidia_ones() {
    let (template, parser) = fixture();
    let gpus = NodeGpus::read(&h200_capture()).unwrap();
    let e = export(&guest(), gpus, &ExportOptions::default()).unwrap();
    let doc: toml::Table = toml::from_str(&e.config_toml).unwrap();
    let mut written = BTreeSet::new();
    keys("", &doc, &mut written);
    for k in &written {
        let allowed = NOT_IN_TEMPLATE.iter().any(|(n, _)| n == k);
        assert!(
            template.contains(k) || (allowed && parser.contains(k)),
            "{k} is not a key of Kata's QEMU NVIDIA configuration"
        );
    }
    for k in NVIDIA_KEYS {
        assert!(template.contains(*k), "fixture lacks {k}");
        assert!(written.contains(*k), "export lacks {k}");
    }
    // Values: cold-plug on one root port per GPU, preallocated memory, the flavour's files.
    let hv = doc["hypervisor"]["qemu"].as_table().unwrap();
    assert_eq!(hv["cold_plug_vfio"].as_str(), Some("root-port"));
    assert_eq!(hv["hot_plug_vfio"].as_str(), Some("no-port"));
    assert_eq!(hv["pcie_root_port"].as_integer(), Some(4));
    assert_eq!(hv["enable_mem_prealloc"].as_bool(), Some(true));
    assert_eq!(
        hv["kernel"].as_str(),
        Some("/var/lib/gpucell/guest/nvidia-550/vmlinux")
    );
    assert_eq!(
        hv["initrd"].as_str(),
        Some("/var/lib/gpucell/guest/nvidia-550/initramfs.cpio")
    );
    // Four H200s with a 256 GiB BAR each (+ small BARs, rounded up to 512 GiB):
    // the hole gpucell would use is stated.
    assert_eq!(gpus.count, 4);
    assert_eq!(gpus.hole64_bytes, 5 * (512u64 << 30) + (32 << 30));
    assert!(e
        .config_toml
        .contains(&format!("pci-hole64-size={}", gpus.hole64_bytes)));
    assert!(e
        .runtime_class_yaml
        .contains("handler: kata-gpucell-nvidia-550"));
}

#[test]
fn one_root_port_without_gpus_and_bad_options_refused() {
    let host = FakeHost::new().unwrap();
    let gpus = NodeGpus::read(&host.root()).unwrap();
    assert_eq!(
        gpus,
        NodeGpus {
            count: 0,
            hole64_bytes: 32 << 30
        }
    );
    let e = export(&guest(), gpus, &ExportOptions::default()).unwrap();
    assert_eq!(e.root_ports, 1);
    let bad = [
        ExportOptions {
            root_ports: Some(17),
            ..Default::default()
        },
        ExportOptions {
            memory_mib: 16,
            ..Default::default()
        },
        ExportOptions {
            vcpus: 0,
            ..Default::default()
        },
        ExportOptions {
            name: Some("Bad_Name".into()),
            ..Default::default()
        },
        ExportOptions {
            qemu_path: "qemu".into(),
            ..Default::default()
        },
    ];
    for o in bad {
        let err = export(&guest(), gpus, &o).unwrap_err().to_string();
        assert!(!err.is_empty());
    }
}

#[test]
fn hole_follows_the_bars_of_fake_gpus() {
    let host = FakeHost::new().unwrap();
    host.add(&FakeFunction::h100("0000:41:00.0")).unwrap();
    host.add(&FakeFunction::rtx4090("0000:81:00.0")).unwrap();
    let gpus = NodeGpus::read(&host.root()).unwrap();
    // H100: 128 GiB + 16 MiB + 32 MiB → 256 GiB; 4090: 32 GiB + 32 MiB → 64 GiB.
    assert_eq!(gpus.count, 2);
    assert_eq!(
        gpus.hole64_bytes,
        hole64(&[(128 << 30) + (48 << 20), (32 << 30) + (32 << 20)])
    );
    assert_eq!(
        gpus.hole64_bytes,
        (256u64 << 30) + (64 << 30) + (256 << 30) + (32 << 30)
    );
}

#[test]
fn writes_three_files_naming_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let gpus = NodeGpus {
        count: 2,
        hole64_bytes: 1 << 40,
    };
    let e = export(&guest(), gpus, &ExportOptions::default()).unwrap();
    let w = write(&e, &tmp.path().join("out")).unwrap();
    let containerd = std::fs::read_to_string(&w.containerd).unwrap();
    assert!(containerd.contains(&format!("ConfigPath = \"{}\"", w.config.display())));
    assert!(containerd.contains("runtime_type = \"io.containerd.kata.v2\""));
    let parsed: toml::Table = toml::from_str(&containerd).unwrap();
    assert!(parsed.contains_key("plugins"));
    assert_eq!(std::fs::read_to_string(&w.config).unwrap(), e.config_toml);
    assert!(std::fs::read_to_string(&w.runtime_class)
        .unwrap()
        .contains("kind: RuntimeClass"));
}

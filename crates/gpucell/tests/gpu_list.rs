//! `gpucell gpu list` and `gpucell doctor` run as a binary against the H200 capture and
//! against small host trees built here.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hosts/h200x4-vm")
}

/// Runs gpucell with a PATH holding only a stand-in QEMU, so doctor does not depend on
/// what this machine has installed.
fn gpucell(root: &Path, args: &[&str]) -> Output {
    let bin_dir = tempfile::tempdir().unwrap();
    let qemu = bin_dir.path().join("qemu-system-x86_64");
    std::fs::write(
        &qemu,
        "#!/bin/sh\necho 'QEMU emulator version 7.2.19 (test)'\n",
    )
    .unwrap();
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    Command::new(env!("CARGO_BIN_EXE_gpucell"))
        .arg("--host-root")
        .arg(root)
        .args(args)
        .env("PATH", bin_dir.path())
        .env_remove("GPUCELL_HOST_ROOT")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

fn link(root: &Path, rel: &str, target: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    symlink(target, p).unwrap();
}

/// A PCI function at `sys/devices/pci0000:01/<bdf>` with the kernel's links.
fn function(
    root: &Path,
    bdf: &str,
    id: (&str, &str),
    class: &str,
    driver: &str,
    group: u32,
    resource: &str,
) {
    let dir = format!("sys/devices/pci0000:01/{bdf}");
    for (name, value) in [
        ("vendor", id.0),
        ("device", id.1),
        ("class", class),
        ("numa_node", "0"),
        ("reset_method", "flr bus"),
        ("driver_override", "(null)"),
        ("resource", resource),
    ] {
        write(root, &format!("{dir}/{name}"), &format!("{value}\n"));
    }
    link(
        root,
        &format!("sys/bus/pci/devices/{bdf}"),
        &format!("../../../devices/pci0000:01/{bdf}"),
    );
    link(
        root,
        &format!("{dir}/driver"),
        &format!("../../../bus/pci/drivers/{driver}"),
    );
    link(
        root,
        &format!("sys/bus/pci/drivers/{driver}/{bdf}"),
        &format!("../../../../devices/pci0000:01/{bdf}"),
    );
    link(
        root,
        &format!("{dir}/iommu_group"),
        &format!("../../../kernel/iommu_groups/{group}"),
    );
    link(
        root,
        &format!("sys/kernel/iommu_groups/{group}/devices/{bdf}"),
        &format!("../../../../devices/pci0000:01/{bdf}"),
    );
}

/// A bare-metal Intel host with an RTX 4090 and its audio function in IOMMU group 12.
fn rtx4090_host(gpu_driver: &str, audio_driver: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    write(r, "proc/cpuinfo", "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vmx lm\naddress sizes\t: 46 bits physical, 48 bits virtual\n");
    write(
        r,
        "proc/cmdline",
        "root=/dev/sda1 ro intel_iommu=on iommu=pt\n",
    );
    write(
        r,
        "proc/interrupts",
        " 24: 10 IR-PCI-MSI 65536-edge nvme0q0\n",
    );
    write(r, "sys/class/iommu/dmar0/intel-iommu/ecap", "f050da\n");
    for m in ["vfio", "vfio_pci", "vfio_iommu_type1"] {
        std::fs::create_dir_all(r.join("sys/module").join(m)).unwrap();
    }
    write(r, "dev/kvm", "");
    write(r, "dev/vfio/vfio", "");
    write(
        r,
        "sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages",
        "16\n",
    );
    write(
        r,
        "sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages",
        "16\n",
    );
    let gpu_res = "0x00000000fb000000 0x00000000fbffffff 0x0000000000040200\n\
                   0x0000002000000000 0x00000027ffffffff 0x000000000014220c\n\
                   0x0 0x0 0x0\n0x0000002800000000 0x0000002801ffffff 0x000000000014220c\n";
    function(
        r,
        "0000:01:00.0",
        ("0x10de", "0x2684"),
        "0x030000",
        gpu_driver,
        12,
        gpu_res,
    );
    function(
        r,
        "0000:01:00.1",
        ("0x10de", "0x22ba"),
        "0x040300",
        audio_driver,
        12,
        "0x00000000fc080000 0x00000000fc083fff 0x0000000000040200\n",
    );
    dir
}

#[test]
fn gpu_list_on_the_h200_capture() {
    let out = gpucell(&fixture(), &["gpu", "list"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("0000:00:0") && l.contains("H200"))
        .collect();
    assert_eq!(rows.len(), 4, "{text}");
    for r in rows {
        for want in [
            "H200 SXM 141GB",
            "10de:2335",
            "Hopper",
            "256 GiB",
            "nvidia",
            "flr",
            "no-iommu",
        ] {
            assert!(r.contains(want), "{want} missing in {r}");
        }
    }
    assert!(text.starts_with("BDF"), "{text}");
}

#[test]
fn gpu_list_json_on_the_h200_capture() {
    let out = gpucell(&fixture(), &["--json", "gpu", "list"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["schema"], "gpucell.gpu-list/v1");
    assert_eq!(v["iommu_groups_present"], false);
    let gpus = v["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 4);
    assert_eq!(gpus[0]["bdf"], "0000:00:06.0");
    assert_eq!(gpus[0]["name"], "GH100 [H200 SXM 141GB]");
    assert_eq!(gpus[0]["largest_bar"]["bytes"], 274877906944u64);
    assert_eq!(gpus[0]["largest_bar"]["human"], "256 GiB");
    assert_eq!(gpus[0]["passthrough"]["state"], "no-iommu");
    assert_eq!(gpus[0]["reset_methods"][0], "flr");
    assert!(gpus[0]["numa_node"].is_null());
}

#[test]
fn gpu_list_on_built_hosts() {
    let host = rtx4090_host("vfio-pci", "vfio-pci");
    let text = stdout(&gpucell(host.path(), &["gpu", "list"]));
    let row = text
        .lines()
        .find(|l| l.starts_with("0000:01:00.0"))
        .unwrap();
    for want in [
        "GeForce RTX 4090",
        "Ada",
        "32 GiB",
        "12",
        "01:00.1(audio)",
        "vfio-pci",
        "ready",
    ] {
        assert!(
            row.contains(want),
            "{want} missing in {row}\n{}",
            stdout(&gpucell(host.path(), &["--json", "gpu", "list"]))
        );
    }

    let host = rtx4090_host("nvidia", "snd_hda_intel");
    let out = gpucell(host.path(), &["--json", "gpu", "list"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let p = &v["gpus"][0]["passthrough"];
    assert_eq!(p["state"], "needs-bind");
    let drivers: Vec<&str> = p["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["driver"].as_str().unwrap())
        .collect();
    assert_eq!(drivers, ["nvidia", "snd_hda_intel"]);
    let text = stdout(&gpucell(host.path(), &["gpu", "list"]));
    assert!(text.contains("gpucell gpu bind 0000:01:00.0"), "{text}");
}

#[test]
fn acs_override_warns_on_stderr() {
    let host = rtx4090_host("vfio-pci", "vfio-pci");
    write(
        host.path(),
        "proc/cmdline",
        "intel_iommu=on pcie_acs_override=downstream,multifunction\n",
    );
    let out = gpucell(host.path(), &["gpu", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pcie_acs_override=downstream,multifunction"),
        "{err}"
    );
}

#[test]
fn doctor_exit_codes() {
    // The capture has no IOMMU: not ready.
    let out = gpucell(&fixture(), &["doctor"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains("✗ IOMMU"), "{text}");
    assert!(text.contains("not ready"), "{text}");

    let out = gpucell(&fixture(), &["--json", "doctor"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["schema"], "gpucell.doctor/v1");
    assert_eq!(v["ready"], false);
    let iommu = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "iommu")
        .unwrap();
    assert_eq!(iommu["status"], "fail");
    assert!(iommu["fix"].as_str().unwrap().contains("iommu"));

    // A host with everything in place: ready (warnings only, e.g. the KVM probe not run).
    let host = rtx4090_host("vfio-pci", "vfio-pci");
    let out = gpucell(host.path(), &["doctor"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("✓ QEMU"), "{}", stdout(&out));
    let out = gpucell(host.path(), &["--json", "doctor"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["ready"], true);
    let kvm = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "kvm")
        .unwrap();
    assert!(
        kvm["detail"]
            .as_str()
            .unwrap()
            .contains("--host-root is not this machine"),
        "{kvm}"
    );

    // Doctor itself cannot run.
    let out = gpucell(Path::new("/nonexistent/gpucell-root"), &["doctor"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/gpucell-root"));
}

#[test]
fn degraded_link_is_pointed_out() {
    let host = rtx4090_host("vfio-pci", "vfio-pci");
    let dir = "sys/devices/pci0000:01/0000:01:00.0";
    write(host.path(), &format!("{dir}/max_link_width"), "16\n");
    write(host.path(), &format!("{dir}/current_link_width"), "16\n");
    let text = stdout(&gpucell(host.path(), &["gpu", "list"]));
    assert!(!text.contains("PCIe link runs at"), "{text}");
    write(host.path(), &format!("{dir}/current_link_width"), "8\n");
    let text = stdout(&gpucell(host.path(), &["gpu", "list"]));
    assert!(
        text.contains("0000:01:00.0: PCIe link runs at x8 of x16"),
        "{text}"
    );
}

//! `gpu bind` / `gpu unbind` write sequences on fake host trees, with a simulated kernel
//! that moves `driver` links the way the real one does.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use gpucell_host::bind::{self, record, Action, BindError, SimulatedKernel, Targets};
use gpucell_host::pci::{Driver, PciFunction};
use gpucell_host::testing::{FakeFunction, FakeHost};
use gpucell_host::{Bdf, HostRoot};

const GPU: &str = "0000:01:00.0";
const AUDIO: &str = "0000:01:00.1";
const BRIDGE: &str = "0000:00:01.0";

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// A root port and an RTX 4090 with its audio function, all in IOMMU group 12, the GPU on
/// nvidia and the audio on snd_hda_intel; vfio-pci loaded.
fn host() -> FakeHost {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.add(&FakeFunction::root_port(BRIDGE).iommu_group(12))
        .unwrap();
    host.add(
        &FakeFunction::rtx4090(GPU)
            .behind(BRIDGE)
            .driver("nvidia")
            .iommu_group(12),
    )
    .unwrap();
    host.add(
        &FakeFunction::rtx4090_audio(AUDIO)
            .behind(BRIDGE)
            .driver("snd_hda_intel")
            .iommu_group(12),
    )
    .unwrap();
    host.mkdir("sys/bus/pci/drivers/vfio-pci").unwrap();
    host
}

fn kernel(host: &FakeHost) -> SimulatedKernel {
    SimulatedKernel::new(host.root())
        .native_driver(bdf(GPU), "nvidia")
        .native_driver(bdf(AUDIO), "snd_hda_intel")
        .create_vfio_nodes()
}

fn driver(root: &HostRoot, b: &str) -> Driver {
    PciFunction::read(root, bdf(b)).unwrap().driver
}

fn w(path: &str, value: &str) -> (String, String) {
    (path.to_owned(), value.to_owned())
}

fn one(b: &str) -> Targets {
    Targets::Devices(vec![bdf(b)])
}

fn expected_bind_writes() -> Vec<(String, String)> {
    vec![
        w(
            "sys/bus/pci/devices/0000:01:00.0/driver_override",
            "vfio-pci",
        ),
        w("sys/bus/pci/devices/0000:01:00.0/driver/unbind", GPU),
        w("sys/bus/pci/drivers_probe", GPU),
        w(
            "sys/bus/pci/devices/0000:01:00.1/driver_override",
            "vfio-pci",
        ),
        w("sys/bus/pci/devices/0000:01:00.1/driver/unbind", AUDIO),
        w("sys/bus/pci/drivers_probe", AUDIO),
    ]
}

#[test]
fn gpu_and_audio_are_bound_with_exact_writes_and_bridge_untouched() {
    let host = host();
    let root = host.root();
    let state = tempfile::tempdir().unwrap();
    let plan = bind::plan_bind(&root, &one(GPU)).unwrap();
    assert!(plan.refusals.is_empty(), "{:?}", plan.refusals);
    assert_eq!(plan.groups.len(), 1);
    assert_eq!(plan.groups[0].bridges, [bdf(BRIDGE)]);
    let mut k = kernel(&host);
    let outcome = bind::execute_bind(&root, state.path(), &plan, &mut k).unwrap();
    assert_eq!(k.relative_writes(), expected_bind_writes());
    assert_eq!(outcome.changed, [bdf(GPU), bdf(AUDIO)]);
    assert!(outcome.warnings.is_empty(), "{:?}", outcome.warnings);
    assert_eq!(driver(&root, GPU), Driver::Bound("vfio-pci".into()));
    assert_eq!(driver(&root, AUDIO), Driver::Bound("vfio-pci".into()));
    assert_eq!(driver(&root, BRIDGE), Driver::Bound("pcieport".into()));
    let rec = record::load(state.path(), bdf(GPU)).unwrap().unwrap();
    assert_eq!(rec.previous_driver.as_deref(), Some("nvidia"));
    assert_eq!(rec.previous_override, None);
    let rec = record::load(state.path(), bdf(AUDIO)).unwrap().unwrap();
    assert_eq!(rec.previous_driver.as_deref(), Some("snd_hda_intel"));
    // Naming the audio function instead binds the same group the same way.
    let plan = bind::plan_bind(&root, &one(AUDIO)).unwrap();
    assert_eq!(plan.writes().count(), 0);
}

#[test]
fn already_on_vfio_pci_means_no_writes() {
    let host = host();
    let root = host.root();
    let state = tempfile::tempdir().unwrap();
    let plan = bind::plan_bind(&root, &one(GPU)).unwrap();
    bind::execute_bind(&root, state.path(), &plan, &mut kernel(&host)).unwrap();
    let again = bind::plan_bind(&root, &Targets::All).unwrap();
    assert!(again.groups[0]
        .endpoints
        .iter()
        .all(|e| e.action == Action::AlreadyBound));
    let mut k = kernel(&host);
    let outcome = bind::execute_bind(&root, state.path(), &again, &mut k).unwrap();
    assert!(k.writes.is_empty());
    assert!(outcome.changed.is_empty());
    // The records still hold the drivers from before the first bind.
    let rec = record::load(state.path(), bdf(GPU)).unwrap().unwrap();
    assert_eq!(rec.previous_driver.as_deref(), Some("nvidia"));
}

#[test]
fn on_vfio_pci_without_override_only_sets_the_override() {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.add(
        &FakeFunction::h100("0000:41:00.0")
            .driver("vfio-pci")
            .iommu_group(3),
    )
    .unwrap();
    let root = host.root();
    let plan = bind::plan_bind(&root, &one("0000:41:00.0")).unwrap();
    let writes: Vec<_> = plan.writes().map(|w| w.value.clone()).collect();
    assert_eq!(writes, ["vfio-pci"]);
    assert!(plan.writes().all(|w| w.path.ends_with("driver_override")));
}

#[test]
fn unrelated_group_member_is_bound_too_but_not_when_in_use() {
    let host = host();
    host.add(
        &FakeFunction::nvme("0000:01:00.2")
            .behind(BRIDGE)
            .driver("nvme")
            .iommu_group(12),
    )
    .unwrap();
    let root = host.root();
    let plan = bind::plan_bind(&root, &one(GPU)).unwrap();
    assert!(plan.refusals.is_empty());
    let nvme = plan.groups[0]
        .endpoints
        .iter()
        .find(|e| e.bdf == bdf("0000:01:00.2"))
        .unwrap();
    let rel: Vec<String> = nvme
        .writes
        .iter()
        .map(|w| {
            w.path
                .strip_prefix(host.path())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        rel,
        [
            "sys/bus/pci/devices/0000:01:00.2/driver_override",
            "sys/bus/pci/devices/0000:01:00.2/driver/unbind",
            "sys/bus/pci/drivers_probe"
        ]
    );

    // With a namespace below it, the NVMe holds host storage: refused, nothing written.
    let dir = host.function_rel_dir(bdf("0000:01:00.2"));
    host.mkdir(&format!("{dir}/nvme/nvme0/nvme0n1")).unwrap();
    let plan = bind::plan_bind(&root, &one(GPU)).unwrap();
    assert_eq!(plan.refusals.len(), 1);
    let msg = plan.refusals[0].to_string();
    assert!(
        msg.contains("0000:01:00.2") && msg.contains("nvme0n1"),
        "{msg}"
    );
    let state = tempfile::tempdir().unwrap();
    let mut k = kernel(&host);
    let err = bind::execute_bind(&root, state.path(), &plan, &mut k).unwrap_err();
    assert!(matches!(err, BindError::Refused { .. }));
    assert!(err.to_string().contains("nvme0n1"), "{err}");
    assert!(k.writes.is_empty());
    assert!(record::recorded(state.path()).unwrap().is_empty());

    // A network interface that is up is a holder too.
    std::fs::remove_dir_all(host.join(&format!("{dir}/nvme"))).unwrap();
    host.write(&format!("{dir}/net/enp1s0f2/operstate"), "up\n")
        .unwrap();
    let plan = bind::plan_bind(&root, &one(GPU)).unwrap();
    assert!(
        plan.refusals[0].to_string().contains("enp1s0f2"),
        "{:?}",
        plan.refusals
    );
    host.write(&format!("{dir}/net/enp1s0f2/operstate"), "down\n")
        .unwrap();
    assert!(bind::plan_bind(&root, &one(GPU))
        .unwrap()
        .refusals
        .is_empty());
}

#[test]
fn displays_are_refused_naming_them() {
    let host = host();
    let root = host.root();
    let dir = host.function_rel_dir(bdf(GPU));
    host.write(
        &format!("{dir}/drm/card0/card0-HDMI-A-1/status"),
        "connected\n",
    )
    .unwrap();
    host.write(
        &format!("{dir}/drm/card0/card0-DP-1/status"),
        "disconnected\n",
    )
    .unwrap();
    let plan = bind::plan_bind(&root, &one(GPU)).unwrap();
    let msgs: Vec<String> = plan.refusals.iter().map(ToString::to_string).collect();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs[0].contains("card0-HDMI-A-1") && msgs[0].contains(GPU),
        "{msgs:?}"
    );

    host.write(
        &format!("{dir}/drm/card0/card0-HDMI-A-1/status"),
        "disconnected\n",
    )
    .unwrap();
    host.write(&format!("{dir}/boot_vga"), "1\n").unwrap();
    let plan = bind::plan_bind(&root, &Targets::All).unwrap();
    assert!(
        plan.refusals
            .iter()
            .any(|h| h.to_string().contains("boot_vga")),
        "{:?}",
        plan.refusals
    );
    let state = tempfile::tempdir().unwrap();
    let mut k = kernel(&host);
    assert!(bind::execute_bind(&root, state.path(), &plan, &mut k).is_err());
    assert!(k.writes.is_empty());
    assert_eq!(driver(&root, GPU), Driver::Bound("nvidia".into()));
}

#[test]
fn processes_with_the_gpu_open_are_named() {
    let host = host();
    let root = host.root();
    host.write(
        &format!("proc/driver/nvidia/gpus/{GPU}/information"),
        "Model: \t\t NVIDIA GeForce RTX 4090\nIRQ:   \t\t 180\nDevice Minor: \t 3\n",
    )
    .unwrap();
    host.write("proc/4242/comm", "python3\n").unwrap();
    host.symlink("proc/4242/fd/7", "/dev/nvidia3").unwrap();
    host.symlink("proc/4242/fd/8", "/dev/nvidiactl").unwrap();
    host.write("proc/77/comm", "bash\n").unwrap();
    host.symlink("proc/77/fd/0", "/dev/pts/0").unwrap();
    host.write("proc/88/comm", "other-job\n").unwrap();
    host.symlink("proc/88/fd/3", "/dev/nvidia0").unwrap();
    let plan = bind::plan_bind(&root, &one(GPU)).unwrap();
    let msgs: Vec<String> = plan.refusals.iter().map(ToString::to_string).collect();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs[0].contains("4242") && msgs[0].contains("python3") && msgs[0].contains("/dev/nvidia3")
    );
}

#[test]
fn nvidia_module_users_refuse_when_procfs_says_nothing() {
    let host = host();
    let root = host.root();
    host.write("sys/module/nvidia/refcnt", "3\n").unwrap();
    host.mkdir("sys/module/nvidia/holders/nvidia_modeset")
        .unwrap();
    host.mkdir("sys/module/nvidia/holders/nvidia_uvm").unwrap();
    let plan = bind::plan_bind(&root, &one(GPU)).unwrap();
    assert_eq!(plan.refusals.len(), 1);
    assert!(
        plan.refusals[0].to_string().contains("1 user"),
        "{}",
        plan.refusals[0]
    );
    // Only dependent modules: not in use.
    host.write("sys/module/nvidia/refcnt", "2\n").unwrap();
    assert!(bind::plan_bind(&root, &one(GPU))
        .unwrap()
        .refusals
        .is_empty());
}

#[test]
fn unbind_restores_the_recorded_drivers() {
    let host = host();
    let root = host.root();
    let state = tempfile::tempdir().unwrap();
    let plan = bind::plan_bind(&root, &one(GPU)).unwrap();
    bind::execute_bind(&root, state.path(), &plan, &mut kernel(&host)).unwrap();

    let plan = bind::plan_unbind(&root, state.path(), &one(GPU)).unwrap();
    let mut k = kernel(&host);
    let outcome = bind::execute_unbind(&root, state.path(), &plan, &mut k).unwrap();
    assert_eq!(
        k.relative_writes(),
        [
            w("sys/bus/pci/devices/0000:01:00.0/driver_override", ""),
            w("sys/bus/pci/devices/0000:01:00.0/driver/unbind", GPU),
            w("sys/bus/pci/drivers/nvidia/bind", GPU),
            w("sys/bus/pci/devices/0000:01:00.1/driver_override", ""),
            w("sys/bus/pci/devices/0000:01:00.1/driver/unbind", AUDIO),
            w("sys/bus/pci/drivers/snd_hda_intel/bind", AUDIO),
        ]
    );
    assert!(outcome.warnings.is_empty(), "{:?}", outcome.warnings);
    assert_eq!(driver(&root, GPU), Driver::Bound("nvidia".into()));
    assert_eq!(driver(&root, AUDIO), Driver::Bound("snd_hda_intel".into()));
    let f = PciFunction::read(&root, bdf(GPU)).unwrap();
    assert_eq!(f.driver_override, None);
    assert!(record::recorded(state.path()).unwrap().is_empty());
    // A second unbind has nothing to do.
    let plan = bind::plan_unbind(&root, state.path(), &one(GPU)).unwrap();
    assert_eq!(plan.writes().count(), 0);
}

#[test]
fn unbind_without_record_clears_override_and_reprobes() {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.add(
        &FakeFunction::h100("0000:41:00.0")
            .driver("vfio-pci")
            .driver_override("vfio-pci")
            .iommu_group(3),
    )
    .unwrap();
    host.mkdir("sys/bus/pci/drivers/nvidia").unwrap();
    let root = host.root();
    let state = tempfile::tempdir().unwrap();
    let plan = bind::plan_unbind(&root, state.path(), &Targets::All).unwrap();
    let mut k = SimulatedKernel::new(root.clone()).native_driver(bdf("0000:41:00.0"), "nvidia");
    bind::execute_unbind(&root, state.path(), &plan, &mut k).unwrap();
    assert_eq!(
        k.relative_writes(),
        [
            w("sys/bus/pci/devices/0000:41:00.0/driver_override", ""),
            w(
                "sys/bus/pci/devices/0000:41:00.0/driver/unbind",
                "0000:41:00.0"
            ),
            w("sys/bus/pci/drivers_probe", "0000:41:00.0"),
        ]
    );
    assert_eq!(
        driver(&root, "0000:41:00.0"),
        Driver::Bound("nvidia".into())
    );
}

#[test]
fn unbind_is_refused_while_a_vm_holds_the_group() {
    let host = host();
    let root = host.root();
    let state = tempfile::tempdir().unwrap();
    let plan = bind::plan_bind(&root, &one(GPU)).unwrap();
    bind::execute_bind(&root, state.path(), &plan, &mut kernel(&host)).unwrap();
    host.write("proc/900/comm", "qemu-system-x86\n").unwrap();
    host.symlink("proc/900/fd/20", "/dev/vfio/12").unwrap();
    let plan = bind::plan_unbind(&root, state.path(), &one(GPU)).unwrap();
    assert!(!plan.refusals.is_empty());
    let mut k = kernel(&host);
    let err = bind::execute_unbind(&root, state.path(), &plan, &mut k).unwrap_err();
    assert!(err.to_string().contains("qemu-system-x86"), "{err}");
    assert!(k.writes.is_empty());
}

#[test]
fn planning_alone_writes_nothing() {
    let host = host();
    let root = host.root();
    let before = snapshot(host.path());
    let plan = bind::plan_bind(&root, &one(GPU)).unwrap();
    assert_eq!(plan.writes().count(), 6);
    assert_eq!(snapshot(host.path()), before);
    assert_eq!(
        plan.writes().next().unwrap().to_string(),
        format!(
            "echo vfio-pci > {}/sys/bus/pci/devices/{GPU}/driver_override",
            host.path().display()
        )
    );
}

/// Every path under `dir` with its link target or content.
fn snapshot(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let t = e.file_type().unwrap();
            let v = if t.is_symlink() {
                std::fs::read_link(&p).unwrap().display().to_string()
            } else if t.is_dir() {
                stack.push(p.clone());
                "dir".into()
            } else {
                std::fs::read_to_string(&p).unwrap_or_default()
            };
            out.push((p.display().to_string(), v));
        }
    }
    out.sort();
    out
}

#[test]
fn bad_targets_give_clear_errors() {
    let host = host();
    let root = host.root();
    let err = bind::plan_bind(&root, &one("0000:09:00.0")).unwrap_err();
    assert!(
        err.to_string().contains("no PCI function 0000:09:00.0"),
        "{err}"
    );
    let err = bind::plan_bind(&root, &one(BRIDGE)).unwrap_err();
    assert!(
        matches!(err, BindError::Bridge { .. }) && err.to_string().contains(BRIDGE),
        "{err}"
    );
    assert!("0000:01:00".parse::<Bdf>().is_err());

    let no_iommu = FakeHost::new().unwrap();
    no_iommu
        .add(&FakeFunction::rtx4090(GPU).driver("nvidia"))
        .unwrap();
    let err = bind::plan_bind(&no_iommu.root(), &one(GPU)).unwrap_err();
    assert!(
        matches!(err, BindError::NoGroup { .. }) && err.to_string().contains("IOMMU is off"),
        "{err}"
    );

    let empty = FakeHost::bare_metal_intel().unwrap();
    assert!(matches!(
        bind::plan_bind(&empty.root(), &Targets::All),
        Err(BindError::NoGpus { .. })
    ));

    std::fs::remove_dir(host.join("sys/bus/pci/drivers/vfio-pci")).unwrap();
    let err = bind::plan_bind(&root, &one(GPU)).unwrap_err();
    assert!(
        matches!(err, BindError::VfioNotLoaded { .. })
            && err.to_string().contains("modprobe vfio-pci"),
        "{err}"
    );
}

#[test]
fn a_failed_write_stops_and_leaves_a_record_to_undo_with() {
    let host = host();
    let root = host.root();
    let state = tempfile::tempdir().unwrap();
    let plan = bind::plan_bind(&root, &one(GPU)).unwrap();
    let failing = host.join("sys/bus/pci/drivers_probe");
    let mut k = kernel(&host).fail_on(failing.clone());
    let err = bind::execute_bind(&root, state.path(), &plan, &mut k).unwrap_err();
    assert!(
        err.to_string().contains(&failing.display().to_string()),
        "{err}"
    );
    assert_eq!(k.writes.len(), 3, "stopped at the first failure");
    assert_eq!(driver(&root, GPU), Driver::Unbound);
    // The record lets unbind put the GPU back on nvidia.
    let plan = bind::plan_unbind(&root, state.path(), &one(GPU)).unwrap();
    bind::execute_unbind(&root, state.path(), &plan, &mut kernel(&host)).unwrap();
    assert_eq!(driver(&root, GPU), Driver::Bound("nvidia".into()));
}

#[test]
fn missing_vfio_node_is_a_warning() {
    let host = host();
    let root = host.root();
    let state = tempfile::tempdir().unwrap();
    let plan = bind::plan_bind(&root, &one(GPU)).unwrap();
    let mut k = SimulatedKernel::new(root.clone());
    let outcome = bind::execute_bind(&root, state.path(), &plan, &mut k).unwrap();
    assert!(
        outcome.warnings.iter().any(|w| w.contains("dev/vfio/12")),
        "{:?}",
        outcome.warnings
    );
}

#[test]
fn damaged_records_are_refused() {
    let host = host();
    let root = host.root();
    let state = tempfile::tempdir().unwrap();
    let plan = bind::plan_bind(&root, &one(GPU)).unwrap();
    bind::execute_bind(&root, state.path(), &plan, &mut kernel(&host)).unwrap();
    let path = record::records_dir(state.path()).join(format!("{GPU}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"nvidia\"", "\"../../x\"");
    std::fs::write(&path, text).unwrap();
    let err = bind::plan_unbind(&root, state.path(), &one(GPU)).unwrap_err();
    assert!(
        err.to_string().contains("damaged")
            && err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn sata_disks_below_a_group_member_are_holders() {
    let host = host();
    host.add(
        &FakeFunction::new("0000:01:00.3", 0x8086, 0x7ae2, 0x010601)
            .behind(BRIDGE)
            .driver("ahci")
            .iommu_group(12),
    )
    .unwrap();
    let dir = host.function_rel_dir(bdf("0000:01:00.3"));
    host.mkdir(&format!(
        "{dir}/ata1/host0/target0:0:0/0:0:0:0/block/sda/sda1"
    ))
    .unwrap();
    let plan = bind::plan_bind(&host.root(), &one(GPU)).unwrap();
    let msgs: Vec<String> = plan.refusals.iter().map(ToString::to_string).collect();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs[0].contains("0000:01:00.3") && msgs[0].contains("block device sda"),
        "{msgs:?}"
    );
}

#[test]
fn two_functions_of_one_group_make_one_group_plan() {
    let host = host();
    let plan = bind::plan_bind(
        &host.root(),
        &Targets::Devices(vec![bdf(AUDIO), bdf(GPU), bdf(GPU)]),
    )
    .unwrap();
    assert_eq!(plan.groups.len(), 1);
    assert_eq!(plan.groups[0].requested, [bdf(GPU), bdf(AUDIO)]);
    assert_eq!(plan.writes().count(), 6);
}

#[test]
fn unbind_to_a_driver_no_longer_loaded_reprobes_with_a_warning() {
    let host = host();
    let root = host.root();
    let state = tempfile::tempdir().unwrap();
    let plan = bind::plan_bind(&root, &one(GPU)).unwrap();
    bind::execute_bind(&root, state.path(), &plan, &mut kernel(&host)).unwrap();
    std::fs::remove_dir_all(host.join("sys/bus/pci/drivers/snd_hda_intel")).unwrap();
    let plan = bind::plan_unbind(&root, state.path(), &one(GPU)).unwrap();
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.contains("snd_hda_intel") && w.contains("not loaded")),
        "{:?}",
        plan.warnings
    );
    let audio = plan.groups[0]
        .endpoints
        .iter()
        .find(|e| e.bdf == bdf(AUDIO))
        .unwrap();
    let last = audio.writes.last().unwrap();
    assert!(
        last.path.ends_with("sys/bus/pci/drivers_probe") && last.value == AUDIO,
        "{last}"
    );
}

#[test]
fn unbind_all_with_nothing_bound_is_a_no_op() {
    let host = FakeHost::bare_metal_intel().unwrap();
    let state = tempfile::tempdir().unwrap();
    let plan = bind::plan_unbind(&host.root(), state.path(), &Targets::All).unwrap();
    assert!(plan.groups.is_empty() && plan.refusals.is_empty());
}

#[test]
fn retrying_a_failed_bind_keeps_the_first_record() {
    let host = host();
    let root = host.root();
    let state = tempfile::tempdir().unwrap();
    let plan = bind::plan_bind(&root, &one(GPU)).unwrap();
    let mut failing = kernel(&host).fail_on(host.join("sys/bus/pci/drivers_probe"));
    assert!(bind::execute_bind(&root, state.path(), &plan, &mut failing).is_err());
    // The GPU is now unbound with the override set; a retry must not record that.
    let plan = bind::plan_bind(&root, &one(GPU)).unwrap();
    bind::execute_bind(&root, state.path(), &plan, &mut kernel(&host)).unwrap();
    let rec = record::load(state.path(), bdf(GPU)).unwrap().unwrap();
    assert_eq!(rec.previous_driver.as_deref(), Some("nvidia"));
    assert_eq!(rec.previous_override, None);
    let plan = bind::plan_unbind(&root, state.path(), &one(GPU)).unwrap();
    bind::execute_unbind(&root, state.path(), &plan, &mut kernel(&host)).unwrap();
    assert_eq!(driver(&root, GPU), Driver::Bound("nvidia".into()));
}

#[test]
fn a_vfio_override_left_by_the_boot_rule_is_not_restored() {
    let host = FakeHost::bare_metal_intel().unwrap();
    let h100 = "0000:41:00.0";
    host.add(
        &FakeFunction::h100(h100)
            .driver("nvidia")
            .driver_override("vfio-pci")
            .iommu_group(3),
    )
    .unwrap();
    host.mkdir("sys/bus/pci/drivers/vfio-pci").unwrap();
    let root = host.root();
    let state = tempfile::tempdir().unwrap();
    let plan = bind::plan_bind(&root, &one(h100)).unwrap();
    let mut k = SimulatedKernel::new(root.clone());
    bind::execute_bind(&root, state.path(), &plan, &mut k).unwrap();
    let rec = record::load(state.path(), bdf(h100)).unwrap().unwrap();
    assert_eq!(rec.previous_override, None);
    let plan = bind::plan_unbind(&root, state.path(), &one(h100)).unwrap();
    bind::execute_unbind(
        &root,
        state.path(),
        &plan,
        &mut SimulatedKernel::new(root.clone()),
    )
    .unwrap();
    assert_eq!(driver(&root, h100), Driver::Bound("nvidia".into()));
    assert_eq!(
        PciFunction::read(&root, bdf(h100)).unwrap().driver_override,
        None
    );
}

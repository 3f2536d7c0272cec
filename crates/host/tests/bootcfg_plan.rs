//! `host plan` rendering (golden files under tests/golden/, regenerated with
//! `GPUCELL_UPDATE_GOLDEN=1`) and `host apply` on a temporary target root.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use gpucell_host::bootcfg::{self, BindingMode, BootCfgError, FileAction, PlanRequest, Selection};
use gpucell_host::testing::{FakeFunction, FakeHost};
use gpucell_host::{Bdf, HostRoot};

const DEBIAN_GRUB: &str = "# If you change this file, run 'update-grub' afterwards to update
# /boot/grub/grub.cfg.

GRUB_DEFAULT=0
GRUB_TIMEOUT=5
GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`
GRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"
GRUB_CMDLINE_LINUX=\"\"
";

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// An Intel workstation-class host booted without the IOMMU parameters: an RTX 4090 with
/// its audio function in group 12 on nvidia/snd_hda_intel, an H100 alone in group 13.
fn host() -> FakeHost {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.cmdline("BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet")
        .unwrap();
    host.add(&FakeFunction::root_port("0000:00:01.0").iommu_group(12))
        .unwrap();
    host.add(
        &FakeFunction::rtx4090("0000:01:00.0")
            .behind("0000:00:01.0")
            .driver("nvidia")
            .iommu_group(12),
    )
    .unwrap();
    host.add(
        &FakeFunction::rtx4090_audio("0000:01:00.1")
            .behind("0000:00:01.0")
            .driver("snd_hda_intel")
            .iommu_group(12),
    )
    .unwrap();
    host.add(
        &FakeFunction::h100("0000:41:00.0")
            .driver("nvidia")
            .iommu_group(13),
    )
    .unwrap();
    host.write("etc/default/grub", DEBIAN_GRUB).unwrap();
    std::fs::set_permissions(
        host.join("etc/default/grub"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    host
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn check_golden(name: &str, actual: &str) {
    let path = golden_dir().join(name);
    if std::env::var_os("GPUCELL_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with GPUCELL_UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert_eq!(
        actual,
        expected,
        "{} differs; GPUCELL_UPDATE_GOLDEN=1 regenerates it",
        path.display()
    );
}

fn request(selection: Selection, mode: BindingMode) -> PlanRequest {
    PlanRequest { selection, mode }
}

fn file_name(p: &Path) -> String {
    p.to_string_lossy()
        .trim_start_matches('/')
        .replace('/', "_")
}

/// Every rendered file and diff of a plan, and its JSON with the temporary root hidden.
fn check_plan_golden(case: &str, host: &FakeHost, req: &PlanRequest) {
    let root = host.root();
    let plan = bootcfg::plan(&root, &root, req).unwrap();
    for f in &plan.files {
        check_golden(&format!("{case}/{}", file_name(&f.path)), &f.content);
        check_golden(&format!("{case}/{}.diff", file_name(&f.path)), &f.diff);
    }
    let json = serde_json::to_string_pretty(&plan).unwrap();
    let json = json.replace(&host.path().display().to_string(), "<root>");
    check_golden(&format!("{case}/plan.json"), &(json + "\n"));
}

#[test]
fn golden_all_gpus_udev_mode() {
    let host = host();
    check_plan_golden(
        "all-udev",
        &host,
        &request(Selection::All, BindingMode::Udev),
    );
}

#[test]
fn golden_one_gpu_ids_mode() {
    let host = host();
    check_plan_golden(
        "one-ids",
        &host,
        &request(Selection::Gpus(vec![bdf("0000:01:00.0")]), BindingMode::Ids),
    );
}

#[test]
fn golden_no_selection() {
    let host = host();
    check_plan_golden("none", &host, &request(Selection::None, BindingMode::Udev));
}

#[test]
fn plan_contents_are_what_the_issue_asks_for() {
    let host = host();
    let root = host.root();
    let plan = bootcfg::plan(&root, &root, &request(Selection::All, BindingMode::Udev)).unwrap();
    let get = |p: &str| plan.files.iter().find(|f| f.path == Path::new(p)).unwrap();
    let udev = &get("/etc/udev/rules.d/80-gpucell-vfio.rules").content;
    for b in ["0000:01:00.0", "0000:01:00.1", "0000:41:00.0"] {
        assert!(udev.contains(&format!(
            "ACTION==\"add\", SUBSYSTEM==\"pci\", KERNEL==\"{b}\", ATTR{{driver_override}}=\"vfio-pci\""
        )));
    }
    for b in ["0000:01:00.0", "0000:01:00.1", "0000:41:00.0"] {
        let rebind = format!(
            "ACTION==\"add\", SUBSYSTEM==\"pci\", KERNEL==\"{b}\", DRIVER==\"?*\", DRIVER!=\"vfio-pci\", \
             RUN+=\"/bin/sh -c 'echo {b} > /sys/bus/pci/devices/{b}/driver/unbind; echo {b} > /sys/bus/pci/drivers_probe'\"\n"
        );
        assert!(udev.contains(&rebind), "{udev}");
    }
    assert!(!udev.contains("0000:00:01.0"), "the bridge is not bound");
    let modprobe = &get("/etc/modprobe.d/gpucell-vfio.conf").content;
    assert!(modprobe.contains("softdep nvidia pre: vfio-pci\nsoftdep nouveau pre: vfio-pci\nsoftdep snd_hda_intel pre: vfio-pci\n"));
    assert!(!modprobe.contains("options vfio-pci ids"));
    assert_eq!(
        get("/etc/modules-load.d/gpucell-vfio.conf")
            .content
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>(),
        ["vfio", "vfio_iommu_type1", "vfio_pci"]
    );
    assert!(get("/etc/default/grub")
        .content
        .contains("GRUB_CMDLINE_LINUX_DEFAULT=\"quiet intel_iommu=on iommu=pt\""));
    let steps: Vec<&str> = plan.steps.iter().map(|s| s.command.as_str()).collect();
    assert_eq!(steps, ["update-grub", "update-initramfs -u", "reboot"]);
}

#[test]
fn amd_host_and_ids_mode() {
    let host = host();
    host.cpuinfo("AuthenticAMD", "svm", 2, 48).unwrap();
    let root = host.root();
    let plan = bootcfg::plan(
        &root,
        &root,
        &request(
            Selection::Gpus(vec![bdf("0000:01:00.0"), bdf("0000:41:00.0")]),
            BindingMode::Ids,
        ),
    )
    .unwrap();
    assert_eq!(plan.kernel_params, ["amd_iommu=on", "iommu=pt"]);
    let modprobe = plan
        .files
        .iter()
        .find(|f| f.path.ends_with("modprobe.d/gpucell-vfio.conf"))
        .unwrap();
    assert!(modprobe
        .content
        .contains("options vfio-pci ids=10de:22ba,10de:2330,10de:2684\n"));
    assert!(!plan
        .files
        .iter()
        .any(|f| f.path.ends_with("80-gpucell-vfio.rules")));
}

#[test]
fn refusals_and_bad_input() {
    let host = host();
    let root = host.root();
    // A display on the GPU: explicit selection is refused, --all skips it with a warning.
    host.write(
        &format!("{}/boot_vga", host.function_rel_dir(bdf("0000:01:00.0"))),
        "1\n",
    )
    .unwrap();
    let err = bootcfg::plan(
        &root,
        &root,
        &request(
            Selection::Gpus(vec![bdf("0000:01:00.0")]),
            BindingMode::Udev,
        ),
    )
    .unwrap_err();
    assert!(matches!(err, BootCfgError::Display { .. }), "{err}");
    assert!(err.to_string().contains("boot_vga"), "{err}");
    let plan = bootcfg::plan(&root, &root, &request(Selection::All, BindingMode::Udev)).unwrap();
    assert_eq!(plan.devices.len(), 1);
    assert_eq!(plan.devices[0].gpu, bdf("0000:41:00.0"));
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.contains("skipped 0000:01:00.0")),
        "{:?}",
        plan.warnings
    );

    let err = bootcfg::plan(
        &root,
        &root,
        &request(
            Selection::Gpus(vec![bdf("0000:00:01.0")]),
            BindingMode::Udev,
        ),
    )
    .unwrap_err();
    assert!(matches!(err, BootCfgError::Bridge { .. }), "{err}");
    let err = bootcfg::plan(
        &root,
        &root,
        &request(
            Selection::Gpus(vec![bdf("0000:09:00.0")]),
            BindingMode::Udev,
        ),
    )
    .unwrap_err();
    assert!(err.to_string().contains("0000:09:00.0"), "{err}");
    assert!(matches!(
        bootcfg::plan(&root, &root, &request(Selection::None, BindingMode::Ids)),
        Err(BootCfgError::IdsWithoutGpus)
    ));
    host.cpuinfo("CentaurHauls", "", 1, 40).unwrap();
    let err =
        bootcfg::plan(&root, &root, &request(Selection::None, BindingMode::Udev)).unwrap_err();
    assert!(err.to_string().contains("CentaurHauls"), "{err}");
}

#[test]
fn without_iommu_groups_the_slot_is_used() {
    let host = FakeHost::bare_metal_intel().unwrap();
    host.add(&FakeFunction::rtx4090("0000:01:00.0").driver("nvidia"))
        .unwrap();
    host.add(&FakeFunction::rtx4090_audio("0000:01:00.1").driver("snd_hda_intel"))
        .unwrap();
    host.add(&FakeFunction::rtx4090("0000:02:00.0").driver("nvidia"))
        .unwrap();
    let root = host.root();
    let plan = bootcfg::plan(
        &root,
        &root,
        &request(
            Selection::Gpus(vec![bdf("0000:01:00.0")]),
            BindingMode::Udev,
        ),
    )
    .unwrap();
    let eps: Vec<Bdf> = plan.devices[0].endpoints.iter().map(|e| e.bdf).collect();
    assert_eq!(eps, [bdf("0000:01:00.0"), bdf("0000:01:00.1")]);
    assert!(plan.warnings.iter().any(|w| w.contains("no IOMMU group")));
    // No /etc/default/grub: nothing to merge, a warning says what to add by hand.
    assert!(!plan.files.iter().any(|f| f.path.ends_with("grub")));
    assert!(plan
        .warnings
        .iter()
        .any(|w| w.contains("intel_iommu=on iommu=pt")));
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn apply_twice_on_a_separate_target_root() {
    let host = host();
    let target_dir = tempfile::tempdir().unwrap();
    let target = HostRoot::new(target_dir.path());
    std::fs::create_dir_all(target_dir.path().join("etc/default")).unwrap();
    let grub = target_dir.path().join("etc/default/grub");
    std::fs::write(&grub, DEBIAN_GRUB).unwrap();
    std::fs::set_permissions(&grub, std::fs::Permissions::from_mode(0o600)).unwrap();
    let req = request(Selection::All, BindingMode::Udev);

    let plan = bootcfg::plan(&host.root(), &target, &req).unwrap();
    assert!(plan.changes());
    let report = bootcfg::apply(&plan).unwrap();
    assert_eq!(report.written.len(), 4);
    assert_eq!(
        report.backups,
        [target_dir.path().join("etc/default/grub.gpucell-bak")]
    );
    assert_eq!(
        std::fs::read_to_string(&report.backups[0]).unwrap(),
        DEBIAN_GRUB
    );
    assert_eq!(mode(&grub), 0o600, "an existing file keeps its mode");
    assert_eq!(mode(&report.backups[0]), 0o600);
    for rel in [
        "etc/modules-load.d/gpucell-vfio.conf",
        "etc/modprobe.d/gpucell-vfio.conf",
        "etc/udev/rules.d/80-gpucell-vfio.rules",
    ] {
        let p = target_dir.path().join(rel);
        assert_eq!(mode(&p), 0o644, "{rel}");
        let f = plan.files.iter().find(|f| f.target_path == p).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), f.content);
    }
    // The host root itself was not written.
    assert!(!host.join("etc/modprobe.d").exists());

    let again = bootcfg::plan(&host.root(), &target, &req).unwrap();
    assert!(!again.changes());
    assert!(again
        .files
        .iter()
        .all(|f| f.action == FileAction::Unchanged && f.diff.is_empty()));
    // Only the reboot remains: the fake host runs without the parameters.
    assert_eq!(
        again
            .steps
            .iter()
            .map(|s| s.command.as_str())
            .collect::<Vec<_>>(),
        ["reboot"]
    );
    let report = bootcfg::apply(&again).unwrap();
    assert!(report.written.is_empty() && report.backups.is_empty());
    // No temporary files were left behind.
    for dir in [
        "etc/default",
        "etc/modprobe.d",
        "etc/modules-load.d",
        "etc/udev/rules.d",
    ] {
        for e in std::fs::read_dir(target_dir.path().join(dir)).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(!name.contains("gpucell-tmp"), "{dir}/{name}");
        }
    }
}

#[test]
fn apply_refuses_a_file_changed_since_planning() {
    let host = host();
    let root = host.root();
    let plan = bootcfg::plan(&root, &root, &request(Selection::None, BindingMode::Udev)).unwrap();
    host.write(
        "etc/default/grub",
        "GRUB_CMDLINE_LINUX_DEFAULT=\"splash\"\n",
    )
    .unwrap();
    let err = bootcfg::apply(&plan).unwrap_err();
    assert!(matches!(err, BootCfgError::Changed { .. }), "{err}");
    assert_eq!(
        std::fs::read_to_string(host.join("etc/default/grub")).unwrap(),
        "GRUB_CMDLINE_LINUX_DEFAULT=\"splash\"\n"
    );
}

#[test]
fn grub_dropins_that_override_are_reported() {
    let host = host();
    host.write(
        "etc/default/grub.d/50-cloudimg-settings.cfg",
        "GRUB_CMDLINE_LINUX_DEFAULT=\"console=tty1 console=ttyS0\"\n",
    )
    .unwrap();
    let root = host.root();
    let plan = bootcfg::plan(&root, &root, &request(Selection::None, BindingMode::Udev)).unwrap();
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.contains("50-cloudimg-settings.cfg")
                && w.contains(bootcfg::grub::VAR_DEFAULT)),
        "{:?}",
        plan.warnings
    );
}

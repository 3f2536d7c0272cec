//! Bring-up and self-test against a fake system.

use super::*;
use std::collections::BTreeMap;

const INFO: &str = r#"{"flavour":"nvidia-550","version":"550.163.01","module_kind":"open",
    "kernel_release":"6.1.0-57-amd64",
    "modules":["lib/modules/6.1.0-57-amd64/drm.ko","lib/modules/6.1.0-57-amd64/nvidia.ko","lib/modules/6.1.0-57-amd64/nvidia-uvm.ko"],
    "firmware_dir":"lib/firmware","cuda":"12.4","lib_dir":"usr/lib","bin_dir":"usr/bin",
    "loader":"usr/lib/ld-linux-x86-64.so.2"}"#;

const PROC_DEVICES: &str = "Character devices:\n  1 mem\n  4 /dev/vc/0\n195 nvidia-frontend\n236 nvidia-uvm\n254 gpiochip\n\nBlock devices:\n  7 loop\n236 nvidia-uvm-fake\n";

const INFORMATION: &str = "Model: \t\t NVIDIA H200\nIRQ:   \t\t 35\nGPU UUID: \t GPU-5d9c2f4e-0000-1111-2222-333344445555\nVideo BIOS: \t 96.00.99.00.01\nBus Type: \t PCIe\nDMA Size: \t 52 bits\nDMA Mask: \t 0xfffffffffffff\nBus Location: \t 0000:01:00.0\nDevice Minor: \t 0\nGPU Excluded:\t No\n";

#[derive(Default)]
struct Fake {
    disk: bool,
    files: BTreeMap<String, String>,
    loaded: Vec<(String, String)>,
    fail_load: Option<(String, Errno)>,
    nodes: Vec<(String, u32, u32)>,
    ran: Vec<String>,
    smi: String,
    writes: Vec<(String, String)>,
}

impl System for Fake {
    fn mount_driver_disk(&mut self) -> std::io::Result<bool> {
        Ok(self.disk)
    }
    fn read(&mut self, path: &str) -> std::io::Result<String> {
        self.files
            .get(path)
            .cloned()
            .ok_or(std::io::ErrorKind::NotFound.into())
    }
    fn write(&mut self, path: &str, text: &str) -> std::io::Result<()> {
        self.writes.push((path.into(), text.into()));
        Ok(())
    }
    fn load_module(&mut self, path: &str, params: &str) -> Result<(), Errno> {
        if let Some((m, e)) = &self.fail_load {
            if path.ends_with(m.as_str()) {
                return Err(*e);
            }
        }
        self.loaded.push((path.into(), params.into()));
        Ok(())
    }
    fn mknod_char(&mut self, path: &str, major: u32, minor: u32) -> std::io::Result<()> {
        self.nodes.push((path.into(), major, minor));
        Ok(())
    }
    fn run(&mut self, argv: &[String]) -> std::io::Result<(bool, String)> {
        self.ran.push(argv.join(" "));
        if argv.iter().any(|a| a.ends_with("nvidia-smi")) {
            return Ok((true, self.smi.clone()));
        }
        Ok((true, String::new()))
    }
    fn kernel_log(&mut self) -> Vec<String> {
        vec!["NVRM: No NVIDIA GPU found.".into()]
    }
    fn sleep(&mut self, _: Duration) {}
}

fn dev(bdf: &str, vendor: u16, device: u16, class: u32) -> DeviceInfo {
    DeviceInfo {
        bdf: bdf.into(),
        vendor,
        device,
        class,
    }
}

fn fake() -> Fake {
    let mut f = Fake {
        disk: true,
        ..Fake::default()
    };
    f.files
        .insert(format!("{DRIVER_MOUNT}/{INFO_FILE}"), INFO.into());
    f.files.insert("/proc/devices".into(), PROC_DEVICES.into());
    f.files.insert(
        "/proc/driver/nvidia/gpus/0000:01:00.0/information".into(),
        INFORMATION.into(),
    );
    f.smi = "00000000:01:00.0, NVIDIA H200, GPU-5d9c2f4e-0000-1111-2222-333344445555, 143771, 550.163.01\n".into();
    f
}

#[test]
fn proc_files_are_parsed() {
    assert_eq!(char_major(PROC_DEVICES, "nvidia-uvm"), Some(236));
    assert_eq!(char_major(PROC_DEVICES, "nvidia-frontend"), Some(195));
    assert_eq!(char_major(PROC_DEVICES, "nvidia-caps"), None);
    assert_eq!(
        char_major(PROC_DEVICES, "loop"),
        None,
        "block devices are not char"
    );
    assert_eq!(info_field(INFORMATION, "Device Minor"), Some("0"));
    assert_eq!(info_field(INFORMATION, "Model"), Some("NVIDIA H200"));
    assert_eq!(
        info_field(INFORMATION, "GPU UUID"),
        Some("GPU-5d9c2f4e-0000-1111-2222-333344445555")
    );
    let g = parse_smi_line(
        "00000000:01:00.0, NVIDIA H200, GPU-1, 143771, 550.163.01",
        "12.4",
    )
    .unwrap();
    assert_eq!(g.bdf, "0000:01:00.0");
    assert_eq!(g.memory_mib, 143771);
    assert_eq!(g.cuda_version, "12.4");
    assert!(parse_smi_line("No devices were found", "12.4").is_none());
    assert!(parse_smi_line("a, b, c, lots, e", "12.4").is_none());
}

#[test]
fn info_paths_must_stay_on_the_disk() {
    assert!(parse_info(INFO).is_ok());
    let bad = INFO.replace("usr/lib/ld-linux", "/usr/lib/ld-linux");
    assert!(parse_info(&bad)
        .unwrap_err()
        .to_string()
        .contains("leaves the disk"));
    let bad = INFO.replace("lib/firmware", "../../etc");
    assert!(parse_info(&bad).is_err());
    assert!(parse_info("{").is_err());
}

#[test]
fn no_driver_disk_means_no_bring_up() {
    let mut f = Fake::default();
    let found = [dev("0000:01:00.0", 0x10de, 0x2335, 0x030200)];
    assert!(bring_up(&mut f, &found).unwrap().is_none());
    assert!(f.loaded.is_empty() && f.nodes.is_empty());
}

#[test]
fn without_nvidia_gpus_nothing_is_touched() {
    let mut f = fake();
    let found = [
        dev("0000:00:03.0", 0x1234, 0x11e8, 0x00ff00),
        dev("0000:00:04.0", 0x10de, 0x22a3, 0x068000), // NVSwitch: not a GPU
    ];
    let r = bring_up(&mut f, &found).unwrap().unwrap();
    assert!(r.gpus.is_empty());
    assert!(
        r.message.contains("no NVIDIA GPU was passed"),
        "{}",
        r.message
    );
    assert!(
        r.message.contains("1234:11e8 at 0000:00:03.0"),
        "{}",
        r.message
    );
    assert!(f.loaded.is_empty() && f.nodes.is_empty() && f.writes.is_empty() && f.ran.is_empty());
}

#[test]
fn one_gpu_is_brought_up_in_order() {
    let mut f = fake();
    let found = [
        dev("0000:00:03.0", 0x1234, 0x11e8, 0x00ff00),
        dev("0000:01:00.0", 0x10de, 0x2335, 0x030200),
    ];
    let r = bring_up(&mut f, &found).unwrap().unwrap();
    assert_eq!(
        f.writes,
        [(
            "/sys/module/firmware_class/parameters/path".to_owned(),
            format!("{DRIVER_MOUNT}/lib/firmware")
        )]
    );
    let loaded: Vec<(&str, &str)> = f
        .loaded
        .iter()
        .map(|(p, a)| (p.rsplit('/').next().unwrap(), a.as_str()))
        .collect();
    assert_eq!(
        loaded,
        [
            ("drm.ko", ""),
            (
                "nvidia.ko",
                "NVreg_ModifyDeviceFiles=0 NVreg_NvLinkDisable=1"
            ),
            ("nvidia-uvm.ko", "")
        ]
    );
    assert_eq!(
        f.nodes,
        [
            ("/dev/nvidiactl".to_owned(), 195, 255),
            ("/dev/nvidia0".to_owned(), 195, 0),
            ("/dev/nvidia-uvm".to_owned(), 236, 0),
            ("/dev/nvidia-uvm-tools".to_owned(), 236, 1),
        ]
    );
    assert!(f.ran[0].ends_with("usr/bin/nvidia-persistenced --uvm-persistence-mode"));
    assert!(f.ran[0].starts_with(&format!(
        "{DRIVER_MOUNT}/usr/lib/ld-linux-x86-64.so.2 --library-path {DRIVER_MOUNT}/usr/lib "
    )));
    assert_eq!(r.gpus.len(), 1);
    assert_eq!(r.gpus[0].name, "NVIDIA H200");
    assert_eq!(r.cuda_version, "12.4");
}

#[test]
fn several_gpus_keep_nvlink() {
    assert_eq!(nvidia_params(2), "NVreg_ModifyDeviceFiles=0");
    assert_eq!(
        nvidia_params(1),
        "NVreg_ModifyDeviceFiles=0 NVreg_NvLinkDisable=1"
    );
}

#[test]
fn a_load_failure_carries_the_kernels_words() {
    let mut f = fake();
    f.fail_load = Some(("nvidia.ko".into(), Errno::ENODEV));
    let found = [dev("0000:01:00.0", 0x10de, 0x2335, 0x030200)];
    let err = bring_up(&mut f, &found).unwrap_err().to_string();
    assert!(err.contains("nvidia.ko") && err.contains("ENODEV"), "{err}");
    assert!(err.contains("NVRM: No NVIDIA GPU found."), "{err}");
    assert!(f.nodes.is_empty());
}

#[test]
fn a_gpu_that_never_answers_fails_with_the_smi_output() {
    let mut f = fake();
    f.smi = "No devices were found".into();
    let found = [dev("0000:01:00.0", 0x10de, 0x2335, 0x030200)];
    let info = parse_info(INFO).unwrap();
    let err = wait_ready(&mut f, &info, &nvidia_gpus(&found), Duration::ZERO)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("0000:01:00.0") && err.contains("No devices were found"),
        "{err}"
    );
    assert!(err.contains("NVRM:"), "{err}");
}

#[test]
fn self_test_without_gpus_loads_up_to_enodev() {
    let mut f = fake();
    f.fail_load = Some(("nvidia.ko".into(), Errno::ENODEV));
    let found = [dev("0000:00:03.0", 0x1234, 0x11e8, 0x00ff00)];
    let t = check(&mut f, &found, "6.1.0-57-amd64");
    let results: Vec<(&str, &str)> = t
        .modules
        .iter()
        .map(|m| (m.module.as_str(), m.result.as_str()))
        .collect();
    assert_eq!(
        results,
        [
            ("drm.ko", "loaded"),
            ("nvidia.ko", "ENODEV"),
            ("nvidia-uvm.ko", "skipped: nvidia.ko is not loaded")
        ]
    );
    assert_eq!(t.flavour, "nvidia-550");
    assert!(t.driver.is_none() && t.error.is_none());
    assert!(f
        .ran
        .iter()
        .any(|r| r.contains("usr/bin/gpucell-cuda-version")));
    assert_eq!(
        vermagic(b"x\0vermagic=6.1.0-57-amd64 SMP preempt \0y"),
        "6.1.0-57-amd64 SMP preempt"
    );
    assert_eq!(vermagic(b"nothing"), "");
}

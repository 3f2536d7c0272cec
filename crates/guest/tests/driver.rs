//! Boots a built NVIDIA driver flavour (`nvidia-550`) under QEMU/TCG with no GPU and
//! checks its driver: the modules carry the guest kernel's vermagic and load up to the
//! driver's own "No NVIDIA GPU found" (ENODEV), never `Unknown symbol` or `Invalid
//! module format`; libcuda on the driver disk reports its CUDA version; nvidia-smi runs
//! and says it cannot reach the driver. Skips, with the reason, when the flavour is not
//! built in `GPUCELL_TEST_STATE_DIR` (`make test` builds it) or QEMU is missing.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use gpucell_guest::driver::selftest::{self, TestOptions};

const FLAVOUR: &str = "nvidia-550";

fn built() -> Option<gpucell_guest::GuestArtifacts> {
    let Some(state) = std::env::var_os("GPUCELL_TEST_STATE_DIR").map(PathBuf::from) else {
        eprintln!(
            "skipping: GPUCELL_TEST_STATE_DIR is not set (make test sets it and builds {FLAVOUR})"
        );
        return None;
    };
    if std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipping: qemu-system-x86_64 is not installed");
        return None;
    }
    match gpucell_guest::load(&state, FLAVOUR) {
        Ok(a) => Some(a),
        Err(e) => {
            eprintln!("skipping: {e}");
            None
        }
    }
}

#[test]
fn driver_flavour_loads_up_to_enodev_without_a_gpu() {
    let Some(art) = built() else { return };
    gpucell_guest::verify(&art).unwrap();
    let opts = TestOptions {
        qemu: "qemu-system-x86_64".into(),
        accel: "tcg".into(),
        memory_mib: 1024,
        devices: vec![],
        timeout: Duration::from_secs(300),
        sysfs: "/sys".into(),
    };
    let out = selftest::run(&art, &opts).unwrap();
    let r = &out.report;
    for c in &out.checks {
        assert!(
            c.ok,
            "check `{}` failed: {}\nreport: {r:#?}",
            c.name, c.detail
        );
    }
    let d = art.manifest.driver.as_ref().unwrap();
    let results: Vec<(&str, &str)> = r
        .modules
        .iter()
        .map(|m| (m.module.as_str(), m.result.as_str()))
        .collect();
    // The kernel's own modules the driver needs (drm and its dependencies, on a kernel
    // that builds drm as a module; none on the microVM kernel, where it is built in)
    // load; nvidia.ko stops at ENODEV.
    let n = results.len();
    assert!(n >= 2, "{results:?}");
    assert_eq!(
        results[n - 2..],
        [
            ("nvidia.ko", "ENODEV"),
            ("nvidia-uvm.ko", "skipped: nvidia.ko is not loaded")
        ]
    );
    assert!(
        results[..n - 2].iter().all(|(_, r)| *r == "loaded"),
        "{results:?}"
    );
    let names: Vec<&str> = d
        .modules
        .iter()
        .map(|m| m.rsplit('/').next().unwrap())
        .collect();
    let loaded: Vec<&str> = results.iter().map(|(m, _)| *m).collect();
    assert_eq!(names, loaded, "every module of the disk, in its order");
    if d.vermagic.contains("-gpucell") {
        assert_eq!(n, 2, "drm is built into the microVM kernel: {results:?}");
    } else {
        assert!(loaded.contains(&"drm.ko"), "{results:?}");
    }
    assert!(r.modules.iter().all(|m| m.vermagic == d.vermagic), "{r:?}");
    assert!(
        r.kernel_log
            .iter()
            .any(|l| l.contains("NVRM: No NVIDIA GPU found")),
        "{r:?}"
    );
    assert!(!r
        .kernel_log
        .iter()
        .any(|l| l.contains("Unknown symbol") || l.contains("Invalid module format")));
    assert_eq!(r.cuda.output.trim(), "12040");
    assert!(
        r.nvidia_smi
            .output
            .contains("couldn't communicate with the NVIDIA driver"),
        "{r:?}"
    );
    assert!(
        r.device_nodes.is_empty(),
        "no driver, no nodes: {:?}",
        r.device_nodes
    );
}

//! deploy/ stays in step with the code: the DaemonSet passes only flags the plugin has,
//! the RuntimeClass's handler is the containerd runtime the snippet defines, and that
//! runtime is the gpucell shim's type.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

fn deploy(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn daemonset_flags_exist() {
    let help = Command::new(env!("CARGO_BIN_EXE_gpucell-device-plugin"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let ds = deploy("device-plugin.yaml");
    let mut n = 0;
    for line in ds.lines().map(str::trim) {
        if let Some(flag) = line.strip_prefix("- --") {
            let name = flag.split('=').next().unwrap();
            assert!(
                help.contains(&format!("--{name}")),
                "--{name} is not a flag of the plugin"
            );
            n += 1;
        }
    }
    assert!(n >= 4, "no flags found in the DaemonSet");
    assert!(ds.contains("/host/usr/local/bin/gpucell-device-plugin"));
}

#[test]
fn runtime_class_names_the_containerd_runtime() {
    let rc = deploy("runtimeclass.yaml");
    assert!(rc.contains("\nhandler: gpucell\n"));
    let cfg: toml::Table = toml::from_str(&deploy("containerd-gpucell.toml")).unwrap();
    let cri = &cfg["plugins"]["io.containerd.grpc.v1.cri"];
    assert_eq!(cri["enable_cdi"].as_bool(), Some(true));
    let rt = &cri["containerd"]["runtimes"]["gpucell"];
    assert_eq!(
        rt["runtime_type"].as_str(),
        Some("io.containerd.gpucell.v1")
    );
    let dirs = cri["cdi_spec_dirs"].as_array().unwrap();
    assert!(dirs
        .iter()
        .any(|d| d.as_str() == Some(gpucell_device_plugin::cdi::DEFAULT_CDI_DIR)));
}

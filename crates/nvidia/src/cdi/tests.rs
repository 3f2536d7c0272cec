use super::*;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::process::Command;

const V: &str = "550.163.01";

/// Builds a real shared object with `soname` (none when empty) at `path`; `false` (with
/// the reason printed) when gcc is missing.
fn shared_object(path: &Path, soname: &str) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("x.c");
    fs::write(&src, "int gpucell_test_symbol(void) { return 42; }\n").unwrap();
    let mut cmd = Command::new("gcc");
    cmd.args(["-shared", "-fPIC", "-nostdlib", "-o"])
        .arg(path)
        .arg(&src);
    if !soname.is_empty() {
        cmd.arg(format!("-Wl,-soname,{soname}"));
    }
    match cmd.output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => panic!("gcc failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            eprintln!("SKIP: gcc is not available ({e}); install gcc to run this test");
            false
        }
    }
}

fn executable(path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, "#!/bin/sh\n").unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A driver root as a Debian flavour lays it out (flattened multiarch directory).
/// `None` when gcc is missing.
fn debian_root(root: &Path) -> Option<()> {
    let lib = root.join("usr/lib/x86_64-linux-gnu");
    fs::create_dir_all(&lib).unwrap();
    for (name, soname) in [
        ("libcuda", "libcuda.so.1"),
        ("libnvidia-ml", "libnvidia-ml.so.1"),
        ("libnvidia-ptxjitcompiler", "libnvidia-ptxjitcompiler.so.1"),
        ("libnvidia-nvvm", "libnvidia-nvvm.so.4"),
        ("libnvidia-nosoname", ""),
    ] {
        if !shared_object(&lib.join(format!("{name}.so.{V}")), soname) {
            return None;
        }
    }
    // The driver's own SONAME link, a library of another version, a non-ELF file.
    symlink(format!("libcuda.so.{V}"), lib.join("libcuda.so.1")).unwrap();
    shared_object(
        &lib.join("libnvidia-old.so.535.261.03"),
        "libnvidia-old.so.1",
    );
    fs::write(
        lib.join(format!("libnvidia-junk.so.{V}")),
        "not an ELF file",
    )
    .unwrap();
    // /lib64 → the same directory, through an absolute link that must stay in the root.
    symlink("/usr/lib/x86_64-linux-gnu", root.join("lib64")).unwrap();
    executable(&root.join("usr/bin/nvidia-smi"));
    executable(&root.join("usr/bin/nvidia-cuda-mps-control"));
    // Not executable: not a binary to mount.
    fs::write(root.join("usr/bin/nvidia-debugdump"), "").unwrap();
    Some(())
}

fn opts(root: &Path) -> GenerateOptions {
    let mut o = GenerateOptions::new(root);
    o.host_root = Some("/run/gpucell/driver".into());
    o.gpus = vec![
        GpuNode {
            index: 0,
            minor: 0,
            uuid: Some("GPU-3a9b1c2d-0e4f-5a6b-7c8d-9e0f1a2b3c4d".into()),
            bdf: Some("0000:00:05.0".into()),
        },
        GpuNode {
            index: 1,
            minor: 3,
            uuid: None,
            bdf: Some("0000:00:06.0".into()),
        },
    ];
    o
}

#[test]
fn spec_of_a_fake_driver_root_matches_the_golden_file() {
    let d = tempfile::tempdir().unwrap();
    if debian_root(d.path()).is_none() {
        return;
    }
    let g = generate(&opts(d.path())).unwrap();
    assert_eq!(g.driver_version, V);
    let json = g.spec.to_json();
    let golden_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cdi-fake-550.json");
    if std::env::var_os("GPUCELL_UPDATE_GOLDEN").is_some() {
        fs::write(&golden_path, &json).unwrap();
    }
    let golden = fs::read_to_string(&golden_path).unwrap();
    assert_eq!(
        json,
        golden,
        "set GPUCELL_UPDATE_GOLDEN=1 to rewrite {}",
        golden_path.display()
    );
    // And it reads back, valid.
    assert_eq!(Spec::from_json(&json).unwrap(), g.spec);
}

#[test]
fn libraries_links_binaries_and_hooks() {
    let d = tempfile::tempdir().unwrap();
    if debian_root(d.path()).is_none() {
        return;
    }
    let g = generate(&opts(d.path())).unwrap();
    assert_fake_550_libraries(&g);
    let e = &g.spec.container_edits;
    assert_fake_550_mounts(e);
    assert_fake_550_hooks(e);
    assert_fake_550_nodes_and_devices(&g);
}

/// The libraries of the fake 550 tree, by file name and soname; the junk one warned about.
fn assert_fake_550_libraries(g: &Generated) {
    let names: Vec<(&str, Option<&str>)> = g
        .libraries
        .iter()
        .map(|l| (l.file_name.as_str(), l.soname.as_deref()))
        .collect();
    assert_eq!(
        names,
        [
            ("libcuda.so.550.163.01", Some("libcuda.so.1")),
            ("libnvidia-ml.so.550.163.01", Some("libnvidia-ml.so.1")),
            ("libnvidia-nosoname.so.550.163.01", None),
            ("libnvidia-nvvm.so.550.163.01", Some("libnvidia-nvvm.so.4")),
            (
                "libnvidia-ptxjitcompiler.so.550.163.01",
                Some("libnvidia-ptxjitcompiler.so.1")
            ),
        ]
    );
    assert_eq!(g.warnings.len(), 1, "{:?}", g.warnings);
    assert!(
        g.warnings[0].contains("libnvidia-junk.so.550.163.01"),
        "{:?}",
        g.warnings
    );
}

/// Libraries and binaries are bind-mounted read-only from the driver mount, once each.
fn assert_fake_550_mounts(e: &ContainerEdits) {
    let mounts: Vec<(&str, &str)> = e
        .mounts
        .iter()
        .map(|m| (m.host_path.as_str(), m.container_path.as_str()))
        .collect();
    assert!(mounts.contains(&(
        "/run/gpucell/driver/usr/lib/x86_64-linux-gnu/libcuda.so.550.163.01",
        "/usr/lib/x86_64-linux-gnu/libcuda.so.550.163.01"
    )));
    assert!(mounts.contains(&(
        "/run/gpucell/driver/usr/bin/nvidia-smi",
        "/usr/bin/nvidia-smi"
    )));
    assert!(!mounts
        .iter()
        .any(|m| m.0.contains("debugdump") || m.0.contains("535")));
    assert_eq!(
        mounts.len(),
        5 + 2,
        "libraries found once although /lib64 is searched too"
    );
    assert!(e.mounts.iter().all(|m| m.options == MOUNT_OPTIONS));
}

/// The hooks: symlinks, CUDA compat, ldcache, no device node changes; all `cdi-hook`.
fn assert_fake_550_hooks(e: &ContainerEdits) {
    let steps: Vec<HookStep> = e
        .hooks
        .iter()
        .map(|h| HookStep::from_hook(h).unwrap())
        .collect();
    let HookStep::CreateSymlinks(links) = &steps[0] else {
        panic!("{steps:?}")
    };
    let lib = "/usr/lib/x86_64-linux-gnu";
    for (t, l) in [
        ("libcuda.so.550.163.01", "libcuda.so.1"),
        ("libcuda.so.1", "libcuda.so"),
        ("libnvidia-ml.so.1", "libnvidia-ml.so"),
        ("libnvidia-nvvm.so.550.163.01", "libnvidia-nvvm.so.4"),
        ("libnvidia-nosoname.so.550.163.01", "libnvidia-nosoname.so"),
    ] {
        assert!(
            links.contains(&(t.to_string(), format!("{lib}/{l}"))),
            "{t} <- {l}: {links:?}"
        );
    }
    assert_eq!(links.len(), 9);
    assert_eq!(
        steps[1..],
        [
            HookStep::EnableCudaCompat {
                host_driver_version: V.into()
            },
            HookStep::UpdateLdcache {
                folders: vec![lib.into()]
            },
            HookStep::DisableDeviceNodeModification,
        ]
    );
    assert!(e
        .hooks
        .iter()
        .all(|h| h.path == HOOK_PATH && h.args[0] == "cdi-hook"));
}

/// Control nodes without numbers (no device root); devices by index, by UUID and all.
fn assert_fake_550_nodes_and_devices(g: &Generated) {
    let e = &g.spec.container_edits;
    // Without a device root: the compute control nodes, numbers left to the agent.
    let paths: Vec<&str> = e.device_nodes.iter().map(|n| n.path.as_str()).collect();
    assert_eq!(
        paths,
        ["/dev/nvidia-uvm-tools", "/dev/nvidia-uvm", "/dev/nvidiactl"]
    );
    assert!(e.device_nodes.iter().all(|n| n.major.is_none()));
    // Devices: by index, by UUID, all.
    let devs: Vec<&str> = g.spec.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(
        devs,
        ["0", "GPU-3a9b1c2d-0e4f-5a6b-7c8d-9e0f1a2b3c4d", "1", "all"]
    );
    let n = &g.spec.device("1").unwrap().container_edits.device_nodes[0];
    assert_eq!(
        (n.path.as_str(), n.major, n.minor),
        ("/dev/nvidia3", Some(195), Some(3))
    );
    assert_eq!(
        g.spec
            .device("all")
            .unwrap()
            .container_edits
            .device_nodes
            .len(),
        2
    );
}

#[test]
fn driver_under_usr_local_nvidia_with_nvidia_cdi_hook() {
    // The layout of a host whose driver lives in /usr/local/nvidia (the H200 test machine).
    let d = tempfile::tempdir().unwrap();
    let lib = d.path().join("usr/local/nvidia/lib64");
    fs::create_dir_all(&lib).unwrap();
    let v = "580.159.04";
    if !shared_object(&lib.join(format!("libcuda.so.{v}")), "libcuda.so.1")
        || !shared_object(
            &lib.join(format!("libnvidia-ml.so.{v}")),
            "libnvidia-ml.so.1",
        )
    {
        return;
    }
    executable(&d.path().join("usr/local/nvidia/bin/nvidia-smi"));
    let dev = tempfile::tempdir().unwrap();
    symlink("/dev/null", dev.path().join("nvidiactl")).unwrap();
    fs::write(dev.path().join("nvidia-uvm"), "").unwrap();
    let mut o = GenerateOptions::new(d.path());
    o.dev_root = Some(dev.path().to_owned());
    o.hook_path = "/usr/bin/nvidia-cdi-hook".into();
    o.container_lib_dir = "/usr/lib64".into();
    let g = generate(&o).unwrap();
    assert_eq!(g.driver_version, v);
    assert_eq!(g.libraries.len(), 2);
    assert_eq!(
        g.libraries[0].host_path,
        lib.join(format!("libcuda.so.{v}")),
        "hostPath defaults to the driver root itself"
    );
    assert_eq!(
        g.binaries,
        [d.path().join("usr/local/nvidia/bin/nvidia-smi")]
    );
    let e = &g.spec.container_edits;
    assert!(e
        .mounts
        .iter()
        .any(|m| m.container_path == format!("/usr/lib64/libcuda.so.{v}")));
    assert_eq!(g.spec.library_dir(), "/usr/lib64");
    assert_eq!(g.spec.driver_version(), Some(v));
    assert!(e.hooks.iter().all(|h| h.args[0] == "nvidia-cdi-hook"));
    // Only the nodes present; numbers for the character device.
    let nodes: Vec<(&str, Option<i64>, Option<i64>)> = e
        .device_nodes
        .iter()
        .map(|n| (n.path.as_str(), n.major, n.minor))
        .collect();
    assert_eq!(
        nodes,
        [
            ("/dev/nvidia-uvm", None, None),
            ("/dev/nvidiactl", Some(1), Some(3))
        ]
    );
    assert_eq!(
        e.device_nodes[1].host_path.as_deref(),
        Some(dev.path().join("nvidiactl").to_str().unwrap())
    );
    // No GPU: "all" without edits, still a valid gpucell spec.
    assert_eq!(g.spec.devices.len(), 1);
    g.spec.validate().unwrap();
}

#[test]
fn driver_version_detection() {
    let d = tempfile::tempdir().unwrap();
    let lib = d.path().join("usr/lib64");
    fs::create_dir_all(&lib).unwrap();
    let dirs = vec!["/usr/lib64".to_string()];
    let err = detect_driver_version(d.path(), &dirs).unwrap_err();
    assert!(matches!(err, CdiError::NoDriver { .. }), "{err}");
    assert!(err.to_string().contains("/usr/lib64"), "{err}");
    fs::write(lib.join("libcuda.so.1"), "").unwrap();
    fs::write(lib.join("libcuda.so.550.163.01"), "").unwrap();
    fs::write(lib.join("libnvidia-ml.so.550.163.01"), "").unwrap();
    assert_eq!(
        detect_driver_version(d.path(), &dirs).unwrap(),
        "550.163.01"
    );
    fs::write(lib.join("libnvidia-ml.so.535.261.03"), "").unwrap();
    let err = detect_driver_version(d.path(), &dirs).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "several driver versions under {} (535.261.03, 550.163.01): give the one to use explicitly",
            d.path().display()
        )
    );
    let mut o = GenerateOptions::new(d.path());
    o.driver_version = Some("../../etc".into());
    assert!(matches!(generate(&o), Err(CdiError::BadVersion(_))));
    o.driver_version = Some("550.163.01".into());
    o.lib_dirs = vec!["usr/lib64".into()];
    assert!(matches!(generate(&o), Err(CdiError::BadPath(_))));
}

#[test]
fn soname_of_real_and_bogus_files() {
    let d = tempfile::tempdir().unwrap();
    let so = d.path().join("libx.so.1.2");
    if !shared_object(&so, "libx.so.1") {
        return;
    }
    assert_eq!(read_soname(&so).unwrap().as_deref(), Some("libx.so.1"));
    let plain = d.path().join("liby.so.1.2");
    assert!(shared_object(&plain, ""));
    assert_eq!(read_soname(&plain).unwrap(), None);
    let junk = d.path().join("junk");
    fs::write(&junk, [0x7f, b'E', b'L', b'F', 2, 1, 1, 0]).unwrap();
    let err = read_soname(&junk).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{} is not a 64-bit x86-64 ELF", junk.display())),
        "{err}"
    );
    assert!(matches!(
        read_soname(&d.path().join("missing")),
        Err(CdiError::Io { .. })
    ));
}

#[test]
fn gpus_from_proc_driver_nvidia() {
    let d = tempfile::tempdir().unwrap();
    assert!(gpus_from_proc(&d.path().join("absent")).unwrap().is_empty());
    let info = |bdf: &str, text: &str| {
        fs::create_dir_all(d.path().join(bdf)).unwrap();
        fs::write(d.path().join(bdf).join("information"), text).unwrap();
    };
    info(
        "0000:00:07.0",
        "Model: \t\t NVIDIA H200\nIRQ:   \t\t 40\nGPU UUID: \t GPU-0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0\n\
         Video BIOS: \t 96.00.9f.00.04\nBus Type: \t PCIe\nDMA Size: \t 52 bits\n\
         Device Minor: \t 1\nBus Location: \t 0000:00:07.0\n",
    );
    info(
        "0000:00:06.0",
        "Model: X\nGPU UUID: \t Unknown\nDevice Minor: \t 0\n",
    );
    let gpus = gpus_from_proc(d.path()).unwrap();
    assert_eq!(
        gpus,
        [
            GpuNode {
                index: 0,
                minor: 0,
                uuid: None,
                bdf: Some("0000:00:06.0".into())
            },
            GpuNode {
                index: 1,
                minor: 1,
                uuid: Some("GPU-0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0".into()),
                bdf: Some("0000:00:07.0".into())
            },
        ]
    );
    info("0000:00:08.0", "Model: X\nDevice Minor: 255\n");
    let err = gpus_from_proc(d.path()).unwrap_err().to_string();
    assert!(
        err.contains("0000:00:08.0/information") && err.contains("Device Minor"),
        "{err}"
    );
}

#[test]
fn hooks_round_trip_and_reject_unknown_steps() {
    for step in [
        HookStep::CreateSymlinks(vec![(
            "libcuda.so.1".into(),
            "/usr/lib64/libcuda.so".into(),
        )]),
        HookStep::EnableCudaCompat {
            host_driver_version: "535.261.03".into(),
        },
        HookStep::UpdateLdcache {
            folders: vec!["/usr/lib64".into(), "/opt/x".into()],
        },
        HookStep::DisableDeviceNodeModification,
    ] {
        let h = step.to_hook(HOOK_PATH);
        assert_eq!(HookStep::from_hook(&h).unwrap(), step);
    }
    let hook = |args: &[&str]| Hook {
        hook_name: HOOK_NAME.into(),
        path: HOOK_PATH.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        timeout: None,
    };
    // nvidia-cdi-hook's own spelling with `=`.
    assert_eq!(
        HookStep::from_hook(&hook(&["h", "update-ldcache", "--folder=/usr/lib64"])).unwrap(),
        HookStep::UpdateLdcache {
            folders: vec!["/usr/lib64".into()]
        }
    );
    for bad in [
        &["h"][..],
        &["h", "chmod", "--mode", "777"],
        &["h", "create-symlinks", "--link", "a"],
        &["h", "create-symlinks", "--link", "a::../etc/x"],
        &["h", "create-symlinks", "--link"],
        &["h", "update-ldcache", "--folder", "/a/../b"],
        &["h", "enable-cuda-compat"],
        &["h", "enable-cuda-compat", "--host-driver-version=abc"],
        &["h", "disable-device-node-modification", "--x"],
        &["h", "update-ldcache", "--other"],
    ] {
        assert!(HookStep::from_hook(&hook(bad)).is_err(), "{bad:?}");
    }
}

#[test]
fn validation_of_specs_read_back() {
    let base = || Spec {
        cdi_version: CDI_VERSION.into(),
        kind: KIND.into(),
        annotations: BTreeMap::new(),
        devices: vec![Device {
            name: "all".into(),
            annotations: BTreeMap::new(),
            container_edits: ContainerEdits::default(),
        }],
        container_edits: ContainerEdits::default(),
    };
    base().validate().unwrap();
    assert_eq!(base().library_dir(), DEFAULT_CONTAINER_LIB_DIR);
    let mut s = base();
    s.cdi_version = "0.5.0".into();
    assert!(s.validate().is_err());
    s.cdi_version = "1.0.0".into();
    s.validate().unwrap();
    let mut s = base();
    s.kind = "vendor.com/x".into();
    assert!(s.validate().is_err());
    let mut s = base();
    s.devices.push(s.devices[0].clone());
    assert!(s.validate().unwrap_err().to_string().contains("repeated"));
    let mut s = base();
    s.devices.push(Device {
        name: "0".into(),
        ..s.devices[0].clone()
    });
    assert!(s
        .validate()
        .unwrap_err()
        .to_string()
        .contains("device `0` has no edits"));
    let node = |p: &str| DeviceNode {
        path: p.into(),
        ..Default::default()
    };
    for bad in [
        "/etc/shadow",
        "/dev/../etc/shadow",
        "dev/nvidia0",
        "/dev//nvidia0",
    ] {
        let mut s = base();
        s.container_edits.device_nodes.push(node(bad));
        assert!(s.validate().is_err(), "{bad}");
    }
    let mut s = base();
    s.container_edits.mounts.push(Mount {
        host_path: "/x/libcuda.so.1".into(),
        container_path: "/usr/lib/../../etc/passwd".into(),
        options: vec![],
        kind: None,
    });
    assert!(s.validate().is_err());
    let mut s = base();
    s.container_edits.hooks.push(Hook {
        hook_name: "prestart".into(),
        ..HookStep::DisableDeviceNodeModification.to_hook(HOOK_PATH)
    });
    assert!(s.validate().is_err());
    let mut s = base();
    s.container_edits.env.push("NOEQUALS".into());
    assert!(s.validate().is_err());
    // Unknown fields and bad JSON are refused.
    let json = base()
        .to_json()
        .replace("\"kind\"", "\"intelRdt\": {},\n  \"kind\"");
    assert!(matches!(Spec::from_json(&json), Err(CdiError::Json(_))));
    assert!(matches!(Spec::from_json("{"), Err(CdiError::Json(_))));
}

#[test]
fn resolution_stays_in_the_root() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    fs::create_dir_all(r.join("usr/lib")).unwrap();
    symlink("/usr/lib", r.join("lib")).unwrap();
    symlink("../../../../../etc", r.join("usr/lib/up")).unwrap();
    symlink("loop2", r.join("loop1")).unwrap();
    symlink("loop1", r.join("loop2")).unwrap();
    assert_eq!(resolve_in(r, "/lib/x"), r.join("usr/lib/x"));
    assert_eq!(resolve_in(r, "/usr/lib/up/passwd"), r.join("etc/passwd"));
    assert!(resolve_in(r, "/loop1/x").starts_with(r));
}

use super::*;
use gpucell_nvidia::cdi::{self, DeviceNode, GpuNode, Mount};
use gpucell_nvidia::DeviceId;
use std::collections::BTreeMap;
use std::os::unix::fs::symlink;

const V: &str = "550.163.01";
const UUID0: &str = "GPU-3a9b1c2d-0e4f-5a6b-7c8d-9e0f1a2b3c4d";
const UUID1: &str = "GPU-0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0";
const LIB: &str = "/usr/lib/x86_64-linux-gnu";

/// A spec as `cdi::generate` makes it, written out by hand (no driver files needed).
fn spec(driver_dir: &str) -> Spec {
    let mount = |host: String, c: String| Mount {
        host_path: host,
        container_path: c,
        options: cdi::MOUNT_OPTIONS.iter().map(|s| s.to_string()).collect(),
        kind: None,
    };
    let node = |p: &str| DeviceNode {
        path: p.into(),
        ..Default::default()
    };
    let steps = [
        HookStep::CreateSymlinks(vec![
            (format!("libcuda.so.{V}"), format!("{LIB}/libcuda.so.1")),
            ("libcuda.so.1".into(), format!("{LIB}/libcuda.so")),
        ]),
        HookStep::EnableCudaCompat {
            host_driver_version: V.into(),
        },
        HookStep::UpdateLdcache {
            folders: vec![LIB.into()],
        },
        HookStep::DisableDeviceNodeModification,
    ];
    let mut s = Spec {
        cdi_version: cdi::CDI_VERSION.into(),
        kind: cdi::KIND.into(),
        annotations: [
            (cdi::ANNOTATION_DRIVER_VERSION.to_owned(), V.to_owned()),
            (cdi::ANNOTATION_LIBRARY_DIR.to_owned(), LIB.to_owned()),
        ]
        .into(),
        devices: vec![],
        container_edits: ContainerEdits {
            env: vec![],
            device_nodes: vec![node("/dev/nvidia-uvm"), node("/dev/nvidiactl")],
            hooks: steps.iter().map(|s| s.to_hook(cdi::HOOK_PATH)).collect(),
            mounts: vec![
                mount(
                    format!("{driver_dir}/libcuda.so.{V}"),
                    format!("{LIB}/libcuda.so.{V}"),
                ),
                mount(
                    format!("{driver_dir}/nvidia-smi"),
                    "/usr/bin/nvidia-smi".into(),
                ),
            ],
        },
    };
    cdi::add_gpus(
        &mut s,
        &[
            GpuNode {
                index: 0,
                minor: 0,
                uuid: Some(UUID0.into()),
                bdf: None,
            },
            GpuNode {
                index: 1,
                minor: 1,
                uuid: Some(UUID1.into()),
                bdf: None,
            },
        ],
    );
    s
}

/// Records what would touch the kernel.
#[derive(Default)]
struct Fake {
    binds: Vec<(PathBuf, PathBuf)>,
    nodes: Vec<(PathBuf, u64, u64, u32)>,
    ldconfigs: Vec<String>,
    numbers: BTreeMap<PathBuf, (u64, u64)>,
    ldconfig_fails: Option<String>,
    /// `mknod` fails with this (a kernel that refuses device nodes).
    mknod_fails: Option<Errno>,
    node_binds: Vec<(PathBuf, PathBuf)>,
}

impl InjectOps for Fake {
    fn bind_ro(&mut self, src: &Path, dst: &Path) -> Result<(), Errno> {
        assert!(dst.exists(), "bind target {} must exist", dst.display());
        self.binds.push((src.to_owned(), dst.to_owned()));
        Ok(())
    }
    fn mknod_char(&mut self, p: &Path, major: u64, minor: u64, mode: u32) -> Result<(), Errno> {
        if let Some(e) = self.mknod_fails {
            return Err(e);
        }
        self.nodes.push((p.to_owned(), major, minor, mode));
        Ok(())
    }
    fn bind_node(&mut self, src: &Path, dst: &Path) -> Result<(), Errno> {
        assert!(dst.is_file(), "bind target {} must exist", dst.display());
        self.node_binds.push((src.to_owned(), dst.to_owned()));
        Ok(())
    }
    fn char_numbers(&mut self, p: &Path) -> Option<(u64, u64)> {
        self.numbers.get(p).copied()
    }
    fn ldconfig(&mut self, root: &Path, ldconfig: &str, _log: &Path) -> Result<(), String> {
        assert!(root.join(ldconfig.trim_start_matches('/')).is_file());
        self.ldconfigs.push(ldconfig.to_owned());
        self.ldconfig_fails.clone().map_or(Ok(()), Err)
    }
}

fn node_paths(p: &Plan) -> Vec<&str> {
    p.nodes.iter().map(|n| n.path.as_str()).collect()
}

fn debian_image(root: &Path) {
    fs::create_dir_all(root.join("usr/lib/x86_64-linux-gnu")).unwrap();
    fs::create_dir_all(root.join("usr/lib64")).unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("usr/lib/x86_64-linux-gnu/libc.so.6"), "").unwrap();
}

#[test]
fn only_the_visible_gpus_get_nodes() {
    let d = tempfile::tempdir().unwrap();
    debian_image(d.path());
    let s = spec("/drv");
    let p = |v: VisibleDevices| plan(&s, &v, d.path()).unwrap();
    let ctl = ["/dev/nvidia-uvm", "/dev/nvidiactl"];
    let all = p(VisibleDevices::All);
    assert_eq!(
        node_paths(&all),
        [&ctl[..], &["/dev/nvidia0", "/dev/nvidia1"]].concat()
    );
    assert_eq!(all.mounts.len(), 2);
    assert_eq!(all.steps.len(), 4);
    let one = p(VisibleDevices::List(vec![DeviceId::Index(1)]));
    assert_eq!(node_paths(&one), [&ctl[..], &["/dev/nvidia1"]].concat());
    let by_uuid = p(VisibleDevices::List(vec![
        DeviceId::Uuid(UUID0.into()),
        DeviceId::Index(0),
    ]));
    assert_eq!(node_paths(&by_uuid), [&ctl[..], &["/dev/nvidia0"]].concat());
    // none: the driver without any GPU node.
    let none = p(VisibleDevices::None);
    assert_eq!(node_paths(&none), ctl);
    assert_eq!(none.mounts.len(), 2);
    assert_eq!(p(VisibleDevices::Void), Plan::default());
    let err = plan(
        &s,
        &VisibleDevices::List(vec![DeviceId::Index(5)]),
        d.path(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "NVIDIA_VISIBLE_DEVICES names GPU `5`, which this sandbox does not have (it has \
             0, {UUID0}, 1, {UUID1}): use one of those, `all` or `none`"
        )
    );
    // A GPU-less spec says so.
    let mut bare = s.clone();
    cdi::add_gpus(&mut bare, &[]);
    let err = plan(
        &bare,
        &VisibleDevices::List(vec![DeviceId::Index(0)]),
        d.path(),
    );
    assert!(err.unwrap_err().to_string().contains("(it has no GPU)"));
    // An invalid spec is refused before anything else.
    let mut bad = s.clone();
    bad.container_edits.mounts[0].container_path = "/usr/lib/../../etc/passwd".into();
    assert!(matches!(
        plan(&bad, &VisibleDevices::All, d.path()),
        Err(InjectError::Spec(_))
    ));
}

#[test]
fn libraries_go_to_the_image_library_directory() {
    let s = spec("/drv");
    // RPM-style image: /usr/lib64 only.
    let d = tempfile::tempdir().unwrap();
    fs::create_dir_all(d.path().join("usr/lib64")).unwrap();
    let p = plan(&s, &VisibleDevices::All, d.path()).unwrap();
    assert_eq!(p.lib_dir, "/usr/lib64");
    assert!(p.mounts.contains(&(
        format!("/drv/libcuda.so.{V}"),
        format!("/usr/lib64/libcuda.so.{V}")
    )));
    assert!(p
        .mounts
        .contains(&("/drv/nvidia-smi".into(), "/usr/bin/nvidia-smi".into())));
    assert!(p.steps.contains(&HookStep::CreateSymlinks(vec![
        (format!("libcuda.so.{V}"), "/usr/lib64/libcuda.so.1".into()),
        ("libcuda.so.1".into(), "/usr/lib64/libcuda.so".into()),
    ])));
    assert!(p.steps.contains(&HookStep::UpdateLdcache {
        folders: vec!["/usr/lib64".into()]
    }));
    // Debian-style (Ubuntu also has /usr/lib64): the multiarch directory.
    let d = tempfile::tempdir().unwrap();
    debian_image(d.path());
    assert_eq!(
        plan(&s, &VisibleDevices::All, d.path()).unwrap().lib_dir,
        LIB
    );
    // busybox-like image: none of them; the spec's own directory.
    let d = tempfile::tempdir().unwrap();
    assert_eq!(
        plan(&s, &VisibleDevices::All, d.path()).unwrap().lib_dir,
        LIB
    );
}

#[test]
fn musl_images_are_refused_clearly() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir_all(d.path().join("lib")).unwrap();
    fs::write(d.path().join("lib/ld-musl-x86_64.so.1"), "").unwrap();
    let err = plan(&spec("/drv"), &VisibleDevices::All, d.path()).unwrap_err();
    assert!(matches!(err, InjectError::Musl(_)));
    let msg = err.to_string();
    assert!(
        msg.contains("musl") && msg.contains("glibc-based image"),
        "{msg}"
    );
    // musl and glibc side by side (glibc installed into an Alpine image): fine.
    fs::create_dir_all(d.path().join("usr/lib64")).unwrap();
    fs::write(d.path().join("usr/lib64/libc.so.6"), "").unwrap();
    plan(&spec("/drv"), &VisibleDevices::All, d.path()).unwrap();
    // void: not even looked at.
    assert_eq!(
        plan(
            &spec("/drv"),
            &VisibleDevices::Void,
            Path::new("/nonexistent")
        )
        .unwrap(),
        Plan::default()
    );
}

struct Setup {
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    root: PathBuf,
    opts: Options,
}

fn setup() -> Setup {
    let image = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let root = image.path().to_owned();
    debian_image(&root);
    fs::create_dir_all(root.join("sbin")).unwrap();
    fs::write(root.join("sbin/ldconfig"), "").unwrap();
    fs::set_permissions(
        root.join("sbin/ldconfig"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    fs::write(root.join("etc/ld.so.conf"), "/opt/other").unwrap();
    // A stale driver library the image carries: replaced by the link.
    fs::write(root.join("usr/lib/x86_64-linux-gnu/libcuda.so.1"), "stale").unwrap();
    fs::write(
        state.path().join("params"),
        "ResmanDebugLevel: 4294967295\nModifyDeviceFiles: 1\nDeviceFileMode: 438\n",
    )
    .unwrap();
    let opts = Options {
        compat_allowed: true,
        params_source: state.path().join("params"),
        state_dir: state.path().join("run"),
    };
    Setup {
        _dirs: (image, state),
        root,
        opts,
    }
}

#[test]
fn phase_one_mounts_links_ldcache_params() {
    let s = setup();
    let root = &s.root;
    let p = plan(
        &spec("/drv"),
        &VisibleDevices::List(vec![DeviceId::Index(1)]),
        root,
    )
    .unwrap();
    let mut ops = Fake::default();
    ops.numbers.insert("/dev/nvidia-uvm".into(), (511, 0));
    let r = apply_root(&p, root, &s.opts, &mut ops).unwrap();
    assert_eq!(
        ops.binds,
        [
            (
                PathBuf::from(format!("/drv/libcuda.so.{V}")),
                root.join(format!("usr/lib/x86_64-linux-gnu/libcuda.so.{V}"))
            ),
            ("/drv/nvidia-smi".into(), root.join("usr/bin/nvidia-smi")),
        ]
    );
    assert!(
        root.join("usr/bin/nvidia-smi").is_file(),
        "bind target created"
    );
    let lib = root.join("usr/lib/x86_64-linux-gnu");
    assert_eq!(
        fs::read_link(lib.join("libcuda.so.1")).unwrap(),
        PathBuf::from(format!("libcuda.so.{V}"))
    );
    assert_eq!(
        fs::read_link(lib.join("libcuda.so")).unwrap(),
        PathBuf::from("libcuda.so.1")
    );
    assert_eq!((r.mounts, r.links), (2, 2));
    assert_eq!(
        fs::read_to_string(root.join("etc/ld.so.conf.d/00-gpucell-nvidia.conf")).unwrap(),
        format!("{LIB}\n")
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/ld.so.conf")).unwrap(),
        "/opt/other\ninclude /etc/ld.so.conf.d/*.conf\n"
    );
    assert_eq!(ops.ldconfigs, ["/sbin/ldconfig"]);
    assert_eq!(r.ldconfig.as_deref(), Some("/sbin/ldconfig"));
    assert_eq!(r.compat, None);
    // Nodes: uvm numbers from this side, ctl absent here, GPU 1 from the spec.
    assert_eq!(
        r.devices.nodes,
        [
            ("/dev/nvidia-uvm".to_string(), 511, 0),
            ("/dev/nvidia1".to_string(), 195, 1)
        ]
    );
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert!(r.warnings[0].starts_with("/dev/nvidiactl is not a character device"));
    let params = r.devices.params.clone().unwrap();
    assert!(params.starts_with(&s.opts.state_dir));
    assert_eq!(
        fs::read_to_string(params).unwrap(),
        "ResmanDebugLevel: 4294967295\nModifyDeviceFiles: 0\nDeviceFileMode: 438\n"
    );
}

#[test]
fn phase_two_nodes_and_params() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    fs::create_dir_all(root.join("proc/driver/nvidia")).unwrap();
    fs::write(
        root.join("proc/driver/nvidia/params"),
        "ModifyDeviceFiles: 1\n",
    )
    .unwrap();
    let setup = DeviceSetup {
        nodes: vec![
            ("/dev/nvidiactl".into(), 195, 255),
            ("/dev/nvidia0".into(), 195, 0),
        ],
        params: Some("/run/gpucell/nvidia-params".into()),
        ..Default::default()
    };
    let mut ops = Fake::default();
    apply_devices(&setup, root, &mut ops).unwrap();
    assert_eq!(
        ops.nodes,
        [
            (root.join("dev/nvidiactl"), 195, 255, 0o666),
            (root.join("dev/nvidia0"), 195, 0, 0o666)
        ]
    );
    assert_eq!(
        ops.binds,
        [(
            PathBuf::from("/run/gpucell/nvidia-params"),
            root.join("proc/driver/nvidia/params")
        )]
    );
    // No driver in the container's /proc: nothing to cover.
    let d = tempfile::tempdir().unwrap();
    let mut ops = Fake::default();
    apply_devices(&setup, d.path(), &mut ops).unwrap();
    assert!(ops.binds.is_empty());
}

#[test]
fn cuda_forward_compat_on_data_centre_gpus_only() {
    let s = setup();
    let compat = s.root.join("usr/local/cuda/compat");
    fs::create_dir_all(&compat).unwrap();
    fs::write(compat.join("libcuda.so.1"), "").unwrap();
    fs::write(compat.join("libcuda.so.570.124.06"), "").unwrap();
    fs::write(compat.join("libcuda.so.575.57.08"), "").unwrap();
    let p = plan(&spec("/drv"), &VisibleDevices::All, &s.root).unwrap();
    let r = apply_root(&p, &s.root, &s.opts, &mut Fake::default()).unwrap();
    assert_eq!(
        r.compat.as_deref(),
        Some("/usr/local/cuda/compat/libcuda.so.575.57.08")
    );
    let conf = s.root.join("etc/ld.so.conf.d/00-compat-gpucell.conf");
    assert_eq!(
        fs::read_to_string(&conf).unwrap(),
        "/usr/local/cuda/compat\n"
    );
    // The compat file sorts before the driver's.
    assert!("00-compat-gpucell.conf" < "00-gpucell-nvidia.conf");
    fs::remove_file(&conf).unwrap();

    // A GeForce: not used, said so.
    let mut opts = s.opts.clone();
    opts.compat_allowed = false;
    let r = apply_root(&p, &s.root, &opts, &mut Fake::default()).unwrap();
    assert_eq!(r.compat, None);
    assert!(!conf.exists());
    assert!(
        r.warnings.iter().any(|w| w.contains("data-centre")),
        "{:?}",
        r.warnings
    );

    // Same branch as the driver: nothing to do.
    for f in ["libcuda.so.570.124.06", "libcuda.so.575.57.08"] {
        fs::remove_file(compat.join(f)).unwrap();
    }
    fs::write(compat.join("libcuda.so.550.54.15"), "").unwrap();
    let r = apply_root(&p, &s.root, &s.opts, &mut Fake::default()).unwrap();
    assert_eq!(r.compat, None);
    assert!(!conf.exists());
}

#[test]
fn hostile_image_links_stay_in_the_root() {
    let s = setup();
    let root = &s.root;
    // The image's library directory points "outside"; usr/bin too.
    fs::remove_dir_all(root.join("usr/lib/x86_64-linux-gnu")).unwrap();
    symlink(
        "../../../../../../tmp/escape",
        root.join("usr/lib/x86_64-linux-gnu"),
    )
    .unwrap();
    fs::create_dir_all(root.join("tmp/escape")).unwrap();
    symlink("/etc", root.join("usr/bin")).unwrap();
    let p = plan(&spec("/drv"), &VisibleDevices::All, root).unwrap();
    let mut ops = Fake::default();
    apply_root(&p, root, &s.opts, &mut ops).unwrap();
    for (_, dst) in &ops.binds {
        assert!(dst.starts_with(root), "{}", dst.display());
    }
    assert!(root.join(format!("tmp/escape/libcuda.so.{V}")).exists());
    assert!(root.join("etc/nvidia-smi").exists());
    assert!(fs::symlink_metadata(root.join("tmp/escape/libcuda.so.1")).is_ok());
}

#[test]
fn ldconfig_failures_and_absence() {
    let s = setup();
    let p = plan(&spec("/drv"), &VisibleDevices::None, &s.root).unwrap();
    let mut ops = Fake {
        ldconfig_fails: Some("exit status: 1: ldconfig: bad".into()),
        ..Default::default()
    };
    let err = apply_root(&p, &s.root, &s.opts, &mut ops).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the image's /sbin/ldconfig failed refreshing ld.so.cache: exit status: 1: ldconfig: bad"
    );
    // Ubuntu's wrapper is skipped for ldconfig.real.
    fs::write(s.root.join("sbin/ldconfig.real"), "").unwrap();
    fs::set_permissions(
        s.root.join("sbin/ldconfig.real"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let mut ops = Fake::default();
    apply_root(&p, &s.root, &s.opts, &mut ops).unwrap();
    assert_eq!(ops.ldconfigs, ["/sbin/ldconfig.real"]);
    // No ldconfig at all: a warning, not a failure.
    fs::remove_dir_all(s.root.join("sbin")).unwrap();
    let r = apply_root(&p, &s.root, &s.opts, &mut Fake::default()).unwrap();
    assert!(
        r.warnings.iter().any(|w| w.contains("no ldconfig")),
        "{:?}",
        r.warnings
    );
    assert_eq!(r.ldconfig, None);
}

#[test]
fn a_directory_where_a_library_goes_is_refused() {
    let s = setup();
    fs::create_dir_all(
        s.root
            .join(format!("usr/lib/x86_64-linux-gnu/libcuda.so.{V}")),
    )
    .unwrap();
    let p = plan(&spec("/drv"), &VisibleDevices::All, &s.root).unwrap();
    let err = apply_root(&p, &s.root, &s.opts, &mut Fake::default()).unwrap_err();
    assert!(matches!(err, InjectError::IsDir { .. }), "{err}");
}

#[test]
fn params_copy_turns_device_file_modification_off() {
    assert_eq!(
        modify_device_files_off("A: 1\nModifyDeviceFiles: 1\nB: 2"),
        "A: 1\nModifyDeviceFiles: 0\nB: 2\n"
    );
    assert_eq!(
        modify_device_files_off("A: 1\n"),
        "A: 1\nModifyDeviceFiles: 0\n"
    );
}

mod real;

#[test]
fn refused_mknod_falls_back_to_binding_the_agents_node() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let setup = DeviceSetup {
        nodes: vec![
            ("/dev/nvidiactl".into(), 195, 255),
            ("/dev/nvidia0".into(), 195, 0),
        ],
        params: None,
        sources: vec![
            ("/dev/nvidiactl".into(), "/dev/nvidiactl".into()),
            ("/dev/nvidia0".into(), "/host/dev/nvidia0".into()),
        ],
    };
    let mut ops = Fake {
        mknod_fails: Some(Errno::EPERM),
        ..Default::default()
    };
    ops.numbers.insert("/dev/nvidiactl".into(), (195, 255));
    ops.numbers.insert("/host/dev/nvidia0".into(), (195, 0));
    let done = apply_devices(&setup, root, &mut ops).unwrap();
    assert_eq!((done.created, done.bound, done.params), (0, 2, false));
    assert_eq!(
        ops.node_binds,
        [
            (PathBuf::from("/dev/nvidiactl"), root.join("dev/nvidiactl")),
            (PathBuf::from("/host/dev/nvidia0"), root.join("dev/nvidia0")),
        ]
    );
    // The agent's node has other numbers: no bind, the refusal stands.
    ops.numbers.insert("/host/dev/nvidia0".into(), (195, 1));
    let err = apply_devices(&setup, tempfile::tempdir().unwrap().path(), &mut ops).unwrap_err();
    assert_eq!(
        crate::chain(&err),
        "creating device node /dev/nvidia0 in the container: EPERM: Operation not permitted"
    );
    // Another error than a refusal is not papered over.
    ops.mknod_fails = Some(Errno::ENOSPC);
    let err = apply_devices(&setup, tempfile::tempdir().unwrap().path(), &mut ops).unwrap_err();
    assert!(matches!(
        err,
        InjectError::Mknod {
            source: Errno::ENOSPC,
            ..
        }
    ));
    // Phase one records where each planned node comes from.
    let s = setup_fn_sources();
    assert_eq!(
        s,
        [
            (
                "/dev/nvidia-uvm".to_string(),
                PathBuf::from("/dev/nvidia-uvm")
            ),
            ("/dev/nvidia1".to_string(), PathBuf::from("/dev/nvidia1"))
        ]
    );
}

fn setup_fn_sources() -> Vec<(String, PathBuf)> {
    let s = setup();
    let p = plan(
        &spec("/drv"),
        &VisibleDevices::List(vec![DeviceId::Index(1)]),
        &s.root,
    )
    .unwrap();
    let mut ops = Fake::default();
    ops.numbers.insert("/dev/nvidia-uvm".into(), (511, 0));
    apply_root(&p, &s.root, &s.opts, &mut ops)
        .unwrap()
        .devices
        .sources
}

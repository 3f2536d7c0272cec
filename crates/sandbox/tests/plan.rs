//! `Sandbox::plan`: the command line a run starts, computed without starting anything.
//!
//! - Golden files (`tests/golden/run-*.args`) of whole planned command lines: the
//!   arguments a run passes to QEMU, not a copy assembled by the test. Regenerate with
//!   `GPUCELL_UPDATE_GOLDEN=1 cargo test -p gpucell-sandbox --test plan`.
//! - A plan creates nothing and gives the refusals a run gives before spawning.
//! - With the guest built (`GPUCELL_TEST_STATE_DIR`), a real run under TCG passes QEMU
//!   exactly the planned arguments (but for the vsock port a plan cannot know).

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpucell_protocol::{RootfsSpec, RunSpec};
use gpucell_sandbox::caps::QemuCaps;
use gpucell_sandbox::channel::{Limits, SessionIo};
use gpucell_sandbox::devices::{DeviceSetup, MemlockLimits, PassthroughDevice};
use gpucell_sandbox::{
    Accel, ChannelChoice, ChannelKind, Plan, RunAsPolicy, Sandbox, SandboxError, VmConfig,
};

const ID: &str = "0123456789abcdef";
const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const GIB: u64 = 1 << 30;

fn check(name: &str, args: &[String]) {
    let rendered = args.join("\n") + "\n";
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/{name}.args"));
    if std::env::var_os("GPUCELL_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &rendered).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with GPUCELL_UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert_eq!(rendered, want, "{name}: differs from {}", path.display());
}

/// A VM as `gpucell run` configures it, with fixed paths.
fn config(state: &Path, host_root: &Path, accel: Accel) -> VmConfig {
    VmConfig {
        qemu: QEMU.into(),
        kernel: "/var/lib/gpucell/guest/default/vmlinux".into(),
        initrd: "/var/lib/gpucell/guest/default/initramfs.cpio".into(),
        disk: "/var/lib/gpucell/images/sha256-ab/rootfs.erofs".into(),
        cpus: 2,
        memory_mib: 1024,
        accel,
        state_dir: state.to_path_buf(),
        host_root: host_root.to_path_buf(),
        channel: ChannelChoice::Auto,
        run_as: RunAsPolicy::User("nobody".into()),
        seccomp: true,
        limits: Limits::default(),
        extra_cmdline: vec![],
        driver_disk: None,
    }
}

fn caps(major: u32, minor: u32, seccomp: bool) -> QemuCaps {
    QemuCaps {
        major,
        minor,
        seccomp,
    }
}

/// A host root with these files (relative path, contents).
fn host_root(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (rel, text) in files {
        let p = d.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    d
}

fn cpuinfo(bits: u32) -> String {
    format!("processor\t: 0\naddress sizes\t: {bits} bits physical, 48 bits virtual\n")
}

fn gpu(bdf: &str, mmio64_bytes: u64, local_cpus: Vec<u32>) -> PassthroughDevice {
    PassthroughDevice {
        host_bdf: bdf.into(),
        vendor: 0x10de,
        device: 0x2684,
        class: 0x030000,
        mmio64_bytes,
        numa_node: Some(0),
        local_cpus,
        companions: vec![],
    }
}

fn setup(devices: Vec<PassthroughDevice>, pin_cpus: bool) -> DeviceSetup {
    DeviceSetup {
        devices,
        hugepages: false,
        memory: Default::default(),
        pin_cpus,
        wait: Duration::from_secs(10),
    }
}

/// Locked memory without bound: the device plans below do not depend on the limits of
/// the process running the tests.
const UNLIMITED: MemlockLimits = MemlockLimits {
    hard_bytes: Some(u64::MAX),
    can_raise: false,
};

fn sandbox(cfg: VmConfig) -> Sandbox {
    Sandbox::with_id(cfg, ID.into())
        .unwrap()
        .with_memlock_limits(UNLIMITED)
}

/// Every file and directory under `dir`.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            out.push(e.path());
            out.extend(tree(&e.path()));
        }
    }
    out.sort();
    out
}

#[test]
fn a_tcg_run_on_a_host_without_vsock_plans_virtio_serial() {
    let root = host_root(&[]);
    let cfg = config(Path::new("/var/lib/gpucell"), root.path(), Accel::Tcg);
    let plan = sandbox(cfg)
        .with_qemu_caps(caps(7, 2, true))
        .plan("erofs")
        .unwrap();
    assert_eq!(plan.channel, ChannelKind::Serial);
    assert_eq!(plan.vsock_cid, None);
    assert_eq!(plan.run_dir, Path::new("/var/lib/gpucell/run").join(ID));
    assert!(plan.seccomp && plan.warnings.is_empty(), "{plan:?}");
    assert!(plan.vcpu_pin_targets.is_empty());
    check("run-tcg-serial", &plan.qemu_args);
}

#[test]
fn a_kvm_run_with_vsock_and_two_gpus_plans_the_whole_command() {
    let info = cpuinfo(46);
    let root = host_root(&[("dev/vhost-vsock", ""), ("proc/cpuinfo", &info)]);
    let mut cfg = config(Path::new("/var/lib/gpucell"), root.path(), Accel::Kvm);
    cfg.cpus = 4;
    cfg.memory_mib = 8192;
    cfg.extra_cmdline = vec!["loglevel=4".into()];
    let bar = 32 * GIB + (32 << 20);
    let gpus = vec![
        gpu("0000:17:00.0", bar, vec![2, 3]),
        gpu("0000:3d:00.0", bar, vec![3]),
    ];
    let plan = sandbox(cfg)
        .with_devices(setup(gpus, true))
        .with_qemu_caps(caps(9, 1, true))
        .plan("ext4")
        .unwrap();
    assert_eq!(plan.channel, ChannelKind::Vsock);
    let cid = plan.vsock_cid.unwrap();
    assert!(cid >= 3);
    // Each 32 GiB + 32 MiB BAR rounds to 64 GiB: 2 x 64 + 64 + 32 GiB.
    assert_eq!(plan.pci_hole64_bytes, Some(224 * GIB));
    assert_eq!(plan.vcpu_pin_targets, vec![2, 3, 2, 3]);
    let append = &plan.qemu_args[plan.qemu_args.iter().position(|a| a == "-append").unwrap() + 1];
    assert!(append.contains("gpucell.vsock_port=0"), "{append}");
    // The CID is random per sandbox: the golden file names it CID.
    let args: Vec<String> = plan
        .qemu_args
        .iter()
        .map(|a| a.replace(&format!("guest-cid={cid}"), "guest-cid=CID"))
        .collect();
    check("run-kvm-vsock-passthrough", &args);
}

#[test]
fn a_plan_creates_nothing_and_writes_nothing() {
    let state = tempfile::tempdir().unwrap();
    let root = host_root(&[("dev/vhost-vsock", "")]);
    let mut cfg = config(state.path(), root.path(), Accel::Tcg);
    // Asked for explicitly, vsock is planned without binding a port.
    cfg.channel = ChannelChoice::Vsock;
    let sb = sandbox(cfg.clone());
    // Without known capabilities the plan asks QEMU itself (when installed) but caches
    // nothing in the state dir.
    let sb = if Path::new(QEMU).exists() {
        sb
    } else {
        sb.with_qemu_caps(caps(7, 2, true))
    };
    let plan = sb.plan("erofs").unwrap();
    assert_eq!(plan.channel, ChannelKind::Vsock);
    assert!(!plan.run_dir.exists());
    assert_eq!(tree(state.path()), Vec::<PathBuf>::new());
    // The same again with devices and hugepages asked for (read under the host root).
    let root = host_root(&[
        (
            "proc/self/mounts",
            "hugetlbfs /dev/hugepages hugetlbfs rw,pagesize=2M 0 0\n",
        ),
        ("proc/meminfo", "Hugepagesize:       2048 kB\n"),
        (
            "sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages",
            "512\n",
        ),
    ]);
    cfg.host_root = root.path().to_path_buf();
    let mut s = setup(vec![], false);
    s.hugepages = true;
    let plan = sandbox(cfg)
        .with_devices(s)
        .with_qemu_caps(caps(7, 2, true))
        .plan("erofs")
        .unwrap();
    assert!(plan
        .qemu_args
        .iter()
        .any(|a| a.contains("mem-path=/dev/hugepages")));
    assert_eq!(tree(state.path()), Vec::<PathBuf>::new());
}

#[test]
fn a_plan_says_what_a_run_would_warn_about() {
    let root = host_root(&[("proc/cpuinfo", &cpuinfo(52))]);
    let mut cfg = config(Path::new("/var/lib/gpucell"), root.path(), Accel::Kvm);
    cfg.memory_mib = 4096;
    let plan = sandbox(cfg.clone())
        .with_qemu_caps(caps(7, 2, false))
        .plan("erofs")
        .unwrap();
    assert!(!plan.seccomp);
    assert!(!plan.qemu_args.iter().any(|a| a == "-sandbox"));
    assert_eq!(
        plan.warnings,
        vec!["this QEMU has no seccomp support (-sandbox); running without it".to_string()]
    );
    // Four 256 GiB BARs end the hole beyond 1 TiB.
    let gpus = (0..4)
        .map(|i| gpu(&format!("0000:0{}:00.0", i + 6), 256 * GIB, vec![]))
        .collect();
    let plan = sandbox(cfg)
        .with_devices(setup(gpus, false))
        .with_qemu_caps(caps(7, 2, true))
        .plan("erofs");
    match plan {
        Err(SandboxError::Devices(gpucell_sandbox::devices::DevicesError::Memlock { .. })) => {
            eprintln!("skipping the device half: this process cannot lock the guest memory");
        }
        p => {
            let plan = p.unwrap();
            assert_eq!(plan.warnings.len(), 1, "{:?}", plan.warnings);
            assert!(
                plan.warnings[0].contains("beyond 1 TiB"),
                "{:?}",
                plan.warnings
            );
        }
    }
}

fn spec(args: &[&str], fstype: &str) -> RunSpec {
    RunSpec {
        args: args.iter().map(|a| a.to_string()).collect(),
        env: vec!["PATH=/bin".into()],
        cwd: "/".into(),
        user: String::new(),
        hostname: "plan".into(),
        rootfs: RootfsSpec {
            device: "/dev/vda".into(),
            fstype: fstype.into(),
        },
        overlay_bytes: None,
        devices: vec![],
        device_wait_ms: 0,
        gpu: None,
        pod_sandbox: false,
        etc_files: Vec::new(),
        terminal: false,
        window: None,
        volumes: Vec::new(),
    }
}

fn sink_io() -> SessionIo {
    SessionIo {
        stdout: Box::new(std::io::sink()),
        stderr: Box::new(std::io::sink()),
        stdin: None,
    }
}

/// Runs and plans refuse the same configurations with the same words, and the run
/// leaves no run directory.
#[test]
fn a_plan_refuses_what_a_run_refuses() {
    let state = tempfile::tempdir().unwrap();
    let root = host_root(&[("proc/cpuinfo", &cpuinfo(39))]);
    let base = config(state.path(), root.path(), Accel::Kvm);
    let mut cases: Vec<(&str, VmConfig, DeviceSetup)> = Vec::new();
    let mut c = base.clone();
    c.cpus = 0;
    cases.push(("0 vCPUs", c, setup(vec![], false)));
    let mut c = base.clone();
    c.extra_cmdline = vec!["two words".into()];
    cases.push(("whitespace", c, setup(vec![], false)));
    let mut c = base.clone();
    c.state_dir = state.path().join("x".repeat(100));
    cases.push(("unix sockets allow", c, setup(vec![], false)));
    // A hole needing more address bits than the host CPU's 39.
    let gpus = (0..4)
        .map(|i| {
            gpu(
                &format!("0000:0{}:00.0", i + 6),
                256 * GIB + (48 << 20),
                vec![],
            )
        })
        .collect();
    cases.push(("has 39", base.clone(), setup(gpus, false)));
    // --pin-cpus without any local CPU to pin to.
    let gpus = vec![gpu("0000:06:00.0", 0, vec![])];
    cases.push((
        "no device reports local CPUs",
        base.clone(),
        setup(gpus, true),
    ));
    cases.push((
        "passed twice",
        base.clone(),
        setup(
            vec![
                gpu("0000:06:00.0", 0, vec![]),
                gpu("0000:06:00.0", 0, vec![]),
            ],
            false,
        ),
    ));
    let chain = |e: &dyn std::error::Error| {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s.push_str(&format!(": {c}"));
            cur = c.source();
        }
        s
    };
    let low = MemlockLimits {
        hard_bytes: Some(64 << 20),
        can_raise: false,
    };
    let gpus = vec![gpu("0000:06:00.0", 0, vec![])];
    cases.push(("locked-memory limit", base.clone(), setup(gpus, false)));
    for (words, cfg, devices) in cases {
        let make = || {
            let sb = sandbox(cfg.clone())
                .with_devices(devices.clone())
                .with_qemu_caps(caps(7, 2, true));
            if words == "locked-memory limit" {
                sb.with_memlock_limits(low)
            } else {
                sb
            }
        };
        let planned = chain(&make().plan("erofs").unwrap_err());
        assert!(planned.contains(words), "{words}: {planned}");
        let ran = make()
            .run(&spec(&["true"], "erofs"), sink_io())
            .unwrap_err();
        assert!(!ran.vm_started);
        assert_eq!(chain(&ran), planned, "{words}");
        assert_eq!(tree(&state.path().join("run")), Vec::<PathBuf>::new());
    }
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The built guest (`GPUCELL_TEST_STATE_DIR`), QEMU, busybox and mkfs.ext4, or why not.
fn vm_inputs(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf), String> {
    let state = std::env::var_os("GPUCELL_TEST_STATE_DIR")
        .map(PathBuf::from)
        .ok_or(
            "GPUCELL_TEST_STATE_DIR is not set (make test sets it after `gpucell guest build`)",
        )?;
    let g = state.join("guest/default");
    let (kernel, initrd) = (g.join("vmlinux"), g.join("initramfs.cpio"));
    if !kernel.is_file() || !initrd.is_file() {
        return Err(format!("no guest built in {}", g.display()));
    }
    if !Path::new(QEMU).exists() {
        return Err(format!("{QEMU} is not installed"));
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .ok_or("busybox-static is not installed")?;
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::copy(busybox, tree.join("bin/busybox")).unwrap();
    let disk = dir.join("disk.ext4");
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&disk)
        .arg("16M")
        .output()
        .map_err(|e| format!("mkfs.ext4 (e2fsprogs) cannot run: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok((kernel, initrd, disk))
}

/// The `-append` word `gpucell.vsock_port=N` with N replaced: the one thing a plan
/// cannot know.
fn without_vsock_port(args: &[String]) -> Vec<String> {
    args.iter()
        .map(|a| {
            a.split(' ')
                .map(|w| match w.split_once('=') {
                    Some((gpucell_protocol::CMDLINE_VSOCK_PORT_KEY, _)) => "gpucell.vsock_port=N",
                    _ => w,
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[test]
fn a_real_run_passes_qemu_the_planned_arguments() {
    let dir = tempfile::Builder::new()
        .prefix("gcp")
        .tempdir_in("/tmp")
        .unwrap();
    let (kernel, initrd, disk) = match vm_inputs(dir.path()) {
        Ok(x) => x,
        Err(why) => {
            eprintln!("skipping: {why}");
            return;
        }
    };
    let state = dir.path().join("state");
    let cfg = VmConfig {
        qemu: QEMU.into(),
        kernel,
        initrd,
        disk,
        cpus: 1,
        memory_mib: 256,
        accel: Accel::Tcg,
        state_dir: state.clone(),
        host_root: "/".into(),
        channel: ChannelChoice::Auto,
        run_as: RunAsPolicy::Auto,
        seccomp: true,
        limits: Limits {
            hello_timeout: Duration::from_secs(120),
            start_timeout: Duration::from_secs(120),
            ..Limits::default()
        },
        extra_cmdline: vec![],
        driver_disk: None,
    };
    let sb = Sandbox::new(cfg).unwrap();
    let spec = spec(&["/bin/busybox", "echo", "planned"], "ext4");
    let plan: Plan = sb.plan(&spec.rootfs.fstype).unwrap();
    assert!(!plan.run_dir.exists());
    let out = Sink::default();
    let io = SessionIo {
        stdout: Box::new(out.clone()),
        stderr: Box::new(std::io::sink()),
        stdin: None,
    };
    let outcome = match sb.run(&spec, io) {
        Ok(o) => o,
        Err(e) => panic!("run failed: {e}\nconsole:\n{}", e.console_tail),
    };
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(String::from_utf8_lossy(&out.0.lock().unwrap()), "planned\n");
    assert_eq!(outcome.channel, plan.channel);
    assert_eq!(
        without_vsock_port(&outcome.qemu_args),
        without_vsock_port(&plan.qemu_args)
    );
    assert!(!plan.run_dir.exists());
}

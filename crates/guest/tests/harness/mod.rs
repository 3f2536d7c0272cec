//! The host side of the guest boot tests: builds the artifacts, makes busybox images,
//! boots QEMU and talks the protocol to the agent.
#![allow(clippy::unwrap_used, dead_code)]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpucell_protocol::{
    ExitStatus, FrameReader, FrameWriter, FromGuest, FromHost, HostHello, RootfsSpec, RunSpec,
    PROTOCOL_VERSION,
};

pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn kernel_deb() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GPUCELL_TEST_KERNEL_DEB") {
        return Some(PathBuf::from(p));
    }
    [
        "/tmp/gpucell-test-debs",
        "/var/cache/apt/archives",
        "/var/lib/gpucell/guest/cache/debs",
    ]
    .iter()
    .flat_map(|d| std::fs::read_dir(d).into_iter().flatten())
    .filter_map(|e| e.ok().map(|e| e.path()))
    .filter(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("linux-image-6") && n.ends_with(".deb"))
    })
    .max()
}

/// The static agent: `$GPUCELL_AGENT`, or the `make agent` output under the workspace
/// target dir (or `$CARGO_TARGET_DIR`).
pub fn agent() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GPUCELL_AGENT") {
        return Some(PathBuf::from(p));
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut dirs = vec![ws.join("target")];
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.insert(0, PathBuf::from(t));
    }
    dirs.into_iter()
        .map(|d| d.join("x86_64-unknown-linux-gnu/release/gpucell-agent"))
        .find(|p| p.is_file())
}

pub struct Env {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

pub fn setup() -> Option<Env> {
    for tool in ["qemu-system-x86_64", "mkfs.ext4", "mkfs.erofs"] {
        if !have(tool) {
            eprintln!("skipping: `{tool}` is not installed (scripts/install-deps.sh)");
            return None;
        }
    }
    if !Path::new("/bin/busybox").is_file() {
        eprintln!("skipping: /bin/busybox missing (apt-get install busybox-static)");
        return None;
    }
    let Some(deb) = kernel_deb() else {
        eprintln!("skipping: no Debian kernel .deb cached (set GPUCELL_TEST_KERNEL_DEB)");
        return None;
    };
    let Some(agent) = agent() else {
        eprintln!(
            "skipping: no static agent build; run `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build \
             --release -p gpucell-agent --target x86_64-unknown-linux-gnu` or set GPUCELL_AGENT"
        );
        return None;
    };
    // A persistent state dir under the target dir: later runs reuse the cached build.
    let state = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest-boot-state");
    let opts = gpucell_guest::BuildOptions {
        agent: Some(agent),
        kernel_deb: Some(deb),
        ..Default::default()
    };
    let art = gpucell_guest::build(&state, &opts).unwrap();
    Some(Env {
        kernel: art.kernel,
        initrd: art.initrd,
    })
}

/// A busybox image: /bin with applet links, /etc/passwd and /etc/group, /work.
pub fn image(dir: &Path, fstype: &str) -> PathBuf {
    let tree = dir.join("tree");
    for d in ["bin", "etc", "work", "home/app"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "echo", "cat", "id", "hostname", "ls", "sleep", "mount", "pwd", "touch",
    ] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        tree.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        tree.join("etc/group"),
        "root:x:0:\nvideo:x:44:app\napp:x:1000:\n",
    )
    .unwrap();
    let img = dir.join(format!("rootfs.{fstype}"));
    let out = match fstype {
        "ext4" => Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&img)
            .arg("32M")
            .output()
            .unwrap(),
        _ => Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg(&img)
            .arg(&tree)
            .output()
            .unwrap(),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

pub struct Vm {
    pub child: Child,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the host saw in one run.
#[derive(Default, Debug)]
pub struct Seen {
    pub hello: bool,
    pub devices: Option<Vec<gpucell_protocol::DeviceInfo>>,
    pub started: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exited: Option<ExitStatus>,
    pub error: Option<String>,
    pub logs: Vec<String>,
    pub console: String,
}

pub fn boot_and_run(
    env: &Env,
    dir: &Path,
    disk: &Path,
    fstype: &str,
    spec: RunSpec,
    stdin: &[u8],
) -> Seen {
    boot_and_run_with(env, dir, disk, fstype, spec, stdin, None)
}

/// What the host does once the first stdout chunk arrives.
#[derive(Clone, Copy)]
pub enum OnOutput {
    Signal(i32),
    Shutdown,
}

/// Which channel the guest talks on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Chan {
    Serial,
    /// vhost-user vsock through `vhost-device-vsock` (the host kernel has no vhost-vsock).
    Vsock,
}

pub fn boot_and_run_with(
    env: &Env,
    dir: &Path,
    disk: &Path,
    fstype: &str,
    spec: RunSpec,
    stdin: &[u8],
    on_output: Option<OnOutput>,
) -> Seen {
    boot_and_run_on(Chan::Serial, env, dir, disk, fstype, spec, stdin, on_output)
}

#[allow(clippy::too_many_arguments)]
pub fn boot_and_run_on(
    chan: Chan,
    env: &Env,
    dir: &Path,
    disk: &Path,
    fstype: &str,
    spec: RunSpec,
    stdin: &[u8],
    on_output: Option<OnOutput>,
) -> Seen {
    let sock = dir.join("agent.sock");
    let console = dir.join("console.log");
    let mut qemu = qemu_command(env, dir, disk, &console);
    // Declared before `vm`, so it outlives QEMU on every exit path.
    let mut _vhost = None;
    let mut listener = None;
    match chan {
        Chan::Serial => attach_serial(&mut qemu, &sock),
        Chan::Vsock => {
            let (vhost, l) = attach_vsock(&mut qemu, dir);
            _vhost = Some(vhost);
            listener = Some(l);
        }
    }
    let started = Instant::now();
    let mut vm = Vm {
        child: qemu.spawn().unwrap(),
    };
    let stream = await_guest(&mut vm, listener.as_ref(), &sock, &console, dir);
    let spec = RunSpec {
        rootfs: RootfsSpec {
            device: "/dev/vda".into(),
            fstype: fstype.into(),
        },
        ..spec
    };
    // The host end of the channel stays open until QEMU has exited.
    let mut seen = converse(&stream, &spec, stdin, on_output, started);
    await_power_off(&mut vm);
    let _ = std::io::stderr().flush();
    seen.console = std::fs::read_to_string(&console).unwrap_or_default();
    seen
}

/// QEMU with the kernel, initrd, the read-only disk and the `edu` device; the channel
/// is added by `attach_serial` or `attach_vsock`.
fn qemu_command(env: &Env, dir: &Path, disk: &Path, console: &Path) -> Command {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-M", "q35", "-accel", "tcg", "-m", "256M", "-smp", "1"])
        .args(["-nodefaults", "-no-reboot", "-display", "none", "-serial"])
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&env.kernel)
        .arg("-initrd")
        .arg(&env.initrd)
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=d0,format=raw,readonly=on",
            disk.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0"])
        // QEMU's `edu` test device (1234:11e8) stands in for a passed-through function.
        .args(["-device", "edu"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("qemu.stderr")).unwrap());
    qemu
}

/// The virtio-serial channel: QEMU serves `sock`, the host connects to it.
fn attach_serial(qemu: &mut Command, sock: &Path) {
    qemu.args([
        "-append",
        "console=ttyS0 panic=-1 quiet gpucell.channel=serial",
    ])
    .arg("-chardev")
    .arg(format!(
        "socket,id=ch,path={},server=on,wait=off",
        sock.display()
    ))
    .args(["-device", "virtio-serial-pci"])
    .args([
        "-device",
        "virtserialport,chardev=ch,name=org.gpucell.agent.0",
    ]);
}

/// The vsock channel: starts `vhost-device-vsock` and listens where guest connections
/// arrive. Returns the daemon (killed on drop) and the listener.
fn attach_vsock(qemu: &mut Command, dir: &Path) -> (Vm, std::os::unix::net::UnixListener) {
    let vhost_sock = dir.join("vhost.sock");
    let uds = dir.join("vm.vsock");
    // Guest connections to host port P arrive on `<uds>_P`.
    let l = std::os::unix::net::UnixListener::bind(format!(
        "{}_{}",
        uds.display(),
        gpucell_protocol::VSOCK_PORT
    ))
    .unwrap();
    l.set_nonblocking(true).unwrap();
    let child = Command::new(vhost_device_vsock().unwrap())
        .arg("--vm")
        .arg(format!(
            "guest-cid=3,socket={},uds-path={}",
            vhost_sock.display(),
            uds.display()
        ))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("vhost.stderr")).unwrap())
        .spawn()
        .unwrap();
    let vhost = Vm { child };
    let until = Instant::now() + Duration::from_secs(10);
    while !vhost_sock.exists() {
        assert!(
            Instant::now() < until,
            "vhost-device-vsock did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    qemu.args([
        "-append",
        "console=ttyS0 panic=-1 quiet gpucell.channel=vsock",
    ])
    .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
    .args(["-machine", "memory-backend=mem"])
    .arg("-chardev")
    .arg(format!("socket,id=vs,path={}", vhost_sock.display()))
    .args(["-device", "vhost-user-vsock-pci,chardev=vs"]);
    (vhost, l)
}

/// Waits for the guest's connection (on `listener` for vsock, else by connecting to
/// `sock`), failing if QEMU exits first or `BOOT_TIMEOUT` passes.
fn await_guest(
    vm: &mut Vm,
    listener: Option<&std::os::unix::net::UnixListener>,
    sock: &Path,
    console: &Path,
    dir: &Path,
) -> UnixStream {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let stream = loop {
        let got = match listener {
            None => UnixStream::connect(sock).ok(),
            Some(l) => l.accept().ok().map(|(s, _)| s),
        };
        if let Some(s) = got {
            s.set_nonblocking(false).unwrap();
            break s;
        }
        if let Some(st) = vm.child.try_wait().unwrap() {
            panic!(
                "QEMU exited with {st} before the agent connected; console:\n{}\nqemu: {}",
                std::fs::read_to_string(console).unwrap_or_default(),
                std::fs::read_to_string(dir.join("qemu.stderr")).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no connection from the guest within {BOOT_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    stream.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();
    stream
}

/// Talks the protocol until the agent closes the channel: answers the hello with `spec`,
/// feeds `stdin`, applies `on_output` at the first stdout chunk, records the rest.
fn converse(
    stream: &UnixStream,
    spec: &RunSpec,
    stdin: &[u8],
    mut on_output: Option<OnOutput>,
    started: Instant,
) -> Seen {
    let mut r = FrameReader::new(stream.try_clone().unwrap());
    let mut w = FrameWriter::new(stream);
    let mut seen = Seen::default();
    while let Ok(frame) = r.read_frame() {
        match FromGuest::decode(frame).unwrap() {
            FromGuest::Hello(h) => {
                assert_eq!(h.version, PROTOCOL_VERSION);
                assert!(h.kernel.starts_with("6."), "{}", h.kernel);
                assert!(h.uptime_ms > 0);
                eprintln!(
                    "agent hello: guest uptime {} ms, {} ms after QEMU was started",
                    h.uptime_ms,
                    started.elapsed().as_millis()
                );
                seen.hello = true;
                FromHost::Hello(HostHello {
                    version: PROTOCOL_VERSION,
                })
                .send(&mut w)
                .unwrap();
                FromHost::Run(Box::new(spec.clone())).send(&mut w).unwrap();
            }
            FromGuest::Devices(d) => seen.devices = Some(d),
            FromGuest::Started { pid } => {
                assert!(pid > 1);
                seen.started = true;
                if !stdin.is_empty() {
                    FromHost::Stdin(stdin.to_vec()).send(&mut w).unwrap();
                }
                FromHost::StdinEof.send(&mut w).unwrap();
            }
            FromGuest::Stdout(d) => {
                seen.stdout.extend(d);
                match on_output.take() {
                    Some(OnOutput::Signal(sig)) => FromHost::Signal(sig).send(&mut w).unwrap(),
                    Some(OnOutput::Shutdown) => FromHost::Shutdown.send(&mut w).unwrap(),
                    None => {}
                }
            }
            FromGuest::Stderr(d) => seen.stderr.extend(d),
            FromGuest::Exited(s) => seen.exited = Some(s),
            FromGuest::Error { message } => seen.error = Some(message),
            FromGuest::Log { message } => seen.logs.push(message),
            FromGuest::Driver(d) => seen.logs.push(format!("driver: {d:?}")),
            // This host starts no process besides the workload.
            m => panic!("the agent sent {m:?} for a process nobody started"),
        }
    }
    seen
}

/// The agent powers the VM off by itself: waits up to 30 s for QEMU to exit cleanly.
fn await_power_off(vm: &mut Vm) {
    let wait_until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = vm.child.try_wait().unwrap() {
            assert!(st.success(), "QEMU exited with {st}");
            break;
        }
        assert!(Instant::now() < wait_until, "the guest did not power off");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `vhost-device-vsock`, from PATH or `$VHOST_DEVICE_VSOCK`.
pub fn vhost_device_vsock() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VHOST_DEVICE_VSOCK") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("vhost-device-vsock"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.is_file())
}

//! The workload's container: the image mounted read-only under a writable overlay, and a
//! process in its own mount, pid and uts namespaces, `pivot_root`ed into that overlay.
//!
//! The image comes from the run's block device ([`mount_rootfs`]) or, for the GPU test
//! harness outside a VM, from a directory ([`mount_dir_rootfs`]); both end in the same
//! overlay. The NVIDIA driver's device nodes ([`Prepared::with_devices`]) are made in the
//! child after its `/dev` and `/proc` are mounted and before `pivot_root`.

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gpucell_protocol::RunSpec;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use nix::unistd::{self, Gid, Pid, Uid};

use crate::inject::{self, DeviceSetup, RealOps};
use crate::rootpath::{self, RootPathError};
use crate::users::{self, Ids, UserError};

mod exec;
mod pod;
mod tty;
mod volumes;
pub use exec::spawn_exec;
pub use pod::spawn_holder;
use pod::{wait_for_disk, HOTPLUG_WAIT, SYS_BLOCK};
pub use tty::{eof_char, set_size};
pub use volumes::{stage as stage_volumes, VolumeMount, EMPTY_DIR_BASE};

const IMAGE_DIR: &str = "/mnt/image";
const RW_DIR: &str = "/mnt/rw";
const ROOT_DIR: &str = "/mnt/root";
/// How long the image's block device may take to appear.
const DEVICE_WAIT: Duration = Duration::from_secs(5);
/// Largest /etc/passwd or /etc/group read from the image.
const MAX_ID_FILE: u64 = 4 << 20;
/// Bounds on what a spec may ask for.
const MAX_ARGS: usize = 4096;
const MAX_ENV: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("root filesystem type `{0}` is not supported (expected erofs or ext4)")]
    FsType(String),
    #[error("root filesystem device `{0}` is not a /dev/vd* block device or a disk serial (`serial:NAME`)")]
    BadDevice(String),
    #[error("root filesystem device {0} did not appear within {1:?}")]
    NoDevice(String, Duration),
    #[error("mounting {what} on {target} failed")]
    Mount {
        what: String,
        target: String,
        #[source]
        source: Errno,
    },
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Exec(#[from] RootPathError),
    #[error("the run spec's {0} contains a NUL byte")]
    Nul(&'static str),
    #[error("the run spec has {0} {1}, over the limit of {2}")]
    TooMany(usize, &'static str, usize),
    #[error("working directory `{0}` must be an absolute path")]
    Cwd(String),
    #[error("{0} failed")]
    Sys(&'static str, #[source] Errno),
    #[error("starting the workload failed: {0}")]
    Child(String),
    #[error("{0}")]
    Volume(String),
}

fn mnt(
    src: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), ContainerError> {
    let _ = fs::create_dir_all(target);
    mount(Some(src), target, Some(fstype), flags, data).map_err(|source| ContainerError::Mount {
        what: format!("{fstype} ({src})"),
        target: target.display().to_string(),
        source,
    })
}

/// The root filesystem must be a virtio disk holding erofs or ext4.
pub fn check_rootfs(spec: &RunSpec) -> Result<(), ContainerError> {
    let fstype = spec.rootfs.fstype.as_str();
    if fstype != "erofs" && fstype != "ext4" {
        return Err(ContainerError::FsType(fstype.chars().take(32).collect()));
    }
    let dev = spec.rootfs.device.as_str();
    let valid_dev = dev.strip_prefix("/dev/vd").is_some_and(|r| {
        !r.is_empty() && r.len() < 8 && r.bytes().all(|b| b.is_ascii_alphanumeric())
    });
    let valid_serial = dev
        .strip_prefix(gpucell_protocol::DISK_SERIAL_PREFIX)
        .is_some_and(gpucell_protocol::valid_disk_serial);
    if !valid_dev && !valid_serial {
        return Err(ContainerError::BadDevice(dev.chars().take(64).collect()));
    }
    Ok(())
}

/// Where the image, the overlay's writable tmpfs and the merged root are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub image: PathBuf,
    pub rw: PathBuf,
    pub root: PathBuf,
}

impl Layout {
    /// The guest's: under `/mnt`.
    pub fn guest() -> Self {
        Layout {
            image: IMAGE_DIR.into(),
            rw: RW_DIR.into(),
            root: ROOT_DIR.into(),
        }
    }

    /// The three directories under `base`.
    pub fn under(base: &Path) -> Self {
        Layout {
            image: base.join("image"),
            rw: base.join("rw"),
            root: base.join("root"),
        }
    }
}

/// Mounts the image read-only and a tmpfs-backed overlay over it; returns the merged root.
pub fn mount_rootfs(spec: &RunSpec) -> Result<PathBuf, ContainerError> {
    mount_rootfs_at(spec, &Layout::guest())
}

/// [`mount_rootfs`] on `layout` (a container added to the pod has its own).
pub fn mount_rootfs_at(spec: &RunSpec, layout: &Layout) -> Result<PathBuf, ContainerError> {
    check_rootfs(spec)?;
    let fstype = spec.rootfs.fstype.as_str();
    let started = Instant::now();
    let dev = wait_for_disk(&spec.rootfs.device, Path::new(SYS_BLOCK))?;
    let dev = dev.as_str();
    // The disk is read-only: never replay an ext4 journal (the mount would fail).
    let image_opts = (fstype == "ext4").then_some("noload");
    // A hot-plugged disk shows in sysfs and /dev a moment before it can be opened: its
    // mount fails with ENXIO until the kernel has finished adding it.
    let hotplugged = spec
        .rootfs
        .device
        .starts_with(gpucell_protocol::DISK_SERIAL_PREFIX);
    loop {
        match mnt(dev, &layout.image, fstype, MsFlags::MS_RDONLY, image_opts) {
            Err(ContainerError::Mount {
                source: Errno::ENXIO,
                ..
            }) if hotplugged && started.elapsed() < HOTPLUG_WAIT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other?,
        }
    }
    mount_overlay(layout, spec.overlay_bytes)
}

/// Detaches what [`mount_rootfs_at`] mounted (the merged root, the overlay's tmpfs,
/// the image), best effort: a container that ended leaves nothing mounted.
pub fn unmount_layout(layout: &Layout) {
    for dir in [&layout.root, &layout.rw, &layout.image] {
        if let Err(e) = umount2(dir.as_path(), MntFlags::MNT_DETACH) {
            if e != Errno::EINVAL && e != Errno::ENOENT {
                tracing::warn!(dir = %dir.display(), error = %e, "unmounting an ended container");
            }
        }
    }
}

/// The image as a directory instead of a block device (the GPU test harness): `dir` bound
/// read-only on `layout.image`, the same overlay over it. Returns the merged root.
pub fn mount_dir_rootfs(
    dir: &Path,
    layout: &Layout,
    overlay_bytes: Option<u64>,
) -> Result<PathBuf, ContainerError> {
    let src = dir.display().to_string();
    let bind = |flags: MsFlags| {
        let _ = fs::create_dir_all(&layout.image);
        mount(Some(dir), &layout.image, None::<&str>, flags, None::<&str>).map_err(|source| {
            ContainerError::Mount {
                what: format!("a read-only bind of {src}"),
                target: layout.image.display().to_string(),
                source,
            }
        })
    };
    bind(MsFlags::MS_BIND | MsFlags::MS_REC)?;
    bind(MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY)?;
    mount_overlay(layout, overlay_bytes)
}

/// A tmpfs on `layout.rw` and the overlay of it over `layout.image` on `layout.root`.
fn mount_overlay(layout: &Layout, overlay_bytes: Option<u64>) -> Result<PathBuf, ContainerError> {
    let size = overlay_bytes
        .map(|b| format!("size={b},mode=0755"))
        .unwrap_or_else(|| "mode=0755".into());
    mnt("tmpfs", &layout.rw, "tmpfs", MsFlags::empty(), Some(&size))?;
    for d in ["upper", "work"] {
        fs::create_dir_all(layout.rw.join(d)).map_err(|e| ContainerError::Mount {
            what: "overlay upper dir".into(),
            target: layout.rw.display().to_string(),
            source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
    }
    let opts = format!(
        "lowerdir={},upperdir={}/upper,workdir={}/work",
        layout.image.display(),
        layout.rw.display(),
        layout.rw.display()
    );
    mnt(
        "overlay",
        &layout.root,
        "overlay",
        MsFlags::empty(),
        Some(&opts),
    )?;
    Ok(layout.root.clone())
}

/// Everything the child needs, computed before it is cloned.
pub struct Prepared {
    root: CString,
    exe: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
    hostname: String,
    ids: Ids,
    /// The driver's device nodes and params, made in the child (`inject::apply_devices`).
    devices: Option<DeviceSetup>,
    /// The process gets a terminal of this first size (`Some(None)`: the kernel's).
    terminal: Option<Option<gpucell_protocol::WindowSize>>,
    /// The volumes bound into the root by the child (`volumes::bind`).
    volumes: Vec<VolumeMount>,
}

impl Prepared {
    /// The NVIDIA driver's device nodes and params for the child to make (phase 2 of
    /// `inject`; phase 1 has run on the root already).
    pub fn with_devices(mut self, devices: Option<DeviceSetup>) -> Self {
        self.devices = devices;
        self
    }

    /// The volumes the child binds into the root before it enters it.
    pub fn with_volumes(mut self, volumes: Vec<VolumeMount>) -> Self {
        self.volumes = volumes;
        self
    }
}

fn read_id_file(root: &Path, name: &str) -> Option<String> {
    let p = rootpath::resolve(root, "/", name).ok()?;
    let mut s = String::new();
    fs::File::open(p)
        .ok()?
        .take(MAX_ID_FILE)
        .read_to_string(&mut s)
        .ok()?;
    Some(s)
}

fn cstr(s: &str, what: &'static str) -> Result<CString, ContainerError> {
    CString::new(s).map_err(|_| ContainerError::Nul(what))
}

/// Resolves the user and the executable inside the mounted root and builds the
/// exec arguments. `PATH` and `HOME` get defaults when the environment lacks them.
pub fn prepare(root: &Path, spec: &RunSpec) -> Result<Prepared, ContainerError> {
    if spec.args.len() > MAX_ARGS {
        return Err(ContainerError::TooMany(spec.args.len(), "args", MAX_ARGS));
    }
    if spec.env.len() > MAX_ENV {
        return Err(ContainerError::TooMany(
            spec.env.len(),
            "environment entries",
            MAX_ENV,
        ));
    }
    let cwd = if spec.cwd.is_empty() {
        "/"
    } else {
        spec.cwd.as_str()
    };
    if !cwd.starts_with('/') {
        return Err(ContainerError::Cwd(cwd.chars().take(256).collect()));
    }
    let ids = users::resolve(
        &spec.user,
        read_id_file(root, "/etc/passwd").as_deref(),
        read_id_file(root, "/etc/group").as_deref(),
    )?;
    let arg0 = spec.args.first().ok_or(RootPathError::Empty)?;
    let exe = rootpath::find_executable(root, cwd, arg0, rootpath::path_of(&spec.env))?;
    let mut env = spec.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(format!("PATH={}", rootpath::DEFAULT_PATH));
    }
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", ids.home.as_deref().unwrap_or("/")));
    }
    if !spec.hostname.is_empty() && !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        env.push(format!("HOSTNAME={}", spec.hostname));
    }
    Ok(Prepared {
        root: cstr(&root.display().to_string(), "root")?,
        exe: cstr(&exe, "executable")?,
        argv: spec
            .args
            .iter()
            .map(|a| cstr(a, "args"))
            .collect::<Result<_, _>>()?,
        envp: env
            .iter()
            .map(|e| cstr(e, "env"))
            .collect::<Result<_, _>>()?,
        cwd: cstr(cwd, "cwd")?,
        hostname: spec.hostname.chars().take(64).collect(),
        ids,
        devices: None,
        terminal: spec
            .terminal
            .then(|| spec.window.filter(|w| w.problem().is_none())),
        volumes: Vec::new(),
    })
}

/// The parent's ends of the workload's stdio. With a terminal, stdin and stdout are
/// the pty's master (two descriptors of it), there is no stderr, and `pty` is a third,
/// kept to set the terminal's size.
pub struct Stdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: Option<OwnedFd>,
    pub pty: Option<OwnedFd>,
}

/// How a cloned child gets its stdio: pipes to `dup2` at once, or a terminal it makes
/// once it sees the container's root (the socket the master goes back through).
#[derive(Clone, Copy)]
enum ChildIo {
    Pipes([i32; 3]),
    Terminal(i32),
}

impl ChildIo {
    /// The pipes as stdin, stdout, stderr; nothing yet for a terminal.
    fn pipes(self, what: &str) -> Result<(), String> {
        if let ChildIo::Pipes(fds) = self {
            for (i, fd) in fds.iter().enumerate() {
                unistd::dup2(*fd, i as i32).map_err(|e| format!("dup2 of {what}'s stdio: {e}"))?;
            }
        }
        Ok(())
    }

    /// The terminal of [`ChildIo::Terminal`], made in the container's root.
    fn terminal(self, p: &Prepared) -> Result<(), String> {
        if let ChildIo::Terminal(sock) = self {
            tty::attach_in_child(sock, p.terminal.flatten(), (p.ids.uid, p.ids.gid))?;
        }
        Ok(())
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ContainerError> {
    unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| ContainerError::Sys("pipe2", e))
}

/// Starts the workload in new mount, pid and uts namespaces. Returns its pid (in the
/// agent's namespace) and its stdio; the child reports a setup failure through a pipe
/// that closes on a successful exec.
pub fn spawn(p: &Prepared) -> Result<(Pid, Stdio), ContainerError> {
    let flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWUTS;
    if p.terminal.is_some() {
        return spawn_with_terminal(flags, None, &|io| child_main(p, io));
    }
    spawn_with(flags, None, &|io| child_main(p, io))
}

/// [`spawn_with`] for a child that makes its own terminal (see [`tty`]): the agent's
/// ends are the pty's master the child sends back before it executes.
fn spawn_with_terminal(
    flags: CloneFlags,
    pid_ns: Option<(&OwnedFd, &OwnedFd)>,
    body: &dyn Fn(ChildIo) -> Result<(), String>,
) -> Result<(Pid, Stdio), ContainerError> {
    let (ours, theirs) = tty::channel()?;
    let sock = theirs.as_raw_fd();
    let (rep_r, rep_w) = pipe()?;
    let pid = clone_child(flags, pid_ns, &|| body(ChildIo::Terminal(sock)), &rep_w)?;
    drop((theirs, rep_w));
    await_exec(pid, rep_r)?;
    match terminal_stdio(tty::receive(&ours)) {
        Ok(stdio) => Ok((pid, stdio)),
        Err(e) => {
            // It runs without the terminal it was given: it must not run on unseen.
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            Err(e)
        }
    }
}

/// The agent's ends of a terminal: the master the child sent, three times over.
fn terminal_stdio(master: Option<OwnedFd>) -> Result<Stdio, ContainerError> {
    let master = master.ok_or_else(|| {
        ContainerError::Child("the process's terminal did not reach the agent".into())
    })?;
    set_nonblocking(&master);
    let dup = |what| {
        master
            .try_clone()
            .map_err(|e| ContainerError::Sys(what, Errno::from_raw(e.raw_os_error().unwrap_or(0))))
    };
    Ok(Stdio {
        stdin: dup("dup of the pty for stdin")?,
        pty: Some(dup("dup of the pty for its size")?),
        stdout: master,
        stderr: None,
    })
}

/// Clones a child with `flags` that runs `body` on its stdio descriptors (stdin, stdout,
/// stderr). With `pid_ns` (a namespace and the agent's own), the child is born in the
/// first: the agent enters it for the clone and returns to its own at once.
fn spawn_with(
    flags: CloneFlags,
    pid_ns: Option<(&OwnedFd, &OwnedFd)>,
    body: &dyn Fn(ChildIo) -> Result<(), String>,
) -> Result<(Pid, Stdio), ContainerError> {
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (rep_r, rep_w) = pipe()?;
    let fds = [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
    let pid = clone_child(flags, pid_ns, &|| body(ChildIo::Pipes(fds)), &rep_w)?;
    drop((in_r, out_w, err_w, rep_w));
    await_exec(pid, rep_r)?;
    for fd in [&in_w, &out_r, &err_r] {
        set_nonblocking(fd);
    }
    Ok((
        pid,
        Stdio {
            stdin: in_w,
            stdout: out_r,
            stderr: Some(err_r),
            pty: None,
        },
    ))
}

/// Clones a child with `flags` that runs `body` and writes its failure on `rep_w`.
fn clone_child(
    flags: CloneFlags,
    pid_ns: Option<(&OwnedFd, &OwnedFd)>,
    body: &dyn Fn() -> Result<(), String>,
    rep_w: &OwnedFd,
) -> Result<Pid, ContainerError> {
    let mut stack = vec![0u8; 1 << 20];
    let child = Box::new(move || -> isize {
        if let Err(msg) = body() {
            let _ = unistd::write(rep_w, msg.as_bytes());
        }
        127
    });
    if let Some((ns, _)) = pid_ns {
        nix::sched::setns(ns, CloneFlags::CLONE_NEWPID)
            .map_err(|e| ContainerError::Sys("setns into the container's pid namespace", e))?;
    }
    // SAFETY: the agent is single-threaded, so the child (a copy of this process, no
    // CLONE_VM) sees consistent heap and locks; the closure only borrows data that lives
    // until after clone returns in the parent.
    let cloned = unsafe { nix::sched::clone(child, &mut stack, flags, Some(libc::SIGCHLD)) };
    if let Some((_, own)) = pid_ns {
        // The agent's own namespace is always allowed back; a failure would put every
        // later child in the container's, so it is loud.
        if let Err(e) = nix::sched::setns(own, CloneFlags::CLONE_NEWPID) {
            tracing::error!(error = %e, "could not return to the agent's pid namespace");
        }
    }
    cloned.map_err(|e| ContainerError::Sys("clone of the workload", e))
}

/// Reads the child's report pipe (the parent's write end closed) until it closes on
/// the child's exec; a report is the child's failure, and the child is reaped.
fn await_exec(pid: Pid, rep_r: OwnedFd) -> Result<(), ContainerError> {
    let mut report = String::new();
    let _ = fs::File::from(rep_r).take(4096).read_to_string(&mut report);
    if !report.is_empty() {
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(ContainerError::Child(report));
    }
    Ok(())
}

/// Sets O_NONBLOCK on `fd`; a failure leaves it as it was.
pub fn set_nonblocking(fd: &OwnedFd) {
    use nix::fcntl::{fcntl, FcntlArg};
    if let Ok(flags) = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL) {
        let _ = fcntl(
            fd.as_raw_fd(),
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        );
    }
}

/// Runs in the cloned child; returns only on failure, with a message for the host.
fn child_main(p: &Prepared, io: ChildIo) -> Result<(), String> {
    fn sys(what: &str) -> impl Fn(Errno) -> String + '_ {
        move |e| format!("{what}: {e}")
    }
    unistd::setsid().map_err(sys("setsid"))?;
    io.pipes("the workload")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("making mounts private"))?;
    let root = Path::new(std::ffi::OsStr::new(p.root.to_str().unwrap_or(ROOT_DIR)));
    let m = |src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>| {
        let t = root.join(target);
        let _ = fs::create_dir_all(&t);
        mount(Some(src), &t, Some(fstype), flags, data)
            .map_err(|e| format!("mounting {fstype} on /{target} in the container: {e}"))
    };
    let safe = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    m("proc", "proc", "proc", safe, None)?;
    m("sysfs", "sys", "sysfs", safe | MsFlags::MS_RDONLY, None)?;
    m(
        "tmpfs",
        "tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    m(
        "tmpfs",
        "dev",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=65536k"),
    )?;
    populate_dev(&root.join("dev"))?;
    let pts_flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    // A kernel that refuses these options (gVisor) gets a devpts with its defaults.
    m(
        "devpts",
        "dev/pts",
        "devpts",
        pts_flags,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .or_else(|_| m("devpts", "dev/pts", "devpts", pts_flags, None))?;
    m("tmpfs", "dev/shm", "tmpfs", safe, Some("mode=1777"))?;
    if let Some(devices) = &p.devices {
        inject::apply_devices(devices, root, &mut RealOps)
            .map_err(|e| format!("the NVIDIA driver in the container: {}", crate::chain(&e)))?;
    }
    // After the container's own /dev and /tmp: a volume below them lands on them.
    for v in &p.volumes {
        volumes::bind(root, v)?;
    }

    unistd::chdir(root).map_err(sys("chdir to the container root"))?;
    unistd::pivot_root(".", ".").map_err(sys("pivot_root into the container root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the old root"))?;
    unistd::chdir("/").map_err(sys("chdir /"))?;
    if !p.hostname.is_empty() {
        unistd::sethostname(&p.hostname).map_err(sys("sethostname"))?;
    }
    io.terminal(p)?;
    user_and_exec(p)
}

/// The end of a child's setup, inside the container's root: the user's ids, the working
/// directory, a clean signal state, then the executable. Returns only on failure.
fn user_and_exec(p: &Prepared) -> Result<(), String> {
    let sys = |what: &'static str| move |e: Errno| format!("{what}: {e}");
    let groups: Vec<Gid> = p.ids.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    unistd::setgroups(&groups).map_err(sys("setgroups"))?;
    unistd::setgid(Gid::from_raw(p.ids.gid)).map_err(sys("setgid"))?;
    unistd::setuid(Uid::from_raw(p.ids.uid)).map_err(sys("setuid"))?;
    unistd::chdir(p.cwd.as_c_str()).map_err(|e| {
        format!(
            "working directory `{}` of the image: {e}",
            p.cwd.to_string_lossy()
        )
    })?;
    // The agent blocks SIGCHLD and Rust ignores SIGPIPE: the workload starts clean.
    let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    // SAFETY: resetting a disposition to the default has no handler to race with.
    unsafe {
        let _ = signal::signal(Signal::SIGPIPE, SigHandler::SigDfl);
    }
    let e = unistd::execve(&p.exe, &p.argv, &p.envp).unwrap_err();
    Err(format!(
        "executing `{}` in the image: {e}",
        p.exe.to_string_lossy()
    ))
}

/// Character device `name` in the container's `dev`, mode 0666. Where the kernel refuses
/// `mknod` (a user namespace, gVisor), the agent's own `/dev/<name>` is bound instead when
/// it has the same numbers.
fn make_node(dev: &Path, name: &str, major: u64, minor: u64) -> Result<(), String> {
    use crate::inject::InjectOps;
    let path = dev.join(name);
    let refused = match RealOps.mknod_char(&path, major, minor, 0o666) {
        Ok(()) => return Ok(()),
        Err(e @ (Errno::EPERM | Errno::EACCES)) => e,
        Err(e) => return Err(format!("mknod /dev/{name} in the container: {e}")),
    };
    let src = Path::new("/dev").join(name);
    if RealOps.char_numbers(&src) != Some((major, minor)) {
        return Err(format!(
            "mknod /dev/{name} in the container: {refused}, and /dev/{name} here is not \
             c {major}:{minor} to bind instead"
        ));
    }
    fs::File::create(&path).map_err(|e| format!("creating /dev/{name} in the container: {e}"))?;
    RealOps
        .bind_node(&src, &path)
        .map_err(|e| format!("binding /dev/{name} into the container: {e}"))
}

/// A minimal /dev: the usual character devices and the standard symlinks.
fn populate_dev(dev: &Path) -> Result<(), String> {
    let nodes: [(&str, u64, u64); 6] = [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ];
    for (name, major, minor) in nodes {
        make_node(dev, name, major, minor)?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name))
            .map_err(|e| format!("symlink /dev/{name}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use gpucell_protocol::RootfsSpec;
    use std::os::unix::fs::PermissionsExt;

    fn spec(args: &[&str], user: &str, env: &[&str]) -> RunSpec {
        RunSpec {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            cwd: "/".into(),
            user: user.into(),
            hostname: "cell".into(),
            rootfs: RootfsSpec {
                device: "/dev/vda".into(),
                fstype: "erofs".into(),
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

    #[test]
    fn rootfs_device_and_type_are_whitelisted() {
        let mut s = spec(&["sh"], "", &[]);
        check_rootfs(&s).unwrap();
        s.rootfs.fstype = "nfs".into();
        assert!(matches!(check_rootfs(&s), Err(ContainerError::FsType(t)) if t == "nfs"));
        s.rootfs.fstype = "ext4".into();
        for bad in [
            "/dev/sda",
            "/dev/vd",
            "/dev/vda/../mem",
            "/etc/passwd",
            "vda",
            "serial:",
            "serial:../../dev/mem",
            "serial:a-serial-over-twenty-bytes",
        ] {
            s.rootfs.device = bad.into();
            assert!(
                matches!(check_rootfs(&s), Err(ContainerError::BadDevice(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn prepare_resolves_user_executable_and_env_in_the_image() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("usr/bin")).unwrap();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(r.join("usr/bin/app"), b"").unwrap();
        fs::set_permissions(r.join("usr/bin/app"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(r.join("etc/passwd"), "svc:x:7:8::/srv:/bin/false\n").unwrap();
        fs::write(r.join("etc/group"), "gpu:x:44:svc\n").unwrap();
        let p = prepare(r, &spec(&["app", "--flag"], "svc", &["A=1"])).unwrap();
        assert_eq!(p.exe.to_str().unwrap(), "/usr/bin/app");
        assert_eq!(
            (p.ids.uid, p.ids.gid, p.ids.groups.clone()),
            (7, 8, vec![8, 44])
        );
        let env: Vec<&str> = p.envp.iter().map(|e| e.to_str().unwrap()).collect();
        assert!(
            env.contains(&"A=1") && env.contains(&"HOME=/srv") && env.contains(&"HOSTNAME=cell")
        );
        assert!(env.iter().any(|e| e.starts_with("PATH=/usr/local/sbin")));

        let err = prepare(r, &spec(&["app"], "nobody", &[]))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("`nobody`"), "{err}");
        let err = prepare(r, &spec(&["foo"], "", &["PATH=/usr/bin:/bin"]))
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            err,
            "executable `foo` not found in PATH /usr/bin:/bin of the image"
        );
        let err = prepare(r, &spec(&["app\0x"], "", &[])).err().unwrap();
        assert!(
            matches!(err, ContainerError::Exec(_) | ContainerError::Nul(_)),
            "{err}"
        );
        let mut rel = spec(&["app"], "", &[]);
        rel.cwd = "work".into();
        assert!(matches!(prepare(r, &rel), Err(ContainerError::Cwd(_))));
        let many = spec(&["app"], "", &vec!["X=1"; MAX_ENV + 1]);
        assert!(matches!(
            prepare(r, &many),
            Err(ContainerError::TooMany(..))
        ));
    }
}

//! The jailed spawn. A [`Prepared`] jail is installed on a [`Command`] as a
//! `pre_exec` hook; then, in the forked child (gpucell's own pre_exec hooks, such as
//! the parent-death signal and inherited descriptors, have run before):
//!
//! 1. join the sandbox's cgroups (so everything below is counted);
//! 2. `unshare(CLONE_NEWNS | NEWPID | NEWIPC | NEWUTS [| NEWNET])`;
//! 3. fork again: the grandchild is pid 1 of the new pid namespace and becomes the
//!    jailed program; the child closes every descriptor but stdio, waits for it and
//!    exits as it did (same code, or the same signal), so the caller's `Child`
//!    behaves as the program itself;
//! 4. the grandchild makes every mount private, mounts a small tmpfs on the staging
//!    directory, builds the [`View`](super::view::View) there (binds `nosuid,nodev`,
//!    read-only unless writable; device nodes made afresh for the jail's uid), mounts its own
//!    `/proc`, `pivot_root`s into it (`chroot` where the root cannot be pivoted, as on
//!    an initramfs root), makes the root read-only and sets the hostname;
//! 5. drops the whole capability bounding set and the ambient set, sets the
//!    supplementary groups, gid and uid (all three ids each), clears the remaining
//!    capability sets, sets `PR_SET_NO_NEW_PRIVS` and its own parent-death signal;
//! 6. returns to `Command`, which execs the program (an absolute path in the view).
//!
//! Between fork and exec only system calls on prepared strings run: no allocation.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use super::view::{Op, View, ViewError};

/// Size of the tmpfs holding the jail's root (only directories and mount points).
const ROOT_TMPFS_OPTIONS: &str = "size=1m,nr_inodes=4096,mode=0755";

/// How a process is jailed.
#[derive(Debug, Clone)]
pub struct JailSpec {
    pub view: View,
    pub uid: u32,
    pub gid: u32,
    /// A new network namespace (no interface but `lo`, down): only when the program
    /// needs nothing of the host's network but descriptors it inherits.
    pub new_net: bool,
    pub hostname: String,
    /// An empty directory the jail's root is built on (in the child's own mount
    /// namespace only: from the host it stays empty).
    pub staging: PathBuf,
    /// `cgroup.procs` (or `tasks`) files the program joins before anything else.
    pub cgroup_procs: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("invalid jail view")]
    View(#[from] ViewError),
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
}

/// A [`JailSpec`] turned into what the child needs, allocated beforehand.
#[derive(Debug)]
pub struct Prepared {
    ops: Vec<Op>,
    staging: CString,
    tmpfs_opts: CString,
    hostname: CString,
    uid: libc::uid_t,
    gid: libc::gid_t,
    flags: libc::c_int,
    cgroup_procs: Vec<CString>,
    /// This process's command line area, which the middle process overwrites.
    args: Option<(usize, usize)>,
}

fn cs(s: &str) -> Result<CString, JailError> {
    CString::new(s).map_err(|_| JailError::Nul(s.to_string()))
}

fn cpath(p: &std::path::Path) -> Result<CString, JailError> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Nul(p.display().to_string()))
}

impl Prepared {
    pub fn new(spec: &JailSpec) -> Result<Self, JailError> {
        let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC;
        flags |= libc::CLONE_NEWUTS;
        if spec.new_net {
            flags |= libc::CLONE_NEWNET;
        }
        Ok(Prepared {
            ops: spec.view.plan(&spec.staging)?,
            staging: cpath(&spec.staging)?,
            tmpfs_opts: cs(ROOT_TMPFS_OPTIONS)?,
            hostname: cs(&spec.hostname)?,
            uid: spec.uid,
            gid: spec.gid,
            flags,
            cgroup_procs: spec
                .cgroup_procs
                .iter()
                .map(|p| cpath(p))
                .collect::<Result<_, _>>()?,
            args: own_args_area(),
        })
    }
}

/// Installs the jail on `cmd` (see the module's documentation). The program must be
/// an absolute path that the view shows.
pub fn install(cmd: &mut Command, jail: Prepared) {
    // SAFETY: the hook runs only async-signal-safe system calls (unshare, fork,
    // waitpid, mount, pivot_root, prctl, set*id, capset, _exit...) on data prepared
    // before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || enter(&jail));
    }
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Steps 1-5, in the forked child.
fn enter(j: &Prepared) -> std::io::Result<()> {
    for procs in &j.cgroup_procs {
        join_cgroup(procs)?;
    }
    // SAFETY: plain system calls; see `install`.
    unsafe {
        check(libc::unshare(j.flags))?;
        let pid = libc::fork();
        check(pid)?;
        if pid > 0 {
            wait_and_mirror(pid, j.args);
        }
        // At once: should the middle process die, so does this one (set again after
        // the uid change, which clears it).
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
        build_root(j)?;
        drop_privileges(j)
    }
}

fn join_cgroup(procs: &CString) -> std::io::Result<()> {
    // SAFETY: open/write/close on a prepared path.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        check(fd)?;
        let r = libc::write(fd, b"0\n".as_ptr().cast(), 2);
        libc::close(fd);
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What the middle process shows as its command line and name.
const TITLE: &[u8] = b"gpucell-jail";

/// Where this process's command line lies in its memory (`arg_start`, `arg_end` of
/// `/proc/self/stat`): a forked child has it at the same place.
fn own_args_area() -> Option<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may hold spaces: field 3 is the first.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let start = fields.get(48 - 3)?.parse().ok()?;
    let end = fields.get(49 - 3)?.parse().ok()?;
    (end > start).then_some((start, end))
}

/// Names the middle process `gpucell-jail` (`comm`, and its command line written over
/// the one it inherited), so that it is not taken for the gpucell, shim or daemon it
/// was forked from: it never execs.
fn rename_self(args: Option<(usize, usize)>) {
    // SAFETY: prctl on a static string; the command line area is this process's own
    // memory (a copy after the fork), which nothing reads again.
    unsafe {
        let mut name = [0u8; 16];
        name[..TITLE.len()].copy_from_slice(TITLE);
        libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0);
        if let Some((start, end)) = args {
            let area = start as *mut u8;
            std::ptr::write_bytes(area, 0, end - start);
            let n = TITLE.len().min(end - start - 1);
            std::ptr::copy_nonoverlapping(TITLE.as_ptr(), area, n);
        }
    }
}

/// The middle process: keeps nothing open but stdio, waits for the jailed program and
/// ends the same way. Never returns.
fn wait_and_mirror(pid: libc::pid_t, args: Option<(usize, usize)>) -> ! {
    // SAFETY: system calls between fork and exec on prepared data; see `install`.
    unsafe {
        // Before closing the spawn's error pipe: once `spawn` returns, the name is set.
        rename_self(args);
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            for fd in 3..4096 {
                libc::close(fd);
            }
        }
        let mut status = 0;
        loop {
            let r = libc::waitpid(pid, &mut status, 0);
            if r == pid {
                break;
            }
            if r < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(125);
            }
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig);
        }
        libc::_exit(libc::WEXITSTATUS(status))
    }
}

fn mount(
    src: *const libc::c_char,
    dst: *const libc::c_char,
    fstype: *const libc::c_char,
    flags: libc::c_ulong,
    data: *const libc::c_char,
) -> std::io::Result<()> {
    // SAFETY: system calls between fork and exec on prepared data; see `install`.
    unsafe { check(libc::mount(src, dst, fstype, flags, data.cast())) }
}

fn build_root(j: &Prepared) -> std::io::Result<()> {
    // SAFETY: system calls between fork and exec on prepared data; see `install`.
    unsafe {
        let null = std::ptr::null();
        mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            null,
        )?;
        let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
        // Not `nodev`: the jail's own device nodes live on it (the jailed uid cannot
        // make any: it has no CAP_MKNOD).
        mount(
            c"tmpfs".as_ptr(),
            j.staging.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID,
            j.tmpfs_opts.as_ptr(),
        )?;
        for op in &j.ops {
            match op {
                Op::Mkdir(p) => {
                    if libc::mkdir(p.as_ptr(), 0o755) < 0
                        && *libc::__errno_location() != libc::EEXIST
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Op::Touch(p) => {
                    let fd = libc::open(
                        p.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    check(fd)?;
                    libc::close(fd);
                }
                Op::Bind { src, dst, ro } => {
                    mount(src.as_ptr(), dst.as_ptr(), null, libc::MS_BIND, null)?;
                    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | nosuid_nodev;
                    if *ro {
                        flags |= libc::MS_RDONLY;
                    }
                    mount(null, dst.as_ptr(), null, flags, null)?;
                }
                Op::Mknod { path, rdev } => {
                    check(libc::mknod(
                        path.as_ptr(),
                        libc::S_IFCHR | 0o600,
                        *rdev as libc::dev_t,
                    ))?;
                    check(libc::chown(path.as_ptr(), j.uid, j.gid))?;
                }
                Op::Proc(p) => {
                    let flags = nosuid_nodev | libc::MS_NOEXEC;
                    mount(c"proc".as_ptr(), p.as_ptr(), c"proc".as_ptr(), flags, null)?;
                }
            }
        }
        check(libc::chdir(j.staging.as_ptr()))?;
        let dot = c".".as_ptr();
        if libc::syscall(libc::SYS_pivot_root, dot, dot) == 0 {
            check(libc::umount2(dot, libc::MNT_DETACH))?;
        } else {
            // An initramfs root cannot be pivoted away from.
            check(libc::chroot(dot))?;
        }
        check(libc::chdir(c"/".as_ptr()))?;
        let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID;
        mount(null, c"/".as_ptr(), null, ro, null)?;
        check(libc::sethostname(
            j.hostname.as_ptr(),
            j.hostname.as_bytes().len(),
        ))
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const PR_CAP_AMBIENT_CLEAR_ALL: libc::c_ulong = 4;

fn drop_privileges(j: &Prepared) -> std::io::Result<()> {
    // SAFETY: system calls between fork and exec on prepared data; see `install`.
    unsafe {
        // The bounding set, until the kernel says there is no such capability.
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 {
                if *libc::__errno_location() == libc::EINVAL {
                    break;
                }
                return Err(std::io::Error::last_os_error());
            }
        }
        check(libc::prctl(
            libc::PR_CAP_AMBIENT,
            PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ))?;
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setresgid(j.gid, j.gid, j.gid))?;
        check(libc::setresuid(j.uid, j.uid, j.uid))?;
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        // Changing uid cleared it; the middle process is the parent now.
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))
    }
}

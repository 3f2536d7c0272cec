//! Early boot of the guest: pseudo filesystems, kernel modules, the switch from the
//! initramfs to a tmpfs root, the loopback interface, and powering off.

use std::ffi::CString;
use std::fs;
use std::os::fd::AsFd;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::unistd::{chdir, chroot};

/// Directory of modules in the init image and its load-order file.
pub const MODULES_DIR: &str = "/modules";
const MODULES_ORDER: &str = "/modules/order";
/// Where the tmpfs that becomes `/` is prepared.
const NEW_ROOT: &str = "/root";

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("mounting {what} on {target} failed")]
    Mount {
        what: &'static str,
        target: String,
        #[source]
        source: Errno,
    },
    #[error("{0} failed")]
    Sys(&'static str, #[source] Errno),
    #[error("reading {0} failed")]
    Read(String, #[source] std::io::Error),
    #[error("loading kernel module {0} failed")]
    Module(String, #[source] Errno),
}

fn mnt(
    src: &str,
    target: &str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), BootError> {
    let _ = fs::create_dir_all(target);
    match mount(Some(src), target, Some(fstype), flags, data) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(source) => Err(BootError::Mount {
            what: fstype,
            target: target.to_owned(),
            source,
        }),
    }
}

/// Mounts /proc, /sys and /dev (devtmpfs).
pub fn mount_pseudo() -> Result<(), BootError> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mnt("proc", "/proc", "proc", nodev, None)?;
    mnt("sysfs", "/sys", "sysfs", nodev, None)?;
    mnt(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755"),
    )?;
    Ok(())
}

pub fn read_cmdline() -> Result<String, BootError> {
    fs::read_to_string("/proc/cmdline").map_err(|e| BootError::Read("/proc/cmdline".into(), e))
}

/// Loads the modules named in the load-order file, in order. A module already loaded (or
/// built in) is fine. Returns how many were loaded; the first failure is returned after
/// trying the rest, so one bad module does not hide the others.
/// `wanted` says, by each line's tag (`<file> <tag>`; no tag: always), which modules
/// this boot needs.
pub fn load_modules(wanted: &dyn Fn(&str) -> bool) -> Result<usize, BootError> {
    let order = match fs::read_to_string(MODULES_ORDER) {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(BootError::Read(MODULES_ORDER.into(), e)),
    };
    let params = CString::default();
    let mut loaded = 0;
    let mut first_err = None;
    for line in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (name, tag) = line.split_once(' ').unwrap_or((line, "always"));
        if name.contains('/') || !wanted(tag.trim()) {
            continue;
        }
        let path = format!("{MODULES_DIR}/{name}");
        let res = fs::File::open(&path)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
            .and_then(|f| {
                nix::kmod::finit_module(f.as_fd(), &params, nix::kmod::ModuleInitFlags::empty())
            });
        match res {
            Ok(()) => loaded += 1,
            Err(Errno::EEXIST) => {}
            Err(e) => {
                tracing::error!(module = %name, error = %e, "loading module failed");
                first_err.get_or_insert(BootError::Module(path, e));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(loaded),
    }
}

/// Leaves the initramfs: mounts a tmpfs, moves it over `/` and chroots into it. The
/// initramfs (`rootfs`) cannot be `pivot_root`ed away from; a tmpfs root can, so the
/// workload gets a real `pivot_root` later. The module files are freed first.
pub fn switch_to_tmpfs() -> Result<(), BootError> {
    let _ = fs::remove_dir_all(MODULES_DIR);
    mnt(
        "tmpfs",
        NEW_ROOT,
        "tmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    for d in ["proc", "sys", "dev", "mnt", "run", "tmp"] {
        let _ = fs::create_dir(Path::new(NEW_ROOT).join(d));
    }
    chdir(NEW_ROOT).map_err(|e| BootError::Sys("chdir to the new root", e))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|source| {
        BootError::Mount {
            what: "tmpfs (move)",
            target: "/".into(),
            source,
        }
    })?;
    chroot(".").map_err(|e| BootError::Sys("chroot into the new root", e))?;
    chdir("/").map_err(|e| BootError::Sys("chdir /", e))?;
    Ok(())
}

/// Brings the loopback interface up (the guest has no other network device).
pub fn loopback_up() -> Result<(), BootError> {
    // SAFETY: plain syscalls on a socket we own; `ifreq` is zero-initialised and the name
    // is NUL-terminated within IFNAMSIZ.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(BootError::Sys("socket for lo", Errno::last()));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let mut res = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req);
        if res == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            res = libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req);
        }
        let err = Errno::last();
        libc::close(fd);
        if res != 0 {
            return Err(BootError::Sys("bringing lo up", err));
        }
    }
    Ok(())
}

/// Syncs and powers the VM off. Never returns: if power-off is refused (not PID 1), exits.
pub fn power_off() -> ! {
    nix::unistd::sync();
    if nix::unistd::getpid().as_raw() == 1 {
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    }
    eprintln!("gpucell-agent: power-off failed; exiting");
    std::process::exit(1)
}

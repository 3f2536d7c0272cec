//! A pod's pieces in the guest: the disks the host hot-plugs for the pod's further
//! containers (found by their virtio serial) and the pod's sandbox process (a holder that
//! runs nothing, as `pause` does).

use std::fs;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, SigSet, SigmaskHow};
use nix::unistd::{self, Pid};

use super::{pipe, set_nonblocking, ContainerError, Stdio, DEVICE_WAIT};

/// How long a hot-plugged disk may take: the guest's ACPI hot-plug handling runs after
/// QEMU's `device_add` has returned, and took over 5 s on a loaded 2-core TCG host.
pub(super) const HOTPLUG_WAIT: Duration = Duration::from_secs(30);
/// Where the kernel lists block devices (each virtio disk's `serial` among them).
pub(super) const SYS_BLOCK: &str = "/sys/block";

/// The block device of `device` once it exists: a `/dev/vd*` path as it is, or the disk
/// whose virtio serial is the name after `serial:` (a disk the host hot-plugged, whose
/// guest name depends on the order the kernel found it in).
pub(super) fn wait_for_disk(device: &str, sys_block: &Path) -> Result<String, ContainerError> {
    let serial = device.starts_with(gpucell_protocol::DISK_SERIAL_PREFIX);
    let wait = if serial { HOTPLUG_WAIT } else { DEVICE_WAIT };
    let deadline = Instant::now() + wait;
    loop {
        let found = match device.strip_prefix(gpucell_protocol::DISK_SERIAL_PREFIX) {
            Some(serial) => disk_with_serial(sys_block, serial),
            None => Path::new(device).exists().then(|| device.to_owned()),
        };
        if let Some(dev) = found.filter(|d| Path::new(d).exists()) {
            return Ok(dev);
        }
        if Instant::now() >= deadline {
            return Err(ContainerError::NoDevice(device.to_owned(), wait));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `/dev/<name>` of the `vd*` disk under `sys_block` whose `serial` is `serial`.
fn disk_with_serial(sys_block: &Path, serial: &str) -> Option<String> {
    let entries = fs::read_dir(sys_block).ok()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vd") {
            continue;
        }
        let mut got = String::new();
        let read = fs::File::open(e.path().join("serial"))
            .and_then(|f| f.take(64).read_to_string(&mut got));
        if read.is_ok() && got.trim_end() == serial {
            return Some(format!("/dev/{name}"));
        }
    }
    None
}

/// Starts a pod's sandbox process: a child of the agent that runs nothing and holds, as
/// `pause` does: SIGTERM or SIGINT end it with 0, any other fatal signal as it would end
/// any process. Its streams stay silent.
pub fn spawn_holder() -> Result<(Pid, Stdio), ContainerError> {
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    // Every signal stays pending in the child until its dispositions are in place: a
    // stop that comes at once still ends it with 0, and a signal the agent ignores (a
    // SIGHUP under nohup, say) is not lost to the inherited disposition (Linux never
    // discards a blocked signal as ignored).
    let mut before = SigSet::empty();
    signal::sigprocmask(
        SigmaskHow::SIG_BLOCK,
        Some(&SigSet::all()),
        Some(&mut before),
    )
    .map_err(|e| ContainerError::Sys("blocking SIGTERM for the pod's sandbox process", e))?;
    // SAFETY: the agent is single-threaded; the child only calls async-signal-safe
    // functions (sigprocmask, signal, pause, _exit) before it ends.
    let forked = unsafe { unistd::fork() };
    if !matches!(forked, Ok(unistd::ForkResult::Child)) {
        let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&before), None);
    }
    match forked {
        Ok(unistd::ForkResult::Child) => hold(),
        Ok(unistd::ForkResult::Parent { child }) => {
            drop((in_r, out_w, err_w));
            for fd in [&in_w, &out_r, &err_r] {
                set_nonblocking(fd);
            }
            Ok((
                child,
                Stdio {
                    stdin: in_w,
                    stdout: out_r,
                    stderr: Some(err_r),
                    pty: None,
                },
            ))
        }
        Err(e) => Err(ContainerError::Sys("fork of the pod's sandbox process", e)),
    }
}

/// The holder's body (in the forked child): default dispositions, nothing blocked,
/// SIGTERM and SIGINT exit 0, then wait for signals forever.
fn hold() -> ! {
    extern "C" fn end(_: libc::c_int) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(0) }
    }
    // SAFETY: plain libc calls on values of this stack; no allocation, no locks.
    unsafe {
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        libc::signal(
            libc::SIGTERM,
            end as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGINT,
            end as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        // Only now: a signal that came since the fork is delivered (SIGTERM to `end`).
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        loop {
            libc::pause();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_holder_ends_with_0_on_sigterm_and_by_any_other_signal() {
        use nix::sys::signal::Signal;
        use nix::sys::wait::{waitpid, WaitStatus};
        // A SIGTERM at once, before the child can have set its handler, still ends it
        // with 0.
        let (pid, _io) = spawn_holder().unwrap();
        signal::kill(pid, Signal::SIGTERM).unwrap();
        assert_eq!(waitpid(pid, None).unwrap(), WaitStatus::Exited(pid, 0));
        let (pid, _io) = spawn_holder().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)).unwrap(),
            WaitStatus::StillAlive
        );
        signal::kill(pid, Signal::SIGINT).unwrap();
        assert_eq!(waitpid(pid, None).unwrap(), WaitStatus::Exited(pid, 0));
        let (pid, _io) = spawn_holder().unwrap();
        signal::kill(pid, Signal::SIGHUP).unwrap();
        assert_eq!(
            waitpid(pid, None).unwrap(),
            WaitStatus::Signaled(pid, Signal::SIGHUP, false)
        );
    }

    #[test]
    fn a_hot_plugged_disk_is_found_by_its_serial() {
        let sys = tempfile::tempdir().unwrap();
        for (name, serial) in [
            ("vda", "\n"),
            ("vdb", "gpucell-c0\n"),
            ("vdc", "gpucell-c1\n"),
        ] {
            fs::create_dir_all(sys.path().join(name)).unwrap();
            fs::write(sys.path().join(name).join("serial"), serial).unwrap();
        }
        fs::create_dir_all(sys.path().join("sda")).unwrap();
        fs::write(sys.path().join("sda/serial"), "gpucell-c2").unwrap();
        assert_eq!(
            disk_with_serial(sys.path(), "gpucell-c1").as_deref(),
            Some("/dev/vdc")
        );
        assert_eq!(
            disk_with_serial(sys.path(), "gpucell-c0").as_deref(),
            Some("/dev/vdb")
        );
        // Only virtio disks are looked at.
        assert_eq!(disk_with_serial(sys.path(), "gpucell-c2"), None);
        assert_eq!(disk_with_serial(sys.path(), "gpucell-c9"), None);
    }
}

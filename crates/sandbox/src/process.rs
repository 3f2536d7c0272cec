//! The QEMU child process: spawned in its own process group with
//! `PR_SET_PDEATHSIG=SIGKILL`, stdin from /dev/null, serial console and stderr drained
//! into bounded captures; killed (whole group) and reaped when the guard drops.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::args::QemuCommand;
use crate::console::Capture;

/// Serial console bytes kept for error reports.
pub const CONSOLE_TAIL_BYTES: usize = 64 * 1024;
/// QEMU stderr bytes kept for error reports.
pub const STDERR_TAIL_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start QEMU {binary:?}; install qemu-system-x86 or pass its path")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the watchdog that kills QEMU if gpucell dies")]
    Watchdog(#[source] std::io::Error),
    #[error(transparent)]
    Jail(#[from] crate::jail::status::StatusError),
    #[error("waiting for QEMU (pid {pid}) failed")]
    Wait {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Describes how QEMU ended, for messages.
pub fn describe_exit(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    }
}

/// The locked-memory limit QEMU needs, if it must be raised: VFIO pins all guest RAM
/// (and the device's DMA windows) in QEMU's name, after QEMU has dropped to its
/// unprivileged user, so the limit has to cover guest memory plus some headroom. The
/// default (8 MiB, or what the service manager gives) would make the pin fail.
pub fn memlock_limit(cmd: &QemuCommand) -> Option<libc::rlim_t> {
    const HEADROOM: u64 = 1 << 30;
    let passes_devices = cmd
        .devices
        .iter()
        .any(|d| matches!(d, crate::args::Device::VfioPci { .. }));
    passes_devices.then(|| {
        cmd.resources
            .memory_mib
            .saturating_mul(1 << 20)
            .saturating_add(HEADROOM) as libc::rlim_t
    })
}

/// A running QEMU, killed with its process group on drop.
#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    watchdog: Option<Watchdog>,
    /// The child gpucell spawned: QEMU itself, or in a jail the process that waits
    /// for it (and leads the process group).
    leader: u32,
    /// QEMU's own pid (in the jail, pid 1 of its pid namespace).
    pid: u32,
    /// What the jail holds (cgroup, uid), released after QEMU is reaped.
    jail: Option<(crate::jail::JailResources, crate::jail::status::Expected)>,
    exited: Option<ExitStatus>,
    console: Capture,
    stderr: Capture,
    started: Instant,
}

impl QemuProcess {
    /// Starts QEMU. `console_marker` lets a caller wait for a line on the serial console.
    pub fn spawn(
        cmd: &QemuCommand,
        console_marker: Option<&[u8]>,
    ) -> Result<QemuProcess, ProcessError> {
        Self::spawn_with_fds(cmd, console_marker, &[])
    }

    /// [`QemuProcess::spawn`], QEMU inheriting each `(descriptor, number)` of `fds` as
    /// that number (a tap queue as `fd=3`); numbers must be above 2 and distinct.
    pub fn spawn_with_fds(
        cmd: &QemuCommand,
        console_marker: Option<&[u8]>,
        fds: &[(std::os::fd::BorrowedFd<'_>, i32)],
    ) -> Result<QemuProcess, ProcessError> {
        Self::spawn_jailed(cmd, console_marker, fds, None)
    }

    /// [`QemuProcess::spawn_with_fds`], in `jail` when given (see [`crate::jail`]).
    pub fn spawn_jailed(
        cmd: &QemuCommand,
        console_marker: Option<&[u8]>,
        fds: &[(std::os::fd::BorrowedFd<'_>, i32)],
        jail: Option<crate::jail::QemuJail>,
    ) -> Result<QemuProcess, ProcessError> {
        let pass: Vec<(i32, i32)> = fds
            .iter()
            .map(|(fd, n)| (std::os::fd::AsRawFd::as_raw_fd(fd), *n))
            .collect();
        let args = cmd.args();
        tracing::debug!(binary = %cmd.binary.display(), args = ?args, "starting QEMU");
        let mut command = Command::new(&cmd.binary);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let parent = std::process::id() as libc::pid_t;
        let memlock = memlock_limit(cmd);
        // SAFETY: only async-signal-safe calls (prctl, setrlimit, getppid, _exit) run
        // between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(bytes) = memlock {
                    let limit = libc::rlimit {
                        rlim_cur: bytes,
                        rlim_max: bytes,
                    };
                    if libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for &(from, to) in &pass {
                    // dup2 onto itself keeps close-on-exec: clear it instead.
                    let res = if from == to {
                        libc::fcntl(to, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(from, to)
                    };
                    if res < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // The parent may have died before prctl: then nobody would kill us.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let jail = jail.map(|j| {
            crate::jail::exec::install(&mut command, j.prepared);
            (j.resources, j.expected)
        });
        let mut child = command.spawn().map_err(|source| ProcessError::Spawn {
            binary: cmd.binary.clone(),
            source,
        })?;
        let pid = child.id();
        let vm_pid = if jail.is_some() {
            jailed_child(pid).unwrap_or(pid)
        } else {
            pid
        };
        // A uid change (-runas) clears the parent-death signal: a watchdog covers it.
        let watchdog = if cmd.run_as.is_some() {
            match Watchdog::spawn(pid) {
                Ok(w) => Some(w),
                Err(e) => {
                    let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
                    let _ = child.wait();
                    return Err(ProcessError::Watchdog(e));
                }
            }
        } else {
            None
        };
        let (console, _) = match child.stdout.take() {
            Some(out) => Capture::spawn("console", out, CONSOLE_TAIL_BYTES, console_marker),
            None => Capture::spawn("console", std::io::empty(), 1, None),
        };
        let (stderr, _) = match child.stderr.take() {
            Some(err) => Capture::spawn("qemu-stderr", err, STDERR_TAIL_BYTES, None),
            None => Capture::spawn("qemu-stderr", std::io::empty(), 1, None),
        };
        Ok(QemuProcess {
            child,
            watchdog,
            leader: pid,
            pid: vm_pid,
            jail,
            exited: None,
            console,
            stderr,
            started: Instant::now(),
        })
    }

    /// QEMU's pid (its threads are under `/proc/<pid>/task`).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The uid and cgroup of a jailed QEMU.
    pub fn jail(&self) -> Option<&crate::jail::JailResources> {
        self.jail.as_ref().map(|(r, _)| r)
    }

    /// Checks that a jailed QEMU is confined as promised (seccomp in force, no
    /// capabilities, no new privileges, its own uid), from `/proc/<pid>/status`. QEMU
    /// installs its seccomp filter while parsing its options: call this once its
    /// monitor answers. Nothing to check without a jail.
    pub fn check_jail(&self) -> Result<(), ProcessError> {
        let Some((resources, expected)) = &self.jail else {
            return Ok(());
        };
        let path = std::path::PathBuf::from(format!("/proc/{}/status", self.pid));
        resources.record_status(crate::jail::status::check_file(&path, *expected)?);
        Ok(())
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// The guest's serial console (bounded tail).
    pub fn console(&self) -> &Capture {
        &self.console
    }

    /// QEMU's own stderr (bounded tail).
    pub fn stderr(&self) -> &Capture {
        &self.stderr
    }

    /// Returns the exit status once QEMU has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().map_err(|source| ProcessError::Wait {
                pid: self.leader,
                source,
            })?;
        }
        Ok(self.exited)
    }

    /// Waits up to `timeout` for QEMU to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills QEMU's process group with SIGKILL and reaps QEMU.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        // First the watchdog, so that it never signals a process group id that a
        // reaped QEMU left free for reuse.
        if let Some(w) = self.watchdog.take() {
            w.disarm();
        }
        if self.exited.is_none() {
            let _ = kill(Pid::from_raw(-(self.leader as i32)), Signal::SIGKILL);
            let _ = self.child.kill();
            match self.child.wait() {
                Ok(s) => self.exited = Some(s),
                Err(e) => tracing::warn!(pid = self.leader, error = %e, "could not reap QEMU"),
            }
        }
        self.exited
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The one child of `pid` (a jailed QEMU, forked by the process gpucell spawned
/// before that exec'd it, so it exists once `spawn` returns).
fn jailed_child(pid: u32) -> Option<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    let text = std::fs::read_to_string(path).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Kills QEMU's process group when gpucell dies without cleaning up (SIGKILL, crash).
///
/// QEMU's parent-death signal is cleared when it switches to an unprivileged user, so a
/// small `sh` holds the read end of a pipe whose write end only gpucell holds: when
/// gpucell dies the kernel closes it, `read` returns and the group is killed. On a
/// normal exit gpucell kills the watchdog first.
#[derive(Debug)]
struct Watchdog {
    child: Child,
    _pipe: std::os::fd::OwnedFd,
}

impl Watchdog {
    fn spawn(qemu_pgid: u32) -> std::io::Result<Watchdog> {
        let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg("read -r _; kill -KILL \"-$1\" 2>/dev/null")
            .arg("gpucell-qemu-watchdog")
            .arg(qemu_pgid.to_string())
            .stdin(Stdio::from(read_end))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        Ok(Watchdog {
            child,
            _pipe: write_end,
        })
    }

    fn disarm(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! A small QMP client: connect, negotiate capabilities, run a command, wait for an
//! event. Every read has a timeout and every line a length limit: QEMU is trusted more
//! than the guest, but a wedged QEMU must not wedge gpucell.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest QMP line accepted.
const MAX_LINE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("could not connect to the QMP socket {path:?} within {waited:?}")]
    Connect {
        path: PathBuf,
        waited: Duration,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP i/o failed")]
    Io(#[from] std::io::Error),
    #[error("QMP timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("QEMU closed the QMP connection")]
    Closed,
    #[error("QMP line over {MAX_LINE} bytes")]
    LineTooLong,
    #[error("QMP sent something that is not JSON: {0:?}")]
    BadJson(String),
    #[error("QMP greeting missing (got {0})")]
    NoGreeting(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// A QMP connection in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Duration,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects (retrying until the socket is there, up to `timeout`) and leaves
    /// capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < timeout => {
                    tracing::trace!(error = %e, "QMP socket not ready yet");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        waited: start.elapsed(),
                        source,
                    })
                }
            }
        };
        Self::from_stream(stream, timeout)
    }

    /// Takes over an already connected stream (tests use a socketpair).
    pub fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Qmp, QmpError> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            timeout,
            events: Vec::new(),
        };
        let greeting = qmp.read_value("the QMP greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::NoGreeting(greeting.to_string()));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_value(&mut self, what: &str) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    QmpError::Timeout(self.timeout, what.to_string())
                }
                _ => QmpError::Io(e),
            })?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if n as u64 > MAX_LINE {
            return Err(QmpError::LineTooLong);
        }
        serde_json::from_slice(&line).map_err(|_| {
            QmpError::BadJson(String::from_utf8_lossy(&line).chars().take(200).collect())
        })
    }

    /// Runs a command and returns its `return` value. Events read meanwhile are kept
    /// for [`Qmp::wait_event`].
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| QmpError::BadJson(e.to_string()))?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes)?;
        self.read_reply(command)
    }

    /// Reads until the reply to `command`; events read meanwhile are kept.
    fn read_reply(&mut self, command: &str) -> Result<Value, QmpError> {
        loop {
            let v = self.read_value(command)?;
            if let Some(ret) = v.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: err["class"].as_str().unwrap_or("?").to_string(),
                    desc: err["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            if v.get("event").is_some() && self.events.len() < 256 {
                self.events.push(v);
            }
        }
    }

    /// `query-status`: `prelaunch`, `running`, `paused`, `internal-error`, `shutdown`...
    pub fn status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None)?;
        Ok(v["status"].as_str().unwrap_or("unknown").to_string())
    }

    /// Where the guest's vCPUs are, for a guest that does not answer: `query-status` and
    /// the `RIP=...` line of each vCPU from `info registers -a` (e.g. `running; cpu0
    /// RIP=ffffffff81c0c1d4 ... HLT=1`). Best effort: what QEMU does not say is left out.
    pub fn vm_state(&mut self) -> String {
        let mut out = self
            .status()
            .unwrap_or_else(|e| format!("status unknown ({e})"));
        let regs = self.execute(
            "human-monitor-command",
            Some(serde_json::json!({ "command-line": "info registers -a" })),
        );
        if let Ok(v) = regs {
            out.push_str(&rip_lines(v.as_str().unwrap_or_default()));
        }
        out
    }

    /// Runs a command with `fd` passed alongside it (`SCM_RIGHTS`), as `add-fd` and
    /// `getfd` want: a jailed QEMU cannot open host paths, but it can use a descriptor.
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| QmpError::BadJson(e.to_string()))?;
        bytes.push(b'\n');
        let fds = [fd.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        // The descriptor travels with the first byte; the rest follows as plain writes.
        let iov = [std::io::IoSlice::new(&bytes[..1])];
        sendmsg::<()>(
            self.writer.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| QmpError::Io(e.into()))?;
        self.writer.write_all(&bytes[1..])?;
        self.read_reply(command)
    }

    /// Hot-plugs the disk behind `disk` (opened read-only) as a `virtio-blk-pci` device
    /// `<node>-dev` with virtio serial `serial`, on the free PCIe root port `port` (a
    /// pod's further container's root filesystem): `add-fd` of the descriptor,
    /// `blockdev-add` of node `node` on `/dev/fdset/N`, then `device_add`. A failed step
    /// undoes the earlier ones, so nothing is left behind.
    pub fn hotplug_disk(
        &mut self,
        node: &str,
        disk: BorrowedFd<'_>,
        port: &str,
        serial: &str,
    ) -> Result<i64, QmpError> {
        let added = self.execute_with_fd("add-fd", None, disk)?;
        let Some(fdset) = added.get("fdset-id").and_then(Value::as_i64) else {
            return Err(QmpError::BadJson(format!("add-fd answered {added}")));
        };
        let undo_fdset = |q: &mut Qmp| {
            if let Err(e) = q.execute("remove-fd", Some(json!({ "fdset-id": fdset }))) {
                tracing::warn!(fdset, error = %e, "removing the descriptor of a failed hot-plug");
            }
        };
        let block = self.execute(
            "blockdev-add",
            Some(json!({
                "driver": "raw",
                "node-name": node,
                "read-only": true,
                "file": {
                    "driver": "file",
                    "filename": format!("/dev/fdset/{fdset}"),
                    "read-only": true,
                },
            })),
        );
        if let Err(e) = block {
            undo_fdset(self);
            return Err(e);
        }
        let device = self.execute(
            "device_add",
            Some(json!({
                "driver": "virtio-blk-pci",
                "id": format!("{node}-dev"),
                "drive": node,
                "bus": port,
                "serial": serial,
            })),
        );
        if let Err(e) = device {
            if let Err(undo) = self.execute("blockdev-del", Some(json!({ "node-name": node }))) {
                tracing::warn!(node, error = %undo, "removing the block node of a failed hot-plug");
            }
            undo_fdset(self);
            return Err(e);
        }
        Ok(fdset)
    }

    /// Hot-unplugs what [`Qmp::hotplug_disk`] plugged as `node` with descriptor set
    /// `fdset`: `device_del`, then the guest's release of it (`DEVICE_DELETED`) by
    /// `deadline`, then `blockdev-del` and `remove-fd`. A guest that does not let the
    /// device go keeps it, and the timeout says so.
    pub fn unplug_disk(
        &mut self,
        node: &str,
        fdset: i64,
        deadline: Instant,
    ) -> Result<(), QmpError> {
        let dev = format!("{node}-dev");
        self.execute("device_del", Some(json!({ "id": dev })))?;
        let deleted = |e: &Value| e["event"] == "DEVICE_DELETED" && e["data"]["device"] == dev;
        let what = format!("the guest to release {dev} (DEVICE_DELETED)");
        self.wait_for(&deleted, &what, deadline)?;
        self.execute("blockdev-del", Some(json!({ "node-name": node })))?;
        self.execute("remove-fd", Some(json!({ "fdset-id": fdset })))?;
        Ok(())
    }

    pub fn powerdown(&mut self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).map(|_| ())
    }

    /// Asks QEMU to exit at once. QEMU may close the socket before answering.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits for an event named `name` until `deadline`.
    pub fn wait_event(&mut self, name: &str, deadline: Instant) -> Result<Value, QmpError> {
        self.wait_for(
            &|e: &Value| e["event"] == name,
            &format!("event {name}"),
            deadline,
        )
    }

    /// Waits until `deadline` for the first event `matches` accepts (one already read
    /// first); other events are kept. The read timeout is restored after.
    fn wait_for(
        &mut self,
        matches: &dyn Fn(&Value) -> bool,
        what: &str,
        deadline: Instant,
    ) -> Result<Value, QmpError> {
        if let Some(i) = self.events.iter().position(matches) {
            return Ok(self.events.remove(i));
        }
        let result = loop {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break Err(QmpError::Timeout(self.timeout, what.to_string()));
            };
            let set = self
                .reader
                .get_ref()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))));
            if let Err(e) = set {
                break Err(QmpError::Io(e));
            }
            match self.read_value(what) {
                Ok(v) if matches(&v) => break Ok(v),
                Ok(v) => {
                    if v.get("event").is_some() && self.events.len() < 256 {
                        self.events.push(v);
                    }
                }
                Err(QmpError::Timeout(..)) => {}
                Err(e) => break Err(e),
            }
        };
        let _ = self.reader.get_ref().set_read_timeout(Some(self.timeout));
        result
    }
}

/// `; cpuN RIP=... HLT=...` for each vCPU in `info registers -a` output (hostile text
/// from QEMU is cut to a bounded length).
fn rip_lines(info: &str) -> String {
    let mut out = String::new();
    let rips = info.lines().filter(|l| l.starts_with("RIP=")).take(8);
    for (cpu, line) in rips.enumerate() {
        let line: String = line.chars().take(120).collect();
        out.push_str(&format!("; cpu{cpu} {}", line.trim()));
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn rip_lines_of_each_vcpu() {
        let info = "CPU#0\nRAX=0 RBX=0\nRIP=ffffffff81c0c1d4 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\nES =0000\nCPU#1\nRIP=000000000000fff0 RFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0\n";
        assert_eq!(
            rip_lines(info),
            "; cpu0 RIP=ffffffff81c0c1d4 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1; cpu1 RIP=000000000000fff0 RFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0"
        );
        assert_eq!(rip_lines("garbage"), "");
        assert!(rip_lines(&format!("RIP={}", "x".repeat(10_000))).len() < 200);
    }

    use super::*;

    fn fake_qemu(
        script: &'static [&'static str],
    ) -> (UnixStream, std::thread::JoinHandle<Vec<String>>) {
        let (a, b) = UnixStream::pair().unwrap();
        let h = std::thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            let mut r = BufReader::new(b);
            let mut got = Vec::new();
            for line in script {
                if let Some(reply) = line.strip_prefix("< ") {
                    let mut l = String::new();
                    r.read_line(&mut l).unwrap();
                    got.push(l.trim().to_string());
                    if !reply.is_empty() {
                        writeln!(w, "{reply}").unwrap();
                    }
                } else {
                    writeln!(w, "{line}").unwrap();
                }
            }
            std::thread::sleep(Duration::from_millis(500));
            got
        });
        (a, h)
    }

    #[test]
    fn commands_errors_and_events() {
        let (s, h) = fake_qemu(&[
            r#"{"QMP": {"version": {}, "capabilities": []}}"#,
            r#"< {"return": {}}"#,
            r#"< {"event": "STOP"}"#,
            r#"{"error": {"class": "GenericError", "desc": "nope"}}"#,
        ]);
        let mut q = Qmp::from_stream(s, Duration::from_secs(5)).unwrap();
        let err = q.execute("stop", None).unwrap_err();
        assert!(
            err.to_string().contains("stop failed: GenericError: nope"),
            "{err}"
        );
        let ev = q
            .wait_event("STOP", Instant::now() + Duration::from_secs(1))
            .unwrap();
        assert_eq!(ev["event"], "STOP");
        let sent = h.join().unwrap();
        assert_eq!(sent[0], r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(sent[1], r#"{"execute":"stop"}"#);
    }

    #[test]
    fn a_disk_is_hot_plugged_by_descriptor_and_a_failed_plug_leaves_nothing() {
        use std::os::fd::AsFd;
        let (a, b) = UnixStream::pair().unwrap();
        // A fake QEMU that checks a descriptor came with each `add-fd`.
        let h = std::thread::spawn(move || {
            use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
            let mut w = b.try_clone().unwrap();
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut got = Vec::new();
            let mut fds = 0;
            let replies = [
                r#"{"return": {}}"#,
                r#"{"return": {"fdset-id": 3, "fd": 9}}"#,
                r#"{"return": {}}"#,
                r#"{"return": {}}"#,
                r#"{"return": {"fdset-id": 4, "fd": 10}}"#,
                r#"{"return": {}}"#,
                r#"{"error": {"class": "GenericError", "desc": "Bus 'hp9' not found"}}"#,
                r#"{"return": {}}"#,
                r#"{"return": {}}"#,
            ];
            let mut pending = Vec::new();
            for reply in replies {
                while !pending.contains(&b'\n') {
                    let mut buf = [0u8; 4096];
                    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
                    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                    let msg =
                        recvmsg::<()>(b.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())
                            .unwrap();
                    for c in msg.cmsgs().unwrap() {
                        if let ControlMessageOwned::ScmRights(f) = c {
                            fds += f.len();
                        }
                    }
                    let n = msg.bytes;
                    pending.extend_from_slice(&buf[..n]);
                }
                let at = pending.iter().position(|&c| c == b'\n').unwrap();
                let line: Vec<u8> = pending.drain(..=at).collect();
                got.push(String::from_utf8(line).unwrap().trim().to_string());
                writeln!(w, "{reply}").unwrap();
            }
            (got, fds)
        });
        let mut q = Qmp::from_stream(a, Duration::from_secs(5)).unwrap();
        let disk = tempfile::tempfile().unwrap();
        q.hotplug_disk("c1", disk.as_fd(), "hp0", "gpucell-c1")
            .unwrap();
        let err = q
            .hotplug_disk("c2", disk.as_fd(), "hp9", "gpucell-c2")
            .unwrap_err();
        assert!(err.to_string().contains("Bus 'hp9' not found"), "{err}");
        let (sent, fds) = h.join().unwrap();
        assert_eq!(fds, 2, "each add-fd carries one descriptor");
        let v: Vec<Value> = sent[1..]
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(v[0]["execute"], "add-fd");
        assert_eq!(v[1]["execute"], "blockdev-add");
        assert_eq!(v[1]["arguments"]["node-name"], "c1");
        assert_eq!(v[1]["arguments"]["read-only"], true);
        assert_eq!(v[1]["arguments"]["file"]["filename"], "/dev/fdset/3");
        assert_eq!(v[2]["execute"], "device_add");
        assert_eq!(v[2]["arguments"]["driver"], "virtio-blk-pci");
        assert_eq!(v[2]["arguments"]["drive"], "c1");
        assert_eq!(v[2]["arguments"]["bus"], "hp0");
        assert_eq!(v[2]["arguments"]["serial"], "gpucell-c1");
        // The failed plug: its block node and its descriptor set are removed again.
        assert_eq!(v[3]["execute"], "add-fd");
        assert_eq!(v[5]["execute"], "device_add");
        assert_eq!(v[6]["execute"], "blockdev-del");
        assert_eq!(v[6]["arguments"]["node-name"], "c2");
        assert_eq!(v[7]["execute"], "remove-fd");
        assert_eq!(v[7]["arguments"]["fdset-id"], 4);
    }

    #[test]
    fn an_unplug_waits_for_the_guest_then_removes_the_node_and_descriptor() {
        let (s, h) = fake_qemu(&[
            r#"{"QMP": {"version": {}, "capabilities": []}}"#,
            r#"< {"return": {}}"#,
            r#"< {"return": {}}"#,
            r#"{"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/c1-dev/virtio-backend"}}"#,
            r#"{"event": "DEVICE_DELETED", "data": {"device": "c1-dev", "path": "/machine/peripheral/c1-dev"}}"#,
            r#"< {"return": {}}"#,
            r#"< {"return": {}}"#,
            r#"< {"return": {}}"#,
        ]);
        let mut q = Qmp::from_stream(s, Duration::from_secs(5)).unwrap();
        q.unplug_disk("c1", 3, Instant::now() + Duration::from_secs(5))
            .unwrap();
        // A guest that never lets go: the wait ends at the deadline, named.
        let err = q
            .unplug_disk("c2", 4, Instant::now() + Duration::from_millis(200))
            .unwrap_err();
        assert!(err.to_string().contains("release c2-dev"), "{err}");
        let sent = h.join().unwrap();
        let v: Vec<Value> = sent[1..]
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(v[0]["execute"], "device_del");
        assert_eq!(v[0]["arguments"]["id"], "c1-dev");
        assert_eq!(v[1]["execute"], "blockdev-del");
        assert_eq!(v[2]["execute"], "remove-fd");
        assert_eq!(v[2]["arguments"]["fdset-id"], 3);
        assert_eq!(v[3]["execute"], "device_del");
        assert_eq!(
            v.len(),
            4,
            "nothing is removed while the guest holds the device"
        );
    }

    #[test]
    fn silence_and_garbage_are_errors() {
        let (s, _h) = fake_qemu(&[r#"{"QMP": {}}"#, "< "]);
        let err = Qmp::from_stream(s, Duration::from_millis(200))
            .err()
            .unwrap();
        assert!(matches!(err, QmpError::Timeout(..)), "{err}");
        let (s, _h) = fake_qemu(&["not json"]);
        assert!(matches!(
            Qmp::from_stream(s, Duration::from_secs(1)),
            Err(QmpError::BadJson(_))
        ));
    }
}

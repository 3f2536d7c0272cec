//! A small QMP client: connect, negotiate capabilities, run a command, wait for an
//! event. Every read has a timeout and every line a length limit: QEMU is trusted more
//! than the guest, but a wedged QEMU must not wedge gpucell.

use std::io::{BufRead, BufReader, Read, Write};
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

    /// Hot-plugs the disk image `path` read-only as a `virtio-blk-pci` device `<node>-dev`
    /// on the free PCIe root port `port` (a pod's second container's root filesystem):
    /// `blockdev-add` of node `node`, then `device_add`. A failed `device_add` removes the
    /// node again, so nothing is left behind.
    pub fn hotplug_disk(&mut self, node: &str, path: &Path, port: &str) -> Result<(), QmpError> {
        let filename = path.to_string_lossy();
        self.execute(
            "blockdev-add",
            Some(json!({
                "driver": "raw",
                "node-name": node,
                "read-only": true,
                "file": { "driver": "file", "filename": filename, "read-only": true },
            })),
        )?;
        let added = self.execute(
            "device_add",
            Some(json!({
                "driver": "virtio-blk-pci",
                "id": format!("{node}-dev"),
                "drive": node,
                "bus": port,
            })),
        );
        if let Err(e) = added {
            if let Err(undo) = self.execute("blockdev-del", Some(json!({ "node-name": node }))) {
                tracing::warn!(node, error = %undo, "removing the block node of a failed hot-plug");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Asks the guest to power off (ACPI power button).
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
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(i));
        }
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(QmpError::Timeout(self.timeout, format!("event {name}")));
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))?;
            let v = self.read_value(name)?;
            if v["event"] == name {
                return Ok(v);
            }
        }
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
    fn a_disk_is_hot_plugged_and_a_failed_plug_leaves_no_node() {
        let (s, h) = fake_qemu(&[
            r#"{"QMP": {"version": {}, "capabilities": []}}"#,
            r#"< {"return": {}}"#,
            r#"< {"return": {}}"#,
            r#"< {"return": {}}"#,
            r#"< {"return": {}}"#,
            r#"< {"error": {"class": "GenericError", "desc": "Bus 'hp9' not found"}}"#,
            r#"< {"return": {}}"#,
        ]);
        let mut q = Qmp::from_stream(s, Duration::from_secs(5)).unwrap();
        q.hotplug_disk("c1", Path::new("/run/x/c1.img"), "hp0")
            .unwrap();
        let err = q
            .hotplug_disk("c2", Path::new("/run/x/c2.img"), "hp9")
            .unwrap_err();
        assert!(err.to_string().contains("Bus 'hp9' not found"), "{err}");
        let sent = h.join().unwrap();
        let v: Vec<Value> = sent[1..]
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(v[0]["execute"], "blockdev-add");
        assert_eq!(v[0]["arguments"]["node-name"], "c1");
        assert_eq!(v[0]["arguments"]["read-only"], true);
        assert_eq!(v[0]["arguments"]["file"]["filename"], "/run/x/c1.img");
        assert_eq!(v[1]["execute"], "device_add");
        assert_eq!(v[1]["arguments"]["driver"], "virtio-blk-pci");
        assert_eq!(v[1]["arguments"]["drive"], "c1");
        assert_eq!(v[1]["arguments"]["bus"], "hp0");
        assert_eq!(v[3]["execute"], "device_add");
        assert_eq!(v[4]["execute"], "blockdev-del");
        assert_eq!(v[4]["arguments"]["node-name"], "c2");
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

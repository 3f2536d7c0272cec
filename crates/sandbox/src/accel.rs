//! Accelerator selection: KVM when a short probe boot under KVM works, TCG otherwise.
//!
//! `/dev/kvm` existing is not enough: a nested hypervisor may expose a KVM that cannot
//! run an unmodified Linux guest (QEMU aborts at once, crawls, or pauses on "KVM
//! internal error" instead of exiting). So the probe boots the real guest kernel and
//! init with `gpucell.probe=1` and waits, with a hard timeout, for the init to print
//! [`PROBE_MARKER`]; QEMU is killed on every path. The verdict is cached in the state
//! dir, keyed by the host's boot id and the QEMU, kernel and initrd files, so only the
//! first run after a boot or an upgrade pays for it.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::args::Accel;
use crate::command::{qemu_command, CommandInput};
use crate::process::QemuProcess;

/// What the init prints on the serial console when booted with `gpucell.probe=1`.
pub const PROBE_MARKER: &str = "gpucell-probe-ok";
/// Environment variable through which the front end lets users force an accelerator
/// (`kvm`, `tcg` or `auto`); named in messages. This crate never reads it: the
/// choice comes in as an [`AccelChoice`].
pub const ACCEL_ENV: &str = "GPUCELL_ACCEL";
const CACHE_FILE: &str = "cache/accel-probe.json";
const CACHE_MAX_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("cannot read the host boot id {path:?}")]
    BootId {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {what} {path:?} to key the probe cache")]
    Stat {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid probe arguments")]
    Args(#[from] crate::args::ArgsError),
    #[error("cannot start the probe VM")]
    Spawn(#[from] crate::process::ProcessError),
    #[error("--accel/{ACCEL_ENV} value {0:?} is unknown: use kvm, tcg or auto")]
    UnknownChoice(String),
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Force(Accel),
}

impl std::str::FromStr for AccelChoice {
    type Err = AccelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Force(Accel::Kvm)),
            "tcg" => Ok(AccelChoice::Force(Accel::Tcg)),
            _ => Err(AccelError::UnknownChoice(s.to_string())),
        }
    }
}

/// Inputs of a probe boot.
#[derive(Debug, Clone)]
pub struct ProbeInput {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Root under which `/proc/sys/kernel/random/boot_id` and `/dev/kvm` are looked up.
    pub host_root: PathBuf,
    /// Where the verdict is cached (`<state>/cache/accel-probe.json`); `None` disables it.
    pub state_dir: Option<PathBuf>,
    /// Hard limit on the probe boot ([`DEFAULT_PROBE_TIMEOUT`] unless the front end
    /// sets it, e.g. from [`PROBE_TIMEOUT_ENV`] through [`parse_probe_timeout`]).
    pub timeout: Duration,
}

impl ProbeInput {
    /// An input with the [`DEFAULT_PROBE_TIMEOUT`].
    pub fn new(
        qemu: &Path,
        kernel: &Path,
        initrd: &Path,
        host_root: &Path,
        state_dir: Option<&Path>,
    ) -> Self {
        ProbeInput {
            qemu: qemu.to_path_buf(),
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            host_root: host_root.to_path_buf(),
            state_dir: state_dir.map(Path::to_path_buf),
            timeout: DEFAULT_PROBE_TIMEOUT,
        }
    }

    /// The same input with this probe boot time limit.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// Environment variable through which the front end lets users override the probe
/// boot's time limit, in seconds (a nested host whose KVM is itself emulated can need
/// more than the default to boot the guest). This crate never reads it.
pub const PROBE_TIMEOUT_ENV: &str = "GPUCELL_KVM_PROBE_TIMEOUT";
/// The probe boot's time limit unless the front end sets another.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// The range [`parse_probe_timeout`] accepts, in seconds.
pub const PROBE_TIMEOUT_RANGE_S: std::ops::RangeInclusive<u64> = 1..=600;

/// A probe time limit given as whole seconds (`"30"`), between 1 and 600; `None` for
/// anything else.
pub fn parse_probe_timeout(v: &str) -> Option<Duration> {
    let secs: u64 = v.trim().parse().ok()?;
    PROBE_TIMEOUT_RANGE_S
        .contains(&secs)
        .then(|| Duration::from_secs(secs))
}

/// The probe's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// The accelerator to use.
    pub accel: Accel,
    pub kvm_usable: bool,
    /// Why KVM is unusable (empty when usable).
    pub reason: String,
    /// Wall time of the probe boot in milliseconds (0 when nothing was booted).
    pub probe_ms: u64,
    /// Whether this came from the cache.
    #[serde(default)]
    pub cached: bool,
}

impl ProbeResult {
    fn unusable(reason: impl Into<String>, probe_ms: u64) -> Self {
        ProbeResult {
            accel: Accel::Tcg,
            kvm_usable: false,
            reason: reason.into(),
            probe_ms,
            cached: false,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct CacheEntry {
    key: String,
    result: ProbeResult,
}

fn file_key(what: &'static str, path: &Path) -> Result<String, AccelError> {
    let m = fs::metadata(path).map_err(|source| AccelError::Stat {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    Ok(format!(
        "{}:{}:{}:{}",
        path.display(),
        m.len(),
        m.mtime(),
        m.ino()
    ))
}

fn cache_key(input: &ProbeInput) -> Result<String, AccelError> {
    let boot_id_path = input.host_root.join("proc/sys/kernel/random/boot_id");
    let boot_id = fs::read_to_string(&boot_id_path).map_err(|source| AccelError::BootId {
        path: boot_id_path,
        source,
    })?;
    Ok(format!(
        "boot={} qemu={} kernel={} initrd={}",
        boot_id.trim(),
        file_key("QEMU", &input.qemu)?,
        file_key("guest kernel", &input.kernel)?,
        file_key("guest initrd", &input.initrd)?,
    ))
}

fn read_cache(path: &Path, key: &str) -> Option<ProbeResult> {
    let meta = fs::metadata(path).ok()?;
    if meta.len() > CACHE_MAX_BYTES {
        return None;
    }
    let entry: CacheEntry = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    (entry.key == key).then_some(ProbeResult {
        cached: true,
        ..entry.result
    })
}

fn write_cache(path: &Path, key: String, result: &ProbeResult) {
    let entry = CacheEntry {
        key,
        result: result.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&entry).unwrap_or_default();
    if let Err(e) = crate::cachefile::write_replacing(path, &bytes) {
        tracing::warn!(path = %path.display(), error = %e, "could not cache the accelerator probe");
    }
}

/// Decides whether KVM can run the guest here. Uses the cache when it matches.
#[tracing::instrument(skip_all, fields(kernel = %input.kernel.display()))]
pub fn probe(input: &ProbeInput) -> Result<ProbeResult, AccelError> {
    let key = cache_key(input)?;
    let cache_path = input.state_dir.as_ref().map(|s| s.join(CACHE_FILE));
    if let Some(hit) = cache_path.as_deref().and_then(|p| read_cache(p, &key)) {
        tracing::debug!(?hit, "accelerator probe cache hit");
        return Ok(hit);
    }
    let result = probe_uncached(input)?;
    if let Some(p) = &cache_path {
        write_cache(p, key, &result);
    }
    Ok(result)
}

/// Runs the probe boot, ignoring the cache.
pub fn probe_uncached(input: &ProbeInput) -> Result<ProbeResult, AccelError> {
    let kvm = input.host_root.join("dev/kvm");
    if !kvm.exists() {
        return Ok(ProbeResult::unusable(
            format!("{} does not exist", kvm.display()),
            0,
        ));
    }
    if let Err(e) = fs::OpenOptions::new().read(true).write(true).open(&kvm) {
        return Ok(ProbeResult::unusable(
            format!("cannot open {}: {e}", kvm.display()),
            0,
        ));
    }
    let check = probe_boot(input, Accel::Kvm)?;
    let result = if check.booted {
        ProbeResult {
            accel: Accel::Kvm,
            kvm_usable: true,
            reason: String::new(),
            probe_ms: check.ms,
            cached: false,
        }
    } else {
        ProbeResult::unusable(check.reason, check.ms)
    };
    tracing::info!(?result, "accelerator probe");
    Ok(result)
}

/// Outcome of one probe boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootCheck {
    /// The init printed [`PROBE_MARKER`].
    pub booted: bool,
    /// Why not, when it did not.
    pub reason: String,
    pub ms: u64,
}

/// What the probe boots: the guest's kernel and initrd with `gpucell.probe=1`, 1 vCPU,
/// 256 MiB, the console on stdout, and nothing else (no disk, channel or monitor).
pub fn probe_command(input: &ProbeInput, accel: Accel) -> CommandInput {
    let mut c = CommandInput::bare(
        input.qemu.clone(),
        "gpucell-accel-probe".into(),
        accel,
        input.kernel.clone(),
        input.initrd.clone(),
    );
    c.extra_cmdline.push("gpucell.probe=1".into());
    c
}

/// Boots the kernel and initrd of `input` under `accel` with `gpucell.probe=1` and
/// waits, at most `input.timeout`, for [`PROBE_MARKER`]. QEMU is killed on every path.
pub fn probe_boot(input: &ProbeInput, accel: Accel) -> Result<BootCheck, AccelError> {
    let cmd = qemu_command(&probe_command(input, accel))?;
    let start = Instant::now();
    let deadline = start + input.timeout;
    let mut qemu = QemuProcess::spawn(&cmd, Some(PROBE_MARKER.as_bytes()))?;
    let ms = |s: Instant| s.elapsed().as_millis() as u64;
    let result = loop {
        if qemu.console().marker_seen() {
            break BootCheck {
                booted: true,
                reason: String::new(),
                ms: ms(start),
            };
        }
        let err = qemu.stderr().tail();
        if let Some(line) = err.lines().find(|l| l.contains("KVM internal error")) {
            break BootCheck::failed(format!("QEMU reported \"{}\"", line.trim()), ms(start));
        }
        if let Some(status) = qemu.try_wait()? {
            // Let the capture threads drain what QEMU said last.
            std::thread::sleep(Duration::from_millis(50));
            if qemu.console().marker_seen() {
                continue;
            }
            let said = qemu.stderr().tail();
            let why = said
                .lines()
                .find(|l| l.contains("error"))
                .or_else(|| said.lines().rfind(|l| !l.trim().is_empty()))
                .unwrap_or("")
                .to_string();
            break BootCheck::failed(
                format!(
                    "the probe VM exited ({}) without booting: {}",
                    crate::process::describe_exit(&status),
                    if why.trim().is_empty() {
                        "no message"
                    } else {
                        why.trim()
                    }
                ),
                ms(start),
            );
        }
        if Instant::now() >= deadline {
            break BootCheck::failed(
                format!(
                    "the guest did not boot under {accel} within {:?}",
                    input.timeout
                ),
                ms(start),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(qemu);
    Ok(result)
}

impl BootCheck {
    fn failed(reason: String, ms: u64) -> Self {
        BootCheck {
            booted: false,
            reason,
            ms,
        }
    }
}

/// The accelerator chosen for a run and how it was chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Selection {
    pub accel: Accel,
    /// `forced` (flag or env) or `probe`.
    pub how: &'static str,
    /// The probe verdict when one was consulted.
    pub probe: Option<ProbeResult>,
}

impl Selection {
    /// A one-line warning to show when the probe fell back to TCG.
    pub fn warning(&self) -> Option<String> {
        match &self.probe {
            Some(p) if !p.kvm_usable => Some(format!(
                "KVM unusable: {}, using TCG (much slower; set {ACCEL_ENV}=tcg to skip the check)",
                p.reason
            )),
            _ => None,
        }
    }
}

/// Picks the accelerator: a forced choice wins, else the (cached) probe decides.
pub fn select(choice: AccelChoice, input: &ProbeInput) -> Result<Selection, AccelError> {
    match choice {
        AccelChoice::Force(accel) => Ok(Selection {
            accel,
            how: "forced",
            probe: None,
        }),
        AccelChoice::Auto => {
            let p = probe(input)?;
            Ok(Selection {
                accel: p.accel,
                how: "probe",
                probe: Some(p),
            })
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn probe_timeout_setting_is_validated() {
        assert_eq!(
            super::parse_probe_timeout("30"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            super::parse_probe_timeout(" 5 "),
            Some(Duration::from_secs(5))
        );
        assert_eq!(super::parse_probe_timeout("0"), None);
        assert_eq!(super::parse_probe_timeout("601"), None);
        assert_eq!(super::parse_probe_timeout("ten"), None);
    }

    use super::*;

    #[test]
    fn cache_is_keyed_and_used() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("proc/sys/kernel/random")).unwrap();
        fs::write(root.join("proc/sys/kernel/random/boot_id"), "boot-1\n").unwrap();
        for f in ["qemu", "vmlinux", "initrd"] {
            fs::write(dir.path().join(f), f).unwrap();
        }
        let state = dir.path().join("state");
        let input = ProbeInput::new(
            &dir.path().join("qemu"),
            &dir.path().join("vmlinux"),
            &dir.path().join("initrd"),
            &root,
            Some(&state),
        );
        // No /dev/kvm under this root: unusable without booting, and cached.
        let first = probe(&input).unwrap();
        assert!(!first.kvm_usable && !first.cached, "{first:?}");
        assert!(
            first.reason.contains("dev/kvm does not exist"),
            "{}",
            first.reason
        );
        let second = probe(&input).unwrap();
        assert!(second.cached);
        assert_eq!(second.accel, Accel::Tcg);
        // A new boot id invalidates the cache.
        fs::write(root.join("proc/sys/kernel/random/boot_id"), "boot-2\n").unwrap();
        assert!(!probe(&input).unwrap().cached);
        // A forced choice does not probe at all.
        let sel = select(AccelChoice::Force(Accel::Kvm), &input).unwrap();
        assert_eq!((sel.accel, sel.how), (Accel::Kvm, "forced"));
        assert!(sel.warning().is_none());
        let sel = select(AccelChoice::Auto, &input).unwrap();
        assert!(sel.warning().unwrap().starts_with("KVM unusable: "));
        assert!("bogus".parse::<AccelChoice>().is_err());
    }
}

//! The typed run request every front end builds: the CLI from its flags, the daemon from
//! an API body, the shim from an OCI spec. Validated once, by [`RunRequest::validate`],
//! with errors that name the field.

use std::time::Duration;

use gpucell_host::devices::DeviceRequest;
use gpucell_sandbox::accel::AccelChoice;
use gpucell_sandbox::Accel;
use serde::{Deserialize, Serialize};

/// Default guest memory, as `gpucell run` has always used.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// Default time the guest waits for passed devices to appear.
pub const DEFAULT_DEVICE_WAIT_MS: u64 = 10_000;
/// Most vCPUs a sandbox may ask for.
pub const MAX_CPUS: u32 = 255;
/// Most guest memory a sandbox may ask for (16 TiB), a sanity bound, not a policy.
pub const MAX_MEMORY_MIB: u64 = 16 << 20;

/// The accelerator a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelRequest {
    /// Probe once (cached), use KVM when it works.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl AccelRequest {
    pub fn choice(self) -> AccelChoice {
        match self {
            AccelRequest::Auto => AccelChoice::Auto,
            AccelRequest::Kvm => AccelChoice::Force(Accel::Kvm),
            AccelRequest::Tcg => AccelChoice::Force(Accel::Tcg),
        }
    }
}

impl std::str::FromStr for AccelRequest {
    type Err = RequestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(AccelRequest::Auto),
            "kvm" => Ok(AccelRequest::Kvm),
            "tcg" => Ok(AccelRequest::Tcg),
            _ => Err(RequestError::field(
                "accel",
                format!("{s:?} is not one of auto, kvm, tcg"),
            )),
        }
    }
}

/// The PCI functions a run takes, and how they are wired.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// GPUs: `all`, a count, or PCI addresses (`BDF[,BDF...]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<String>,
    /// Further PCI functions of any kind, by address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub functions: Vec<String>,
    /// Back guest memory with hugepages.
    #[serde(default)]
    pub hugepages: bool,
    /// Pin the vCPUs to the CPUs local to the passed devices.
    #[serde(default)]
    pub pin_cpus: bool,
    /// How long the guest waits for the passed devices to appear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// One run: an image, what to run in it, and the VM to run it in.
///
/// Environment entries are `KEY=VALUE`; a bare `KEY` (docker's "take it from my
/// environment") is resolved by the front end before the request is built, because the
/// run core must never read the environment of whoever serves the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Image reference (`oci:DIR[:TAG]`, `oci-archive:FILE`, `docker-archive:FILE`, or a
    /// registry name).
    pub image: String,
    /// Replaces the image's cmd.
    #[serde(default)]
    pub command: Vec<String>,
    /// Replaces the image's entrypoint (its cmd is then dropped, as docker does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<String>,
    #[serde(default)]
    pub env: Vec<String>,
    /// name, uid, name:group or uid:gid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Default: the first 12 digits of the run id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default)]
    pub devices: DeviceSpec,
    /// Stop the workload and the VM after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// How long the guest may take to boot and start its agent (default 30 s, 120 s
    /// under TCG).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_timeout_ms: Option<u64>,
    /// Guest flavour (kernel, init image and driver); default: the node's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
    #[serde(default)]
    pub accel: AccelRequest,
    /// `--network`, `--publish`, `--allow-cidr`, `--egress-rate`.
    #[serde(default, skip_serializing_if = "is_default_network")]
    pub network: gpucell_net::NetworkRequest,
    /// NVIDIA driver: a branch (`550`) or flavour (`nvidia-550`); default: the image's
    /// label `io.gpucell.driver`, else chosen from its requirements and the GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Inject the chosen driver flavour into the container even without GPUs or NVIDIA
    /// variables (tests of a GPU-less guest); the CLI's hidden `--force-driver-injection`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force_driver_injection: bool,
    /// Makes the run a pod's VM: its own process is the pod's sandbox (it runs none of
    /// the image's and holds until signalled, as `pause` does), and up to this many
    /// containers join it while it runs ([`crate::add_container`]), each on a spare
    /// PCIe port. 0: an ordinary run.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pod_slots: u8,
    /// Files of the container's `/etc` set by whoever runs it (a pod's `resolv.conf`,
    /// `hosts` and `hostname`, from its orchestrator), over the image's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub etc_files: Vec<gpucell_protocol::EtcFile>,
    /// The workload gets a terminal (a pty in the guest): its output, stdout and stderr
    /// merged, comes on stdout; the end of stdin is the terminal's ^D.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminal: bool,
    /// The terminal's first size (`{"rows": R, "cols": C}`, each 1 to 10000); only with
    /// `terminal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<gpucell_protocol::WindowSize>,
    /// The container's volumes (a pod's ConfigMaps, Secrets, emptyDirs...: docs/shim.md),
    /// within the limits of `gpucell_protocol::volumes_problem`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<gpucell_protocol::Volume>,
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

/// Most containers a pod's VM can take besides its first.
pub const MAX_POD_SLOTS: u8 = gpucell_sandbox::hotplug::MAX_PORTS;

fn is_default_network(n: &gpucell_net::NetworkRequest) -> bool {
    *n == gpucell_net::NetworkRequest::default()
}

fn default_cpus() -> u32 {
    1
}

fn default_memory() -> u64 {
    DEFAULT_MEMORY_MIB
}

/// A request that failed validation: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid run request: {field}: {problem}")]
pub struct RequestError {
    pub field: &'static str,
    pub problem: String,
}

impl RequestError {
    pub fn field(field: &'static str, problem: impl Into<String>) -> Self {
        RequestError {
            field,
            problem: problem.into(),
        }
    }
}

/// A request that passed validation, with its parts in the types the run needs.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub request: RunRequest,
    pub devices: DeviceRequest,
    pub device_wait: Duration,
    pub timeout: Option<Duration>,
    pub boot_timeout: Option<Duration>,
}

impl RunRequest {
    /// A request for `image` with every other field at its default.
    pub fn new(image: impl Into<String>) -> Self {
        RunRequest {
            image: image.into(),
            command: Vec::new(),
            entrypoint: None,
            env: Vec::new(),
            user: None,
            workdir: None,
            hostname: None,
            cpus: default_cpus(),
            memory_mib: DEFAULT_MEMORY_MIB,
            devices: DeviceSpec::default(),
            timeout_ms: None,
            boot_timeout_ms: None,
            guest: None,
            accel: AccelRequest::Auto,
            network: gpucell_net::NetworkRequest::default(),
            driver: None,
            force_driver_injection: false,
            pod_slots: 0,
            etc_files: Vec::new(),
            terminal: false,
            window: None,
            volumes: Vec::new(),
        }
    }

    /// Checks every field once. What the image decides (the final command, user and
    /// working directory) is checked later against the image's config, by the same
    /// rules, with errors naming the flag.
    pub fn validate(self) -> Result<ValidRequest, RequestError> {
        if self.image.trim().is_empty() {
            return Err(RequestError::field("image", "must not be empty"));
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(RequestError::field(
                "cpus",
                format!("{} is outside 1..={MAX_CPUS}", self.cpus),
            ));
        }
        if self.memory_mib == 0 || self.memory_mib > MAX_MEMORY_MIB {
            return Err(RequestError::field(
                "memory_mib",
                format!("{} MiB is outside 1..={MAX_MEMORY_MIB}", self.memory_mib),
            ));
        }
        if self.pod_slots > MAX_POD_SLOTS {
            return Err(RequestError::field(
                "pod_slots",
                format!("{} is over the most, {MAX_POD_SLOTS}", self.pod_slots),
            ));
        }
        for f in &self.etc_files {
            if let Some(problem) = f.problem() {
                return Err(RequestError::field("etc_files", problem));
            }
        }
        if let Some(w) = &self.window {
            if !self.terminal {
                return Err(RequestError::field(
                    "window",
                    "a terminal size needs `terminal`",
                ));
            }
            if let Some(problem) = w.problem() {
                return Err(RequestError::field("window", problem));
            }
        }
        if let Some(problem) = gpucell_protocol::volumes_wire_problem(&self.volumes) {
            return Err(RequestError::field("volumes", problem));
        }
        for e in &self.env {
            check_env(e)?;
        }
        if let Some(w) = self.workdir.as_deref() {
            if !w.is_empty() && !w.starts_with('/') {
                return Err(RequestError::field(
                    "workdir",
                    format!("{w:?} must be an absolute path"),
                ));
            }
        }
        if let Some(g) = self.guest.as_deref() {
            gpucell_guest::flavour::find(g)
                .map_err(|e| RequestError::field("guest", e.to_string()))?;
        }
        if self.driver.as_deref().is_some_and(|d| d.trim().is_empty()) {
            return Err(RequestError::field("driver", "must not be empty"));
        }
        let timeout = positive_ms("timeout_ms", self.timeout_ms)?;
        let boot_timeout = positive_ms("boot_timeout_ms", self.boot_timeout_ms)?;
        let device_wait = positive_ms("devices.wait_ms", self.devices.wait_ms)?
            .unwrap_or(Duration::from_millis(DEFAULT_DEVICE_WAIT_MS));
        let devices = DeviceRequest::parse(self.devices.gpus.as_deref(), &self.devices.functions)
            .map_err(|e| RequestError::field("devices", e.to_string()))?;
        // What the node's default decides is checked again at run time.
        let mode = self
            .network
            .mode
            .unwrap_or(gpucell_net::NetworkMode::Private);
        self.network
            .resolve(mode)
            .map_err(|e| RequestError::field("network", gpucell_common::chain_string(&e)))?;
        if devices.is_empty() && self.devices.pin_cpus {
            return Err(RequestError::field(
                "devices.pin_cpus",
                "--pin-cpus pins to the passed devices' local CPUs: add --gpus or --device",
            ));
        }
        Ok(ValidRequest {
            request: self,
            devices,
            device_wait,
            timeout,
            boot_timeout,
        })
    }
}

fn check_env(e: &str) -> Result<(), RequestError> {
    let bad = |why: &str| RequestError::field("env", format!("{e:?}: {why}"));
    if e.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    match e.split_once('=') {
        Some((k, _)) if !k.is_empty() => Ok(()),
        Some(_) => Err(bad("the name before `=` is empty")),
        None => Err(bad(
            "must be KEY=VALUE (a front end resolves a bare KEY from its own environment)",
        )),
    }
}

fn positive_ms(field: &'static str, v: Option<u64>) -> Result<Option<Duration>, RequestError> {
    match v {
        Some(0) => Err(RequestError::field(field, "must be greater than 0")),
        Some(ms) => Ok(Some(Duration::from_millis(ms))),
        None => Ok(None),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let v = RunRequest::new("oci:/x").validate().unwrap();
        assert_eq!(v.request.cpus, 1);
        assert_eq!(v.request.memory_mib, DEFAULT_MEMORY_MIB);
        assert!(v.devices.is_empty());
        assert_eq!(v.device_wait, Duration::from_secs(10));
    }

    #[test]
    fn each_bad_field_is_named() {
        type Breaker = fn(&mut RunRequest);
        let cases: Vec<(Breaker, &str)> = vec![
            (|r| r.image = " ".into(), "image"),
            (|r| r.cpus = 0, "cpus"),
            (|r| r.cpus = 1000, "cpus"),
            (|r| r.memory_mib = 0, "memory_mib"),
            (|r| r.env = vec!["NOEQUALS".into()], "env"),
            (|r| r.env = vec!["=v".into()], "env"),
            (|r| r.env = vec!["A=\0".into()], "env"),
            (|r| r.workdir = Some("rel".into()), "workdir"),
            (|r| r.guest = Some("nope-flavour".into()), "guest"),
            (|r| r.timeout_ms = Some(0), "timeout_ms"),
            (|r| r.boot_timeout_ms = Some(0), "boot_timeout_ms"),
            (|r| r.devices.wait_ms = Some(0), "devices.wait_ms"),
            (|r| r.devices.gpus = Some("zero,,x".into()), "devices"),
            (|r| r.devices.pin_cpus = true, "devices.pin_cpus"),
            (
                |r| r.window = Some(gpucell_protocol::WindowSize { rows: 24, cols: 80 }),
                "window",
            ),
            (
                |r| {
                    r.terminal = true;
                    r.window = Some(gpucell_protocol::WindowSize { rows: 0, cols: 80 });
                },
                "window",
            ),
            (
                |r| {
                    r.volumes = vec![gpucell_protocol::Volume {
                        destination: "/a/../etc".into(),
                        source: gpucell_protocol::VolumeSource::ScratchFile,
                    }]
                },
                "volumes",
            ),
            (
                |r| {
                    r.network.mode = Some(gpucell_net::NetworkMode::None);
                    r.network.publish = vec!["80:80".parse().unwrap()];
                },
                "network",
            ),
        ];
        for (break_it, field) in cases {
            let mut r = RunRequest::new("oci:/x");
            break_it(&mut r);
            let err = r.clone().validate().unwrap_err();
            assert_eq!(err.field, field, "{r:?}: {err}");
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn json_body_refuses_unknown_fields_and_fills_defaults() {
        let r: RunRequest = serde_json::from_str(r#"{"image":"oci:/x","accel":"tcg"}"#).unwrap();
        assert_eq!(r.accel, AccelRequest::Tcg);
        assert_eq!(r.memory_mib, DEFAULT_MEMORY_MIB);
        let err = serde_json::from_str::<RunRequest>(r#"{"image":"x","memroy_mib":5}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("memroy_mib"), "{err}");
        let err = serde_json::from_str::<RunRequest>(r#"{"image":"x","devices":{"gpu":"1"}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gpu"), "{err}");
    }

    #[test]
    fn request_round_trips() {
        let mut r = RunRequest::new("oci:/x");
        r.devices.gpus = Some("2".into());
        r.timeout_ms = Some(1500);
        r.terminal = true;
        r.window = Some(gpucell_protocol::WindowSize { rows: 24, cols: 80 });
        let back: RunRequest = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}

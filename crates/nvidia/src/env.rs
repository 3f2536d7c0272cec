//! The NVIDIA Container Toolkit's environment contract (nvidia-container-toolkit
//! `internal/config/image/cuda_image.go` and the runtime hook):
//!
//! - `NVIDIA_VISIBLE_DEVICES`: a comma list of GPU indices or `GPU-<uuid>`s, or `all`,
//!   `none` (the driver without any GPU), `void` (nothing at all). Unset or empty is `void`,
//!   except for a legacy image (`CUDA_VERSION` without `NVIDIA_REQUIRE_CUDA`), where unset
//!   means `all`. Within one value `void` wins over `none`, `none` over `all`.
//! - `NVIDIA_DRIVER_CAPABILITIES`: a comma list of `compute`, `compat32`, `graphics`,
//!   `utility`, `video`, `display`, `ngx`, or `all`; unset or empty is `compute,utility`
//!   (`all` for a legacy image when unset). An unknown capability is an error.
//!
//! gpucell adds one rule on top ([`decide`]): a run that asked for GPUs (`--gpus`, or a
//! forced injection in tests) treats an unset `NVIDIA_VISIBLE_DEVICES` as `all`, the way
//! `docker run --gpus` sets it. An image with no NVIDIA variable run without GPUs gets
//! nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::requirements::{CUDA_VERSION, REQUIRE_CUDA};

pub const VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";
pub const DRIVER_CAPABILITIES: &str = "NVIDIA_DRIVER_CAPABILITIES";
/// Most GPU entries in one `NVIDIA_VISIBLE_DEVICES`.
const MAX_DEVICES: usize = 256;
/// Longest GPU UUID accepted (`GPU-` + 36).
const MAX_UUID: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error(
        "NVIDIA_VISIBLE_DEVICES entry `{0}` is neither a GPU index nor a GPU-<uuid>: use \
         `all`, `none`, `void`, or a comma list such as `0,1` or `GPU-<uuid>` \
         (nvidia-smi -L shows the UUIDs)"
    )]
    BadDevice(String),
    #[error(
        "NVIDIA_VISIBLE_DEVICES names MIG device `{0}`: gpucell passes whole GPUs only; name \
         the GPU by index or GPU-<uuid>"
    )]
    Mig(String),
    #[error("NVIDIA_VISIBLE_DEVICES lists {0} entries, over the limit of {MAX_DEVICES}")]
    TooManyDevices(usize),
    #[error(
        "NVIDIA_DRIVER_CAPABILITIES entry `{0}` is unknown: use `all` or a comma list of \
         compute, compat32, graphics, utility, video, display, ngx"
    )]
    BadCapability(String),
}

/// An image's environment as a map (a later `KEY=VALUE` overrides an earlier one; entries
/// without `=` are ignored, as the toolkit ignores them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageEnv {
    vars: BTreeMap<String, String>,
}

impl ImageEnv {
    pub fn parse<S: AsRef<str>>(env: &[S]) -> Self {
        let vars = env
            .iter()
            .filter_map(|e| e.as_ref().split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        ImageEnv { vars }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    /// Every variable, sorted by name.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// `CUDA_VERSION` set and `NVIDIA_REQUIRE_CUDA` unset or empty (the toolkit's test).
    pub fn is_legacy(&self) -> bool {
        self.get(CUDA_VERSION).is_some_and(|v| !v.is_empty())
            && self.get(REQUIRE_CUDA).is_none_or(str::is_empty)
    }

    /// Whether any `NVIDIA_*` variable or `CUDA_VERSION` is set.
    pub fn has_nvidia_vars(&self) -> bool {
        self.vars
            .keys()
            .any(|k| k.starts_with("NVIDIA_") || k == CUDA_VERSION)
    }
}

/// A GPU named in `NVIDIA_VISIBLE_DEVICES`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeviceId {
    Index(u32),
    /// `GPU-<uuid>` as written.
    Uuid(String),
}

impl DeviceId {
    pub fn parse(s: &str) -> Result<Self, EnvError> {
        let clip = || s.chars().take(80).collect::<String>();
        if !s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .map(DeviceId::Index)
                .map_err(|_| EnvError::BadDevice(clip()));
        }
        if s.starts_with("MIG-") || s.contains(':') {
            return Err(EnvError::Mig(clip()));
        }
        let uuid_ok = s.strip_prefix("GPU-").is_some_and(|u| {
            !u.is_empty()
                && s.len() <= MAX_UUID
                && u.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        });
        if uuid_ok {
            Ok(DeviceId::Uuid(s.to_owned()))
        } else {
            Err(EnvError::BadDevice(clip()))
        }
    }

    /// The CDI device name it selects (`"0"`, `"GPU-…"`).
    pub fn cdi_name(&self) -> String {
        match self {
            DeviceId::Index(i) => i.to_string(),
            DeviceId::Uuid(u) => u.clone(),
        }
    }
}

/// What `NVIDIA_VISIBLE_DEVICES` selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VisibleDevices {
    /// Nothing is injected at all.
    Void,
    /// The driver's libraries and control nodes, no GPU.
    None,
    /// Every GPU of the sandbox.
    All,
    /// These GPUs, in the order given, without duplicates.
    List(Vec<DeviceId>),
}

impl VisibleDevices {
    /// The toolkit's reading of the variable; `unset_means_all` for legacy images (and,
    /// in gpucell, runs that asked for GPUs).
    pub fn from_value(value: Option<&str>, unset_means_all: bool) -> Result<Self, EnvError> {
        let Some(value) = value else {
            return Ok(if unset_means_all {
                VisibleDevices::All
            } else {
                VisibleDevices::Void
            });
        };
        let entries: Vec<&str> = value
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        if entries.len() > MAX_DEVICES {
            return Err(EnvError::TooManyDevices(entries.len()));
        }
        let has = |w: &str| entries.contains(&w);
        if entries.is_empty() || has("void") {
            return Ok(VisibleDevices::Void);
        }
        if has("none") {
            return Ok(VisibleDevices::None);
        }
        if has("all") {
            return Ok(VisibleDevices::All);
        }
        let mut ids: Vec<DeviceId> = Vec::new();
        for e in entries {
            let id = DeviceId::parse(e)?;
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(VisibleDevices::List(ids))
    }

    /// The CDI device names to apply: `["all"]`, the listed names, or none.
    pub fn cdi_names(&self) -> Vec<String> {
        match self {
            VisibleDevices::Void | VisibleDevices::None => Vec::new(),
            VisibleDevices::All => vec!["all".to_owned()],
            VisibleDevices::List(ids) => ids.iter().map(DeviceId::cdi_name).collect(),
        }
    }
}

impl fmt::Display for VisibleDevices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VisibleDevices::Void => f.write_str("void"),
            VisibleDevices::None => f.write_str("none"),
            VisibleDevices::All => f.write_str("all"),
            VisibleDevices::List(_) => f.write_str(&self.cdi_names().join(",")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Capability {
    Compute,
    Compat32,
    Graphics,
    Utility,
    Video,
    Display,
    Ngx,
}

impl Capability {
    pub const ALL: [Capability; 7] = [
        Capability::Compute,
        Capability::Compat32,
        Capability::Graphics,
        Capability::Utility,
        Capability::Video,
        Capability::Display,
        Capability::Ngx,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Compute => "compute",
            Capability::Compat32 => "compat32",
            Capability::Graphics => "graphics",
            Capability::Utility => "utility",
            Capability::Video => "video",
            Capability::Display => "display",
            Capability::Ngx => "ngx",
        }
    }
}

/// A set of driver capabilities.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Capabilities(pub BTreeSet<Capability>);

impl Capabilities {
    /// The toolkit's default: `compute,utility`.
    pub fn default_set() -> Self {
        Capabilities([Capability::Compute, Capability::Utility].into())
    }

    pub fn all() -> Self {
        Capabilities(Capability::ALL.into())
    }

    /// The variable's value (`None` when unset); `legacy` makes unset mean `all`.
    pub fn from_value(value: Option<&str>, legacy: bool) -> Result<Self, EnvError> {
        let Some(value) = value else {
            return Ok(if legacy {
                Self::all()
            } else {
                Self::default_set()
            });
        };
        let entries: Vec<&str> = value
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        if entries.is_empty() {
            return Ok(Self::default_set());
        }
        if entries.contains(&"all") {
            return Ok(Self::all());
        }
        entries
            .into_iter()
            .map(|e| {
                Capability::ALL
                    .into_iter()
                    .find(|c| c.as_str() == e)
                    .ok_or_else(|| EnvError::BadCapability(e.chars().take(64).collect()))
            })
            .collect::<Result<BTreeSet<_>, _>>()
            .map(Capabilities)
    }

    pub fn contains(&self, c: Capability) -> bool {
        self.0.contains(&c)
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|c| c.as_str()).collect();
        f.write_str(&names.join(","))
    }
}

/// What the container gets from the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    /// Never [`VisibleDevices::Void`] (that is no injection at all).
    pub visible: VisibleDevices,
    pub capabilities: Capabilities,
    /// A legacy image (`CUDA_VERSION` without `NVIDIA_REQUIRE_CUDA`).
    pub legacy: bool,
}

/// Decides whether a container gets the driver, and what of it: `None` for nothing.
///
/// `env` is the container's final environment (the image's, then the run's `-e`).
/// `gpus_requested` is true when the run passes GPUs; `force` injects even without GPUs or
/// NVIDIA variables (tests of a GPU-less guest that carries a driver). Either makes an
/// unset `NVIDIA_VISIBLE_DEVICES` mean `all`; an explicit `void` or `none` still wins.
pub fn decide(
    env: &ImageEnv,
    gpus_requested: bool,
    force: bool,
) -> Result<Option<Injection>, EnvError> {
    let legacy = env.is_legacy();
    if !env.has_nvidia_vars() && !gpus_requested && !force {
        return Ok(None);
    }
    let visible =
        VisibleDevices::from_value(env.get(VISIBLE_DEVICES), legacy || gpus_requested || force)?;
    if visible == VisibleDevices::Void {
        return Ok(None);
    }
    let capabilities = Capabilities::from_value(env.get(DRIVER_CAPABILITIES), legacy)?;
    Ok(Some(Injection {
        visible,
        capabilities,
        legacy,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn env(e: &[&str]) -> ImageEnv {
        ImageEnv::parse(e)
    }

    #[test]
    fn visible_devices_follow_the_toolkit() {
        let v = |s: Option<&str>, all| VisibleDevices::from_value(s, all).unwrap();
        assert_eq!(v(None, false), VisibleDevices::Void);
        assert_eq!(v(None, true), VisibleDevices::All);
        assert_eq!(
            v(Some(""), true),
            VisibleDevices::Void,
            "set but empty is void"
        );
        assert_eq!(v(Some(" , "), false), VisibleDevices::Void);
        assert_eq!(v(Some("all"), false), VisibleDevices::All);
        assert_eq!(v(Some("none"), false), VisibleDevices::None);
        assert_eq!(v(Some("void"), true), VisibleDevices::Void);
        assert_eq!(v(Some("all,none"), false), VisibleDevices::None);
        assert_eq!(v(Some("none,void"), false), VisibleDevices::Void);
        assert_eq!(v(Some("0,all"), false), VisibleDevices::All);
        let uuid = "GPU-3a9b1c2d-0e4f-5a6b-7c8d-9e0f1a2b3c4d";
        assert_eq!(
            v(Some(&format!(" 1, {uuid} ,1,0")), false),
            VisibleDevices::List(vec![
                DeviceId::Index(1),
                DeviceId::Uuid(uuid.into()),
                DeviceId::Index(0)
            ])
        );
        assert_eq!(
            v(Some(&format!("1,{uuid}")), false).cdi_names(),
            vec!["1".to_string(), uuid.to_string()]
        );
        assert_eq!(v(Some("all"), false).cdi_names(), vec!["all".to_string()]);
        assert!(v(Some("none"), false).cdi_names().is_empty());
        assert_eq!(v(Some("2,0"), false).to_string(), "2,0");
    }

    #[test]
    fn bad_visible_devices_are_named() {
        for (bad, want) in [
            ("gpu0", EnvError::BadDevice("gpu0".into())),
            ("-1", EnvError::BadDevice("-1".into())),
            ("GPU-", EnvError::BadDevice("GPU-".into())),
            ("GPU-zz", EnvError::BadDevice("GPU-zz".into())),
            ("99999", EnvError::BadDevice("99999".into())),
            ("MIG-1234", EnvError::Mig("MIG-1234".into())),
            ("0:1", EnvError::Mig("0:1".into())),
        ] {
            assert_eq!(
                VisibleDevices::from_value(Some(&format!("0,{bad}")), false),
                Err(want),
                "{bad}"
            );
        }
        let many = vec!["0"; MAX_DEVICES + 1].join(",");
        assert!(matches!(
            VisibleDevices::from_value(Some(&many), false),
            Err(EnvError::TooManyDevices(_))
        ));
        let msg = EnvError::BadDevice("x".into()).to_string();
        assert!(
            msg.contains("`x`") && msg.contains("nvidia-smi -L"),
            "{msg}"
        );
    }

    #[test]
    fn capabilities_default_all_and_validation() {
        let c = |s: Option<&str>, legacy| Capabilities::from_value(s, legacy);
        assert_eq!(c(None, false).unwrap().to_string(), "compute,utility");
        assert_eq!(c(Some(""), true).unwrap().to_string(), "compute,utility");
        assert_eq!(c(None, true).unwrap(), Capabilities::all());
        assert_eq!(c(Some("utility, all"), false).unwrap(), Capabilities::all());
        assert_eq!(
            c(Some("video,compute"), false).unwrap().to_string(),
            "compute,video"
        );
        assert_eq!(
            c(Some("compute,gpu"), false),
            Err(EnvError::BadCapability("gpu".into()))
        );
        assert_eq!(
            c(Some("Compute"), false),
            Err(EnvError::BadCapability("Compute".into())),
            "the toolkit's names are lower case"
        );
    }

    #[test]
    fn legacy_image_detection() {
        assert!(env(&["CUDA_VERSION=11.0"]).is_legacy());
        assert!(env(&["CUDA_VERSION=11.0", "NVIDIA_REQUIRE_CUDA="]).is_legacy());
        assert!(!env(&["CUDA_VERSION=11.0", "NVIDIA_REQUIRE_CUDA=cuda>=11.0"]).is_legacy());
        assert!(!env(&["CUDA_VERSION="]).is_legacy());
        assert!(!env(&["PATH=/bin"]).is_legacy());
        // A later entry overrides an earlier one; entries without '=' are ignored.
        let e = env(&["A=1", "A=2", "JUNK"]);
        assert_eq!(e.get("A"), Some("2"));
        assert_eq!(e.vars().count(), 1);
    }

    #[test]
    fn decide_injects_only_when_asked() {
        // A plain image run without GPUs: nothing.
        assert_eq!(decide(&env(&["PATH=/bin"]), false, false).unwrap(), None);
        // The same image with --gpus: everything, default capabilities.
        let i = decide(&env(&["PATH=/bin"]), true, false).unwrap().unwrap();
        assert_eq!(i.visible, VisibleDevices::All);
        assert_eq!(i.capabilities, Capabilities::default_set());
        // Forced (a GPU-less test guest with a driver).
        let i = decide(&env(&[]), false, true).unwrap().unwrap();
        assert_eq!(i.visible, VisibleDevices::All);
        // A CUDA image sets NVIDIA_VISIBLE_DEVICES=all itself.
        let cuda = [
            "NVIDIA_VISIBLE_DEVICES=all",
            "NVIDIA_DRIVER_CAPABILITIES=compute,utility",
            "CUDA_VERSION=12.4.1",
            "NVIDIA_REQUIRE_CUDA=cuda>=12.4",
        ];
        let i = decide(&env(&cuda), false, false).unwrap().unwrap();
        assert_eq!((i.visible, i.legacy), (VisibleDevices::All, false));
        // NVIDIA variables but VISIBLE_DEVICES unset, no GPUs: void, as the toolkit does.
        assert_eq!(
            decide(&env(&["NVIDIA_DRIVER_CAPABILITIES=all"]), false, false).unwrap(),
            None
        );
        // Legacy images default to all GPUs and all capabilities.
        let i = decide(&env(&["CUDA_VERSION=9.0"]), false, false)
            .unwrap()
            .unwrap();
        assert_eq!(
            (i.visible, i.capabilities, i.legacy),
            (VisibleDevices::All, Capabilities::all(), true)
        );
        // The user's none/void win over --gpus.
        let i = decide(&env(&["NVIDIA_VISIBLE_DEVICES=none"]), true, true)
            .unwrap()
            .unwrap();
        assert_eq!(i.visible, VisibleDevices::None);
        assert_eq!(
            decide(&env(&["NVIDIA_VISIBLE_DEVICES=void"]), true, true).unwrap(),
            None
        );
        assert_eq!(
            decide(&env(&["NVIDIA_VISIBLE_DEVICES="]), true, false).unwrap(),
            None
        );
        // Errors come through.
        assert!(decide(&env(&["NVIDIA_DRIVER_CAPABILITIES=warp"]), true, false).is_err());
    }
}

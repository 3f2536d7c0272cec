//! The node's configuration file, `/etc/gpucell/config.toml`: the one place besides
//! flags where gpucell's behaviour is configured. Unknown keys are refused and every
//! value is checked when the file is loaded; a bad value is an error naming the key and
//! the file, never a warning followed by a default. docs/config.md lists the keys.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::request::AccelRequest;

/// Where the configuration is read from when no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/gpucell/config.toml";

/// Most `[run] prealloc_threads` accepted.
pub const MAX_PREALLOC_THREADS: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration file {path:?}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("configuration file {path:?}: {key}: {problem}")]
    Value {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
}

/// Defaults for every run on this node; a request or a flag overrides them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunDefaults {
    /// The QEMU binary (a name is looked up in `PATH`).
    pub qemu: Option<PathBuf>,
    /// `auto`, `kvm` or `tcg`.
    pub accel: Option<AccelRequest>,
    /// Guest flavour used when a request names none.
    pub guest: Option<String>,
    /// How long the KVM probe boot may take before KVM is judged unusable.
    pub kvm_probe_timeout_ms: Option<u64>,
    /// Threads that preallocate guest memory (default: the host's CPUs, at most 8).
    pub prealloc_threads: Option<u32>,
    /// Page size of preallocated guest memory: `auto`, `4K`, `2M` or `1G`.
    pub hugepage_size: Option<gpucell_sandbox::memory::HugepageSize>,
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub run: RunDefaults,
    /// The image store: unpack limits, guest disk filesystem, unpack place, registry
    /// credentials.
    #[serde(default)]
    pub image: gpucell_image::StoreOptions,
    /// Sandbox networks: default mode, address range, resolvers, node-wide egress
    /// exceptions (docs/network.md).
    #[serde(default)]
    pub network: gpucell_net::NetworkConfig,
    /// The QEMU jail: on by default when gpucell runs as root (docs/security.md).
    #[serde(default)]
    pub jail: gpucell_sandbox::jail::JailConfig,
    /// Where the file was read from (`None`: defaults, no file).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Config {
    /// Reads `path`. A missing file is an error when `required` (the user named it),
    /// else the defaults.
    pub fn load(path: &Path, required: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let mut config = Config::parse(&text, path)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and checks the text of a configuration file read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &'static str, problem: String| ConfigError::Value {
            path: path.to_path_buf(),
            key,
            problem,
        };
        if let Some(g) = &self.run.guest {
            gpucell_guest::flavour::find(g).map_err(|e| bad("run.guest", e.to_string()))?;
        }
        if self.run.kvm_probe_timeout_ms == Some(0) {
            return Err(bad(
                "run.kvm_probe_timeout_ms",
                "must be greater than 0".into(),
            ));
        }
        self.image.validate().map_err(|e| match e {
            gpucell_image::StoreError::BadOption { key, why } => ConfigError::Value {
                path: path.to_path_buf(),
                key: "image",
                problem: format!("{key}: {why}"),
            },
            other => bad("image", other.to_string()),
        })?;
        self.network
            .validate()
            .map_err(|(key, problem)| bad(key, problem))?;
        if let Some(t) = self.run.prealloc_threads {
            if !(1..=MAX_PREALLOC_THREADS).contains(&t) {
                return Err(bad(
                    "run.prealloc_threads",
                    format!("must be between 1 and {MAX_PREALLOC_THREADS}, not {t}"),
                ));
            }
        }
        self.jail
            .validate()
            .map_err(|(key, problem)| bad(key, problem))?;
        if let Some(q) = &self.run.qemu {
            if q.as_os_str().is_empty() {
                return Err(bad("run.qemu", "must not be empty".into()));
            }
        }
        Ok(())
    }

    pub fn kvm_probe_timeout(&self) -> Option<Duration> {
        self.run.kvm_probe_timeout_ms.map(Duration::from_millis)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn missing_default_file_is_defaults_but_named_file_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        assert_eq!(Config::load(&p, false).unwrap(), Config::default());
        let err = Config::load(&p, true).unwrap_err().to_string();
        assert!(err.contains("config.toml"), "{err}");
    }

    #[test]
    fn values_are_parsed_and_checked() {
        let p = Path::new("/etc/gpucell/config.toml");
        let c = Config::parse(
            "[run]\naccel = \"tcg\"\nguest = \"default\"\nkvm_probe_timeout_ms = 5000\n",
            p,
        )
        .unwrap();
        assert_eq!(c.run.accel, Some(AccelRequest::Tcg));
        assert_eq!(c.kvm_probe_timeout(), Some(Duration::from_secs(5)));
        let c = Config::parse(
            "[image]\nfs_type = \"ext4\"\n[image.limits]\nmax_entries = 7\n",
            p,
        )
        .unwrap();
        assert_eq!(c.image.fs_type, gpucell_image::FsType::Ext4);
        assert_eq!(c.image.limits.max_entries, 7);
        let c = Config::parse("[run]\nprealloc_threads = 16\nhugepage_size = \"1G\"\n", p).unwrap();
        assert_eq!(c.run.prealloc_threads, Some(16));
        assert_eq!(
            c.run.hugepage_size,
            Some(gpucell_sandbox::memory::HugepageSize::Huge1G)
        );
        assert!(c.jail.enabled, "the jail is on by default");
        let c = Config::parse("[jail]\nenabled = false\nuids = [4000000, 4000099]\n", p).unwrap();
        assert!(!c.jail.enabled);
        assert_eq!(c.jail.uids, [4_000_000, 4_000_099]);
        for (text, needle) in [
            ("[run]\nprealloc_threads = 0\n", "run.prealloc_threads"),
            ("[run]\nhugepage_size = \"3M\"\n", "auto, 4K, 2M or 1G"),
            ("[run]\naccel = \"fast\"\n", "fast"),
            ("[run]\nguest = \"nvidia-999\"\n", "run.guest"),
            (
                "[run]\nkvm_probe_timeout_ms = 0\n",
                "run.kvm_probe_timeout_ms",
            ),
            ("[run]\nqemu_bin = \"x\"\n", "qemu_bin"),
            ("[runn]\n", "runn"),
            ("[image]\nfs_type = \"zfs\"\n", "zfs"),
            ("[network]\ndefault = \"bridge\"\n", "bridge"),
            ("[network]\nrange = \"10.0.0.0/30\"\n", "network.range"),
            ("[network]\nrange = \"fd00::/8\"\n", "IPv6"),
            (
                "[network]\nallow_cidrs = [\"10.200.1.0/24\"]\n",
                "network.allow_cidrs",
            ),
            ("[image]\nlimits = { max_bytes = 0 }\n", "image"),
            ("[jail]\nuids = [0, 10]\n", "jail.uids"),
            ("[jail]\nuids = [20, 10]\n", "jail.uids"),
            ("[jail]\nregistry = \"jail-uids\"\n", "jail.registry"),
            ("[jail]\nenable = false\n", "enable"),
            (
                "[image.registry]\nauth = { kind = \"basic\", username = \"u\" }\n",
                "password",
            ),
        ] {
            let err = Config::parse(text, p).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(err.contains("config.toml"), "{err}");
        }
    }
}

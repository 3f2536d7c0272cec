//! The NVIDIA driver flavour table (`data/nvidia-flavours.toml`): which drivers gpucell
//! can build, from which Debian packages, pinned by SHA-256.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// The table shipped with gpucell.
pub const EMBEDDED_TABLE: &str = include_str!("../../../../data/nvidia-flavours.toml");
const TABLE_NAME: &str = "data/nvidia-flavours.toml";
/// The only schema this version reads.
pub const TABLE_SCHEMA: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("{TABLE_NAME} does not parse")]
    Parse(#[source] toml::de::Error),
    #[error("{TABLE_NAME} has schema {0}; this gpucell reads schema {TABLE_SCHEMA}")]
    Schema(u32),
    #[error("{TABLE_NAME}: flavour `{flavour}`: {what}")]
    Invalid { flavour: String, what: String },
    #[error("unknown driver flavour `{name}`; known: {known}")]
    Unknown { name: String, known: String },
}

/// Open (GSP-only, Turing and newer) or proprietary kernel modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleKind {
    Open,
    Proprietary,
}

impl ModuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModuleKind::Open => "open",
            ModuleKind::Proprietary => "proprietary",
        }
    }

    /// Name of the source tarball inside the module-source package.
    pub fn tarball(self) -> &'static str {
        match self {
            ModuleKind::Open => "usr/src/nvidia-open-kernel.tar.xz",
            ModuleKind::Proprietary => "usr/src/nvidia-kernel.tar.xz",
        }
    }

    /// Directory the tarball unpacks to.
    pub fn source_dir(self) -> &'static str {
        match self {
            ModuleKind::Open => "modules/nvidia-open-kernel",
            ModuleKind::Proprietary => "modules/nvidia-kernel",
        }
    }
}

/// What a package contributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    ModuleSource,
    Firmware,
    Library,
    Tool,
}

/// A Debian package pinned by version and digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    pub name: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Basename of the `.deb` in the archive.
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

/// A source patch: exact text replacement, applied only where the kernel needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Patch {
    pub name: String,
    /// File in the module source tree.
    pub file: String,
    pub find: String,
    pub replace: String,
    /// Header of the kernel's `-common` tree that decides whether the patch applies...
    pub when_header: String,
    /// ...by containing this text.
    pub when_contains: String,
}

/// One driver flavour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriverFlavour {
    pub name: String,
    pub branch: String,
    /// Upstream driver version, e.g. `550.163.01`.
    pub version: String,
    /// Debian version of the driver packages, e.g. `550.163.01-2`.
    pub debian_version: String,
    pub suite: String,
    pub source_packages: String,
    pub module_kind: ModuleKind,
    pub patches: Vec<String>,
    pub architectures: Vec<String>,
    /// Highest CUDA version the driver supports, `major.minor`.
    pub max_cuda: String,
    pub device_ids_source: String,
    /// PCI device ids (vendor 0x10de) the driver's own supported-GPU list names for
    /// this module kind.
    pub device_ids: Vec<u16>,
    #[serde(rename = "package")]
    pub packages: Vec<Package>,
}

impl DriverFlavour {
    pub fn packages_with(&self, role: Role) -> impl Iterator<Item = &Package> {
        self.packages.iter().filter(move |p| p.role == Some(role))
    }

    /// The kernel module source package (the table has exactly one).
    pub fn module_source(&self) -> Option<&Package> {
        self.packages_with(Role::ModuleSource).next()
    }

    /// Whether the driver lists this device id (vendor 0x10de).
    pub fn supports(&self, device: u16) -> bool {
        self.device_ids.binary_search(&device).is_ok()
    }

    /// `max_cuda` as the integer `cuDriverGetVersion` returns (12.4 → 12040).
    pub fn max_cuda_int(&self) -> Option<i32> {
        parse_cuda(&self.max_cuda)
    }
}

/// `12.4` → 12040.
pub fn parse_cuda(s: &str) -> Option<i32> {
    let (maj, min) = s.split_once('.')?;
    let (maj, min): (i32, i32) = (maj.parse().ok()?, min.parse().ok()?);
    if maj < 0 || !(0..100).contains(&min) {
        return None;
    }
    maj.checked_mul(1000)?.checked_add(min * 10)
}

/// 12040 → `12.4`.
pub fn format_cuda(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// The whole table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    pub schema: u32,
    #[serde(rename = "flavour")]
    pub flavours: Vec<DriverFlavour>,
    #[serde(rename = "patch", default)]
    pub patches: Vec<Patch>,
    /// The C library and friends the tools need in the guest.
    #[serde(default)]
    pub runtime: Vec<Package>,
}

/// Packages whose version is not the driver's: separately released tools.
const OWN_VERSION_TOOLS: &[&str] = &["nvidia-persistenced"];

impl Table {
    pub fn parse(text: &str) -> Result<Self, TableError> {
        let mut t: Table = toml::from_str(text).map_err(TableError::Parse)?;
        if t.schema != TABLE_SCHEMA {
            return Err(TableError::Schema(t.schema));
        }
        for f in &mut t.flavours {
            f.device_ids.sort_unstable();
        }
        t.validate()?;
        Ok(t)
    }

    /// The table shipped in the binary.
    pub fn embedded() -> Result<Self, TableError> {
        Self::parse(EMBEDDED_TABLE)
    }

    pub fn find(&self, name: &str) -> Result<&DriverFlavour, TableError> {
        self.flavours
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| TableError::Unknown {
                name: name.to_owned(),
                known: self
                    .flavours
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub fn patch(&self, name: &str) -> Option<&Patch> {
        self.patches.iter().find(|p| p.name == name)
    }

    fn validate(&self) -> Result<(), TableError> {
        let mut names = BTreeSet::new();
        for f in &self.flavours {
            let bad = |what: String| TableError::Invalid {
                flavour: f.name.clone(),
                what,
            };
            if !names.insert(f.name.as_str()) {
                return Err(bad("the name appears twice".into()));
            }
            if !f.name.starts_with("nvidia-")
                || !f
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(bad(
                    "the name must be `nvidia-` and letters, digits, `-`".into()
                ));
            }
            validate_flavour(self, f).map_err(bad)?;
        }
        for p in &self.runtime {
            validate_package(p).map_err(|what| TableError::Invalid {
                flavour: "runtime".into(),
                what,
            })?;
        }
        Ok(())
    }
}

fn validate_flavour(t: &Table, f: &DriverFlavour) -> Result<(), String> {
    if !f.debian_version.starts_with(&format!("{}-", f.version)) {
        return Err(format!(
            "debian_version {} is not of upstream version {}",
            f.debian_version, f.version
        ));
    }
    if !f.version.starts_with(&format!("{}.", f.branch)) {
        return Err(format!(
            "version {} is not of branch {}",
            f.version, f.branch
        ));
    }
    if f.max_cuda_int().is_none() {
        return Err(format!("max_cuda `{}` is not MAJOR.MINOR", f.max_cuda));
    }
    if f.architectures.is_empty() {
        return Err("architectures is empty".into());
    }
    if f.device_ids.is_empty() {
        return Err("device_ids is empty".into());
    }
    let sources = f.packages_with(Role::ModuleSource).count();
    if sources != 1 {
        return Err(format!(
            "{sources} packages have role module-source (expected exactly one)"
        ));
    }
    for role in [Role::Firmware, Role::Library, Role::Tool] {
        if f.packages_with(role).next().is_none() {
            return Err(format!("no package has role {role:?}"));
        }
    }
    for p in &f.packages {
        validate_package(p)?;
        if p.role.is_none() {
            return Err(format!("package {} has no role", p.name));
        }
        let own = OWN_VERSION_TOOLS.contains(&p.name.as_str());
        if !own && p.version != f.debian_version {
            return Err(format!(
                "package {} is version {}, not the driver's {}: the userspace must be \
                 exactly the kernel module's version (the RM API check fails otherwise)",
                p.name, p.version, f.debian_version
            ));
        }
    }
    for name in &f.patches {
        if t.patch(name).is_none() {
            return Err(format!(
                "patch `{name}` is not in the table's [[patch]] list"
            ));
        }
    }
    Ok(())
}

fn validate_package(p: &Package) -> Result<(), String> {
    if p.sha256.len() != 64 || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("package {}: sha256 is not 64 hex digits", p.name));
    }
    let safe = |s: &str| {
        !s.is_empty()
            && !s.contains("..")
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-._~%:".contains(&b))
    };
    if !safe(&p.name) || !safe(&p.version) || !safe(&p.file) || !p.file.ends_with(".deb") {
        return Err(format!(
            "package {}: name, version or file has characters outside [A-Za-z0-9+-._~%:]",
            p.name
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn embedded_table_is_valid_and_has_both_flavours() {
        let t = Table::embedded().unwrap();
        let f550 = t.find("nvidia-550").unwrap();
        assert_eq!(f550.version, "550.163.01");
        assert_eq!(f550.module_kind, ModuleKind::Open);
        assert_eq!(f550.max_cuda_int(), Some(12040));
        assert!(f550.supports(0x2335), "H200 is in 550's list");
        let f535 = t.find("nvidia-535").unwrap();
        assert_eq!(f535.version, "535.261.03");
        assert!(!f535.supports(0x2335), "535 does not list the H200");
        assert!(f535.supports(0x2330), "535 lists the H100 SXM");
        for f in &t.flavours {
            for p in &f.patches {
                assert!(t.patch(p).is_some());
            }
            assert!(f.module_source().is_some());
            assert!(f.packages_with(Role::Firmware).count() == 1);
        }
        assert!(t.runtime.iter().any(|p| p.name == "libc6"));
        let err = t.find("nvidia-999").unwrap_err().to_string();
        assert!(
            err.contains("nvidia-550") && err.contains("nvidia-999"),
            "{err}"
        );
    }

    #[test]
    fn userspace_must_match_the_module_version() {
        let text = EMBEDDED_TABLE.replacen(
            "name = \"libcuda1\"\nversion = \"550.163.01-2\"",
            "name = \"libcuda1\"\nversion = \"550.163.01-4~bpo13+1\"",
            1,
        );
        assert_ne!(text, EMBEDDED_TABLE);
        let err = Table::parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("libcuda1") && err.contains("550.163.01-4~bpo13+1"),
            "{err}"
        );
        // A separately versioned tool may differ.
        let t = Table::embedded().unwrap();
        let p = t
            .find("nvidia-550")
            .unwrap()
            .packages
            .iter()
            .find(|p| p.name == "nvidia-persistenced")
            .unwrap();
        assert_ne!(p.version, "550.163.01-2");
    }

    #[test]
    fn hostile_and_broken_rows_are_refused() {
        let cases = [
            ("schema = 1", "schema = 2", "schema 2"),
            ("max_cuda = \"12.4\"", "max_cuda = \"twelve\"", "max_cuda"),
            ("name = \"nvidia-550\"", "name = \"../x\"", "name must be"),
            (
                "patches = [\"pci-resize-resource-exclude-bars\"]\narchitectures = [\"Turing\", \"Ampere\", \"Ada\", \"Hopper\"]\nmax_cuda = \"12.4\"",
                "patches = [\"nope\"]\narchitectures = [\"Turing\"]\nmax_cuda = \"12.4\"",
                "patch `nope`",
            ),
            ("role = \"module-source\"", "role = \"library\"", "module-source"),
            ("version = \"550.163.01\"", "version = \"551.1.1\"", "debian_version"),
        ];
        for (from, to, want) in cases {
            let text = EMBEDDED_TABLE.replacen(from, to, 1);
            assert_ne!(text, EMBEDDED_TABLE, "{from}");
            let err = Table::parse(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{to}: {err}");
        }
        let first_sha = EMBEDDED_TABLE.find("sha256 = \"").unwrap() + 10;
        let mut text = EMBEDDED_TABLE.to_owned();
        text.replace_range(first_sha..first_sha + 2, "zz");
        let err = Table::parse(&text).unwrap_err().to_string();
        assert!(err.contains("sha256"), "{err}");
        let err = Table::parse("schema = 1\nflavour = []\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not parse"), "{err}");
    }

    #[test]
    fn cuda_versions_convert_both_ways() {
        assert_eq!(parse_cuda("12.4"), Some(12040));
        assert_eq!(parse_cuda("11.8"), Some(11080));
        assert_eq!(parse_cuda("12"), None);
        assert_eq!(parse_cuda("12.x"), None);
        // Found by the `driver_table` fuzz target: the major version overflowed
        // (a panic in debug builds, a wrong number in release builds).
        assert_eq!(parse_cuda("-2555555.55"), None);
        assert_eq!(parse_cuda("2147484.0"), None);
        assert_eq!(parse_cuda("-1.0"), None);
        assert_eq!(parse_cuda("2147483.64"), Some(2_147_483_640));
        assert_eq!(format_cuda(12040), "12.4");
        assert_eq!(format_cuda(12020), "12.2");
    }
}

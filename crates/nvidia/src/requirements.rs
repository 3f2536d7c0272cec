//! `NVIDIA_REQUIRE_*`: what an image says it needs from the driver and the GPU, evaluated
//! as the NVIDIA Container Toolkit evaluates it (libnvidia-container `src/cli/dsl.c`, fed by
//! nvidia-container-toolkit `internal/config/image/cuda_image.go`).
//!
//! Grammar: each variable holds one expression; alternatives are separated by spaces (OR),
//! the conditions of an alternative by commas (AND); the variables are ANDed together. A
//! condition is `property op value` with no blanks: properties `cuda`, `driver`, `arch`,
//! `brand` (case-insensitive), operators `=`, `!=`, `<`, `<=`, `>`, `>=`. `cuda`, `driver`
//! and `arch` compare as versions, field by field, numerically, missing fields being 0;
//! `brand` compares case-insensitively and only with `=` and `!=`. With no GPU visible,
//! `arch` and `brand` conditions hold. The requirements are checked once per visible GPU.
//!
//! One deliberate difference: libnvidia-container parses lazily, so a malformed condition
//! after a satisfied alternative goes unnoticed; here the whole expression is parsed first
//! and any malformed condition is an error naming the variable and the token.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use crate::env::ImageEnv;

/// Prefix of the requirement variables.
pub const REQUIRE_PREFIX: &str = "NVIDIA_REQUIRE_";
/// Requirement variables with this prefix are Jetson-only and ignored (as the toolkit does).
pub const JETPACK_PREFIX: &str = "NVIDIA_REQUIRE_JETPACK";
/// Set to a true value (Go `strconv.ParseBool`), disables every requirement check.
pub const DISABLE_REQUIRE: &str = "NVIDIA_DISABLE_REQUIRE";
/// The CUDA version of an image; alone (without `NVIDIA_REQUIRE_CUDA`) it marks a legacy image.
pub const CUDA_VERSION: &str = "CUDA_VERSION";
/// The toolkit's main requirement variable.
pub const REQUIRE_CUDA: &str = "NVIDIA_REQUIRE_CUDA";
/// Longest requirement expression accepted (real images stay under 4 KiB).
const MAX_EXPRESSION: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequirementError {
    #[error(
        "{variable} of the image: invalid condition `{token}`: {why} (a condition is \
         PROPERTY OP VALUE with property cuda, driver, arch or brand and operator =, !=, <, <=, \
         > or >=; a space separates alternatives, a comma the conditions of one); fix the \
         image's environment or set NVIDIA_DISABLE_REQUIRE=true"
    )]
    Invalid {
        variable: String,
        token: String,
        why: &'static str,
    },
    #[error(
        "{variable} of the image is {len} bytes, over the limit of {MAX_EXPRESSION}: fix the \
         image's environment"
    )]
    TooLong { variable: String, len: usize },
    #[error(
        "CUDA_VERSION `{value}` of the image is not a version (expected MAJOR[.MINOR[.PATCH]], \
         e.g. 12.4.1): fix it, or set NVIDIA_REQUIRE_CUDA"
    )]
    LegacyVersion { value: String },
    #[error("the {what} version `{value}` is not a dotted number such as 535.261.03")]
    FactVersion { what: &'static str, value: String },
}

/// A dotted numeric version ("12.4", "535.261.03", "9.0"), compared field by field with
/// missing fields taken as 0 (so 12 = 12.0). Leading zeros are kept for display only.
#[derive(Debug, Clone)]
pub struct Version {
    text: String,
    fields: Vec<u64>,
}

impl Version {
    /// Parses as libnvidia-container does: digits and dots only, starting with a digit;
    /// repeated or trailing dots are tolerated.
    pub fn parse(s: &str) -> Option<Version> {
        if !s.starts_with(|c: char| c.is_ascii_digit())
            || !s.chars().all(|c| c.is_ascii_digit() || c == '.')
        {
            return None;
        }
        let fields = s
            .split('.')
            .filter(|f| !f.is_empty())
            .map(|f| f.parse::<u64>().ok())
            .collect::<Option<Vec<_>>>()?;
        Some(Version {
            text: s.to_owned(),
            fields,
        })
    }

    /// The numeric fields.
    pub fn fields(&self) -> &[u64] {
        &self.fields
    }

    /// The first field (the driver branch, the CUDA major).
    pub fn major(&self) -> u64 {
        self.fields.first().copied().unwrap_or(0)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let n = self.fields.len().max(other.fields.len());
        (0..n)
            .map(|i| {
                let a = self.fields.get(i).copied().unwrap_or(0);
                let b = other.fields.get(i).copied().unwrap_or(0);
                a.cmp(&b)
            })
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Version {}

/// What the driver offers: its NVRM version and the CUDA version `cuDriverGetVersion`
/// reports for it (formatted "12.4").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverFacts {
    pub driver_version: Version,
    pub cuda_version: Version,
}

impl DriverFacts {
    /// From strings such as `("550.163.01", "12.4")`.
    pub fn new(driver_version: &str, cuda_version: &str) -> Result<Self, RequirementError> {
        let parse = |what, value: &str| {
            Version::parse(value).ok_or_else(|| RequirementError::FactVersion {
                what,
                value: value.chars().take(64).collect(),
            })
        };
        Ok(DriverFacts {
            driver_version: parse("driver", driver_version)?,
            cuda_version: parse("CUDA", cuda_version)?,
        })
    }
}

/// One visible GPU as the requirements see it: its compute capability (`arch`, e.g. 9.0 for
/// Hopper) and its NVML brand (`Tesla`, `NVIDIA`, `GeForce`, `Quadro`, `NvidiaRTX`, …;
/// compared case-insensitively; empty when unknown, which satisfies every brand condition
/// as a missing brand does in the toolkit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuFacts {
    pub arch: Version,
    pub brand: String,
}

impl GpuFacts {
    /// From strings such as `("9.0", "NVIDIA")`; `None` when `arch` is not a version.
    pub fn new(arch: &str, brand: &str) -> Option<Self> {
        Some(GpuFacts {
            arch: Version::parse(arch)?,
            brand: brand.to_owned(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Property {
    Cuda,
    Driver,
    Arch,
    Brand,
}

impl Property {
    fn parse(s: &str) -> Option<Self> {
        [
            ("cuda", Property::Cuda),
            ("driver", Property::Driver),
            ("arch", Property::Arch),
            ("brand", Property::Brand),
        ]
        .into_iter()
        .find(|(name, _)| s.eq_ignore_ascii_case(name))
        .map(|(_, p)| p)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    const ALL: [(&'static str, Op); 6] = [
        ("=", Op::Eq),
        ("!=", Op::Ne),
        ("<", Op::Lt),
        ("<=", Op::Le),
        (">", Op::Gt),
        (">=", Op::Ge),
    ];

    pub fn as_str(self) -> &'static str {
        Op::ALL
            .iter()
            .find(|(_, o)| *o == self)
            .map_or("?", |(s, _)| s)
    }

    fn holds(self, o: Ordering) -> bool {
        match self {
            Op::Eq => o.is_eq(),
            Op::Ne => o.is_ne(),
            Op::Lt => o.is_lt(),
            Op::Le => o.is_le(),
            Op::Gt => o.is_gt(),
            Op::Ge => o.is_ge(),
        }
    }
}

/// The value side of a condition, checked when parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Version(Version),
    Brand(String),
}

/// One `property op value` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub property: Property,
    pub op: Op,
    value: Value,
    text: String,
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Condition {
    fn parse(variable: &str, token: &str) -> Result<Self, RequirementError> {
        const OP_CHARS: &[char] = &['<', '>', '=', '!'];
        let invalid = |why| RequirementError::Invalid {
            variable: variable.to_owned(),
            token: token.chars().take(128).collect(),
            why,
        };
        let name_end = token.find(OP_CHARS).ok_or_else(|| invalid("no operator"))?;
        if name_end == 0 {
            return Err(invalid("no property before the operator"));
        }
        let rest = &token[name_end..];
        let op_len = rest.find(|c| !OP_CHARS.contains(&c)).unwrap_or(rest.len());
        let op = Op::ALL
            .iter()
            .find(|(s, _)| *s == &rest[..op_len])
            .map(|(_, o)| *o)
            .ok_or_else(|| invalid("unknown operator"))?;
        let value = &rest[op_len..];
        if value.is_empty() {
            return Err(invalid("no value after the operator"));
        }
        let property = Property::parse(&token[..name_end])
            .ok_or_else(|| invalid("unknown property (cuda, driver, arch or brand)"))?;
        let value = match property {
            Property::Brand if matches!(op, Op::Eq | Op::Ne) => Value::Brand(value.to_owned()),
            Property::Brand => return Err(invalid("a brand compares only with = or !=")),
            _ => Value::Version(
                Version::parse(value).ok_or_else(|| invalid("the value is not a version"))?,
            ),
        };
        Ok(Condition {
            property,
            op,
            value,
            text: token.to_owned(),
        })
    }

    fn holds(&self, driver: &DriverFacts, gpu: Option<&GpuFacts>) -> bool {
        match (&self.value, self.property) {
            (Value::Version(v), Property::Cuda) => self.op.holds(driver.cuda_version.cmp(v)),
            (Value::Version(v), Property::Driver) => self.op.holds(driver.driver_version.cmp(v)),
            (Value::Version(v), Property::Arch) => gpu.is_none_or(|g| self.op.holds(g.arch.cmp(v))),
            (Value::Brand(b), Property::Brand) => gpu.is_none_or(|g| {
                g.brand.is_empty() || (self.op == Op::Eq) == g.brand.eq_ignore_ascii_case(b)
            }),
            // Parsing pairs brand with a brand value and the others with versions.
            _ => false,
        }
    }
}

/// One variable's expression: alternatives (OR) of conditions (AND).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// Where it came from: the variable name (`CUDA_VERSION` for a legacy image).
    pub variable: String,
    /// The expression as written.
    pub expression: String,
    pub alternatives: Vec<Vec<Condition>>,
}

impl Requirement {
    /// Parses one variable's expression. An empty expression is always satisfied.
    pub fn parse(variable: &str, expression: &str) -> Result<Self, RequirementError> {
        if expression.len() > MAX_EXPRESSION {
            return Err(RequirementError::TooLong {
                variable: variable.to_owned(),
                len: expression.len(),
            });
        }
        let alternatives = expression
            .split(' ')
            .filter(|a| !a.is_empty())
            .map(|alt| {
                alt.split(',')
                    .filter(|c| !c.is_empty())
                    .map(|c| Condition::parse(variable, c))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Requirement {
            variable: variable.to_owned(),
            expression: expression.to_owned(),
            alternatives,
        })
    }

    /// Whether some alternative has all its conditions true.
    pub fn holds(&self, driver: &DriverFacts, gpu: Option<&GpuFacts>) -> bool {
        self.alternatives.is_empty()
            || self
                .alternatives
                .iter()
                .any(|alt| alt.iter().all(|c| c.holds(driver, gpu)))
    }

    /// For each alternative, its first condition that does not hold.
    fn failed_conditions(&self, driver: &DriverFacts, gpu: Option<&GpuFacts>) -> Vec<String> {
        self.alternatives
            .iter()
            .filter_map(|alt| alt.iter().find(|c| !c.holds(driver, gpu)))
            .map(|c| c.text.clone())
            .collect()
    }
}

/// A requirement that the driver (or a visible GPU) does not meet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Unsatisfied {
    /// The variable whose expression failed (`CUDA_VERSION` for a legacy image).
    pub variable: String,
    /// Its whole expression.
    pub expression: String,
    /// The clause the toolkit reports: the expression's first alternative.
    pub clause: String,
    /// For each alternative, its first false condition (`cuda>=12.8`, `brand=tesla`, …).
    pub failed_conditions: Vec<String>,
    /// Index (into the `gpus` passed to [`Requirements::check`]) of the GPU it failed for;
    /// `None` when no GPU was visible.
    pub gpu: Option<usize>,
    /// The toolkit's text: `unsatisfied condition: cuda>=12.4, please update your driver to
    /// a newer version, or use an earlier cuda container`.
    pub message: String,
}

/// Every requirement of an image, ready to check.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Requirements {
    /// `NVIDIA_DISABLE_REQUIRE` was true: nothing is checked.
    pub disabled: bool,
    /// A legacy image: `CUDA_VERSION` without `NVIDIA_REQUIRE_CUDA`; its requirement is
    /// `cuda>=MAJOR.MINOR`, named after `CUDA_VERSION`.
    pub legacy: bool,
    /// Sorted by variable name.
    pub items: Vec<Requirement>,
}

impl Requirements {
    /// Collects an image's requirements from its environment (`KEY=VALUE` entries; a later
    /// entry overrides an earlier one).
    pub fn from_env<S: AsRef<str>>(env: &[S]) -> Result<Self, RequirementError> {
        Self::from_image_env(&ImageEnv::parse(env))
    }

    /// As [`Requirements::from_env`], from a parsed environment.
    pub fn from_image_env(env: &ImageEnv) -> Result<Self, RequirementError> {
        let disabled = env.get(DISABLE_REQUIRE).is_some_and(parse_go_bool);
        let legacy = env.is_legacy();
        if disabled {
            return Ok(Requirements {
                disabled,
                legacy,
                items: Vec::new(),
            });
        }
        let mut by_name: BTreeMap<&str, &str> = env
            .vars()
            .filter(|(k, _)| k.starts_with(REQUIRE_PREFIX) && !k.starts_with(JETPACK_PREFIX))
            .collect();
        let synthesised;
        if legacy {
            let value = env.get(CUDA_VERSION).unwrap_or_default();
            let mm = legacy_major_minor(value).ok_or_else(|| RequirementError::LegacyVersion {
                value: value.chars().take(64).collect(),
            })?;
            synthesised = format!("cuda>={mm}");
            by_name.insert(CUDA_VERSION, &synthesised);
        }
        let items = by_name
            .into_iter()
            .map(|(k, v)| Requirement::parse(k, v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Requirements {
            disabled,
            legacy,
            items,
        })
    }

    /// Checks every requirement for every GPU in `gpus` (the visible ones), or once with
    /// no GPU when `gpus` is empty; the first failure is returned.
    pub fn check(&self, driver: &DriverFacts, gpus: &[GpuFacts]) -> Result<(), Box<Unsatisfied>> {
        if self.disabled {
            return Ok(());
        }
        let contexts: Vec<(Option<usize>, Option<&GpuFacts>)> = if gpus.is_empty() {
            vec![(None, None)]
        } else {
            gpus.iter()
                .enumerate()
                .map(|(i, g)| (Some(i), Some(g)))
                .collect()
        };
        for (index, gpu) in contexts {
            for req in &self.items {
                if !req.holds(driver, gpu) {
                    return Err(Box::new(unsatisfied(req, driver, gpu, index)));
                }
            }
        }
        Ok(())
    }

    /// The CUDA versions the requirements ask for with `cuda>=` or `cuda>` in some
    /// alternative, highest first: what a refusal should quote.
    pub fn cuda_minimums(&self) -> Vec<Version> {
        let mut out: Vec<Version> = self
            .items
            .iter()
            .flat_map(|r| r.alternatives.iter().flatten())
            .filter(|c| c.property == Property::Cuda && matches!(c.op, Op::Ge | Op::Gt))
            .filter_map(|c| match &c.value {
                Value::Version(v) => Some(v.clone()),
                Value::Brand(_) => None,
            })
            .collect();
        out.sort_by(|a, b| b.cmp(a));
        out.dedup();
        out
    }
}

fn unsatisfied(
    req: &Requirement,
    driver: &DriverFacts,
    gpu: Option<&GpuFacts>,
    index: Option<usize>,
) -> Unsatisfied {
    let clause = req
        .expression
        .split(' ')
        .find(|a| !a.is_empty())
        .unwrap_or_default()
        .to_owned();
    let message = if clause.starts_with("cuda>=") {
        format!(
            "unsatisfied condition: {clause}, please update your driver to a newer version, \
             or use an earlier cuda container"
        )
    } else {
        format!("unsatisfied condition: {clause}")
    };
    Unsatisfied {
        variable: req.variable.clone(),
        expression: req.expression.clone(),
        failed_conditions: req.failed_conditions(driver, gpu),
        clause,
        gpu: index,
        message,
    }
}

/// Go's `strconv.ParseBool`, with a parse error read as false (as the toolkit does).
pub fn parse_go_bool(s: &str) -> bool {
    matches!(s, "1" | "t" | "T" | "TRUE" | "true" | "True")
}

/// `MAJOR.MINOR` of a legacy `CUDA_VERSION`, as the toolkit reads it with Go's semver
/// (`v` + the value must be valid semver, shorthand `12` and `12.4` allowed).
pub fn legacy_major_minor(value: &str) -> Option<String> {
    let v = value.strip_prefix('v').unwrap_or(value);
    let (core, suffix) = match v.find(['-', '+']) {
        Some(i) => (&v[..i], &v[i..]),
        None => (v, ""),
    };
    let parts: Vec<&str> = core.split('.').collect();
    let numeric = |p: &str| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && (p == "0" || !p.starts_with('0'))
            && p.parse::<u32>().is_ok()
    };
    if parts.is_empty() || parts.len() > 3 || !parts.iter().all(|p| numeric(p)) {
        return None;
    }
    // Pre-release and build suffixes are valid only after a full MAJOR.MINOR.PATCH.
    if !suffix.is_empty() && (parts.len() != 3 || !valid_semver_suffix(suffix)) {
        return None;
    }
    Some(format!("{}.{}", parts[0], parts.get(1).unwrap_or(&"0")))
}

fn valid_semver_suffix(s: &str) -> bool {
    let (pre, build) = match s.find('+') {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let idents_ok = |x: &str| {
        x.split('.')
            .all(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    };
    let pre_ok = pre.is_empty() || pre.strip_prefix('-').is_some_and(idents_ok);
    pre_ok && build.is_none_or(idents_ok)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

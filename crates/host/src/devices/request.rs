//! What a sandbox asks for: `--gpus all|N|BDF[,BDF...]` and `--device BDF` (repeatable).

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::bdf::{Bdf, BdfError};

/// Largest `--gpus N` accepted (no host has more GPUs than this).
pub const MAX_GPU_COUNT: usize = 256;
/// Largest number of functions one request may name.
pub const MAX_NAMED: usize = 256;

/// Why a `--gpus` or `--device` value is not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("--gpus is empty: give `all`, a count such as 2, or PCI addresses such as 0000:01:00.0,0000:02:00.0")]
    Empty,
    #[error("--gpus 0 asks for no GPU: leave --gpus out instead")]
    Zero,
    #[error("--gpus {count} is more than {MAX_GPU_COUNT} GPUs")]
    TooMany { count: String },
    #[error("more than {MAX_NAMED} PCI functions named")]
    TooManyNamed,
    #[error(
        "--gpus `{input}`: give `all`, a count such as 2, or PCI addresses separated by commas"
    )]
    Gpus {
        input: String,
        #[source]
        source: BdfError,
    },
    #[error("--device `{input}`: give one PCI address such as 0000:03:00.0")]
    Device {
        input: String,
        #[source]
        source: BdfError,
    },
}

/// The `--gpus` selection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "kebab-case")]
pub enum GpuSelection {
    /// Every NVIDIA GPU of the host; refused unless each of them can be handed out.
    All,
    /// This many NVIDIA GPUs, preferably on one NUMA node.
    Count(usize),
    /// These GPU functions.
    Devices(Vec<Bdf>),
}

impl FromStr for GpuSelection {
    type Err = RequestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(RequestError::Empty);
        }
        if s.eq_ignore_ascii_case("all") {
            return Ok(Self::All);
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            let n: usize = s
                .parse()
                .ok()
                .filter(|n| *n <= MAX_GPU_COUNT)
                .ok_or_else(|| RequestError::TooMany {
                    count: crate::sysfs::printable(s),
                })?;
            if n == 0 {
                return Err(RequestError::Zero);
            }
            return Ok(Self::Count(n));
        }
        let mut list = Vec::new();
        for part in s.split(',') {
            if list.len() == MAX_NAMED {
                return Err(RequestError::TooManyNamed);
            }
            let bdf = part.trim().parse().map_err(|source| RequestError::Gpus {
                input: crate::sysfs::printable(s),
                source,
            })?;
            if !list.contains(&bdf) {
                list.push(bdf);
            }
        }
        Ok(Self::Devices(list))
    }
}

impl fmt::Display for GpuSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("all GPUs"),
            Self::Count(1) => f.write_str("1 GPU"),
            Self::Count(n) => write!(f, "{n} GPUs"),
            Self::Devices(list) => write!(
                f,
                "GPU {}",
                list.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

/// Everything one sandbox asks for. Empty when it wants no device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceRequest {
    /// From `--gpus`.
    pub gpus: Option<GpuSelection>,
    /// From `--device`: any PCI function (NVSwitch, NIC, ...), passed as named.
    pub devices: Vec<Bdf>,
}

impl DeviceRequest {
    /// Parses the raw `--gpus` value (if given) and each `--device` value.
    pub fn parse<S: AsRef<str>>(gpus: Option<&str>, devices: &[S]) -> Result<Self, RequestError> {
        let gpus = gpus.map(str::parse).transpose()?;
        if devices.len() > MAX_NAMED {
            return Err(RequestError::TooManyNamed);
        }
        let mut list = Vec::new();
        for d in devices {
            let d = d.as_ref();
            let bdf = d.trim().parse().map_err(|source| RequestError::Device {
                input: crate::sysfs::printable(d),
                source,
            })?;
            if !list.contains(&bdf) {
                list.push(bdf);
            }
        }
        Ok(Self {
            gpus,
            devices: list,
        })
    }

    /// True when no device is asked for.
    pub fn is_empty(&self) -> bool {
        self.gpus.is_none() && self.devices.is_empty()
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(g) = &self.gpus {
            parts.push(g.to_string());
        }
        if !self.devices.is_empty() {
            parts.push(format!(
                "device {}",
                self.devices
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
        if parts.is_empty() {
            f.write_str("no device")
        } else {
            f.write_str(&parts.join(" and "))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    #[test]
    fn gpus_values() {
        assert_eq!("all".parse::<GpuSelection>().unwrap(), GpuSelection::All);
        assert_eq!("ALL".parse::<GpuSelection>().unwrap(), GpuSelection::All);
        assert_eq!("2".parse::<GpuSelection>().unwrap(), GpuSelection::Count(2));
        assert_eq!(
            "0000:01:00.0, 02:00.0,0000:01:00.0"
                .parse::<GpuSelection>()
                .unwrap(),
            GpuSelection::Devices(vec![bdf("0000:01:00.0"), bdf("0000:02:00.0")])
        );
        assert_eq!("0".parse::<GpuSelection>(), Err(RequestError::Zero));
        assert_eq!("".parse::<GpuSelection>(), Err(RequestError::Empty));
        assert!(matches!(
            "257".parse::<GpuSelection>(),
            Err(RequestError::TooMany { .. })
        ));
        assert!(matches!(
            "99999999999999999999999".parse::<GpuSelection>(),
            Err(RequestError::TooMany { .. })
        ));
        for bad in ["-1", "two", "0000:01:00.0,", "0000:01:00.0;rm", "1.5"] {
            let err = bad.parse::<GpuSelection>().unwrap_err();
            assert!(matches!(err, RequestError::Gpus { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn requests() {
        let r = DeviceRequest::parse(Some("1"), &["0000:03:00.0", "0000:03:00.0"]).unwrap();
        assert_eq!(r.gpus, Some(GpuSelection::Count(1)));
        assert_eq!(r.devices, vec![bdf("0000:03:00.0")]);
        assert_eq!(r.to_string(), "1 GPU and device 0000:03:00.0");
        let none = DeviceRequest::parse::<&str>(None, &[]).unwrap();
        assert!(none.is_empty());
        let err = DeviceRequest::parse(None, &["nvswitch"]).unwrap_err();
        assert!(err.to_string().contains("--device `nvswitch`"), "{err}");
    }
}

//! PCI addresses: `domain:bus:device.function`, e.g. `0000:01:00.0`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A PCI function address (segment/domain, bus, device, function).
///
/// Parsed from the kernel's form `dddd:bb:dd.f` (hex, case-insensitive; the short form
/// `bb:dd.f` means domain 0) and always printed in the kernel's lower-case long form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    domain: u32,
    bus: u8,
    device: u8,
    function: u8,
}

/// Why a string is not a PCI address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BdfError {
    #[error(
        "`{input}` is not a PCI address: expected domain:bus:device.function such as 0000:01:00.0"
    )]
    Format { input: String },
    #[error("`{input}` is not a PCI address: {field} `{value}` is not hexadecimal or too large")]
    Field {
        input: String,
        field: &'static str,
        value: String,
    },
    #[error("`{input}` is not a PCI address: device {device:#x} is above 0x1f")]
    DeviceRange { input: String, device: u8 },
    #[error("`{input}` is not a PCI address: function {function} is above 7")]
    FunctionRange { input: String, function: u8 },
}

impl Bdf {
    /// Builds an address; `None` when `device > 0x1f` or `function > 7`.
    pub fn new(domain: u32, bus: u8, device: u8, function: u8) -> Option<Self> {
        (device <= 0x1f && function <= 7).then_some(Self {
            domain,
            bus,
            device,
            function,
        })
    }

    pub fn domain(&self) -> u32 {
        self.domain
    }
    pub fn bus(&self) -> u8 {
        self.bus
    }
    pub fn device(&self) -> u8 {
        self.device
    }
    pub fn function(&self) -> u8 {
        self.function
    }

    /// True when `other` is another function of the same slot (same domain, bus, device).
    pub fn same_slot(&self, other: &Bdf) -> bool {
        self.domain == other.domain && self.bus == other.bus && self.device == other.device
    }
}

fn hex_field<T>(
    input: &str,
    field: &'static str,
    value: &str,
    max_len: usize,
) -> Result<T, BdfError>
where
    T: TryFrom<u32>,
{
    let bad = || BdfError::Field {
        input: input.to_owned(),
        field,
        value: value.to_owned(),
    };
    if value.is_empty() || value.len() > max_len || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let n = u32::from_str_radix(value, 16).map_err(|_| bad())?;
    T::try_from(n).map_err(|_| bad())
}

impl FromStr for Bdf {
    type Err = BdfError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let format = || BdfError::Format {
            input: s.to_owned(),
        };
        if s.len() > 16 {
            return Err(format());
        }
        let (head, function) = s.rsplit_once('.').ok_or_else(format)?;
        let parts: Vec<&str> = head.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, dev] => (*d, *b, *dev),
            [b, dev] => ("0", *b, *dev),
            _ => return Err(format()),
        };
        let domain: u32 = hex_field(s, "domain", domain, 8)?;
        let bus: u8 = hex_field(s, "bus", bus, 2)?;
        let device: u8 = hex_field(s, "device", device, 2)?;
        let function: u8 = hex_field(s, "function", function, 1)?;
        if device > 0x1f {
            return Err(BdfError::DeviceRange {
                input: s.to_owned(),
                device,
            });
        }
        if function > 7 {
            return Err(BdfError::FunctionRange {
                input: s.to_owned(),
                function,
            });
        }
        Ok(Self {
            domain,
            bus,
            device,
            function,
        })
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl Serialize for Bdf {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Bdf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_the_kernel_form() {
        let b: Bdf = "0000:01:00.0".parse().unwrap();
        assert_eq!(
            (b.domain(), b.bus(), b.device(), b.function()),
            (0, 1, 0, 0)
        );
        assert_eq!(b.to_string(), "0000:01:00.0");
        let b: Bdf = "10000:AF:1f.7".parse().unwrap();
        assert_eq!(b.to_string(), "10000:af:1f.7");
        let b: Bdf = "3b:00.1".parse().unwrap();
        assert_eq!(b.to_string(), "0000:3b:00.1");
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "0000:01:00",
            "0000:01:00.8",
            "0000:01:20.0",
            "0000:100:00.0",
            "0000:01:00.0.0",
            "zzzz:01:00.0",
            "0000:01:00.x",
            "0000:-1:00.0",
            "0000:01:00.+1",
            "1:2:3:4.0",
            "0000:01:00.0\n",
            " 0000:01:00.0",
            "123456789:01:00.0",
            "0000::00.0",
            "0000:01:00.00",
        ] {
            assert!(bad.parse::<Bdf>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn errors_name_the_input_and_field() {
        let err = "0000:01:2g.0".parse::<Bdf>().unwrap_err().to_string();
        assert!(
            err.contains("0000:01:2g.0") && err.contains("device"),
            "{err}"
        );
        let err = "0000:01:00.9".parse::<Bdf>().unwrap_err().to_string();
        assert!(err.contains("function 9"), "{err}");
    }

    #[test]
    fn slots_and_ordering() {
        let a: Bdf = "0000:01:00.0".parse().unwrap();
        let b: Bdf = "0000:01:00.1".parse().unwrap();
        let c: Bdf = "0000:02:00.0".parse().unwrap();
        assert!(a.same_slot(&b) && !a.same_slot(&c));
        assert!(a < b && b < c);
        assert_eq!(Bdf::new(0, 1, 0x20, 0), None);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, "\"0000:01:00.0\"");
        assert_eq!(serde_json::from_str::<Bdf>(&json).unwrap(), a);
        assert!(serde_json::from_str::<Bdf>("\"nope\"").is_err());
    }
}

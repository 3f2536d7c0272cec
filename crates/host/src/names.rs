//! Human names of PCI vendors and devices, from the PCI ID database bundled by the
//! `pci-ids` crate. The numeric id is the fallback.

use pci_ids::FromId;

/// The device's name, e.g. `GH100 [H200 SXM 141GB]`, or `10de:2335` when unknown.
pub fn device_name(vendor: u16, device: u16) -> String {
    match pci_ids::Device::from_vid_pid(vendor, device) {
        Some(d) => d.name().to_owned(),
        None => format!("{vendor:04x}:{device:04x}"),
    }
}

/// The vendor's name, e.g. `NVIDIA Corporation`, or the id in hex when unknown.
pub fn vendor_name(vendor: u16) -> String {
    match pci_ids::Vendor::from_id(vendor) {
        Some(v) => v.name().to_owned(),
        None => format!("{vendor:04x}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_ids() {
        assert_eq!(device_name(0x10de, 0x2684), "AD102 [GeForce RTX 4090]");
        assert_eq!(device_name(0x10de, 0x2335), "GH100 [H200 SXM 141GB]");
        assert_eq!(device_name(0x10de, 0xfffe), "10de:fffe");
        assert_eq!(vendor_name(0x10de), "NVIDIA Corporation");
        assert_eq!(vendor_name(0xfff0), "fff0");
    }
}

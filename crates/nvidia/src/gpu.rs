//! What the requirements need to know about a GPU ([`GpuFacts`]: compute capability and
//! NVML brand), derived from what gpucell's GPU database knows on the host, where there is
//! no driver to ask: the architecture (`data/gpu-architectures.toml`) and the name (the PCI
//! ID database's `GH100 [H200 SXM 141GB]`, or a model such as `GeForce RTX 4090`).

use crate::requirements::{GpuFacts, Version};

/// Compute capability by chip code (the prefix of a PCI ID database name), most specific
/// first.
const CHIPS: [(&str, &str); 12] = [
    ("GM10", "5.0"),
    ("GM20", "5.2"),
    ("GP100", "6.0"),
    ("GP10", "6.1"),
    ("GV100", "7.0"),
    ("TU1", "7.5"),
    ("GA100", "8.0"),
    ("GA10", "8.6"),
    ("AD10", "8.9"),
    ("GH100", "9.0"),
    ("GB10", "10.0"),
    ("GB20", "12.0"),
];

/// The compute capability of a GPU of `architecture` named `name`: from the chip code when
/// the name starts with one, else the architecture's data-centre or consumer value.
pub fn compute_capability(architecture: &str, name: &str) -> Option<&'static str> {
    let upper = name.trim().to_ascii_uppercase();
    if let Some((_, cc)) = CHIPS.iter().find(|(chip, _)| upper.starts_with(chip)) {
        return Some(cc);
    }
    let has = |models: &[&str]| models.iter().any(|m| upper.contains(m));
    Some(match architecture.to_ascii_lowercase().as_str() {
        "maxwell" => "5.2",
        "pascal" if has(&["P100"]) => "6.0",
        "pascal" => "6.1",
        "volta" => "7.0",
        "turing" => "7.5",
        "ampere" if has(&["A100", "A800", "A30"]) => "8.0",
        "ampere" => "8.6",
        "ada" => "8.9",
        "hopper" => "9.0",
        "blackwell" if has(&["B100", "B200", "B300", "GB200", "GB300"]) => "10.0",
        "blackwell" => "12.0",
        _ => return None,
    })
}

/// The NVML brand a driver reports for a GPU named `name` (`GeForce`, `Titan`, `Quadro`,
/// `NvidiaRTX`, `Tesla`, else `NVIDIA`, which current drivers report for data-centre GPUs).
pub fn nvml_brand(name: &str) -> &'static str {
    let upper = name.to_ascii_uppercase();
    if upper.contains("GEFORCE") {
        "GeForce"
    } else if upper.contains("TITAN") {
        "Titan"
    } else if upper.contains("QUADRO") {
        "Quadro"
    } else if upper.contains("RTX") {
        // RTX A6000, RTX 6000 Ada, RTX PRO 6000: the professional "NVIDIA RTX" line.
        "NvidiaRTX"
    } else if upper.contains("TESLA") {
        "Tesla"
    } else {
        "NVIDIA"
    }
}

/// Whether CUDA forward compatibility (`cuda-compat`) works on this brand: data-centre and
/// professional GPUs, not GeForce or Titan.
pub fn forward_compat_capable(brand: &str) -> bool {
    !["geforce", "geforcertx", "titan", "titanrtx"]
        .iter()
        .any(|b| brand.eq_ignore_ascii_case(b))
}

/// [`GpuFacts`] from the GPU database; `None` for an architecture gpucell does not know.
pub fn facts_from_database(architecture: &str, name: &str) -> Option<GpuFacts> {
    Some(GpuFacts {
        arch: Version::parse(compute_capability(architecture, name)?)?,
        brand: nvml_brand(name).to_owned(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn facts_of_the_gpus_gpucell_knows() {
        for (arch, name, cc, brand) in [
            ("Pascal", "GP100GL [Tesla P100 PCIe 16GB]", "6.0", "Tesla"),
            ("Pascal", "GP104 [GeForce GTX 1080]", "6.1", "GeForce"),
            ("Pascal", "Tesla P100", "6.0", "Tesla"),
            ("Volta", "GV100GL [Tesla V100 SXM2 16GB]", "7.0", "Tesla"),
            (
                "Turing",
                "TU102 [GeForce RTX 2080 Ti Rev. A]",
                "7.5",
                "GeForce",
            ),
            ("Turing", "TU104GL [Tesla T4]", "7.5", "Tesla"),
            ("Ampere", "GA100 [A100 SXM4 40GB]", "8.0", "NVIDIA"),
            ("Ampere", "A100 PCIe 80GB", "8.0", "NVIDIA"),
            ("Ampere", "GA102 [GeForce RTX 3090]", "8.6", "GeForce"),
            ("Ampere", "GA102GL [RTX A6000]", "8.6", "NvidiaRTX"),
            ("Ada", "AD102 [GeForce RTX 4090]", "8.9", "GeForce"),
            ("Ada", "L40S", "8.9", "NVIDIA"),
            ("Hopper", "GH100 [H200 SXM 141GB]", "9.0", "NVIDIA"),
            ("Hopper", "H100 PCIe", "9.0", "NVIDIA"),
            ("Blackwell", "B200", "10.0", "NVIDIA"),
            ("Blackwell", "GB100 [B200]", "10.0", "NVIDIA"),
            ("Blackwell", "GB202 [GeForce RTX 5090]", "12.0", "GeForce"),
            ("Blackwell", "GeForce RTX 5090", "12.0", "GeForce"),
            ("Maxwell", "GM204 [GeForce GTX 980]", "5.2", "GeForce"),
        ] {
            let f = facts_from_database(arch, name).unwrap();
            assert_eq!(
                (f.arch.to_string(), f.brand.as_str()),
                (cc.to_string(), brand),
                "{name}"
            );
        }
        assert!(facts_from_database("Kepler", "GK110").is_none());
        assert!(facts_from_database("Fermi", "GF100").is_none());
    }

    #[test]
    fn forward_compat_is_for_data_centre_and_professional_gpus() {
        for b in ["NVIDIA", "Tesla", "Quadro", "NvidiaRTX", "unknown"] {
            assert!(forward_compat_capable(b), "{b}");
        }
        for b in ["GeForce", "geforcertx", "TITAN", "TitanRTX"] {
            assert!(!forward_compat_capable(b), "{b}");
        }
    }
}

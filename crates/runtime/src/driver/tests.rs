//! The choice over flavours × GPUs × images.

use super::*;

fn flavour(name: &str, branch: &str, version: &str, cuda: &str, ids: &[u16]) -> Candidate {
    Candidate {
        name: name.into(),
        branch: branch.into(),
        driver_version: version.into(),
        max_cuda: cuda.into(),
        architectures: ["Turing", "Ampere", "Ada", "Hopper"]
            .map(String::from)
            .to_vec(),
        device_ids: ids.to_vec(),
    }
}

/// The two flavours of the table: 535 lists the H100 but not the H200, 550 both.
fn table() -> Vec<Candidate> {
    vec![
        flavour(
            "nvidia-535",
            "535",
            "535.261.03",
            "12.2",
            &[0x2330, 0x2331, 0x2684, 0x1eb8],
        ),
        flavour(
            "nvidia-550",
            "550",
            "550.163.01",
            "12.4",
            &[0x2330, 0x2331, 0x2335, 0x2684, 0x1eb8],
        ),
    ]
}

fn gpu(id: u16, name: &str, arch: Option<&str>) -> PassedGpu {
    PassedGpu {
        bdf: "0000:01:00.0".into(),
        device_id: id,
        name: name.into(),
        architecture: arch.map(String::from),
    }
}

fn h200() -> PassedGpu {
    gpu(0x2335, "H200 SXM 141GB", Some("Hopper"))
}
fn h100() -> PassedGpu {
    gpu(0x2330, "H100 SXM5 80GB", Some("Hopper"))
}
fn rtx4090() -> PassedGpu {
    gpu(0x2684, "GeForce RTX 4090", Some("Ada"))
}
fn rtx5090() -> PassedGpu {
    gpu(0x2b85, "GeForce RTX 5090", Some("Blackwell"))
}
fn p100() -> PassedGpu {
    gpu(0x15f8, "Tesla P100-PCIE-16GB", Some("Pascal"))
}

fn env(vars: &[&str]) -> Vec<String> {
    vars.iter().map(|v| v.to_string()).collect()
}

fn pick(
    flag: Option<&str>,
    label: Option<&str>,
    vars: &[&str],
    gpus: &[PassedGpu],
) -> Result<Option<Choice>, ChoiceError> {
    let e = env(vars);
    choose(
        &Ask {
            flag,
            label,
            env: &e,
            gpus,
        },
        &table(),
    )
}

fn chosen(r: Result<Option<Choice>, ChoiceError>) -> String {
    r.unwrap().unwrap().flavour
}

fn refused(r: Result<Option<Choice>, ChoiceError>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn the_newest_flavour_that_meets_the_image_and_drives_the_gpu() {
    let cuda124 = "NVIDIA_REQUIRE_CUDA=cuda>=12.4";
    let cuda122 = "NVIDIA_REQUIRE_CUDA=cuda>=12.2";
    assert_eq!(
        chosen(pick(None, None, &[cuda124], &[h200()])),
        "nvidia-550"
    );
    // Both meet a 12.2 image on an H100: the newest wins.
    assert_eq!(
        chosen(pick(None, None, &[cuda122], &[h100()])),
        "nvidia-550"
    );
    // No requirement at all: the newest that drives the GPU.
    assert_eq!(chosen(pick(None, None, &[], &[rtx4090()])), "nvidia-550");
    let c = pick(None, None, &[cuda124], &[h200()]).unwrap().unwrap();
    assert_eq!(
        c.reason,
        Reason::Requirements {
            requirements: vec!["NVIDIA_REQUIRE_CUDA=cuda>=12.4".into()]
        }
    );
}

#[test]
fn a_flag_or_a_label_names_the_flavour_and_is_still_checked() {
    let r = pick(None, Some("535"), &[], &[h100()]).unwrap().unwrap();
    assert_eq!(r.flavour, "nvidia-535");
    assert_eq!(
        r.reason,
        Reason::Label {
            value: "535".into()
        }
    );
    // The flag wins over the label.
    assert_eq!(
        chosen(pick(Some("nvidia-550"), Some("535"), &[], &[h100()])),
        "nvidia-550"
    );
    // 535 does not list the H200.
    let msg = refused(pick(Some("535"), None, &[], &[h200()]));
    assert!(
        msg.contains("H200") && msg.contains("nvidia-535") && msg.contains("supported-GPU list"),
        "{msg}"
    );
    // 535's CUDA 12.2 does not meet a 12.4 image.
    let msg = refused(pick(
        Some("535"),
        None,
        &["NVIDIA_REQUIRE_CUDA=cuda>=12.4"],
        &[h100()],
    ));
    assert!(
        msg.contains("cuda>=12.4") && msg.contains("nvidia-535"),
        "{msg}"
    );
    let msg = refused(pick(Some("nvidia-999"), None, &[], &[]));
    assert!(
        msg.contains("nvidia-999") && msg.contains("nvidia-550 (driver 550.163.01, CUDA 12.4)"),
        "{msg}"
    );
}

#[test]
fn refusals_say_what_the_image_needs_and_what_exists() {
    let msg = refused(pick(
        None,
        None,
        &["NVIDIA_REQUIRE_CUDA=cuda>=12.8"],
        &[rtx4090()],
    ));
    assert!(msg.contains("the image needs CUDA >= 12.8"), "{msg}");
    assert!(
        msg.contains("the newest flavour gpucell can build is nvidia-550"),
        "{msg}"
    );
    assert!(
        msg.contains("CUDA 12.4") && msg.contains("RTX 4090"),
        "{msg}"
    );
    // A legacy image: CUDA_VERSION alone means cuda>=major.minor.
    let msg = refused(pick(None, None, &["CUDA_VERSION=12.6.3"], &[h100()]));
    assert!(msg.contains("12.6"), "{msg}");
    // Blackwell needs 570.
    let msg = refused(pick(None, None, &[], &[rtx5090()]));
    assert!(
        msg.contains("RTX 5090") && msg.contains("Blackwell") && msg.contains("570"),
        "{msg}"
    );
    // Pascal needs the proprietary modules.
    let msg = refused(pick(None, None, &[], &[p100()]));
    assert!(msg.contains("proprietary"), "{msg}");
    // One GPU nobody drives in a pair refuses the run.
    let msg = refused(pick(None, None, &[], &[h200(), rtx5090()]));
    assert!(msg.contains("RTX 5090"), "{msg}");
}

#[test]
fn forward_compat_clauses_and_the_switch_off() {
    // A CUDA 12.8 image's datacenter clause for the 550 branch: cuda-compat bridges it.
    let compat = "NVIDIA_REQUIRE_CUDA=cuda>=12.8 brand=tesla,driver>=535,driver<536 brand=nvidia,driver>=550,driver<551";
    assert_eq!(chosen(pick(None, None, &[compat], &[h200()])), "nvidia-550");
    // NVIDIA_DISABLE_REQUIRE skips the check.
    let off = [
        "NVIDIA_REQUIRE_CUDA=cuda>=12.8",
        "NVIDIA_DISABLE_REQUIRE=true",
    ];
    assert_eq!(chosen(pick(None, None, &off, &[h200()])), "nvidia-550");
    // A malformed requirement is an error, not a guess.
    let msg = refused(pick(
        None,
        None,
        &["NVIDIA_REQUIRE_CUDA=cuda>>12"],
        &[h200()],
    ));
    assert!(msg.contains("NVIDIA_REQUIRE_CUDA"), "{msg}");
}

#[test]
fn no_gpu_and_no_ask_wants_no_driver() {
    assert_eq!(
        pick(None, None, &["NVIDIA_REQUIRE_CUDA=cuda>=12.4"], &[]).unwrap(),
        None
    );
}

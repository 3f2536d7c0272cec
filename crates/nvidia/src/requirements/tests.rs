use super::*;

/// `CUDA_VERSION` → `NVIDIA_REQUIRE_CUDA` of the nvidia/cuda base images.
const FIXTURE: &str = include_str!("../../tests/fixtures/nvidia-require-cuda.txt");

fn image_requirement(cuda: &str) -> String {
    FIXTURE
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(cuda)?.strip_prefix('\t'))
        .unwrap_or_else(|| panic!("no fixture row for CUDA {cuda}"))
        .to_owned()
}

fn image_env(cuda: &str) -> Vec<String> {
    vec![
        "PATH=/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/bin:/bin".into(),
        format!("NVIDIA_REQUIRE_CUDA={}", image_requirement(cuda)),
        format!("CUDA_VERSION={cuda}"),
        "NVIDIA_VISIBLE_DEVICES=all".into(),
        "NVIDIA_DRIVER_CAPABILITIES=compute,utility".into(),
    ]
}

/// (name, compute capability, NVML brand)
const GPUS: [(&str, &str, &str); 8] = [
    ("P100 (Pascal)", "6.0", "Tesla"),
    ("RTX 2080 Ti (Turing)", "7.5", "GeForce"),
    ("A100 (Ampere)", "8.0", "NVIDIA"),
    ("RTX 4090 (Ada)", "8.9", "GeForce"),
    ("H100 (Hopper)", "9.0", "NVIDIA"),
    ("H200 (Hopper)", "9.0", "NVIDIA"),
    ("RTX 5090 (Blackwell)", "12.0", "GeForce"),
    ("B200 (Blackwell)", "10.0", "NVIDIA"),
];

/// (flavour, driver version, CUDA version reported by its libcuda); 570 and 580 are
/// hypothetical (not buildable from Debian).
const FLAVOURS: [(&str, &str, &str); 4] = [
    ("535", "535.261.03", "12.2"),
    ("550", "550.163.01", "12.4"),
    ("570", "570.124.06", "12.8"),
    ("580", "580.95.05", "13.0"),
];

fn gpu(i: usize) -> GpuFacts {
    GpuFacts::new(GPUS[i].1, GPUS[i].2).unwrap()
}

fn driver(flavour: &str) -> DriverFacts {
    let (_, d, c) = FLAVOURS.iter().find(|f| f.0 == flavour).unwrap();
    DriverFacts::new(d, c).unwrap()
}

#[test]
fn image_matrix_matches_the_toolkit() {
    // Columns in GPUS order. `-` = refused with the cuda>= message. 12.4 images on 535
    // pass through their brand=…,driver>=535,driver<536 clauses (consumer brands included
    // up to 12.4); from 12.8 only data-centre brands have forward-compat clauses.
    let expected = [
        ("11.8.0", "535", "ok ok ok ok ok ok ok ok"),
        ("11.8.0", "550", "ok ok ok ok ok ok ok ok"),
        ("11.8.0", "570", "ok ok ok ok ok ok ok ok"),
        ("11.8.0", "580", "ok ok ok ok ok ok ok ok"),
        ("12.2.2", "535", "ok ok ok ok ok ok ok ok"),
        ("12.2.2", "550", "ok ok ok ok ok ok ok ok"),
        ("12.2.2", "570", "ok ok ok ok ok ok ok ok"),
        ("12.2.2", "580", "ok ok ok ok ok ok ok ok"),
        ("12.4.1", "535", "ok ok ok ok ok ok ok ok"),
        ("12.4.1", "550", "ok ok ok ok ok ok ok ok"),
        ("12.4.1", "570", "ok ok ok ok ok ok ok ok"),
        ("12.4.1", "580", "ok ok ok ok ok ok ok ok"),
        ("12.8.1", "535", "ok - ok - ok ok - ok"),
        ("12.8.1", "550", "ok - ok - ok ok - ok"),
        ("12.8.1", "570", "ok ok ok ok ok ok ok ok"),
        ("12.8.1", "580", "ok ok ok ok ok ok ok ok"),
        ("13.0.2", "535", "ok - ok - ok ok - ok"),
        ("13.0.2", "550", "ok - ok - ok ok - ok"),
        ("13.0.2", "570", "ok - ok - ok ok - ok"),
        ("13.0.2", "580", "ok ok ok ok ok ok ok ok"),
    ];
    for (image, flavour, row) in expected {
        let reqs = Requirements::from_env(&image_env(image)).unwrap();
        assert!(!reqs.legacy && !reqs.disabled);
        let want: Vec<&str> = row.split(' ').collect();
        assert_eq!(want.len(), GPUS.len());
        for (i, w) in want.iter().enumerate() {
            let got = reqs.check(&driver(flavour), &[gpu(i)]);
            let what = format!("CUDA {image} image, driver {flavour}, {}", GPUS[i].0);
            match (*w, got) {
                ("ok", Ok(())) => {}
                ("-", Err(u)) => {
                    let mm = &image[..image.rfind('.').unwrap()];
                    assert_eq!(
                        u.message,
                        format!(
                            "unsatisfied condition: cuda>={mm}, please update your driver \
                             to a newer version, or use an earlier cuda container"
                        ),
                        "{what}"
                    );
                    assert_eq!(
                        (u.variable.as_str(), u.gpu),
                        ("NVIDIA_REQUIRE_CUDA", Some(0))
                    );
                    assert_eq!(u.failed_conditions[0], format!("cuda>={mm}"), "{what}");
                    // Every brand alternative failed on its brand (a GeForce is none of them).
                    assert!(
                        u.failed_conditions[1..]
                            .iter()
                            .all(|c| c.starts_with("brand=")),
                        "{what}: {:?}",
                        u.failed_conditions
                    );
                }
                (w, got) => panic!("{what}: expected {w}, got {got:?}"),
            }
        }
        // With no GPU visible, brand clauses hold: every forward-compat branch passes.
        let no_gpu = reqs.check(&driver(flavour), &[]);
        assert!(
            no_gpu.is_ok(),
            "CUDA {image}, driver {flavour}, no GPU: {no_gpu:?}"
        );
    }
}

#[test]
fn forward_compat_clauses_bound_the_driver_branch() {
    let reqs = Requirements::from_env(&image_env("12.2.2")).unwrap();
    let a100 = gpu(2);
    // 525 (CUDA 12.0) is covered by brand=…,driver>=525,driver<526.
    assert!(reqs
        .check(
            &DriverFacts::new("525.147.05", "12.0").unwrap(),
            std::slice::from_ref(&a100)
        )
        .is_ok());
    // 530 (CUDA 12.1) has no clause: refused, for a GPU and with none.
    let d530 = DriverFacts::new("530.30.02", "12.1").unwrap();
    let u = reqs.check(&d530, std::slice::from_ref(&a100)).unwrap_err();
    assert!(u
        .failed_conditions
        .iter()
        .any(|c| c == "driver>=525" || c == "driver<471"));
    assert!(reqs.check(&d530, &[]).is_err());
    // driver<526 is exclusive: 526.0 is outside.
    let r = Requirement::parse("X", "brand=tesla,driver>=525,driver<526").unwrap();
    let tesla = GpuFacts::new("7.0", "tesla").unwrap();
    assert!(r.holds(
        &DriverFacts::new("525.999.99", "12.0").unwrap(),
        Some(&tesla)
    ));
    assert!(!r.holds(&DriverFacts::new("526", "12.0").unwrap(), Some(&tesla)));
    assert!(!r.holds(&DriverFacts::new("526.0.1", "12.0").unwrap(), Some(&tesla)));
}

#[test]
fn the_first_failing_gpu_is_named() {
    let reqs = Requirements::from_env(&image_env("13.0.2")).unwrap();
    let gpus = [gpu(5), gpu(6), gpu(3)]; // H200, RTX 5090, RTX 4090
    let u = reqs.check(&driver("550"), &gpus).unwrap_err();
    assert_eq!(u.gpu, Some(1));
    assert!(reqs.check(&driver("550"), &[gpu(4), gpu(5)]).is_ok());
}

#[test]
fn versions_compare_field_by_field() {
    let v = |s| Version::parse(s).unwrap();
    assert_eq!(v("12"), v("12.0"));
    assert_eq!(v("12.0.0"), v("12"));
    assert_eq!(v("535.261.03"), v("535.261.3"));
    assert_eq!(v("12..4"), v("12.4"));
    assert_eq!(v("12.4."), v("12.4"));
    assert!(v("12.10") > v("12.9"));
    assert!(v("12.0.1") > v("12"));
    assert!(v("9.0") < v("10.0"));
    assert!(v("550.163.01") < v("551"));
    assert_eq!(v("535.261.03").to_string(), "535.261.03");
    assert_eq!(v("580.95.05").major(), 580);
    for bad in [
        "",
        ".4",
        "12a",
        "v12",
        "-1",
        "12 ",
        "99999999999999999999999",
    ] {
        assert!(Version::parse(bad).is_none(), "{bad:?}");
    }
    assert!(DriverFacts::new("535.x", "12.2").is_err());
    assert!(DriverFacts::new("535.1", "").is_err());
    assert!(GpuFacts::new("sm_90", "NVIDIA").is_none());
}

#[test]
fn operators_and_case() {
    let d = DriverFacts::new("550.163.01", "12.4").unwrap();
    let h = GpuFacts::new("9.0", "NVIDIA").unwrap();
    let holds = |e: &str| Requirement::parse("V", e).unwrap().holds(&d, Some(&h));
    for (e, want) in [
        ("cuda=12.4", true),
        ("cuda=12.4.0", true),
        ("cuda!=12.4", false),
        ("cuda<12.4", false),
        ("cuda<=12.4", true),
        ("cuda>12.3", true),
        ("cuda>=12.5", false),
        ("CUDA>=12.4", true),
        ("Driver>=550.163.1", true),
        ("arch>=9.0", true),
        ("arch>9.0", false),
        ("arch=9", true),
        ("brand=nvidia", true),
        ("brand=NVIDIA", true),
        ("brand!=nvidia", false),
        ("brand!=geforce", true),
        ("brand=tesla", false),
        ("", true),
        ("  ", true),
        ("cuda>=13.0 arch>=9.0", true),
        ("cuda>=13.0,arch>=9.0", false),
        ("cuda>=12.0,,arch>=9.0", true),
        ("cuda>=13.0 brand=geforce arch<8.0", false),
    ] {
        assert_eq!(holds(e), want, "{e:?}");
    }
    // An empty brand (unknown to gpucell) satisfies every brand condition.
    let unknown = GpuFacts::new("9.0", "").unwrap();
    let r = Requirement::parse("V", "brand=tesla").unwrap();
    assert!(r.holds(&d, Some(&unknown)));
    // No GPU: arch and brand hold, cuda and driver do not change.
    let r = Requirement::parse("V", "arch>=99.0,brand=quadro,cuda>=12.4").unwrap();
    assert!(r.holds(&d, None));
    let r = Requirement::parse("V", "arch>=99.0,cuda>=12.5").unwrap();
    assert!(!r.holds(&d, None));
}

#[test]
fn malformed_conditions_name_the_variable_and_token() {
    for (expr, token, why) in [
        ("cuda12.4", "cuda12.4", "no operator"),
        (">=12.4", ">=12.4", "no property before the operator"),
        ("cuda=>12.4", "cuda=>12.4", "unknown operator"),
        ("cuda==12.4", "cuda==12.4", "unknown operator"),
        ("cuda>>12", "cuda>>12", "unknown operator"),
        ("cuda>=", "cuda>=", "no value after the operator"),
        (
            "gpu>=1",
            "gpu>=1",
            "unknown property (cuda, driver, arch or brand)",
        ),
        (
            "brand>=tesla",
            "brand>=tesla",
            "a brand compares only with = or !=",
        ),
        (
            "driver>=535.x",
            "driver>=535.x",
            "the value is not a version",
        ),
        ("arch>=sm_90", "arch>=sm_90", "the value is not a version"),
        // Malformed after a satisfied alternative: the toolkit would not notice; gpucell does.
        ("cuda>=1 cuda>=1,bogus", "bogus", "no operator"),
    ] {
        let err = Requirement::parse("NVIDIA_REQUIRE_FOO", expr).unwrap_err();
        assert_eq!(
            err,
            RequirementError::Invalid {
                variable: "NVIDIA_REQUIRE_FOO".into(),
                token: token.into(),
                why
            },
            "{expr}"
        );
    }
    let msg = Requirements::from_env(&["NVIDIA_REQUIRE_ARCH=arch~9"])
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("NVIDIA_REQUIRE_ARCH of the image: invalid condition `arch~9`")
            && msg.contains("NVIDIA_DISABLE_REQUIRE"),
        "{msg}"
    );
    let long = format!("NVIDIA_REQUIRE_X={}", "cuda>=1 ".repeat(10_000));
    assert!(matches!(
        Requirements::from_env(&[long]),
        Err(RequirementError::TooLong { .. })
    ));
}

#[test]
fn every_require_variable_is_anded_except_jetpack() {
    let env = [
        "NVIDIA_REQUIRE_CUDA=cuda>=12.0",
        "NVIDIA_REQUIRE_ARCH=arch>=8.0",
        "NVIDIA_REQUIRE_JETPACK=not a condition",
        "NVIDIA_REQUIRE_JETPACK_HOST_MOUNTS=also not",
    ];
    let reqs = Requirements::from_env(&env).unwrap();
    let names: Vec<&str> = reqs.items.iter().map(|r| r.variable.as_str()).collect();
    assert_eq!(names, ["NVIDIA_REQUIRE_ARCH", "NVIDIA_REQUIRE_CUDA"]);
    let d = driver("550");
    assert!(reqs.check(&d, &[gpu(2)]).is_ok());
    let u = reqs.check(&d, &[gpu(2), gpu(0)]).unwrap_err();
    assert_eq!(
        (u.variable.as_str(), u.gpu, u.message.as_str()),
        (
            "NVIDIA_REQUIRE_ARCH",
            Some(1),
            "unsatisfied condition: arch>=8.0"
        )
    );
    assert_eq!(u.failed_conditions, ["arch>=8.0"]);
    // The reported clause is the first alternative, as libnvidia-container reports it.
    let r = Requirements::from_env(&["NVIDIA_REQUIRE_X=brand=quadro arch>=99"]).unwrap();
    let u = r.check(&d, &[gpu(5)]).unwrap_err();
    assert_eq!(u.message, "unsatisfied condition: brand=quadro");
    assert_eq!(u.failed_conditions, ["brand=quadro", "arch>=99"]);
    assert_eq!(u.to_string(), u.message);
}

#[test]
fn disable_require_parses_like_go() {
    let base = "NVIDIA_REQUIRE_CUDA=cuda>=99.0";
    for (v, disabled) in [
        ("1", true),
        ("t", true),
        ("T", true),
        ("true", true),
        ("TRUE", true),
        ("True", true),
        ("0", false),
        ("false", false),
        ("yes", false),
        ("on", false),
        ("", false),
        ("tRuE", false),
    ] {
        let reqs =
            Requirements::from_env(&[base.to_string(), format!("NVIDIA_DISABLE_REQUIRE={v}")])
                .unwrap();
        assert_eq!(reqs.disabled, disabled, "{v:?}");
        assert_eq!(
            reqs.check(&driver("535"), &[gpu(0)]).is_ok(),
            disabled,
            "{v:?}"
        );
    }
    // Disabled: not even parsed.
    assert!(Requirements::from_env(&["NVIDIA_DISABLE_REQUIRE=1", "NVIDIA_REQUIRE_X=junk"]).is_ok());
}

#[test]
fn legacy_images_get_cuda_major_minor() {
    for (cuda, want) in [
        ("9.0", "cuda>=9.0"),
        ("10.2.89", "cuda>=10.2"),
        ("v11.0.3", "cuda>=11.0"),
        ("12", "cuda>=12.0"),
        ("12.4.1-rc1+build.5", "cuda>=12.4"),
    ] {
        let reqs = Requirements::from_env(&[format!("CUDA_VERSION={cuda}")]).unwrap();
        assert!(reqs.legacy);
        assert_eq!(reqs.items.len(), 1, "{cuda}");
        assert_eq!(
            (
                reqs.items[0].variable.as_str(),
                reqs.items[0].expression.as_str()
            ),
            ("CUDA_VERSION", want),
            "{cuda}"
        );
    }
    for bad in ["10.2.89.1", "12.4-rc", "012.4", "twelve", "12.", "12.4.1-"] {
        assert_eq!(
            Requirements::from_env(&[format!("CUDA_VERSION={bad}")]),
            Err(RequirementError::LegacyVersion { value: bad.into() }),
            "{bad}"
        );
    }
    // Legacy requirement is checked: a CUDA 12.4 legacy image on 535 (12.2) is refused.
    let reqs = Requirements::from_env(&["CUDA_VERSION=12.4.1"]).unwrap();
    let u = reqs.check(&driver("535"), &[gpu(5)]).unwrap_err();
    assert_eq!(u.variable, "CUDA_VERSION");
    assert!(u
        .message
        .starts_with("unsatisfied condition: cuda>=12.4, please update"));
    assert!(reqs.check(&driver("550"), &[gpu(5)]).is_ok());
    // With NVIDIA_REQUIRE_CUDA set, CUDA_VERSION is informational only.
    let reqs =
        Requirements::from_env(&["CUDA_VERSION=12.4.1", "NVIDIA_REQUIRE_CUDA=cuda>=11.0"]).unwrap();
    assert!(!reqs.legacy);
    assert!(reqs.check(&driver("535"), &[gpu(5)]).is_ok());
}

#[test]
fn cuda_minimums_for_refusal_messages() {
    let reqs = Requirements::from_env(&image_env("12.8.1")).unwrap();
    let mins: Vec<String> = reqs.cuda_minimums().iter().map(|v| v.to_string()).collect();
    assert_eq!(mins, ["12.8"]);
    let reqs = Requirements::from_env(&["NVIDIA_REQUIRE_A=cuda>12.1 cuda>=12.8,arch<9"]).unwrap();
    let mins: Vec<String> = reqs.cuda_minimums().iter().map(|v| v.to_string()).collect();
    assert_eq!(mins, ["12.8", "12.1"]);
}

//! The guest driver flavour a run gets: chosen from the image's NVIDIA requirements and
//! label and the passed GPUs (fake hosts: GPU hardware cannot exist here), shown in
//! `run --json` and `--dry-run`, with refusals that leave nothing held.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::fakehost::fake_gpu_host;
use common::{stderr, stdout, VmEnv};

const H200: u16 = 0x2335;
const RTX4090: u16 = 0x2684;
const RTX5090: u16 = 0x2b85;

/// The demo image with `env` and `labels` added to its config (umoci), as `oci:...:tag`.
fn image_with(env: &VmEnv, tag: &str, vars: &[&str], labels: &[&str]) -> String {
    let layout = env.image_dir.to_str().unwrap();
    let mut c = Command::new("umoci");
    c.args(["config", "--image", &format!("{layout}:demo"), "--tag", tag]);
    for v in vars {
        c.args(["--config.env", v]);
    }
    for l in labels {
        c.args(["--config.label", l]);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "umoci config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("oci:{layout}:{tag}")
}

fn no_iommu_here() -> bool {
    !std::fs::read_dir("/sys/kernel/iommu_groups").is_ok_and(|mut d| d.next().is_some())
}

fn allocations(state: &Path) -> usize {
    std::fs::read_to_string(state.join("devices/allocations.json"))
        .map(|t| t.matches("\"sandbox\"").count())
        .unwrap_or(0)
}

fn report(o: &Output) -> serde_json::Value {
    let err = stderr(o);
    let start = err.rfind("\n{").map(|i| i + 1).unwrap_or(0);
    serde_json::from_str(&err[start..]).unwrap_or_else(|e| panic!("{e}: {err}"))
}

/// `run --json` (or `--dry-run`) on a fake host with one GPU of `device`.
fn run_on(env: &VmEnv, device: u16, extra: &[&str], image: &str) -> (Output, tempfile::TempDir) {
    let host = tempfile::tempdir().unwrap();
    fake_gpu_host(host.path(), device);
    let mut args = vec![
        "--host-root",
        host.path().to_str().unwrap(),
        "--json",
        "--gpus",
        "all",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[image, "--", "true"]);
    let out = env.run(&args);
    (out, host)
}

#[test]
fn an_h200_gets_the_newest_flavour_that_meets_its_image() {
    if !no_iommu_here() {
        eprintln!("skipping: this host has IOMMU groups; QEMU must not open a real device");
        return;
    }
    let Some(env) = common::vm_env() else { return };
    let image = image_with(&env, "cuda124", &["NVIDIA_REQUIRE_CUDA=cuda>=12.4"], &[]);
    let (out, _host) = run_on(&env, H200, &[], &image);
    let r = report(&out);
    assert_eq!(r["driver"]["flavour"], "nvidia-550", "{r}");
    assert_eq!(r["driver"]["by"], "requirements", "{r}");
    assert_eq!(r["driver"]["max_cuda"], "12.4", "{r}");
    // Whatever stopped the run here (no VFIO on this machine), the GPU went back.
    assert_eq!(allocations(env.state.path()), 0, "{r}");
}

#[test]
fn a_label_or_a_flag_names_the_driver() {
    if !no_iommu_here() {
        eprintln!("skipping: this host has IOMMU groups; QEMU must not open a real device");
        return;
    }
    let Some(env) = common::vm_env() else { return };
    let image = image_with(&env, "label535", &[], &["io.gpucell.driver=535"]);
    let (out, _host) = run_on(&env, RTX4090, &[], &image);
    let r = report(&out);
    assert_eq!(r["driver"]["flavour"], "nvidia-535", "{r}");
    assert_eq!(r["driver"]["by"], "label", "{r}");
    // --driver wins over the label.
    let (out, _host) = run_on(&env, RTX4090, &["--driver", "550"], &image);
    let r = report(&out);
    assert_eq!(r["driver"]["flavour"], "nvidia-550", "{r}");
    assert_eq!(r["driver"]["by"], "flag", "{r}");
    assert_eq!(allocations(env.state.path()), 0);
}

#[test]
fn refusals_name_the_need_and_hold_nothing() {
    let Some(env) = common::vm_env() else { return };
    let cuda128 = image_with(&env, "cuda128", &["NVIDIA_REQUIRE_CUDA=cuda>=12.8"], &[]);
    let cases: Vec<(u16, Vec<&str>, String, Vec<&str>)> = vec![
        (
            RTX4090,
            vec![],
            cuda128.clone(),
            vec!["the image needs CUDA >= 12.8", "nvidia-550", "CUDA 12.4"],
        ),
        (
            RTX5090,
            vec![],
            env.image.clone(),
            vec!["RTX 5090", "Blackwell", "570"],
        ),
        (
            H200,
            vec!["--driver", "535"],
            env.image.clone(),
            vec!["H200", "nvidia-535"],
        ),
        (
            H200,
            vec!["--driver", "999"],
            env.image.clone(),
            vec!["999", "nvidia-550"],
        ),
    ];
    for (device, extra, image, needles) in cases {
        for dry in [true, false] {
            let mut args = extra.clone();
            if dry {
                args.push("--dry-run");
            }
            let (out, host) = run_on(&env, device, &args, &image);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(125), "{device:x} {args:?}: {err}");
            for n in &needles {
                assert!(err.contains(n), "{device:x} {args:?}: {n:?} missing: {err}");
            }
            assert!(stdout(&out).is_empty());
            assert_eq!(allocations(env.state.path()), 0);
            let reset = std::fs::read_to_string(
                host.path()
                    .join("sys/devices/pci0000:01/0000:01:00.0/reset"),
            )
            .unwrap();
            assert_ne!(reset.trim(), "1", "a refused run reset the GPU");
        }
    }
}

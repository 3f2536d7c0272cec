//! `gpucell run --dry-run`: the plan of a run, printed, with nothing started or held;
//! the same refusals as a real run.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Output;

use common::fakehost::fake_4090_host;
use common::{stderr, stdout, VmEnv};

/// Every file under `root` with its content (symlinks as their target), to compare a
/// tree before and after.
fn snapshot(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                out.push((
                    rel,
                    format!("-> {}", std::fs::read_link(&p).unwrap().display()),
                ));
            } else if meta.is_dir() {
                out.push((rel, "dir".into()));
                stack.push(p);
            } else {
                out.push((
                    rel,
                    String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into(),
                ));
            }
        }
    }
    out.sort();
    out
}

fn dry(env: &VmEnv, args: &[&str]) -> Output {
    let mut all = vec!["--dry-run"];
    all.extend_from_slice(args);
    env.run(&all)
}

fn plan(out: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout(out)).unwrap_or_else(|e| panic!("{e}: {}", stdout(out)))
}

#[test]
fn dry_run_prints_the_plan_and_starts_nothing() {
    let Some(env) = common::vm_env() else { return };
    let out = dry(
        &env,
        &[
            "--json", "--cpus", "2", "-m", "300m", &env.image, "--", "echo", "hi",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let p = plan(&out);
    assert_eq!(p["dry_run"], true, "{p}");
    assert!(
        p["image"]["digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{p}"
    );
    assert_eq!(p["guest"]["flavour"], "default", "{p}");
    assert_eq!(p["accel"]["accel"], "tcg", "{p}");
    assert_eq!(p["spec"]["args"], serde_json::json!(["echo", "hi"]), "{p}");
    assert_eq!(p["devices"], serde_json::json!([]), "{p}");
    let args: Vec<String> = serde_json::from_value(p["qemu_args"].clone()).unwrap();
    assert!(
        p["qemu"].as_str().unwrap().ends_with("qemu-system-x86_64"),
        "{p}"
    );
    let joined = args.join(" ");
    assert!(joined.contains("-accel tcg"), "{joined}");
    assert!(joined.contains("-smp 2"), "{joined}");
    assert!(joined.contains("-m 300"), "{joined}");
    assert!(
        joined.contains(p["guest"]["kernel"].as_str().unwrap()),
        "{joined}"
    );
    assert!(
        joined.contains(p["image"]["disk"].as_str().unwrap()),
        "{joined}"
    );
    // No workload ran: nothing on stderr from the guest, no run directory left
    // (VmEnv::run checks no QEMU and no run dir remain).
    assert!(!stderr(&out).contains("hi\n"), "{}", stderr(&out));
    assert!(
        !env.state.path().join("run").exists()
            || snapshot(&env.state.path().join("run")).is_empty()
    );

    // The text form names the same plan.
    let out = dry(&env, &[&env.image, "--", "echo", "hi"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in ["image", "tcg", "echo hi", "qemu", "devices     none"] {
        assert!(text.contains(needle), "{needle}: {text}");
    }

    // The node's memory settings: the built-in defaults, then `[run]` keys.
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(8);
    let memory = |o: &Output| plan(o)["memory"].clone();
    let out = dry(&env, &["--json", &env.image, "--", "true"]);
    assert_eq!(
        memory(&out),
        serde_json::json!({"preallocated": false, "prealloc_threads": threads, "hugepage_size": "auto"})
    );
    let config = env.state.path().join("config.toml");
    std::fs::write(
        &config,
        "[run]\nprealloc_threads = 3\nhugepage_size = \"1G\"\n",
    )
    .unwrap();
    let c = config.to_str().unwrap();
    let out = dry(&env, &["--config", c, "--json", &env.image, "--", "true"]);
    assert_eq!(
        memory(&out),
        serde_json::json!({"preallocated": false, "prealloc_threads": 3, "hugepage_size": "1G"})
    );
    let out = dry(&env, &["--config", c, &env.image, "--", "true"]);
    assert!(
        stdout(&out).contains("3 threads, pages 1G"),
        "{}",
        stdout(&out)
    );
}

/// The refusals of a dry run are a real run's, word for word, and neither leaves
/// anything behind.
#[test]
fn dry_run_refuses_what_a_run_refuses() {
    let Some(env) = common::vm_env() else { return };
    let cases: Vec<Vec<&str>> = vec![
        vec!["oci:/nonexistent/layout:x", "--", "true"],
        vec!["--memory", "lots", &env.image, "--", "true"],
        vec!["--pin-cpus", &env.image, "--", "true"],
        vec!["--guest", "no-such-flavour", &env.image, "--", "true"],
        vec!["-w", "relative", &env.image, "--", "true"],
    ];
    for args in cases {
        let real = env.run(&args);
        let dry_out = dry(&env, &args);
        assert_eq!(real.status.code(), Some(125), "{args:?}: {}", stderr(&real));
        assert_eq!(
            dry_out.status.code(),
            Some(125),
            "{args:?}: {}",
            stderr(&dry_out)
        );
        let first_error = |o: &Output| {
            stderr(o)
                .lines()
                .find(|l| l.starts_with("error: "))
                .unwrap_or_else(|| panic!("{args:?}: {}", stderr(o)))
                .to_string()
        };
        assert_eq!(first_error(&real), first_error(&dry_out), "{args:?}");
        assert!(
            stdout(&dry_out).is_empty(),
            "{args:?}: {}",
            stdout(&dry_out)
        );
    }
}

/// On a fake host with an RTX 4090: the dry run names the GPU it would take and its
/// wiring, and takes nothing: no record, no binding, no reset; a device that a run would
/// refuse is refused the same way.
#[test]
fn dry_run_chooses_devices_without_taking_them() {
    if std::fs::read_dir("/sys/kernel/iommu_groups").is_ok_and(|mut d| d.next().is_some()) {
        eprintln!("skipping: this host has IOMMU groups; the test must not touch a real device");
        return;
    }
    let Some(env) = common::vm_env() else { return };
    let host = tempfile::tempdir().unwrap();
    fake_4090_host(host.path());
    // Reserved 2 MiB pages, enough for the guest: `hugepage_size = "auto"` takes them.
    let pool = host.path().join("sys/kernel/mm/hugepages/hugepages-2048kB");
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::write(pool.join("free_hugepages"), "65536\n").unwrap();
    let host_root = host.path().to_str().unwrap();
    let before_host = snapshot(host.path());
    let out = dry(
        &env,
        &[
            "--host-root",
            host_root,
            "--json",
            "--gpus",
            "all",
            &env.image,
            "--",
            "true",
        ],
    );
    let err = stderr(&out);
    if out.status.code() == Some(125) && err.contains("LimitMEMLOCK") {
        // gpucell may not raise the locked-memory limit here: a run stops there too.
        eprintln!("dry run refused as a run would: {err}");
    } else {
        assert_eq!(out.status.code(), Some(0), "{err}");
        let p = plan(&out);
        let devices = p["devices"].as_array().unwrap();
        assert_eq!(devices.len(), 1, "{p}");
        assert_eq!(devices[0]["host_bdf"], "0000:01:00.0", "{p}");
        assert_eq!(devices[0]["id"], "10de:2684", "{p}");
        assert_eq!(
            devices[0]["companions"],
            serde_json::json!(["0000:01:00.1"])
        );
        let joined = p["qemu_args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(joined.contains("vfio-pci,host=0000:01:00.0"), "{joined}");
        assert!(
            !joined.contains("0000:01:00.1"),
            "companions are not passed: {joined}"
        );
        assert!(p["pci_hole64_bytes"].as_u64().unwrap() >= 160 << 30, "{p}");
        // Preallocated from the reserved 2 MiB pages, by all host CPUs up to 8.
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(8);
        assert!(
            joined.contains(&format!(
                "memory-backend-memfd,id=ram,size={}M,hugetlb=on,hugetlbsize=2M,prealloc=on,prealloc-threads={threads}",
                p["memory_mib"]
            )),
            "{joined}"
        );
        // `[run]` keys choose 4 KiB pages and 3 threads.
        let config = env.state.path().join("config.toml");
        std::fs::write(
            &config,
            "[run]\nprealloc_threads = 3\nhugepage_size = \"4K\"\n",
        )
        .unwrap();
        let out = dry(
            &env,
            &[
                "--config",
                config.to_str().unwrap(),
                "--host-root",
                host_root,
                "--json",
                "--gpus",
                "all",
                &env.image,
                "--",
                "true",
            ],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let p = plan(&out);
        assert!(
            p["qemu_args"].to_string().contains(&format!(
                "memory-backend-ram,id=ram,size={}M,prealloc=on,prealloc-threads=3\"",
                p["memory_mib"]
            )),
            "{p}"
        );
    }
    assert_eq!(
        snapshot(host.path()),
        before_host,
        "the dry run changed the host tree"
    );
    assert!(!env.state.path().join("devices/allocations.json").exists());

    // A function with no IOMMU group: the run and the dry run refuse it alike.
    std::fs::remove_file(
        host.path()
            .join("sys/devices/pci0000:01/0000:01:00.0/iommu_group"),
    )
    .unwrap();
    let args = [
        "--host-root",
        host_root,
        "--device",
        "0000:01:00.0",
        &env.image,
        "--",
        "true",
    ];
    let real = env.run(&args);
    let dry_out = dry(&env, &args);
    assert_eq!(real.status.code(), Some(125), "{}", stderr(&real));
    assert_eq!(dry_out.status.code(), Some(125), "{}", stderr(&dry_out));
    let first = |o: &Output| {
        stderr(o)
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap()
            .to_string()
    };
    assert_eq!(first(&real), first(&dry_out));
    assert!(first(&real).contains("0000:01:00.0"), "{}", first(&real));
    assert!(
        !env.state.path().join("devices/allocations.json").exists() || {
            let t =
                std::fs::read_to_string(env.state.path().join("devices/allocations.json")).unwrap();
            !t.contains("0000:01:00.0")
        }
    );
}

/// With no `--network` and no `[network] default`, a run gets a private network (the
/// built-in default, as docker's bridge); the dry run shows it without touching the host.
#[test]
fn the_built_in_network_default_is_private() {
    let Some(env) = common::vm_env() else { return };
    let empty = env.state.path().join("empty-config.toml");
    std::fs::write(&empty, "").unwrap();
    let out = env
        .run_cmd(&["--dry-run", "--json", &env.image, "--", "true"])
        .env_remove("GPUCELL_NETWORK")
        .env("GPUCELL_CONFIG", &empty)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v = plan(&out);
    assert_eq!(v["network"]["mode"], "private", "{v}");
    assert!(v["qemu_args"].to_string().contains("netdev"), "{v}");
    // GPUCELL_NETWORK=none (as the tests set it) turns it off.
    let out = env
        .run_cmd(&["--dry-run", "--json", &env.image, "--", "true"])
        .env("GPUCELL_CONFIG", &empty)
        .output()
        .unwrap();
    let v = plan(&out);
    assert!(v.get("network").is_none(), "{v}");
    env.assert_clean();
}

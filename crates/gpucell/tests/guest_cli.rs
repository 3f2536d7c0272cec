//! `gpucell guest build|show|list` as a binary, in a temp state dir. The build needs a
//! cached Debian kernel `.deb`; it skips with the reason when there is none.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn gpucell(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpucell"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("GPUCELL_STATE_DIR")
        .env_remove("GPUCELL_AGENT")
        .output()
        .unwrap()
}

fn kernel_deb() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GPUCELL_TEST_KERNEL_DEB") {
        return Some(PathBuf::from(p));
    }
    let found = [
        "/tmp/gpucell-test-debs",
        "/var/cache/apt/archives",
        "/var/lib/gpucell/guest/cache/debs",
    ]
    .iter()
    .flat_map(|d| std::fs::read_dir(d).into_iter().flatten())
    .filter_map(|e| e.ok().map(|e| e.path()))
    .filter(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("linux-image-6") && n.ends_with(".deb"))
    })
    .max();
    if found.is_none() {
        eprintln!("skipping: no Debian kernel .deb cached (set GPUCELL_TEST_KERNEL_DEB)");
    }
    found
}

#[test]
fn show_and_list_before_any_build() {
    let state = tempfile::tempdir().unwrap();
    let o = gpucell(state.path(), &["guest", "show"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not built") && err.contains("gpucell guest build --flavour default"),
        "{err}"
    );

    let o = gpucell(state.path(), &["--json", "guest", "list"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["name"], "default");
    assert_eq!(v[0]["kernel_package"], "linux-image-amd64");
    assert!(v[0]["built"].is_null());

    let o = gpucell(
        state.path(),
        &[
            "guest",
            "build",
            "--flavour",
            "nvidia-999",
            "--agent",
            "/bin/sh",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown guest flavour `nvidia-999`"));
}

#[test]
fn build_then_show_then_cached_build() {
    let Some(deb) = kernel_deb() else { return };
    if !Path::new("/bin/busybox").is_file() {
        eprintln!("skipping: no static /bin/busybox to stand in for the agent");
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let deb = deb.to_str().unwrap();
    let args = [
        "--json",
        "guest",
        "build",
        "--agent",
        "/bin/busybox",
        "--kernel-deb",
        deb,
    ];

    // A dynamic agent is refused, with the way to build a static one.
    let o = gpucell(
        state.path(),
        &["guest", "build", "--agent", "/bin/sh", "--kernel-deb", deb],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("crt-static"));

    let o = gpucell(state.path(), &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["cached"], false);
    assert_eq!(v["flavour"], "default");
    let kernel = PathBuf::from(v["kernel"].as_str().unwrap());
    assert!(kernel.starts_with(state.path()) && kernel.is_file());
    assert_eq!(
        std::fs::metadata(v["initrd"].as_str().unwrap())
            .unwrap()
            .len(),
        v["manifest"]["initramfs"]["size"].as_u64().unwrap()
    );

    let o = gpucell(state.path(), &args);
    let again: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(again["cached"], true);
    assert_eq!(again["manifest"], v["manifest"]);

    let o = gpucell(state.path(), &["guest", "show"]);
    assert!(o.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown, v["manifest"]);

    let o = gpucell(state.path(), &["guest", "list"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("built (6."), "{text}");
}

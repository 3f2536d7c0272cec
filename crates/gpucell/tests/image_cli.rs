//! `gpucell pull` and `gpucell image ...` end to end, on an image made by umoci.

#![allow(clippy::unwrap_used)] // tests

use std::path::Path;
use std::process::{Command, Output};

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

fn gpucell(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpucell"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("run gpucell")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

fn umoci(args: &[&str]) {
    let st = Command::new("umoci")
        .args(args)
        .status()
        .expect("run umoci");
    assert!(st.success(), "umoci {args:?} failed");
}

/// A one-layer image with a file, made by umoci.
fn make_image(dir: &Path) -> String {
    let layout = dir.join("layout");
    let l = layout.to_str().unwrap();
    umoci(&["init", "--layout", l]);
    umoci(&["new", "--image", &format!("{l}:v1")]);
    let bundle = dir.join("bundle");
    umoci(&[
        "unpack",
        "--rootless",
        "--image",
        &format!("{l}:v1"),
        bundle.to_str().unwrap(),
    ]);
    std::fs::write(bundle.join("rootfs/hello.txt"), b"hello\n").unwrap();
    umoci(&[
        "repack",
        "--image",
        &format!("{l}:v1"),
        bundle.to_str().unwrap(),
    ]);
    umoci(&[
        "config",
        "--image",
        &format!("{l}:v1"),
        "--config.entrypoint",
        "/bin/echo",
        "--config.cmd",
        "hi",
        "--config.env",
        "GREETING=hello",
        "--config.workingdir",
        "/srv",
        "--config.user",
        "1000:1000",
        "--config.label",
        "org.example=yes",
        "--os",
        "linux",
        "--architecture",
        "amd64",
    ]);
    format!("oci:{l}:v1")
}

#[test]
fn pull_ls_inspect_disk_rm_prune() {
    if !have("umoci") || !have("mkfs.erofs") {
        eprintln!("skipping pull_ls_inspect_disk_rm_prune: umoci or mkfs.erofs missing (scripts/install-deps.sh)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let reference = make_image(dir.path());

    let out = ok(&gpucell(&state, &["pull", &reference]));
    let digest = out.split_whitespace().next().unwrap().to_owned();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{out}");

    let ls: serde_json::Value =
        serde_json::from_str(&ok(&gpucell(&state, &["--json", "image", "ls"]))).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(ls[0]["digest"], digest.as_str());
    assert_eq!(ls[0]["names"][0], reference.as_str());
    assert!(ok(&gpucell(&state, &["image", "ls"])).contains(&digest[7..19]));

    let inspect: serde_json::Value = serde_json::from_str(&ok(&gpucell(
        &state,
        &["--json", "image", "inspect", &reference],
    )))
    .unwrap();
    let c = &inspect["config"];
    assert_eq!(c["entrypoint"], serde_json::json!(["/bin/echo"]));
    assert_eq!(c["cmd"], serde_json::json!(["hi"]));
    assert!(c["env"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("GREETING=hello")));
    assert_eq!(c["working_dir"], "/srv");
    assert_eq!(c["user"], "1000:1000");
    assert_eq!(c["labels"]["org.example"], "yes");
    assert_eq!(inspect["layers"].as_array().unwrap().len(), 1);
    let text = ok(&gpucell(&state, &["image", "inspect", &digest[7..20]]));
    assert!(
        text.contains("/bin/echo") && text.contains("org.example=yes"),
        "{text}"
    );

    let disk_path = ok(&gpucell(&state, &["image", "disk", &reference]));
    let disk_path = Path::new(disk_path.trim());
    assert!(disk_path.is_absolute() && disk_path.is_file());
    let again = ok(&gpucell(&state, &["image", "disk", &digest]));
    assert_eq!(Path::new(again.trim()), disk_path);

    let rm = ok(&gpucell(&state, &["image", "rm", &reference]));
    assert!(rm.contains(&format!("deleted: {digest}")), "{rm}");
    assert!(!disk_path.exists());
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&gpucell(&state, &["--json", "image", "ls"]))).unwrap();
    assert!(ls.as_array().unwrap().is_empty());
    let prune: serde_json::Value =
        serde_json::from_str(&ok(&gpucell(&state, &["--json", "image", "prune"]))).unwrap();
    assert_eq!(prune["blobs"], 0);
}

#[test]
fn errors_name_the_reference_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = gpucell(&state, &["image", "inspect", "no-such-image:1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-image:1"), "{err}");
    let missing = dir.path().join("missing");
    let reference = format!("oci:{}:v1", missing.display());
    let out = gpucell(&state, &["pull", &reference]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("index.json") && err.contains(missing.to_str().unwrap()),
        "{err}"
    );
}

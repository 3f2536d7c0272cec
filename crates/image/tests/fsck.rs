//! `Store::fsck`: each kind of damaged store file is found, named, and repaired.

#![allow(clippy::unwrap_used)] // tests

mod common;

use std::fs;

use gpucell_common::fsck::Outcome;
use gpucell_image::testing::{ImageBuilder, LayerBuilder};
use gpucell_image::Store;

fn image(content: &str) -> ImageBuilder {
    ImageBuilder::new()
        .layer(LayerBuilder::new().dir("bin", 0o755).file(
            "bin/hello",
            format!("hello {content}\n"),
            0o755,
        ))
        .cmd(&["/bin/hello"])
}

#[test]
fn damaged_blobs_records_names_disks_and_leftovers_are_found_and_repaired() {
    if !common::have("mkfs.erofs", "damaged_..._are_found_and_repaired") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let store = Store::open(&state).unwrap();
    let mut names = Vec::new();
    let mut images = Vec::new();
    for which in ["a", "b", "c"] {
        let layout = dir.path().join(which);
        image(which).write_layout(&layout, "v1").unwrap();
        let name = format!("oci:{}:v1", layout.display());
        let img = store.get_or_fetch(&name).unwrap();
        store.guest_disk(&img).unwrap();
        names.push(name);
        images.push(img);
    }
    store.wait_for_cleanup();
    assert_eq!(store.fsck(false).unwrap(), vec![], "a fresh store is clean");

    let root = store.root().to_owned();
    // a: its layer blob loses its last byte.
    let layer_a = store.blobs().path(&images[0].layers[0].digest);
    let len = fs::metadata(&layer_a).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&layer_a)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    // b: its guest disk is cut to 100 bytes.
    let disk_b = store
        .cached_disk(&gpucell_image::digest::Digest::parse(&images[1].digest).unwrap())
        .unwrap()
        .path;
    fs::OpenOptions::new()
        .write(true)
        .open(&disk_b)
        .unwrap()
        .set_len(100)
        .unwrap();
    // c: its record is cut in half.
    let hex_c = images[2].digest.trim_start_matches("sha256:");
    let record_c = root.join(format!("images/{hex_c}.json"));
    let text = fs::read(&record_c).unwrap();
    fs::write(&record_c, &text[..text.len() / 2]).unwrap();
    // The names file is cut short, and an import died leaving a temporary file.
    let refs = root.join("refs.json");
    let text = fs::read(&refs).unwrap();
    fs::write(&refs, &text[..text.len() - 3]).unwrap();
    fs::write(root.join("tmp/dl-leftover"), b"partial").unwrap();

    let found = store.fsck(false).unwrap();
    let summary: Vec<(String, String)> = found
        .iter()
        .map(|f| {
            (
                f.what.clone(),
                f.file.strip_prefix(&root).unwrap().display().to_string(),
            )
        })
        .collect();
    let hex_a = images[0].digest.trim_start_matches("sha256:");
    let hex_b = images[1].digest.trim_start_matches("sha256:");
    let layer_hex = images[0].layers[0].digest.hex().to_string();
    let mut expected = vec![
        ("temporary file".to_string(), "tmp/dl-leftover".to_string()),
        ("image blob".into(), format!("blobs/sha256/{layer_hex}")),
        ("image record".into(), format!("images/{hex_a}.json")),
        ("image record".into(), format!("images/{hex_c}.json")),
        ("image names file".into(), "refs.json".into()),
        ("guest disk".into(), format!("disks/{hex_b}.erofs")),
    ];
    // The two records come in directory order.
    let mut got = summary.clone();
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "{found:#?}");
    assert!(found
        .iter()
        .all(|f| matches!(f.outcome, Outcome::Repairable(_))));
    let blob = found.iter().find(|f| f.what == "image blob").unwrap();
    assert!(blob.problem.contains("not to its name"), "{}", blob.problem);
    let disk = found.iter().find(|f| f.what == "guest disk").unwrap();
    assert!(
        disk.problem.starts_with("truncated: 100 bytes"),
        "{}",
        disk.problem
    );
    assert!(
        layer_a.exists() && record_c.exists(),
        "a check alone changes nothing"
    );

    let repaired = store.fsck(true).unwrap();
    assert_eq!(repaired.len(), found.len());
    assert!(
        repaired
            .iter()
            .all(|f| matches!(f.outcome, Outcome::Repaired(_))),
        "{repaired:#?}"
    );
    assert_eq!(store.fsck(false).unwrap(), vec![], "clean after the repair");
    // b keeps its name (rebuilt from its record) and gets a new disk; a and c are gone
    // and import again.
    let listed = store.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].digest, images[1].digest);
    assert_eq!(
        store.resolve(&names[1]).unwrap().unwrap().to_string(),
        images[1].digest
    );
    let b = store.get_or_fetch(&names[1]).unwrap();
    store.guest_disk(&b).unwrap();
    for name in [&names[0], &names[2]] {
        assert!(store.resolve(name).unwrap().is_none());
        store.get_or_fetch(name).unwrap();
    }
    store.wait_for_cleanup();
    assert_eq!(store.fsck(false).unwrap(), vec![]);
}

//! The store: imports, names, digests, caching of guest disks, concurrency, removal,
//! and images made by real tools (umoci, skopeo).

#![allow(clippy::unwrap_used)] // tests

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use gpucell_image::digest::Digest;
use gpucell_image::testing::{write_multi_platform, ImageBuilder, LayerBuilder};
use gpucell_image::{Error, Store};

fn simple(tag_content: &str) -> ImageBuilder {
    ImageBuilder::new()
        .layer(LayerBuilder::new().dir("bin", 0o755).file(
            "bin/hello",
            format!("hello {tag_content}\n"),
            0o755,
        ))
        .cmd(&["/bin/hello"])
}

/// Temporary entries in the store's tmp/ and unpack trees of this store in /dev/shm.
fn tmp_entries(store: &Store) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(store.root().join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    if let Ok(shm) = fs::read_dir("/dev/shm") {
        let prefix = store.unpack_prefix();
        v.extend(
            shm.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix)),
        );
    }
    v
}

#[test]
fn import_is_idempotent_and_names_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let written = simple("a").write_layout(&layout, "v1").unwrap();
    let store = Store::open(&dir.path().join("state")).unwrap();
    let name = format!("oci:{}:v1", layout.display());
    let a = store.get_or_fetch(&name).unwrap();
    assert_eq!(a.digest, written.manifest_digest.to_string());
    assert_eq!(a.config_digest, written.config_digest.to_string());
    assert_eq!(a.layers.len(), 1);
    assert_eq!(a.config.cmd, vec!["/bin/hello"]);
    let b = store.get_or_fetch(&name).unwrap();
    assert_eq!(a.digest, b.digest);
    // By digest, by unique hex prefix, by name.
    assert_eq!(store.get_or_fetch(&a.digest).unwrap().digest, a.digest);
    let hex = &a.digest["sha256:".len()..];
    assert_eq!(store.inspect(&hex[..12]).unwrap().digest, a.digest);
    assert_eq!(store.inspect(&name).unwrap().digest, a.digest);
    // Every stored blob hashes to its name.
    for (d, _) in store.blobs().list().unwrap() {
        let bytes = fs::read(store.blobs().path(&d)).unwrap();
        assert_eq!(Digest::of(&bytes), d);
    }
    let list = store.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].names, vec![name.clone()]);
    assert!(tmp_entries(&store).is_empty());
    // Unknown names are errors naming the reference.
    let err = store
        .inspect(&("sha256:".to_owned() + &"0".repeat(64)))
        .unwrap_err();
    assert!(err.to_string().contains(&"0".repeat(64)), "{err}");
}

#[test]
fn layout_change_moves_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    simple("a").write_layout(&layout, "v1").unwrap();
    let store = Store::open(&dir.path().join("state")).unwrap();
    let name = format!("oci:{}:v1", layout.display());
    let a = store.get_or_fetch(&name).unwrap();
    fs::remove_dir_all(&layout).unwrap();
    simple("b").write_layout(&layout, "v1").unwrap();
    let b = store.get_or_fetch(&name).unwrap();
    assert_ne!(a.digest, b.digest);
    assert_eq!(store.inspect(&name).unwrap().digest, b.digest);
    // a lost its only name: prune deletes it, b stays.
    let report = store.prune().unwrap();
    assert_eq!(report.images, vec![a.digest.clone()]);
    assert!(report.blobs >= 2);
    assert!(store.inspect(&a.digest).is_err());
    assert!(store.inspect(&b.digest).is_ok());
}

#[test]
fn guest_disk_is_cached_by_digest() {
    if !common::have("mkfs.erofs", "guest_disk_is_cached_by_digest") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    simple("a").write_layout(&layout, "v1").unwrap();
    let store = Store::open(&dir.path().join("state")).unwrap();
    let img = store
        .get_or_fetch(&format!("oci:{}:v1", layout.display()))
        .unwrap();
    let d1 = store.guest_disk(&img).unwrap();
    let m1 = fs::metadata(&d1.path).unwrap();
    // Make any rebuild visible: the blobs are gone, so a rebuild could not succeed.
    for (d, _) in store.blobs().list().unwrap() {
        store.blobs().remove(&d).unwrap();
    }
    let d2 = store.guest_disk(&img).unwrap();
    let m2 = fs::metadata(&d2.path).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(d1, d2);
    assert_eq!((m1.ino(), m1.mtime_nsec()), (m2.ino(), m2.mtime_nsec()));
    assert!(d1.path.starts_with(store.root()));
    assert!(d1
        .path
        .to_string_lossy()
        .contains(&img.digest["sha256:".len()..]));
    store.wait_for_cleanup();
    assert!(tmp_entries(&store).is_empty(), "unpack tree left behind");
}

#[test]
fn concurrent_fetch_and_build_of_one_image_is_safe() {
    if !common::have(
        "mkfs.erofs",
        "concurrent_fetch_and_build_of_one_image_is_safe",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let mut l = LayerBuilder::new();
    for i in 0..200 {
        l = l.file(format!("d/f{i}"), vec![i as u8; 4096], 0o644);
    }
    ImageBuilder::new()
        .layer(l)
        .write_layout(&layout, "v1")
        .unwrap();
    let state = dir.path().join("state");
    let name = Arc::new(format!("oci:{}:v1", layout.display()));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let state = state.clone();
            let name = Arc::clone(&name);
            std::thread::spawn(move || {
                // A store per thread, like separate processes sharing the state dir.
                let store = Store::open(&state).unwrap();
                let img = store.get_or_fetch(&name).unwrap();
                store.guest_disk(&img).unwrap()
            })
        })
        .collect();
    let disks: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(disks.windows(2).all(|w| w[0] == w[1]));
    let store = Store::open(&state).unwrap();
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(fs::read_dir(store.root().join("disks")).unwrap().count(), 1);
    assert!(tmp_entries(&store).is_empty());
}

#[test]
fn multi_platform_index_resolves_to_linux_amd64() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let images = [
        simple("arm").platform("linux", "arm64"),
        simple("amd").platform("linux", "amd64"),
        simple("win").platform("windows", "amd64"),
    ];
    let (_index, written) = write_multi_platform(&layout, "multi", &images).unwrap();
    let store = Store::open(&dir.path().join("state")).unwrap();
    let img = store
        .get_or_fetch(&format!("oci:{}:multi", layout.display()))
        .unwrap();
    assert_eq!(img.digest, written[1].manifest_digest.to_string());
    assert_eq!(img.config.architecture, "amd64");

    // An index with no linux/amd64 entry is refused, naming what it has.
    let layout2 = dir.path().join("layout2");
    write_multi_platform(&layout2, "arm", &[simple("x").platform("linux", "arm64")]).unwrap();
    let err = store
        .get_or_fetch(&format!("oci:{}:arm", layout2.display()))
        .unwrap_err();
    assert!(err.to_string().contains("linux/arm64"), "{err}");
}

#[test]
fn single_image_for_another_platform_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    simple("a")
        .platform("linux", "arm64")
        .write_layout(&layout, "v1")
        .unwrap();
    let store = Store::open(&dir.path().join("state")).unwrap();
    let err = store
        .get_or_fetch(&format!("oci:{}:v1", layout.display()))
        .unwrap_err();
    assert!(err.to_string().contains("linux/arm64"), "{err}");
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn tampered_blob_is_refused_and_nothing_becomes_visible() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let written = simple("a").write_layout(&layout, "v1").unwrap();
    let layer = layout
        .join("blobs/sha256")
        .join(written.layer_digests[0].hex());
    let mut bytes = fs::read(&layer).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&layer, &bytes).unwrap();
    let store = Store::open(&dir.path().join("state")).unwrap();
    let err = store
        .get_or_fetch(&format!("oci:{}:v1", layout.display()))
        .unwrap_err();
    assert!(matches!(err, Error::Blob(_)), "{err}");
    assert!(
        err.to_string().contains(written.layer_digests[0].hex()),
        "{err}"
    );
    assert!(!store.blobs().contains(&written.layer_digests[0]));
    assert!(store.list().unwrap().is_empty());
    assert!(tmp_entries(&store).is_empty(), "partial blob left in tmp");
}

#[test]
fn hostile_layer_fails_guest_disk_with_entry_named_and_no_leftovers() {
    if !common::have("mkfs.erofs", "hostile_layer_fails_guest_disk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    ImageBuilder::new()
        .layer(LayerBuilder::new().file("ok", b"1", 0o644))
        .layer(LayerBuilder::new().file("../../../../escape", b"x", 0o644))
        .write_layout(&layout, "v1")
        .unwrap();
    // Unpacking on disk (not in RAM) this time.
    let state = dir.path().join("state");
    let store = Store::open_with(
        &state,
        gpucell_image::StoreOptions {
            unpack_dir: Some(state.join("images/tmp")),
            ..Default::default()
        },
    )
    .unwrap();
    let img = store
        .get_or_fetch(&format!("oci:{}:v1", layout.display()))
        .unwrap();
    let err = store.guest_disk(&img).unwrap_err();
    assert!(err.to_string().contains("../../../../escape"), "{err}");
    assert!(fs::read_dir(store.root().join("disks"))
        .unwrap()
        .next()
        .is_none());
    store.wait_for_cleanup();
    assert!(tmp_entries(&store).is_empty());
}

#[test]
fn rm_untags_then_deletes_and_collects_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    simple("a").write_layout(&layout, "v1").unwrap();
    let store = Store::open(&dir.path().join("state")).unwrap();
    let name = format!("oci:{}:v1", layout.display());
    let img = store.get_or_fetch(&name).unwrap();
    assert_eq!(store.blobs().list().unwrap().len(), 3);
    let report = store.remove(&name).unwrap();
    assert_eq!(report.untagged, vec![name.clone()]);
    assert_eq!(report.deleted, vec![img.digest.clone()]);
    assert!(store.blobs().list().unwrap().is_empty());
    assert!(store.inspect(&name).is_err());
    assert!(store.remove(&name).is_err());
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An OCI layout at `d/layout`, tag `t`, made by umoci from a tree with a file and a
/// symlink, with an entrypoint, env and working directory.
fn umoci_layout(d: &Path) -> PathBuf {
    let layout = d.join("layout");
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout));
    run(Command::new("umoci")
        .args(["new", "--image"])
        .arg(format!("{}:t", layout.display())));
    let bundle = d.join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:t", layout.display()))
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    fs::create_dir_all(rootfs.join("etc")).unwrap();
    fs::write(rootfs.join("etc/hostname"), b"cell\n").unwrap();
    std::os::unix::fs::symlink("hostname", rootfs.join("etc/link")).unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image"])
        .arg(format!("{}:t", layout.display()))
        .arg(&bundle));
    run(Command::new("umoci")
        .args(["config", "--image"])
        .arg(format!("{}:t", layout.display()))
        .args([
            "--config.entrypoint",
            "/bin/sh",
            "--config.env",
            "X=1",
            "--config.workingdir",
            "/etc",
        ])
        .args(["--os", "linux", "--architecture", "amd64"]));
    layout
}

/// The layout converted by skopeo to an oci-archive and a docker-archive (tagged
/// `cell/test:t`), in that order.
fn skopeo_archives(d: &Path, layout: &Path) -> (PathBuf, PathBuf) {
    let oci_archive = d.join("img-oci.tar");
    let docker_archive = d.join("img-docker.tar");
    run(Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:t", layout.display()))
        .arg(format!("oci-archive:{}:t", oci_archive.display())));
    run(Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:t", layout.display()))
        .arg(format!(
            "docker-archive:{}:cell/test:t",
            docker_archive.display()
        )));
    (oci_archive, docker_archive)
}

/// An image made by umoci from a directory tree, converted by skopeo to both archive
/// formats; all three import to the same layers and give the same guest disk.
#[test]
fn images_made_by_umoci_and_skopeo() {
    let test = "images_made_by_umoci_and_skopeo";
    if !common::have("umoci", test)
        || !common::have("skopeo", test)
        || !common::have("mkfs.erofs", test)
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let layout = umoci_layout(d);
    let (oci_archive, docker_archive) = skopeo_archives(d, &layout);

    let store = Store::open(&d.join("state")).unwrap();
    let a = store
        .get_or_fetch(&format!("oci:{}:t", layout.display()))
        .unwrap();
    assert_eq!(a.config.entrypoint, vec!["/bin/sh"]);
    assert!(a.config.env.contains(&"X=1".to_string()));
    assert_eq!(a.config.working_dir, "/etc");
    let b = store
        .get_or_fetch(&format!("oci-archive:{}:t", oci_archive.display()))
        .unwrap();
    assert_eq!(a.digest, b.digest, "oci-archive holds the same manifest");
    let c = store
        .get_or_fetch(&format!("docker-archive:{}", docker_archive.display()))
        .unwrap();
    let diff_ids = |i: &gpucell_image::Image| {
        i.layers
            .iter()
            .map(|l| l.diff_id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        diff_ids(&a),
        diff_ids(&c),
        "docker-archive has the same layer contents"
    );
    assert_eq!(c.config.entrypoint, vec!["/bin/sh"]);
    // Importing the docker archive again finds the same (converted) manifest.
    let c2 = store
        .get_or_fetch(&format!(
            "docker-archive:{}:cell/test:t",
            docker_archive.display()
        ))
        .unwrap();
    assert_eq!(c.digest, c2.digest);

    let disk_a = store.guest_disk(&a).unwrap();
    let disk_c = store.guest_disk(&c).unwrap();
    for (i, disk) in [&disk_a, &disk_c].into_iter().enumerate() {
        let out = d.join(format!("x-{i}"));
        common::erofs_extract(&disk.path, &out);
        assert_eq!(fs::read(out.join("etc/hostname")).unwrap(), b"cell\n");
        assert_eq!(
            fs::read_link(out.join("etc/link")).unwrap(),
            Path::new("hostname")
        );
    }
}

#[test]
fn missing_blob_is_fetched_again_from_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let written = simple("a").write_layout(&layout, "v1").unwrap();
    let store = Store::open(&dir.path().join("state")).unwrap();
    let name = format!("oci:{}:v1", layout.display());
    store.get_or_fetch(&name).unwrap();
    store.blobs().remove(&written.layer_digests[0]).unwrap();
    store.get_or_fetch(&name).unwrap();
    assert!(store.blobs().contains(&written.layer_digests[0]));
}

//! The streamed first fetch from a registry (a real HTTP server on 127.0.0.1, as the
//! daemon's tests use): layers are unpacked while later ones download, the disk is the
//! same as the sequential path's, and a corrupt blob, a dropped connection or a failed
//! unpack leave no record, name, disk or temporary file behind.

#![allow(clippy::unwrap_used)] // tests

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::registry::{Fault, Gate, TestRegistry};
use gpucell_image::testing::{ImageBuilder, LayerBuilder, Written};
use gpucell_image::{PullEvent, Store, StoreOptions};

/// Deterministic bytes that do not compress (xorshift).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Four layers: a base, two of data (one overwrites and deletes what the base has),
/// and a top one.
fn image(layout: &Path) -> Written {
    ImageBuilder::new()
        .layer(
            LayerBuilder::new()
                .dir("bin", 0o755)
                .file("bin/tool", b"#!/bin/sh\ntrue\n", 0o755)
                .dir("etc", 0o755)
                .file("etc/gone", b"removed by layer 2", 0o644)
                .symlink("bin/sh", "tool"),
        )
        .layer(
            LayerBuilder::new()
                .dir("data", 0o755)
                .file("data/a", noise(1, 300_000), 0o644),
        )
        .layer(
            LayerBuilder::new()
                .file("data/a", noise(2, 200_000), 0o600)
                .whiteout("etc/gone")
                .hardlink("data/a-link", "data/a"),
        )
        .layer(
            LayerBuilder::new()
                .dir("top", 0o700)
                .file("top/b", noise(3, 100_000), 0o644),
        )
        .cmd(&["/bin/tool"])
        .write_layout(layout, "v1")
        .unwrap()
}

struct Setup {
    dir: tempfile::TempDir,
    written: Written,
    registry: TestRegistry,
}

fn setup(faults: impl FnOnce(&Written) -> HashMap<String, Fault>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let written = image(&layout);
    let registry = TestRegistry::start(layout, faults(&written));
    Setup {
        dir,
        written,
        registry,
    }
}

impl Setup {
    /// A store in `<tmp>/<name>` pulling over plain HTTP, unpacking under `<tmp>/<name>-unpack`,
    /// recording its events.
    fn store(&self, name: &str, stream: bool) -> (Store, Arc<Mutex<Vec<PullEvent>>>) {
        let unpack = self.unpack_dir(name);
        fs::create_dir_all(&unpack).unwrap();
        let mut options = StoreOptions {
            stream,
            unpack_dir: Some(unpack),
            ..StoreOptions::default()
        };
        options.registry.insecure = true;
        let mut store = Store::open_with(&self.dir.path().join(name), options).unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        store.on_event(move |e| sink.lock().unwrap().push(e.clone()));
        (store, events)
    }

    fn unpack_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}-unpack"))
    }

    fn digest(&self, layer: usize) -> String {
        self.written.layer_digests[layer].to_string()
    }
}

fn position(events: &[PullEvent], want: impl Fn(&PullEvent) -> bool) -> usize {
    events
        .iter()
        .position(want)
        .unwrap_or_else(|| panic!("event not seen in {events:#?}"))
}

fn unpacked(i: usize) -> impl Fn(&PullEvent) -> bool {
    move |e| matches!(e, PullEvent::LayerUnpacked { index, .. } if *index == i)
}

fn fetched(i: usize) -> impl Fn(&PullEvent) -> bool {
    move |e| matches!(e, PullEvent::LayerFetched { index, .. } if *index == i)
}

#[test]
fn first_layer_is_unpacked_while_the_last_one_downloads() {
    if !common::have(
        "mkfs.erofs",
        "first_layer_is_unpacked_while_the_last_one_downloads",
    ) {
        return;
    }
    // The registry holds the last layer's body until layer 0 is unpacked: only a
    // streamed import can get past it without the gate's timeout.
    let gate = Gate::new(Duration::from_secs(60));
    let s = setup(|w| HashMap::from([(w.layer_digests[3].to_string(), Fault::Gate(gate.clone()))]));
    let (mut store, events) = s.store("state", true);
    let opener = gate.clone();
    let sink = events.clone();
    store.on_event(move |e| {
        sink.lock().unwrap().push(e.clone());
        if unpacked(0)(e) {
            opener.open();
        }
    });
    let image = store.get_or_fetch(&s.registry.reference("v1")).unwrap();
    assert_eq!(image.digest, s.written.manifest_digest.to_string());
    let log = s.registry.log();
    assert!(
        !log.iter().any(|l| l.starts_with("gate timed out")),
        "{log:#?}"
    );
    let events = events.lock().unwrap().clone();
    assert!(
        position(&events, unpacked(0)) < position(&events, fetched(3)),
        "{events:#?}"
    );
    assert!(
        matches!(events.last(), Some(PullEvent::DiskWritten { .. })),
        "{events:#?}"
    );
    // The disk came with the image: guest_disk has nothing left to do.
    let digest = gpucell_image::digest::Digest::parse(&image.digest).unwrap();
    let cached = store
        .cached_disk(&digest)
        .expect("disk built while pulling");
    assert_eq!(store.guest_disk(&image).unwrap(), cached);
    assert_eq!(events.len(), 4 + 4 + 1, "{events:#?}");
}

#[test]
fn sequential_path_downloads_everything_first() {
    if !common::have("mkfs.erofs", "sequential_path_downloads_everything_first") {
        return;
    }
    // The same gate, opened by the same event, with a short timeout: the sequential
    // import cannot unpack layer 0 before the last download, so the gate times out.
    let gate = Gate::new(Duration::from_secs(1));
    let s = setup(|w| HashMap::from([(w.layer_digests[3].to_string(), Fault::Gate(gate.clone()))]));
    let (store, events) = s.store("state", false);
    let image = store.get_or_fetch(&s.registry.reference("v1")).unwrap();
    let digest = gpucell_image::digest::Digest::parse(&image.digest).unwrap();
    assert!(
        store.cached_disk(&digest).is_none(),
        "no disk before guest_disk"
    );
    store.guest_disk(&image).unwrap();
    let log = s.registry.log();
    assert!(
        log.iter().any(|l| l.starts_with("gate timed out")),
        "{log:#?}"
    );
    let events = events.lock().unwrap().clone();
    assert!(
        position(&events, fetched(3)) < position(&events, unpacked(0)),
        "{events:#?}"
    );
}

/// Every file of an extracted tree: path → (kind, mode, uid, gid, content or target).
fn tree(root: &Path) -> Vec<(String, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let what = if md.is_dir() {
                stack.push(p.clone());
                "dir".to_owned()
            } else if md.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&p).unwrap().display())
            } else {
                let d = gpucell_image::digest::Digest::of(&fs::read(&p).unwrap());
                format!("file {d} nlink={}", md.nlink())
            };
            out.push((
                rel,
                format!(
                    "{what} mode={:o} {}:{} mtime={}",
                    md.mode(),
                    md.uid(),
                    md.gid(),
                    md.mtime()
                ),
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn streamed_disk_matches_the_sequential_one() {
    if !common::have("mkfs.erofs", "streamed_disk_matches_the_sequential_one")
        || !common::have("fsck.erofs", "streamed_disk_matches_the_sequential_one")
    {
        return;
    }
    let s = setup(|_| HashMap::new());
    let reference = s.registry.reference("v1");
    let mut disks = Vec::new();
    for (name, stream) in [("streamed", true), ("sequential", false)] {
        let (store, _) = s.store(name, stream);
        let image = store.get_or_fetch(&reference).unwrap();
        let disk = store.guest_disk(&image).unwrap();
        disks.push(fs::read(&disk.path).unwrap());
        let out = s.dir.path().join(format!("{name}-extracted"));
        common::erofs_extract(&disk.path, &out);
    }
    let streamed = tree(&s.dir.path().join("streamed-extracted"));
    assert!(streamed.iter().any(|(p, _)| p == "top/b"), "{streamed:#?}");
    assert!(
        !streamed.iter().any(|(p, _)| p == "etc/gone"),
        "{streamed:#?}"
    );
    assert_eq!(streamed, tree(&s.dir.path().join("sequential-extracted")));
    // The images themselves differ only where mkfs.erofs puts the build time, UUID and
    // superblock checksum, and in the root directory's mtime (when its unpack root was
    // made): the root inode's i_mtime and i_mtime_nsec, bytes 32..44 of the inode.
    assert_eq!(disks[0].len(), disks[1].len());
    let sb = &disks[0][1024..1024 + 128];
    let meta_blkaddr = u32::from_le_bytes(sb[0x28..0x2c].try_into().unwrap()) as usize;
    let root_nid = u16::from_le_bytes(sb[0x0e..0x10].try_into().unwrap()) as usize;
    let root_inode = (meta_blkaddr << sb[0x0c]) + root_nid * 32;
    let expected = |i: usize| {
        (1024..1024 + 128).contains(&i) || (root_inode + 32..root_inode + 44).contains(&i)
    };
    let outside: Vec<usize> = (0..disks[0].len())
        .filter(|&i| disks[0][i] != disks[1][i] && !expected(i))
        .collect();
    assert!(
        outside.is_empty(),
        "bytes outside the superblock differ: {outside:?}"
    );
}

/// Nothing of a failed import is left: no record, name or disk, an empty tmp/ and
/// unpack directory.
fn assert_nothing_left(s: &Setup, store: &Store, name: &str) {
    store.wait_for_cleanup();
    assert!(store.list().unwrap().is_empty(), "a record was written");
    let entries = |p: PathBuf| -> Vec<String> {
        fs::read_dir(&p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(entries(store.root().join("disks")), Vec::<String>::new());
    assert_eq!(entries(store.root().join("images")), Vec::<String>::new());
    assert_eq!(entries(store.root().join("tmp")), Vec::<String>::new());
    assert_eq!(entries(s.unpack_dir(name)), Vec::<String>::new());
    let refs = fs::read_to_string(store.root().join("refs.json")).unwrap_or_default();
    assert!(!refs.contains("test/image"), "{refs}");
}

#[test]
fn corrupt_layer_stops_the_pipeline_and_leaves_nothing() {
    let s = setup(|w| HashMap::from([(w.layer_digests[1].to_string(), Fault::Corrupt)]));
    let (store, events) = s.store("state", true);
    let err = store.get_or_fetch(&s.registry.reference("v1")).unwrap_err();
    let chain = gpucell_common::error::chain_string(&err);
    assert!(
        chain.contains(&s.digest(1)) || chain.contains("digest"),
        "{chain}"
    );
    assert_nothing_left(&s, &store, "state");
    // Layer 1's bytes never reached the tree, and nothing after it was asked for.
    let events = events.lock().unwrap().clone();
    assert!(!events.iter().any(unpacked(1)), "{events:#?}");
    let log = s.registry.log();
    assert!(!log.iter().any(|l| l.contains(&s.digest(2))), "{log:#?}");
    assert!(!store.blobs().contains(&s.written.layer_digests[1]));
}

#[test]
fn dropped_connection_leaves_nothing() {
    let s = setup(|w| HashMap::from([(w.layer_digests[3].to_string(), Fault::DropHalf)]));
    let (store, events) = s.store("state", true);
    let err = store.get_or_fetch(&s.registry.reference("v1")).unwrap_err();
    let chain = gpucell_common::error::chain_string(&err);
    assert!(chain.contains("downloading a layer"), "{chain}");
    assert_nothing_left(&s, &store, "state");
    assert!(!events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, PullEvent::DiskWritten { .. })));
    // The same store pulls the image once the registry behaves.
    drop(store);
    let good = TestRegistry::start(s.dir.path().join("layout"), HashMap::new());
    let (store, _) = s.store("state", true);
    let image = store.get_or_fetch(&good.reference("v1")).unwrap();
    assert!(store
        .cached_disk(&gpucell_image::digest::Digest::parse(&image.digest).unwrap())
        .is_some());
}

#[test]
fn failed_unpack_stops_the_downloads_and_leaves_nothing() {
    let s = setup(|_| HashMap::new());
    let mut options = StoreOptions {
        unpack_dir: Some(s.unpack_dir("state")),
        ..StoreOptions::default()
    };
    fs::create_dir_all(s.unpack_dir("state")).unwrap();
    options.registry.insecure = true;
    options.limits.max_entries = 3; // layer 0 has 5 entries
    let store = Store::open_with(&s.dir.path().join("state"), options).unwrap();
    let err = store.get_or_fetch(&s.registry.reference("v1")).unwrap_err();
    let chain = gpucell_common::error::chain_string(&err);
    assert!(!chain.contains("stopped before its last layer"), "{chain}");
    assert!(chain.contains("entries"), "{chain}");
    assert_nothing_left(&s, &store, "state");
}

#[test]
fn full_disk_during_unpack_leaves_nothing() {
    if !common::is_root() {
        eprintln!("skipping full_disk_during_unpack_leaves_nothing: needs root (a tmpfs in a mount namespace of its own)");
        return;
    }
    let s = setup(|_| HashMap::new());
    // A thread of its own: unshare(CLONE_NEWNS) applies to it and to the threads it
    // starts (the store's unpack thread), not to the rest of the test binary.
    let worker = std::thread::spawn(move || {
        use nix::mount::{mount, MsFlags};
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .unwrap();
        let unpack = s.unpack_dir("state");
        fs::create_dir_all(&unpack).unwrap();
        // Room for layer 0, not for layer 1's 300 kB file.
        mount(
            Some("tmpfs"),
            &unpack,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=200k"),
        )
        .unwrap();
        let (store, events) = s.store("state", true);
        let err = store.get_or_fetch(&s.registry.reference("v1")).unwrap_err();
        let chain = gpucell_common::error::chain_string(&err);
        assert!(chain.contains("No space left"), "{chain}");
        assert_nothing_left(&s, &store, "state");
        let events = events.lock().unwrap().clone();
        assert!(events.iter().any(unpacked(0)), "{events:#?}");
        assert!(!events.iter().any(unpacked(1)), "{events:#?}");
    });
    worker.join().unwrap();
}

#[test]
fn hashed_download_with_the_wrong_digest_is_refused_and_removed() {
    use gpucell_image::blobs::BlobError;
    use gpucell_image::digest::Digest;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let blobs = store.blobs();
    let write = |bytes: &[u8]| {
        let mut f = blobs.temp_file().unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        f.into_temp_path()
    };
    let claimed = Digest::of(b"what the manifest names");
    let tmp = write(b"what the registry sent");
    let path = tmp.to_path_buf();
    let err = blobs
        .insert_hashed_file(&claimed, tmp, Digest::of(b"what the registry sent"), 22, 22)
        .unwrap_err();
    assert!(matches!(err, BlobError::Mismatch { .. }), "{err}");
    assert!(!path.exists() && !blobs.contains(&claimed));
    let tmp = write(b"what the manifest names");
    let err = blobs
        .insert_hashed_file(&claimed, tmp, claimed.clone(), 23, 24)
        .unwrap_err();
    assert!(matches!(err, BlobError::SizeMismatch { .. }), "{err}");
    assert!(!blobs.contains(&claimed));
    let tmp = write(b"what the manifest names");
    blobs
        .insert_hashed_file(&claimed, tmp, claimed.clone(), 23, 23)
        .unwrap();
    assert_eq!(
        fs::read(blobs.path(&claimed)).unwrap(),
        b"what the manifest names"
    );
    assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
}

//! Each hostile layer is refused with an error naming the entry (or, for device nodes,
//! dropped), and nothing is written outside the unpack root.

#![allow(clippy::unwrap_used)] // tests

use std::fs;
use std::path::{Path, PathBuf};

use gpucell_image::digest::Digest;
use gpucell_image::manifest::Compression;
use gpucell_image::testing::{compress, header, Kind, LayerBuilder};
use gpucell_image::unpack::{Limits, UnpackError, Unpacker};

struct Sandbox {
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

/// An unpack root with a sibling directory holding a sentinel file.
fn sandbox() -> Sandbox {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("sentinel"), b"untouched").unwrap();
    Sandbox {
        _dir: dir,
        root,
        outside,
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

impl Sandbox {
    fn assert_outside_untouched(&self) {
        assert_eq!(listing(&self.outside), vec!["sentinel".to_string()]);
        assert_eq!(
            fs::read(self.outside.join("sentinel")).unwrap(),
            b"untouched"
        );
        assert_eq!(
            listing(self.root.parent().unwrap()),
            vec!["outside".to_string(), "root".to_string()]
        );
    }
}

fn apply(u: &mut Unpacker, tar: &[u8]) -> Result<(), UnpackError> {
    u.apply_layer("sha256:test", tar, Compression::None, &Digest::of(tar))
}

fn unpack(sb: &Sandbox, layers: &[Vec<u8>]) -> Result<(), UnpackError> {
    let mut u = Unpacker::new(&sb.root, Limits::default())?;
    for l in layers {
        apply(&mut u, l)?;
    }
    u.finish()
}

fn assert_unsafe(result: Result<(), UnpackError>, entry: &str) {
    match result {
        Err(UnpackError::Unsafe {
            entry: e,
            ref reason,
            ..
        }) => {
            assert_eq!(e, entry, "error names another entry ({reason})");
        }
        other => panic!("expected entry {entry} to be refused, got {other:?}"),
    }
}

#[test]
fn dotdot_component_is_refused() {
    let sb = sandbox();
    let tar = LayerBuilder::new()
        .file("../outside/evil", b"x", 0o644)
        .tar();
    assert_unsafe(unpack(&sb, &[tar]), "../outside/evil");
    let tar = LayerBuilder::new()
        .dir("a", 0o755)
        .file("a/../../outside/evil2", b"x", 0o644)
        .tar();
    assert_unsafe(unpack(&sb, &[tar]), "a/../../outside/evil2");
    sb.assert_outside_untouched();
}

#[test]
fn absolute_path_is_refused() {
    let sb = sandbox();
    let evil = format!("{}/evil", sb.outside.display());
    let tar = LayerBuilder::new().file(&evil, b"x", 0o644).tar();
    assert_unsafe(unpack(&sb, &[tar]), &evil);
    sb.assert_outside_untouched();
}

#[test]
fn writing_through_symlink_in_same_layer_is_refused() {
    let sb = sandbox();
    let tar = LayerBuilder::new()
        .symlink("escape", sb.outside.to_str().unwrap())
        .file("escape/evil", b"x", 0o644)
        .tar();
    assert_unsafe(unpack(&sb, &[tar]), "escape/evil");
    sb.assert_outside_untouched();
}

#[test]
fn writing_through_symlink_planted_by_earlier_layer_is_refused() {
    let sb = sandbox();
    let l1 = LayerBuilder::new().symlink("etc", "../outside").tar();
    let l2 = LayerBuilder::new().file("etc/passwd", b"x", 0o644).tar();
    assert_unsafe(unpack(&sb, &[l1.clone(), l2]), "etc/passwd");
    sb.assert_outside_untouched();
    // A relative symlink chain planted in a lower layer, used as a directory later.
    let sb = sandbox();
    let l1 = LayerBuilder::new()
        .dir("a", 0o755)
        .symlink("a/up", "../..")
        .tar();
    let l2 = LayerBuilder::new()
        .file("a/up/outside/evil", b"x", 0o644)
        .tar();
    assert_unsafe(unpack(&sb, &[l1, l2]), "a/up/outside/evil");
    sb.assert_outside_untouched();
}

#[test]
fn replacing_a_symlink_with_a_file_does_not_follow_it() {
    // A later layer writing a regular file *at* a symlink's path replaces the link; it
    // must never write through it.
    let sb = sandbox();
    let target = sb.outside.join("sentinel");
    let l1 = LayerBuilder::new()
        .symlink("f", target.to_str().unwrap())
        .tar();
    let l2 = LayerBuilder::new().file("f", b"new", 0o644).tar();
    unpack(&sb, &[l1, l2]).unwrap();
    assert_eq!(fs::read(sb.root.join("f")).unwrap(), b"new");
    assert!(!fs::symlink_metadata(sb.root.join("f"))
        .unwrap()
        .is_symlink());
    sb.assert_outside_untouched();
}

#[test]
fn hard_link_to_outside_is_refused() {
    let sb = sandbox();
    let tar = LayerBuilder::new()
        .hardlink("stolen", "../outside/sentinel")
        .tar();
    assert_unsafe(unpack(&sb, &[tar]), "stolen");
    let abs = sb.outside.join("sentinel");
    let tar = LayerBuilder::new()
        .hardlink("stolen2", abs.to_str().unwrap())
        .tar();
    assert_unsafe(unpack(&sb, &[tar]), "stolen2");
    // Through a symlink to outside.
    let tar = LayerBuilder::new()
        .symlink("out", sb.outside.to_str().unwrap())
        .hardlink("stolen3", "out/sentinel")
        .tar();
    assert_unsafe(unpack(&sb, &[tar]), "stolen3");
    assert!(!sb.root.join("stolen").exists() && !sb.root.join("stolen3").exists());
    assert_eq!(
        fs::metadata(sb.outside.join("sentinel"))
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.nlink()
            })
            .unwrap(),
        1
    );
    sb.assert_outside_untouched();
}

#[test]
fn device_nodes_are_dropped() {
    let sb = sandbox();
    let tar = LayerBuilder::new()
        .dir("dev", 0o755)
        .entry("dev/sda", Kind::BlockDevice(8, 0), 0o660)
        .entry("dev/mem", Kind::CharDevice(1, 1), 0o640)
        .file("dev/keep", b"ok", 0o644)
        .tar();
    let mut u = Unpacker::new(&sb.root, Limits::default()).unwrap();
    apply(&mut u, &tar).unwrap();
    assert_eq!(u.dropped_devices, 2);
    u.finish().unwrap();
    assert_eq!(listing(&sb.root.join("dev")), vec!["keep".to_string()]);
    sb.assert_outside_untouched();
}

#[test]
fn truncated_archive_is_refused() {
    let sb = sandbox();
    let tar = LayerBuilder::new()
        .file("big", vec![7u8; 10_000], 0o644)
        .tar();
    // Cut inside the file's data.
    let cut = &tar[..512 + 3000];
    let mut u = Unpacker::new(&sb.root, Limits::default()).unwrap();
    let err = u
        .apply_layer("sha256:cut", cut, Compression::None, &Digest::of(cut))
        .unwrap_err();
    let msg = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(msg.contains("big") || msg.contains("truncated"), "{msg}");
    // Cut inside a header.
    let cut = &tar[..100];
    let mut u = Unpacker::new(&sb.root, Limits::default()).unwrap();
    assert!(matches!(
        u.apply_layer("sha256:cut", cut, Compression::None, &Digest::of(cut)),
        Err(UnpackError::Tar { .. })
    ));
    // Cut inside the gzip stream.
    let gz = compress(&tar, Compression::Gzip);
    let cut = &gz[..gz.len() / 2];
    let mut u = Unpacker::new(&sb.root, Limits::default()).unwrap();
    assert!(u
        .apply_layer("sha256:cut", cut, Compression::Gzip, &Digest::of(&tar))
        .is_err());
    sb.assert_outside_untouched();
}

#[test]
fn decompression_bomb_is_capped() {
    let sb = sandbox();
    // 64 MiB of zeros compress to ~64 KiB.
    let tar = LayerBuilder::new()
        .file("zeros", vec![0u8; 64 << 20], 0o644)
        .tar();
    let gz = compress(&tar, Compression::Gzip);
    assert!(gz.len() < 1 << 20);
    let limits = Limits {
        max_bytes: 8 << 20,
        max_entries: 1000,
    };
    let mut u = Unpacker::new(&sb.root, limits).unwrap();
    let err = u
        .apply_layer("sha256:bomb", &gz[..], Compression::Gzip, &Digest::of(&tar))
        .unwrap_err();
    assert!(
        matches!(err, UnpackError::TooLarge { limit, .. } if limit == 8 << 20),
        "{err}"
    );
    let written = fs::metadata(sb.root.join("zeros")).map_or(0, |m| m.len());
    assert!(written <= 8 << 20, "wrote {written} bytes past the cap");
    sb.assert_outside_untouched();
}

#[test]
fn too_many_entries_is_refused() {
    let sb = sandbox();
    let mut l = LayerBuilder::new();
    for i in 0..50 {
        l = l.file(format!("f{i}"), b"", 0o644);
    }
    let tar = l.tar();
    let limits = Limits {
        max_bytes: 1 << 30,
        max_entries: 10,
    };
    let mut u = Unpacker::new(&sb.root, limits).unwrap();
    assert!(matches!(
        apply(&mut u, &tar),
        Err(UnpackError::TooManyEntries { limit: 10, .. })
    ));
}

#[test]
fn diff_id_mismatch_is_refused() {
    let sb = sandbox();
    let tar = LayerBuilder::new().file("a", b"x", 0o644).tar();
    let mut u = Unpacker::new(&sb.root, Limits::default()).unwrap();
    let wrong = Digest::of(b"something else");
    match u.apply_layer("sha256:l", &tar[..], Compression::None, &wrong) {
        Err(UnpackError::DiffId {
            expected, actual, ..
        }) => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, Digest::of(&tar));
        }
        other => panic!("expected a diff_id mismatch, got {other:?}"),
    }
}

#[test]
fn oversized_pax_header_is_refused() {
    let sb = sandbox();
    let mut tar = header(b"pax", b'x', 8 << 20, b"", None).to_vec();
    tar.extend(vec![b'a'; 8 << 20]);
    tar.extend([0u8; 1024]);
    let mut u = Unpacker::new(&sb.root, Limits::default()).unwrap();
    let err = apply(&mut u, &tar).unwrap_err();
    assert!(
        matches!(&err, UnpackError::Tar { source, .. } if source.to_string().contains("PAX")),
        "{err}"
    );
}

#[test]
fn corrupt_header_checksum_is_refused() {
    let sb = sandbox();
    let mut tar = LayerBuilder::new().file("a", b"x", 0o644).tar();
    tar[10] ^= 0x55; // inside the name, covered by the checksum
    let mut u = Unpacker::new(&sb.root, Limits::default()).unwrap();
    assert!(matches!(apply(&mut u, &tar), Err(UnpackError::Tar { .. })));
    assert!(listing(&sb.root).is_empty());
}

#[test]
fn whiteout_cannot_escape() {
    let sb = sandbox();
    let tar = LayerBuilder::new()
        .file("../outside/.wh.sentinel", b"", 0o644)
        .tar();
    assert_unsafe(unpack(&sb, &[tar]), "../outside/.wh.sentinel");
    let l1 = LayerBuilder::new()
        .symlink("o", sb.outside.to_str().unwrap())
        .tar();
    let l2 = LayerBuilder::new().file("o/.wh.sentinel", b"", 0o644).tar();
    assert_unsafe(unpack(&sb, &[l1, l2]), "o/.wh.sentinel");
    let l1 = LayerBuilder::new()
        .symlink("o", sb.outside.to_str().unwrap())
        .tar();
    let l2 = LayerBuilder::new().opaque("o").tar();
    assert_unsafe(unpack(&sb, &[l1, l2]), "o/.wh..wh..opq");
    sb.assert_outside_untouched();
}

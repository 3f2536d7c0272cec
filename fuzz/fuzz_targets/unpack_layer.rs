//! The layer unpacker: a hostile layer (plain, gzip or zstd, told apart by its first
//! bytes) applied to a fresh root must fail cleanly or stay inside that root.
#![no_main]

use gpucell_image::digest::Digest;
use gpucell_image::manifest::Compression;
use gpucell_image::unpack::{Limits, Unpacker};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(scratch) = tempfile::Builder::new()
        .prefix("gpucell-fuzz-")
        .tempdir_in(scratch_dir())
    else {
        return;
    };
    let root = scratch.path().join("root");
    if std::fs::create_dir(&root).is_err() {
        return;
    }
    let limits = Limits {
        max_bytes: 4 << 20,
        max_entries: 1000,
    };
    let Ok(mut unpacker) = Unpacker::new(&root, limits) else {
        return;
    };
    let diff_id = Digest::of(data);
    let _ = unpacker.apply_layer("fuzz", data, Compression::sniff(data), &diff_id);
    // Nothing may appear beside the root.
    let beside: Vec<_> = std::fs::read_dir(scratch.path())
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(
        beside,
        vec![std::ffi::OsString::from("root")],
        "unpack escaped its root"
    );
});

fn scratch_dir() -> std::path::PathBuf {
    match std::env::var_os("FUZZ_SCRATCH") {
        Some(d) => d.into(),
        None => std::env::temp_dir(),
    }
}

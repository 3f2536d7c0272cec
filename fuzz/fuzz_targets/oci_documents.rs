//! OCI index, manifest and config parsing: `MANIFEST \0 CONFIG`; the manifest part is
//! parsed as a top-level document (index or manifest), the config part as a config, and
//! when both parse the layers are bound to the config's diff_ids.
#![no_main]

use gpucell_image::digest::Digest;
use gpucell_image::manifest::{
    config_digest, layers_of, parse_config, parse_document, runtime_config, select_platform,
    Document,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (doc, config) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, data),
    };
    let doc_digest = Digest::of(doc);
    let config_id = Digest::of(config);
    let parsed_config = parse_config(&config_id, config).ok();
    if let Some(c) = &parsed_config {
        let _ = runtime_config(c);
    }
    match parse_document(&doc_digest, doc) {
        Ok(Document::Index(index)) => {
            let _ = select_platform(&doc_digest, &index);
        }
        Ok(Document::Manifest(manifest)) => {
            let _ = config_digest(&doc_digest, &manifest);
            if let Some(c) = &parsed_config {
                let _ = layers_of(&doc_digest, &manifest, &config_id, c);
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});

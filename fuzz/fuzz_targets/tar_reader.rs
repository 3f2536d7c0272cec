//! The streaming tar reader under the unpacker: headers, PAX and GNU extensions, data.
#![no_main]

use std::io::Read;

use gpucell_image::tarstream::TarReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut tar = TarReader::new(data);
    let mut buf = [0u8; 4096];
    // Each entry consumes at least one 512-byte header: this bounds the loop.
    for _ in 0..=data.len() / 512 {
        match tar.next_entry() {
            Ok(Some(entry)) => {
                let _ = entry.display_path();
                let mut rest = entry.size;
                let mut body = tar.data();
                while rest > 0 {
                    match body.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => rest = rest.saturating_sub(n as u64),
                    }
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
});

//! Image reference parsing. A registry reference's canonical form parses back to itself.
#![no_main]

use gpucell_image::reference::Reference;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match Reference::parse(s) {
        Ok(r @ Reference::Registry(_)) | Ok(r @ Reference::Digest(_)) => {
            let canonical = r.canonical();
            let again = Reference::parse(&canonical)
                .unwrap_or_else(|e| panic!("canonical {canonical:?} of {s:?} does not parse: {e}"));
            assert_eq!(
                again, r,
                "canonical {canonical:?} of {s:?} parses to another reference"
            );
        }
        Ok(r) => {
            let _ = r.canonical();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});

//! The agent side of the channel: every frame the agent can be sent.
#![no_main]

use gpucell_protocol::{FrameError, FrameReader, FrameWriter, FromHost};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut frames = FrameReader::new(data);
    loop {
        match frames.read_frame() {
            Ok(raw) => {
                let (kind, len) = (raw.kind, raw.payload.len());
                assert!(len <= kind.payload_limit());
                if let Ok(msg) = FromHost::decode(raw) {
                    // Encoding what was decoded must not panic (it may exceed a limit
                    // once defaulted fields are written out: that is an error, not a bug).
                    let mut out = Vec::new();
                    let _ = msg.send(&mut FrameWriter::new(&mut out));
                }
            }
            Err(FrameError::Closed) => break,
            Err(_) => break,
        }
    }
});

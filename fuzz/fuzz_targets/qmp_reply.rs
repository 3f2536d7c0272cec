//! QMP replies as QEMU (or anything holding its socket) may send them: the greeting,
//! command replies and events, read through a real socket.
#![no_main]

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use gpucell_sandbox::qmp::Qmp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((ours, mut theirs)) = UnixStream::pair() else {
        return;
    };
    // The socket buffer holds the whole input for inputs this small; the peer then shuts
    // its sending side, so every read ends (no timeout is waited for) while our commands
    // can still be written.
    if data.len() > 64 * 1024 || theirs.write_all(data).is_err() {
        return;
    }
    if theirs.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let Ok(mut qmp) = Qmp::from_stream(ours, Duration::from_secs(5)) else {
        return;
    };
    let _ = qmp.status();
    let _ = qmp.execute("query-pci", None);
    let _ = qmp.wait_event("SHUTDOWN", Instant::now() + Duration::from_millis(1));
    drop(theirs);
});

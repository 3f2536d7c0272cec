//! Bounded capture of what QEMU writes: the guest's serial console and QEMU's own
//! stderr. The guest may write without end; only the last `cap` bytes are kept, and a
//! reader thread always drains the pipe so QEMU never blocks on it.

use std::io::Read;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Keeps the last `cap` bytes written and remembers whether a marker was ever seen.
#[derive(Debug)]
struct Tail {
    buf: Vec<u8>,
    cap: usize,
    total: u64,
    marker: Option<Vec<u8>>,
    marker_seen: bool,
    closed: bool,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        let before = self.buf.len();
        self.buf.extend_from_slice(chunk);
        self.total += chunk.len() as u64;
        if let Some(m) = &self.marker {
            if !self.marker_seen {
                // Search the new bytes plus enough old ones to catch a split marker.
                let from = before.saturating_sub(m.len());
                self.marker_seen = self.buf[from..].windows(m.len()).any(|w| w == &m[..]);
            }
        }
        if self.buf.len() > self.cap {
            let excess = self.buf.len() - self.cap;
            self.buf.drain(..excess);
        }
    }
}

/// A bounded, thread-drained capture of one byte stream.
#[derive(Debug, Clone)]
pub struct Capture {
    inner: Arc<(Mutex<Tail>, Condvar)>,
}

impl Capture {
    /// Starts draining `src` on a thread, keeping the last `cap` bytes. When `marker`
    /// is given, [`Capture::wait_for_marker`] can wait for it to appear.
    pub fn spawn<R: Read + Send + 'static>(
        name: &str,
        mut src: R,
        cap: usize,
        marker: Option<&[u8]>,
    ) -> (Capture, Option<JoinHandle<()>>) {
        let cap = cap.max(1).max(marker.map_or(0, <[u8]>::len));
        let cap_init = Capture {
            inner: Arc::new((
                Mutex::new(Tail {
                    buf: Vec::new(),
                    cap,
                    total: 0,
                    marker: marker.filter(|m| !m.is_empty()).map(<[u8]>::to_vec),
                    marker_seen: false,
                    closed: false,
                }),
                Condvar::new(),
            )),
        };
        let cap2 = cap_init.clone();
        let label = name.to_string();
        let handle = std::thread::Builder::new()
            .name(format!("capture-{name}"))
            .spawn(move || {
                let mut chunk = vec![0u8; 16 * 1024];
                loop {
                    match src.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => {
                            tracing::trace!(
                                stream = %label,
                                "{}",
                                String::from_utf8_lossy(&chunk[..n]).trim_end()
                            );
                            cap2.with(|t| t.push(&chunk[..n]));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
                cap2.with(|t| t.closed = true);
            })
            .ok();
        (cap_init, handle)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Tail) -> T) -> T {
        let (lock, cv) = &*self.inner;
        let mut guard = match lock.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let out = f(&mut guard);
        cv.notify_all();
        out
    }

    /// The bytes kept (at most the cap), lossily decoded.
    pub fn tail(&self) -> String {
        self.with(|t| String::from_utf8_lossy(&t.buf).into_owned())
    }

    /// The last `lines` lines kept.
    pub fn tail_lines(&self, lines: usize) -> String {
        let text = self.tail();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// How many bytes went through in total (kept or not).
    pub fn total_bytes(&self) -> u64 {
        self.with(|t| t.total)
    }

    pub fn marker_seen(&self) -> bool {
        self.with(|t| t.marker_seen)
    }

    /// Waits until the stream closed (true: everything it carried is kept) or
    /// `deadline` passed (false).
    pub fn wait_closed(&self, deadline: Instant) -> bool {
        let (lock, cv) = &*self.inner;
        let mut guard = match lock.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        while !guard.closed {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = match cv.wait_timeout(guard, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }

    /// Waits until the marker was seen (true), the stream closed or `deadline` passed
    /// (false).
    pub fn wait_for_marker(&self, deadline: Instant) -> bool {
        let (lock, cv) = &*self.inner;
        let mut guard = match lock.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        loop {
            if guard.marker_seen {
                return true;
            }
            if guard.closed {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = match cv.wait_timeout(guard, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn keeps_only_the_tail_and_counts_everything() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (cap, h) = Capture::spawn("t", std::io::Cursor::new(data.clone()), 1000, None);
        h.unwrap().join().unwrap();
        assert_eq!(cap.total_bytes(), 100_000);
        let kept = cap.with(|t| t.buf.clone());
        assert_eq!(kept, data[data.len() - 1000..]);
    }

    #[test]
    fn finds_a_marker_split_across_reads_and_trimmed_buffer() {
        struct Chunks(Vec<Vec<u8>>);
        impl Read for Chunks {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0.is_empty() {
                    return Ok(0);
                }
                let c = self.0.remove(0);
                buf[..c.len()].copy_from_slice(&c);
                Ok(c.len())
            }
        }
        let src = Chunks(vec![
            vec![b'x'; 50],
            b"...gpucell-pro".to_vec(),
            b"be-ok\n".to_vec(),
        ]);
        let (cap, _h) = Capture::spawn("t", src, 8, Some(b"gpucell-probe-ok"));
        assert!(cap.wait_for_marker(Instant::now() + Duration::from_secs(5)));
        let (cap, _h) = Capture::spawn(
            "t",
            std::io::Cursor::new(b"nothing".to_vec()),
            8,
            Some(b"ok!"),
        );
        assert!(!cap.wait_for_marker(Instant::now() + Duration::from_secs(5)));
    }

    #[test]
    fn waits_for_the_stream_to_close() {
        use std::io::Write;
        let (mut w, r) = std::os::unix::net::UnixStream::pair().unwrap();
        let (cap, _h) = Capture::spawn("t", r, 64, None);
        w.write_all(b"last words\n").unwrap();
        let start = Instant::now();
        assert!(!cap.wait_closed(Instant::now() + Duration::from_millis(100)));
        assert!(start.elapsed() >= Duration::from_millis(100));
        drop(w);
        assert!(cap.wait_closed(Instant::now() + Duration::from_secs(5)));
        assert_eq!(cap.tail(), "last words\n");
    }
}

//! A registry for tests: a real HTTP/1.1 server on 127.0.0.1 (a port of its own)
//! answering the pull side of the OCI distribution API (`/v2/`, manifests by tag or
//! digest, blobs) from an OCI layout directory, with faults per blob: corrupt bytes, a
//! connection dropped half-way, or a gate that holds a blob until the test opens it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Held closed until [`Gate::open`]; a server waiting on it gives up after `timeout`
/// and records that it did.
#[derive(Clone)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>, Duration);

impl Gate {
    pub fn new(timeout: Duration) -> Gate {
        Gate(Arc::new((Mutex::new(false), Condvar::new())), timeout)
    }

    pub fn open(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }

    /// True when opened within the gate's timeout.
    fn wait(&self) -> bool {
        let timeout = self.1;
        let guard = self.0 .0.lock().unwrap();
        let (guard, _) = self
            .0
             .1
            .wait_timeout_while(guard, timeout, |open| !*open)
            .unwrap();
        *guard
    }
}

/// What the server does with one blob.
#[derive(Clone)]
pub enum Fault {
    /// One byte of the body flipped (same length).
    Corrupt,
    /// Headers announce the full length; half the body is sent, then the connection closed.
    DropHalf,
    /// Sends the headers, then waits for the gate before the body.
    Gate(Gate),
}

pub struct TestRegistry {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// One line per event: `GET <path>`, `gate timed out <digest>`.
    pub log: Arc<Mutex<Vec<String>>>,
}

struct Shared {
    layout: PathBuf,
    faults: HashMap<String, Fault>,
    log: Arc<Mutex<Vec<String>>>,
}

impl TestRegistry {
    /// Serves `layout` (an OCI layout; tags from its index.json annotations).
    /// `faults` maps `sha256:<hex>` to what to do with that blob.
    pub fn start(layout: PathBuf, faults: HashMap<String, Fault>) -> TestRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::new(Shared {
            layout,
            faults,
            log: log.clone(),
        });
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &shared);
                });
            }
        });
        TestRegistry {
            addr,
            stop,
            thread: Some(thread),
            log,
        }
    }

    /// `127.0.0.1:PORT/test/image:TAG`.
    pub fn reference(&self, tag: &str) -> String {
        format!("{}/test/image:{tag}", self.addr)
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    shared.log.lock().unwrap().push(format!("{method} {path}"));
    let mut out = conn;
    if path == "/v2/" {
        return respond(&mut out, "200 OK", "application/json", b"{}", &method);
    }
    let rest = path.strip_prefix("/v2/test/image/").unwrap_or("");
    if let Some(r) = rest.strip_prefix("manifests/") {
        let Some((bytes, media_type)) = manifest(shared, r) else {
            return respond(
                &mut out,
                "404 Not Found",
                "application/json",
                b"{}",
                &method,
            );
        };
        return respond(&mut out, "200 OK", &media_type, &bytes, &method);
    }
    if let Some(d) = rest.strip_prefix("blobs/") {
        let Some(bytes) = blob(shared, d) else {
            return respond(
                &mut out,
                "404 Not Found",
                "application/json",
                b"{}",
                &method,
            );
        };
        return send_blob(&mut out, shared, d, bytes);
    }
    respond(
        &mut out,
        "404 Not Found",
        "application/json",
        b"{}",
        &method,
    )
}

fn blob(shared: &Shared, digest: &str) -> Option<Vec<u8>> {
    let hex = digest.strip_prefix("sha256:")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    std::fs::read(shared.layout.join("blobs/sha256").join(hex)).ok()
}

fn manifest(shared: &Shared, r: &str) -> Option<(Vec<u8>, String)> {
    let bytes = if r.starts_with("sha256:") {
        blob(shared, r)?
    } else {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(shared.layout.join("index.json")).ok()?).ok()?;
        let desc = index["manifests"]
            .as_array()?
            .iter()
            .find(|d| d["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(r))?;
        blob(shared, desc["digest"].as_str()?)?
    };
    let doc: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let media_type = doc["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json")
        .to_owned();
    Some((bytes, media_type))
}

fn send_blob(
    out: &mut TcpStream,
    shared: &Shared,
    digest: &str,
    mut bytes: Vec<u8>,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        bytes.len()
    );
    match shared.faults.get(digest) {
        None => {}
        Some(Fault::Corrupt) => {
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
        }
        Some(Fault::DropHalf) => {
            out.write_all(head.as_bytes())?;
            out.write_all(&bytes[..bytes.len() / 2])?;
            out.flush()?;
            return out.shutdown(std::net::Shutdown::Both);
        }
        Some(Fault::Gate(gate)) => {
            out.write_all(head.as_bytes())?;
            out.flush()?;
            if !gate.wait() {
                shared
                    .log
                    .lock()
                    .unwrap()
                    .push(format!("gate timed out {digest}"));
            }
            out.write_all(&bytes)?;
            return out.flush();
        }
    }
    out.write_all(head.as_bytes())?;
    out.write_all(&bytes)?;
    out.flush()
}

fn respond(
    out: &mut TcpStream,
    status: &str,
    media_type: &str,
    body: &[u8],
    method: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {media_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    out.write_all(head.as_bytes())?;
    if method != "HEAD" {
        out.write_all(body)?;
    }
    out.flush()
}

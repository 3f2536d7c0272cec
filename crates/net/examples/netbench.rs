//! A small TCP benchmark for bench/net: throughput (one stream, `SECONDS` long) and
//! latency (1-byte round trips), the same binary on both ends.
//!
//! ```text
//! netbench server ADDR:PORT
//! netbench client ADDR:PORT SECONDS    # prints one JSON line
//! ```
//! Built static (bench/net/run.sh) so that it runs in a busybox image and in a bare
//! initramfs alike.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn serve(addr: &str) -> std::io::Result<()> {
    let l = TcpListener::bind(addr)?;
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        std::thread::spawn(move || {
            let mut kind = [0u8; 1];
            if c.read_exact(&mut kind).is_err() {
                return;
            }
            let _ = c.set_nodelay(true);
            let mut buf = vec![0u8; 1 << 16];
            if kind[0] == b'T' {
                let mut total: u64 = 0;
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = c.write_all(&total.to_be_bytes());
            } else {
                let mut b = [0u8; 1];
                while c.read_exact(&mut b).is_ok() {
                    if c.write_all(&b).is_err() {
                        break;
                    }
                }
            }
        });
    }
    Ok(())
}

fn throughput(addr: &str, secs: u64) -> std::io::Result<f64> {
    let mut c = TcpStream::connect(addr)?;
    c.write_all(b"T")?;
    let buf = vec![0x5au8; 1 << 16];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        c.write_all(&buf)?;
    }
    c.shutdown(std::net::Shutdown::Write)?;
    let mut total = [0u8; 8];
    c.read_exact(&mut total)?;
    let secs = t0.elapsed().as_secs_f64();
    Ok(u64::from_be_bytes(total) as f64 * 8.0 / secs / 1e6)
}

fn latency(addr: &str, secs: u64) -> std::io::Result<Vec<f64>> {
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    c.write_all(b"L")?;
    let mut samples = Vec::new();
    let t0 = Instant::now();
    let mut b = [0u8; 1];
    while t0.elapsed() < Duration::from_secs(secs) && samples.len() < 100_000 {
        let t = Instant::now();
        c.write_all(b"x")?;
        c.read_exact(&mut b)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(samples)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let res = match args.get(1).map(String::as_str) {
        Some("server") if args.len() == 3 => serve(&args[2]),
        Some("client") if args.len() == 4 => {
            let secs: u64 = args[3].parse().unwrap_or(5);
            throughput(&args[2], secs).and_then(|mbit| {
                let s = latency(&args[2], secs.div_ceil(2))?;
                let pct = |p: f64| s.get(((s.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0.0);
                println!(
                    "{{\"throughput_mbit\":{mbit:.1},\"rtt_us_p50\":{:.0},\"rtt_us_p99\":{:.0},\"rtt_samples\":{}}}",
                    pct(0.5),
                    pct(0.99),
                    s.len()
                );
                Ok(())
            })
        }
        _ => {
            eprintln!("usage: netbench server ADDR:PORT | netbench client ADDR:PORT SECONDS");
            std::process::exit(2)
        }
    };
    if let Err(e) = res {
        eprintln!("netbench: {e}");
        std::process::exit(1);
    }
}

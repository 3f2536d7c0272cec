//! Load generator and floor server for bench/daemon/run.sh (not part of the product).
//!
//! - `bench_api floor SOCKET`: a trivial axum handler (`GET /` → a small JSON body) on a
//!   unix socket: the floor the daemon's API is compared with.
//! - `bench_api load SOCKET PATH CLIENTS SECONDS`: CLIENTS concurrent keep-alive
//!   connections each sending GET PATH back to back for SECONDS; prints one JSON line
//!   with requests/s and latency percentiles.
//! - `bench_api start SOCKET IMAGE`: deploys `sh -c 'echo started'` and prints the
//!   milliseconds from the POST to the workload's first log line (its own timestamp).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match args.get(1).map(String::as_str) {
        Some("floor") => rt.block_on(floor(&args[2])),
        Some("load") => rt.block_on(load(
            &args[2],
            &args[3],
            args[4].parse().unwrap(),
            args[5].parse().unwrap(),
        )),
        Some("start") => rt.block_on(start(&args[2], &args[3])),
        _ => eprintln!(
            "usage: bench_api floor SOCKET | load SOCKET PATH CLIENTS SECONDS | start SOCKET IMAGE"
        ),
    }
}

async fn floor(socket: &str) {
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(|| async { axum::Json(serde_json::json!({"sandboxes": []})) }),
    );
    axum::serve(listener, app).await.unwrap();
}

async fn client(socket: String, path: String, until: Instant) -> Vec<u32> {
    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut lat = Vec::new();
    while Instant::now() < until {
        let req = hyper::Request::get(path.as_str())
            .header("host", "bench")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let t = Instant::now();
        let r = tx.send_request(req).await.unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        r.into_body().collect().await.unwrap();
        lat.push(t.elapsed().as_micros() as u32);
    }
    lat
}

async fn load(socket: &str, path: &str, clients: usize, seconds: u64) {
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| tokio::spawn(client(socket.to_string(), path.to_string(), until)))
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "path": path, "clients": clients, "requests": all.len(),
            "rps": (all.len() as f64 / secs).round(),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": pct(1.0),
        })
    );
}

async fn start(socket: &str, image: &str) {
    let client = gpucell_api::Client::new(socket);
    let mut run = gpucell_runtime::RunRequest::new(image);
    run.command = vec!["sh".into(), "-c".into(), "echo started".into()];
    run.accel = gpucell_runtime::AccelRequest::Tcg;
    let t0 = gpucell_daemon::logs::now_ms();
    let st = client
        .deploy(&gpucell_api::DeployRequest::new(run))
        .await
        .unwrap();
    loop {
        let mut first = None;
        client
            .logs(&st.id, None, false, |l| {
                if l.stream == "stdout" && first.is_none() {
                    first = Some(l.t_ms);
                }
            })
            .await
            .unwrap();
        if let Some(t) = first {
            println!("{}", t.saturating_sub(t0));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Gone before the next sample.
    loop {
        if client.get(&st.id).await.unwrap().state.is_terminal() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let uri = format!("/v1/sandboxes/{}?remove=1", st.id);
    client
        .send(hyper::Method::DELETE, &uri, None)
        .await
        .unwrap();
}

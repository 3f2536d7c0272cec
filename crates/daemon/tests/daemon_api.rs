//! gpucelld's API without booting anything: a real daemon process and real HTTP over its
//! unix socket. Bad requests get a 4xx naming the field; two deploys of one device: one
//! wins, the other is told the holder; the OpenAPI document served is docs/openapi.json.

#![allow(clippy::unwrap_used)]

mod common;

use hyper::Method;

fn call(env: &common::Env, method: Method, uri: &str, body: &str) -> (u16, serde_json::Value) {
    env.rt.block_on(async {
        use http_body_util::BodyExt;
        let body = (!body.is_empty()).then(|| body.as_bytes().to_vec());
        let r = env.client().send(method, uri, body).await.unwrap();
        let status = r.status().as_u16();
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, v)
    })
}

#[test]
fn bad_requests_name_their_field() {
    let Some(env) = common::env(false) else {
        return;
    };
    let image = &env.image;
    let huge = format!(
        r#"{{"run":{{"image":"{image}","env":["X={}"]}}}}"#,
        "x".repeat(300_000)
    );
    let cases: Vec<(String, u16, &str)> = vec![
        ("{".into(), 400, "body"),
        ("[]".into(), 400, "body"),
        (r#"{"run":{"image":"x"},"extra":1}"#.into(), 400, "extra"),
        (r#"{"restart":"always"}"#.into(), 400, "run"),
        (
            r#"{"run":{"image":"Not An Image!"}}"#.into(),
            400,
            "run.image",
        ),
        (r#"{"run":{"image":""}}"#.into(), 400, "run.image"),
        (
            format!(r#"{{"run":{{"image":"{image}","memory_mib":1099511627776}}}}"#),
            400,
            "run.memory_mib",
        ),
        (
            format!(r#"{{"run":{{"image":"{image}","memory_mib":10485760}}}}"#),
            400,
            "run.memory_mib",
        ),
        (
            format!(r#"{{"run":{{"image":"{image}","guest":"no-such-flavour"}}}}"#),
            400,
            "run.guest",
        ),
        (
            format!(r#"{{"run":{{"image":"{image}","cpus":0}}}}"#),
            400,
            "run.cpus",
        ),
        (
            format!(r#"{{"run":{{"image":"{image}","env":["=x"]}}}}"#),
            400,
            "run.env",
        ),
        (
            format!(r#"{{"run":{{"image":"{image}","devices":{{"gpus":"zz"}}}}}}"#),
            400,
            "run.devices",
        ),
        (
            format!(r#"{{"id":"../etc","run":{{"image":"{image}"}}}}"#),
            400,
            "id",
        ),
        (
            format!(r#"{{"run":{{"image":"{image}"}},"restart":"sometimes"}}"#),
            400,
            "body",
        ),
        (huge, 413, "body"),
    ];
    for (body, status, field) in cases {
        let (got, v) = call(&env, Method::POST, "/v1/sandboxes", &body);
        let short = &body[..body.len().min(120)];
        assert_eq!(got, status, "{short}: {v}");
        assert_eq!(v["field"], field, "{short}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    for (method, uri, status) in [
        (Method::GET, "/v1/sandboxes/nope", 404),
        (Method::DELETE, "/v1/sandboxes/nope", 404),
        (Method::GET, "/v1/sandboxes/nope/logs", 404),
        (Method::GET, "/v1/sandboxes/nope/logs?tail=-1", 400),
        (Method::GET, "/v1/nothing-here", 404),
    ] {
        let (got, v) = call(&env, method, uri, "");
        assert_eq!(got, status, "{uri}: {v}");
        assert!(v["error"].is_string(), "{uri}: {v}");
    }
    // Nothing was recorded, and the daemon still answers.
    let (s, v) = call(&env, Method::GET, "/v1/sandboxes", "");
    assert_eq!((s, v["sandboxes"].as_array().map(Vec::len)), (200, Some(0)));
    assert_eq!(call(&env, Method::GET, "/healthz", "").0, 200);
}

#[test]
fn two_deploys_of_one_device_one_wins() {
    let Some(env) = common::env(false) else {
        return;
    };
    let body = |id: &str| {
        format!(
            r#"{{"id":"{id}","run":{{"image":"{}","accel":"tcg","devices":{{"functions":["0000:00:1f.6"]}}}}}}"#,
            env.image
        )
    };
    let (a, b) = (body("first"), body("second"));
    let (ra, rb) = env.rt.block_on(async {
        let c = env.client();
        let fa = c.send(Method::POST, "/v1/sandboxes", Some(a.into_bytes()));
        let fb = c.send(Method::POST, "/v1/sandboxes", Some(b.into_bytes()));
        tokio::join!(fa, fb)
    });
    let mut codes = vec![ra.unwrap().status().as_u16(), rb.unwrap().status().as_u16()];
    codes.sort();
    assert_eq!(codes, [201, 409]);
    // The loser is told the holder; asking again names it too.
    let (s, v) = call(&env, Method::POST, "/v1/sandboxes", &body("third"));
    let (_, list) = call(&env, Method::GET, "/v1/sandboxes", "");
    let winner = list["sandboxes"][0]["id"].as_str().unwrap().to_string();
    if list["sandboxes"][0]["state"] != "failed" {
        assert_eq!(s, 409, "{v}");
        assert_eq!(v["holder"], winner.as_str(), "{v}");
        assert_eq!(v["field"], "run.devices");
    }
    // The winner fails (no such device here): the device is free again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (_, st) = call(&env, Method::GET, &format!("/v1/sandboxes/{winner}"), "");
        if st["state"] == "failed" {
            assert!(
                st["error"].as_str().unwrap().contains("0000:00:1f.6"),
                "{st}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{st}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    env.assert_clean();
}

#[test]
fn openapi_node_metrics_and_events() {
    let Some(env) = common::env(false) else {
        return;
    };
    let (s, served) = call(&env, Method::GET, "/v1/openapi.json", "");
    assert_eq!(s, 200);
    let file = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/openapi.json"
    ))
    .unwrap();
    let file: serde_json::Value = serde_json::from_str(&file).unwrap();
    assert_eq!(
        served, file,
        "the served document differs from docs/openapi.json"
    );
    for path in [
        "/v1/sandboxes",
        "/v1/sandboxes/{id}",
        "/v1/sandboxes/{id}/logs",
        "/v1/events",
        "/v1/node",
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/openapi.json",
    ] {
        assert!(
            file["paths"][path].is_object(),
            "docs/openapi.json lacks {path}"
        );
    }
    let (s, node) = call(&env, Method::GET, "/v1/node", "");
    assert_eq!(s, 200);
    assert_eq!(node["flavours"][0], "default", "{node}");
    assert!(
        node["capacity"]["memory_mib"].as_u64().unwrap() > 0,
        "{node}"
    );
    assert!(node["gpus"].is_object(), "{node}");
    let (s, m) = call(&env, Method::GET, "/metrics", "");
    assert_eq!(s, 200);
    let m = m.as_str().unwrap().to_string();
    for want in [
        "gpucell_sandboxes{state=\"running\"}",
        "gpucell_gpus{state=\"free\"}",
        "gpucell_restarts_total",
        "# EOF",
    ] {
        assert!(m.contains(want), "{want} missing from /metrics:\n{m}");
    }
    // Events: a deploy that fails at once shows up as pending, then its next states.
    let sock = env.socket.clone();
    let reader = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use http_body_util::BodyExt;
            let r = gpucell_api::Client::new(sock)
                .send(Method::GET, "/v1/events", None)
                .await
                .unwrap();
            assert_eq!(r.headers()["content-type"], "text/event-stream");
            let mut body = r.into_body();
            let mut text = String::new();
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
            while !text.contains("\"state\":\"failed\"") {
                let frame = tokio::time::timeout_at(deadline, body.frame())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                if let Some(d) = frame.data_ref() {
                    text.push_str(&String::from_utf8_lossy(d));
                }
            }
            text
        })
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (s, _) = call(
        &env,
        Method::POST,
        "/v1/sandboxes",
        &format!(
            r#"{{"id":"ev","run":{{"image":"{}","command":["/no/such"],"accel":"tcg","devices":{{"functions":["0000:00:1f.6"]}}}}}}"#,
            env.image
        ),
    );
    assert_eq!(s, 201);
    let text = reader.join().unwrap();
    assert!(text.contains("event: state"), "{text}");
    assert!(text.contains(r#""id":"ev","state":"pending""#), "{text}");
}

#[test]
fn tcp_needs_the_bearer_token() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token-0123456789\n").unwrap();
    let addr = format!("127.0.0.1:{port}");
    let Some(env) = common::env_with(
        false,
        &["--tcp", &addr, "--token-file", token_file.to_str().unwrap()],
    ) else {
        return;
    };
    let get = |auth: Option<&str>| {
        env.rt.block_on(async {
            use http_body_util::{BodyExt, Empty};
            let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let (mut tx, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut req = hyper::Request::get("/v1/sandboxes").header("host", "x");
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = tx
                .send_request(req.body(Empty::<bytes::Bytes>::new()).unwrap())
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    };
    let (s, body) = get(None);
    assert_eq!(s, 401, "{body}");
    assert!(body.contains("authorization"), "{body}");
    assert_eq!(get(Some("Bearer wrong")).0, 401);
    assert_eq!(get(Some("Bearer s3cret-token-0123456789x")).0, 401);
    let (s, body) = get(Some("Bearer s3cret-token-0123456789"));
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("sandboxes"));
}

#[test]
fn tcp_without_a_token_is_refused() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpucelld"))
        .args([
            "--state-dir",
            "/nonexistent/gpucell-test",
            "serve",
            "--socket",
        ])
        .arg(std::env::temp_dir().join("gpucelld-notoken.sock"))
        .args(["--tcp", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tcp needs a bearer token"), "{err}");
}

#[test]
fn tls_with_the_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let (ca, ca_key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    let openssl = |args: &[&std::path::Path], subject: &str, extra: &[&str]| {
        std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "1", "-subj", subject])
            .args(extra)
            .arg("-keyout")
            .arg(args[0])
            .arg("-out")
            .arg(args[1])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let made = openssl(&[&ca_key, &ca], "/CN=gpucell test CA", &[])
        && openssl(
            &[&key, &cert],
            "/CN=localhost",
            &[
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-addext",
                "basicConstraints=critical,CA:FALSE",
                "-CA",
                ca.to_str().unwrap(),
                "-CAkey",
                ca_key.to_str().unwrap(),
            ],
        );
    if !made {
        eprintln!("skipping: openssl cannot make a test certificate");
        return;
    }
    std::fs::write(dir.path().join("token"), "tls-token-0123456789abcdef\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let token = dir.path().join("token");
    let Some(env) = common::env_with(
        false,
        &[
            "--tcp",
            &addr,
            "--token-file",
            token.to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    ) else {
        return;
    };
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_file(&ca).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let get = |auth: &str| {
        env.rt.block_on(async {
            use http_body_util::{BodyExt, Empty};
            let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let tls = connector.connect(name, tcp).await.unwrap();
            let (mut tx, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = hyper::Request::get("/v1/node")
                .header("host", "localhost")
                .header("authorization", auth)
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            let r = tx.send_request(req).await.unwrap();
            let status = r.status().as_u16();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    };
    assert_eq!(get("Bearer nope").0, 401);
    let (s, body) = get("Bearer tls-token-0123456789abcdef");
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("gpucell.node/v1"), "{body}");
    // Plain HTTP on the TLS port gets no answer.
    let plain = env.rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(b"GET /v1/node HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read_to_end(&mut buf))
            .await;
        buf
    });
    assert!(!String::from_utf8_lossy(&plain).contains("gpucell.node"));
}

#[test]
fn sigterm_stops_the_daemon_even_with_an_open_event_stream() {
    let Some(mut env) = common::env(false) else {
        return;
    };
    let sock = env.socket.clone();
    let reader = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use http_body_util::BodyExt;
            let r = gpucell_api::Client::new(sock)
                .send(Method::GET, "/v1/events", None)
                .await
                .unwrap();
            let mut body = r.into_body();
            // Ends (or errs) when the daemon goes.
            while let Some(Ok(_)) = body.frame().await {}
        })
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut daemon = env.daemon.take().unwrap();
    let started = std::time::Instant::now();
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(daemon.id().to_string())
        .status()
        .unwrap();
    let status = daemon.wait().unwrap();
    assert!(status.success(), "{status:?}: {}", env.daemon_log());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(!env.socket.exists(), "the socket was left behind");
    reader.join().unwrap();
}

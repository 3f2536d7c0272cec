//! The link over TLS (`wss://`) with a private CA, against the reference control plane.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use gpucell_test_control_plane::{ControlPlane, Event, ServerConfig};
use serde_json::json;
use std::time::Duration;

/// A CA and a `localhost` server certificate it signed, made by the openssl CLI.
fn make_certs(dir: &std::path::Path) -> Option<()> {
    let run = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .ok()?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ok = run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=gpucell test CA",
        ],
    ]
    .concat())
        && run(&[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "leaf.key",
                "-out",
                "leaf.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat())
        && run(&[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "1",
            "-extfile",
            "leaf.ext",
        ]);
    ok.then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_a_private_ca_connects_and_an_untrusted_certificate_does_not() {
    let dir = tempfile::tempdir().unwrap();
    if make_certs(dir.path()).is_none() {
        eprintln!("SKIP: the openssl CLI could not make test certificates");
        return;
    }
    let mut server = ServerConfig::new(TOKEN);
    server.tls = Some(
        gpucell_test_control_plane::tls_config(
            &dir.path().join("leaf.pem"),
            &dir.path().join("leaf.key"),
        )
        .unwrap(),
    );
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap(), server)
        .await
        .unwrap();
    assert!(cp.url().starts_with("wss://localhost:"));

    // Without the CA the server's certificate is not trusted: no WebSocket is opened.
    let ops = FakeOps::new(Duration::ZERO);
    let mut cfg = link_cfg(&cp);
    cfg.node_id = "node-untrusting".into();
    let node = Node::start(cfg, ops.clone());
    cp.wait_for("a failed TLS handshake", WAIT, |e| {
        e.iter()
            .any(|e| matches!(e, Event::Refused { reason } if reason.starts_with("TLS handshake")))
    })
    .await
    .unwrap();
    assert_eq!(connects(&cp.events()), 0);
    node.shutdown().await.unwrap();

    // With the CA in ca_file: registers over TLS.
    let mut cfg = link_cfg(&cp);
    cfg.ca_file = Some(dir.path().join("ca.pem"));
    let node = Node::start(cfg, ops);
    cp.wait_for("register over wss", WAIT, |e| count(e, "register") == 1)
        .await
        .unwrap();
    cp.deploy(NODE, "dep-tls", json!({"image": "x"})).unwrap();
    cp.wait_for("deploy_result", WAIT, |e| count(e, "deploy_result") == 1)
        .await
        .unwrap();
    node.shutdown().await.unwrap();
}

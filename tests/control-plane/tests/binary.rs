//! The reference control plane as a process: a raw WebSocket client registers, the event
//! appears on stdout, and a command on stdin reaches the client.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_records_a_node_and_forwards_commands() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpucell-test-control-plane"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--token",
            "tok",
            "--offline-after-secs",
            "60",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(WAIT, stderr.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let url = first.strip_prefix("listening on ").unwrap().to_string();

    // A wrong token is refused before the upgrade.
    let mut bad = url.as_str().into_client_request().unwrap();
    bad.headers_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    let refused = tokio_tungstenite::connect_async(bad).await;
    assert!(refused.is_err());

    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer tok".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let register = json!({"type": "register", "payload": {"node_id": "n1", "version": "0", "protocol": 1, "inventory": {}}});
    ws.send(Message::text(register.to_string())).await.unwrap();

    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &Value| e["event"] == "message") {
        let line = tokio::time::timeout(WAIT, stdout.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push(serde_json::from_str(&line).unwrap());
    }
    assert_eq!(seen[0]["event"], "refused", "{seen:?}");
    let message = seen.iter().find(|e| e["event"] == "message").unwrap();
    assert_eq!(message["node_id"], "n1");
    assert_eq!(message["message"], register);

    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(
            b"{\"deploy\": \"n1\", \"deployment_id\": \"d1\", \"spec\": {\"image\": \"x\"}}\n",
        )
        .await
        .unwrap();
    let frame = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let deploy: Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
    assert_eq!(
        deploy,
        json!({"type": "deploy", "payload": {"deployment_id": "d1", "spec": {"image": "x"}}})
    );
    drop(stdin);
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "the binary ends when stdin closes: {status}"
    );
}

//! The link against the reference control plane (tests/control-plane) over real
//! WebSockets on localhost, with a recording fake of the daemon (tests/common).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use gpucell_link::LinkConfig;
use gpucell_test_control_plane::{ControlPlane, Event, ServerConfig};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_then_heartbeats_with_states() {
    let (cp, node, _ops) = registered(Duration::ZERO).await;
    let events = cp
        .wait_for("3 heartbeats", WAIT, |e| count(e, "heartbeat") >= 3)
        .await
        .unwrap();
    let first = events
        .iter()
        .position(|e| e.message_type().is_some())
        .unwrap();
    assert_eq!(
        events[first].message_type(),
        Some("register"),
        "register comes first"
    );
    let register = &cp.payloads(NODE, "register")[0];
    assert_eq!(register["node_id"], NODE);
    assert_eq!(register["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(register["protocol"], 1);
    assert_eq!(register["inventory"]["gpus"][0]["bdf"], "0000:41:00.0");
    let beats = cp.payloads(NODE, "heartbeat");
    let seqs: Vec<u64> = beats.iter().map(|b| b["seq"].as_u64().unwrap()).collect();
    assert_eq!(&seqs[..3], &[0, 1, 2]);
    assert_eq!(beats[0]["sandboxes"], json!({"deployments": []}));
    assert!(beats[0]["sent_at_ms"].as_u64().unwrap() > 1_600_000_000_000);
    assert!(cp.is_online(NODE));
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_answers_deploy_result_and_a_repeat_is_not_deployed_twice() {
    let (cp, node, ops) = registered(Duration::from_millis(300)).await;
    cp.deploy(NODE, "dep-1", json!({"image": "busybox"}))
        .unwrap();
    // A repeat while the first is still deploying: ignored, its result follows.
    cp.deploy(NODE, "dep-1", json!({"image": "busybox"}))
        .unwrap();
    cp.wait_for("deploy_result", WAIT, |e| count(e, "deploy_result") == 1)
        .await
        .unwrap();
    let result = &cp.payloads(NODE, "deploy_result")[0];
    assert_eq!(
        result,
        &json!({"deployment_id": "dep-1", "ok": true,
                "sandbox": {"sandbox_id": "sb-dep-1", "state": "running", "image": "busybox"}})
    );
    // A repeat after the result: answered with the kept result, not deployed again.
    cp.deploy(NODE, "dep-1", json!({"image": "busybox"}))
        .unwrap();
    cp.wait_for("replayed result", WAIT, |e| count(e, "deploy_result") == 2)
        .await
        .unwrap();
    let replay = &cp.payloads(NODE, "deploy_result")[1];
    assert_eq!(replay["replayed"], true);
    assert_eq!(replay["sandbox"], result["sandbox"]);
    assert_eq!(ops.count("deploy:dep-1"), 1, "calls: {:?}", ops.calls());
    // The heartbeat now carries the daemon's states.
    cp.wait_for("heartbeat with dep-1", WAIT, |e| {
        e.iter()
            .filter_map(|e| e.payload_of("heartbeat"))
            .any(|p| p["sandboxes"]["deployments"] == json!(["dep-1"]))
    })
    .await
    .unwrap();
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_deploy_reports_the_daemons_error() {
    let (cp, node, _ops) = registered(Duration::ZERO).await;
    cp.deploy(NODE, "dep-bad", json!({"fail": true})).unwrap();
    cp.wait_for("deploy_result", WAIT, |e| count(e, "deploy_result") == 1)
        .await
        .unwrap();
    assert_eq!(
        cp.payloads(NODE, "deploy_result")[0],
        json!({"deployment_id": "dep-bad", "ok": false,
               "error": {"code": "invalid_spec", "message": "field `image`: not a reference"}})
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_answers_stop_result_and_the_id_cannot_be_redeployed() {
    let (cp, node, ops) = registered(Duration::ZERO).await;
    cp.deploy(NODE, "dep-2", json!({"image": "x"})).unwrap();
    cp.wait_for("deploy_result", WAIT, |e| count(e, "deploy_result") == 1)
        .await
        .unwrap();
    cp.stop(NODE, "dep-2").unwrap();
    cp.wait_for("stop_result", WAIT, |e| count(e, "stop_result") == 1)
        .await
        .unwrap();
    assert_eq!(
        cp.payloads(NODE, "stop_result")[0],
        json!({"deployment_id": "dep-2", "ok": true,
               "sandbox": {"sandbox_id": "sb-dep-2", "state": "exited"}})
    );
    cp.deploy(NODE, "dep-2", json!({"image": "x"})).unwrap();
    cp.wait_for("refused redeploy", WAIT, |e| count(e, "deploy_result") == 2)
        .await
        .unwrap();
    let refused = &cp.payloads(NODE, "deploy_result")[1];
    assert_eq!(refused["ok"], false);
    assert_eq!(refused["error"]["code"], "stopped");
    assert_eq!(ops.calls(), ["deploy:dep-2", "stop:dep-2"]);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_server_drops_the_node_reconnects_and_registers_again() {
    let (cp, node, ops) = registered(Duration::ZERO).await;
    cp.deploy(NODE, "dep-3", json!({"image": "x"})).unwrap();
    cp.wait_for("deploy_result", WAIT, |e| count(e, "deploy_result") == 1)
        .await
        .unwrap();
    cp.drop_connection(NODE).unwrap();
    let events = cp
        .wait_for("second register", WAIT, |e| count(e, "register") == 2)
        .await
        .unwrap();
    assert_eq!(connects(&events), 2);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Disconnected { conn: 1, .. })));
    cp.wait_for("heartbeats on the new connection", WAIT, |e| {
        e.iter()
            .any(|e| matches!(e, Event::Message { conn: 2, message, .. } if message["type"] == "heartbeat"))
    })
    .await
    .unwrap();
    // The control plane re-sends the deploy after the reconnect: replayed, not redeployed.
    cp.deploy(NODE, "dep-3", json!({"image": "x"})).unwrap();
    cp.wait_for("replayed result", WAIT, |e| count(e, "deploy_result") == 2)
        .await
        .unwrap();
    assert_eq!(cp.payloads(NODE, "deploy_result")[1]["replayed"], true);
    // Being cut off never stops a workload.
    assert_eq!(ops.calls(), ["deploy:dep-3"]);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_finished_while_disconnected_is_sent_after_reconnecting() {
    let (cp, node, ops) = registered(Duration::from_millis(1500)).await;
    cp.deploy(NODE, "dep-4", json!({"image": "x"})).unwrap();
    cp.wait_for("deploy started", WAIT, |_| ops.count("deploy:dep-4") == 1)
        .await
        .unwrap();
    cp.drop_connection(NODE).unwrap();
    let events = cp
        .wait_for("deploy_result", WAIT, |e| count(e, "deploy_result") == 1)
        .await
        .unwrap();
    let result = events
        .iter()
        .find(|e| e.message_type() == Some("deploy_result"))
        .unwrap();
    assert!(
        matches!(result, Event::Message { conn, .. } if *conn >= 2),
        "sent on a later connection: {result:?}"
    );
    assert_eq!(cp.payloads(NODE, "deploy_result")[0]["ok"], true);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_is_refused_and_retried_with_backoff() {
    let cp = control_plane(Duration::from_secs(60)).await;
    let ops = FakeOps::new(Duration::ZERO);
    let mut cfg = link_cfg(&cp);
    cfg.node_token = "wrong-token".into();
    let node = Node::start(cfg, ops);
    let events = cp
        .wait_for("two refusals", WAIT, |e| {
            e.iter()
                .filter(|e| matches!(e, Event::Refused { .. }))
                .count()
                >= 2
        })
        .await
        .unwrap();
    assert_eq!(connects(&events), 0);
    assert!(events
        .iter()
        .all(|e| matches!(e, Event::Refused { reason } if reason == "wrong token")));
    assert!(!node.handle.is_finished(), "the link keeps retrying");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unknown_messages_are_answered_with_error() {
    let (cp, node, ops) = registered(Duration::ZERO).await;
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("this is not json", "malformed", None),
        ("[1, 2, 3]", "malformed", None),
        (r#"{"payload": {}}"#, "malformed", None),
        (
            r#"{"type": "reboot", "payload": {}}"#,
            "unknown_type",
            Some("reboot"),
        ),
        (
            r#"{"type": "deploy", "payload": {"deployment_id": "d"}}"#,
            "malformed",
            Some("deploy"),
        ),
        (
            r#"{"type": "deploy", "payload": {"deployment_id": "a/b", "spec": {}}}"#,
            "malformed",
            Some("deploy"),
        ),
        (
            r#"{"type": "stop", "payload": {}}"#,
            "malformed",
            Some("stop"),
        ),
    ];
    for (i, (text, code, reply)) in cases.iter().enumerate() {
        cp.send_text(NODE, *text).unwrap();
        cp.wait_for(text, WAIT, |e| count(e, "error") == i + 1)
            .await
            .unwrap();
        let error = &cp.payloads(NODE, "error")[i];
        assert_eq!(error["code"], *code, "{text}: {error}");
        assert_eq!(error["in_reply_to"].as_str(), *reply, "{text}: {error}");
        assert!(!error["message"].as_str().unwrap().is_empty());
    }
    cp.send_binary(NODE, vec![0, 1, 2]).unwrap();
    cp.wait_for("binary refused", WAIT, |e| {
        count(e, "error") == cases.len() + 1
    })
    .await
    .unwrap();
    assert_eq!(cp.payloads(NODE, "error")[cases.len()]["code"], "binary");
    // The link is still the same connection and still works.
    cp.deploy(NODE, "dep-5", json!({"image": "x"})).unwrap();
    let events = cp
        .wait_for("deploy_result", WAIT, |e| count(e, "deploy_result") == 1)
        .await
        .unwrap();
    assert_eq!(connects(&events), 1);
    assert_eq!(ops.calls(), ["deploy:dep-5"]);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_ends_the_connection_and_the_node_reconnects() {
    let cp = control_plane(Duration::from_secs(60)).await;
    let ops = FakeOps::new(Duration::ZERO);
    let mut cfg = link_cfg(&cp);
    cfg.max_message_bytes = 4096;
    let node = Node::start(cfg, ops.clone());
    cp.wait_for("register", WAIT, |e| count(e, "register") == 1)
        .await
        .unwrap();
    let spec = json!({"image": "x".repeat(10_000)});
    cp.deploy(NODE, "dep-big", spec).unwrap();
    cp.wait_for("second register", WAIT, |e| count(e, "register") == 2)
        .await
        .unwrap();
    assert!(
        ops.calls().is_empty(),
        "nothing deployed: {:?}",
        ops.calls()
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_marked_offline_and_a_live_one_is_not() {
    let cp = control_plane(Duration::from_millis(1000)).await;
    // Heartbeats every 50 ms: online for well over the offline limit.
    let live = FakeOps::new(Duration::ZERO);
    let mut cfg = link_cfg(&cp);
    cfg.heartbeat_ms = 50;
    let node = Node::start(cfg, live);
    cp.wait_for("register", WAIT, |e| count(e, "register") == 1)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(cp.is_online(NODE));
    assert!(!cp
        .events()
        .iter()
        .any(|e| matches!(e, Event::Offline { .. })));
    node.shutdown().await.unwrap();

    // Only the heartbeat right after register, then silence: offline, closed with 4001.
    let silent = FakeOps::new(Duration::ZERO);
    let mut cfg = link_cfg(&cp);
    cfg.node_id = "node-silent".into();
    cfg.heartbeat_ms = 600_000;
    let node = Node::start(cfg, silent);
    cp.wait_for("offline", WAIT, |e| {
        e.iter()
            .any(|e| matches!(e, Event::Offline { node_id } if node_id == "node-silent"))
    })
    .await
    .unwrap();
    cp.wait_for("closed with 4001", WAIT, |e| {
        e.iter().any(|e| {
            matches!(e, Event::Disconnected { node_id: Some(n), reason, .. }
                if n == "node-silent" && reason.contains("4001"))
        })
    })
    .await
    .unwrap();
    // The node comes back: it reconnects and registers again (and, silent again, will be
    // marked offline again: not asserted, it depends on timing).
    // Waits on the events themselves: the server records a payload before the event
    // that carries it, so a count of payloads can run ahead of the events seen.
    let offline = |e: &Event| matches!(e, Event::Offline { node_id } if node_id == "node-silent");
    let register = |e: &Event| {
        matches!(e, Event::Message { node_id: Some(n), message, .. }
            if n == "node-silent" && message["type"] == "register")
    };
    let events = cp
        .wait_for("re-register", WAIT, |e| {
            e.iter()
                .position(offline)
                .is_some_and(|at| e[at..].iter().any(register))
        })
        .await
        .unwrap();
    let offline_at = events.iter().position(offline).unwrap();
    let registers_after = events[offline_at..].iter().filter(|e| register(e)).count();
    assert_eq!(registers_after, 1, "{events:?}");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_updates_from_the_daemon_are_forwarded() {
    let (cp, node, ops) = registered(Duration::ZERO).await;
    let update =
        json!({"sandbox_id": "sb-1", "deployment_id": "dep-1", "state": "exited", "exit_code": 3});
    ops.status_tx.send(update.clone()).unwrap();
    cp.wait_for("status", WAIT, |e| count(e, "status") == 1)
        .await
        .unwrap();
    assert_eq!(cp.payloads(NODE, "status"), [update]);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_the_connection_and_ends_the_link() {
    let (cp, node, _ops) = registered(Duration::ZERO).await;
    node.shutdown().await.unwrap();
    let events = cp
        .wait_for("disconnect", WAIT, |e| {
            e.iter().any(|e| matches!(e, Event::Disconnected { .. }))
        })
        .await
        .unwrap();
    assert!(
        events.iter().any(|e| matches!(e, Event::Disconnected { reason, .. } if reason.contains("closed by the node"))),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_that_is_down_is_retried_until_it_comes_up() {
    // Reserve a port, then free it: nothing listens there at first.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let ops = FakeOps::new(Duration::ZERO);
    let mut cfg = LinkConfig::new(format!("ws://{addr}/v1/node"), TOKEN, NODE);
    cfg.backoff_min_ms = 20;
    cfg.backoff_max_ms = 100;
    let node = Node::start(cfg, ops);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!node.handle.is_finished());
    let cp = ControlPlane::start(addr, ServerConfig::new(TOKEN))
        .await
        .unwrap();
    cp.wait_for("register", WAIT, |e| count(e, "register") == 1)
        .await
        .unwrap();
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_configuration_ends_run_with_an_error_naming_the_field() {
    let ops = FakeOps::new(Duration::ZERO);
    let cfg = LinkConfig::new("http://cp.example.com/", TOKEN, NODE);
    let err = gpucell_link::run(cfg, ops.clone(), std::future::pending())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("url"), "{err}");

    let mut cfg = LinkConfig::new("wss://cp.example.com/", TOKEN, NODE);
    cfg.ca_file = Some("/nonexistent/ca.pem".into());
    let err = gpucell_link::run(cfg, ops.clone(), std::future::pending())
        .await
        .unwrap_err();
    let text = gpucell_common::chain_string(&err);
    assert!(text.contains("/nonexistent/ca.pem"), "{text}");
    assert!(!text.contains(TOKEN), "{text}");
}

#[test]
fn the_link_section_parses_from_toml() {
    let text = r#"
        url = "wss://cp.example.com/v1/node"
        node_token = "abc"
        node_id = "node-7"
        heartbeat_ms = 15000
    "#;
    let cfg: LinkConfig = toml::from_str(text).unwrap();
    assert_eq!(cfg.heartbeat(), Duration::from_secs(15));
    assert_eq!(cfg.backoff_max(), Duration::from_secs(30));
    assert!(cfg.validate().is_ok());
    let unknown = format!("{text}\nnode_tokn = \"x\"\n");
    let err = toml::from_str::<LinkConfig>(&unknown).unwrap_err();
    assert!(err.to_string().contains("node_tokn"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_of_the_same_node_replaces_the_first() {
    let (cp, node, _ops) = registered(Duration::ZERO).await;
    // Another process claiming the same node id: the server keeps the newest connection.
    let twin = Node::start(link_cfg(&cp), FakeOps::new(Duration::ZERO));
    cp.wait_for("older connection closed", WAIT, |e| {
        e.iter().any(|e| {
            matches!(e, Event::Disconnected { conn: 1, reason, .. }
                if reason.contains(&gpucell_test_control_plane::REPLACED_CLOSE_CODE.to_string()))
        })
    })
    .await
    .unwrap();
    twin.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_state_follows_connections_and_failures() {
    let cp = control_plane(Duration::from_secs(60)).await;
    let (state_tx, mut state) = tokio::sync::watch::channel(gpucell_link::LinkState::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let ops: Arc<FakeOps> = FakeOps::new(Duration::ZERO);
    let handle = tokio::spawn(gpucell_link::run_with_state(
        link_cfg(&cp),
        ops,
        async move {
            let _ = stopped.await;
        },
        state_tx,
    ));
    let wait = |want: u64| {
        let mut rx = state.clone();
        async move {
            tokio::time::timeout(WAIT, rx.wait_for(|s| s.connected && s.connections == want))
                .await
                .expect("state reached in time")
                .map(|s| s.clone())
                .unwrap()
        }
    };
    let first = wait(1).await;
    assert!(
        first.since_ms > 0 && first.last_error.is_none(),
        "{first:?}"
    );
    // The link counts itself connected once register is sent; wait for the server to read it.
    cp.wait_for("register", WAIT, |e| count(e, "register") == 1)
        .await
        .unwrap();
    cp.drop_connection(NODE).unwrap();
    let second = wait(2).await;
    assert!(
        second.last_error.is_some(),
        "the drop is kept as the last error: {second:?}"
    );
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    assert!(!state.borrow_and_update().connected);

    // A refused token shows in the state, naming what to fix.
    let (state_tx, mut state) = tokio::sync::watch::channel(gpucell_link::LinkState::default());
    let mut cfg = link_cfg(&cp);
    cfg.node_token = "wrong-token".into();
    let handle = tokio::spawn(gpucell_link::run_with_state(
        cfg,
        FakeOps::new(Duration::ZERO),
        std::future::pending(),
        state_tx,
    ));
    let refused = tokio::time::timeout(WAIT, state.wait_for(|s| s.last_error.is_some()))
        .await
        .unwrap()
        .unwrap()
        .clone();
    let error = refused.last_error.unwrap_or_default();
    assert!(
        error.contains("401") && error.contains("node_token"),
        "{error}"
    );
    assert!(!error.contains("wrong-token"), "{error}");
    assert!(!refused.connected);
    handle.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_the_handshake_times_out_and_is_retried() {
    // Accepts TCP connections and says nothing: each attempt must give up after
    // connect_timeout_ms and try again.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(tcp);
        }
    });
    let (state_tx, mut state) = tokio::sync::watch::channel(gpucell_link::LinkState::default());
    let mut cfg = LinkConfig::new(format!("ws://{addr}/v1/node"), TOKEN, NODE);
    cfg.connect_timeout_ms = 200;
    cfg.backoff_min_ms = 10;
    cfg.backoff_max_ms = 50;
    let handle = tokio::spawn(gpucell_link::run_with_state(
        cfg,
        FakeOps::new(Duration::ZERO),
        std::future::pending(),
        state_tx,
    ));
    let failed = tokio::time::timeout(WAIT, state.wait_for(|s| s.last_error.is_some()))
        .await
        .unwrap()
        .unwrap()
        .clone();
    let error = failed.last_error.unwrap_or_default();
    assert!(error.contains("connect_timeout_ms"), "{error}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while accepted.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the link did not retry"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.abort();
    server.abort();
}

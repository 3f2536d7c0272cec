//! gpucelld's control-plane link end to end: a real daemon process with `--link-config`,
//! the reference control plane (tests/control-plane) on localhost, real QEMU under TCG.
//! register with the inventory, heartbeats, a deploy that runs, a dropped connection
//! that the node survives (its sandbox keeps running) and re-registers after, a stop.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use gpucell_api::SandboxState;
use gpucell_test_control_plane::{ControlPlane, Event, ServerConfig};

const TOKEN: &str = "link-test-token-0123456789";
const NODE: &str = "node-a";

fn count(events: &[Event], kind: &str) -> usize {
    events
        .iter()
        .filter(|e| e.message_type() == Some(kind))
        .count()
}

fn result_of<'a>(events: &'a [Event], kind: &str, id: &str) -> Option<&'a serde_json::Value> {
    events
        .iter()
        .filter_map(|e| e.payload_of(kind))
        .find(|p| p["deployment_id"] == id)
}

#[test]
fn deploy_and_stop_through_the_control_plane_link() {
    let cp_rt = tokio::runtime::Runtime::new().unwrap();
    let cp = cp_rt
        .block_on(ControlPlane::start(
            "127.0.0.1:0".parse().unwrap(),
            ServerConfig::new(TOKEN),
        ))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("link.toml");
    std::fs::write(
        &link,
        format!(
            "url = \"{}\"\nnode_token = \"{TOKEN}\"\nnode_id = \"{NODE}\"\nheartbeat_ms = 500\nbackoff_max_ms = 1000\n",
            cp.url()
        ),
    )
    .unwrap();
    let Some(env) = common::env_with(true, &["--link-config", link.to_str().unwrap()]) else {
        return;
    };
    let wait = |what: &str, secs: u64, done: &dyn Fn(&[Event]) -> bool| {
        cp_rt
            .block_on(cp.wait_for(what, Duration::from_secs(secs), |e| done(e)))
            .unwrap_or_else(|e| panic!("{e}\ndaemon log:\n{}", env.daemon_log()))
    };
    let events = wait("register and heartbeats", 30, &|e| {
        count(e, "register") >= 1 && count(e, "heartbeat") >= 2
    });
    let register = events
        .iter()
        .find_map(|e| e.payload_of("register"))
        .unwrap();
    assert!(register.to_string().contains(NODE), "{register}");
    assert!(cp.is_online(NODE));

    // The spec is a POST /v1/sandboxes body; the deployment id becomes the sandbox id.
    let mut req = env.request(&["sh", "-c", "echo linked; sleep 300"]);
    req.id = None;
    cp.deploy(NODE, "dep-1", serde_json::to_value(&req).unwrap())
        .unwrap();
    let events = wait("deploy_result", 60, &|e| {
        result_of(e, "deploy_result", "dep-1").is_some()
    });
    let result = result_of(&events, "deploy_result", "dep-1").unwrap();
    assert_eq!(result["ok"], true, "{result}");
    env.wait_for("dep-1", 180, "running with output", |s, e| {
        s.state == SandboxState::Running && e.stdout_of("dep-1").contains("linked")
    });
    // A bad spec is answered, not deployed.
    cp.deploy(NODE, "dep-bad", serde_json::json!({"run": {"image": "::"}}))
        .unwrap();
    let events = wait("deploy_result of the bad spec", 30, &|e| {
        result_of(e, "deploy_result", "dep-bad").is_some()
    });
    let bad = result_of(&events, "deploy_result", "dep-bad").unwrap();
    assert_eq!(bad["ok"], false, "{bad}");
    assert_eq!(bad["error"]["code"], "invalid_spec", "{bad}");

    // The server drops the connection: the node reconnects and registers again, and
    // its sandbox kept running meanwhile.
    let qemu = env.processes("qemu-system");
    cp.drop_connection(NODE).unwrap();
    wait("a second register", 30, &|e| count(e, "register") >= 2);
    assert_eq!(env.get("dep-1").state, SandboxState::Running);
    assert_eq!(env.processes("qemu-system"), qemu);

    cp.stop(NODE, "dep-1").unwrap();
    let events = wait("stop_result", 60, &|e| {
        result_of(e, "stop_result", "dep-1").is_some()
    });
    assert_eq!(
        result_of(&events, "stop_result", "dep-1").unwrap()["ok"],
        true
    );
    env.wait_for("dep-1", 60, "stopped", |s, _| s.state.is_terminal());
    env.assert_clean();
}

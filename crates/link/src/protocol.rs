//! The wire protocol between a node and its control plane (docs/control-plane.md).
//!
//! Every message is one WebSocket text frame holding a JSON object
//! `{"type": "...", "payload": {...}}`. Payloads of deployments, sandboxes and the
//! inventory are opaque JSON to the link: the daemon produces and validates them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version a node announces in `register`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest deployment id the link accepts.
pub const MAX_DEPLOYMENT_ID_LEN: usize = 64;

/// A message from the node to the control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload", rename_all = "snake_case")]
pub enum NodeMessage {
    /// The first message on every connection.
    Register(Register),
    /// Sent right after `register`, then every heartbeat interval.
    Heartbeat(Heartbeat),
    /// The outcome of a `deploy`.
    DeployResult(OpResult),
    /// The outcome of a `stop`.
    StopResult(OpResult),
    /// A sandbox's state changed (pushed by the daemon).
    Status(Value),
    /// The node could not handle a message the control plane sent.
    Error(ErrorPayload),
}

impl NodeMessage {
    /// The message's `type` as it appears on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            NodeMessage::Register(_) => "register",
            NodeMessage::Heartbeat(_) => "heartbeat",
            NodeMessage::DeployResult(_) => "deploy_result",
            NodeMessage::StopResult(_) => "stop_result",
            NodeMessage::Status(_) => "status",
            NodeMessage::Error(_) => "error",
        }
    }
}

/// `register`: who the node is and what it has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Register {
    pub node_id: String,
    /// gpucell's version on the node.
    pub version: String,
    /// [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The daemon's inventory (GPUs, flavours, capacity), opaque to the link.
    pub inventory: Value,
}

/// `heartbeat`: the node is alive, and the state of its sandboxes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node_id: String,
    /// Counts up from 0 on each connection.
    pub seq: u64,
    /// Milliseconds since the Unix epoch when the node sent it.
    pub sent_at_ms: u64,
    /// The daemon's sandbox states, opaque to the link.
    pub sandboxes: Value,
}

/// `deploy_result` and `stop_result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpResult {
    pub deployment_id: String,
    pub ok: bool,
    /// What the daemon returned: the sandbox's status on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Value>,
    /// Why it failed, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// True when this answers a repeated `deploy` with the result kept from the first one.
    #[serde(default, skip_serializing_if = "is_false")]
    pub replayed: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A failure's code and message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// `error`: a message could not be handled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorPayload {
    /// One of [`ErrorCode`]'s names, or the peer's own.
    pub code: String,
    pub message: String,
    /// The `type` of the message this answers, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<String>,
}

/// A message from the control plane to the node.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// Run a deployment; the spec is the daemon's to validate.
    Deploy { deployment_id: String, spec: Value },
    /// Stop a deployment.
    Stop { deployment_id: String },
    /// The control plane reports a problem with something the node sent.
    Error(ErrorPayload),
}

/// Why an incoming message was refused; the `code` of the `error` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not JSON, not an object, no string `type`, or a payload of the wrong shape.
    Malformed,
    /// A `type` the node does not know.
    UnknownType,
    /// Larger than the configured `max_message_bytes`.
    TooLarge,
    /// A binary frame: the protocol is text only.
    Binary,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Binary => "binary",
        }
    }
}

/// An incoming message that the node answers with `error`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
    pub in_reply_to: Option<String>,
}

impl Rejection {
    fn new(code: ErrorCode, message: impl Into<String>, in_reply_to: Option<&str>) -> Self {
        Rejection {
            code,
            message: message.into(),
            in_reply_to: in_reply_to.map(|t| truncate(t, 64)),
        }
    }

    /// The `error` message answering it.
    pub fn to_message(&self) -> NodeMessage {
        NodeMessage::Error(ErrorPayload {
            code: self.code.as_str().to_string(),
            message: self.message.clone(),
            in_reply_to: self.in_reply_to.clone(),
        })
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Parses one text frame from the control plane, bounded by `max_bytes`.
pub fn parse_server_message(text: &str, max_bytes: usize) -> Result<ServerMessage, Rejection> {
    if text.len() > max_bytes {
        return Err(Rejection::new(
            ErrorCode::TooLarge,
            format!(
                "message of {} bytes is over the limit of {max_bytes}",
                text.len()
            ),
            None,
        ));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Rejection::new(ErrorCode::Malformed, format!("not JSON: {e}"), None))?;
    let Value::Object(mut obj) = value else {
        return Err(Rejection::new(
            ErrorCode::Malformed,
            "a message must be a JSON object {\"type\", \"payload\"}",
            None,
        ));
    };
    let kind = match obj.remove("type") {
        Some(Value::String(kind)) => kind,
        _ => {
            return Err(Rejection::new(
                ErrorCode::Malformed,
                "field `type` is missing or not a string",
                None,
            ))
        }
    };
    let payload = obj.remove("payload").unwrap_or(Value::Null);
    match kind.as_str() {
        "deploy" => parse_deploy(payload, &kind),
        "stop" => {
            let deployment_id = deployment_id(&payload, &kind)?;
            Ok(ServerMessage::Stop { deployment_id })
        }
        "error" => serde_json::from_value::<ErrorPayload>(payload)
            .map(ServerMessage::Error)
            .map_err(|e| {
                Rejection::new(ErrorCode::Malformed, format!("payload: {e}"), Some(&kind))
            }),
        other => Err(Rejection::new(
            ErrorCode::UnknownType,
            format!(
                "unknown message type `{}`: the node understands deploy, stop and error",
                truncate(other, 64)
            ),
            Some(other),
        )),
    }
}

fn parse_deploy(mut payload: Value, kind: &str) -> Result<ServerMessage, Rejection> {
    let deployment_id = deployment_id(&payload, kind)?;
    let spec = match payload.get_mut("spec").map(Value::take) {
        Some(Value::Null) | None => {
            return Err(Rejection::new(
                ErrorCode::Malformed,
                "field `payload.spec` is missing",
                Some(kind),
            ))
        }
        Some(spec) => spec,
    };
    Ok(ServerMessage::Deploy {
        deployment_id,
        spec,
    })
}

fn deployment_id(payload: &Value, kind: &str) -> Result<String, Rejection> {
    let id = match payload.get("deployment_id") {
        Some(Value::String(id)) => id,
        _ => {
            return Err(Rejection::new(
                ErrorCode::Malformed,
                "field `payload.deployment_id` is missing or not a string",
                Some(kind),
            ))
        }
    };
    validate_deployment_id(id).map_err(|m| Rejection::new(ErrorCode::Malformed, m, Some(kind)))?;
    Ok(id.clone())
}

/// A deployment id is 1 to [`MAX_DEPLOYMENT_ID_LEN`] characters of `A-Za-z0-9._-`, not
/// starting with `.` or `-` (the daemon's rule for sandbox ids, so an id is safe in a
/// path and a log line).
pub fn validate_deployment_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_DEPLOYMENT_ID_LEN {
        return Err(format!(
            "field `payload.deployment_id` must be 1 to {MAX_DEPLOYMENT_ID_LEN} characters"
        ));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "field `payload.deployment_id` holds {bad:?}: only A-Z, a-z, 0-9 and . _ - are allowed"
        ));
    }
    if id.starts_with(['.', '-']) {
        return Err("field `payload.deployment_id` must not start with `.` or `-`".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MAX: usize = 1 << 20;

    #[test]
    fn node_messages_have_type_and_payload() {
        let msg = NodeMessage::DeployResult(OpResult {
            deployment_id: "d1".into(),
            ok: true,
            sandbox: Some(json!({"state": "running"})),
            error: None,
            replayed: false,
        });
        let v = serde_json::to_value(&msg).unwrap_or_default();
        assert_eq!(
            v,
            json!({"type": "deploy_result", "payload": {
                "deployment_id": "d1", "ok": true, "sandbox": {"state": "running"}}})
        );
        assert_eq!(msg.kind(), "deploy_result");
        let status = serde_json::to_value(NodeMessage::Status(json!({"id": "s"})));
        assert_eq!(
            status.unwrap_or_default(),
            json!({"type": "status", "payload": {"id": "s"}})
        );
    }

    #[test]
    fn deploy_and_stop_parse() {
        let m = parse_server_message(
            r#"{"type":"deploy","payload":{"deployment_id":"d-1","spec":{"image":"x"}}}"#,
            MAX,
        );
        assert_eq!(
            m,
            Ok(ServerMessage::Deploy {
                deployment_id: "d-1".into(),
                spec: json!({"image": "x"})
            })
        );
        let m = parse_server_message(r#"{"type":"stop","payload":{"deployment_id":"d-1"}}"#, MAX);
        assert_eq!(
            m,
            Ok(ServerMessage::Stop {
                deployment_id: "d-1".into()
            })
        );
    }

    #[test]
    fn hostile_messages_are_rejected_with_a_code() {
        let cases: &[(&str, ErrorCode, Option<&str>)] = &[
            ("not json", ErrorCode::Malformed, None),
            ("[1,2]", ErrorCode::Malformed, None),
            ("{}", ErrorCode::Malformed, None),
            (r#"{"type":7}"#, ErrorCode::Malformed, None),
            (
                r#"{"type":"reboot"}"#,
                ErrorCode::UnknownType,
                Some("reboot"),
            ),
            (r#"{"type":"deploy"}"#, ErrorCode::Malformed, Some("deploy")),
            (
                r#"{"type":"deploy","payload":{"deployment_id":"d"}}"#,
                ErrorCode::Malformed,
                Some("deploy"),
            ),
            (
                r#"{"type":"deploy","payload":{"deployment_id":"../x","spec":{}}}"#,
                ErrorCode::Malformed,
                Some("deploy"),
            ),
            (
                r#"{"type":"stop","payload":{"deployment_id":"-rf"}}"#,
                ErrorCode::Malformed,
                Some("stop"),
            ),
            (
                r#"{"type":"stop","payload":{"deployment_id":"a:b"}}"#,
                ErrorCode::Malformed,
                Some("stop"),
            ),
            (
                r#"{"type":"stop","payload":{"deployment_id":""}}"#,
                ErrorCode::Malformed,
                Some("stop"),
            ),
            (
                r#"{"type":"stop","payload":{"deployment_id":5}}"#,
                ErrorCode::Malformed,
                Some("stop"),
            ),
            (
                r#"{"type":"error","payload":"x"}"#,
                ErrorCode::Malformed,
                Some("error"),
            ),
        ];
        for (text, code, reply) in cases {
            match parse_server_message(text, MAX) {
                Err(r) => {
                    assert_eq!(r.code, *code, "{text}");
                    assert_eq!(r.in_reply_to.as_deref(), *reply, "{text}");
                }
                Ok(m) => panic!("{text} parsed as {m:?}"),
            }
        }
    }

    #[test]
    fn oversized_and_long_ids_are_rejected() {
        let big = format!(
            r#"{{"type":"stop","payload":{{"deployment_id":"{}"}}}}"#,
            "a".repeat(200)
        );
        assert_eq!(
            parse_server_message(&big, 64).map_err(|r| r.code),
            Err(ErrorCode::TooLarge)
        );
        assert_eq!(
            parse_server_message(&big, MAX).map_err(|r| r.code),
            Err(ErrorCode::Malformed)
        );
        let long_type = format!(r#"{{"type":"{}"}}"#, "t".repeat(1000));
        let r = parse_server_message(&long_type, MAX).err();
        assert_eq!(r.and_then(|r| r.in_reply_to).map(|t| t.len()), Some(64));
    }
}

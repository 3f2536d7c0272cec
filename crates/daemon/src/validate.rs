//! Checks of a deploy body before anything is recorded: each failure is an [`ApiError`]
//! naming the field (`run.image`, `run.memory_mib`, `run.guest`, `run.devices.gpus`...).

use std::path::Path;

use gpucell_api::{check_id, ApiError, DeployRequest};
use gpucell_host::bdf::Bdf;

/// Parses a body; a serde error names the field it is about when it can.
pub fn parse(body: &[u8]) -> Result<DeployRequest, ApiError> {
    serde_json::from_slice::<DeployRequest>(body).map_err(|e| {
        let message = e.to_string();
        // serde names fields in backquotes: "unknown field `x`", "missing field `run`".
        let named = ["unknown field `", "missing field `", "duplicate field `"]
            .iter()
            .find_map(|p| message.split_once(p))
            .and_then(|(_, rest)| rest.split('`').next());
        let field = named
            .filter(|f| !f.is_empty() && f.len() < 64)
            .map(str::to_string)
            .unwrap_or_else(|| "body".into());
        ApiError::field(field, format!("the deploy body is not valid: {message}"))
    })
}

/// What the host offers a request.
pub struct Host<'a> {
    pub host_root: &'a Path,
    pub state_dir: &'a Path,
    pub default_guest: &'a str,
}

/// Checks a parsed request against itself and the host.
pub fn check(req: &DeployRequest, host: &Host<'_>) -> Result<(), ApiError> {
    if let Some(id) = &req.id {
        check_id(id)?;
    }
    req.run
        .clone()
        .validate()
        .map_err(|e| ApiError::field(format!("run.{}", e.field), e.problem))?;
    gpucell_image::Reference::parse(&req.run.image).map_err(|e| {
        ApiError::field(
            "run.image",
            format!(
                "{:?} is not an image reference: {}",
                req.run.image,
                gpucell_common::chain_string(&e)
            ),
        )
    })?;
    if let Some(total) = host_memory_mib(host.host_root) {
        if req.run.memory_mib > total {
            return Err(ApiError::field(
                "run.memory_mib",
                format!(
                    "{} MiB is more than this host has ({total} MiB); ask for less",
                    req.run.memory_mib
                ),
            ));
        }
    }
    let flavour = req.run.guest.as_deref().unwrap_or(host.default_guest);
    let manifest = host
        .state_dir
        .join("guest")
        .join(flavour)
        .join("manifest.json");
    if flavour.contains('/') || flavour.starts_with('.') || !manifest.is_file() {
        return Err(ApiError::field(
            "run.guest",
            format!("no guest flavour {flavour:?} is built on this node (gpucell guest build --flavour {flavour}); GET /v1/node lists the built ones"),
        ));
    }
    if let Some(h) = &req.health {
        if h.http.host.parse::<std::net::IpAddr>().is_err() {
            return Err(ApiError::field(
                "health.http.host",
                format!("{:?} is not an IP address", h.http.host),
            ));
        }
        if !h.http.path.starts_with('/')
            || h.http.path.len() > 1024
            || h.http.path.chars().any(char::is_control)
        {
            return Err(ApiError::field(
                "health.http.path",
                "must start with '/', hold no control characters, and be at most 1024 bytes",
            ));
        }
        if h.interval_ms < 100 || h.failure_threshold == 0 {
            return Err(ApiError::field(
                "health",
                "interval_ms must be at least 100 and failure_threshold at least 1",
            ));
        }
    }
    for (k, v) in &req.labels {
        if k.is_empty() || k.len() > 128 || v.len() > 1024 {
            return Err(ApiError::field(
                "labels",
                format!("label {k:?}: keys are 1 to 128 bytes, values at most 1024"),
            ));
        }
    }
    Ok(())
}

/// The PCI addresses a request names explicitly (its GPUs by address, its functions).
pub fn named_devices(req: &DeployRequest) -> Vec<Bdf> {
    let gpus = req.run.devices.gpus.as_deref().unwrap_or("");
    let gpus = gpus
        .split(',')
        .filter(|s| s.contains(':'))
        .map(str::trim)
        .map(str::to_string);
    gpus.chain(req.run.devices.functions.iter().cloned())
        .filter_map(|s| s.parse::<Bdf>().ok())
        .collect()
}

/// MemTotal of `<root>/proc/meminfo`, in MiB.
pub fn host_memory_mib(root: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(root.join("proc/meminfo")).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(dir: &Path) -> Host<'_> {
        Host {
            host_root: dir,
            state_dir: dir,
            default_guest: "default",
        }
    }

    fn req(json: &str) -> Result<(), ApiError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        std::fs::write(dir.path().join("proc/meminfo"), "MemTotal:  4194304 kB\n").unwrap();
        std::fs::create_dir_all(dir.path().join("guest/default")).unwrap();
        std::fs::write(dir.path().join("guest/default/manifest.json"), "{}").unwrap();
        let r = parse(json.as_bytes())?;
        check(&r, &host(dir.path()))
    }

    #[test]
    fn bad_requests_name_their_field() {
        let cases = [
            (r#"{"run":{"image":"oci:/x:y"},"bogus":1}"#, "bogus"),
            (r#"{"image":"x"}"#, "image"),
            (r#"{"run":{"image":"oci:/x:y","cpus":0}}"#, "run.cpus"),
            (
                r#"{"run":{"image":"oci:/x:y","memory_mib":8192}}"#,
                "run.memory_mib",
            ),
            (
                r#"{"run":{"image":"oci:/x:y","guest":"nope"}}"#,
                "run.guest",
            ),
            (
                r#"{"run":{"image":"oci:/x:y","guest":"../x"}}"#,
                "run.guest",
            ),
            (r#"{"run":{"image":"Bad Image!!"}}"#, "run.image"),
            (r#"{"id":"a/b","run":{"image":"oci:/x:y"}}"#, "id"),
            (r#"[1,2"#, "body"),
            (
                r#"{"run":{"image":"oci:/x:y"},"health":{"http":{"port":80,"host":"example.com"}}}"#,
                "health.http.host",
            ),
            (
                r#"{"run":{"image":"oci:/x:y"},"health":{"http":{"port":80,"path":"x"}}}"#,
                "health.http.path",
            ),
            (
                r#"{"run":{"image":"oci:/x:y"},"health":{"http":{"port":80},"interval_ms":1}}"#,
                "health",
            ),
        ];
        for (body, field) in cases {
            let err = req(body).unwrap_err();
            assert_eq!(err.field.as_deref(), Some(field), "{body}: {err}");
        }
        req(r#"{"run":{"image":"oci:/x:y","memory_mib":1024}}"#).unwrap();
    }

    #[test]
    fn named_devices_are_parsed() {
        let mut r = DeployRequest::new(gpucell_runtime::RunRequest::new("x"));
        r.run.devices.gpus = Some("0000:01:00.0,02:00.0".into());
        r.run.devices.functions = vec!["0000:03:00.0".into()];
        assert_eq!(named_devices(&r).len(), 3);
        r.run.devices.gpus = Some("2".into());
        assert_eq!(named_devices(&r).len(), 1);
    }
}

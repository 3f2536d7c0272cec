//! From an image's config and the user's flags to the agent's [`RunSpec`], following
//! `docker run`'s rules; and the parsers for `--memory` and `--timeout`.
//!
//! The image config comes from an untrusted image: every field is validated here.

use std::time::Duration;

use gpucell_protocol::{RootfsSpec, RunSpec, MAX_CONTROL_PAYLOAD};

/// Environment of a container when neither the image nor the user sets `PATH` (as docker).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const MAX_ARGS: usize = 4096;
const MAX_ENV: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("no command: the image has no Entrypoint or Cmd; give one after `--`")]
    NoCommand,
    #[error("environment entry {0:?} from the {1} is not KEY=VALUE with a non-empty KEY")]
    BadEnv(String, &'static str),
    #[error("{what} {value:?} contains a NUL byte")]
    Nul { what: &'static str, value: String },
    #[error("working directory {0:?} must be an absolute path")]
    RelativeWorkdir(String),
    #[error(
        "hostname {0:?} must be 1-63 characters of [A-Za-z0-9-] (dots allowed between labels)"
    )]
    BadHostname(String),
    #[error("{what}: {count} entries, over the limit of {limit}")]
    TooMany {
        what: &'static str,
        count: usize,
        limit: usize,
    },
    #[error("the run request is {0} bytes, over the {MAX_CONTROL_PAYLOAD} byte protocol limit; trim the environment or arguments")]
    TooLarge(usize),
    #[error("size {0:?} not understood: use a number of bytes or a number with k, m, g or t (e.g. 512m, 2g)")]
    BadSize(String),
    #[error(
        "duration {0:?} not understood: use seconds or a number with ms, s, m or h (e.g. 30s, 5m)"
    )]
    BadDuration(String),
}

/// What the image says to run (its OCI config).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// What the user passed to `gpucell run`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--entrypoint`: replaces the image's entrypoint and drops its cmd (as docker).
    pub entrypoint: Option<String>,
    /// Arguments after the image name.
    pub cmd: Vec<String>,
    /// `--env K=V` (or `--env K`, taken from gpucell's own environment when set).
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub hostname: Option<String>,
}

fn no_nul(what: &'static str, v: &str) -> Result<(), SpecError> {
    if v.contains('\0') {
        return Err(SpecError::Nul {
            what,
            value: v.replace('\0', "\\0"),
        });
    }
    Ok(())
}

fn env_key(entry: &str) -> Option<&str> {
    entry
        .split_once('=')
        .map(|(k, _)| k)
        .filter(|k| !k.is_empty())
}

/// Image env, then user env overriding by key; `PATH` defaulted when absent.
pub fn merge_env(
    image: &[String],
    user: &[String],
    host_env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<String>, SpecError> {
    let mut out: Vec<String> = Vec::new();
    let set = |entry: String, out: &mut Vec<String>| {
        let key = env_key(&entry).map(str::to_string);
        if let Some(k) = key {
            out.retain(|e| env_key(e) != Some(k.as_str()));
        }
        out.push(entry);
    };
    for e in image {
        no_nul("image environment entry", e)?;
        if env_key(e).is_none() {
            return Err(SpecError::BadEnv(e.clone(), "image config"));
        }
        set(e.clone(), &mut out);
    }
    for e in user {
        no_nul("--env", e)?;
        if e.contains('=') {
            if env_key(e).is_none() {
                return Err(SpecError::BadEnv(e.clone(), "--env flag"));
            }
            set(e.clone(), &mut out);
        } else if e.is_empty() {
            return Err(SpecError::BadEnv(e.clone(), "--env flag"));
        } else if let Some(v) = host_env(e) {
            // docker: `--env K` passes K from the caller's environment, if set.
            set(format!("{e}={v}"), &mut out);
        }
    }
    if !out.iter().any(|e| env_key(e) == Some("PATH")) {
        out.insert(0, DEFAULT_PATH.to_string());
    }
    if out.len() > MAX_ENV {
        return Err(SpecError::TooMany {
            what: "environment",
            count: out.len(),
            limit: MAX_ENV,
        });
    }
    Ok(out)
}

/// docker's rules: `--entrypoint` replaces the entrypoint and drops the image's cmd;
/// user arguments replace the image's cmd.
pub fn merge_args(image: &ImageDefaults, o: &Overrides) -> Result<Vec<String>, SpecError> {
    let (entry, cmd): (Vec<String>, Vec<String>) = match &o.entrypoint {
        Some(ep) if !ep.is_empty() => (vec![ep.clone()], o.cmd.clone()),
        Some(_) => (Vec::new(), o.cmd.clone()),
        None if !o.cmd.is_empty() => (image.entrypoint.clone(), o.cmd.clone()),
        None => (image.entrypoint.clone(), image.cmd.clone()),
    };
    let args: Vec<String> = entry.into_iter().chain(cmd).collect();
    if args.is_empty() || args[0].is_empty() {
        return Err(SpecError::NoCommand);
    }
    if args.len() > MAX_ARGS {
        return Err(SpecError::TooMany {
            what: "arguments",
            count: args.len(),
            limit: MAX_ARGS,
        });
    }
    for a in &args {
        no_nul("argument", a)?;
    }
    Ok(args)
}

fn check_hostname(h: &str) -> Result<(), SpecError> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(SpecError::BadHostname(h.to_string()))
    }
}

/// Builds the run request the agent gets.
pub fn build_spec(
    image: &ImageDefaults,
    o: &Overrides,
    host_env: &dyn Fn(&str) -> Option<String>,
    rootfs: RootfsSpec,
    default_hostname: &str,
) -> Result<RunSpec, SpecError> {
    let args = merge_args(image, o)?;
    let env = merge_env(&image.env, &o.env, host_env)?;
    let cwd = match o.workdir.as_deref().filter(|w| !w.is_empty()) {
        Some(w) => w.to_string(),
        None if !image.working_dir.is_empty() => image.working_dir.clone(),
        None => "/".to_string(),
    };
    no_nul("working directory", &cwd)?;
    if !cwd.starts_with('/') {
        return Err(SpecError::RelativeWorkdir(cwd));
    }
    let user = o.user.clone().unwrap_or_else(|| image.user.clone());
    no_nul("user", &user)?;
    let hostname = o
        .hostname
        .clone()
        .unwrap_or_else(|| default_hostname.to_string());
    check_hostname(&hostname)?;
    let spec = RunSpec {
        args,
        env,
        cwd,
        user,
        hostname,
        rootfs,
        overlay_bytes: None,
        devices: Vec::new(),
        device_wait_ms: 0,
        gpu: None,
        pod_sandbox: false,
        etc_files: Vec::new(),
        terminal: false,
        window: None,
        volumes: Vec::new(),
    };
    let size = serde_json::to_vec(&spec)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_CONTROL_PAYLOAD {
        return Err(SpecError::TooLarge(size));
    }
    Ok(spec)
}

/// Parses `--memory`: bytes, or a number with `k`, `m`, `g`, `t` (optionally `b`/`ib`),
/// as docker does. Returns MiB, rounded up.
pub fn parse_memory_mib(s: &str) -> Result<u64, SpecError> {
    let bad = || SpecError::BadSize(s.to_string());
    let t = s.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("ib")
        .or_else(|| t.strip_suffix('b'))
        .unwrap_or(&t);
    let (num, mult): (&str, u64) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        Some(c) if c.is_ascii_digit() => (t, 1),
        _ => return Err(bad()),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    let bytes = n.checked_mul(mult).ok_or_else(bad)?;
    Ok(bytes.div_ceil(1 << 20))
}

/// Parses `--timeout`: seconds, or a number with `ms`, `s`, `m`, `h`.
pub fn parse_duration(s: &str) -> Result<Duration, SpecError> {
    let bad = || SpecError::BadDuration(s.to_string());
    let t = s.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    if d.is_zero() {
        return Err(bad());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(x: &[&str]) -> Vec<String> {
        x.iter().map(|s| s.to_string()).collect()
    }

    fn image() -> ImageDefaults {
        ImageDefaults {
            entrypoint: v(&["/entry"]),
            cmd: v(&["default", "args"]),
            env: v(&["PATH=/img/bin", "A=1", "B=2"]),
            working_dir: "/srv".into(),
            user: "app".into(),
        }
    }

    #[test]
    fn docker_argument_rules() {
        let img = image();
        let o = Overrides::default();
        assert_eq!(
            merge_args(&img, &o).unwrap(),
            v(&["/entry", "default", "args"])
        );
        let o = Overrides {
            cmd: v(&["x", "y"]),
            ..Default::default()
        };
        assert_eq!(merge_args(&img, &o).unwrap(), v(&["/entry", "x", "y"]));
        let o = Overrides {
            entrypoint: Some("/bin/sh".into()),
            ..Default::default()
        };
        assert_eq!(merge_args(&img, &o).unwrap(), v(&["/bin/sh"]));
        let o = Overrides {
            entrypoint: Some("/bin/sh".into()),
            cmd: v(&["-c", "id"]),
            ..Default::default()
        };
        assert_eq!(merge_args(&img, &o).unwrap(), v(&["/bin/sh", "-c", "id"]));
        let o = Overrides {
            entrypoint: Some(String::new()),
            cmd: v(&["ls"]),
            ..Default::default()
        };
        assert_eq!(merge_args(&img, &o).unwrap(), v(&["ls"]));
        let empty = ImageDefaults::default();
        assert!(matches!(
            merge_args(&empty, &Overrides::default()),
            Err(SpecError::NoCommand)
        ));
    }

    #[test]
    fn env_merge_overrides_by_key_and_defaults_path() {
        let host = |k: &str| (k == "HOME_VAR").then(|| "from-host".to_string());
        let env = merge_env(
            &v(&["A=1", "B=2"]),
            &v(&["B=3", "C=", "HOME_VAR", "UNSET"]),
            &host,
        )
        .unwrap();
        assert_eq!(
            env,
            v(&[DEFAULT_PATH, "A=1", "B=3", "C=", "HOME_VAR=from-host"])
        );
        let env = merge_env(&v(&["PATH=/x"]), &[], &host).unwrap();
        assert_eq!(env, v(&["PATH=/x"]));
        assert!(merge_env(&v(&["NOEQUALS"]), &[], &host).is_err());
        assert!(merge_env(&v(&["=x"]), &[], &host).is_err());
        assert!(merge_env(&[], &v(&["=x"]), &host).is_err());
        assert!(merge_env(&v(&["A=\0"]), &[], &host).is_err());
    }

    #[test]
    fn spec_fields_and_validation() {
        let rootfs = RootfsSpec {
            device: "/dev/vda".into(),
            fstype: "erofs".into(),
        };
        let none = |_: &str| None;
        let s = build_spec(
            &image(),
            &Overrides::default(),
            &none,
            rootfs.clone(),
            "abc123",
        )
        .unwrap();
        assert_eq!(
            (s.cwd.as_str(), s.user.as_str(), s.hostname.as_str()),
            ("/srv", "app", "abc123")
        );
        let o = Overrides {
            workdir: Some("/tmp".into()),
            user: Some("1000:1000".into()),
            hostname: Some("box".into()),
            ..Default::default()
        };
        let s = build_spec(&image(), &o, &none, rootfs.clone(), "abc").unwrap();
        assert_eq!(
            (s.cwd.as_str(), s.user.as_str(), s.hostname.as_str()),
            ("/tmp", "1000:1000", "box")
        );
        let o = Overrides {
            workdir: Some("rel".into()),
            ..Default::default()
        };
        assert!(matches!(
            build_spec(&image(), &o, &none, rootfs.clone(), "a"),
            Err(SpecError::RelativeWorkdir(_))
        ));
        let o = Overrides {
            hostname: Some("bad host".into()),
            ..Default::default()
        };
        assert!(build_spec(&image(), &o, &none, rootfs.clone(), "a").is_err());
        let o = Overrides {
            env: vec![format!("BIG={}", "x".repeat(MAX_CONTROL_PAYLOAD))],
            ..Default::default()
        };
        assert!(matches!(
            build_spec(&image(), &o, &none, rootfs, "a"),
            Err(SpecError::TooLarge(_))
        ));
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_memory_mib("512m").unwrap(), 512);
        assert_eq!(parse_memory_mib("2G").unwrap(), 2048);
        assert_eq!(parse_memory_mib("1GiB").unwrap(), 1024);
        assert_eq!(parse_memory_mib("1048576").unwrap(), 1);
        assert_eq!(parse_memory_mib("1").unwrap(), 1);
        assert!(parse_memory_mib("lots").is_err());
        assert!(parse_memory_mib("99999999999t").is_err());
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("5 days").is_err());
        assert!(parse_duration("").is_err());
    }
}

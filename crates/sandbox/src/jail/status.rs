//! Checks that a jailed process is in the state the jail promises, from
//! `/proc/<pid>/status`: seccomp filtering (`Seccomp: 2`), no capability in any set
//! (`CapInh`, `CapPrm`, `CapEff`, `CapBnd`, `CapAmb` all 0), `NoNewPrivs: 1`, and the
//! sandbox's uid and gid (real, effective, saved and filesystem).

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot read {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the jailed QEMU is not confined: {field} is {found:?} in {path:?}, expected {expected}"
    )]
    Field {
        path: PathBuf,
        field: &'static str,
        found: String,
        expected: String,
    },
}

/// What the jailed process must show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub uid: u32,
    pub gid: u32,
    /// Whether the program installs a seccomp filter (QEMU with `-sandbox on`).
    pub seccomp: bool,
}

/// What the check read, for the run report: each field as `/proc/<pid>/status` spells
/// it (`Seccomp` 2 is filtering; `CapEff` a hex mask; `NoNewPrivs` 1 is set).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Seen {
    pub seccomp: String,
    pub cap_eff: String,
    pub no_new_privs: String,
}

/// Checks the status text of `path` (a `/proc/<pid>/status`).
pub fn check_file(path: &Path, expected: Expected) -> Result<Seen, StatusError> {
    let text = std::fs::read_to_string(path).map_err(|source| StatusError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    check(path, &text, expected)
}

/// Checks status `text` (read from `path`, named in errors).
pub fn check(path: &Path, text: &str, e: Expected) -> Result<Seen, StatusError> {
    let field = |name: &'static str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let ids = |id: u32| [id; 4].map(|i| i.to_string()).join(" ");
    let mut wants: Vec<(&'static str, String)> = vec![
        ("Uid", ids(e.uid)),
        ("Gid", ids(e.gid)),
        ("NoNewPrivs", "1".into()),
    ];
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        wants.push((cap, "0000000000000000".into()));
    }
    if e.seccomp {
        wants.push(("Seccomp", "2".into()));
    }
    for (name, want) in wants {
        let found = field(name);
        if found != want {
            return Err(StatusError::Field {
                path: path.to_path_buf(),
                field: name,
                found,
                expected: want,
            });
        }
    }
    Ok(Seen {
        seccomp: field("Seccomp"),
        cap_eff: field("CapEff"),
        no_new_privs: field("NoNewPrivs"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "Name:\tqemu\nUid:\t3000001\t3000001\t3000001\t3000001\nGid:\t3000001\t3000001\t3000001\t3000001\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n";

    #[test]
    fn each_field_is_checked_and_named() {
        let e = Expected {
            uid: 3000001,
            gid: 3000001,
            seccomp: true,
        };
        let p = Path::new("/proc/1/status");
        let seen = check(p, GOOD, e).unwrap();
        assert_eq!(
            seen,
            Seen {
                seccomp: "2".into(),
                cap_eff: "0000000000000000".into(),
                no_new_privs: "1".into()
            }
        );
        for (from, to, field) in [
            ("Seccomp:\t2", "Seccomp:\t0", "Seccomp"),
            (
                "CapBnd:\t0000000000000000",
                "CapBnd:\t000001ffffffffff",
                "CapBnd",
            ),
            (
                "CapEff:\t0000000000000000",
                "CapEff:\t0000000000000001",
                "CapEff",
            ),
            ("NoNewPrivs:\t1", "NoNewPrivs:\t0", "NoNewPrivs"),
            (
                "Uid:\t3000001\t3000001\t3000001\t3000001",
                "Uid:\t3000001\t0\t3000001\t3000001",
                "Uid",
            ),
        ] {
            let bad = GOOD.replace(from, to);
            match check(p, &bad, e) {
                Err(StatusError::Field { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let no_seccomp = GOOD.replace("Seccomp:\t2", "Seccomp:\t0");
        check(
            p,
            &no_seccomp,
            Expected {
                seccomp: false,
                ..e
            },
        )
        .unwrap();
        assert!(check(p, "", e).is_err());
    }
}

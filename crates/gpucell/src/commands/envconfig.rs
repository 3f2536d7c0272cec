//! Image store settings from `GPUCELL_*` environment variables, read here at the edge so
//! that the libraries take explicit options:
//!
//! | variable | option |
//! |---|---|
//! | `GPUCELL_IMAGE_FS` (`erofs`/`ext4`) | `fs_type` |
//! | `GPUCELL_UNPACK_DIR` | `unpack_dir` (empty: unset) |
//! | `GPUCELL_MAX_UNPACKED_BYTES`, `GPUCELL_MAX_IMAGE_ENTRIES` | `limits` (positive integers) |
//! | `GPUCELL_REGISTRY_TOKEN` | bearer credentials |
//! | `GPUCELL_REGISTRY_USER` + `GPUCELL_REGISTRY_PASSWORD` | basic credentials |
//! | `GPUCELL_REGISTRY_INSECURE` (`1`/`0`) | plain HTTP |
//! | `GPUCELL_IMAGE_STREAM` (`1`/`0`) | `stream` (unpack while pulling) |
//!
//! They apply over the configuration file's `[image]` section (docs/config.md). A bad
//! value is an error naming the variable.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

use gpucell_image::{FsType, RegistryCredentials, StoreOptions};

/// A variable with a value gpucell cannot use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEnv {
    pub var: &'static str,
    pub why: String,
}

impl fmt::Display for BadEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "environment variable {}: {}; fix or unset it",
            self.var, self.why
        )
    }
}

impl std::error::Error for BadEnv {}

/// `base` (the configuration file's `[image]`) with the process environment's variables
/// over it.
pub fn store_options(base: StoreOptions) -> Result<StoreOptions, BadEnv> {
    store_options_from(base, |k| std::env::var_os(k))
}

/// `base` with the variables `get` returns over it (tests pass a map).
pub fn store_options_from(
    base: StoreOptions,
    get: impl Fn(&str) -> Option<OsString>,
) -> Result<StoreOptions, BadEnv> {
    let text = |var: &'static str| -> Result<Option<String>, BadEnv> {
        get(var)
            .map(|v| {
                v.into_string().map_err(|_| BadEnv {
                    var,
                    why: "is not valid UTF-8".into(),
                })
            })
            .transpose()
    };
    let positive = |var: &'static str, into: &mut u64| -> Result<(), BadEnv> {
        if let Some(v) = text(var)? {
            match v.trim().parse::<u64>() {
                Ok(n) if n > 0 => *into = n,
                _ => {
                    return Err(BadEnv {
                        var,
                        why: format!("{v:?} is not a positive integer"),
                    })
                }
            }
        }
        Ok(())
    };
    let mut o = base;
    if let Some(v) = text("GPUCELL_IMAGE_FS")? {
        o.fs_type = FsType::parse(&v).ok_or_else(|| BadEnv {
            var: "GPUCELL_IMAGE_FS",
            why: format!("{v:?} is not erofs or ext4"),
        })?;
    }
    if let Some(dir) = get("GPUCELL_UNPACK_DIR").filter(|d| !d.is_empty()) {
        o.unpack_dir = Some(PathBuf::from(dir));
    }
    positive("GPUCELL_MAX_UNPACKED_BYTES", &mut o.limits.max_bytes)?;
    positive("GPUCELL_MAX_IMAGE_ENTRIES", &mut o.limits.max_entries)?;
    let user = text("GPUCELL_REGISTRY_USER")?;
    let password = text("GPUCELL_REGISTRY_PASSWORD")?;
    o.registry.auth = match (text("GPUCELL_REGISTRY_TOKEN")?, user, password) {
        (Some(token), _, _) => RegistryCredentials::Bearer { token },
        (None, Some(username), Some(password)) => RegistryCredentials::Basic { username, password },
        (None, Some(_), None) => {
            return Err(BadEnv {
                var: "GPUCELL_REGISTRY_PASSWORD",
                why: "is not set but GPUCELL_REGISTRY_USER is".into(),
            })
        }
        (None, None, Some(_)) => {
            return Err(BadEnv {
                var: "GPUCELL_REGISTRY_USER",
                why: "is not set but GPUCELL_REGISTRY_PASSWORD is".into(),
            })
        }
        (None, None, None) => o.registry.auth,
    };
    o.registry.insecure = match text("GPUCELL_REGISTRY_INSECURE")?.as_deref() {
        None => o.registry.insecure,
        Some("" | "0") => false,
        Some("1") => true,
        Some(v) => {
            return Err(BadEnv {
                var: "GPUCELL_REGISTRY_INSECURE",
                why: format!("{v:?} is not 1 or 0"),
            })
        }
    };
    o.stream = match text("GPUCELL_IMAGE_STREAM")?.as_deref() {
        None | Some("") => o.stream,
        Some("0") => false,
        Some("1") => true,
        Some(v) => {
            return Err(BadEnv {
                var: "GPUCELL_IMAGE_STREAM",
                why: format!("{v:?} is not 1 or 0"),
            })
        }
    };
    Ok(o)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<StoreOptions, BadEnv> {
        store_options_from(StoreOptions::default(), |k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn nothing_set_is_the_default() {
        assert_eq!(from(&[]).unwrap(), StoreOptions::default());
        assert_eq!(
            from(&[("GPUCELL_UNPACK_DIR", "")]).unwrap().unpack_dir,
            None
        );
    }

    #[test]
    fn every_variable_lands_in_its_option() {
        let o = from(&[
            ("GPUCELL_IMAGE_FS", "ext4"),
            ("GPUCELL_UNPACK_DIR", "/srv/unpack"),
            ("GPUCELL_MAX_UNPACKED_BYTES", "4096"),
            ("GPUCELL_MAX_IMAGE_ENTRIES", "10"),
            ("GPUCELL_REGISTRY_USER", "u"),
            ("GPUCELL_REGISTRY_PASSWORD", "p"),
            ("GPUCELL_REGISTRY_INSECURE", "1"),
            ("GPUCELL_IMAGE_STREAM", "0"),
        ])
        .unwrap();
        assert!(!o.stream);
        assert_eq!(o.fs_type, FsType::Ext4);
        assert_eq!(o.unpack_dir, Some(PathBuf::from("/srv/unpack")));
        assert_eq!((o.limits.max_bytes, o.limits.max_entries), (4096, 10));
        assert_eq!(
            o.registry.auth,
            RegistryCredentials::Basic {
                username: "u".into(),
                password: "p".into()
            }
        );
        assert!(o.registry.insecure);
        // A token wins over a user and password.
        let o = from(&[
            ("GPUCELL_REGISTRY_TOKEN", "t"),
            ("GPUCELL_REGISTRY_USER", "u"),
        ])
        .unwrap();
        assert_eq!(
            o.registry.auth,
            RegistryCredentials::Bearer { token: "t".into() }
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value) in [
            ("GPUCELL_IMAGE_FS", "xfs"),
            ("GPUCELL_MAX_UNPACKED_BYTES", "0"),
            ("GPUCELL_MAX_UNPACKED_BYTES", "lots"),
            ("GPUCELL_MAX_IMAGE_ENTRIES", "-1"),
            ("GPUCELL_REGISTRY_INSECURE", "yes"),
            ("GPUCELL_IMAGE_STREAM", "no"),
        ] {
            let err = from(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var, "{err}");
            assert!(err.to_string().contains(var), "{err}");
        }
        let err = from(&[("GPUCELL_REGISTRY_USER", "u")]).unwrap_err();
        assert_eq!(err.var, "GPUCELL_REGISTRY_PASSWORD");
    }
}

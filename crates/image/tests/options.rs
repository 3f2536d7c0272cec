//! Store options as a caller or a config file gives them: defaults, unknown keys refused,
//! bad values refused naming the key, secrets never printed.
#![allow(clippy::unwrap_used)]

use gpucell_image::{FsType, RegistryCredentials, Store, StoreOptions};

#[test]
fn defaults_and_a_full_document() {
    let o: StoreOptions = serde_json::from_str("{}").unwrap();
    assert_eq!(o, StoreOptions::default());
    assert_eq!(o.fs_type, FsType::Erofs);
    let o: StoreOptions = serde_json::from_str(
        r#"{"fs_type":"ext4","unpack_dir":"/srv/unpack",
            "limits":{"max_bytes":1024},
            "registry":{"insecure":true,"auth":{"kind":"basic","username":"u","password":"p"}}}"#,
    )
    .unwrap();
    assert_eq!(o.fs_type, FsType::Ext4);
    assert_eq!(
        o.unpack_dir.as_deref(),
        Some(std::path::Path::new("/srv/unpack"))
    );
    assert_eq!(o.limits.max_bytes, 1024);
    assert_eq!(
        o.limits.max_entries,
        StoreOptions::default().limits.max_entries
    );
    assert!(o.registry.insecure);
    assert_eq!(
        o.registry.auth,
        RegistryCredentials::Basic {
            username: "u".into(),
            password: "p".into()
        }
    );
}

#[test]
fn unknown_keys_and_bad_values_are_refused_by_name() {
    for (doc, key) in [
        (r#"{"fs":"erofs"}"#, "fs"),
        (r#"{"fs_type":"xfs"}"#, "xfs"),
        (r#"{"limits":{"max_byte":1}}"#, "max_byte"),
        (
            r#"{"registry":{"auth":{"kind":"bearer","tokn":"x"}}}"#,
            "tokn",
        ),
        (r#"{"registry":{"auth":{"kind":"oauth"}}}"#, "oauth"),
    ] {
        let err = serde_json::from_str::<StoreOptions>(doc)
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{doc}: {err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut o = StoreOptions::default();
    o.limits.max_entries = 0;
    let err = Store::open_with(dir.path(), o).unwrap_err().to_string();
    assert!(err.contains("limits.max_entries"), "{err}");
    // Nothing was created for a refused store.
    assert!(!dir.path().join("images").exists());
    let o = StoreOptions {
        unpack_dir: Some("".into()),
        ..StoreOptions::default()
    };
    let err = Store::open_with(dir.path(), o).unwrap_err().to_string();
    assert!(err.contains("unpack_dir"), "{err}");
}

#[test]
fn secrets_are_not_printed() {
    let o: StoreOptions =
        serde_json::from_str(r#"{"registry":{"auth":{"kind":"bearer","token":"s3cr3t-token"}}}"#)
            .unwrap();
    let shown = format!("{o:?}");
    assert!(!shown.contains("s3cr3t"), "{shown}");
    assert!(shown.contains("Bearer"), "{shown}");
    let basic = RegistryCredentials::Basic {
        username: "alice".into(),
        password: "hunter2".into(),
    };
    let shown = format!("{basic:?}");
    assert!(
        shown.contains("alice") && !shown.contains("hunter2"),
        "{shown}"
    );
}

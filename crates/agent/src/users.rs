//! Resolves a run spec's `user` (`name`, `uid`, `name:group`, `uid:gid`) against the
//! image's `/etc/passwd` and `/etc/group`. Numeric ids work without those files.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, sorted, without duplicates.
    pub groups: Vec<u32>,
    /// Home directory from passwd, when the user has an entry.
    pub home: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user `{0}` not found in /etc/passwd of the image")]
    NoUser(String),
    #[error("group `{0}` not found in /etc/group of the image")]
    NoGroup(String),
    #[error("user spec `{0}` is malformed (expected user, uid, user:group or uid:gid)")]
    BadSpec(String),
}

/// Most supplementary groups a process may have (`NGROUPS_MAX`).
const MAX_GROUPS: usize = 65536;

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 7 || f[0].is_empty() || f[0].starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: &'a str,
}

fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 || f[0].is_empty() || f[0].starts_with('#') {
            return None;
        }
        Some(GroupEntry {
            name: f[0],
            gid: f[2].parse().ok()?,
            members: f[3],
        })
    })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && !s.contains(|c: char| c == ':' || c.is_whitespace() || c.is_control())
}

/// Resolves `spec` ("" means root). `passwd`/`group` are the files' contents when the
/// image has them.
pub fn resolve(spec: &str, passwd: Option<&str>, group: Option<&str>) -> Result<Ids, UserError> {
    let spec = spec.trim();
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    if !valid_name(user) || grp.is_some_and(|g| !valid_name(g)) {
        return Err(UserError::BadSpec(spec.chars().take(64).collect()));
    }
    let passwd = passwd.unwrap_or("");
    let group = group.unwrap_or("");

    // The user: a name must exist; a number may lack an entry (then gid 0, no home).
    let (uid, mut gid, name, home) = match user.parse::<u32>() {
        Ok(uid) => match passwd_entries(passwd).find(|e| e.uid == uid) {
            Some(e) => (uid, e.gid, Some(e.name), Some(e.home)),
            None => (uid, 0, None, None),
        },
        Err(_) => {
            let e = passwd_entries(passwd)
                .find(|e| e.name == user)
                .ok_or_else(|| UserError::NoUser(user.to_owned()))?;
            (e.uid, e.gid, Some(e.name), Some(e.home))
        }
    };
    if let Some(g) = grp {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group_entries(group)
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| UserError::NoGroup(g.to_owned()))?,
        };
    }
    let mut groups = vec![gid];
    if let Some(n) = name {
        groups.extend(
            group_entries(group)
                .filter(|e| e.members.split(',').any(|m| m.trim() == n))
                .map(|e| e.gid)
                .take(MAX_GROUPS - 1),
        );
    }
    groups.sort_unstable();
    groups.dedup();
    Ok(Ids {
        uid,
        gid,
        groups,
        home: home.filter(|h| h.starts_with('/')).map(str::to_owned),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
# comment\n\
broken line\n\
app:x:1000:1000:App,,,:/home/app:/bin/sh\n\
svc:x:999:998::/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str =
        "root:x:0:\nvideo:x:44:app,svc\nrender:x:105:app\napp:x:1000:\nsvc:x:998:\n";

    #[test]
    fn names_numbers_and_groups() {
        let r = resolve("", Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!(
            (r.uid, r.gid, r.groups.clone(), r.home.as_deref()),
            (0, 0, vec![0], Some("/root"))
        );
        let a = resolve("app", Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!((a.uid, a.gid), (1000, 1000));
        assert_eq!(a.groups, vec![44, 105, 1000]);
        assert_eq!(a.home.as_deref(), Some("/home/app"));
        let b = resolve("app:video", Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!((b.uid, b.gid), (1000, 44));
        assert_eq!(b.groups, vec![44, 105]);
        let c = resolve("999", Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!((c.uid, c.gid, c.groups.clone()), (999, 998, vec![44, 998]));
        let d = resolve("svc:5", Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!((d.uid, d.gid), (999, 5));
    }

    #[test]
    fn numeric_ids_work_without_files() {
        let r = resolve("1234:5678", None, None).unwrap();
        assert_eq!(
            r,
            Ids {
                uid: 1234,
                gid: 5678,
                groups: vec![5678],
                home: None
            }
        );
        let r = resolve("4321", None, None).unwrap();
        assert_eq!((r.uid, r.gid), (4321, 0));
    }

    #[test]
    fn missing_names_are_errors_naming_them() {
        assert_eq!(
            resolve("nobody", Some(PASSWD), Some(GROUP)),
            Err(UserError::NoUser("nobody".into()))
        );
        assert_eq!(
            resolve("app:wheel", Some(PASSWD), Some(GROUP)),
            Err(UserError::NoGroup("wheel".into()))
        );
        assert_eq!(
            resolve("app", None, None),
            Err(UserError::NoUser("app".into()))
        );
        let e = resolve("nobody", None, None).unwrap_err().to_string();
        assert!(e.contains("`nobody`") && e.contains("/etc/passwd"), "{e}");
        assert!(matches!(
            resolve("a b", None, None),
            Err(UserError::BadSpec(_))
        ));
        assert!(matches!(
            resolve("a:b:c", None, None),
            Err(UserError::BadSpec(_))
        ));
    }
}

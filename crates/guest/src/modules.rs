//! Kernel module selection: resolves the modules a flavour asks for, with their
//! dependencies from `modules.dep` (written by `depmod -b`), into a load order.

use crate::flavour::When;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("module `{0}` is neither in modules.dep nor in modules.builtin of kernel {1}; check the flavour's module list")]
    Unknown(String, String),
    #[error("modules.dep line {line} is malformed: `{text}`")]
    BadLine { line: usize, text: String },
    #[error("module `{0}` depends on `{1}`, which modules.dep does not list")]
    MissingDep(String, String),
    #[error("modules.dep has a dependency cycle through `{0}`")]
    Cycle(String),
}

/// A module to put in the initramfs, in load order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    /// Canonical name (`-` written as `_`), e.g. `virtio_blk`.
    pub name: String,
    /// Path relative to `/lib/modules/<release>/`, e.g. `kernel/drivers/block/virtio_blk.ko`.
    pub path: String,
    /// When the agent loads it ([`crate::flavour::When::tag`]); `always` from [`resolve`].
    pub tag: String,
}

/// Canonical module name of a path or a name: basename without `.ko*`, `-` → `_`.
pub fn canonical_name(s: &str) -> String {
    let base = s.rsplit('/').next().unwrap_or(s);
    let base = ["ko.xz", "ko.zst", "ko.gz", "ko"]
        .iter()
        .find_map(|ext| base.strip_suffix(&format!(".{ext}")))
        .unwrap_or(base);
    base.replace('-', "_")
}

/// Parsed `modules.dep`: module name → (path, dependency paths).
#[derive(Debug, Default)]
pub struct DepTable {
    by_name: BTreeMap<String, (String, Vec<String>)>,
}

impl DepTable {
    pub fn parse(text: &str) -> Result<Self, ModulesError> {
        let mut by_name = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let Some((path, deps)) = line.split_once(':') else {
                return Err(ModulesError::BadLine {
                    line: i + 1,
                    text: line.chars().take(200).collect(),
                });
            };
            let path = path.trim();
            if path.is_empty() {
                return Err(ModulesError::BadLine {
                    line: i + 1,
                    text: line.chars().take(200).collect(),
                });
            }
            let deps = deps.split_whitespace().map(str::to_owned).collect();
            by_name.insert(canonical_name(path), (path.to_owned(), deps));
        }
        Ok(Self { by_name })
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Names of the modules built into the kernel (`modules.builtin`).
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(canonical_name)
        .collect()
}

/// The result of resolving a flavour's module list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Modules to load, dependencies before their users.
    pub load_order: Vec<ModuleFile>,
    /// Requested modules that are built into the kernel (nothing to load).
    pub builtin: Vec<String>,
}

/// Resolves `wanted` into a load order: each module after all it depends on, each once,
/// in the order first needed. Built-in modules are skipped; unknown ones are an error.
pub fn resolve(
    wanted: &[&str],
    deps: &DepTable,
    builtin: &BTreeSet<String>,
    release: &str,
) -> Result<Resolved, ModulesError> {
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    let mut builtin_hit = Vec::new();
    for w in wanted {
        let name = canonical_name(w);
        if deps.by_name.contains_key(&name) {
            visit(&name, deps, &mut done, &mut Vec::new(), &mut order)?;
        } else if builtin.contains(&name) {
            builtin_hit.push(name);
        } else {
            return Err(ModulesError::Unknown(name, release.to_owned()));
        }
    }
    Ok(Resolved {
        load_order: order,
        builtin: builtin_hit,
    })
}

/// Resolves a flavour's conditional module list: one load order for all of them, each
/// module tagged with the one condition that needs it. A module that an `always` module
/// needs, or that two conditions need, is loaded always; the agent then keeps every
/// module's dependencies whatever it skips.
pub fn resolve_tagged(
    wanted: &[(When, &str)],
    deps: &DepTable,
    builtin: &BTreeSet<String>,
    release: &str,
) -> Result<Resolved, ModulesError> {
    let names: Vec<&str> = wanted.iter().map(|(_, n)| *n).collect();
    let mut all = resolve(&names, deps, builtin, release)?;
    let mut conditions: Vec<When> = Vec::new();
    for (w, _) in wanted {
        if !conditions.contains(w) {
            conditions.push(*w);
        }
    }
    let mut closures = Vec::new();
    for w in &conditions {
        let group: Vec<&str> = wanted
            .iter()
            .filter(|(c, _)| c == w)
            .map(|(_, n)| *n)
            .collect();
        let closure: BTreeSet<String> = resolve(&group, deps, builtin, release)?
            .load_order
            .into_iter()
            .map(|m| m.name)
            .collect();
        closures.push((*w, closure));
    }
    for m in &mut all.load_order {
        let needed_by: Vec<When> = closures
            .iter()
            .filter(|(_, c)| c.contains(&m.name))
            .map(|(w, _)| *w)
            .collect();
        m.tag = match needed_by.as_slice() {
            [only] => only.tag(),
            _ => When::Always.tag(),
        };
    }
    Ok(all)
}

fn visit(
    name: &str,
    deps: &DepTable,
    done: &mut BTreeSet<String>,
    stack: &mut Vec<String>,
    order: &mut Vec<ModuleFile>,
) -> Result<(), ModulesError> {
    if done.contains(name) {
        return Ok(());
    }
    if stack.iter().any(|s| s == name) {
        return Err(ModulesError::Cycle(name.to_owned()));
    }
    let (path, dep_paths) = deps
        .by_name
        .get(name)
        .ok_or_else(|| ModulesError::Unknown(name.to_owned(), String::new()))?;
    stack.push(name.to_owned());
    // depmod lists a module's dependencies with the ones loaded last first; visiting them
    // in reverse keeps modprobe's order, and the recursion makes it correct either way.
    for dep in dep_paths.iter().rev() {
        let dep_name = canonical_name(dep);
        if !deps.by_name.contains_key(&dep_name) {
            return Err(ModulesError::MissingDep(name.to_owned(), dep_name));
        }
        visit(&dep_name, deps, done, stack, order)?;
    }
    stack.pop();
    done.insert(name.to_owned());
    order.push(ModuleFile {
        name: name.to_owned(),
        path: path.clone(),
        tag: When::Always.tag(),
    });
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/lib/crc16.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/arch/x86/crypto/crc32c-intel.ko.xz:
";

    fn names(r: &Resolved) -> Vec<&str> {
        r.load_order.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let t = DepTable::parse(DEP).unwrap();
        let builtin = parse_builtin("kernel/drivers/virtio/virtio_pci.ko\n");
        let r = resolve(
            &[
                "virtio_pci",
                "virtio_blk",
                "virtio-console",
                "ext4",
                "vmw_vsock_virtio_transport",
            ],
            &t,
            &builtin,
            "6.1",
        )
        .unwrap();
        assert_eq!(r.builtin, ["virtio_pci"]);
        let n = names(&r);
        assert_eq!(
            n,
            [
                "virtio_ring",
                "virtio",
                "virtio_blk",
                "virtio_console",
                "jbd2",
                "mbcache",
                "crc16",
                "ext4",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport"
            ]
        );
        // Every module after each of its dependencies.
        for m in &r.load_order {
            let pos = n.iter().position(|x| *x == m.name).unwrap();
            for d in &t.by_name[&m.name].1 {
                let dpos = n.iter().position(|x| *x == canonical_name(d)).unwrap();
                assert!(dpos < pos, "{} before its dependency {}", m.name, d);
            }
        }
        assert_eq!(r.load_order[2].path, "kernel/drivers/block/virtio_blk.ko");
    }

    #[test]
    fn conditions_tag_modules_and_shared_dependencies_are_always_loaded() {
        let t = DepTable::parse(DEP).unwrap();
        let r = resolve_tagged(
            &[
                (When::Always, "virtio_blk"),
                (When::Channel("serial"), "virtio_console"),
                (When::Channel("vsock"), "vmw_vsock_virtio_transport"),
                (When::Rootfs("ext4"), "ext4"),
            ],
            &t,
            &BTreeSet::new(),
            "6.1",
        )
        .unwrap();
        let tags: Vec<(&str, &str)> = r
            .load_order
            .iter()
            .map(|m| (m.name.as_str(), m.tag.as_str()))
            .collect();
        assert_eq!(
            tags,
            [
                // virtio and virtio_ring: needed by every group, loaded always.
                ("virtio_ring", "always"),
                ("virtio", "always"),
                ("virtio_blk", "always"),
                ("virtio_console", "channel=serial"),
                ("vsock", "channel=vsock"),
                ("vmw_vsock_virtio_transport_common", "channel=vsock"),
                ("vmw_vsock_virtio_transport", "channel=vsock"),
                ("jbd2", "rootfs=ext4"),
                ("mbcache", "rootfs=ext4"),
                ("crc16", "rootfs=ext4"),
                ("ext4", "rootfs=ext4"),
            ]
        );
        // Unconditional resolution tags everything `always`.
        let r = resolve(&["ext4"], &t, &BTreeSet::new(), "6.1").unwrap();
        assert!(r.load_order.iter().all(|m| m.tag == "always"));
    }

    #[test]
    fn names_are_canonical() {
        assert_eq!(
            canonical_name("kernel/arch/x86/crypto/crc32c-intel.ko.xz"),
            "crc32c_intel"
        );
        assert_eq!(canonical_name("a/b/overlay.ko.zst"), "overlay");
        let t = DepTable::parse(DEP).unwrap();
        let r = resolve(&["crc32c-intel"], &t, &BTreeSet::new(), "6.1").unwrap();
        assert_eq!(
            r.load_order[0].path,
            "kernel/arch/x86/crypto/crc32c-intel.ko.xz"
        );
    }

    #[test]
    fn unknown_missing_and_cyclic_modules_are_errors() {
        let t = DepTable::parse(DEP).unwrap();
        let err = resolve(&["nvidia"], &t, &BTreeSet::new(), "6.1.0-56-amd64").unwrap_err();
        assert!(err.to_string().contains("`nvidia`"), "{err}");
        assert!(err.to_string().contains("6.1.0-56-amd64"), "{err}");

        let t = DepTable::parse("a.ko: b.ko\n").unwrap();
        assert!(matches!(
            resolve(&["a"], &t, &BTreeSet::new(), "x"),
            Err(ModulesError::MissingDep(a, b)) if a == "a" && b == "b"
        ));
        let t = DepTable::parse("a.ko: b.ko\nb.ko: a.ko\n").unwrap();
        assert!(matches!(
            resolve(&["a"], &t, &BTreeSet::new(), "x"),
            Err(ModulesError::Cycle(_))
        ));
        assert!(matches!(
            DepTable::parse("no colon here\n"),
            Err(ModulesError::BadLine { line: 1, .. })
        ));
    }
}

//! The microVM kernel pipeline (unpack, configure, check the config, compile, package,
//! cache) with fake dpkg-deb, tar and make: no real kernel is compiled here. The real
//! build is exercised by `gpucell guest build --kernel microvm` (docs/guest.md).
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use gpucell_guest::kernel::{build_cached, KernelError, Tools};

const DPKG_DEB: &str = r#"#!/bin/sh
set -e
case "$1" in
  -x) mkdir -p "$3/usr/src"; : > "$3/usr/src/linux-source-6.1.tar.xz" ;;
  -f) grep -E '^(Package|Version):' "$2" ;;
  *) while [ "$1" != -b ]; do shift; done; cp "$2/DEBIAN/control" "$3" ;;
esac
"#;

const TAR: &str = r#"#!/bin/sh
s="$4/linux-source-6.1"
mkdir -p "$s/include/linux" "$s/scripts" "$s/arch/x86/include/asm" "$s/arch/x86/kernel" "$s/fs"
echo all: > "$s/Makefile"; echo x86: > "$s/arch/x86/Makefile"
echo '#define X 1' > "$s/include/linux/x.h"; echo '#define A 1' > "$s/arch/x86/include/asm/a.h"
echo k: > "$s/scripts/Kbuild.include"; echo 'int f;' > "$s/fs/f.c"; echo 'int k;' > "$s/arch/x86/kernel/k.c"
"#;

/// `make -C SRC O=OBJ ARGS...`; its behaviour is steered by files next to it:
/// `drop` (a config line allnoconfig leaves out), `fail` (the compile fails).
const MAKE: &str = r#"#!/bin/sh
here=$(dirname "$0")
obj=; all=; mod=
for a in "$@"; do
  case "$a" in
    O=*) obj=${a#O=} ;;
    KCONFIG_ALLCONFIG=*) all=${a#KCONFIG_ALLCONFIG=} ;;
    INSTALL_MOD_PATH=*) mod=${a#INSTALL_MOD_PATH=} ;;
  esac
done
case " $* " in
  *" allnoconfig "*) mkdir -p "$obj"
     if [ -f "$here/drop" ]; then grep -vxF "$(cat "$here/drop")" "$all" > "$obj/.config"
     else cp "$all" "$obj/.config"; fi ;;
  *" bzImage "*) echo compile >> "$here/calls"
     if [ -f "$here/fail" ]; then echo "fs/boom.c:1: error: boom" >&2; exit 2; fi
     mkdir -p "$obj/arch/x86/boot" "$obj/include/config" "$obj/include/generated" "$obj/scripts/mod" "$obj/fs"
     echo kernel > "$obj/arch/x86/boot/bzImage"
     : > "$obj/Module.symvers"; : > "$obj/fs/f.o"; echo '#define U 1' > "$obj/include/generated/autoconf.h"
     echo modpost > "$obj/scripts/mod/modpost"; : > "$obj/scripts/mod/modpost.o"; : > "$obj/scripts/mod/.modpost.cmd"
     echo 6.1.192-gpucell > "$obj/include/config/kernel.release" ;;
  *" modules_install "*) mkdir -p "$mod/lib/modules/6.1.192-gpucell/kernel"
     : > "$mod/lib/modules/6.1.192-gpucell/modules.builtin"
     ln -s /nonexistent "$mod/lib/modules/6.1.192-gpucell/build" ;;
esac
"#;

fn fakes(dir: &Path) -> Tools {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    for (name, text) in [("dpkg-deb", DPKG_DEB), ("tar", TAR), ("make", MAKE)] {
        let p = bin.join(name);
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    Tools {
        make: bin.join("make"),
        tar: bin.join("tar"),
        dpkg_deb: bin.join("dpkg-deb"),
        jobs: 2,
    }
}

fn source_deb(dir: &Path) -> PathBuf {
    let p = dir.join("linux-source-6.1_6.1.192-3_all.deb");
    fs::write(&p, b"not really a deb").unwrap();
    p
}

fn compiles(dir: &Path) -> usize {
    fs::read_to_string(dir.join("bin/calls"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

fn leftovers(kernels: &Path) -> Vec<String> {
    fs::read_dir(kernels)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".build-"))
        .collect()
}

/// The build tree a cached kernel keeps: Makefiles, headers, scripts and config of the
/// source and object trees, without C sources, objects or command files.
const KEPT: &[&str] = &[
    ".config",
    "Makefile",
    "Module.symvers",
    "arch/x86/Makefile",
    "arch/x86/include/asm/a.h",
    "include/config/kernel.release",
    "include/generated/autoconf.h",
    "include/linux/x.h",
    "scripts/Kbuild.include",
    "scripts/mod/modpost",
];

fn tree_files(cache_dir: &Path) -> Vec<String> {
    let root = cache_dir.join(gpucell_guest::kernel::BUILD_TREE);
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(
                    p.strip_prefix(&root)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out.sort();
    out
}

#[test]
fn builds_once_then_serves_the_cache() {
    let t = tempfile::tempdir().unwrap();
    let tools = fakes(t.path());
    let src = source_deb(t.path());
    let kernels = t.path().join("kernels");
    let quiet = |_: &str| {};

    let first = build_cached(
        &kernels,
        "6.1.192-3",
        || Ok(src.clone()),
        &tools,
        false,
        &quiet,
    )
    .unwrap();
    assert_eq!(first.package, "linux-image-6.1.192-gpucell");
    assert_eq!(first.version, "6.1.192-3");
    assert!(first
        .path
        .starts_with(kernels.join(gpucell_guest::kernel::cache_key("6.1.192-3"))));
    assert_eq!(
        first.path.file_name().unwrap().to_string_lossy(),
        "linux-image-6.1.192-gpucell_6.1.192-3_amd64.deb"
    );
    assert_eq!(compiles(t.path()), 1);
    assert!(leftovers(&kernels).is_empty(), "{:?}", leftovers(&kernels));
    let dir = first.path.parent().unwrap();
    assert_eq!(
        gpucell_guest::kernel::cache_identity(&first.path).as_deref(),
        Some(dir.file_name().unwrap().to_str().unwrap())
    );
    assert_eq!(tree_files(dir), KEPT);

    // Cached: the source is not fetched and nothing is compiled.
    let again = build_cached(
        &kernels,
        "6.1.192-3",
        || panic!("the source must not be fetched for a cached kernel"),
        &tools,
        false,
        &quiet,
    )
    .unwrap();
    assert_eq!(again.sha256, first.sha256);
    assert_eq!(compiles(t.path()), 1);

    // A cached package without its build tree (which NVIDIA's modules need) is rebuilt.
    fs::remove_dir_all(dir.join(gpucell_guest::kernel::BUILD_TREE)).unwrap();
    build_cached(
        &kernels,
        "6.1.192-3",
        || Ok(src.clone()),
        &tools,
        false,
        &quiet,
    )
    .unwrap();
    assert_eq!(compiles(t.path()), 2);
    assert_eq!(tree_files(dir), KEPT);

    // Another source version is another kernel; force rebuilds.
    build_cached(
        &kernels,
        "6.1.193-1",
        || Ok(src.clone()),
        &tools,
        false,
        &quiet,
    )
    .unwrap();
    build_cached(
        &kernels,
        "6.1.192-3",
        || Ok(src.clone()),
        &tools,
        true,
        &quiet,
    )
    .unwrap();
    assert_eq!(compiles(t.path()), 4);
}

#[test]
fn an_option_kconfig_drops_fails_the_build() {
    let t = tempfile::tempdir().unwrap();
    let tools = fakes(t.path());
    fs::write(t.path().join("bin/drop"), "CONFIG_DRM=y").unwrap();
    let src = source_deb(t.path());
    let kernels = t.path().join("kernels");
    let err = build_cached(
        &kernels,
        "6.1.192-3",
        || Ok(src.clone()),
        &tools,
        false,
        &|_| {},
    )
    .unwrap_err();
    assert!(matches!(err, KernelError::MissingOptions(_)), "{err:?}");
    assert!(err.to_string().contains("CONFIG_DRM=y"), "{err}");
    assert_eq!(compiles(t.path()), 0);
}

#[test]
fn a_failed_compile_shows_the_log_and_the_next_build_resumes() {
    let t = tempfile::tempdir().unwrap();
    let tools = fakes(t.path());
    fs::write(t.path().join("bin/fail"), "").unwrap();
    let src = source_deb(t.path());
    let kernels = t.path().join("kernels");
    let err = build_cached(
        &kernels,
        "6.1.192-3",
        || Ok(src.clone()),
        &tools,
        false,
        &|_| {},
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("make bzImage modules") && text.contains("boom"),
        "{text}"
    );
    assert!(text.contains("resumes"), "{text}");
    let KernelError::Failed { log, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(fs::read_to_string(log).unwrap().contains("boom"));
    assert_eq!(
        leftovers(&kernels).len(),
        1,
        "the work dir is kept to resume from"
    );
    // Nothing half-built is served as cached, and the unpacked source is reused.
    fs::remove_file(t.path().join("bin/fail")).unwrap();
    let d = build_cached(
        &kernels,
        "6.1.192-3",
        || panic!("the unpacked source must be reused"),
        &tools,
        false,
        &|_| {},
    )
    .unwrap();
    assert!(d.path.is_file());
    assert_eq!(compiles(t.path()), 2);
    assert!(leftovers(&kernels).is_empty(), "{:?}", leftovers(&kernels));
}

#[test]
fn a_source_package_without_a_tarball_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let mut tools = fakes(t.path());
    let noop = t.path().join("bin/true-x");
    fs::write(&noop, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&noop, fs::Permissions::from_mode(0o755)).unwrap();
    tools.dpkg_deb = noop;
    let src = source_deb(t.path());
    let err = build_cached(
        &t.path().join("kernels"),
        "6.1.192-3",
        || Ok(src.clone()),
        &tools,
        false,
        &|_| {},
    )
    .unwrap_err();
    assert!(matches!(err, KernelError::NoTarball(_)), "{err:?}");
    assert!(err.to_string().contains("linux-source"), "{err}");
}

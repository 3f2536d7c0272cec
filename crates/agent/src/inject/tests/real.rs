//! The real thing, as root: a busybox container root, a driver root holding a shared object
//! built with gcc, the spec generated from it, real bind mounts, the image's own ldconfig
//! run chrooted, real device nodes. Runs in a thread with its own mount namespace, so the
//! mounts vanish with the thread whatever happens.

use super::*;
use gpucell_nvidia::cdi::{generate, GenerateOptions};
use std::process::Command;

fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (bind mounts, mknod, chroot)".into());
    }
    for (tool, path) in [
        ("busybox-static", "/bin/busybox"),
        ("ldconfig", "/sbin/ldconfig"),
    ] {
        if !Path::new(path).is_file() {
            return Some(format!("{tool} ({path}) is missing"));
        }
    }
    let gcc = Command::new("gcc").arg("--version").output();
    if !gcc.is_ok_and(|o| o.status.success()) {
        return Some("gcc is missing (it builds the fake driver's libcuda)".into());
    }
    None
}

fn copy_exec(from: &str, to: &Path) {
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    fs::copy(from, to).unwrap();
    fs::set_permissions(to, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Builds the driver root and the container root under `base`.
fn build(base: &Path) -> (PathBuf, PathBuf) {
    let driver = base.join("driver");
    let lib = driver.join("usr/lib/x86_64-linux-gnu");
    fs::create_dir_all(&lib).unwrap();
    let src = base.join("cuda.c");
    fs::write(
        &src,
        "int cuInit(unsigned int flags) { return (int)flags; }\n",
    )
    .unwrap();
    let out = Command::new("gcc")
        .args([
            "-shared",
            "-fPIC",
            "-nostdlib",
            "-Wl,-soname,libcuda.so.1",
            "-o",
        ])
        .arg(lib.join(format!("libcuda.so.{V}")))
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let smi = driver.join("usr/bin/nvidia-smi");
    fs::create_dir_all(smi.parent().unwrap()).unwrap();
    fs::write(&smi, "#!/bin/sh\necho 'GPU 0: fake (UUID: GPU-0)'\n").unwrap();
    fs::set_permissions(&smi, fs::Permissions::from_mode(0o755)).unwrap();

    let root = base.join("root");
    copy_exec("/bin/busybox", &root.join("bin/busybox"));
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    copy_exec("/sbin/ldconfig", &root.join("sbin/ldconfig"));
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(root.join("dev")).unwrap();
    (driver, root)
}

fn chrooted(root: &Path, args: &[&str]) -> String {
    let out = Command::new("chroot")
        .arg(root)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn inject_for_real(base: &Path) {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
    let none = None::<&str>;
    nix::mount::mount(
        none,
        "/",
        none,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        none,
    )
    .unwrap();
    let (driver, root) = build(base);
    let mut o = GenerateOptions::new(&driver);
    o.gpus = vec![GpuNode {
        index: 0,
        minor: 0,
        uuid: None,
        bdf: None,
    }];
    let generated = generate(&o).unwrap();
    let opts = Options {
        compat_allowed: false,
        params_source: base.join("absent-params"),
        state_dir: base.join("state"),
    };
    let started = Instant::now();
    let p = plan(&generated.spec, &VisibleDevices::All, &root).unwrap();
    let report = apply_root(&p, &root, &opts, &mut RealOps).unwrap();
    apply_devices(&report.devices, &root, &mut RealOps).unwrap();
    eprintln!("injection took {:?}: {report:?}", started.elapsed());

    // The library is the driver's, read-only.
    let mounted = root.join(format!("usr/lib/x86_64-linux-gnu/libcuda.so.{V}"));
    assert_eq!(
        fs::read(&mounted).unwrap(),
        fs::read(driver.join(format!("usr/lib/x86_64-linux-gnu/libcuda.so.{V}"))).unwrap()
    );
    let w = fs::OpenOptions::new().write(true).open(&mounted);
    assert_eq!(w.unwrap_err().raw_os_error(), Some(libc::EROFS));
    // libcuda.so.1 resolves through the image's own ld.so.cache.
    let cache = chrooted(&root, &["/sbin/ldconfig", "-p"]);
    assert!(
        cache.contains("libcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1"),
        "{cache}"
    );
    // nvidia-smi is on the PATH.
    let smi = chrooted(&root, &["/bin/sh", "-c", "PATH=/usr/bin:/bin nvidia-smi"]);
    assert_eq!(smi, "GPU 0: fake (UUID: GPU-0)\n");
    // The GPU's node, with the driver's numbers and mode.
    use std::os::unix::fs::MetadataExt;
    let md = fs::metadata(root.join("dev/nvidia0")).unwrap();
    assert!(md.file_type().is_char_device());
    assert_eq!(
        (
            nix::sys::stat::major(md.rdev()),
            nix::sys::stat::minor(md.rdev())
        ),
        (195, 0)
    );
    assert_eq!(md.mode() & 0o777, 0o666);
    // This machine has no NVIDIA driver: no control nodes, no params, said so.
    assert!(!root.join("dev/nvidiactl").exists());
    assert_eq!(report.devices.params, None);
    assert!(report.warnings.iter().any(|w| w.contains("absent-params")));
}

#[test]
fn real_mounts_into_a_busybox_root() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP real_mounts_into_a_busybox_root: {why}");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let b = base.path().to_owned();
    // Its own thread: unshare(CLONE_NEWNS) applies to it alone, and its namespace (with
    // every mount made) goes when it ends, before the temp dir is removed.
    let joined = std::thread::spawn(move || inject_for_real(&b)).join();
    if let Err(panic) = joined {
        std::panic::resume_unwind(panic);
    }
}

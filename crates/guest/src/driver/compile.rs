//! Compiling the NVIDIA kernel modules against the guest kernel's headers with the
//! driver's own Makefile (`make modules SYSSRC=... SYSOUT=...`): no DKMS, no chroot.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::table::{DriverFlavour, Patch};
use super::DriverError;

/// The modules gpucell builds; the others the Makefile knows are excluded.
pub const BUILT_MODULES: &[&str] = &["nvidia", "nvidia-uvm"];
const EXCLUDED_MODULES: &str = "nvidia-drm nvidia-modeset nvidia-peermem nvidia-vgpu-vfio";

/// Where the unpacked headers are: `<root>/usr/src/linux-headers-{abi}-common` (SYSSRC)
/// and `<root>/usr/src/linux-headers-{release}` (SYSOUT).
#[derive(Debug, Clone)]
pub struct Headers {
    pub sys_src: PathBuf,
    pub sys_out: PathBuf,
}

impl Headers {
    /// `6.1.0-57-amd64` → the ABI `6.1.0-57` and the two dirs under `root`.
    pub fn locate(root: &Path, release: &str) -> Result<Self, DriverError> {
        let abi = kernel_abi(release)?;
        let src = root.join("usr/src");
        let h = Headers {
            sys_src: src.join(format!("linux-headers-{abi}-common")),
            sys_out: src.join(format!("linux-headers-{release}")),
        };
        for d in [&h.sys_src, &h.sys_out] {
            if !d.join("Makefile").is_file() {
                return Err(DriverError::Headers(format!(
                    "{} has no Makefile; the header packages are incomplete",
                    d.display()
                )));
            }
        }
        Ok(h)
    }

    /// Debian's `linux-headers-<release>/Makefile` includes the `-common` Makefile by an
    /// absolute `/usr/src/...` path; points it into the unpacked tree.
    pub fn fix_makefile(&self, root: &Path) -> Result<(), DriverError> {
        let mk = self.sys_out.join("Makefile");
        let text = fs::read_to_string(&mk).map_err(|e| DriverError::io(&mk, e))?;
        let fixed = fix_include(&text, &root.join("usr/src"));
        fs::write(&mk, fixed).map_err(|e| DriverError::io(&mk, e))
    }
}

/// Rewrites `include /usr/src/...` lines to `include <src>/...`.
pub fn fix_include(text: &str, src: &Path) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.split_inclusive('\n') {
        match line.strip_prefix("include /usr/src/") {
            Some(rest) => out.push_str(&format!("include {}/{rest}", src.display())),
            None => out.push_str(line),
        }
    }
    out
}

/// `6.1.0-57-amd64` → `6.1.0-57`; `6.1.0-57-cloud-amd64` → `6.1.0-57`.
pub fn kernel_abi(release: &str) -> Result<String, DriverError> {
    let parts: Vec<&str> = release.splitn(3, '-').collect();
    match parts.as_slice() {
        [ver, abi, _flavour]
            if ver.split('.').count() == 3 && abi.bytes().all(|b| b.is_ascii_digit()) =>
        {
            Ok(format!("{ver}-{abi}"))
        }
        _ => Err(DriverError::Headers(format!(
            "kernel release `{release}` is not a Debian one (VERSION-ABI-FLAVOUR)"
        ))),
    }
}

/// `6.1.0-57-amd64` → `linux-kbuild-6.1`.
pub fn kbuild_package(release: &str) -> String {
    let mm: Vec<&str> = release.split('.').take(2).collect();
    format!("linux-kbuild-{}", mm.join("."))
}

/// Applies the flavour's patches whose condition the headers meet; returns their names.
pub fn apply_patches(
    source: &Path,
    headers: &Headers,
    patches: &[&Patch],
) -> Result<Vec<String>, DriverError> {
    let mut applied = Vec::new();
    for p in patches {
        let hdr = headers.sys_src.join(&p.when_header);
        let hdr_text = fs::read_to_string(&hdr).map_err(|e| DriverError::io(&hdr, e))?;
        if !hdr_text.contains(&p.when_contains) {
            continue;
        }
        let file = source.join(&p.file);
        let text = fs::read_to_string(&file).map_err(|e| DriverError::io(&file, e))?;
        let patched = apply_patch(&text, p)?;
        fs::write(&file, patched).map_err(|e| DriverError::io(&file, e))?;
        applied.push(p.name.clone());
    }
    Ok(applied)
}

/// The text with `p.find` replaced by `p.replace`; the find text must occur exactly once.
pub fn apply_patch(text: &str, p: &Patch) -> Result<String, DriverError> {
    let n = text.matches(&p.find).count();
    if n != 1 {
        return Err(DriverError::Patch {
            name: p.name.clone(),
            file: p.file.clone(),
            found: n,
        });
    }
    Ok(text.replacen(&p.find, &p.replace, 1))
}

/// Compile progress as the Makefile's output shows it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Phases {
    pub conftests: usize,
    pub compiled: usize,
    pub linked: usize,
}

impl Phases {
    /// Counts one line of `make` output; returns the phase it starts, if new.
    pub fn feed(&mut self, line: &str) -> Option<&'static str> {
        let l = line.trim_start();
        if l.starts_with("CONFTEST:") {
            self.conftests += 1;
            (self.conftests == 1).then_some("conftest (probing the kernel's API)")
        } else if l.starts_with("CC [M]") {
            self.compiled += 1;
            (self.compiled == 1).then_some("compiling")
        } else if l.starts_with("LD [M]") || l.starts_with("MODPOST") {
            self.linked += 1;
            (self.linked == 1).then_some("linking")
        } else {
            None
        }
    }
}

/// Runs the driver's Makefile; stdout (the phase lines) is read for progress, stderr
/// goes to `log`. On failure the error holds the log's last lines.
pub fn make(
    source: &Path,
    headers: &Headers,
    log: &Path,
    progress: &dyn Fn(&str),
) -> Result<Duration, DriverError> {
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let log_file = fs::File::create(log).map_err(|e| DriverError::io(log, e))?;
    let mut cmd = Command::new("make");
    cmd.current_dir(source)
        .arg(format!("-j{jobs}"))
        .arg("modules")
        .arg(format!("SYSSRC={}", headers.sys_src.display()))
        .arg(format!("SYSOUT={}", headers.sys_out.display()))
        .arg(format!("NV_EXCLUDE_KERNEL_MODULES={EXCLUDED_MODULES}"))
        // The headers' config asks for debug information, which nobody reads in a guest:
        // with it the build tree takes gigabytes (a CI machine ran out of disk linking
        // nvidia.ko) and the link takes minutes. `-g0` comes last, so it wins.
        .arg("KCFLAGS=-g0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| DriverError::Tool("make".into(), e))?;
    let mut phases = Phases::default();
    let mut last = Instant::now();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(phase) = phases.feed(&line) {
                progress(&format!(
                    "compile: {phase} ({:.0} s)",
                    start.elapsed().as_secs_f64()
                ));
                last = Instant::now();
            } else if last.elapsed() >= Duration::from_secs(30) {
                progress(&format!(
                    "compile: {} probes, {} files compiled ({:.0} s)",
                    phases.conftests,
                    phases.compiled,
                    start.elapsed().as_secs_f64()
                ));
                last = Instant::now();
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| DriverError::Tool("make".into(), e))?;
    if !status.success() {
        return Err(DriverError::Compile {
            log: log.to_owned(),
            tail: tail_errors(&fs::read_to_string(log).unwrap_or_default()),
        });
    }
    Ok(start.elapsed())
}

/// The lines of a compiler log worth showing: every `error` line, else the last 20.
pub fn tail_errors(log: &str) -> String {
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("error"))
        .take(20)
        .collect();
    let lines = if errors.is_empty() {
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(20)..].to_vec()
    } else {
        errors
    };
    lines.join("\n")
}

/// `vermagic=` of a module's `.modinfo` section.
pub fn vermagic(ko: &[u8]) -> Option<String> {
    use object::{Object, ObjectSection};
    let file = object::File::parse(ko).ok()?;
    let data = file.section_by_name(".modinfo")?.data().ok()?;
    data.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"vermagic="))
        .map(|v| String::from_utf8_lossy(v).trim().to_owned())
}

/// The modules a kernel module depends on (`depends=` of its `.modinfo`), by name.
pub fn depends(ko: &[u8]) -> Vec<String> {
    use object::{Object, ObjectSection};
    let Some(data) = object::File::parse(ko).ok().and_then(|f| {
        f.section_by_name(".modinfo")?
            .data()
            .ok()
            .map(<[u8]>::to_vec)
    }) else {
        return Vec::new();
    };
    data.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"depends="))
        .map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Strips debug information (`strip --strip-debug`), as Debian does for its modules.
pub fn strip(from: &Path, to: &Path) -> Result<(), DriverError> {
    let out = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(to)
        .arg(from)
        .output()
        .map_err(|e| DriverError::Tool("strip (binutils)".into(), e))?;
    if !out.status.success() {
        return Err(DriverError::Headers(format!(
            "strip {}: {}",
            from.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The flavour's patches, resolved in the table.
pub fn flavour_patches<'t>(table: &'t super::Table, f: &DriverFlavour) -> Vec<&'t Patch> {
    f.patches.iter().filter_map(|n| table.patch(n)).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn patch() -> Patch {
        Patch {
            name: "p".into(),
            file: "nvidia/nv-pci.c".into(),
            find: "f(a, b);".into(),
            replace: "f(a, b, 0);".into(),
            when_header: "include/linux/pci.h".into(),
            when_contains: "int exclude_bars);".into(),
        }
    }

    #[test]
    fn abi_and_kbuild_come_from_the_release() {
        assert_eq!(kernel_abi("6.1.0-57-amd64").unwrap(), "6.1.0-57");
        assert_eq!(kernel_abi("6.1.0-57-cloud-amd64").unwrap(), "6.1.0-57");
        assert!(kernel_abi("6.18.44").is_err());
        assert!(kernel_abi("6.1.0-x-amd64").is_err());
        assert_eq!(kbuild_package("6.1.0-57-amd64"), "linux-kbuild-6.1");
    }

    #[test]
    fn absolute_include_is_pointed_into_the_tree() {
        let text = "include /usr/src/linux-headers-6.1.0-57-common/Makefile\nx := 1\n";
        let got = fix_include(text, Path::new("/w/root/usr/src"));
        assert_eq!(
            got,
            "include /w/root/usr/src/linux-headers-6.1.0-57-common/Makefile\nx := 1\n"
        );
    }

    #[test]
    fn patch_needs_exactly_one_match() {
        let p = patch();
        assert_eq!(apply_patch("x f(a, b); y", &p).unwrap(), "x f(a, b, 0); y");
        let err = apply_patch("nothing", &p).unwrap_err().to_string();
        assert!(err.contains("0 times") && err.contains("nv-pci.c"), "{err}");
        assert!(apply_patch("f(a, b); f(a, b);", &p).is_err());
        // Already patched text does not match again.
        assert!(apply_patch("f(a, b, 0);", &p).is_err());
    }

    #[test]
    fn patches_follow_the_headers() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir_all(src.join("nvidia")).unwrap();
        fs::write(src.join("nvidia/nv-pci.c"), "r = f(a, b);\n").unwrap();
        let h = Headers {
            sys_src: d.path().join("common"),
            sys_out: d.path().join("out"),
        };
        fs::create_dir_all(h.sys_src.join("include/linux")).unwrap();
        fs::write(
            h.sys_src.join("include/linux/pci.h"),
            "int f(int a, int b);\n",
        )
        .unwrap();
        let p = patch();
        assert!(
            apply_patches(&src, &h, &[&p]).unwrap().is_empty(),
            "old kernel: no patch"
        );
        fs::write(
            h.sys_src.join("include/linux/pci.h"),
            "int f(int a, int b,\n int exclude_bars);\n",
        )
        .unwrap();
        assert_eq!(apply_patches(&src, &h, &[&p]).unwrap(), ["p"]);
        assert_eq!(
            fs::read_to_string(src.join("nvidia/nv-pci.c")).unwrap(),
            "r = f(a, b, 0);\n"
        );
    }

    #[test]
    fn phases_are_reported_once_each() {
        let mut ph = Phases::default();
        let lines = [
            " CONFTEST: a",
            " CONFTEST: b",
            "  CC [M]  /x/nv.o",
            "  CC [M]  /x/nv2.o",
            "  LD [M]  /x/nvidia.o",
            "  MODPOST /x/Module.symvers",
        ];
        let started: Vec<_> = lines.iter().filter_map(|l| ph.feed(l)).collect();
        assert_eq!(started.len(), 3);
        assert_eq!(
            ph,
            Phases {
                conftests: 2,
                compiled: 2,
                linked: 2
            }
        );
    }

    #[test]
    fn errors_are_picked_from_the_log() {
        let log = "a\nnv-pci.c:223: error: too few arguments\nb\n";
        assert_eq!(tail_errors(log), "nv-pci.c:223: error: too few arguments");
        let log: String = (0..30).map(|i| format!("l{i}\n")).collect();
        assert!(tail_errors(&log).starts_with("l10\n"));
    }

    #[test]
    fn vermagic_of_a_real_module_when_one_is_at_hand() {
        let Some(ko) = crate::testutil::kernel_module("drm.ko") else {
            eprintln!("skipping: no cached kernel .deb to take a module from");
            return;
        };
        let v = vermagic(&ko).unwrap();
        assert!(v.contains("SMP") && v.contains("modversions"), "{v}");
        assert_eq!(vermagic(b"not an elf"), None);
    }
}

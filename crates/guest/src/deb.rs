//! Debian packages: resolves a package with apt-cache, downloads it with `apt-get download`
//! into a cache, checks its SHA-256 against the archive's, and unpacks it with `dpkg-deb -x`.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum DebError {
    #[error("could not run `{0}`; install it (apt-get install -y apt dpkg)")]
    Spawn(String, #[source] std::io::Error),
    #[error("`{cmd}` failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("apt-cache knows no package `{0}`; run `apt-get update` or check the flavour's package name")]
    UnknownPackage(String),
    #[error("`apt-cache show {pkg}` has no `{field}` field")]
    MissingField { pkg: String, field: &'static str },
    #[error("`{0}` does not depend on any linux-image package; name a concrete kernel package in the flavour")]
    NoKernelDependency(String),
    #[error("downloaded {file}: SHA-256 {got} does not match the archive's {want}; the download is corrupt or the mirror is lying")]
    Checksum {
        file: PathBuf,
        got: String,
        want: String,
    },
    #[error("reading {0} failed")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("writing into the package cache {0} failed")]
    Cache(PathBuf, #[source] std::io::Error),
    #[error("{0} is not a Debian package: {1}")]
    NotDeb(PathBuf, String),
}

/// A package as the archive describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageInfo {
    pub package: String,
    pub version: String,
    /// Basename of the `.deb`.
    pub file_name: String,
    pub sha256: String,
    pub size: u64,
}

/// A `.deb` on disk, verified.
#[derive(Debug, Clone)]
pub struct DebFile {
    pub path: PathBuf,
    pub package: String,
    pub version: String,
    pub sha256: String,
}

fn run(cmd: &mut Command) -> Result<String, DebError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .output()
        .map_err(|e| DebError::Spawn(shown.clone(), e))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(DebError::Failed {
            cmd: shown,
            stderr: stderr.trim().chars().take(2000).collect(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The concrete kernel package a metapackage (e.g. `linux-image-amd64`) points at, or the
/// name itself when it is already concrete (`linux-image-6.1.0-56-amd64`).
pub fn resolve_kernel_package(name: &str) -> Result<String, DebError> {
    let text = run(Command::new("apt-cache")
        .args(["depends", "--no-recommends", "--no-suggests"])
        .arg(name))
    .map_err(|e| unknown_if_not_found(e, name))?;
    if text.trim().is_empty() {
        return Err(DebError::UnknownPackage(name.to_owned()));
    }
    match parse_kernel_dependency(&text) {
        Some(dep) => Ok(dep),
        None if is_concrete_kernel(name) => Ok(name.to_owned()),
        None => Err(DebError::NoKernelDependency(name.to_owned())),
    }
}

fn is_concrete_kernel(name: &str) -> bool {
    name.strip_prefix("linux-image-")
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// apt-cache exits non-zero with "No packages found" for a name it does not know.
fn unknown_if_not_found(e: DebError, pkg: &str) -> DebError {
    match e {
        DebError::Failed { stderr, .. } if stderr.contains("No packages found") => {
            DebError::UnknownPackage(pkg.to_owned())
        }
        other => other,
    }
}

/// First `Depends: linux-image-<digit>...` of `apt-cache depends` output.
pub fn parse_kernel_dependency(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(|d| d.trim().trim_start_matches('<').trim_end_matches('>'))
        .find(|d| is_concrete_kernel(d))
        .map(str::to_owned)
}

/// What the archive says about `pkg` (the candidate version).
pub fn package_info(pkg: &str) -> Result<PackageInfo, DebError> {
    let text = run(Command::new("apt-cache").args(["show", "--no-all-versions", pkg]))
        .map_err(|e| unknown_if_not_found(e, pkg))?;
    parse_show(pkg, &text)
}

/// Parses the first stanza of `apt-cache show`.
pub fn parse_show(pkg: &str, text: &str) -> Result<PackageInfo, DebError> {
    let stanza = text.split("\n\n").next().unwrap_or("");
    if stanza.trim().is_empty() {
        return Err(DebError::UnknownPackage(pkg.to_owned()));
    }
    let field = |name: &'static str| -> Result<String, DebError> {
        stanza
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map(|v| v.trim().to_owned())
            .ok_or(DebError::MissingField {
                pkg: pkg.to_owned(),
                field: name,
            })
    };
    let filename = field("Filename")?;
    let file_name = filename.rsplit('/').next().unwrap_or(&filename).to_owned();
    let size = field("Size")?.parse().map_err(|_| DebError::MissingField {
        pkg: pkg.to_owned(),
        field: "Size",
    })?;
    let sha256 = field("SHA256")?.to_ascii_lowercase();
    if sha256.len() != 64
        || !sha256.bytes().all(|b| b.is_ascii_hexdigit())
        || file_name.contains("..")
    {
        return Err(DebError::MissingField {
            pkg: pkg.to_owned(),
            field: "SHA256",
        });
    }
    Ok(PackageInfo {
        package: field("Package")?,
        version: field("Version")?,
        file_name,
        sha256,
        size,
    })
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, DebError> {
    let mut f = fs::File::open(path).map_err(|e| DebError::Read(path.to_owned(), e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| DebError::Read(path.to_owned(), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Returns the verified `.deb` of `info`, downloading it into `cache` unless a copy with the
/// right checksum is already there. Downloads land in a temp dir and are renamed in.
pub fn fetch(info: &PackageInfo, cache: &Path) -> Result<DebFile, DebError> {
    fetch_with(info, cache, &mut Command::new("apt-get"))
}

/// [`fetch`] with a given `apt-get` command (e.g. one with its own apt configuration
/// options); `download -q PACKAGE=VERSION` is appended.
pub fn fetch_with(
    info: &PackageInfo,
    cache: &Path,
    apt_get: &mut Command,
) -> Result<DebFile, DebError> {
    fs::create_dir_all(cache).map_err(|e| DebError::Cache(cache.to_owned(), e))?;
    let dest = cache.join(&info.file_name);
    if dest.is_file() && sha256_file(&dest)? == info.sha256 {
        tracing::info!(deb = %dest.display(), "using cached package");
        return Ok(deb_file(info, dest));
    }
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(cache)
        .map_err(|e| DebError::Cache(cache.to_owned(), e))?;
    tracing::info!(package = %info.package, version = %info.version, "downloading with apt-get");
    run(apt_get
        .args(["download", "-q"])
        .arg(format!("{}={}", info.package, info.version))
        .current_dir(tmp.path()))?;
    let got_path = tmp.path().join(&info.file_name);
    let got = sha256_file(&got_path)?;
    if got != info.sha256 {
        return Err(DebError::Checksum {
            file: got_path,
            got,
            want: info.sha256.clone(),
        });
    }
    fs::rename(&got_path, &dest).map_err(|e| DebError::Cache(dest.clone(), e))?;
    Ok(deb_file(info, dest))
}

fn deb_file(info: &PackageInfo, path: PathBuf) -> DebFile {
    DebFile {
        path,
        package: info.package.clone(),
        version: info.version.clone(),
        sha256: info.sha256.clone(),
    }
}

/// A local `.deb` given by the user: its identity comes from its own control file.
pub fn local(path: &Path) -> Result<DebFile, DebError> {
    let text = run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(path)
        .args(["Package", "Version"]))
    .map_err(|e| DebError::NotDeb(path.to_owned(), e.to_string()))?;
    let info = |f: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(f).and_then(|r| r.strip_prefix(':')))
            .map(|v| v.trim().to_owned())
    };
    let (Some(package), Some(version)) = (info("Package"), info("Version")) else {
        return Err(DebError::NotDeb(
            path.to_owned(),
            "no Package/Version in its control file".into(),
        ));
    };
    Ok(DebFile {
        path: path.to_owned(),
        package,
        version,
        sha256: sha256_file(path)?,
    })
}

/// Unpacks the package's files under `dest`.
pub fn extract(deb: &Path, dest: &Path) -> Result<(), DebError> {
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kernel_dependency_is_found() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_kernel_dependency(text).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(parse_kernel_dependency("x\n  Depends: libc6\n"), None);
        assert!(is_concrete_kernel("linux-image-6.1.0-56-amd64"));
        assert!(!is_concrete_kernel("linux-image-amd64"));
    }

    #[test]
    fn show_stanza_is_parsed_and_validated() {
        let text = "Package: linux-image-6.1.0-56-amd64\nSource: linux-signed-amd64 (6.1.192+2)\n\
Version: 6.1.192-2\nFilename: pool/updates/main/l/linux-signed-amd64/linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb\n\
Size: 70550672\nSHA256: A86E2049672F52354C4536A089203B6C82639420424D31C91CF31A181FD4D8F1\n\nPackage: other\n";
        let i = parse_show("linux-image-6.1.0-56-amd64", text).unwrap();
        assert_eq!(i.version, "6.1.192-2");
        assert_eq!(
            i.file_name,
            "linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb"
        );
        assert_eq!(i.size, 70550672);
        assert_eq!(&i.sha256[..8], "a86e2049");
        assert!(matches!(
            parse_show("x", ""),
            Err(DebError::UnknownPackage(_))
        ));
        let bad = text.replace("SHA256: A86E", "SHA256: ZZZZ");
        assert!(matches!(
            parse_show("x", &bad),
            Err(DebError::MissingField {
                field: "SHA256",
                ..
            })
        ));
        let no_size = text.replace("Size: 70550672\n", "");
        assert!(matches!(
            parse_show("x", &no_size),
            Err(DebError::MissingField { field: "Size", .. })
        ));
    }

    #[test]
    fn unknown_packages_say_to_update_apt() {
        if Command::new("apt-cache").arg("--version").output().is_err() {
            eprintln!("skipping: apt-cache is not installed");
            return;
        }
        let err = package_info("gpucell-no-such-package").unwrap_err();
        assert!(
            matches!(err, DebError::UnknownPackage(ref p) if p == "gpucell-no-such-package"),
            "{err}"
        );
        assert!(err.to_string().contains("apt-get update"));
        let err = resolve_kernel_package("gpucell-no-such-package").unwrap_err();
        assert!(matches!(err, DebError::UnknownPackage(_)), "{err}");
    }

    #[test]
    fn sha256_of_a_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

//! gpucell's own apt configuration for driver builds: its own sources list (with
//! contrib, non-free and non-free-firmware), lists and package cache under the state dir
//! (`<state>/guest/apt/`). The system's apt configuration is never read for sources nor
//! written: every apt call gets `Dir::Etc::SourceList`, `Dir::Etc::SourceParts=/dev/null`,
//! `Dir::State::Lists` and `Dir::Cache` pointing into that directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::deb::{self, DebError, DebFile, PackageInfo};

#[derive(Debug, thiserror::Error)]
pub enum AptError {
    #[error("preparing gpucell's apt directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Deb(#[from] DebError),
    #[error(
        "{package}={version} is not in the archive (gpucell's apt lists in {lists}); the \
             table data/nvidia-flavours.toml pins a version the mirror no longer carries: \
             regenerate it with scripts/nvidia-flavour-table.py"
    )]
    Missing {
        package: String,
        version: String,
        lists: PathBuf,
    },
    #[error(
        "{package}: the archive's SHA-256 {archive} differs from the table's {table}; \
             the archive changed the package under the same version, or the table is wrong"
    )]
    TableDigest {
        package: String,
        archive: String,
        table: String,
    },
}

/// Mirror used for every suite.
pub const MIRROR: &str = "http://deb.debian.org/debian";
pub const SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
const COMPONENTS: &str = "main contrib non-free non-free-firmware";

/// gpucell's apt state: `<guest>/apt/{sources.list,lists,cache}`.
#[derive(Debug, Clone)]
pub struct Apt {
    pub dir: PathBuf,
    /// `APT::Default-Release`: the suite preferred when a name has several candidates.
    pub default_release: String,
}

/// The sources list for `suites`: each suite from the main mirror, `-security` suites
/// from the security mirror, all components.
pub fn sources_list(suites: &[String]) -> String {
    let mut s = String::from("# Written by gpucell for driver builds; not the system's apt.\n");
    for suite in suites {
        let mirror = if suite.ends_with("-security") {
            SECURITY_MIRROR
        } else {
            MIRROR
        };
        s.push_str(&format!("deb {mirror} {suite} {COMPONENTS}\n"));
    }
    s
}

/// The suites a build of flavours of `driver_suites` needs: the guest kernel's headers
/// come from bookworm and bookworm-security, the runtime from bookworm.
pub fn suites_for(driver_suites: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = ["bookworm", "bookworm-updates", "bookworm-security"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for s in driver_suites {
        if !out.iter().any(|o| o == s) {
            out.push(s.to_string());
        }
    }
    out
}

impl Apt {
    pub fn new(guest_dir: &Path) -> Self {
        Self {
            dir: guest_dir.join("apt"),
            default_release: "bookworm".into(),
        }
    }

    fn lists(&self) -> PathBuf {
        self.dir.join("lists")
    }

    /// The `-o` options that make apt use only this directory.
    pub fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            format!("-oDir::Etc::SourceList={d}/sources.list"),
            "-oDir::Etc::SourceParts=/dev/null".into(),
            format!("-oDir::State::Lists={d}/lists"),
            format!("-oDir::Cache={d}/cache"),
            "-oDir::Cache::pkgcache=".into(),
            "-oDir::Cache::srcpkgcache=".into(),
            format!("-oAPT::Default-Release={}", self.default_release),
            // Downloads land in gpucell's own dirs, which apt's `_apt` user cannot write.
            "-oAPT::Sandbox::User=root".into(),
            // Only the package indices: no translations or AppStream metadata.
            "-oAcquire::Languages=none".into(),
            "-oAcquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "-oAcquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
            "-oAcquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".into(),
        ]
    }

    fn apt(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.args(self.options());
        c
    }

    /// Writes the sources list and runs `apt-get update` when the list changed or the
    /// indices are missing; `force` updates anyway.
    pub fn prepare(
        &self,
        suites: &[String],
        force: bool,
        progress: &dyn Fn(&str),
    ) -> Result<(), AptError> {
        let dir_err = |e| AptError::Dir(self.dir.clone(), e);
        fs::create_dir_all(self.lists().join("partial")).map_err(dir_err)?;
        fs::create_dir_all(self.dir.join("cache/archives/partial")).map_err(dir_err)?;
        let text = sources_list(suites);
        let path = self.dir.join("sources.list");
        let changed = fs::read_to_string(&path).map_or(true, |old| old != text);
        if changed {
            fs::write(&path, &text).map_err(dir_err)?;
        }
        let has_lists = fs::read_dir(self.lists())
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
            })
            .unwrap_or(false);
        if changed || !has_lists || force {
            progress(&format!(
                "apt: updating gpucell's package lists ({})",
                suites.join(", ")
            ));
            run(self.apt("apt-get").args(["update", "-q"]))?;
        }
        Ok(())
    }

    /// What the archive says about exactly `package=version`.
    pub fn show(&self, package: &str, version: &str) -> Result<PackageInfo, AptError> {
        let missing = || AptError::Missing {
            package: package.to_owned(),
            version: version.to_owned(),
            lists: self.lists(),
        };
        let text = match run(self
            .apt("apt-cache")
            .args(["show", "--no-all-versions"])
            .arg(format!("{package}={version}")))
        {
            Ok(t) => t,
            Err(DebError::Failed { .. }) => return Err(missing()),
            Err(e) => return Err(e.into()),
        };
        let info = deb::parse_show(package, &text)?;
        if info.version != version {
            return Err(missing());
        }
        Ok(info)
    }

    /// Downloads `info` into `cache` (or reuses a copy whose digest matches), checking
    /// the archive's SHA-256; shows the size first.
    pub fn download(
        &self,
        info: &PackageInfo,
        cache: &Path,
        progress: &dyn Fn(&str),
    ) -> Result<DebFile, AptError> {
        let dest = cache.join(&info.file_name);
        if dest.is_file() && deb::sha256_file(&dest)? == info.sha256 {
            return Ok(deb::DebFile {
                path: dest,
                package: info.package.clone(),
                version: info.version.clone(),
                sha256: info.sha256.clone(),
            });
        }
        progress(&format!(
            "download {} {} ({})",
            info.package,
            info.version,
            human_size(info.size)
        ));
        Ok(deb::fetch_with(info, cache, &mut self.apt("apt-get"))?)
    }
}

fn run(cmd: &mut Command) -> Result<String, DebError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .output()
        .map_err(|e| DebError::Spawn(shown.clone(), e))?;
    if !out.status.success() {
        return Err(DebError::Failed {
            cmd: shown,
            stderr: String::from_utf8_lossy(&out.stderr)
                .trim()
                .chars()
                .take(2000)
                .collect(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `37.2 MB`, `512 kB`, `900 B`.
pub fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1_000_000_000 => format!("{:.1} GB", b as f64 / 1e9),
        b if b >= 1_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        b if b >= 1_000 => format!("{} kB", b / 1_000),
        b => format!("{b} B"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sources_cover_the_suites_with_all_components() {
        let suites = suites_for(&["trixie", "bookworm"]);
        assert_eq!(
            suites,
            [
                "bookworm",
                "bookworm-updates",
                "bookworm-security",
                "trixie"
            ]
        );
        let s = sources_list(&suites);
        assert!(s.contains(
            "deb http://deb.debian.org/debian trixie main contrib non-free non-free-firmware\n"
        ));
        assert!(s.contains(
            "deb http://deb.debian.org/debian-security bookworm-security main contrib non-free non-free-firmware\n"
        ));
        assert_eq!(s.lines().filter(|l| l.starts_with("deb ")).count(), 4);
    }

    #[test]
    fn apt_options_never_point_at_the_system_config() {
        let apt = Apt::new(Path::new("/state/guest"));
        let o = apt.options().join(" ");
        assert!(o.contains("-oDir::Etc::SourceList=/state/guest/apt/sources.list"));
        assert!(o.contains("-oDir::Etc::SourceParts=/dev/null"));
        assert!(o.contains("-oDir::State::Lists=/state/guest/apt/lists"));
        assert!(o.contains("-oDir::Cache=/state/guest/apt/cache"));
        assert!(!o.contains("/etc/apt"));
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_size(37_155_068), "37.2 MB");
        assert_eq!(human_size(27_720), "27 kB");
        assert_eq!(human_size(12), "12 B");
    }
}

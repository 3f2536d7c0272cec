//! Finds the agent binary and checks it can run as PID 1 of a bare initramfs: a static
//! x86-64 ELF executable (no `PT_INTERP`: there is no dynamic loader in the guest).

use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader};
use object::Endianness;

/// Triple the agent is built for.
pub const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";
/// How to build a suitable agent.
pub const BUILD_HINT: &str = "build it with `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p gpucell-agent --target x86_64-unknown-linux-gnu` (or `make agent`)";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no gpucell-agent binary found (looked at $GPUCELL_AGENT, next to this executable and in ./target/{AGENT_TARGET}/release/); {BUILD_HINT}, or pass --agent PATH")]
    NotFound,
    #[error("reading the agent {0} failed")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("the agent {0} is not a 64-bit x86 ELF executable")]
    NotElf(PathBuf),
    #[error("the agent {path} is dynamically linked (interpreter `{interp}`), but the guest has no dynamic loader; {BUILD_HINT}")]
    Dynamic { path: PathBuf, interp: String },
}

/// Picks the agent: the explicit path (the CLI's `--agent`, or its `GPUCELL_AGENT`), else
/// `gpucell-agent` next to the running executable, else
/// `target/<triple>/release/gpucell-agent` under the cwd.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, AgentError> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
    {
        candidates.push(dir.join("gpucell-agent"));
        // gpucell in target/release, the static agent in target/<triple>/release.
        candidates.push(
            dir.join("..")
                .join(AGENT_TARGET)
                .join("release/gpucell-agent"),
        );
    }
    candidates.push(
        Path::new("target")
            .join(AGENT_TARGET)
            .join("release/gpucell-agent"),
    );
    // A host-target build next to gpucell is dynamic: prefer any static candidate, and
    // name the first dynamic one only when there is nothing better.
    let existing: Vec<PathBuf> = candidates.into_iter().filter(|c| c.is_file()).collect();
    existing
        .iter()
        .find(|c| std::fs::read(c).is_ok_and(|d| check_static(c, &d).is_ok()))
        .or(existing.first())
        .cloned()
        .ok_or(AgentError::NotFound)
}

/// Reads the agent and checks it is a static x86-64 executable.
pub fn load(path: &Path) -> Result<Vec<u8>, AgentError> {
    let data = std::fs::read(path).map_err(|e| AgentError::Read(path.to_owned(), e))?;
    check_static(path, &data)?;
    Ok(data)
}

pub fn check_static(path: &Path, data: &[u8]) -> Result<(), AgentError> {
    let not_elf = || AgentError::NotElf(path.to_owned());
    let header = elf::FileHeader64::<Endianness>::parse(data).map_err(|_| not_elf())?;
    let endian = header.endian().map_err(|_| not_elf())?;
    let ty = header.e_type(endian);
    if header.e_machine(endian) != elf::EM_X86_64 || (ty != elf::ET_EXEC && ty != elf::ET_DYN) {
        return Err(not_elf());
    }
    for ph in header
        .program_headers(endian, data)
        .map_err(|_| not_elf())?
    {
        if ph.p_type(endian) == elf::PT_INTERP {
            let interp = ph
                .data(endian, data)
                .ok()
                .map(|d| String::from_utf8_lossy(d).trim_end_matches('\0').to_owned())
                .unwrap_or_default();
            return Err(AgentError::Dynamic {
                path: path.to_owned(),
                interp,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_binaries_are_refused_static_ones_accepted() {
        // /bin/sh on Debian is dynamic; busybox-static is static.
        let sh = Path::new("/bin/sh");
        match load(sh) {
            Err(AgentError::Dynamic { interp, .. }) => {
                assert!(interp.contains("ld-linux"), "{interp}")
            }
            other => panic!("expected a dynamic-binary error, got {other:?}"),
        }
        let busybox = Path::new("/bin/busybox");
        if busybox.exists()
            && !std::fs::read(busybox)
                .unwrap()
                .windows(11)
                .any(|w| w == b"ld-linux-x8")
        {
            load(busybox).unwrap();
        } else {
            eprintln!("skipping the static case: no static /bin/busybox (install busybox-static)");
        }
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("script");
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        assert!(matches!(load(&f), Err(AgentError::NotElf(_))));
        assert!(matches!(
            load(&d.path().join("missing")),
            Err(AgentError::Read(..))
        ));
    }
}

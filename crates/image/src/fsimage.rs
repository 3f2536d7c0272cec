//! Read-only filesystem images for the guest's virtio-blk disk, made from an unpacked
//! tree with the filesystem's own tools (`mkfs.erofs`, or `mkfs.ext4 -d`). Both keep
//! uid/gid, modes, symlinks, hard links and xattrs of the tree.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use tracing::debug;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Erofs,
    Ext4,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Erofs => "erofs",
            FsType::Ext4 => "ext4",
        }
    }

    pub fn parse(s: &str) -> Option<FsType> {
        match s {
            "erofs" => Some(FsType::Erofs),
            "ext4" => Some(FsType::Ext4),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FsImageError {
    #[error(
        "running {tool}: is it installed? (Debian: {package}; scripts/install-deps.sh installs it)"
    )]
    Spawn {
        tool: &'static str,
        package: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{tool} failed making {output} from {tree} ({status}): {stderr}")]
    Failed {
        tool: &'static str,
        output: PathBuf,
        tree: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("measuring the tree {path} to size the ext4 image")]
    Walk {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating the image file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Builds `output` (which must not exist yet) from `tree`.
pub fn build(tree: &Path, output: &Path, fs: FsType) -> Result<(), FsImageError> {
    match fs {
        FsType::Erofs => {
            let mut cmd = Command::new("mkfs.erofs");
            // Uncompressed: the fastest to build and to read (the guest page cache holds
            // what is read; compression would cost guest CPU on every miss).
            cmd.arg("--quiet").arg(output).arg(tree);
            run(cmd, "mkfs.erofs", "erofs-utils", tree, output)
        }
        FsType::Ext4 => {
            let (bytes, inodes) = measure(tree)?;
            // Data rounded to blocks, plus inode tables, directories and journal-less slack.
            let size = (bytes + inodes * 4096) * 5 / 4 + (32 << 20);
            let size = size.div_ceil(4096) * 4096;
            let f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(output)
                .map_err(|source| FsImageError::Create {
                    path: output.to_owned(),
                    source,
                })?;
            f.set_len(size).map_err(|source| FsImageError::Create {
                path: output.to_owned(),
                source,
            })?;
            drop(f);
            let mut cmd = Command::new("mkfs.ext4");
            cmd.args(["-q", "-F", "-b", "4096", "-I", "256", "-m", "0"])
                .args(["-O", "^has_journal,^resize_inode"])
                .args(["-E", "lazy_itable_init=1,root_owner=0:0"])
                .arg("-N")
                .arg((inodes + 1024).to_string())
                .arg("-d")
                .arg(tree)
                .arg(output);
            run(cmd, "mkfs.ext4", "e2fsprogs", tree, output)
        }
    }
}

fn run(
    mut cmd: Command,
    tool: &'static str,
    package: &'static str,
    tree: &Path,
    output: &Path,
) -> Result<(), FsImageError> {
    debug!(?cmd, "building the guest filesystem image");
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| FsImageError::Spawn {
            tool,
            package,
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(FsImageError::Failed {
            tool,
            output: output.to_owned(),
            tree: tree.to_owned(),
            status: out.status,
            stderr: stderr.trim().chars().take(2000).collect(),
        });
    }
    Ok(())
}

/// Bytes of data (rounded up to 4 KiB blocks) and number of inodes under `tree`.
fn measure(tree: &Path) -> Result<(u64, u64), FsImageError> {
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![tree.to_owned()];
    let walk = |path: &Path| {
        let path = path.to_owned();
        move |source| FsImageError::Walk { path, source }
    };
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(walk(&dir))? {
            let entry = entry.map_err(walk(&dir))?;
            let md = entry.metadata().map_err(walk(&entry.path()))?;
            inodes += 1;
            bytes += md.size().div_ceil(4096) * 4096;
            if md.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}

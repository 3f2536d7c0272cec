//! Helpers shared by the integration tests: tool detection and readers for the
//! filesystem images, using the filesystems' own tools.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// True when `tool` runs; otherwise prints why the calling test skips.
pub fn have(tool: &str, test: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping {test}: {tool} is not installed (scripts/install-deps.sh installs it)");
    }
    ok
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// What `dump.erofs --path` says about one inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErofsInode {
    pub nid: u64,
    pub links: u64,
    pub kind: String,
    pub uid: u32,
    pub gid: u32,
    pub perm: u32,
    pub size: u64,
    pub xattr_size: u64,
}

pub fn erofs_stat(image: &Path, path: &str) -> Option<ErofsInode> {
    let out = Command::new("dump.erofs")
        .arg(format!("--path={path}"))
        .arg(image)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || !text.contains("NID:") {
        return None;
    }
    let field = |key: &str| -> Option<String> {
        let i = text.find(key)? + key.len();
        Some(
            text[i..]
                .split_whitespace()
                .next()?
                .trim_end_matches(',')
                .to_owned(),
        )
    };
    let access = field("Access:")?;
    let perm = u32::from_str_radix(access.split('/').next()?, 8).ok()?;
    let size_line = text.lines().find(|l| l.starts_with("Size:"))?;
    let kind = size_line
        .split_whitespace()
        .skip(5)
        .collect::<Vec<_>>()
        .join(" ");
    Some(ErofsInode {
        nid: field("NID:")?.parse().ok()?,
        links: field("Links:")?.parse().ok()?,
        kind,
        uid: field("Uid:")?.parse().ok()?,
        gid: field("Gid:")?.parse().ok()?,
        perm,
        size: field("Size:")?.parse().ok()?,
        xattr_size: field("Xattr size:")?.parse().ok()?,
    })
}

/// The full `i_mode` (with setuid/setgid/sticky bits, which dump.erofs masks) of an
/// inode, read from the on-disk inode the nid points to.
pub fn erofs_mode(image: &Path, nid: u64) -> u32 {
    let data = std::fs::read(image).expect("read the erofs image");
    let sb = &data[1024..1024 + 128];
    let blkszbits = sb[0x0c];
    let meta_blkaddr = u32::from_le_bytes(sb[0x28..0x2c].try_into().expect("4 bytes"));
    // i_format (2 bytes), i_xattr_icount (2), then i_mode (2).
    let off = ((meta_blkaddr as u64) << blkszbits) as usize + nid as usize * 32;
    u32::from(u16::from_le_bytes([data[off + 4], data[off + 5]]))
}

/// Extracts an erofs image with fsck.erofs (ownership and permissions kept when root).
pub fn erofs_extract(image: &Path, into: &Path) {
    let st = Command::new("fsck.erofs")
        .arg(format!("--extract={}", into.display()))
        .arg(image)
        .status()
        .expect("run fsck.erofs");
    assert!(
        st.success(),
        "fsck.erofs --extract failed on {}",
        image.display()
    );
}

/// `debugfs -R CMD IMAGE` stdout.
pub fn debugfs(image: &Path, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(cmd)
        .arg(image)
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
pub mod registry;

//! Guest memory: choosing the backend (preallocated RAM, since VFIO pins all guest
//! memory at start anyway, or hugepages from a mounted hugetlbfs; rendered as
//! [`MemoryBackend`] by [`crate::args`], which this module depends on and never the
//! other way round), and waiting for a QEMU that preallocates before it answers QMP.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use crate::args::{MemoryBackend, BACKEND_ID};
use crate::qmp::{Qmp, QmpError};

/// Longest `/proc/mounts` read.
const MAX_MOUNTS_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot read {path:?} to find a hugetlbfs mount")]
    Mounts {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--hugepages: no hugetlbfs is mounted (none in {path:?}); mount one, e.g. `mount -t hugetlbfs none /dev/hugepages`, or run without --hugepages")]
    NoHugetlbfs { path: PathBuf },
    #[error(
        "--hugepages: hugetlbfs mount point {0:?} has escaped characters; mount it at a plain path"
    )]
    Escaped(PathBuf),
    #[error("--hugepages: {memory_mib} MiB is not a multiple of the {page_kib} KiB hugepage size; pick a multiple")]
    NotMultiple { memory_mib: u64, page_kib: u64 },
    #[error("--hugepages: {needed} pages of {page_kib} KiB needed but {free} free ({path:?}); reserve more (vm.nr_hugepages) or use less memory")]
    NotEnough {
        needed: u64,
        free: u64,
        page_kib: u64,
        path: PathBuf,
    },
}

/// Time allowed per GiB of preallocated guest memory before QEMU answers QMP: pages
/// are touched (and pinned by VFIO) before QEMU's main loop runs. 0.25-0.3 s/GiB on
/// bare metal, up to 3 s/GiB measured in a nested VM.
pub const PREALLOC_ALLOWANCE_PER_GIB: Duration = Duration::from_secs(3);

/// How long to wait for QEMU's QMP greeting: `base`, plus the preallocation allowance
/// for `memory_mib` when memory is preallocated.
pub fn startup_wait(base: Duration, memory_mib: u64, preallocated: bool) -> Duration {
    if !preallocated {
        return base;
    }
    let gib = u32::try_from(memory_mib.div_ceil(1024)).unwrap_or(u32::MAX);
    base.saturating_add(PREALLOC_ALLOWANCE_PER_GIB.saturating_mul(gib))
}

/// Connects to QMP, giving QEMU up to `startup` to send its greeting (it comes only
/// after guest memory is preallocated and VFIO devices are set up), then uses `timeout`
/// for every command as usual. QEMU exiting meanwhile ends the wait: `alive` is asked
/// while the socket refuses connections, and a connected socket reports EOF.
pub fn connect_qmp(
    path: &Path,
    startup: Duration,
    timeout: Duration,
    alive: &mut dyn FnMut() -> bool,
) -> Result<Qmp, QmpError> {
    let start = Instant::now();
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < startup && alive() => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(source) => {
                return Err(QmpError::Connect {
                    path: path.to_path_buf(),
                    waited: start.elapsed(),
                    source,
                })
            }
        }
    };
    let left = startup.saturating_sub(start.elapsed()).max(timeout);
    stream.set_read_timeout(Some(left))?;
    // Blocks until the greeting (or EOF when QEMU exits) is there.
    let mut byte = [0u8; 1];
    match nix::sys::socket::recv(
        stream.as_raw_fd(),
        &mut byte,
        nix::sys::socket::MsgFlags::MSG_PEEK,
    ) {
        Ok(_) => {}
        Err(nix::errno::Errno::EAGAIN) => {
            return Err(QmpError::Timeout(
                startup,
                "the QMP greeting (QEMU still setting up guest memory and devices)".into(),
            ))
        }
        Err(e) => return Err(QmpError::Io(e.into())),
    }
    Qmp::from_stream(stream, timeout)
}

/// A hugetlbfs mount: where, and its page size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HugetlbfsMount {
    pub path: String,
    pub page_kib: u64,
}

fn parse_size_kib(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1),
        (i, 'M' | 'm') => (&s[..i], 1024),
        (i, 'G' | 'g') => (&s[..i], 1024 * 1024),
        _ => (s, 0),
    };
    let n: u64 = num.parse().ok()?;
    if mult == 0 {
        return Some(n / 1024);
    }
    n.checked_mul(mult)
}

/// The hugetlbfs mounts in `mounts` (the text of `/proc/mounts`), `/dev/hugepages` first.
/// `default_page_kib` is the page size of mounts without a `pagesize=` option.
pub fn hugetlbfs_mounts(mounts: &str, default_page_kib: u64) -> Vec<HugetlbfsMount> {
    let mut found: Vec<HugetlbfsMount> = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 4 || f[2] != "hugetlbfs" {
                return None;
            }
            let page_kib = f[3]
                .split(',')
                .find_map(|o| o.strip_prefix("pagesize="))
                .and_then(parse_size_kib)
                .unwrap_or(default_page_kib);
            // /proc/mounts escapes spaces as \040: such paths are refused later anyway.
            Some(HugetlbfsMount {
                path: f[1].to_string(),
                page_kib,
            })
        })
        .collect();
    found.sort_by_key(|m| m.path != "/dev/hugepages");
    found
}

/// Reads at most 1 MiB of `path` (procfs and sysfs files).
pub(crate) fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut s = String::new();
    std::fs::File::open(path)?
        .take(MAX_MOUNTS_BYTES)
        .read_to_string(&mut s)?;
    Ok(s)
}

/// Backs `memory_mib` with hugepages from a hugetlbfs mounted under `host_root`, checking
/// that the size is a multiple of its page size and that enough pages are free.
pub fn hugepages_backend(
    host_root: &Path,
    memory_mib: u64,
    threads: u32,
) -> Result<MemoryBackend, MemoryError> {
    let mounts_path = host_root.join("proc/self/mounts");
    let mounts = read_bounded(&mounts_path).map_err(|source| MemoryError::Mounts {
        path: mounts_path.clone(),
        source,
    })?;
    let default_kib = read_bounded(&host_root.join("proc/meminfo"))
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("Hugepagesize:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(2048);
    let mount = hugetlbfs_mounts(&mounts, default_kib)
        .into_iter()
        .next()
        .ok_or(MemoryError::NoHugetlbfs {
            path: mounts_path.clone(),
        })?;
    if mount.path.contains('\\') {
        return Err(MemoryError::Escaped(PathBuf::from(&mount.path)));
    }
    let page_kib = mount.page_kib.max(4);
    let memory_kib = memory_mib.saturating_mul(1024);
    if !memory_kib.is_multiple_of(page_kib) {
        return Err(MemoryError::NotMultiple {
            memory_mib,
            page_kib,
        });
    }
    let needed = memory_kib / page_kib;
    let free_path = host_root.join(format!(
        "sys/kernel/mm/hugepages/hugepages-{page_kib}kB/free_hugepages"
    ));
    let free = read_bounded(&free_path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if free < needed {
        return Err(MemoryError::NotEnough {
            needed,
            free,
            page_kib,
            path: free_path,
        });
    }
    Ok(MemoryBackend::HugePages {
        size_mib: memory_mib,
        mem_path: mount.path,
        threads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "proc /proc proc rw 0 0\n\
        hugetlbfs /mnt/huge1g hugetlbfs rw,relatime,pagesize=1024M 0 0\n\
        hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n";

    #[test]
    fn mounts_are_found_with_their_page_size() {
        let m = hugetlbfs_mounts(MOUNTS, 2048);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].path, "/dev/hugepages");
        assert_eq!(m[0].page_kib, 2048);
        assert_eq!(m[1].page_kib, 1024 * 1024);
        assert!(hugetlbfs_mounts("tmpfs /tmp tmpfs rw 0 0\n", 2048).is_empty());
        let m = hugetlbfs_mounts("none /h hugetlbfs rw 0 0\n", 2048);
        assert_eq!(m[0].page_kib, 2048);
    }

    fn fake_root(mounts: &str, free: Option<u64>) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("proc/self")).unwrap();
        std::fs::write(d.path().join("proc/self/mounts"), mounts).unwrap();
        std::fs::write(
            d.path().join("proc/meminfo"),
            "Hugepagesize:       2048 kB\n",
        )
        .unwrap();
        if let Some(free) = free {
            let p = d.path().join("sys/kernel/mm/hugepages/hugepages-2048kB");
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("free_hugepages"), format!("{free}\n")).unwrap();
        }
        d
    }

    #[test]
    fn hugepages_checks_mount_size_and_free_pages() {
        let none = fake_root("proc /proc proc rw 0 0\n", Some(1000));
        let e = hugepages_backend(none.path(), 512, 2).unwrap_err();
        assert!(matches!(e, MemoryError::NoHugetlbfs { .. }), "{e}");
        assert!(e.to_string().contains("mount -t hugetlbfs"));

        let mounts = "hugetlbfs /dev/hugepages hugetlbfs rw,relatime 0 0\n";
        let few = fake_root(mounts, Some(100));
        let e = hugepages_backend(few.path(), 512, 2).unwrap_err();
        assert!(
            matches!(
                e,
                MemoryError::NotEnough {
                    needed: 256,
                    free: 100,
                    ..
                }
            ),
            "{e}"
        );
        let ok = fake_root(mounts, Some(256));
        assert!(matches!(
            hugepages_backend(ok.path(), 513, 2),
            Err(MemoryError::NotMultiple { .. })
        ));
        assert_eq!(
            hugepages_backend(ok.path(), 512, 2).unwrap(),
            MemoryBackend::HugePages {
                size_mib: 512,
                mem_path: "/dev/hugepages".into(),
                threads: 2,
            }
        );
    }
}

//! Guest memory: choosing the backend (preallocated RAM, since VFIO pins all guest
//! memory at start anyway, from reserved hugepages when there are enough, or hugepages
//! from a mounted hugetlbfs; rendered as
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
    #[error("hugepage_size = \"{size}\": {memory_mib} MiB of guest memory needs {needed} pages but {free} are free ({path:?}); reserve them (vm.nr_hugepages, or hugepagesz={size} hugepages=N on the host's kernel command line), use a multiple of the page size, or set hugepage_size = \"auto\"")]
    NotReserved {
        size: HugepageSize,
        memory_mib: u64,
        needed: u64,
        free: u64,
        path: PathBuf,
    },
}

/// The page size of preallocated guest memory (`[run] hugepage_size`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum HugepageSize {
    /// The largest reserved hugepage size whose free pages cover the memory (1 GiB, then
    /// 2 MiB), else 4 KiB pages.
    #[default]
    Auto,
    /// 4 KiB pages (anonymous memory).
    Small,
    /// 2 MiB hugetlb pages, which must be reserved and free.
    Huge2M,
    /// 1 GiB hugetlb pages, which must be reserved and free.
    Huge1G,
}

impl HugepageSize {
    /// The hugetlb page size in KiB (`None` for `Auto` and 4 KiB pages).
    pub fn hugetlb_kib(self) -> Option<u64> {
        match self {
            HugepageSize::Huge2M => Some(2048),
            HugepageSize::Huge1G => Some(1024 * 1024),
            HugepageSize::Auto | HugepageSize::Small => None,
        }
    }
}

impl std::str::FromStr for HugepageSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "AUTO" => Ok(HugepageSize::Auto),
            "4K" => Ok(HugepageSize::Small),
            "2M" => Ok(HugepageSize::Huge2M),
            "1G" => Ok(HugepageSize::Huge1G),
            _ => Err(format!(
                "unknown hugepage size {s:?}: use auto, 4K, 2M or 1G"
            )),
        }
    }
}

impl TryFrom<String> for HugepageSize {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<HugepageSize> for String {
    fn from(h: HugepageSize) -> String {
        h.to_string()
    }
}

impl std::fmt::Display for HugepageSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HugepageSize::Auto => "auto",
            HugepageSize::Small => "4K",
            HugepageSize::Huge2M => "2M",
            HugepageSize::Huge1G => "1G",
        })
    }
}

/// How preallocated guest memory is laid out: the node's `[run] prealloc_threads` and
/// `hugepage_size`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryOptions {
    /// Threads that touch the pages (`None`: one per vCPU, as QEMU's `-mem-prealloc`).
    pub prealloc_threads: Option<u32>,
    pub hugepage_size: HugepageSize,
}

/// Most preallocation threads by default: zeroing pages is bound by memory bandwidth,
/// which a few threads fill (bench/prealloc measures it).
pub const MAX_DEFAULT_PREALLOC_THREADS: usize = 8;

/// The default number of preallocation threads on a host of `host_cpus` CPUs: all of
/// them up to [`MAX_DEFAULT_PREALLOC_THREADS`]. Preallocation runs before any vCPU does,
/// so the host's CPUs count, not the guest's.
pub fn default_prealloc_threads(host_cpus: usize) -> u32 {
    u32::try_from(host_cpus.clamp(1, MAX_DEFAULT_PREALLOC_THREADS)).unwrap_or(1)
}

/// Free hugetlb pages of `page_kib` under `host_root` (0 when the pool does not exist),
/// and the file they were read from.
fn free_hugepages(host_root: &Path, page_kib: u64) -> (u64, PathBuf) {
    let path = host_root.join(format!(
        "sys/kernel/mm/hugepages/hugepages-{page_kib}kB/free_hugepages"
    ));
    let free = read_bounded(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    (free, path)
}

/// The preallocated backend for `memory_mib` of guest memory with `threads` threads:
/// reserved hugetlb pages of the size asked (an error when too few are free or the
/// memory is not a multiple of it), or under `Auto` of the largest size that fits, else
/// 4 KiB pages.
pub fn preallocated_backend(
    host_root: &Path,
    memory_mib: u64,
    threads: u32,
    size: HugepageSize,
) -> Result<MemoryBackend, MemoryError> {
    let memory_kib = memory_mib.saturating_mul(1024);
    let fits = |page_kib: u64| {
        let (free, path) = free_hugepages(host_root, page_kib);
        let ok = memory_kib.is_multiple_of(page_kib) && free >= memory_kib / page_kib;
        (ok, free, path)
    };
    let huge = |page_kib| MemoryBackend::HugeMemfd {
        size_mib: memory_mib,
        page_kib,
        threads,
    };
    match size {
        HugepageSize::Small => Ok(MemoryBackend::Ram {
            size_mib: memory_mib,
            threads,
        }),
        HugepageSize::Auto => Ok([1024 * 1024, 2048]
            .into_iter()
            .find(|&kib| fits(kib).0)
            .map(huge)
            .unwrap_or(MemoryBackend::Ram {
                size_mib: memory_mib,
                threads,
            })),
        HugepageSize::Huge2M | HugepageSize::Huge1G => {
            let page_kib = size.hugetlb_kib().unwrap_or(2048);
            let (ok, free, path) = fits(page_kib);
            if !ok {
                return Err(MemoryError::NotReserved {
                    size,
                    memory_mib,
                    needed: memory_kib.div_ceil(page_kib),
                    free,
                    path,
                });
            }
            Ok(huge(page_kib))
        }
    }
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
    let (free, free_path) = free_hugepages(host_root, page_kib);
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

    fn pools(free_2m: u64, free_1g: u64) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (kib, free) in [(2048u64, free_2m), (1024 * 1024, free_1g)] {
            let p = d
                .path()
                .join(format!("sys/kernel/mm/hugepages/hugepages-{kib}kB"));
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("free_hugepages"), format!("{free}\n")).unwrap();
        }
        d
    }

    #[test]
    fn auto_picks_the_largest_reserved_page_that_fits() {
        let huge = |size_mib, page_kib| MemoryBackend::HugeMemfd {
            size_mib,
            page_kib,
            threads: 8,
        };
        let ram = |size_mib| MemoryBackend::Ram {
            size_mib,
            threads: 8,
        };
        let auto =
            |root: &Path, mib| preallocated_backend(root, mib, 8, HugepageSize::Auto).unwrap();
        // 4 GiB: four 1 GiB pages free win over 2 MiB ones.
        let both = pools(4096, 4);
        assert_eq!(auto(both.path(), 4096), huge(4096, 1024 * 1024));
        // 5 GiB: not enough 1 GiB pages, enough 2 MiB ones.
        assert_eq!(auto(both.path(), 5120), huge(5120, 2048));
        let small_1g = pools(4096, 2);
        assert_eq!(auto(small_1g.path(), 4096), huge(4096, 2048));
        // 1.5 GiB is no multiple of 1 GiB.
        assert_eq!(auto(both.path(), 1536), huge(1536, 2048));
        // Nothing reserved (or no pool at all): 4 KiB pages.
        assert_eq!(auto(pools(0, 0).path(), 4096), ram(4096));
        assert_eq!(auto(Path::new("/nonexistent"), 4096), ram(4096));
    }

    #[test]
    fn an_explicit_size_must_be_reserved() {
        let root = pools(1024, 0);
        assert_eq!(
            preallocated_backend(root.path(), 2048, 3, HugepageSize::Huge2M).unwrap(),
            MemoryBackend::HugeMemfd {
                size_mib: 2048,
                page_kib: 2048,
                threads: 3
            }
        );
        let e = preallocated_backend(root.path(), 4096, 3, HugepageSize::Huge2M).unwrap_err();
        assert!(
            matches!(
                e,
                MemoryError::NotReserved {
                    needed: 2048,
                    free: 1024,
                    ..
                }
            ),
            "{e}"
        );
        let e = preallocated_backend(root.path(), 1024, 3, HugepageSize::Huge1G).unwrap_err();
        assert!(e.to_string().contains("hugepage_size = \"1G\""), "{e}");
        assert!(e.to_string().contains("hugepagesz=1G"), "{e}");
        assert_eq!(
            preallocated_backend(root.path(), 2048, 3, HugepageSize::Small).unwrap(),
            MemoryBackend::Ram {
                size_mib: 2048,
                threads: 3
            }
        );
    }

    #[test]
    fn sizes_parse_and_threads_default_to_host_cpus_up_to_8() {
        for (s, h) in [
            ("auto", HugepageSize::Auto),
            ("4K", HugepageSize::Small),
            ("2m", HugepageSize::Huge2M),
            ("1G", HugepageSize::Huge1G),
        ] {
            assert_eq!(s.parse::<HugepageSize>().unwrap(), h);
            assert_eq!(h.to_string().parse::<HugepageSize>().unwrap(), h);
        }
        assert!("3M".parse::<HugepageSize>().is_err());
        assert_eq!(default_prealloc_threads(0), 1);
        assert_eq!(default_prealloc_threads(2), 2);
        assert_eq!(default_prealloc_threads(128), 8);
    }
}

//! A probe run inside the jail by `tests/jail.rs`: prints, one fact a line, what it
//! is and what it can see and do — its ids, capability sets, seccomp mode, namespaces,
//! pid, hostname, network interfaces, every path under `/` (not descending into
//! `/proc`), and the outcome of writes and privileged calls it attempts with the paths
//! given as arguments: `jail_probe RW_DIR RO_DIR`.

use std::path::Path;

fn walk(dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        println!("unreadable {}", dir.display());
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        out.push(p.display().to_string());
        let is_dir = std::fs::symlink_metadata(&p)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if is_dir && p != Path::new("/proc") {
            walk(&p, out);
        }
    }
}

fn outcome<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(-1)),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for line in status.lines() {
        let keep = [
            "Uid:",
            "Gid:",
            "Groups:",
            "CapInh:",
            "CapPrm:",
            "CapEff:",
            "CapBnd:",
            "CapAmb:",
            "NoNewPrivs:",
            "Seccomp:",
        ];
        if keep.iter().any(|k| line.starts_with(k)) {
            println!(
                "status {}",
                line.split_whitespace().collect::<Vec<_>>().join(" ")
            );
        }
    }
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        let link = std::fs::read_link(format!("/proc/self/ns/{ns}"));
        println!(
            "ns {ns} {}",
            link.map(|l| l.display().to_string()).unwrap_or_default()
        );
    }
    println!("pid {}", std::process::id());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    println!("hostname {}", host.trim());
    let netdev = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    for line in netdev.lines().skip(2) {
        println!("netdev {}", line.split(':').next().unwrap_or("").trim());
    }
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in cgroups.lines() {
        println!("cgroup {line}");
    }
    if let [_, rw, ro, ..] = args.as_slice() {
        println!(
            "write-rw {}",
            outcome(std::fs::write(Path::new(rw).join("from-jail"), b"x"))
        );
        println!(
            "write-ro {}",
            outcome(std::fs::write(Path::new(ro).join("from-jail"), b"x"))
        );
    }
    println!("write-root {}", outcome(std::fs::write("/new-file", b"x")));
    println!(
        "write-dev-null {}",
        outcome(std::fs::write("/dev/null", b"x"))
    );
    let errno = |r: i32| {
        if r == 0 {
            "ok".to_string()
        } else {
            outcome::<()>(Err(std::io::Error::last_os_error()))
        }
    };
    // SAFETY: plain system calls whose failure is the point.
    println!("setuid-0 {}", errno(unsafe { libc::setuid(0) }));
    if let Some(rw) = args.get(1) {
        let path = std::ffi::CString::new(format!("{rw}/node")).unwrap_or_default();
        let node =
            unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
        println!("mknod {}", errno(node));
    }
    let mut paths = Vec::new();
    walk(Path::new("/"), &mut paths);
    for p in paths {
        println!("path {p}");
    }
    // Stay until the test closes stdin, so that it can look at the jail from outside.
    if std::env::var_os("JAIL_PROBE_HOLD").is_some() {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
}

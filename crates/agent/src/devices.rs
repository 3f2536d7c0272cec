//! PCI functions the guest sees (`/sys/bus/pci/devices`), and waiting for the ones the
//! run spec expects.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use gpucell_protocol::{DeviceInfo, DeviceMatch};

/// PCI base class of bridges.
const CLASS_BRIDGE: u32 = 0x06;

fn read_hex(path: &Path) -> Option<u32> {
    let mut s = String::new();
    fs::File::open(path)
        .ok()?
        .take(64)
        .read_to_string(&mut s)
        .ok()?;
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// Every non-bridge PCI function under `devices_dir`, sorted by BDF.
pub fn scan(devices_dir: &Path) -> Vec<DeviceInfo> {
    let Ok(rd) = fs::read_dir(devices_dir) else {
        return Vec::new();
    };
    let mut out: Vec<DeviceInfo> = rd
        .filter_map(|e| e.ok())
        .take(4096)
        .filter_map(|e| {
            let p = e.path();
            let class = read_hex(&p.join("class"))?;
            if class >> 16 == CLASS_BRIDGE {
                return None;
            }
            Some(DeviceInfo {
                bdf: e.file_name().to_string_lossy().chars().take(32).collect(),
                vendor: u16::try_from(read_hex(&p.join("vendor"))?).ok()?,
                device: u16::try_from(read_hex(&p.join("device"))?).ok()?,
                class,
            })
        })
        .collect();
    out.sort_by(|a, b| a.bdf.cmp(&b.bdf));
    out
}

/// The functions matching `wanted`, and the wanted ids with no match.
pub fn matching(all: &[DeviceInfo], wanted: &[DeviceMatch]) -> (Vec<DeviceInfo>, Vec<DeviceMatch>) {
    let found = all
        .iter()
        .filter(|d| {
            wanted
                .iter()
                .any(|w| w.vendor == d.vendor && w.device == d.device)
        })
        .cloned()
        .collect();
    let missing = wanted
        .iter()
        .filter(|w| {
            !all.iter()
                .any(|d| w.vendor == d.vendor && w.device == d.device)
        })
        .cloned()
        .collect();
    (found, missing)
}

/// Waits up to `wait` for every wanted id to show up; returns what matched and what is
/// still missing.
pub fn wait_for(
    devices_dir: &Path,
    wanted: &[DeviceMatch],
    wait: Duration,
) -> (Vec<DeviceInfo>, Vec<DeviceMatch>) {
    let deadline = Instant::now() + wait;
    loop {
        let (found, missing) = matching(&scan(devices_dir), wanted);
        if missing.is_empty() || Instant::now() >= deadline {
            return (found, missing);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn dev(root: &Path, bdf: &str, vendor: &str, device: &str, class: &str) {
        let d = root.join(bdf);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
        fs::write(d.join("device"), format!("{device}\n")).unwrap();
        fs::write(d.join("class"), format!("{class}\n")).unwrap();
    }

    #[test]
    fn bridges_are_skipped_and_matches_found() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        dev(r, "0000:00:00.0", "0x8086", "0x29c0", "0x060000");
        dev(r, "0000:00:1c.0", "0x1b36", "0x000c", "0x060400");
        dev(r, "0000:01:00.0", "0x10de", "0x2335", "0x030200");
        dev(r, "0000:02:00.0", "0x10de", "0x2335", "0x030200");
        dev(r, "0000:00:02.0", "0x1af4", "0x1042", "0x010000");
        dev(r, "0000:00:03.0", "garbage", "0x1", "0x1");
        let all = scan(r);
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].bdf, "0000:00:02.0");
        let want = [
            DeviceMatch {
                vendor: 0x10de,
                device: 0x2335,
            },
            DeviceMatch {
                vendor: 0x1234,
                device: 0x11e8,
            },
        ];
        let (found, missing) = matching(&all, &want);
        assert_eq!(
            found.iter().map(|d| d.bdf.as_str()).collect::<Vec<_>>(),
            ["0000:01:00.0", "0000:02:00.0"]
        );
        assert_eq!(found[0].class, 0x030200);
        assert_eq!(
            missing,
            [DeviceMatch {
                vendor: 0x1234,
                device: 0x11e8
            }]
        );
        let t = Instant::now();
        let (_, missing) = wait_for(r, &want, Duration::from_millis(100));
        assert_eq!(missing.len(), 1);
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert!(scan(&r.join("nope")).is_empty());
    }
}

//! sysfs text a host reads about PCI devices: the BAR `resource` file, hexadecimal
//! attributes (`vendor`, `device`, `class`) and CPU lists (`local_cpulist`). The first
//! byte picks the parser; the rest is the file's content.
#![no_main]

use std::path::Path;

use gpucell_host::bar::parse_resource;
use gpucell_host::pci::CpuList;
use gpucell_host::sysfs::parse_hex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let path = Path::new("/sys/bus/pci/devices/0000:00:00.0/resource");
    match which % 4 {
        0 => {
            if let Ok(bars) = parse_resource(path, &text) {
                for b in bars {
                    assert!(b.size > 0, "an implemented BAR has a size");
                }
            }
        }
        1 => {
            let _ = parse_hex::<u16>(path, &text, "a vendor id");
        }
        2 => {
            let _ = parse_hex::<u32>(path, &text, "a class");
        }
        _ => {
            let _ = CpuList::parse(&text);
        }
    }
});

//! The driver matrix (`data/drivers.toml` format) the guest builder and the flavour
//! selection read, and the CUDA version strings in it.
#![no_main]

use gpucell_guest::driver::table::parse_cuda;
use gpucell_guest::driver::Table;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_cuda(text);
    if let Ok(table) = Table::parse(text) {
        for f in &table.flavours {
            let _ = table.find(&f.name);
        }
    }
});

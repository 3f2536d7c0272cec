//! `NVIDIA_REQUIRE_*`, `NVIDIA_DISABLE_REQUIRE` and `CUDA_VERSION` from an image's
//! environment (one `KEY=VALUE` per line), evaluated against a fixed driver and GPU.
#![no_main]

use gpucell_nvidia::{DriverFacts, GpuFacts, Requirements, Version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let env: Vec<&str> = text.lines().collect();
    let (Ok(driver), Some(gpu)) = (
        DriverFacts::new("550.163.01", "12.4"),
        GpuFacts::new("9.0", "NVIDIA"),
    ) else {
        return;
    };
    if let Ok(req) = Requirements::from_env(&env) {
        for item in &req.items {
            let _ = item.holds(&driver, Some(&gpu));
            let _ = item.holds(&driver, None);
        }
        if let Err(unsatisfied) = req.check(&driver, &[gpu.clone(), gpu]) {
            let _ = unsatisfied.to_string();
        }
        let _ = req.cuda_minimums();
    }
    // Versions alone, and their order being total.
    if let Some((a, b)) = text.split_once('\n') {
        if let (Some(a), Some(b)) = (Version::parse(a), Version::parse(b)) {
            assert_eq!(a.cmp(&b), b.cmp(&a).reverse());
        }
    }
});

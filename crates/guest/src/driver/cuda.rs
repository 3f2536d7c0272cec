//! The CUDA version a libcuda supports, from the library itself: a tiny C program
//! (compiled with the gcc the module build needs anyway) `dlopen`s it and calls
//! `cuDriverGetVersion`, which works with no GPU and no kernel module. The same program
//! goes onto the driver disk as `usr/bin/gpucell-cuda-version`, for the guest.

use std::fs;
use std::path::Path;
use std::process::Command;

use super::DriverError;

pub const HELPER_NAME: &str = "gpucell-cuda-version";

const HELPER_SOURCE: &str = r#"
#include <dlfcn.h>
#include <stdio.h>
/* gpucell-cuda-version [LIBCUDA]: prints cuDriverGetVersion() of LIBCUDA (default
   libcuda.so.1), e.g. 12040 for CUDA 12.4. Exit 2: no library, 3: no symbol, 4: error. */
int main(int argc, char **argv) {
    const char *lib = argc > 1 ? argv[1] : "libcuda.so.1";
    void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
    if (!h) { fprintf(stderr, "dlopen %s: %s\n", lib, dlerror()); return 2; }
    int (*get)(int *) = (int (*)(int *))dlsym(h, "cuDriverGetVersion");
    if (!get) { fprintf(stderr, "%s has no cuDriverGetVersion\n", lib); return 3; }
    int v = 0;
    int r = get(&v);
    if (r != 0) { fprintf(stderr, "cuDriverGetVersion returned %d\n", r); return 4; }
    printf("%d\n", v);
    return 0;
}
"#;

/// Compiles the helper into `dir`; returns its path.
pub fn compile_helper(dir: &Path) -> Result<std::path::PathBuf, DriverError> {
    let src = dir.join("gpucell-cuda-version.c");
    let bin = dir.join(HELPER_NAME);
    fs::write(&src, HELPER_SOURCE).map_err(|e| DriverError::io(&src, e))?;
    let out = Command::new("gcc")
        .args(["-O2", "-s", "-o"])
        .arg(&bin)
        .arg(&src)
        .arg("-ldl")
        .output()
        .map_err(|e| DriverError::Tool("gcc".into(), e))?;
    if !out.status.success() {
        return Err(DriverError::Cuda(format!(
            "compiling the CUDA version probe: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(bin)
}

/// Runs the helper on `libcuda` (an absolute path); returns `cuDriverGetVersion`.
pub fn driver_version(helper: &Path, libcuda: &Path) -> Result<i32, DriverError> {
    let out = Command::new(helper)
        .arg(libcuda)
        .output()
        .map_err(|e| DriverError::Tool(helper.display().to_string(), e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(DriverError::Cuda(format!(
            "{} {}: {}",
            helper.display(),
            libcuda.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    text.trim()
        .parse()
        .map_err(|_| DriverError::Cuda(format!("the probe printed `{}`", text.trim())))
}

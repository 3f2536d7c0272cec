//! The NVIDIA container contract, as the NVIDIA Container Toolkit defines it, for gpucell.
//!
//! - [`requirements`]: the `NVIDIA_REQUIRE_*` grammar of an image and its evaluation
//!   against a driver and the visible GPUs (libnvidia-container's `dsl.c` semantics).
//! - [`env`](mod@env): `NVIDIA_VISIBLE_DEVICES`, `NVIDIA_DRIVER_CAPABILITIES`, legacy `CUDA_VERSION`
//!   images, and the decision whether a container gets the driver at all.
//! - [`gpu`]: a GPU's compute capability and NVML brand from gpucell's GPU database (the
//!   host has no driver to ask), and whether CUDA forward compatibility works on it.
//! - [`cdi`]: a CDI spec (`nvidia.com/gpu`) generated from any driver root: device nodes,
//!   read-only mounts of the driver's libraries and binaries, SONAME and `.so` links, the
//!   ldcache update, as the toolkit's `nvidia-ctk cdi generate` would describe them.
//!
//! Nothing here touches a device or mounts anything: the guest agent applies a spec.

pub mod cdi;
pub mod env;
pub mod gpu;
pub mod requirements;

pub use cdi::{GenerateOptions, Generated, GpuNode, HookStep, Spec};
pub use env::{decide, Capabilities, Capability, DeviceId, ImageEnv, Injection, VisibleDevices};
pub use requirements::{DriverFacts, GpuFacts, Requirements, Unsatisfied, Version};

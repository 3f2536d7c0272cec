//! NVIDIA driver flavours: the driver's kernel modules built for the guest kernel, its
//! GSP firmware and userspace, on a read-only driver disk next to the guest kernel.

pub mod table;

pub use table::{DriverFlavour, ModuleKind, Package, Patch, Role, Table, TableError};

//! The sandbox: guest artifacts, the QEMU launcher and QMP client, and the lifecycle of
//! one microVM running one workload.

//! Guest artifacts: the guest kernel (uncompressed vmlinux for the PVH entry) and the
//! init image holding the agent and the kernel modules it needs, built from Debian
//! packages, described by a manifest and cached in the state dir per named flavour.

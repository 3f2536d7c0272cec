//! The OCI image store: pull and import, digest verification, safe unpacking and the
//! guest filesystem images built from unpacked trees.

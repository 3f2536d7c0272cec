//! Small utilities that every gpucell crate shares, each with one home:
//!
//! - [`atomic`]: replacing a file so that readers and crashes see the old or the new
//!   content, never half of it (one fsync rule for the whole project);
//! - [`lock`]: advisory `flock` locks between gpucell processes;
//! - [`chain_string`]: an error and its causes on one line, as the CLI prints them;
//! - [`fsck`]: what a state-directory check found in each crate's files.

pub mod atomic;
pub mod error;
pub mod fsck;
pub mod lock;

pub use atomic::{write_atomic, AtomicFile};
pub use error::chain_string;
pub use lock::{FileLock, LockError};

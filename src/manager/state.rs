//! The state tables the manager's flows obey: which single-hop transitions
//! are allowed for a VM, a snapshot's status and its compression. They live
//! in `crate::domain` (the store reads and writes them too).

pub use crate::domain::{CompressionState, SnapshotStatus, VmState};

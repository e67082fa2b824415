//! The oracle: what must hold of a run, checked through narrow read-only views of the model.
//!
//! One module per violation kind of the specification (section 3). Each produces
//! [`Violation`]s with a stable signature so that findings dedupe across inputs.
#![forbid(unsafe_code)]

pub mod aftermath;
pub mod check;
pub mod guest_memory;
pub mod harness_bug;
pub mod known;
pub mod livelock;
pub mod liveness;
pub mod module_invariants;
pub mod must_not_fail;
pub mod ownership;
pub mod sept_sync;
pub mod state_machine;
pub mod targets;
pub mod violation;

pub use violation::{Violation, ViolationKind};

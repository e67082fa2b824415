//! The tdxfuzz model: typed addresses, the deterministic scheduler, the host page ledger, and
//! (growing) the TDX module, KVM, VMM and guest models that run on them.
#![forbid(unsafe_code)]

pub mod addr;
pub mod coverage;
pub mod guest;
pub mod host;
pub mod ids;
pub mod kvm;
pub mod policy;
pub mod run;
pub mod scenario;
pub mod sched;
pub mod snapshot;
pub mod stack;
pub mod tdx_module;
pub mod vmm;

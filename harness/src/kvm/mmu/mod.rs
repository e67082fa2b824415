//! The x86 MMU pieces the TDX private-memory path uses.

pub mod fault;
pub mod invalidate;
pub mod prefault;
pub mod spte;
pub mod tdp_mmu;

//! Vendor code: TDX.

pub mod build;
pub mod sept_off_to_side;
pub mod tdvmcall;
pub mod tdx;

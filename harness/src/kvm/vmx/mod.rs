//! Vendor code: TDX.

pub mod build;
pub mod tdx;

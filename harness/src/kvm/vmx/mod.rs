//! Vendor code: TDX.

pub mod tdx;

//! The host side of memory: the page allocator and who owns each host page.

pub mod ledger;

pub use ledger::{
    AllocFor, CacheKey, Contents, KernelUse, LeakReason, Ledger, LedgerError, Owner, PageEntry,
    TdxHold, TdxPageKind,
};

//! The host side of memory: the page allocator and who owns each host page, plus the page
//! contents the model tracks (one value per page) so the guest-memory oracle can check reads.

pub mod ledger;
pub mod user;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::addr::Pfn;

pub use user::UserMemory;

pub use ledger::{
    AllocFor, CacheKey, Census, Contents, KernelUse, LeakReason, Ledger, LedgerError, Owner,
    PageEntry, TdxHold, TdxPageKind,
};

/// Host memory: the ledger, page contents, and the illegal moves that were refused.
#[derive(Clone, Debug)]
pub struct Host {
    pub ledger: Ledger,
    /// Page contents as one value per page (absent = zero).
    data: BTreeMap<Pfn, u64>,
    /// Refused ledger moves, with the step they happened at (evidence for the oracle).
    pub refused: Vec<(u64, LedgerError)>,
    /// The VMM's guest-RAM mapping (its pages outlive memslots).
    pub user: UserMemory,
}

/// Shared handle: KVM, the TDX module and the VMM all act on the same host memory.
pub type HostRef = Rc<RefCell<Host>>;

impl Host {
    pub fn new(npages: usize) -> Self {
        Host {
            ledger: Ledger::new(npages),
            data: BTreeMap::new(),
            refused: Vec::new(),
            user: UserMemory::default(),
        }
    }

    pub fn shared(npages: usize) -> HostRef {
        Rc::new(RefCell::new(Host::new(npages)))
    }

    /// Records a refused move (the caller goes on as the kernel would).
    pub fn record(&mut self, step: u64, r: Result<(), LedgerError>) {
        if let Err(e) = r {
            self.refused.push((step, e));
        }
    }

    /// Pages neither free, deliberately leaked, nor the VMM's own memory (which has a live
    /// owner, the VMM process, after the VM is gone): after teardown this must be empty.
    pub fn unaccounted(&self) -> Vec<(Pfn, PageEntry)> {
        let vmm_owned = self.user.pfns();
        self.ledger
            .unaccounted()
            .into_iter()
            .filter(|(p, _)| !vmm_owned.contains(p))
            .collect()
    }

    /// The page's contents.
    pub fn read(&self, pfn: Pfn) -> u64 {
        self.data.get(&pfn).copied().unwrap_or(0)
    }

    /// Writes the page's contents.
    pub fn write(&mut self, pfn: Pfn, v: u64) {
        if v == 0 {
            self.data.remove(&pfn);
        } else {
            self.data.insert(pfn, v);
        }
    }
}

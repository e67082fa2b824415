//! guest_memfd files (virt/kvm/guest_memfd.c): the private pages, allocated on first fault and
//! zeroed when prepared; punch-hole frees them after the mappings are zapped.

use std::collections::{BTreeMap, BTreeSet};

use crate::addr::Pfn;
use crate::host::{AllocFor, Host};
use crate::ids::{GmemId, PgOff};

use super::{Errno, KvmResult};

/// One file's page cache.
#[derive(Clone, Debug, Default)]
pub struct Gmem {
    pub npages: u64,
    pub pages: BTreeMap<PgOff, Pfn>,
    /// Folios marked uptodate ("prepared").
    pub prepared: BTreeSet<PgOff>,
}

/// Every guest_memfd file of the VM.
#[derive(Clone, Debug, Default)]
pub struct GuestMemfds {
    pub files: BTreeMap<GmemId, Gmem>,
}

impl GuestMemfds {
    /// `kvm_gmem_get_pfn` without the binding checks the caller does: the page at `index`,
    /// allocated (and prepared: zeroed) if absent.
    pub fn get_pfn(&mut self, host: &mut Host, file: GmemId, index: PgOff) -> KvmResult<Pfn> {
        let f = self.files.get_mut(&file).ok_or(Errno::EFAULT)?;
        if index.0 >= f.npages {
            return Err(Errno::EIO);
        }
        if let Some(p) = f.pages.get(&index) {
            return Ok(*p);
        }
        let p = host
            .ledger
            .alloc(AllocFor::GuestMemfd { file, index })
            .map_err(|_| Errno::ENOMEM)?;
        host.write(p, 0);
        f.pages.insert(index, p);
        f.prepared.insert(index);
        Ok(p)
    }
}

use super::Kvm;

impl Kvm {
    /// KVM_CREATE_GUEST_MEMFD (`kvm_gmem_create`): a file of `npages` pages.
    pub fn create_guest_memfd(&self, npages: u64) -> GmemId {
        let mut st = self.st.borrow_mut();
        let id = GmemId(st.gmem.files.len() as u32);
        st.gmem.files.insert(
            id,
            Gmem {
                npages,
                ..Gmem::default()
            },
        );
        id
    }

    /// Pages a guest_memfd file holds (for checks).
    pub fn gmem_pages(&self, file: GmemId) -> Vec<(PgOff, Pfn)> {
        self.st.borrow().gmem.files[&file]
            .pages
            .iter()
            .map(|(o, p)| (*o, *p))
            .collect()
    }
}

//! guest_memfd files (virt/kvm/guest_memfd.c): the private pages, allocated on first fault and
//! zeroed when prepared; punch-hole frees them after the mappings are zapped; the last close of
//! the file zaps every mapping and the inode's eviction frees the pages.

use std::collections::{BTreeMap, BTreeSet};

use crate::addr::{Gfn, Pfn};
use crate::host::{AllocFor, Host};
use crate::ids::{GmemId, PgOff, SlotId};
use crate::sched::{Ctx, Mutex};

use super::teardown::TeardownState;
use super::{Errno, KvmResult, MemEvent};

/// One file's page cache.
#[derive(Clone, Debug, Default)]
pub struct Gmem {
    pub npages: u64,
    pub pages: BTreeMap<PgOff, Pfn>,
    /// Folios marked uptodate ("prepared").
    pub prepared: BTreeSet<PgOff>,
    /// The inode's `filemap_invalidate_lock` (created on first use: it needs the scheduler).
    pub invalidate_lock: Option<Mutex>,
    /// The last reference to the file was put (`kvm_gmem_release` ran): no new faults, binds
    /// or punch-holes reach it.
    pub closed: bool,
    /// The VMM closed its (only) fd of the file.
    pub fd_closed: bool,
    /// References syscalls in flight on the fd hold (`fdget` in fallocate): the release
    /// waits for the last one.
    pub refs: u32,
}

/// Every guest_memfd file of the VM.
#[derive(Clone, Debug, Default)]
pub struct GuestMemfds {
    pub files: BTreeMap<GmemId, Gmem>,
    /// VM teardown state (`kvm_destroy_vm` and the TDX teardown hooks). It lives here because
    /// guest_memfd's release is where teardown starts; see `kvm::teardown`.
    pub teardown: TeardownState,
}

impl GuestMemfds {
    /// `kvm_gmem_get_pfn` without the binding checks the caller does: the page at `index`,
    /// allocated if absent, and zeroed and marked uptodate ("prepared") if it is not yet, e.g.
    /// a page a failed populate left in the page cache. A closed file gives -EFAULT.
    pub fn get_pfn(&mut self, host: &mut Host, file: GmemId, index: PgOff) -> KvmResult<Pfn> {
        let f = self.files.get_mut(&file).ok_or(Errno::EFAULT)?;
        if f.closed {
            return Err(Errno::EFAULT);
        }
        if index.0 >= f.npages {
            return Err(Errno::EIO);
        }
        if let Some(p) = f.pages.get(&index) {
            if f.prepared.insert(index) {
                // clear_highpage + folio_mark_uptodate.
                host.write(*p, 0);
            }
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

/// One memslot binding of a file clipped to a page-offset range: the slot and the gfns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    pub slot: SlotId,
    pub start: Gfn,
    pub end: Gfn,
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

    /// The invalidate lock of `file` while the file is open (a closed file's bindings are
    /// gone: `kvm_gmem_unbind` finds no `slot->gmem.file`).
    pub fn open_gmem_invalidate_lock(&self, cx: &Ctx, file: GmemId) -> Option<Mutex> {
        if self.st.borrow().gmem.files.get(&file)?.closed {
            return None;
        }
        self.gmem_invalidate_lock(cx, file)
    }

    /// `filemap_invalidate_lock(inode->i_mapping)` of `file`: the inode's invalidate lock
    /// (made on first use), or None for a file that does not exist.
    pub fn gmem_invalidate_lock(&self, cx: &Ctx, file: GmemId) -> Option<Mutex> {
        let mut st = self.st.borrow_mut();
        let f = st.gmem.files.get_mut(&file)?;
        Some(
            *f.invalidate_lock
                .get_or_insert_with(|| Mutex::new(cx, "filemap_invalidate_lock")),
        )
    }

    /// The file's memslot bindings overlapping pgoffs `[start, end)` (`gmem->bindings`), each
    /// clipped to the range and translated to gfns, in slot order.
    pub fn gmem_bindings(&self, file: GmemId, start: PgOff, end: PgOff) -> Vec<Binding> {
        let st = self.st.borrow();
        st.memslots
            .slots
            .iter()
            .filter_map(|s| {
                let (f, off) = s.gmem?;
                if f != file {
                    return None;
                }
                let lo = start.0.max(off.0);
                let hi = end.0.min(off.0 + s.npages);
                (lo < hi).then(|| Binding {
                    slot: s.id,
                    start: s.base_gfn.add(lo - off.0),
                    end: s.base_gfn.add(hi - off.0),
                })
            })
            .collect()
    }

    /// `__kvm_gmem_invalidate_begin` (filemap invalidate lock held): for the bindings, take
    /// mmu_lock for write once, `kvm_mmu_invalidate_begin` with every binding's range added,
    /// and unmap each range from the private (mirror) roots, which removes the pages from the
    /// S-EPT through the removal hook. Policy `sept_off_to_side` (seed 001) unmaps the ranges
    /// under `sept_lock` instead. Returns whether any binding was found.
    pub async fn kvm_gmem_invalidate_begin(&self, cx: &Ctx, bindings: &[Binding]) -> bool {
        let (Some(lo), Some(hi)) = (
            bindings.iter().map(|b| b.start).min(),
            bindings.iter().map(|b| b.end).max(),
        ) else {
            return false;
        };
        self.mmu_lock.write(cx).await;
        // kvm_mmu_invalidate_begin + kvm_mmu_invalidate_range_add of each binding: the range
        // grows to the union, which is what one begin over [lo, hi) records.
        self.mmu_invalidate_begin(lo, hi);
        let mut flush = false;
        for b in bindings {
            // attr_filter PRIVATE (the file was not created INIT_SHARED): mirror roots only.
            flush |= self
                .kvm_tdp_mmu_unmap_gfn_range(cx, b.start, b.end, true, false)
                .await;
        }
        if flush {
            self.kvm_flush_remote_tlbs(cx).await;
        }
        self.mmu_lock.write_unlock(cx).await;
        if self.policy.sept_off_to_side {
            for b in bindings {
                self.sept_side_unmap(cx, b.start, b.end).await;
            }
        }
        true
    }

    /// `__kvm_gmem_invalidate_end`: if a binding overlapped, `kvm_mmu_invalidate_end` under
    /// mmu_lock for write.
    pub async fn kvm_gmem_invalidate_end(&self, cx: &Ctx, found: bool) {
        if !found {
            return;
        }
        self.mmu_lock.write(cx).await;
        self.mmu_invalidate_end();
        self.mmu_lock.write_unlock(cx).await;
    }

    /// `truncate_inode_pages_range` on a guest_memfd inode: every page of `[start, end)` leaves
    /// the page cache and goes back to the allocator. The ledger refuses a page that is still
    /// TD-private or held by the TDX module (a removal that failed): that is recorded.
    fn gmem_truncate(&self, cx: &Ctx, file: GmemId, start: PgOff, end: PgOff) {
        let pages: Vec<Pfn> = {
            let mut st = self.st.borrow_mut();
            let Some(f) = st.gmem.files.get_mut(&file) else {
                return;
            };
            let offs: Vec<PgOff> = f.pages.range(start..end).map(|(o, _)| *o).collect();
            offs.iter()
                .map(|o| {
                    f.prepared.remove(o);
                    f.pages.remove(o).expect("page in range")
                })
                .collect()
        };
        if self.st.borrow().injected.truncate_without_free {
            return;
        }
        let mut h = self.host.borrow_mut();
        for p in pages {
            let r = h.ledger.free(p);
            h.record(cx.step(), r);
        }
    }

    /// fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) on a guest_memfd
    /// (`kvm_gmem_punch_hole`): under the inode's invalidate lock, zap every mapping of the
    /// range (S-EPT removal included), free its pages, end the invalidation. Policy
    /// `sept_off_to_side` (seed 001) refills the hole's private gfns with fresh pages before
    /// the invalidation ends (nothing would fault them in), unless the VM is dead.
    pub async fn kvm_gmem_punch_hole(
        &self,
        cx: &Ctx,
        file: GmemId,
        start: PgOff,
        npages: u64,
    ) -> KvmResult<()> {
        self.with_fd(cx, file, || {
            self.punch_hole_fd_held(cx, file, start, npages)
        })
        .await
    }

    /// `kvm_gmem_punch_hole` with the fd's reference held.
    async fn punch_hole_fd_held(
        &self,
        cx: &Ctx,
        file: GmemId,
        start: PgOff,
        npages: u64,
    ) -> KvmResult<()> {
        let Some(lock) = self.gmem_invalidate_lock(cx, file) else {
            return Err(Errno::EINVAL);
        };
        let end = PgOff(start.0.saturating_add(npages));
        lock.lock(cx).await;
        let bindings = self.gmem_bindings(file, start, end);
        let found = self.kvm_gmem_invalidate_begin(cx, &bindings).await;
        self.gmem_truncate(cx, file, start, end);
        {
            let mut st = self.st.borrow_mut();
            for b in &bindings {
                st.mem_log.push((
                    cx.step(),
                    MemEvent::PunchedHole {
                        start: b.start,
                        end: b.end,
                    },
                ));
            }
        }
        cx.yield_at("truncate_inode_pages_range").await;
        let mut r = Ok(());
        // A dead VM's hole is not refilled: the design leaves that open, and building state in
        // a TD nothing will run again only delays its teardown.
        if self.policy.sept_off_to_side && !self.is_dead() {
            for b in &bindings {
                let m = self
                    .sept_side_populate(cx, b.start, b.end, Some(file))
                    .await;
                r = r.and(m);
            }
        }
        self.kvm_gmem_invalidate_end(cx, found).await;
        lock.unlock(cx).await;
        r
    }

    /// fallocate(FALLOC_FL_KEEP_SIZE) on a guest_memfd (`kvm_gmem_allocate`): -EINVAL past the
    /// file's size (it is immutable), else under the invalidate lock each missing page of the
    /// range is added to the page cache, not uptodate (the first fault or populate zeroes and
    /// prepares it); a signal stops it with -EINTR, a failed allocation with -ENOMEM.
    pub async fn kvm_gmem_allocate(
        &self,
        cx: &Ctx,
        file: GmemId,
        start: PgOff,
        npages: u64,
    ) -> KvmResult<()> {
        self.with_fd(cx, file, || self.allocate_fd_held(cx, file, start, npages))
            .await
    }

    /// `kvm_gmem_allocate` with the fd's reference held.
    async fn allocate_fd_held(
        &self,
        cx: &Ctx,
        file: GmemId,
        start: PgOff,
        npages: u64,
    ) -> KvmResult<()> {
        let Some(lock) = self.gmem_invalidate_lock(cx, file) else {
            return Err(Errno::EINVAL);
        };
        let size = self.st.borrow().gmem.files[&file].npages;
        let end = start.0.saturating_add(npages);
        if end > size {
            return Err(Errno::EINVAL);
        }
        lock.lock(cx).await;
        let mut r = Ok(());
        for index in (start.0..end).map(PgOff) {
            let present = self.st.borrow().gmem.files[&file]
                .pages
                .contains_key(&index);
            if !present {
                let p = {
                    let mut h = self.host.borrow_mut();
                    h.ledger
                        .alloc(crate::host::AllocFor::GuestMemfd { file, index })
                };
                let Ok(p) = p else {
                    r = Err(Errno::ENOMEM);
                    break;
                };
                if let Some(f) = self.st.borrow_mut().gmem.files.get_mut(&file) {
                    f.pages.insert(index, p);
                }
            }
            cx.yield_at("kvm_gmem_allocate:cond_resched").await;
        }
        lock.unlock(cx).await;
        r
    }

    /// A syscall on the VMM's fd of `file` (fallocate): `body` runs holding the fd's reference.
    async fn with_fd<F, Fut>(&self, cx: &Ctx, file: GmemId, body: F) -> KvmResult<()>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = KvmResult<()>>,
    {
        self.gmem_fdget(file)?;
        let r = body().await;
        self.gmem_fdput(cx, file).await;
        r
    }

    /// `fdget` of the VMM's fd of `file` for a syscall: -EBADF once it was closed.
    pub fn gmem_fdget(&self, file: GmemId) -> KvmResult<()> {
        let mut st = self.st.borrow_mut();
        let f = st.gmem.files.get_mut(&file).ok_or(Errno::EBADF)?;
        if f.fd_closed {
            return Err(Errno::EBADF);
        }
        f.refs += 1;
        Ok(())
    }

    /// `fdput` after the syscall: the last reference of a closed fd releases the file.
    pub async fn gmem_fdput(&self, cx: &Ctx, file: GmemId) {
        let last = {
            let mut st = self.st.borrow_mut();
            let f = st.gmem.files.get_mut(&file).expect("file");
            f.refs -= 1;
            f.refs == 0 && f.fd_closed
        };
        if last {
            self.kvm_gmem_release(cx, file).await;
        }
    }

    /// close() of the VMM's fd of `file`: -EBADF if it is closed already; the file is released
    /// now, or by the last syscall still using it.
    pub async fn gmem_close(&self, cx: &Ctx, file: GmemId) -> KvmResult<()> {
        let now = {
            let mut st = self.st.borrow_mut();
            let f = st.gmem.files.get_mut(&file).ok_or(Errno::EBADF)?;
            if f.fd_closed {
                return Err(Errno::EBADF);
            }
            f.fd_closed = true;
            f.refs == 0
        };
        if now {
            self.kvm_gmem_release(cx, file).await;
        }
        Ok(())
    }

    /// `kvm_gmem_release` (the last fput of the file): under slots_lock and the invalidate
    /// lock, NULL every binding's `slot->gmem.file` and zap everything the file maps; then the
    /// inode is evicted (`kvm_gmem_evict_inode` -> `truncate_inode_pages_final`), which frees
    /// its pages.
    pub async fn kvm_gmem_release(&self, cx: &Ctx, file: GmemId) {
        let Some(lock) = self.gmem_invalidate_lock(cx, file) else {
            return;
        };
        if self.st.borrow().gmem.files[&file].closed {
            return;
        }
        self.slots_lock.lock(cx).await;
        lock.lock(cx).await;
        let all = PgOff(u64::MAX);
        let bindings = self.gmem_bindings(file, PgOff(0), all);
        {
            let mut st = self.st.borrow_mut();
            for s in st.memslots.slots.iter_mut() {
                if s.gmem.is_some_and(|(f, _)| f == file) {
                    s.gmem = None;
                }
            }
            st.gmem.files.get_mut(&file).expect("file").closed = true;
        }
        let found = self.kvm_gmem_invalidate_begin(cx, &bindings).await;
        self.kvm_gmem_invalidate_end(cx, found).await;
        lock.unlock(cx).await;
        self.slots_lock.unlock(cx).await;
        // iput of the inode: the page cache goes.
        self.gmem_truncate(cx, file, PgOff(0), all);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `kvm_gmem_get_pfn` on a page in the page cache that is not uptodate (a populate whose
    /// callback failed leaves one) zeroes it and marks it uptodate; an uptodate page is handed
    /// out as it is. Rows: (prepared before, content after).
    #[test]
    fn get_pfn_zeroes_a_page_left_unprepared() {
        for (prepared, want) in [(false, 0), (true, 0x55)] {
            let host = Host::shared(64);
            let mut h = host.borrow_mut();
            let file = GmemId(0);
            let index = PgOff(3);
            let p = h
                .ledger
                .alloc(AllocFor::GuestMemfd { file, index })
                .unwrap();
            h.write(p, 0x55);
            let mut g = GuestMemfds::default();
            let mut f = Gmem {
                npages: 8,
                ..Gmem::default()
            };
            f.pages.insert(index, p);
            if prepared {
                f.prepared.insert(index);
            }
            g.files.insert(file, f);
            assert_eq!(g.get_pfn(&mut h, file, index), Ok(p));
            assert_eq!(h.read(p), want, "prepared before: {prepared}");
            assert!(g.files[&file].prepared.contains(&index));
        }
    }
}

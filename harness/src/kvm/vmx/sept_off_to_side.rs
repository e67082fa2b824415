//! Policy `sept_off_to_side`: seed 001's design (David Matlack, "S-EPT off to the side"). KVM
//! manages the Secure EPT with TDX-specific routines instead of mirroring it in the TDP MMU,
//! which is left with the shared (direct) mappings only:
//!
//! - populate: at KVM_TDX_FINALIZE_VM, and when a memslot appears in a runnable TD, every gfn
//!   of a guest_memfd memslot that is PRIVATE is mapped: TDH.MEM.SEPT.ADD of each table once,
//!   then TDH.MEM.PAGE.AUG of each 4K page with its guest_memfd page (KVM_TDX_INIT_MEM_REGION's
//!   TDH.MEM.PAGE.ADD goes the same way during the build);
//! - conversions: to shared unmaps each page with upstream's removal (BLOCK, TRACK + kick,
//!   REMOVE, WBINVD, clear); to private maps the range;
//! - punch hole and memslot delete unmap the same way; a punched hole is refilled at once with
//!   fresh pages (nothing would fault them in later), which the guest must accept again, as it
//!   must upstream after its next fault (not on a dead VM: the seed leaves that open, and the
//!   after-death check wants no SEAMCALL that builds the TD from an op begun after death);
//! - the fault path never installs a private mapping: a private fault is RET_PF_RETRY and the
//!   vCPU goes back to the guest, whose access succeeds once the conversion is done;
//! - teardown: the leaves go when guest_memfd is released (HKID still assigned, as upstream);
//!   the table pages KVM added are reclaimed from `SeptSide::tables` after the HKID is released.
//!
//! Every S-EPT change is made under the one `Kvm::sept_lock`. Mapping also holds the invalidate
//! lock of each guest_memfd file it takes pages from (upstream's `kvm_gmem_get_pfn` takes it
//! shared), so it cannot map a page that a punch-hole is about to truncate. A SEAMCALL's
//! TDX_OPERAND_BUSY (a guest TDCALL or a zero-step TDH.VP.ENTER holding the entry or the tree)
//! is answered as `tdh_do_no_vcpus` answers it: kick every vCPU out with entry blocked, retry
//! once. A private gfn the design cannot back (no memory) is made shared again, so the guest's
//! next private access exits to userspace, whose conversion back retries the mapping.

use std::collections::BTreeMap;
use std::future::Future;

use crate::addr::{Gfn, Gpa, Pfn, PgLevel};
use crate::host::{AllocFor, KernelUse};
use crate::ids::{GmemId, PgOff};
use crate::kvm::mmu::fault::RetPf;
use crate::kvm::{Errno, Kvm, KvmResult, MemEvent, Request, TdState};
use crate::sched::{Ctx, Mutex};

/// Seed 001 design: KVM's own record of the S-EPT it built (what the mirror root records
/// upstream).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeptSide {
    /// S-EPT table pages KVM added, by the level and first gfn of the entry that links each.
    pub tables: BTreeMap<(PgLevel, Gfn), Pfn>,
    /// Private 4K mappings: gfn -> guest_memfd page.
    pub leaves: BTreeMap<Gfn, Pfn>,
}

/// Levels of the S-EPT entries that link the tables above a 4K leaf, top down.
const TABLE_LEVELS: [PgLevel; 3] = [PgLevel::L512G, PgLevel::L1G, PgLevel::L2M];

/// The whole guest-physical space, as a gfn range end.
const GFN_END: Gfn = Gfn::new(u64::MAX >> 12);

impl Kvm {
    /// Seed 001 design: a private fault (vCPU `v`, `gpa`) installs nothing. A mismatch with the
    /// attributes, no memslot or no guest_memfd binding is KVM_EXIT_MEMORY_FAULT (-EFAULT) as
    /// upstream. A prefetch (KVM_PRE_FAULT_MEMORY) of a mapped gfn is RET_PF_SPURIOUS, of one
    /// not mapped yet or on an INVALID slot -EAGAIN. Anything else (a page being converted,
    /// removed or refilled) is RET_PF_RETRY: the vCPU re-enters and the guest retries.
    pub(crate) fn sept_side_private_fault(
        &self,
        v: usize,
        gpa: Gpa,
        prefetch: bool,
    ) -> KvmResult<RetPf> {
        let gfn = gpa.gfn();
        let r = {
            let st = self.st.borrow();
            if !st.attributes.is_private(gfn) {
                None
            } else {
                match st.memslots.lookup(gfn) {
                    None => None,
                    Some(s) if s.invalid && prefetch => return Err(Errno::EAGAIN),
                    Some(s) if s.invalid => Some(RetPf::Retry),
                    Some(s) if s.gmem_index(gfn).is_none() => None,
                    Some(_) if prefetch && st.sept_side.leaves.contains_key(&gfn) => {
                        Some(RetPf::Spurious)
                    }
                    // Mapping is in flight, possibly in a memslot update waiting for this
                    // caller's SRCU read section: userspace retries, as for an INVALID slot.
                    Some(_) if prefetch => return Err(Errno::EAGAIN),
                    Some(_) => Some(RetPf::Retry),
                }
            }
        };
        match r {
            Some(r) => Ok(r),
            None => {
                self.set_memory_fault_exit(v, gpa, true);
                Err(Errno::EFAULT)
            }
        }
    }

    /// Seed 001 design: the PRIVATE gfns of `[start, end)` that a valid memslot binds to an
    /// open guest_memfd, with the file and page offset of each, in gfn order.
    fn sept_side_backed_private(&self, start: Gfn, end: Gfn) -> Vec<(Gfn, GmemId, PgOff)> {
        let st = self.st.borrow();
        let mut out = Vec::new();
        for s in st.memslots.slots.iter().filter(|s| !s.invalid) {
            let mut g = start.max(s.base_gfn);
            let hi = end.min(s.end());
            while g < hi {
                if st.attributes.is_private(g) {
                    if let Some((f, i)) = s.gmem_index(g) {
                        if st.gmem.files.get(&f).is_some_and(|file| !file.closed) {
                            out.push((g, f, i));
                        }
                    }
                }
                g = g.add(1);
            }
        }
        out.sort();
        out
    }

    /// Seed 001 design: map `[start, end)` in a runnable TD (before KVM_TDX_FINALIZE_VM there is
    /// nothing to do: finalize maps everything). Takes the invalidate lock of each guest_memfd
    /// the range is bound to (but `held`, which the caller holds), then `sept_lock`. On -ENOMEM
    /// the gfns left unmapped are made shared (see the module comment).
    pub(crate) async fn sept_side_populate(
        &self,
        cx: &Ctx,
        start: Gfn,
        end: Gfn,
        held: Option<GmemId>,
    ) -> KvmResult<()> {
        if self.st.borrow().tdx.state != TdState::Runnable {
            return Ok(());
        }
        let files: Vec<GmemId> = {
            let st = self.st.borrow();
            let mut f: Vec<GmemId> = st
                .memslots
                .slots
                .iter()
                .filter(|s| s.base_gfn < end && start < s.end())
                .filter_map(|s| s.gmem.map(|(g, _)| g))
                .filter(|g| Some(*g) != held)
                .collect();
            f.sort();
            f.dedup();
            f
        };
        let locks: Vec<Mutex> = files
            .iter()
            .filter_map(|f| self.gmem_invalidate_lock(cx, *f))
            .collect();
        for l in &locks {
            l.lock(cx).await;
        }
        self.sept_lock.lock(cx).await;
        let r = self.sept_side_map_range(cx, start, end).await;
        if r == Err(Errno::ENOMEM) {
            self.sept_side_share_unbacked(cx, start, end);
        }
        self.sept_lock.unlock(cx).await;
        for l in locks.iter().rev() {
            l.unlock(cx).await;
        }
        r
    }

    /// Seed 001 design: map every PRIVATE gfn of every memslot (KVM_TDX_FINALIZE_VM, after
    /// TDH.MR.FINALIZE).
    pub(crate) async fn sept_side_populate_all(&self, cx: &Ctx) -> KvmResult<()> {
        self.sept_side_populate(cx, Gfn::new(0), GFN_END, None)
            .await
    }

    /// Seed 001 design: unmap `[start, end)` under `sept_lock`.
    pub(crate) async fn sept_side_unmap(&self, cx: &Ctx, start: Gfn, end: Gfn) {
        self.sept_lock.lock(cx).await;
        self.sept_side_unmap_range(cx, start, end).await;
        self.sept_lock.unlock(cx).await;
    }

    /// Seed 001 design: the PRIVATE gfns of `[start, end)` that could not be mapped become
    /// shared (a conversion KVM logs like any other); `sept_lock` held.
    fn sept_side_share_unbacked(&self, cx: &Ctx, start: Gfn, end: Gfn) {
        let unbacked: Vec<Gfn> = self
            .sept_side_backed_private(start, end)
            .into_iter()
            .map(|(g, _, _)| g)
            .filter(|g| !self.st.borrow().sept_side.leaves.contains_key(g))
            .collect();
        let mut st = self.st.borrow_mut();
        for g in unbacked {
            st.attributes.set(g, g.add(1), false);
            st.mem_log.push((
                cx.step(),
                MemEvent::Converted {
                    start: g,
                    end: g.add(1),
                    private: false,
                },
            ));
        }
    }

    /// Seed 001 design: map every backed PRIVATE gfn of `[start, end)` not mapped yet with its
    /// guest_memfd page (allocated and zeroed if absent, as the fault path gets it);
    /// `sept_lock` held. A file being released is skipped (its release unmaps what is there).
    async fn sept_side_map_range(&self, cx: &Ctx, start: Gfn, end: Gfn) -> KvmResult<()> {
        debug_assert!(self.sept_lock.held_by_current(cx));
        for (gfn, file, index) in self.sept_side_backed_private(start, end) {
            if self.st.borrow().sept_side.leaves.contains_key(&gfn) {
                continue;
            }
            let pfn = {
                let mut st = self.st.borrow_mut();
                let mut host = self.host.borrow_mut();
                st.gmem.get_pfn(&mut host, file, index)
            };
            let pfn = match pfn {
                Ok(p) => p,
                Err(Errno::EFAULT) => continue,
                Err(e) => return Err(e),
            };
            self.sept_side_map_page(cx, gfn, pfn).await?;
        }
        Ok(())
    }

    /// Seed 001 design: map `gfn` to `pfn` (`sept_lock` held): TDH.MEM.SEPT.ADD of each table
    /// above it KVM has not added yet, then TDH.MEM.PAGE.AUG (TDH.MEM.PAGE.ADD of
    /// `page_add_src` during the build, `tdx_sept_map_leaf_spte`'s choice).
    pub(crate) async fn sept_side_map_page(&self, cx: &Ctx, gfn: Gfn, pfn: Pfn) -> KvmResult<()> {
        debug_assert!(self.sept_lock.held_by_current(cx));
        for level in TABLE_LEVELS {
            let base = gfn.align_down(level);
            if self
                .st
                .borrow()
                .sept_side
                .tables
                .contains_key(&(level, base))
            {
                continue;
            }
            let page = self
                .host
                .borrow_mut()
                .ledger
                .alloc(AllocFor::Kernel(KernelUse::Sept))
                .map_err(|_| Errno::ENOMEM)?;
            let r = self
                .sept_side_retry_busy(cx, "tdx_sept_map_nonleaf_spte", || {
                    self.tdx_sept_add_table(cx, base, level, page)
                })
                .await;
            if let Err(e) = r {
                // The module did not take the page.
                let mut h = self.host.borrow_mut();
                let f = h.ledger.free(page);
                h.record(cx.step(), f);
                return Err(e);
            }
            self.st
                .borrow_mut()
                .sept_side
                .tables
                .insert((level, base), page);
        }
        self.sept_side_retry_busy(cx, "tdx_sept_map_leaf_spte", || {
            self.tdx_sept_map_leaf_spte(cx, gfn, PgLevel::L4K, pfn)
        })
        .await?;
        self.st.borrow_mut().sept_side.leaves.insert(gfn, pfn);
        Ok(())
    }

    /// Seed 001 design: one S-EPT map step (`sept_lock` held); -EBUSY is answered as
    /// `tdh_do_no_vcpus` answers BUSY: block entry, kick every vCPU out (waiting for them),
    /// retry once. BUSY again must not happen: KVM_BUG_ON, -EIO.
    async fn sept_side_retry_busy<F, Fut>(
        &self,
        cx: &Ctx,
        location: &'static str,
        f: F,
    ) -> KvmResult<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = KvmResult<()>>,
    {
        let r = f().await;
        if r != Err(Errno::EBUSY) {
            return r;
        }
        self.st.borrow_mut().tdx.wait_for_sept_zap = true;
        self.make_all_cpus_request(cx, Request::OutsideGuestMode)
            .await;
        let r = f().await;
        self.st.borrow_mut().tdx.wait_for_sept_zap = false;
        if r == Err(Errno::EBUSY) {
            self.bug(
                cx,
                location,
                "TDX_OPERAND_BUSY with every vCPU kicked out".into(),
            )
            .await;
            return Err(Errno::EIO);
        }
        r
    }

    /// Seed 001 design: unmap every page KVM mapped in `[start, end)` (`sept_lock` held), one
    /// by one with upstream's removal (`tdx_sept_remove_private_page`: BLOCK, TRACK + kick,
    /// REMOVE, WBINVD, clear). The record goes first, as a mirror SPTE is cleared before its
    /// removal hook runs; a failed removal has already bugged the VM.
    pub(crate) async fn sept_side_unmap_range(&self, cx: &Ctx, start: Gfn, end: Gfn) {
        debug_assert!(self.sept_lock.held_by_current(cx));
        let leaves: Vec<Gfn> = self
            .st
            .borrow()
            .sept_side
            .leaves
            .range(start..end)
            .map(|(g, _)| *g)
            .collect();
        for gfn in leaves {
            let Some(pfn) = self.st.borrow_mut().sept_side.leaves.remove(&gfn) else {
                continue;
            };
            let _ = self
                .tdx_sept_remove_private_page(cx, gfn, PgLevel::L4K, pfn)
                .await;
        }
    }

    /// Seed 001 design: teardown of the tables (after the HKID is released and every leaf is
    /// gone): reclaim, clear and free each S-EPT page KVM added, lowest level first, through
    /// `tdx_sept_free_private_spt`'s body (leaked if that cannot be done).
    pub(crate) async fn sept_side_free_tables(&self, cx: &Ctx) {
        let tables = std::mem::take(&mut self.st.borrow_mut().sept_side.tables);
        if !self.st.borrow().sept_side.leaves.is_empty() {
            self.warn(
                cx,
                "sept_side_free_tables",
                "private pages still mapped at teardown".into(),
            );
        }
        for (_, page) in tables {
            self.tdx_sept_free_page(cx, page).await;
        }
    }
}

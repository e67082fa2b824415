//! The TDP MMU (arch/x86/kvm/mmu/tdp_mmu.c): roots, shadow pages, the atomic set path with the
//! mirror freeze protocol, the write-locked zap path with the external (S-EPT) hooks.
//!
//! Shadow pages are sparse tables of SPTEs. A non-leaf SPTE holds the pfn of its child's `spt`
//! page, as in KVM; a mirror shadow page also owns the `external_spt` page handed to the TDX
//! module. Every SPTE compare-and-exchange is a yield point.

use std::collections::BTreeMap;

use crate::addr::{Gfn, Pfn, PgLevel};
use crate::host::{AllocFor, KernelUse};
use crate::sched::{Ctx, Point};

use super::invalidate::{root_match, RootTypes};
use super::spte::Spte;
use crate::kvm::{Errno, Kvm, KvmResult};

/// A shadow page (`struct kvm_mmu_page`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpId(pub u32);

/// One page table.
#[derive(Clone, Debug)]
pub struct Sp {
    /// Level of the entries in this table (a root's are 512G).
    pub level: PgLevel,
    /// First gfn this table covers.
    pub base: Gfn,
    /// `role.is_mirror`.
    pub mirror: bool,
    /// The page holding the table (`sp->spt`).
    pub spt: Pfn,
    /// `sp->external_spt`: the S-EPT page (mirror only; None once intentionally leaked).
    pub external_spt: Option<Pfn>,
    pub sptes: BTreeMap<u16, Spte>,
    /// Roots: `role.invalid`, reference count, `tdp_mmu_scheduled_root_to_zap`.
    pub invalid: bool,
    pub refcount: u32,
    pub scheduled_to_zap: bool,
}

/// Pages `mmu_topup_memory_caches` keeps filled: upstream's minimum, PT64_ROOT_MAX_LEVEL (the
/// most tables one fault can link). Upstream fills a short cache to its capacity (40); the
/// model fills to the minimum to keep the host small.
pub const MMU_CACHE_MIN: usize = 5;

/// A vCPU's MMU memory caches (`vcpu->arch.mmu_shadow_page_cache`, `mmu_external_spt_cache`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MmuCaches {
    pub shadow: Vec<Pfn>,
    pub external: Vec<Pfn>,
}

/// All shadow pages of the VM.
#[derive(Clone, Debug, Default)]
pub struct TdpMmu {
    pub sps: BTreeMap<SpId, Sp>,
    by_spt: BTreeMap<Pfn, SpId>,
    /// `kvm->arch.tdp_mmu_roots`.
    pub roots: Vec<SpId>,
    next: u32,
    /// Tables already freed, kept so that a use after free reads and writes stale memory (as
    /// on hardware) instead of stopping the model; `use_after_free` records the first such use.
    freed: BTreeMap<SpId, Sp>,
    use_after_free: std::cell::Cell<Option<(SpId, &'static str)>>,
}

/// Index of `gfn`'s entry in a table of `level` entries.
pub fn index(gfn: Gfn, level: PgLevel) -> u16 {
    ((gfn.raw() >> (9 * u64::from(level.kvm() - 1))) & 511) as u16
}

impl TdpMmu {
    /// The table `id`, live or already freed (a use after free, recorded).
    fn table(&self, id: SpId, what: &'static str) -> &Sp {
        if let Some(s) = self.sps.get(&id) {
            return s;
        }
        self.note_use_after_free(id, what);
        self.freed.get(&id).expect("a table the MMU allocated")
    }

    fn note_use_after_free(&self, id: SpId, what: &'static str) {
        if self.use_after_free.get().is_none() {
            self.use_after_free.set(Some((id, what)));
        }
    }

    /// The first access to a freed table: (table, what KVM did with it).
    pub fn use_after_free(&self) -> Option<(SpId, &'static str)> {
        self.use_after_free.get()
    }

    pub fn get(&self, id: SpId) -> &Sp {
        self.table(id, "read")
    }

    pub fn spte(&self, id: SpId, idx: u16) -> Spte {
        self.table(id, "read an SPTE of")
            .sptes
            .get(&idx)
            .copied()
            .unwrap_or(Spte::NONPRESENT)
    }

    pub fn set(&mut self, id: SpId, idx: u16, v: Spte) {
        if !self.sps.contains_key(&id) {
            self.note_use_after_free(id, "wrote an SPTE of");
        }
        let sp = match self.sps.get_mut(&id) {
            Some(sp) => sp,
            None => self.freed.get_mut(&id).expect("a table the MMU allocated"),
        };
        if v == Spte::NONPRESENT {
            sp.sptes.remove(&idx);
        } else {
            sp.sptes.insert(idx, v);
        }
    }

    /// The shadow page a non-leaf SPTE points to.
    pub fn child(&self, spte: Spte) -> Option<SpId> {
        self.by_spt.get(&spte.pfn()).copied()
    }

    fn insert(&mut self, sp: Sp) -> SpId {
        let id = SpId(self.next);
        self.next += 1;
        self.by_spt.insert(sp.spt, id);
        self.sps.insert(id, sp);
        id
    }

    fn remove(&mut self, id: SpId) -> Sp {
        let sp = self.sps.remove(&id).expect("sp");
        self.by_spt.remove(&sp.spt);
        self.roots.retain(|r| *r != id);
        self.freed.insert(id, sp.clone());
        sp
    }

    /// The table and index of the SPTE at `level` covering `gfn`, if every table above exists.
    pub fn walk(&self, root: SpId, gfn: Gfn, level: PgLevel) -> Option<(SpId, u16)> {
        let mut sp = root;
        loop {
            let s = self.table(sp, "walked");
            let idx = index(gfn, s.level);
            if s.level == level {
                return Some((sp, idx));
            }
            let e = self.spte(sp, idx);
            if !e.is_present() || e.is_leaf() {
                return None;
            }
            sp = self.child(e)?;
        }
    }

    /// Every present leaf under `root` in `[start, end)`: (table, index, level, gfn, spte).
    pub fn leaves(&self, root: SpId, start: Gfn, end: Gfn) -> Vec<(SpId, u16, PgLevel, Gfn, Spte)> {
        let mut out = Vec::new();
        self.collect(root, start, end, &mut out);
        out
    }

    fn collect(
        &self,
        sp: SpId,
        start: Gfn,
        end: Gfn,
        out: &mut Vec<(SpId, u16, PgLevel, Gfn, Spte)>,
    ) {
        let s = self.table(sp, "walked");
        for (&idx, &e) in &s.sptes {
            let gfn = s.base.add(u64::from(idx) * s.level.pages());
            if gfn.add(s.level.pages()) <= start || gfn >= end {
                continue;
            }
            if e.is_leaf() {
                out.push((sp, idx, s.level, gfn, e));
            } else if e.is_present() {
                if let Some(c) = self.child(e) {
                    self.collect(c, start, end, out);
                }
            }
        }
    }

    /// Every present non-leaf SPTE under `root` (for the desync check): (level, gfn, child);
    /// `None` if the SPTE points at a page that is no longer a table (freed under it).
    pub fn tables(&self, root: SpId) -> Vec<(PgLevel, Gfn, Option<SpId>)> {
        let mut out = Vec::new();
        let mut stack = vec![root];
        while let Some(sp) = stack.pop() {
            let s = self.table(sp, "walked");
            for (&idx, &e) in &s.sptes {
                if e.is_present() && !e.is_leaf() {
                    let c = self.child(e);
                    out.push((s.level, s.base.add(u64::from(idx) * s.level.pages()), c));
                    stack.extend(c);
                }
            }
        }
        out.sort();
        out
    }

    /// Frozen SPTEs anywhere (a frozen SPTE at a quiescent point means a lost unfreeze).
    pub fn frozen(&self) -> Vec<(SpId, u16)> {
        self.sps
            .iter()
            .flat_map(|(id, s)| {
                s.sptes
                    .iter()
                    .filter(|(_, e)| e.is_frozen())
                    .map(move |(i, _)| (*id, *i))
            })
            .collect()
    }
}

/// Why a SPTE update did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetFail {
    /// Lost the compare-and-exchange or found it frozen (-EBUSY).
    Busy,
    /// The external hook failed with this errno.
    Hook(Errno),
}

impl Kvm {
    /// `mmu_topup_memory_caches` (before mmu_lock is taken): fill vCPU `v`'s shadow-page
    /// cache, and its external-SPT cache for a TD, to `MMU_CACHE_MIN` pages. -ENOMEM if a cache
    /// cannot reach it (what was allocated stays cached).
    pub fn mmu_topup_memory_caches(&self, v: usize) -> KvmResult<()> {
        let mirrored = !self.policy.sept_off_to_side;
        let mut st = self.st.borrow_mut();
        let caches = &mut st.vcpus[v].mmu_caches;
        let mut host = self.host.borrow_mut();
        for (cache, use_, wanted) in [
            (&mut caches.shadow, KernelUse::MmuPage, true),
            (&mut caches.external, KernelUse::Sept, mirrored),
        ] {
            while wanted && cache.len() < MMU_CACHE_MIN {
                let p = host
                    .ledger
                    .alloc(AllocFor::Kernel(use_))
                    .map_err(|_| Errno::ENOMEM)?;
                cache.push(p);
            }
        }
        Ok(())
    }

    /// `kvm_mmu_free_memory_caches` (from `kvm_mmu_destroy` at vCPU teardown).
    pub fn kvm_mmu_free_memory_caches(&self, cx: &Ctx, v: usize) {
        let c = std::mem::take(&mut self.st.borrow_mut().vcpus[v].mmu_caches);
        let mut host = self.host.borrow_mut();
        for p in c.shadow.into_iter().chain(c.external) {
            let r = host.ledger.free(p);
            host.record(cx.step(), r);
        }
    }

    /// `kvm_mmu_memory_cache_alloc`: a page from one of vCPU `v`'s caches; an empty cache is a
    /// WARN and a direct (atomic) allocation.
    fn mmu_cache_alloc(&self, cx: &Ctx, v: usize, external: bool) -> KvmResult<Pfn> {
        let p = {
            let mut st = self.st.borrow_mut();
            let c = &mut st.vcpus[v].mmu_caches;
            if external {
                c.external.pop()
            } else {
                c.shadow.pop()
            }
        };
        if let Some(p) = p {
            return Ok(p);
        }
        self.warn(cx, "kvm_mmu_memory_cache_alloc", "empty cache".into());
        let use_ = if external {
            KernelUse::Sept
        } else {
            KernelUse::MmuPage
        };
        self.host
            .borrow_mut()
            .ledger
            .alloc(AllocFor::Kernel(use_))
            .map_err(|_| Errno::ENOMEM)
    }

    /// `tdp_mmu_alloc_sp` (+ `kvm_mmu_alloc_external_spt` for a mirror table below the root)
    /// from vCPU `v`'s caches. A mirror root has no S-EPT page of its own: the S-EPT root is
    /// the TD's.
    pub(crate) fn alloc_sp(
        &self,
        cx: &Ctx,
        v: usize,
        level: PgLevel,
        base: Gfn,
        mirror: bool,
    ) -> KvmResult<SpId> {
        let spt = self.mmu_cache_alloc(cx, v, false)?;
        let external_spt = if mirror && level != PgLevel::L512G {
            match self.mmu_cache_alloc(cx, v, true) {
                Ok(p) => Some(p),
                Err(e) => {
                    let mut host = self.host.borrow_mut();
                    let r = host.ledger.free(spt);
                    host.record(0, r);
                    return Err(e);
                }
            }
        } else {
            None
        };
        let sp = Sp {
            level,
            base,
            mirror,
            spt,
            external_spt,
            sptes: BTreeMap::new(),
            invalid: false,
            refcount: 0,
            scheduled_to_zap: false,
        };
        Ok(self.st.borrow_mut().mmu.insert(sp))
    }

    /// `tdp_mmu_free_sp`: frees the table page and, if still owned, the S-EPT page.
    pub(crate) fn free_sp(&self, id: SpId) {
        let sp = self.st.borrow_mut().mmu.remove(id);
        let mut host = self.host.borrow_mut();
        let r = host.ledger.free(sp.spt);
        host.record(0, r);
        if let Some(p) = sp.external_spt {
            let r = host.ledger.free(p);
            host.record(0, r);
        }
    }

    /// `kvm_tdp_mmu_alloc_root`, under mmu_lock for read: an existing valid root of the kind,
    /// or a new one from the vCPU's caches (refcount 2: the vCPU's and the MMU's own).
    pub async fn tdp_mmu_alloc_root(&self, cx: &Ctx, v: usize, mirror: bool) -> KvmResult<SpId> {
        self.mmu_lock.read(cx).await;
        let r = self.tdp_mmu_find_or_alloc_root(cx, v, mirror);
        self.mmu_lock.read_unlock(cx).await;
        r
    }

    /// The body of `kvm_tdp_mmu_alloc_root` under the lock: reuse a valid root of the kind
    /// (`kvm_tdp_mmu_get_root`) or add a new one to `tdp_mmu_roots`.
    fn tdp_mmu_find_or_alloc_root(&self, cx: &Ctx, v: usize, mirror: bool) -> KvmResult<SpId> {
        {
            let mut st = self.st.borrow_mut();
            let found = st
                .mmu
                .roots
                .iter()
                .copied()
                .find(|r| st.mmu.sps[r].mirror == mirror && !st.mmu.sps[r].invalid);
            if let Some(r) = found {
                st.mmu.sps.get_mut(&r).expect("root").refcount += 1;
                return Ok(r);
            }
        }
        let id = self.alloc_sp(cx, v, PgLevel::L512G, Gfn::new(0), mirror)?;
        let mut st = self.st.borrow_mut();
        st.mmu.sps.get_mut(&id).expect("root").refcount = 2;
        st.mmu.roots.push(id);
        Ok(id)
    }

    /// `kvm_tdp_mmu_put_root`: the last reference may only drop on an invalid root.
    pub(crate) async fn tdp_mmu_put_root(&self, cx: &Ctx, root: SpId) {
        let (last, valid) = {
            let mut st = self.st.borrow_mut();
            let sp = st.mmu.sps.get_mut(&root).expect("root");
            sp.refcount -= 1;
            (sp.refcount == 0, !sp.invalid)
        };
        if last && valid {
            self.bug(
                cx,
                "kvm_tdp_mmu_put_root",
                "last reference to a valid root".into(),
            )
            .await;
            return;
        }
        if last {
            self.free_sp(root);
        }
    }

    /// `tdp_mmu_set_spte_atomic` (mmu_lock held for read): cmpxchg `old` -> `new` at
    /// (sp, idx); on a mirror table, `set_external_spte_present` instead.
    pub(crate) async fn tdp_mmu_set_spte_atomic(
        &self,
        cx: &Ctx,
        sp: SpId,
        idx: u16,
        gfn: Gfn,
        old: Spte,
        new: Spte,
    ) -> Result<(), SetFail> {
        cx.yield_now(Point::YieldArg("tdp_mmu_set_spte_atomic", gfn.raw()))
            .await;
        let (mirror, level) = {
            let st = self.st.borrow();
            let s = st.mmu.get(sp);
            (s.mirror, s.level)
        };
        if !mirror {
            let mut st = self.st.borrow_mut();
            if st.mmu.spte(sp, idx) != old {
                return Err(SetFail::Busy);
            }
            st.mmu.set(sp, idx, new);
            return Ok(());
        }
        if !new.is_present() {
            // Atomic zapping of mirror SPTEs is not supported.
            self.bug(
                cx,
                "__tdp_mmu_set_spte_atomic",
                "atomic zap of a mirror SPTE".into(),
            )
            .await;
            return Err(SetFail::Busy);
        }
        self.set_external_spte_present(cx, sp, idx, level, gfn, old, new)
            .await
    }

    /// `set_external_spte_present`: freeze the mirror SPTE, run the S-EPT hook, then write the
    /// new value or restore the old one (seed 003). Policies: `no_freeze` writes the final value
    /// before the hook; `no_restore_on_fail` keeps it when the hook fails.
    #[allow(clippy::too_many_arguments)]
    async fn set_external_spte_present(
        &self,
        cx: &Ctx,
        sp: SpId,
        idx: u16,
        level: PgLevel,
        gfn: Gfn,
        old: Spte,
        new: Spte,
    ) -> Result<(), SetFail> {
        if old.is_present() {
            self.bug(
                cx,
                "set_external_spte_present",
                "old mirror SPTE present".into(),
            )
            .await;
            return Err(SetFail::Busy);
        }
        let placeholder = if self.policy.freeze {
            Spte::FROZEN
        } else {
            new
        };
        {
            let mut st = self.st.borrow_mut();
            let now = st.mmu.spte(sp, idx);
            if now != old {
                if now.is_frozen() {
                    crate::coverage::hit(crate::coverage::Site::FrozenSeen, level as u64, 0);
                }
                return Err(SetFail::Busy);
            }
            st.mmu.set(sp, idx, placeholder);
        }
        cx.note("mirror spte", gfn.raw(), placeholder.raw());
        let r = self
            .tdx_sept_set_private_spte(cx, gfn, old, new, level)
            .await;
        let mut st = self.st.borrow_mut();
        match r {
            Ok(()) => {
                st.mmu.set(sp, idx, new);
                Ok(())
            }
            Err(e) => {
                let v = if self.policy.restore_on_fail {
                    old
                } else {
                    new
                };
                st.mmu.set(sp, idx, v);
                Err(SetFail::Hook(e))
            }
        }
    }

    /// `tdp_mmu_set_spte` (mmu_lock held for write): write `new`, then `handle_changed_spte`,
    /// which for a mirror leaf going away calls the S-EPT removal hook; that must not fail.
    pub(crate) async fn tdp_mmu_set_spte(&self, cx: &Ctx, sp: SpId, idx: u16, gfn: Gfn, new: Spte) {
        cx.yield_now(Point::YieldArg("tdp_mmu_set_spte", gfn.raw()))
            .await;
        let (old, mirror, level) = {
            let mut st = self.st.borrow_mut();
            let old = st.mmu.spte(sp, idx);
            let s = st.mmu.get(sp);
            let (mirror, level) = (s.mirror, s.level);
            st.mmu.set(sp, idx, new);
            (old, mirror, level)
        };
        if old.is_frozen() || new.is_frozen() {
            // WARN_ON_ONCE, and the write goes ahead all the same.
            self.warn(
                cx,
                "tdp_mmu_set_spte",
                "frozen SPTE under the write lock".into(),
            );
        }
        self.handle_changed_spte(cx, mirror, gfn, old, new, level)
            .await;
    }

    /// `handle_changed_spte` for the changes the model makes: a removed table is torn down
    /// (`handle_removed_pt`); a mirror leaf going away is propagated to the S-EPT.
    async fn handle_changed_spte(
        &self,
        cx: &Ctx,
        mirror: bool,
        gfn: Gfn,
        old: Spte,
        new: Spte,
        level: PgLevel,
    ) {
        if old.is_present() && !old.is_leaf() && !new.is_present() {
            let child = self.st.borrow().mmu.child(old);
            if let Some(c) = child {
                Box::pin(self.handle_removed_pt(cx, c)).await;
            }
            return;
        }
        if mirror && old.is_leaf() && !new.is_present() {
            if let Err(e) = self
                .tdx_sept_set_private_spte(cx, gfn, old, new, level)
                .await
            {
                let what =
                    format!("S-EPT removal of {gfn} failed ({e:?}) with mmu_lock held for write");
                // Policy `zap_failure_warns_only`: the failure is only warned about, here too.
                if self.policy.zap_failure_bugs_vm {
                    self.bug(cx, "handle_changed_spte", what).await;
                } else {
                    self.warn(cx, "handle_changed_spte", what);
                }
            }
        }
    }

    /// `handle_removed_pt` (exclusive): every entry of a dying table is zapped (recursively),
    /// then a mirror table's S-EPT page goes to `free_external_spt` and the table is freed.
    pub(crate) async fn handle_removed_pt(&self, cx: &Ctx, sp: SpId) {
        let (entries, mirror, level, base) = {
            let st = self.st.borrow();
            let s = st.mmu.get(sp);
            let e: Vec<(u16, Spte)> = s.sptes.iter().map(|(i, v)| (*i, *v)).collect();
            (e, s.mirror, s.level, s.base)
        };
        for (idx, old) in entries {
            if !old.is_present() {
                continue;
            }
            let gfn = base.add(u64::from(idx) * level.pages());
            self.st.borrow_mut().mmu.set(sp, idx, Spte::NONPRESENT);
            self.handle_changed_spte(cx, mirror, gfn, old, Spte::NONPRESENT, level)
                .await;
        }
        if mirror {
            self.tdx_sept_free_private_spt(cx, sp).await;
        }
        self.free_sp(sp);
    }

    /// `tdp_mmu_zap_leafs` (mmu_lock held for write): zap every present leaf of `root` in
    /// `[start, end)`.
    pub async fn tdp_mmu_zap_leafs(&self, cx: &Ctx, root: SpId, start: Gfn, end: Gfn) -> bool {
        let leaves = self.st.borrow().mmu.leaves(root, start, end);
        let flush = !leaves.is_empty();
        for (sp, idx, _, gfn, _) in leaves {
            // An earlier removal hook yielded; a table torn down meanwhile has nothing left to
            // zap (the kernel's iterator holds a root reference and RCU keeps the pages).
            if !self.st.borrow().mmu.sps.contains_key(&sp) {
                continue;
            }
            // Re-read: an earlier hook may have yielded, but nothing else writes under the
            // write lock.
            self.tdp_mmu_set_spte(cx, sp, idx, gfn, Spte::NONPRESENT)
                .await;
        }
        flush
    }
}

impl Kvm {
    /// `kvm_tdp_mmu_unmap_gfn_range` (mmu_lock held for write): zap leaves of `[start, end)`
    /// in the roots the filter names, valid or invalid: mirror roots (`private`), direct roots
    /// (`shared`), each plus KVM_INVALID_ROOTS.
    pub async fn kvm_tdp_mmu_unmap_gfn_range(
        &self,
        cx: &Ctx,
        start: Gfn,
        end: Gfn,
        private: bool,
        shared: bool,
    ) -> bool {
        debug_assert!(self.mmu_lock.held_write(cx));
        let types = RootTypes::from_filter(private, shared).with(RootTypes::INVALID);
        let roots: Vec<SpId> = {
            let st = self.st.borrow();
            st.mmu
                .roots
                .iter()
                .copied()
                .filter(|r| root_match(st.mmu.get(*r), types))
                .collect()
        };
        let mut flush = false;
        for r in roots {
            // The root may have been freed while an earlier root's hooks yielded.
            if !self.st.borrow().mmu.sps.contains_key(&r) {
                continue;
            }
            flush |= self.tdp_mmu_zap_leafs(cx, r, start, end).await;
        }
        flush
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::sched::TraceMode;
    use crate::stack::Stack;

    /// `tdp_mmu_set_spte` under the write lock: WARN_ON_ONCE on a frozen old or new SPTE, and
    /// the write (and `handle_changed_spte`) goes ahead all the same. Rows: (old, new).
    #[test]
    fn a_frozen_spte_under_the_write_lock_warns_and_is_written() {
        let rows = [
            (Spte::FROZEN, Spte::NONPRESENT),
            (Spte::NONPRESENT, Spte::FROZEN),
        ];
        for (old, new) in rows {
            let mut s = Stack::new(Policy::UPSTREAM, 600, TraceMode::Full);
            s.build_runnable(1);
            let seen = std::rc::Rc::new(std::cell::Cell::new(None));
            let o = seen.clone();
            s.run_setup(move |cx, kvm| async move {
                // The first entry of vCPU 0's direct (shared) root.
                kvm.kvm_mmu_reload(&cx, 0).await.unwrap();
                let root = kvm.st.borrow().vcpus[0].root.unwrap();
                kvm.st.borrow_mut().mmu.set(root, 0, old);
                kvm.mmu_lock.write(&cx).await;
                kvm.tdp_mmu_set_spte(&cx, root, 0, Gfn::new(0), new).await;
                kvm.mmu_lock.write_unlock(&cx).await;
                o.set(Some(kvm.st.borrow().mmu.spte(root, 0)));
            });
            assert_eq!(seen.get(), Some(new), "{old:?} -> {new:?} is written");
            let bugs = &s.kvm.st.borrow().bugs;
            assert_eq!(bugs.len(), 1, "{bugs:?}");
            assert_eq!(bugs[0].location, "tdp_mmu_set_spte");
            assert!(!bugs[0].fatal, "a WARN, not a KVM_BUG_ON");
        }
    }
}

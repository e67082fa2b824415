//! S-EPT leaves: TDH.MEM.{PAGE.ADD, SEPT.ADD, PAGE.AUG, RANGE.BLOCK, TRACK, PAGE.REMOVE,
//! SEPT.REMOVE, RANGE.UNBLOCK} (src/vmm_dispatcher/api_calls/tdh_mem_*.c).

use crate::addr::{Gfn, Gpa, Pfn, PgLevel};
use crate::sched::Ctx;

use super::locks::{Guard, LockKey};
use super::sept::Walk;
use super::{
    page_info_ok, private_gpa_ok, Code, Leaf, ModuleState, OpState, Operand, PageType, SeamErr,
    SeamResult, SeptEntry, SeptState, TdxModule,
};

impl ModuleState {
    /// `lock_sept_check_and_walk_private_gpa`: GPA validity, the tree lock (next row step),
    /// the walk to `level`, then the entry's host-side lock (next row step).
    fn walk_and_lock_entry(
        &mut self,
        g: &mut Guard,
        tdr: Pfn,
        gpa: Gpa,
        level: PgLevel,
    ) -> SeamResult<Walk> {
        if !private_gpa_ok(gpa) {
            return Err(SeamErr::with(Code::OperandInvalid, Operand::Rcx));
        }
        g.take(&mut self.locks, LockKey::SeptTree(tdr))?;
        let w = self.td(tdr).sept.walk(gpa.gfn(), level);
        if w.level != level {
            return Err(SeamErr::with(Code::EptWalkFailed, Operand::Rcx).details(w.details()));
        }
        // A busy entry lock reports the walked entry's S-EPT details too: every handler calls
        // `set_arch_septe_details_in_vmm_regs` when `sept_lock_acquire_host` fails
        // (tdh_mem_page_remove.c, tdh_mem_page_aug.c, tdh_mem_range_block.c, ... at 1666adc).
        g.take(&mut self.locks, LockKey::SeptEntry(tdr, level, w.base))
            .map_err(|e| e.details(w.details()))?;
        Ok(w)
    }

    /// TLB-tracking rule shared by REMOVE, SEPT.REMOVE and UNBLOCK: applies in RUNNABLE only
    /// (of the reachable op states) and to states that need tracking.
    fn tracking_required(&self, tdr: Pfn, state: SeptState) -> bool {
        self.td(tdr).op_state == OpState::Runnable && state.tlb_tracking_required()
    }

    /// The common prologue of the S-EPT leaves: the TDR (explicit, shared), the build-state
    /// gate with the OP_STATE lock, then `verify_page_info_input` over `[min, max]`.
    #[allow(clippy::too_many_arguments)]
    fn sept_prologue(
        &mut self,
        g: &mut Guard,
        tdr: Pfn,
        leaf: Leaf,
        gpa: Gpa,
        level: PgLevel,
        min: PgLevel,
        max: PgLevel,
    ) -> SeamResult<()> {
        self.explicit_page(g, tdr, Operand::Rdx, PageType::Tdr)?;
        self.gate(g, tdr, leaf, true)?;
        if !page_info_ok(gpa, level, min, max) {
            return Err(SeamErr::with(Code::OperandInvalid, Operand::Rcx));
        }
        Ok(())
    }

    /// When tracking applies: the entry must be blocked (REMOVE, SEPT.REMOVE; `must_be_blocked`)
    /// and the block epoch recorded in `pfn`'s PAMT entry tracked (`is_tlb_and_iotlb_tracked`).
    fn check_blocked_and_tracked(
        &self,
        tdr: Pfn,
        w: &Walk,
        pfn: Pfn,
        must_be_blocked: bool,
    ) -> SeamResult<()> {
        if !self.tracking_required(tdr, w.state) {
            return Ok(());
        }
        if must_be_blocked && !w.state.is_blocked() {
            return Err(SeamErr::with(Code::GpaRangeNotBlocked, Operand::Rcx).details(w.details()));
        }
        let p = self.pamt.get(pfn);
        if !self.is_tlb_tracked(tdr, p.bepoch) {
            let e = SeamErr::with(Code::TlbTrackingNotDone, Operand::Rcx);
            return Err(if p.blocked_while_building {
                e.note("blocked before the TD was runnable")
            } else {
                e
            });
        }
        Ok(())
    }
}

fn incorrect(w: &Walk) -> SeamErr {
    SeamErr::with(Code::EptEntryStateIncorrect, Operand::Rcx).details(w.details())
}

impl TdxModule {
    /// TDH.MEM.PAGE.ADD (leaf 2; tdh_mem_page_add.c): copy `source` into `page` and map it at
    /// `gpa` (4K) of a TD being built; extends MRTD with the GPA.
    pub async fn tdh_mem_page_add(
        &self,
        cx: &Ctx,
        tdr: Pfn,
        gpa: Gpa,
        page: Pfn,
        source: Pfn,
    ) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::MemPageAdd,
            |st, g| {
                st.explicit_page(g, tdr, Operand::Rdx, PageType::Tdr)?;
                st.gate(g, tdr, Leaf::MemPageAdd, false)?;
                if !page_info_ok(gpa, PgLevel::L4K, PgLevel::L4K, PgLevel::L4K)
                    || !private_gpa_ok(gpa)
                {
                    return Err(SeamErr::with(Code::OperandInvalid, Operand::Rcx));
                }
                // No tree or entry lock: the exclusive TDR lock covers the S-EPT.
                let w = st.td(tdr).sept.walk(gpa.gfn(), PgLevel::L4K);
                if w.level != PgLevel::L4K {
                    return Err(
                        SeamErr::with(Code::EptWalkFailed, Operand::Rcx).details(w.details())
                    );
                }
                if w.state != SeptState::Free {
                    return Err(incorrect(&w));
                }
                st.explicit_page(g, page, Operand::R8, PageType::Nda)?;
                Ok(())
            },
            |st, host, (), step| {
                let v = host.read(source);
                host.write(page, v);
                let td = st.td_mut(tdr);
                td.sept.set(
                    PgLevel::L4K,
                    gpa.gfn(),
                    SeptEntry {
                        state: SeptState::Mapped,
                        pfn: page,
                        accept_counter: 0,
                    },
                );
                td.chldcnt += 1;
                td.mrtd = td.mrtd.rotate_left(7) ^ gpa.raw();
                st.assign_page(host, step, page, PageType::Reg, tdr);
                Ok(())
            },
        )
        .await
    }

    /// TDH.MEM.SEPT.ADD (leaf 3; tdh_mem_sept_add.c): link `page` as the S-EPT table below the
    /// entry at `level` (2M..512G) covering `gpa`.
    pub async fn tdh_mem_sept_add(
        &self,
        cx: &Ctx,
        tdr: Pfn,
        gpa: Gpa,
        level: PgLevel,
        page: Pfn,
    ) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::MemSeptAdd,
            |st, g| {
                st.sept_prologue(
                    g,
                    tdr,
                    Leaf::MemSeptAdd,
                    gpa,
                    level,
                    PgLevel::L2M,
                    PgLevel::L512G,
                )?;
                let w = st.walk_and_lock_entry(g, tdr, gpa, level)?;
                // FREE gets a new table; NL_MAPPED would need `allow_existing`, which KVM never
                // passes.
                if w.state != SeptState::Free {
                    return Err(incorrect(&w));
                }
                st.explicit_page(g, page, Operand::R8, PageType::Nda)?;
                Ok(w.base)
            },
            |st, host, base: Gfn, step| {
                let td = st.td_mut(tdr);
                td.sept.set(
                    level,
                    base,
                    SeptEntry {
                        state: SeptState::NlMapped,
                        pfn: page,
                        accept_counter: 0,
                    },
                );
                td.chldcnt += 1;
                st.assign_page(host, step, page, PageType::Ept, tdr);
                host.write(page, 0);
                Ok(())
            },
        )
        .await
    }

    /// TDH.MEM.PAGE.AUG (leaf 6; tdh_mem_page_aug.c): map `page` PENDING at `gpa` in a TD that
    /// is initialised or runnable; the guest must TDG.MEM.PAGE.ACCEPT it.
    pub async fn tdh_mem_page_aug(
        &self,
        cx: &Ctx,
        tdr: Pfn,
        gpa: Gpa,
        level: PgLevel,
        page: Pfn,
    ) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::MemPageAug,
            |st, g| {
                st.sept_prologue(
                    g,
                    tdr,
                    Leaf::MemPageAug,
                    gpa,
                    level,
                    PgLevel::L4K,
                    PgLevel::L2M,
                )?;
                let w = st.walk_and_lock_entry(g, tdr, gpa, level)?;
                if !matches!(w.state, SeptState::Free | SeptState::Removed) {
                    return Err(incorrect(&w));
                }
                if !page.raw().is_multiple_of(level.pages()) {
                    return Err(SeamErr::with(Code::OperandInvalid, Operand::R8));
                }
                // The model's PAMT is 4K-grained: a 2M page needs all 512 entries free.
                st.explicit_page(g, page, Operand::R8, PageType::Nda)?;
                for i in 1..level.pages() {
                    let p = page.add(i);
                    if !st.pamt.covers(p) {
                        return Err(SeamErr::with(Code::OperandAddrRangeError, Operand::R8));
                    }
                    if st.pamt.get(p).pt != PageType::Nda {
                        return Err(SeamErr::with(Code::PageMetadataIncorrect, Operand::R8));
                    }
                }
                Ok(w.base)
            },
            |st, host, base: Gfn, step| {
                let td = st.td_mut(tdr);
                td.sept.set(
                    level,
                    base,
                    SeptEntry {
                        state: SeptState::Pending,
                        pfn: page,
                        accept_counter: 0,
                    },
                );
                td.chldcnt += level.pages();
                for i in 0..level.pages() {
                    st.assign_page(host, step, page.add(i), PageType::Reg, tdr);
                }
                Ok(())
            },
        )
        .await
    }

    /// TDH.MEM.RANGE.BLOCK (leaf 7; tdh_mem_range_block.c): block the entry at `level`
    /// covering `gpa` and record the TD epoch for TLB tracking.
    pub async fn tdh_mem_range_block(
        &self,
        cx: &Ctx,
        tdr: Pfn,
        gpa: Gpa,
        level: PgLevel,
    ) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::MemRangeBlock,
            |st, g| {
                st.sept_prologue(
                    g,
                    tdr,
                    Leaf::MemRangeBlock,
                    gpa,
                    level,
                    PgLevel::L4K,
                    PgLevel::L512G,
                )?;
                let w = st.walk_and_lock_entry(g, tdr, gpa, level)?;
                match w.state {
                    SeptState::NlMapped | SeptState::Mapped | SeptState::Pending => Ok(w),
                    s if s.is_blocked() => {
                        Err(SeamErr::with(Code::GpaRangeAlreadyBlocked, Operand::Rcx)
                            .details(w.details()))
                    }
                    _ => Err(incorrect(&w)),
                }
            },
            |st, _, w: Walk, _| {
                let td = st.td_mut(tdr);
                let mut e = w.entry.expect("blockable entries are present");
                e.state = match e.state {
                    SeptState::NlMapped => SeptState::NlBlocked,
                    SeptState::Mapped => SeptState::Blocked,
                    SeptState::Pending => SeptState::PendingBlocked,
                    other => unreachable!("checked: {other:?}"),
                };
                e.accept_counter = 0;
                td.sept.set(level, w.base, e);
                // The epoch is sampled after the block, into the PAMT entry of the mapped page
                // (leaf) or of the child S-EPT page (non-leaf).
                let epoch = td.td_epoch;
                let building = td.op_state != OpState::Runnable;
                st.pamt.set_bepoch(e.pfn, epoch, building);
                Ok(())
            },
        )
        .await
    }

    /// TDH.MEM.TRACK (leaf 38; tdh_mem_track.c): advance the TD epoch once no vCPU is still
    /// running in the previous one.
    pub async fn tdh_mem_track(&self, cx: &Ctx, tdr: Pfn) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::MemTrack,
            |st, g| {
                st.explicit_page(g, tdr, Operand::Rcx, PageType::Tdr)?;
                st.gate(g, tdr, Leaf::MemTrack, true)?;
                g.take(&mut st.locks, LockKey::TdEpoch(tdr))?;
                let td = st.td(tdr);
                let prev = ((td.td_epoch + 1) & 1) as usize;
                if td.refcount[prev] != 0 {
                    return Err(SeamErr::code(Code::PreviousTlbEpochBusy));
                }
                Ok(())
            },
            |st, _, (), _| {
                st.td_mut(tdr).td_epoch += 1;
                Ok(())
            },
        )
        .await
    }

    /// TDH.MEM.PAGE.REMOVE (leaf 29; tdh_mem_page_remove.c): unmap a leaf. In a runnable TD it
    /// must be blocked and its block epoch tracked. Returns the removed page.
    pub async fn tdh_mem_page_remove(
        &self,
        cx: &Ctx,
        tdr: Pfn,
        gpa: Gpa,
        level: PgLevel,
    ) -> SeamResult<Pfn> {
        self.seamcall(
            cx,
            Leaf::MemPageRemove,
            |st, g| {
                st.sept_prologue(
                    g,
                    tdr,
                    Leaf::MemPageRemove,
                    gpa,
                    level,
                    PgLevel::L4K,
                    PgLevel::L1G,
                )?;
                let w = st.walk_and_lock_entry(g, tdr, gpa, level)?;
                if !w.state.is_leaf() {
                    return Err(incorrect(&w));
                }
                let e = w.entry.expect("leaf present");
                g.take(&mut st.locks, LockKey::Pamt(e.pfn))?;
                st.check_blocked_and_tracked(tdr, &w, e.pfn, true)?;
                Ok((w.base, e.pfn))
            },
            |st, host, (base, pfn): (Gfn, Pfn), step| {
                let td = st.td_mut(tdr);
                td.sept.clear(level, base);
                td.chldcnt -= level.pages();
                for i in 0..level.pages() {
                    st.release_page(host, step, pfn.add(i));
                }
                Ok(pfn)
            },
        )
        .await
    }

    /// TDH.MEM.SEPT.REMOVE (leaf 30; tdh_mem_sept_remove.c): unlink an empty S-EPT table from
    /// the entry at `level`. Returns the table's page.
    pub async fn tdh_mem_sept_remove(
        &self,
        cx: &Ctx,
        tdr: Pfn,
        gpa: Gpa,
        level: PgLevel,
    ) -> SeamResult<Pfn> {
        self.seamcall(
            cx,
            Leaf::MemSeptRemove,
            |st, g| {
                st.sept_prologue(
                    g,
                    tdr,
                    Leaf::MemSeptRemove,
                    gpa,
                    level,
                    PgLevel::L2M,
                    PgLevel::L512G,
                )?;
                let w = st.walk_and_lock_entry(g, tdr, gpa, level)?;
                if !matches!(w.state, SeptState::NlMapped | SeptState::NlBlocked) {
                    return Err(incorrect(&w));
                }
                let child = w.entry.expect("non-leaf present").pfn;
                g.take(&mut st.locks, LockKey::Pamt(child))?;
                st.check_blocked_and_tracked(tdr, &w, child, true)?;
                let lower = level.lower().expect("level >= 2M");
                if !st.td(tdr).sept.table_is_free(lower, w.base) {
                    return Err(
                        SeamErr::with(Code::EptPageNotFree, Operand::Rcx).details(w.details())
                    );
                }
                Ok((w.base, child))
            },
            |st, host, (base, child): (Gfn, Pfn), step| {
                let td = st.td_mut(tdr);
                td.sept.clear(level, base);
                td.chldcnt -= 1;
                st.release_page(host, step, child);
                Ok(child)
            },
        )
        .await
    }

    /// TDH.MEM.RANGE.UNBLOCK (leaf 39; tdh_mem_range_unblock.c): undo a block once tracked.
    pub async fn tdh_mem_range_unblock(
        &self,
        cx: &Ctx,
        tdr: Pfn,
        gpa: Gpa,
        level: PgLevel,
    ) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::MemRangeUnblock,
            |st, g| {
                st.sept_prologue(
                    g,
                    tdr,
                    Leaf::MemRangeUnblock,
                    gpa,
                    level,
                    PgLevel::L4K,
                    PgLevel::L512G,
                )?;
                let w = st.walk_and_lock_entry(g, tdr, gpa, level)?;
                if !w.state.is_blocked() {
                    return Err(incorrect(&w));
                }
                let e = w.entry.expect("blocked entries are present");
                st.check_blocked_and_tracked(tdr, &w, e.pfn, false)?;
                Ok((w.base, e))
            },
            |st, _, (base, mut e): (Gfn, SeptEntry), _| {
                e.state = match e.state {
                    SeptState::NlBlocked => SeptState::NlMapped,
                    SeptState::Blocked => SeptState::Mapped,
                    SeptState::PendingBlocked => SeptState::Pending,
                    other => unreachable!("checked: {other:?}"),
                };
                st.td_mut(tdr).sept.set(level, base, e);
                Ok(())
            },
        )
        .await
    }
}

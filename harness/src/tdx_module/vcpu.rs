//! vCPU leaves: TDH.VP.{CREATE, ADDCX, INIT, FLUSH, ENTER}, the TD-exit path, and the
//! zero-step (EPT-fault stepping) mitigation (src/td_transitions/tdh_vp_enter.c,
//! td_exit_stepping.c).

use crate::addr::{Gfn, Gpa, Pfn, PgLevel};
use crate::sched::{Ctx, Point};

use super::locks::{Guard, LockKey};
use super::{
    window_name, Code, Leaf, Lp, Operand, PageType, SeamErr, SeamResult, SeptState, TdxModule, Vcpu,
};

/// TDVPS.vcpu_state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    Uninitialized = 0,
    Ready = 2,
    Active = 4,
}

/// How TDH.VP.ENTER ended when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnterOutcome {
    /// The guest runs; the caller ends the run with `td_exit`.
    Entered,
    /// The zero-step filter found a logged GPA that would fault again: the module emulated an
    /// EPT-violation exit for it without entering the guest.
    EptViolation { gpa: Gpa },
}

/// The yield point of VP.ENTER while it holds the TD epoch lock.
pub const EPOCH_WINDOW: &str = "TDH.VP.ENTER:epoch";

fn note_err<T>(cx: &Ctx, leaf: Leaf, e: SeamErr) -> SeamResult<T> {
    cx.note(leaf.name(), e.status.raw(), 0);
    Err(e)
}

/// VP.ENTER up to holding the epoch lock: TDVPR and TDR shared, the build-state gate with the
/// OP_STATE lock, `check_and_associate_vcpu`.
fn enter_checks(st: &mut super::ModuleState, g: &mut Guard, lp: Lp, tdvpr: Pfn) -> SeamResult<Pfn> {
    st.explicit_page(g, tdvpr, Operand::Rcx, PageType::Tdvpr)?;
    let tdr = st.vcpus[&tdvpr].tdr;
    g.take(&mut st.locks, LockKey::Pamt(tdr))?;
    st.gate(g, tdr, Leaf::VpEnter, true)?;
    let need = st.config.tdvps_pages;
    let v = st.vcpus.get_mut(&tdvpr).expect("vcpu");
    if v.tdvps_pages() < need {
        return Err(SeamErr::code(Code::TdcxNumIncorrect));
    }
    if v.state != VcpuState::Ready {
        return Err(SeamErr::with(
            Code::VcpuStateIncorrect,
            Operand::Detail(v.state as u32),
        ));
    }
    match v.assoc_lp {
        Some(l) if l != lp => return Err(SeamErr::code(Code::VcpuAssociated)),
        Some(_) => {}
        None => {
            v.assoc_lp = Some(lp);
            st.td_mut(tdr).num_assoc_vcpus += 1;
        }
    }
    g.take(&mut st.locks, LockKey::TdEpoch(tdr))?;
    Ok(tdr)
}

/// `adjust_tlb_tracking_state` (count into the current epoch, drop the epoch lock), then the
/// zero-step filter's tree lock when GPAs are logged. Returns (epoch, tree lock taken).
fn count_in(
    st: &mut super::ModuleState,
    g: &mut Guard,
    tdr: Pfn,
    tdvpr: Pfn,
    rip: u64,
) -> SeamResult<(u64, bool)> {
    let epoch = st.td(tdr).td_epoch;
    st.td_mut(tdr).refcount[(epoch & 1) as usize] += 1;
    g.release_one(&mut st.locks, LockKey::TdEpoch(tdr));
    let v = st.vcpus.get_mut(&tdvpr).expect("vcpu");
    v.vcpu_epoch = epoch;
    v.rip_at_entry = rip;
    let stepping = !v.epf_gpas.is_empty();
    if stepping {
        if let Err(e) = g.take(&mut st.locks, LockKey::SeptTree(tdr)) {
            st.td_mut(tdr).refcount[(epoch & 1) as usize] -= 1;
            return Err(e);
        }
    } else {
        g.skip();
    }
    Ok((epoch, stepping))
}

/// MAX_TDVPS_PAGES (tdx_tdvps.h): TDVPR plus every TDCX page VP.ADDCX accepts.
pub const MAX_TDVPS_PAGES: usize = 15;

/// EPF_GPA_LIST_SIZE.
const EPF_GPA_LIST_SIZE: usize = 32;

impl Vcpu {
    /// TDVPS pages donated so far (TDVPR + TDCX).
    fn tdvps_pages(&self) -> usize {
        1 + self.tdcx.len()
    }

    /// `td_exit_epf_stepping_log`: count private EPT-violation exits at one RIP; past the
    /// threshold, remember the faulting GPAs.
    pub(crate) fn log_epf(&mut self, gfn: Gfn, rip: u64, threshold: u8) {
        if rip != self.rip_at_entry {
            self.epf_count = 0;
            self.epf_gpas.clear();
        }
        if self.epf_count < threshold {
            self.epf_count += 1;
        } else if self.epf_gpas.len() < EPF_GPA_LIST_SIZE && !self.epf_gpas.contains(&gfn) {
            self.epf_gpas.push(gfn);
        }
    }
}

impl super::ModuleState {
    /// The loop of `td_entry_stepping_filter` over a vCPU's logged GPAs: the first one
    /// `is_epf_expected` says will fault again, with its S-EPT state. Only a walk that ends in
    /// a MAPPED leaf passes: every S-EPT entry has suppress-#VE set (SEPTE_INIT_VALUE,
    /// sept_update_state), so no violation is convertible, and a PENDING page faults too (its
    /// #VE is injected in software by td_ept_violation.c, after the exit).
    pub fn epf_expected(&self, tdvpr: Pfn) -> Option<(Gfn, SeptState)> {
        let v = self.vcpus.get(&tdvpr)?;
        let sept = &self.tds.get(&v.tdr)?.sept;
        v.epf_gpas.iter().find_map(|gfn| {
            let state = sept.walk(*gfn, PgLevel::L4K).state;
            (state != SeptState::Mapped).then_some((*gfn, state))
        })
    }
}

impl TdxModule {
    /// TDH.VP.CREATE (leaf 10; tdh_vp_create.c): a new vCPU with TDVPR page `tdvpr`.
    pub async fn tdh_vp_create(&self, cx: &Ctx, tdr: Pfn, tdvpr: Pfn) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::VpCreate,
            |st, g| {
                st.explicit_page(g, tdr, Operand::Rdx, PageType::Tdr)?;
                st.gate(g, tdr, Leaf::VpCreate, true)?;
                st.explicit_page(g, tdvpr, Operand::Rcx, PageType::Nda)?;
                Ok(())
            },
            |st, host, (), step| {
                st.vcpus.insert(
                    tdvpr,
                    Vcpu {
                        tdvpr,
                        tdr,
                        tdcx: Vec::new(),
                        state: VcpuState::Uninitialized,
                        assoc_lp: None,
                        vcpu_epoch: 0,
                        rip_at_entry: 0,
                        epf_count: 0,
                        epf_gpas: Vec::new(),
                        held: Vec::new(),
                        entered_by: None,
                        hp_busy: 0,
                    },
                );
                st.td_mut(tdr).chldcnt += 1;
                st.assign_page(host, step, tdvpr, PageType::Tdvpr, tdr);
                host.write(tdvpr, 0);
                Ok(())
            },
        )
        .await
    }

    /// TDH.VP.ADDCX (leaf 4; tdh_vp_addcx.c): donate one TDVPS extension page.
    pub async fn tdh_vp_addcx(&self, cx: &Ctx, tdvpr: Pfn, page: Pfn) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::VpAddcx,
            |st, g| {
                st.explicit_page(g, tdvpr, Operand::Rdx, PageType::Tdvpr)?;
                let tdr = st.vcpus[&tdvpr].tdr;
                g.take(&mut st.locks, LockKey::Pamt(tdr))?;
                st.gate(g, tdr, Leaf::VpAddcx, true)?;
                let v = &st.vcpus[&tdvpr];
                if v.state != VcpuState::Uninitialized {
                    return Err(SeamErr::with(
                        Code::VcpuStateIncorrect,
                        Operand::Detail(v.state as u32),
                    ));
                }
                if v.tdvps_pages() >= MAX_TDVPS_PAGES {
                    return Err(SeamErr::code(Code::TdcxNumIncorrect));
                }
                st.explicit_page(g, page, Operand::Rcx, PageType::Nda)?;
                Ok(tdr)
            },
            |st, host, tdr, step| {
                st.vcpus.get_mut(&tdvpr).expect("vcpu").tdcx.push(page);
                st.td_mut(tdr).chldcnt += 1;
                st.assign_page(host, step, page, PageType::Tdcx, tdr);
                host.write(page, 0);
                Ok(())
            },
        )
        .await
    }

    /// TDH.VP.INIT (leaf 22; tdh_vp_init.c): initialise the vCPU; it becomes READY and is
    /// associated with the LP that ran this leaf.
    pub async fn tdh_vp_init(&self, cx: &Ctx, lp: Lp, tdvpr: Pfn) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::VpInit,
            |st, g| {
                st.explicit_page(g, tdvpr, Operand::Rcx, PageType::Tdvpr)?;
                let tdr = st.vcpus[&tdvpr].tdr;
                g.take(&mut st.locks, LockKey::Pamt(tdr))?;
                st.gate(g, tdr, Leaf::VpInit, true)?;
                let v = &st.vcpus[&tdvpr];
                if v.tdvps_pages() < st.config.tdvps_pages {
                    return Err(SeamErr::code(Code::TdcxNumIncorrect));
                }
                if v.state != VcpuState::Uninitialized {
                    return Err(SeamErr::with(
                        Code::VcpuStateIncorrect,
                        Operand::Detail(v.state as u32),
                    ));
                }
                let td = st.td(tdr);
                if td.num_vcpus >= td.max_vcpus {
                    return Err(SeamErr::code(Code::MaxVcpusExceeded));
                }
                Ok(tdr)
            },
            |st, _, tdr, _| {
                let td = st.td_mut(tdr);
                td.num_vcpus += 1;
                td.num_assoc_vcpus += 1;
                let v = st.vcpus.get_mut(&tdvpr).expect("vcpu");
                v.state = VcpuState::Ready;
                v.assoc_lp = Some(lp);
                Ok(())
            },
        )
        .await
    }

    /// TDH.VP.FLUSH (leaf 18; tdh_vp_flush.c): flush the vCPU's state from `lp`, which must be
    /// the LP it is associated with, and dissociate it.
    pub async fn tdh_vp_flush(&self, cx: &Ctx, lp: Lp, tdvpr: Pfn) -> SeamResult<()> {
        self.seamcall(
            cx,
            Leaf::VpFlush,
            |st, g| {
                st.explicit_page(g, tdvpr, Operand::Rcx, PageType::Tdvpr)?;
                let tdr = st.vcpus[&tdvpr].tdr;
                g.take(&mut st.locks, LockKey::Pamt(tdr))?;
                if st.td(tdr).lifecycle != super::Lifecycle::KeysConfigured {
                    return Err(SeamErr::code(Code::TdKeysNotConfigured));
                }
                let v = &st.vcpus[&tdvpr];
                if v.tdvps_pages() < st.config.tdvps_pages {
                    return Err(SeamErr::code(Code::TdcxNumIncorrect));
                }
                if v.assoc_lp != Some(lp) {
                    return Err(SeamErr::code(Code::VcpuNotAssociated));
                }
                Ok(tdr)
            },
            |st, _, tdr, _| {
                st.vcpus.get_mut(&tdvpr).expect("vcpu").assoc_lp = None;
                st.td_mut(tdr).num_assoc_vcpus -= 1;
                Ok(())
            },
        )
        .await
    }

    /// TDH.VP.ENTER (leaf 0; tdh_vp_enter.c) up to the VM entry: locks TDVPR and TDR shared
    /// (kept until TD exit), checks and associates the vCPU, counts it into the TD epoch, and
    /// runs the zero-step filter, which takes the S-EPT tree lock exclusively while GPAs are
    /// logged. `rip` is the guest RIP the vCPU resumes at.
    pub async fn tdh_vp_enter(
        &self,
        cx: &Ctx,
        lp: Lp,
        tdvpr: Pfn,
        rip: u64,
    ) -> SeamResult<EnterOutcome> {
        let call = self.vp_enter(cx, lp, tdvpr, rip);
        self.injectable(cx, Leaf::VpEnter, call).await
    }

    async fn vp_enter(&self, cx: &Ctx, lp: Lp, tdvpr: Pfn, rip: u64) -> SeamResult<EnterOutcome> {
        let leaf = Leaf::VpEnter;
        cx.yield_now(Point::Yield(leaf.name())).await;
        let mut g = Guard::new(leaf, cx.current());
        let tdr = match self.phase(&mut g, |st, g| enter_checks(st, g, lp, tdvpr)) {
            Ok(tdr) => tdr,
            Err(e) => return note_err(cx, leaf, e),
        };
        // The epoch lock is held shared only while counting in; TDH.MEM.TRACK racing with this
        // moment gets TDX_OPERAND_BUSY|TD_EPOCH.
        cx.yield_now(Point::Yield(EPOCH_WINDOW)).await;
        let (epoch, stepping) = match self.phase(&mut g, |st, g| count_in(st, g, tdr, tdvpr, rip)) {
            Ok(x) => x,
            Err(e) => return note_err(cx, leaf, e),
        };
        let mut outcome = EnterOutcome::Entered;
        if stepping {
            crate::coverage::hit(crate::coverage::Site::ZeroStep, 0, 0);
            // The zero-step filter re-walks every logged GPA holding the tree lock exclusively:
            // host S-EPT leaves racing with it get TDX_OPERAND_BUSY|SEPT_TREE.
            cx.yield_now(Point::Yield(window_name(leaf))).await;
            let mut st = self.st.borrow_mut();
            let still = st.epf_expected(tdvpr).map(|(gfn, _)| gfn);
            g.release_one(&mut st.locks, LockKey::SeptTree(tdr));
            if let Some(gfn) = still {
                st.td_mut(tdr).refcount[(epoch & 1) as usize] -= 1;
                g.release_all(&mut st.locks);
                outcome = EnterOutcome::EptViolation { gpa: gfn.gpa() };
            }
        }
        if outcome == EnterOutcome::Entered {
            let mut st = self.st.borrow_mut();
            g.release_one(&mut st.locks, LockKey::OpState(tdr));
            let v = st.vcpus.get_mut(&tdvpr).expect("vcpu");
            v.state = VcpuState::Active;
            v.entered_by = Some(cx.current());
            v.held = g.into_held();
        }
        cx.note(leaf.name(), 0, 0);
        Ok(outcome)
    }

    /// Runs one phase of a multi-window leaf, releasing everything on failure.
    fn phase<T>(
        &self,
        g: &mut Guard,
        f: impl FnOnce(&mut super::ModuleState, &mut Guard) -> SeamResult<T>,
    ) -> SeamResult<T> {
        let mut st = self.st.borrow_mut();
        let r = f(&mut st, g);
        if r.is_err() {
            g.release_all(&mut st.locks);
        }
        r
    }

    /// The TD-exit path (td_exit.c): the vCPU is READY again, leaves its TD epoch, and drops
    /// the TDVPR and TDR locks VP.ENTER kept. `rip` is where the guest stopped; an exit after
    /// forward progress resets the zero-step counter (`vmexit_stepping_filter`).
    pub fn td_exit(&self, tdvpr: Pfn, rip: u64) {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        let v = st.vcpus.get_mut(&tdvpr).expect("vcpu");
        assert_eq!(
            v.state,
            VcpuState::Active,
            "TD exit of a vCPU that is not running"
        );
        v.state = VcpuState::Ready;
        if rip != v.rip_at_entry {
            v.epf_count = 0;
            v.epf_gpas.clear();
        }
        let held = std::mem::take(&mut v.held);
        let who = v
            .entered_by
            .take()
            .expect("an active vCPU was entered by a task");
        let (tdr, epoch) = (v.tdr, v.vcpu_epoch);
        st.td_mut(tdr).refcount[(epoch & 1) as usize] -= 1;
        for (k, m) in held.into_iter().rev() {
            st.locks.release(k, m, who);
        }
    }
}

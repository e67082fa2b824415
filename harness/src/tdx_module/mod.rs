//! The TDX module, as its public source defines it (intel/tdx-module 1666adc).
//!
//! Each SEAMCALL and TDCALL is an async method that behaves like the module's handler: it takes
//! its operand locks in table order (`locks::lock_row`) as try-locks, runs the handler's checks in
//! the handler's order, yields once with its locks held (a SEAMCALL is not atomic: a concurrent
//! call sees the contention), then commits and releases. Contention is reported, never waited
//! on: TDX_OPERAND_BUSY with the operand of the lock that was busy.
//!
//! File map: `leaves.rs` the leaf table, `status.rs` the status codes, `locks.rs` the lock kinds
//! and per-leaf lock rows, `sept.rs` S-EPT states and the walk, `pamt.rs` the PAMT, `td.rs` TD
//! life cycle and measurement leaves, `vcpu.rs` vCPU leaves, VP.ENTER, TD exit and zero-step,
//! `mem.rs` the S-EPT leaves, `phymem.rs` reclaim and cache leaves, `tdcall.rs` the guest's
//! TDCALLs and EPT-violation handling.

pub mod drive;
pub mod inject;
pub mod leaves;
pub mod locks;
mod mem;
pub mod pamt;
mod phymem;
pub mod sept;
pub mod status;
mod td;
mod tdcall;
pub mod testkit;
mod vcpu;

use std::cell::{Ref, RefCell};
use std::collections::{BTreeMap, BTreeSet};

use crate::addr::{Gfn, Gpa, Pfn, PgLevel, SHARED_BIT_GPAW48};
use crate::host::{CacheKey, HostRef, TdxHold, TdxPageKind};
use crate::ids::{Hkid, TdId};
use crate::sched::{Ctx, Point, TaskId};

pub use inject::{
    busy_operands, injected_error, CallInjection, InjectedFailure, BUSY_INJECTABLE,
    ERROR_INJECTABLE,
};
pub use leaves::Leaf;
pub use locks::{LockKey, Locks, Mode};
pub use pamt::{PageType, Pamt, PamtEntry};
pub use phymem::{CacheWbCmd, ReclaimInfo};
pub use sept::{Sept, SeptEntry, SeptState};
pub use status::{Code, Operand, SeamErr, SeamResult, SeptDetails, Status};
pub use td::{Lifecycle, OpState, TdParams, ATTR_SEPT_VE_DISABLE};
pub use tdcall::{AccessKind, AccessResult, Eeq, GuestExit, TdcallResult};
pub use vcpu::{EnterOutcome, VcpuState, MAX_TDVPS_PAGES};

use locks::Guard;

/// A logical processor of the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lp(pub u8);

/// Module and platform parameters. Behaviours that differ between module versions are
/// parameters here, not forks of the code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleConfig {
    /// Packages (sockets): KEY.CONFIG and CACHE.WB run once on each.
    pub packages: u8,
    /// Logical processors; LP n is in package n % packages.
    pub lps: u8,
    /// Private HKIDs the module may assign (inclusive range).
    pub hkid_min: u16,
    pub hkid_max: u16,
    /// MIN_NUM_TDCS_PAGES: TDCS pages a TD needs before MNG.INIT.
    pub tdcs_pages: usize,
    /// TDVPS pages per vCPU (TDVPR + TDCX pages).
    pub tdvps_pages: usize,
    /// STEPPING_EPF_THRESHOLD: EPT-violation exits at one RIP before zero-step logging starts.
    pub epf_threshold: u8,
    /// Cache sub-blocks one CACHE.WB writes back (an interrupt may land between two).
    pub cache_wb_blocks: u8,
    /// Guest TDCALLs take the guest side of the S-EPT entry lock (1666adc does). A module
    /// variant without it makes ACCEPT/ATTR.* never contend with host SEAMCALLs.
    pub tdcall_takes_entry_lock: bool,
    /// Consecutive BUSY_HOST_PRIORITY results before the guest's TDCALL exits with
    /// TDX_HOST_PRIORITY_BUSY_TIMEOUT (the module counts TSC time; the model counts attempts).
    pub hp_lock_timeout_attempts: u32,
}

impl Default for ModuleConfig {
    fn default() -> Self {
        ModuleConfig {
            packages: 1,
            lps: 4,
            hkid_min: 32,
            hkid_max: 63,
            tdcs_pages: 6,
            tdvps_pages: 6,
            epf_threshold: 6,
            cache_wb_blocks: 4,
            tdcall_takes_entry_lock: true,
            hp_lock_timeout_attempts: 64,
        }
    }
}

/// Faults the scenario can inject into the module (each a countdown of occurrences).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Injected {
    /// MNG.CREATE / MNG.ADDCX fail with TDX_RND_NO_ENTROPY.
    pub rnd_no_entropy: u32,
    /// A host interrupt is pending during CACHE.WB: it stops after one sub-block.
    pub cache_wb_interrupts: u32,
    /// TDX_OPERAND_BUSY or an error at a leaf's next call.
    pub calls: CallInjection,
}

/// Key-ownership-table state of an HKID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KotState {
    Free,
    Assigned,
    Flushed,
}

#[derive(Clone, Debug)]
pub(crate) struct KotEntry {
    pub state: KotState,
    /// Packages that still have to write back caches for this HKID.
    pub wbinvd_bitmap: u32,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Wbt {
    /// Sub-block to resume from (0 = nothing interrupted).
    pub intr_point: u8,
    pub hkid_flushed: Vec<Hkid>,
}

/// TDR + TDCS state of one TD.
#[derive(Clone, Debug)]
pub struct Td {
    pub id: TdId,
    pub tdr: Pfn,
    pub hkid: Hkid,
    pub lifecycle: Lifecycle,
    pub fatal: bool,
    pub pkg_configured: u32,
    pub tdcs: Vec<Pfn>,
    /// TDR.chldcnt: 4K pages the TD owns.
    pub chldcnt: u64,
    pub op_state: OpState,
    pub max_vcpus: u32,
    pub num_vcpus: u32,
    pub num_assoc_vcpus: u32,
    pub td_epoch: u64,
    pub refcount: [u32; 2],
    /// TD_CTLS.PENDING_VE_DISABLE: a guest access to a PENDING page exits to the host instead
    /// of raising #VE.
    pub pending_ve_disable: bool,
    pub sept: Sept,
    /// MRTD as a running hash.
    pub mrtd: u64,
}

/// TDVPS state of one vCPU.
#[derive(Clone, Debug)]
pub struct Vcpu {
    pub tdvpr: Pfn,
    pub tdr: Pfn,
    pub tdcx: Vec<Pfn>,
    pub state: VcpuState,
    pub assoc_lp: Option<Lp>,
    pub vcpu_epoch: u64,
    /// Guest RIP recorded at the last TD entry.
    pub rip_at_entry: u64,
    /// `possibly_epf_stepping`.
    pub epf_count: u8,
    /// `last_epf_gpa_list`.
    pub epf_gpas: Vec<Gfn>,
    /// PAMT locks VP.ENTER keeps while the guest runs (TDVPR and TDR shared).
    pub(crate) held: Vec<(LockKey, Mode)>,
    /// The task that entered (it holds `held` until TD exit).
    pub(crate) entered_by: Option<crate::sched::TaskId>,
    /// Consecutive BUSY_HOST_PRIORITY results of this vCPU's TDCALLs.
    pub hp_busy: u32,
}

/// Everything the module knows.
#[derive(Clone, Debug)]
pub struct ModuleState {
    pub config: ModuleConfig,
    pub pamt: Pamt,
    pub locks: Locks,
    pub tds: BTreeMap<Pfn, Td>,
    pub vcpus: BTreeMap<Pfn, Vcpu>,
    pub(crate) kot: BTreeMap<Hkid, KotEntry>,
    pub(crate) wbt: Vec<Wbt>,
    pub injected: Injected,
    /// Observation point for the oracle: SEAMCALLs of tasks KVM let into an ioctl on a dead VM.
    pub after_dead: AfterDead,
    /// SEAMCALLs that succeeded, TDH.VP.ENTER aside (a wedged vCPU enters forever): the run's
    /// measure of whether a long phase is still getting somewhere.
    pub succeeded: u64,
    next_td: u32,
}

impl ModuleState {
    /// Feeds everything the module's future behaviour depends on into `h` (for the oracle's
    /// proof of a livelock): all of its state but `succeeded`, a count that only measures.
    pub fn hash_for_livelock(&self, h: &mut impl std::hash::Hasher) {
        let ModuleState {
            config,
            pamt,
            locks,
            tds,
            vcpus,
            kot,
            wbt,
            injected,
            after_dead,
            succeeded: _,
            next_td,
        } = self;
        let mut w = crate::sched::HashWriter(h);
        // Written in full, field by field: a field added later is a compile error here.
        let _ = std::fmt::Write::write_fmt(
            &mut w,
            format_args!(
                "{config:?}{pamt:?}{locks:?}{tds:?}{vcpus:?}{kot:?}{wbt:?}{injected:?}{after_dead:?}{next_td}"
            ),
        );
    }
}

/// SEAMCALLs that build or run the TD (`Leaf::builds_or_runs`) issued by a task whose current
/// operation (an ioctl, a file op on guest_memfd, KVM_RUN) began after the VM was dead: the VMM
/// and KVM's ioctl gates mark the task as each begins. Upstream turns such an ioctl away with
/// -EIO before it reaches the module, and its file ops only take state down; an operation
/// already running when the VM died is not marked (its in-flight calls are not this check's
/// business).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AfterDead {
    tasks: BTreeSet<TaskId>,
    /// (step, task, leaf) of each such call.
    pub calls: Vec<(u64, TaskId, Leaf)>,
}

impl AfterDead {
    /// At an ioctl's entry: whether `task`'s ioctl begins on a dead VM.
    pub fn entered(&mut self, task: TaskId, vm_dead: bool) {
        if vm_dead {
            self.tasks.insert(task);
        } else {
            self.tasks.remove(&task);
        }
    }

    fn called(&mut self, step: u64, task: TaskId, leaf: Leaf) {
        if leaf.builds_or_runs() && self.tasks.contains(&task) {
            self.calls.push((step, task, leaf));
        }
    }
}

/// The module: its state, plus the host memory it reads and writes.
pub struct TdxModule {
    st: RefCell<ModuleState>,
    host: HostRef,
}

impl TdxModule {
    /// A module after TDH.SYS.* initialisation, with a PAMT covering every host page.
    pub fn new(config: ModuleConfig, host: HostRef) -> Self {
        let (base, n) = {
            let h = host.borrow();
            let first = h
                .ledger
                .iter()
                .next()
                .map(|(p, _)| p)
                .unwrap_or(Pfn::new(0));
            (first, h.ledger.iter().count() as u64)
        };
        let kot = (config.hkid_min..=config.hkid_max)
            .map(|h| {
                (
                    Hkid(h),
                    KotEntry {
                        state: KotState::Free,
                        wbinvd_bitmap: 0,
                    },
                )
            })
            .collect();
        let wbt = vec![Wbt::default(); usize::from(config.packages)];
        TdxModule {
            st: RefCell::new(ModuleState {
                config,
                pamt: Pamt::new(base, n),
                locks: Locks::default(),
                tds: BTreeMap::new(),
                vcpus: BTreeMap::new(),
                kot,
                wbt,
                injected: Injected::default(),
                after_dead: AfterDead::default(),
                succeeded: 0,
                next_td: 0,
            }),
            host,
        }
    }

    /// Read-only view for checks and tests.
    pub fn state(&self) -> Ref<'_, ModuleState> {
        self.st.borrow()
    }

    /// Arms injected faults.
    pub fn inject(&self, f: impl FnOnce(&mut Injected)) {
        f(&mut self.st.borrow_mut().injected);
    }

    /// A copy of this module's state acting on `host` (a copy of this module's host): for
    /// `Stack::fork`.
    pub fn fork(&self, host: HostRef) -> TdxModule {
        TdxModule {
            st: RefCell::new(self.st.borrow().clone()),
            host,
        }
    }

    /// The host memory this module acts on.
    pub fn host(&self) -> &HostRef {
        &self.host
    }

    /// Fault injection: put a vCPU in the state zero-step mitigation leaves after the guest
    /// faulted past the threshold at `gpa` without RIP progress (its next TDH.VP.ENTER takes
    /// the S-EPT tree lock).
    pub fn inject_zero_step(&self, tdvpr: Pfn, gpa: Gpa) {
        let mut st = self.st.borrow_mut();
        let threshold = st.config.epf_threshold;
        let v = st.vcpus.get_mut(&tdvpr).expect("vcpu");
        v.epf_count = threshold;
        if !v.epf_gpas.contains(&gpa.gfn()) {
            v.epf_gpas.push(gpa.gfn());
        }
    }

    /// KVM tells the `AfterDead` record that `task` enters an ioctl, on a dead VM or not.
    pub fn note_ioctl_entry(&self, task: TaskId, vm_dead: bool) {
        self.st.borrow_mut().after_dead.entered(task, vm_dead);
    }

    /// Sets TD_CTLS.PENDING_VE_DISABLE for a TD (a TDH.MNG.WR of TD_CTLS in the real flow).
    pub fn set_pending_ve_disable(&self, tdr: Pfn, on: bool) {
        if let Some(td) = self.st.borrow_mut().tds.get_mut(&tdr) {
            td.pending_ve_disable = on;
        }
    }

    /// Runs one call of `leaf` (`call`) unless an armed BUSY or error (`inject.rs`) answers it
    /// instead, noted in the trace; records how the call ended, so that a retry after BUSY is
    /// never injected into and KVM's answer to an injected failure is known as such.
    async fn injectable<T>(
        &self,
        cx: &Ctx,
        leaf: Leaf,
        call: impl std::future::Future<Output = SeamResult<T>>,
    ) -> SeamResult<T> {
        let task = cx.current();
        let injected = self.st.borrow_mut().injected.calls.take(task, leaf);
        let was_injected = injected.is_some();
        let r = match injected {
            Some(e) => {
                cx.yield_now(Point::Yield(leaf.name())).await;
                cx.note("injected", e.status.raw(), u64::from(leaf.number()));
                Err(e)
            }
            None => call.await,
        };
        let status = match &r {
            Ok(_) => Status::SUCCESS,
            Err(e) => e.status,
        };
        crate::coverage::hit(
            crate::coverage::Site::Seamcall,
            u64::from(leaf.number()),
            status.raw(),
        );
        let step = cx.step();
        let mut st = self.st.borrow_mut();
        if r.is_ok() && leaf != Leaf::VpEnter {
            st.succeeded += 1;
        }
        st.injected
            .calls
            .ended(step, task, leaf, status, was_injected);
        st.after_dead.called(step, task, leaf);
        r
    }

    /// The common shape of a SEAMCALL: entry yield, checks and locks (`checks`), a yield with
    /// the locks held, then `commit` and release of everything still held.
    async fn seamcall<P, T>(
        &self,
        cx: &Ctx,
        leaf: Leaf,
        checks: impl FnOnce(&mut ModuleState, &mut Guard) -> SeamResult<P>,
        commit: impl FnOnce(&mut ModuleState, &mut crate::host::Host, P, u64) -> SeamResult<T>,
    ) -> SeamResult<T> {
        self.injectable(cx, leaf, self.seamcall_inner(cx, leaf, checks, commit))
            .await
    }

    async fn seamcall_inner<P, T>(
        &self,
        cx: &Ctx,
        leaf: Leaf,
        checks: impl FnOnce(&mut ModuleState, &mut Guard) -> SeamResult<P>,
        commit: impl FnOnce(&mut ModuleState, &mut crate::host::Host, P, u64) -> SeamResult<T>,
    ) -> SeamResult<T> {
        cx.yield_now(Point::Yield(leaf.name())).await;
        let mut g = Guard::new(leaf, cx.current());
        let plan = {
            let mut st = self.st.borrow_mut();
            let r = checks(&mut st, &mut g);
            if r.is_err() {
                g.release_all(&mut st.locks);
            }
            r
        };
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                cx.note(leaf.name(), e.status.raw(), 0);
                return Err(e);
            }
        };
        cx.yield_now(Point::Yield(window_name(leaf))).await;
        let r = {
            let mut st = self.st.borrow_mut();
            let mut host = self.host.borrow_mut();
            let r = commit(&mut st, &mut host, plan, cx.step());
            if r.is_ok() {
                // Every host leaf that holds an S-EPT entry lock commits by writing the entry.
                g.commit_entry(&mut st.locks);
            }
            g.release_all(&mut st.locks);
            r
        };
        cx.note(
            leaf.name(),
            r.as_ref().err().map_or(0, |e| e.status.raw()),
            0,
        );
        r
    }
}

/// The yield point a leaf reaches with its locks held.
pub fn window_name(leaf: Leaf) -> &'static str {
    match leaf {
        Leaf::VpEnter => "TDH.VP.ENTER:locked",
        Leaf::MngAddcx => "TDH.MNG.ADDCX:locked",
        Leaf::MemPageAdd => "TDH.MEM.PAGE.ADD:locked",
        Leaf::MemSeptAdd => "TDH.MEM.SEPT.ADD:locked",
        Leaf::VpAddcx => "TDH.VP.ADDCX:locked",
        Leaf::MemPageAug => "TDH.MEM.PAGE.AUG:locked",
        Leaf::MemRangeBlock => "TDH.MEM.RANGE.BLOCK:locked",
        Leaf::MngKeyConfig => "TDH.MNG.KEY.CONFIG:locked",
        Leaf::MngCreate => "TDH.MNG.CREATE:locked",
        Leaf::VpCreate => "TDH.VP.CREATE:locked",
        Leaf::MrExtend => "TDH.MR.EXTEND:locked",
        Leaf::MrFinalize => "TDH.MR.FINALIZE:locked",
        Leaf::VpFlush => "TDH.VP.FLUSH:locked",
        Leaf::MngVpflushdone => "TDH.MNG.VPFLUSHDONE:locked",
        Leaf::MngKeyFreeid => "TDH.MNG.KEY.FREEID:locked",
        Leaf::MngInit => "TDH.MNG.INIT:locked",
        Leaf::VpInit => "TDH.VP.INIT:locked",
        Leaf::PhymemPageReclaim => "TDH.PHYMEM.PAGE.RECLAIM:locked",
        Leaf::MemPageRemove => "TDH.MEM.PAGE.REMOVE:locked",
        Leaf::MemSeptRemove => "TDH.MEM.SEPT.REMOVE:locked",
        Leaf::MemTrack => "TDH.MEM.TRACK:locked",
        Leaf::MemRangeUnblock => "TDH.MEM.RANGE.UNBLOCK:locked",
        Leaf::PhymemCacheWb => "TDH.PHYMEM.CACHE.WB:locked",
        Leaf::PhymemPageWbinvd => "TDH.PHYMEM.PAGE.WBINVD:locked",
        Leaf::TdgMemPageAccept => "TDG.MEM.PAGE.ACCEPT:locked",
        Leaf::TdgMemPageAttrRd => "TDG.MEM.PAGE.ATTR.RD:locked",
        Leaf::TdgMemPageAttrWr => "TDG.MEM.PAGE.ATTR.WR:locked",
    }
}

// ---- Helpers shared by the handlers (src/common/helpers/helpers.c) ----

/// Operation states each leaf accepts (`seamcall_state_lookup`, reachable states only).
pub(crate) fn op_state_allows(leaf: Leaf, s: OpState) -> bool {
    use OpState::*;
    match leaf {
        Leaf::MemPageAdd | Leaf::MrExtend | Leaf::MrFinalize | Leaf::VpCreate | Leaf::VpAddcx => {
            s == Initialized
        }
        Leaf::VpInit => s == Initialized,
        Leaf::MngInit | Leaf::MngAddcx => s == Uninitialized,
        Leaf::VpEnter => s == Runnable,
        Leaf::MemSeptAdd
        | Leaf::MemPageAug
        | Leaf::MemRangeBlock
        | Leaf::MemPageRemove
        | Leaf::MemRangeUnblock
        | Leaf::MemSeptRemove
        | Leaf::MemTrack => matches!(s, Initialized | Runnable),
        _ => true,
    }
}

impl ModuleState {
    /// `check_lock_and_map_explicit_tdr` / `check_and_lock_explicit_4k_private_hpa`: range,
    /// PAMT lock (the guard's next row step), then the expected page type.
    pub(crate) fn explicit_page(
        &mut self,
        g: &mut Guard,
        pfn: Pfn,
        op: Operand,
        expect: PageType,
    ) -> SeamResult<()> {
        if !self.pamt.covers(pfn) {
            return Err(SeamErr::with(Code::OperandAddrRangeError, op));
        }
        g.take(&mut self.locks, LockKey::Pamt(pfn))?;
        if self.pamt.get(pfn).pt != expect {
            return Err(SeamErr::with(Code::PageMetadataIncorrect, op));
        }
        Ok(())
    }

    /// `check_state_map_tdcs_and_lock`: fatal, keys configured, TDCS allocated, optionally the
    /// OP_STATE lock, then the leaf's op-state table.
    pub(crate) fn gate(
        &mut self,
        g: &mut Guard,
        tdr: Pfn,
        leaf: Leaf,
        lock_op_state: bool,
    ) -> SeamResult<()> {
        let min = self.config.tdcs_pages;
        let td = self.tds.get(&tdr).expect("gate on a TDR without a TD");
        if td.fatal {
            return Err(SeamErr::code(Code::TdFatal));
        }
        if td.lifecycle != Lifecycle::KeysConfigured {
            return Err(SeamErr::code(Code::TdKeysNotConfigured));
        }
        if td.tdcs.len() < min {
            return Err(SeamErr::code(Code::TdcsNotAllocated));
        }
        let op = td.op_state;
        if lock_op_state {
            g.take(&mut self.locks, LockKey::OpState(tdr))?;
        }
        if !op_state_allows(leaf, op) {
            // 1666adc returns the bare code (another stored helpers.c adds the op state).
            return Err(SeamErr::code(Code::OpStateIncorrect));
        }
        Ok(())
    }

    /// The TD of a TDR page (the caller has checked the PAMT type).
    pub(crate) fn td(&self, tdr: Pfn) -> &Td {
        self.tds.get(&tdr).expect("PT_TDR page without TD state")
    }

    pub(crate) fn td_mut(&mut self, tdr: Pfn) -> &mut Td {
        self.tds
            .get_mut(&tdr)
            .expect("PT_TDR page without TD state")
    }

    /// `is_tlb_tracked(bepoch)` against the TD's epoch and counters.
    pub(crate) fn is_tlb_tracked(&self, tdr: Pfn, bepoch: u64) -> bool {
        let td = self.td(tdr);
        let e = td.td_epoch;
        (bepoch + 1 == e && td.refcount[(bepoch & 1) as usize] == 0) || bepoch + 1 < e
    }

    /// Package of an LP.
    pub(crate) fn pkg(&self, lp: Lp) -> u8 {
        lp.0 % self.config.packages
    }

    /// Bitmap with one bit per package.
    pub(crate) fn all_packages(&self) -> u32 {
        (1u32 << self.config.packages) - 1
    }

    /// PAMT assignment plus the host-side record that the module now holds the page.
    pub(crate) fn assign_page(
        &mut self,
        host: &mut crate::host::Host,
        step: u64,
        pfn: Pfn,
        pt: PageType,
        tdr: Pfn,
    ) {
        let (owner, key, td) = if pt == PageType::Tdr {
            (None, CacheKey::Global, self.td(tdr).id)
        } else {
            let td = self.td(tdr);
            (Some(tdr), CacheKey::Td(td.hkid), td.id)
        };
        self.pamt.assign(pfn, pt, owner);
        let kind = match pt {
            PageType::Tdr => TdxPageKind::Tdr,
            PageType::Tdcx => TdxPageKind::Tdcx,
            PageType::Tdvpr => TdxPageKind::Tdvpr,
            PageType::Ept => TdxPageKind::Sept,
            PageType::Reg => TdxPageKind::Guest,
            PageType::Nda => unreachable!("assigning NDA"),
        };
        let r = host.ledger.donate(pfn, TdxHold { kind, td }, key);
        host.record(step, r);
    }

    /// PAMT back to NDA plus the host-side record of the hand-back.
    pub(crate) fn release_page(&mut self, host: &mut crate::host::Host, step: u64, pfn: Pfn) {
        self.pamt.release(pfn);
        let r = host.ledger.module_release(pfn).map(|_| ());
        host.record(step, r);
    }
}

/// GPA validity for a private operand (`check_gpa_validity` with GPAW 48): shared bit clear and
/// nothing above bit 47.
pub(crate) fn private_gpa_ok(gpa: Gpa) -> bool {
    gpa.raw() & SHARED_BIT_GPAW48 == 0 && gpa.raw() >> 48 == 0
}

/// `verify_page_info_input`: level within [min, max] and GPA aligned to it.
pub(crate) fn page_info_ok(gpa: Gpa, level: PgLevel, min: PgLevel, max: PgLevel) -> bool {
    level >= min && level <= max && gpa.is_aligned(level)
}

#[cfg(test)]
mod tests;

//! The guest side: TDG.MEM.PAGE.{ACCEPT, ATTR.RD, ATTR.WR}
//! (src/td_dispatcher/vm_exits/tdg_mem_page_*.c, the TDCALL epilogue of tdx_td_dispatcher.c)
//! and the EPT-violation exit for private GPAs (td_ept_violation.c).
//!
//! A TDCALL either completes with a status in RAX, or takes the vCPU out to the host (an
//! EPT-violation TD exit, or the host-priority timeout); the guest then re-executes it after
//! the next entry.

use crate::addr::{Gpa, Pfn, PgLevel};
use crate::sched::{Ctx, Point};

use super::locks::{Guard, LockKey};
use super::{
    page_info_ok, private_gpa_ok, window_name, Code, Leaf, Operand, SeptState, Status, TdxModule,
    VcpuState,
};

/// Extended exit qualification type of an EPT-violation TD exit (`vmx_eeq_type_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eeq {
    None,
    /// Raised by TDG.MEM.PAGE.ACCEPT (the host should map the GPA at the requested level).
    Accept,
    /// Raised by TDG.MEM.PAGE.ATTR.WR.
    AttrWr,
    /// The guest touched a PENDING page with PENDING_VE_DISABLE set.
    PendingEptViolation,
}

/// A TD exit caused by the guest's last action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    EptViolation {
        gpa: Gpa,
        eeq: Eeq,
    },
    /// TDX_HOST_PRIORITY_BUSY_TIMEOUT: the guest kept losing to a flagged host.
    HostPriorityBusyTimeout,
}

/// What a completed TDCALL returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TdcallRet {
    /// RAX (TDX_SUCCESS, a warning such as PAGE_ALREADY_ACCEPTED, or an error).
    pub status: Status,
    /// ATTR.RD: level of the leaf and whether it is pending.
    pub level: Option<PgLevel>,
    pub pending: bool,
}

impl TdcallRet {
    fn status(status: Status) -> Self {
        TdcallRet {
            status,
            level: None,
            pending: false,
        }
    }
}

/// A TDCALL's outcome: completed (status in RAX) or a TD exit.
pub type TdcallResult = Result<TdcallRet, GuestExit>;

/// How the guest touches memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    Read,
    Write,
    Fetch,
}

/// The result of a private-GPA access by a running guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessResult {
    /// Translated to this host page.
    Mapped(Pfn),
    /// #VE injected (a PENDING page with PENDING_VE_DISABLE clear).
    VirtualizationException,
    /// TD exit to the host.
    Exit(GuestExit),
}

impl TdxModule {
    fn tdr_of_running(&self, tdvpr: Pfn) -> Pfn {
        let st = self.st.borrow();
        let v = &st.vcpus[&tdvpr];
        assert_eq!(
            v.state,
            VcpuState::Active,
            "TDCALL from a vCPU that is not running"
        );
        v.tdr
    }

    /// The dispatcher's epilogue: BUSY_HOST_PRIORITY is reported to the guest as
    /// TDX_OPERAND_BUSY with the same operand, and a long enough run of them exits to the host.
    fn tdcall_epilogue(&self, tdvpr: Pfn, leaf: Leaf, r: TdcallResult) -> TdcallResult {
        if crate::coverage::enabled() {
            let status = match &r {
                Ok(ret) => ret.status.raw(),
                Err(_) => u64::MAX,
            };
            crate::coverage::hit(
                crate::coverage::Site::Tdcall,
                u64::from(leaf.number()),
                status,
            );
        }
        let mut st = self.st.borrow_mut();
        let limit = st.config.hp_lock_timeout_attempts;
        let v = st.vcpus.get_mut(&tdvpr).expect("vcpu");
        match r {
            Ok(ret) if ret.status.code == Code::OperandBusyHostPriority => {
                v.hp_busy += 1;
                if v.hp_busy >= limit {
                    v.hp_busy = 0;
                    return Err(GuestExit::HostPriorityBusyTimeout);
                }
                Ok(TdcallRet::status(Status {
                    code: Code::OperandBusy,
                    operand: ret.status.operand,
                }))
            }
            other => {
                v.hp_busy = 0;
                other
            }
        }
    }

    /// Takes the guest side of the entry lock (if this module version does). A failure is the
    /// TDCALL's result.
    fn guest_entry_lock(&self, g: &mut Guard, key: LockKey) -> Result<(), TdcallRet> {
        let mut st = self.st.borrow_mut();
        if !st.config.tdcall_takes_entry_lock {
            return Ok(());
        }
        g.take(&mut st.locks, key)
            .map_err(|e| TdcallRet::status(e.status))
    }

    /// The moment a TDCALL holds its locks (other SEAMCALLs and TDCALLs may run).
    async fn tdcall_window(&self, cx: &Ctx, leaf: Leaf) {
        cx.yield_now(Point::Yield(window_name(leaf))).await;
    }

    /// TDG.MEM.PAGE.ACCEPT (tdcall leaf 6; tdg_mem_page_accept.c): accept a PENDING page,
    /// zeroing it; 4K or 2M.
    pub async fn tdg_mem_page_accept(
        &self,
        cx: &Ctx,
        tdvpr: Pfn,
        gpa: Gpa,
        level: PgLevel,
    ) -> TdcallResult {
        let leaf = Leaf::TdgMemPageAccept;
        cx.yield_now(Point::Yield(leaf.name())).await;
        let tdr = self.tdr_of_running(tdvpr);
        let r = self.accept_inner(cx, tdr, gpa, level).await;
        let r = self.tdcall_epilogue(tdvpr, Leaf::TdgMemPageAccept, r);
        note_tdcall(cx, leaf, &r);
        r
    }

    /// The body of `tdg_mem_page_accept` for the TD of the running vCPU (walk, entry lock with
    /// guest priority, the failure cases of `check_tdaccept_failure`, zeroing, MAPPED).
    async fn accept_inner(&self, cx: &Ctx, tdr: Pfn, gpa: Gpa, level: PgLevel) -> TdcallResult {
        let leaf = Leaf::TdgMemPageAccept;
        if !page_info_ok(gpa, level, PgLevel::L4K, PgLevel::L2M) || !private_gpa_ok(gpa) {
            return Ok(TdcallRet::status(Status::with(
                Code::OperandInvalid,
                Operand::Rcx,
            )));
        }
        let w = self.st.borrow().td(tdr).sept.walk(gpa.gfn(), level);
        if w.level != level {
            if w.state.guest_accessible() {
                return Ok(TdcallRet::status(Status::with(
                    Code::PageAlreadyAccepted,
                    Operand::Detail(u32::from(w.level.tdx())),
                )));
            }
            return Err(GuestExit::EptViolation {
                gpa,
                eeq: Eeq::Accept,
            });
        }
        let mut g = Guard::new(leaf, cx.current());
        if let Err(ret) = self.guest_entry_lock(&mut g, LockKey::SeptEntry(tdr, level, w.base)) {
            return Ok(ret);
        }
        let release = |this: &Self, g: &mut Guard| g.release_all(&mut this.st.borrow_mut().locks);
        let state = self.st.borrow().td(tdr).sept.state(level, w.base);
        if state != SeptState::Free && !state.is_leaf() {
            release(self, &mut g);
            return Ok(TdcallRet::status(Status::with(
                Code::PageSizeMismatch,
                Operand::Detail(u32::from(level.tdx())),
            )));
        }
        if state.guest_accessible() {
            release(self, &mut g);
            return Ok(TdcallRet::status(Status::with(
                Code::PageAlreadyAccepted,
                Operand::Detail(u32::from(level.tdx())),
            )));
        }
        if state != SeptState::Pending {
            release(self, &mut g);
            return Err(GuestExit::EptViolation {
                gpa,
                eeq: Eeq::Accept,
            });
        }
        // Zeroing the page happens with the entry lock held: the window in which host S-EPT
        // leaves on this GPA get TDX_OPERAND_BUSY|RCX.
        self.tdcall_window(cx, leaf).await;
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        let td = st.tds.get_mut(&tdr).expect("td");
        let mut e = td.sept.get(level, w.base).expect("pending entry");
        e.state = SeptState::Mapped;
        e.accept_counter = 0;
        td.sept.set(level, w.base, e);
        let mut host = self.host.borrow_mut();
        for i in 0..level.pages() {
            host.write(e.pfn.add(i), 0);
        }
        // The new entry is written whole, HP bit clear (a host that lost meanwhile loses it).
        g.commit_entry(&mut st.locks);
        g.release_all(&mut st.locks);
        Ok(TdcallRet::status(Status::SUCCESS))
    }

    /// TDG.MEM.PAGE.ATTR.RD (tdcall leaf 23; tdg_mem_page_attr_rd.c): the level and pending
    /// state of the leaf mapping `gpa` (L2 attributes are always 0: no L2 VMs).
    pub async fn tdg_mem_page_attr_rd(&self, cx: &Ctx, tdvpr: Pfn, gpa: Gpa) -> TdcallResult {
        let leaf = Leaf::TdgMemPageAttrRd;
        cx.yield_now(Point::Yield(leaf.name())).await;
        let tdr = self.tdr_of_running(tdvpr);
        let r = async {
            if !private_gpa_ok(gpa) {
                return Ok(TdcallRet::status(Status::with(
                    Code::OperandInvalid,
                    Operand::Rcx,
                )));
            }
            let w = self.st.borrow().td(tdr).sept.walk(gpa.gfn(), PgLevel::L4K);
            let mut g = Guard::new(leaf, cx.current());
            if let Err(ret) =
                self.guest_entry_lock(&mut g, LockKey::SeptEntry(tdr, w.level, w.base))
            {
                return Ok(ret);
            }
            if !matches!(w.state, SeptState::Mapped | SeptState::Pending) {
                g.release_all(&mut self.st.borrow_mut().locks);
                return Err(GuestExit::EptViolation {
                    gpa,
                    eeq: Eeq::None,
                });
            }
            self.tdcall_window(cx, leaf).await;
            g.release_all(&mut self.st.borrow_mut().locks);
            Ok(TdcallRet {
                status: Status::SUCCESS,
                level: Some(w.level),
                pending: w.state == SeptState::Pending,
            })
        }
        .await;
        let r = self.tdcall_epilogue(tdvpr, Leaf::TdgMemPageAttrRd, r);
        note_tdcall(cx, leaf, &r);
        r
    }

    /// TDG.MEM.PAGE.ATTR.WR (tdcall leaf 24; tdg_mem_page_attr_wr.c): set L2 attributes. With no
    /// L2 VMs only all-zero attributes are valid, so it checks input, walks and contends for the
    /// entry lock, and changes nothing.
    pub async fn tdg_mem_page_attr_wr(
        &self,
        cx: &Ctx,
        tdvpr: Pfn,
        gpa: Gpa,
        level: PgLevel,
        attrs: u64,
    ) -> TdcallResult {
        let leaf = Leaf::TdgMemPageAttrWr;
        cx.yield_now(Point::Yield(leaf.name())).await;
        let tdr = self.tdr_of_running(tdvpr);
        let r = async {
            if attrs != 0 {
                return Ok(TdcallRet::status(Status::with(
                    Code::OperandInvalid,
                    Operand::Rdx,
                )));
            }
            if !page_info_ok(gpa, level, PgLevel::L4K, PgLevel::L1G) || !private_gpa_ok(gpa) {
                return Ok(TdcallRet::status(Status::with(
                    Code::OperandInvalid,
                    Operand::Rcx,
                )));
            }
            let w = self.st.borrow().td(tdr).sept.walk(gpa.gfn(), level);
            if w.level != level {
                return Err(GuestExit::EptViolation {
                    gpa,
                    eeq: Eeq::AttrWr,
                });
            }
            let mut g = Guard::new(leaf, cx.current());
            if let Err(ret) = self.guest_entry_lock(&mut g, LockKey::SeptEntry(tdr, level, w.base))
            {
                return Ok(ret);
            }
            if w.state != SeptState::Free && !w.state.is_leaf() {
                g.release_all(&mut self.st.borrow_mut().locks);
                return Ok(TdcallRet::status(Status::with(
                    Code::PageSizeMismatch,
                    Operand::Detail(u32::from(level.tdx())),
                )));
            }
            if !matches!(w.state, SeptState::Mapped | SeptState::Pending) {
                g.release_all(&mut self.st.borrow_mut().locks);
                return Err(GuestExit::EptViolation {
                    gpa,
                    eeq: Eeq::AttrWr,
                });
            }
            self.tdcall_window(cx, leaf).await;
            g.release_all(&mut self.st.borrow_mut().locks);
            Ok(TdcallRet {
                status: Status::SUCCESS,
                level: Some(level),
                pending: w.state == SeptState::Pending,
            })
        }
        .await;
        let r = self.tdcall_epilogue(tdvpr, Leaf::TdgMemPageAttrWr, r);
        note_tdcall(cx, leaf, &r);
        r
    }

    /// A running guest's access to a private GPA (the CPU's S-EPT walk plus td_ept_violation.c
    /// when it faults): a MAPPED leaf translates; a PENDING page gives #VE, or an exit with
    /// EEQ PENDING_EPT_VIOLATION when PENDING_VE_DISABLE is set; anything else exits. Every
    /// exit feeds the zero-step counter. `rip` is the faulting instruction.
    pub fn guest_private_access(&self, tdvpr: Pfn, gpa: Gpa, rip: u64) -> AccessResult {
        let mut st = self.st.borrow_mut();
        let threshold = st.config.epf_threshold;
        let tdr = st.vcpus[&tdvpr].tdr;
        let td = st.td(tdr);
        let gfn = gpa.gfn();
        let w = td.sept.walk(gfn, PgLevel::L4K);
        if w.state == SeptState::Mapped {
            let e = w.entry.expect("mapped leaf");
            return AccessResult::Mapped(e.pfn.add(gfn.offset_from(w.base)));
        }
        let eeq = if w.state.is_guest_acceptable() {
            if !td.pending_ve_disable {
                return AccessResult::VirtualizationException;
            }
            Eeq::PendingEptViolation
        } else {
            Eeq::None
        };
        st.vcpus
            .get_mut(&tdvpr)
            .expect("vcpu")
            .log_epf(gfn, rip, threshold);
        AccessResult::Exit(GuestExit::EptViolation { gpa, eeq })
    }
}

fn note_tdcall(cx: &Ctx, leaf: Leaf, r: &TdcallResult) {
    let v = match r {
        Ok(ret) => ret.status.raw(),
        Err(GuestExit::EptViolation { .. }) => 0x30,
        Err(GuestExit::HostPriorityBusyTimeout) => Status::new(Code::HostPriorityBusyTimeout).raw(),
    };
    cx.note(leaf.name(), v, 0);
}

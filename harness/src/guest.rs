//! The guest: a per-vCPU program of memory accesses, TDCALLs and MapGPA, run while the vCPU is
//! in guest mode. Each op is one instruction at its own RIP; an op that exits to the host is
//! re-executed after the next entry (same RIP), which is what feeds zero-step mitigation.
//! What the guest sees is recorded for the guest-memory oracle.

use crate::addr::{Gpa, Pfn, PgLevel};
use crate::kvm::mmu::fault::MemoryFaultExit;
use crate::kvm::vmx::tdx::TdExit;
use crate::kvm::{GuestMode, Kvm};
use crate::sched::Ctx;
use crate::tdx_module::{AccessResult, Code};

/// One guest instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestOp {
    /// TDG.MEM.PAGE.ACCEPT of a private 4K page (any GPA: a hostile guest passes unaligned,
    /// shared or out-of-range ones too).
    Accept { gpa: Gpa },
    /// TDG.MEM.PAGE.ACCEPT at 2M (what Linux's `accept_memory` tries first).
    AcceptHuge { gpa: Gpa },
    /// Load from a GPA (private or shared by its shared bit).
    Read { gpa: Gpa },
    /// Store `value`.
    Write { gpa: Gpa, value: u64 },
    /// Linux's `tdx_map_gpa`: TDG.VP.VMCALL<MapGPA> of `[gpa, gpa + size)` (the shared bit of
    /// `gpa` says which way), retried from the GPA the host returns in R11 on RETRY.
    MapGpa { gpa: Gpa, size: u64 },
}

/// Linux's `tdx_map_gpa` retry state: the range still to convert and the retries without
/// forward progress (at most `MAP_GPA_RETRIES_PER_PAGE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapGpaCall {
    pub start: u64,
    pub end: u64,
    pub retries: u32,
}

/// `max_retries_per_page` in Linux's `tdx_map_gpa`.
pub const MAP_GPA_RETRIES_PER_PAGE: u32 = 3;

/// What one op produced, in program order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    Accepted {
        gpa: Gpa,
        code: Code,
    },
    /// A 2M ACCEPT's result (SUCCESS accepts and zeroes all 512 pages).
    AcceptedHuge {
        gpa: Gpa,
        code: Code,
    },
    Read {
        gpa: Gpa,
        value: u64,
    },
    Wrote {
        gpa: Gpa,
        value: u64,
    },
    /// #VE: the page was not accepted.
    VirtualizationException {
        gpa: Gpa,
    },
    /// The MapGPA op finished with this final TDVMCALL status (SUCCESS, an error, or RETRY
    /// when the guest gave up: no progress three times, or an R11 outside its range).
    MapGpa {
        gpa: Gpa,
        status: u64,
    },
    /// A shared access with no memslot behind it was emulated as MMIO (#VE, TDVMCALL<MMIO>).
    Mmio {
        gpa: Gpa,
    },
}

/// A vCPU's guest program and where it is.
#[derive(Clone, Debug, Default)]
pub struct GuestProgram {
    pub ops: Vec<GuestOp>,
    pub pc: usize,
    /// Observations with the step they happened at.
    pub seen: Vec<(u64, Observation)>,
    /// Set by the fault path for KVM_RUN to report (KVM_EXIT_MEMORY_FAULT).
    pub memory_fault: Option<MemoryFaultExit>,
    /// KVM_EXIT_INTERNAL_ERROR (`kvm_prepare_unexpected_reason_exit`) with TDH.VP.ENTER's
    /// status.
    pub internal_error: Option<crate::tdx_module::Status>,
    /// The MapGPA op in progress.
    pub map_gpa: Option<MapGpaCall>,
    /// R10 and R11 as the guest reads them after its TDVMCALL (set by KVM before re-entry).
    pub tdvmcall_regs: Option<(u64, u64)>,
    /// Consecutive BUSY results of the current TDCALL (the guest retries them).
    pub busy_retries: u32,
    /// KVM installed an MMIO SPTE for the current shared access: the next attempt takes #VE
    /// and completes through TDG.VP.VMCALL<#VE.RequestMMIO>.
    pub mmio_pending: bool,
}

/// RIP of op `pc`.
const RIP_BASE: u64 = 0x10_0000;

impl GuestProgram {
    pub fn new(ops: Vec<GuestOp>) -> Self {
        GuestProgram {
            ops,
            ..GuestProgram::default()
        }
    }

    /// The RIP of the next instruction.
    pub fn rip(&self) -> u64 {
        RIP_BASE + 4 * self.pc as u64
    }

    pub fn done(&self) -> bool {
        self.pc >= self.ops.len()
    }
}

/// Runs vCPU `v`'s guest from its current op until something exits to the host; performs the
/// TD exit (the module's part) before returning.
pub async fn run_guest(kvm: &Kvm, cx: &Ctx, v: usize, tdvpr: Pfn) -> TdExit {
    let m = &kvm.module;
    loop {
        cx.yield_at("guest").await;
        let (kicked, op, rip) = {
            let st = kvm.st.borrow();
            let vc = &st.vcpus[v];
            (
                vc.mode == GuestMode::ExitingGuest,
                vc.guest.ops.get(vc.guest.pc).copied(),
                vc.guest.rip(),
            )
        };
        if kicked {
            m.td_exit(tdvpr, rip);
            return TdExit::Interrupt;
        }
        let Some(op) = op else {
            m.td_exit(tdvpr, rip);
            return TdExit::Done;
        };
        let step = match op {
            GuestOp::Accept { gpa } | GuestOp::AcceptHuge { gpa } => {
                let huge = matches!(op, GuestOp::AcceptHuge { .. });
                let level = if huge { PgLevel::L2M } else { PgLevel::L4K };
                match m.tdg_mem_page_accept(cx, tdvpr, gpa, level).await {
                    Ok(ret) if ret.status.code == Code::OperandBusy => Step::Again,
                    Ok(ret) if huge => Step::Next(Observation::AcceptedHuge {
                        gpa,
                        code: ret.status.code,
                    }),
                    Ok(ret) => Step::Next(Observation::Accepted {
                        gpa,
                        code: ret.status.code,
                    }),
                    Err(e) => Step::Exit(Kvm::guest_exit(e, false)),
                }
            }
            GuestOp::Read { gpa } | GuestOp::Write { gpa, .. }
                if gpa.is_shared() && kvm.st.borrow().vcpus[v].guest.mmio_pending =>
            {
                kvm.st.borrow_mut().vcpus[v].guest.mmio_pending = false;
                Step::Next(Observation::Mmio { gpa })
            }
            GuestOp::Read { gpa } | GuestOp::Write { gpa, .. } => {
                let write = match op {
                    GuestOp::Write { value, .. } => Some(value),
                    _ => None,
                };
                access(kvm, tdvpr, gpa, write, rip)
            }
            GuestOp::MapGpa { gpa, size } => {
                let mut st = kvm.st.borrow_mut();
                match linux_map_gpa(&mut st.vcpus[v].guest, gpa, size) {
                    Ok((start, size)) => Step::Exit(TdExit::MapGpa { gpa: start, size }),
                    Err(status) => Step::Next(Observation::MapGpa { gpa, status }),
                }
            }
        };
        match step {
            Step::Again => {
                kvm.st.borrow_mut().vcpus[v].guest.busy_retries += 1;
            }
            Step::Next(obs) => {
                let mut st = kvm.st.borrow_mut();
                let g = &mut st.vcpus[v].guest;
                g.seen.push((cx.step(), obs));
                g.pc += 1;
                g.busy_retries = 0;
            }
            Step::Exit(e) => {
                m.td_exit(tdvpr, rip);
                return e;
            }
        }
    }
}

/// One pass of Linux's `tdx_map_gpa` loop: the next TDVMCALL's (R12, R13) to issue, or the
/// final status once the host's answer (in `tdvmcall_regs`) ends the call.
fn linux_map_gpa(g: &mut GuestProgram, gpa: Gpa, size: u64) -> Result<(u64, u64), u64> {
    use crate::kvm::vmx::tdvmcall::status;
    let Some((r10, r11)) = g.tdvmcall_regs.take() else {
        let c = g.map_gpa.get_or_insert(MapGpaCall {
            start: gpa.raw(),
            end: gpa.raw().wrapping_add(size),
            retries: 0,
        });
        return Ok((c.start, c.end.wrapping_sub(c.start)));
    };
    let c = g
        .map_gpa
        .as_mut()
        .expect("a TDVMCALL result answers a call");
    let give_up = if r10 != status::RETRY {
        Some(r10)
    } else if r11 < c.start || r11 >= c.end {
        // R11 comes from the untrusted host.
        Some(status::RETRY)
    } else {
        if r11 == c.start {
            c.retries += 1;
        } else {
            c.start = r11;
            c.retries = 0;
        }
        (c.retries >= MAP_GPA_RETRIES_PER_PAGE).then_some(status::RETRY)
    };
    if let Some(st) = give_up {
        g.map_gpa = None;
        return Err(st);
    }
    Ok((c.start, c.end - c.start))
}

enum Step {
    Again,
    Next(Observation),
    Exit(TdExit),
}

/// A load or store: private GPAs through the S-EPT (the module), shared ones through KVM's
/// direct (shared) EPT.
fn access(kvm: &Kvm, tdvpr: Pfn, gpa: Gpa, write: Option<u64>, rip: u64) -> Step {
    let pfn = if gpa.is_shared() {
        let st = kvm.st.borrow();
        let root = st
            .vcpus
            .iter()
            .find(|vc| vc.tdvpr == Some(tdvpr))
            .and_then(|vc| vc.root);
        let leaf = root
            .and_then(|r| st.mmu.walk(r, gpa.gfn(), PgLevel::L4K))
            .map(|(sp, i)| st.mmu.spte(sp, i));
        match leaf {
            Some(e) if e.is_leaf() => e.pfn(),
            _ => {
                return Step::Exit(TdExit::EptViolation {
                    gpa,
                    eeq: crate::tdx_module::Eeq::None,
                    exec: false,
                })
            }
        }
    } else {
        match kvm.module.guest_private_access(tdvpr, gpa, rip) {
            AccessResult::Mapped(p) => p,
            AccessResult::VirtualizationException => {
                return Step::Next(Observation::VirtualizationException { gpa })
            }
            AccessResult::Exit(e) => return Step::Exit(Kvm::guest_exit(e, false)),
        }
    };
    let mut h = kvm.host.borrow_mut();
    match write {
        Some(v) => {
            h.write(pfn, v);
            Step::Next(Observation::Wrote { gpa, value: v })
        }
        None => Step::Next(Observation::Read {
            gpa,
            value: h.read(pfn),
        }),
    }
}

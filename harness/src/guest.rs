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
    /// TDG.MEM.PAGE.ACCEPT of a private 4K page.
    Accept { gpa: Gpa },
    /// Load from a GPA (private or shared by its shared bit).
    Read { gpa: Gpa },
    /// Store `value`.
    Write { gpa: Gpa, value: u64 },
    /// TDG.VP.VMCALL<MapGPA>: convert `npages` from `gpa` to private or shared.
    MapGpa {
        gpa: Gpa,
        npages: u64,
        to_private: bool,
    },
}

/// What one op produced, in program order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    Accepted {
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
    MapGpaDone {
        gpa: Gpa,
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
    /// A MapGPA request waiting for userspace.
    pub map_gpa: Option<(Gpa, u64, bool)>,
    /// Userspace completed the MapGPA exit (`tdx_complete_vmcall_map_gpa`).
    pub map_gpa_acked: bool,
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
            GuestOp::Accept { gpa } => {
                match m.tdg_mem_page_accept(cx, tdvpr, gpa, PgLevel::L4K).await {
                    Ok(ret) if ret.status.code == Code::OperandBusy => Step::Again,
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
            GuestOp::MapGpa {
                gpa,
                npages,
                to_private,
            } => {
                let mut st = kvm.st.borrow_mut();
                let g = &mut st.vcpus[v].guest;
                if g.map_gpa_acked {
                    g.map_gpa_acked = false;
                    Step::Next(Observation::MapGpaDone { gpa })
                } else {
                    // Exit to KVM, which exits to userspace (KVM_HC_MAP_GPA_RANGE).
                    g.map_gpa = Some((gpa, npages, to_private));
                    Step::Exit(TdExit::MapGpa {
                        gpa,
                        npages,
                        to_private,
                    })
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

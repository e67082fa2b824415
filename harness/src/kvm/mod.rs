//! KVM, as upstream has it for a TDX VM: files mirror the kernel's (`mmu/tdp_mmu.rs` is
//! arch/x86/kvm/mmu/tdp_mmu.c, `vmx/tdx.rs` is arch/x86/kvm/vmx/tdx.c, `x86.rs` the run loop of
//! arch/x86/kvm/x86.c, `memslots.rs`/`guest_memfd.rs`/`attributes.rs` the parts of
//! virt/kvm/kvm_main.c and guest_memfd.c the private-memory path uses, `requests.rs` vCPU
//! requests and kicks).
//!
//! State lives in one `RefCell<KvmState>`; the kernel's locks (`mmu_lock`, `slots_lock`,
//! `kvm->srcu`) are scheduler primitives next to it, taken by the model code exactly where the
//! kernel takes them, so the interleavings the fuzzer explores are the kernel's.

pub mod attributes;
pub mod guest_memfd;
pub mod memslots;
pub mod mmu;
pub mod requests;
pub mod vmx;
pub mod x86;

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;

use crate::addr::{Gfn, Pfn};
use crate::guest::GuestProgram;
use crate::host::HostRef;
use crate::ids::{Hkid, VcpuIdx};
use crate::policy::Policy;
use crate::sched::{Ctx, Mutex, RwLock, Srcu, SrcuIdx, WaitQueue};
use crate::tdx_module::{Lp, TdxModule};

pub use mmu::spte::Spte;
pub use mmu::tdp_mmu::{SpId, TdpMmu};
pub use requests::{GuestMode, Request};

/// Linux errnos the model returns (negated in the kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Errno {
    EPERM,
    ENOENT,
    EINTR,
    EIO,
    E2BIG,
    EAGAIN,
    ENOMEM,
    EFAULT,
    EBUSY,
    EEXIST,
    EINVAL,
    EOPNOTSUPP,
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-{self:?}")
    }
}

pub type KvmResult<T> = Result<T, Errno>;

/// `kvm_tdx->state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TdState {
    Uninitialized,
    Initialized,
    Runnable,
}

/// TDX part of `struct kvm` (`struct kvm_tdx`).
#[derive(Clone, Debug)]
pub struct KvmTdx {
    pub state: TdState,
    pub hkid: Option<Hkid>,
    pub tdr: Option<Pfn>,
    pub tdcs: Vec<Pfn>,
    /// No vCPU may enter while set (`tdh_do_no_vcpus`).
    pub wait_for_sept_zap: bool,
    /// Source page of the PAGE.ADD the set hook issues during INIT_MEM_REGION.
    pub page_add_src: Option<Pfn>,
    pub pre_fault_allowed: bool,
}

/// The `mmu_invalidate_*` fields of `struct kvm`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MmuInvalidate {
    pub seq: u64,
    pub in_progress: u32,
    pub start: Gfn,
    pub end: Gfn,
}

/// A KVM_BUG_ON/TDX_BUG_ON (the VM is bugged and dead) or a WARN (logged only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BugReport {
    pub step: u64,
    /// Upstream function that reported it.
    pub location: &'static str,
    pub what: String,
    /// True for KVM_BUG_ON/TDX_BUG_ON with a VM (it becomes dead), false for a WARN.
    pub fatal: bool,
}

/// One vCPU (`struct kvm_vcpu` + `struct vcpu_tdx`).
#[derive(Clone, Debug)]
pub struct Vcpu {
    pub idx: VcpuIdx,
    /// The pCPU its thread runs on.
    pub lp: Lp,
    pub tdvpr: Option<Pfn>,
    pub tdcx: Vec<Pfn>,
    /// `vcpu_tdx->state == VCPU_TD_STATE_INITIALIZED`.
    pub initialized: bool,
    pub mode: GuestMode,
    pub requests: u32,
    /// `mmu->root.hpa` (direct) and `mmu->mirror_root_hpa`.
    pub root: Option<SpId>,
    pub mirror_root: Option<SpId>,
    pub signal_pending: bool,
    /// An interrupt or event is pending (`kvm_vcpu_has_events`).
    pub pending_event: bool,
    /// The SRCU read section KVM_RUN holds outside guest mode.
    pub srcu: Option<SrcuIdx>,
    pub guest: GuestProgram,
}

/// Everything KVM keeps for the VM.
#[derive(Clone, Debug)]
pub struct KvmState {
    pub memslots: memslots::Memslots,
    pub attributes: attributes::Attributes,
    pub gmem: guest_memfd::GuestMemfds,
    pub mmu: TdpMmu,
    pub invalidate: MmuInvalidate,
    pub tdx: KvmTdx,
    pub vcpus: Vec<Vcpu>,
    pub bugged: bool,
    pub dead: bool,
    pub bugs: Vec<BugReport>,
}

/// The VM.
pub struct Kvm {
    pub st: RefCell<KvmState>,
    pub module: Rc<TdxModule>,
    pub host: HostRef,
    pub policy: Policy,
    /// `kvm->mmu_lock` (rwlock_t on x86).
    pub mmu_lock: RwLock,
    /// `kvm->slots_lock`.
    pub slots_lock: Mutex,
    /// `kvm->srcu`.
    pub srcu: Srcu,
    /// IPI acknowledgements of `kvm_make_all_cpus_request` with KVM_REQUEST_WAIT.
    pub ipi_ack: WaitQueue,
}

impl Kvm {
    /// `kvm_create_vm` + `tdx_vm_init` (no SEAMCALL yet).
    pub fn new(cx: &Ctx, module: Rc<TdxModule>, policy: Policy) -> Rc<Kvm> {
        let host = module.host().clone();
        Rc::new(Kvm {
            st: RefCell::new(KvmState {
                memslots: memslots::Memslots::default(),
                attributes: attributes::Attributes::default(),
                gmem: guest_memfd::GuestMemfds::default(),
                mmu: TdpMmu::default(),
                invalidate: MmuInvalidate::default(),
                tdx: KvmTdx {
                    state: TdState::Uninitialized,
                    hkid: None,
                    tdr: None,
                    tdcs: Vec::new(),
                    wait_for_sept_zap: false,
                    page_add_src: None,
                    pre_fault_allowed: false,
                },
                vcpus: Vec::new(),
                bugged: false,
                dead: false,
                bugs: Vec::new(),
            }),
            module,
            host,
            policy,
            mmu_lock: RwLock::new(cx, "mmu_lock"),
            slots_lock: Mutex::new(cx, "slots_lock"),
            srcu: Srcu::new(cx, "kvm->srcu"),
            ipi_ack: WaitQueue::new(cx, "ipi_ack"),
        })
    }

    /// `KVM_BUG_ON(cond, kvm)` / `TDX_BUG_ON(err, .., kvm)`: WARN, mark the VM bugged and dead
    /// (`kvm_vm_bugged`), make KVM_REQ_VM_DEAD on every vCPU and kick them.
    pub fn bug(&self, cx: &Ctx, location: &'static str, what: String) {
        tracing::debug!(location, %what, "KVM_BUG_ON");
        let mut st = self.st.borrow_mut();
        st.bugs.push(BugReport {
            step: cx.step(),
            location,
            what,
            fatal: true,
        });
        st.bugged = true;
        st.dead = true;
        for v in &mut st.vcpus {
            v.requests |= Request::VmDead.bit();
            if v.mode == GuestMode::InGuest {
                v.mode = GuestMode::ExitingGuest;
            }
        }
        drop(st);
        cx.note("KVM_BUG_ON", 0, 0);
    }

    /// `WARN_ON_ONCE` (and `TDX_BUG_ON` without a VM): logged, the VM goes on.
    pub fn warn(&self, cx: &Ctx, location: &'static str, what: String) {
        self.st.borrow_mut().bugs.push(BugReport {
            step: cx.step(),
            location,
            what,
            fatal: false,
        });
        cx.note("WARN", 0, 0);
    }

    /// `kvm_vm_dead`: dead without a bug (e.g. the guest touched an unaccepted page).
    pub fn vm_dead(&self) {
        let mut st = self.st.borrow_mut();
        st.dead = true;
        for v in &mut st.vcpus {
            v.requests |= Request::VmDead.bit();
            if v.mode == GuestMode::InGuest {
                v.mode = GuestMode::ExitingGuest;
            }
        }
    }

    pub fn is_dead(&self) -> bool {
        self.st.borrow().dead
    }

    /// KVM_CREATE_VCPU (`kvm_vm_ioctl_create_vcpu` + `tdx_vcpu_create`): refused unless the TD
    /// is INITIALIZED (-EIO). Its thread runs on `lp`.
    pub fn create_vcpu(&self, lp: Lp, guest: GuestProgram) -> KvmResult<usize> {
        let mut st = self.st.borrow_mut();
        if st.tdx.state != TdState::Initialized {
            return Err(Errno::EIO);
        }
        let idx = st.vcpus.len();
        st.vcpus.push(Vcpu {
            idx: VcpuIdx(idx as u32),
            lp,
            tdvpr: None,
            tdcx: Vec::new(),
            initialized: false,
            mode: GuestMode::OutsideGuest,
            requests: 0,
            root: None,
            mirror_root: None,
            signal_pending: false,
            pending_event: false,
            srcu: None,
            guest,
        });
        Ok(idx)
    }

    /// Replaces a vCPU's guest program (the scenario loads the next program).
    pub fn set_guest_program(&self, v: usize, guest: GuestProgram) {
        self.st.borrow_mut().vcpus[v].guest = guest;
    }
}

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
pub mod mmu_notifier;
pub mod requests;
pub mod teardown;
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
    EBADF,
    E2BIG,
    EAGAIN,
    ENOMEM,
    EFAULT,
    EBUSY,
    EEXIST,
    EINVAL,
    EOPNOTSUPP,
}

impl Errno {
    /// The positive errno value (asm-generic/errno-base.h, errno.h).
    pub const fn raw(self) -> u64 {
        match self {
            Errno::EPERM => 1,
            Errno::ENOENT => 2,
            Errno::EINTR => 4,
            Errno::EIO => 5,
            Errno::EBADF => 9,
            Errno::E2BIG => 7,
            Errno::EAGAIN => 11,
            Errno::ENOMEM => 12,
            Errno::EFAULT => 14,
            Errno::EBUSY => 16,
            Errno::EEXIST => 17,
            Errno::EINVAL => 22,
            Errno::EOPNOTSUPP => 95,
        }
    }
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

impl MmuInvalidate {
    /// An invalidation is in flight over `gfn` (`mmu_invalidate_in_progress` and the range
    /// `mmu_invalidate_retry_gfn` checks).
    pub fn in_flight_over(&self, gfn: Gfn) -> bool {
        self.in_progress > 0 && gfn >= self.start && gfn < self.end
    }
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
    /// The leaf whose injected failure (`inject_error`) this reports: the reporting task's
    /// last SEAMCALL failed by injection. Upstream's answer to a module failure, not a bug.
    pub injected: Option<crate::tdx_module::Leaf>,
}

/// Guest-visible memory events in the order they happen (for the guest-memory oracle).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemEvent {
    /// KVM_SET_MEMORY_ATTRIBUTES stored new attributes for `[start, end)`.
    Converted { start: Gfn, end: Gfn, private: bool },
    /// guest_memfd pages of `[start, end)` were punched out.
    PunchedHole { start: Gfn, end: Gfn },
    /// The memslot over `[start, end)` is gone.
    SlotDeleted { start: Gfn, end: Gfn },
    /// The mm dropped the VMM's pages behind the shared gfns `[start, end)`: they read zero.
    SharedDropped { start: Gfn, end: Gfn },
    /// KVM_TDX_INIT_MEM_REGION added `gfn` with `content` (TDH.MEM.PAGE.ADD): the guest
    /// finds it accepted.
    Added { gfn: Gfn, content: u64 },
}

/// Faults the scenario can inject into KVM (each models a kernel bug, for oracle tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmInjected {
    /// KVM_SET_MEMORY_ATTRIBUTES skips zapping the old mappings.
    pub skip_convert_zap: bool,
    /// vcpu_enter_guest enters without publishing IN_GUEST_MODE, so kicks miss the vCPU.
    pub skip_in_guest_mode: bool,
    /// Truncating a guest_memfd range drops its pages from the page cache without freeing
    /// them (a lost `folio_put`).
    pub truncate_without_free: bool,
    /// The MMU notifier's invalidation skips zapping the shared mappings.
    pub skip_notifier_zap: bool,
}

/// The kernel bugs `KvmInjected` can switch on, by name: for the oracle's evidence scenarios
/// (`inject_*` ops) and for campaigns that measure how fast a check finds one
/// (`tdxfuzz fuzz --kernel-bug`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelBug {
    SkipConvertZap,
    SkipInGuestMode,
    TruncateWithoutFree,
    NotifierWithoutZap,
}

impl KernelBug {
    pub const ALL: [KernelBug; 4] = [
        KernelBug::SkipConvertZap,
        KernelBug::SkipInGuestMode,
        KernelBug::TruncateWithoutFree,
        KernelBug::NotifierWithoutZap,
    ];

    /// The name on the command line (the `inject_*` op without its prefix).
    pub const fn name(self) -> &'static str {
        match self {
            KernelBug::SkipConvertZap => "skip_convert_zap",
            KernelBug::SkipInGuestMode => "skip_in_guest_mode",
            KernelBug::TruncateWithoutFree => "truncate_without_free",
            KernelBug::NotifierWithoutZap => "notifier_without_zap",
        }
    }

    pub fn from_name(s: &str) -> Option<KernelBug> {
        KernelBug::ALL.into_iter().find(|b| b.name() == s)
    }

    /// Switches the bug on.
    pub fn arm(self, i: &mut KvmInjected) {
        match self {
            KernelBug::SkipConvertZap => i.skip_convert_zap = true,
            KernelBug::SkipInGuestMode => i.skip_in_guest_mode = true,
            KernelBug::TruncateWithoutFree => i.truncate_without_free = true,
            KernelBug::NotifierWithoutZap => i.skip_notifier_zap = true,
        }
    }
}

/// One vCPU (`struct kvm_vcpu` + `struct vcpu_tdx`).
#[derive(Clone, Debug)]
pub struct Vcpu {
    pub idx: VcpuIdx,
    /// The pCPU its thread runs on.
    pub lp: Lp,
    /// `vcpu->cpu`: the pCPU it was last loaded on (set by `vcpu_load`, None = -1 once
    /// `tdx_disassociate_vp` ran). With an HKID assigned, Some also means the vCPU is on that
    /// pCPU's `associated_tdvcpus` list.
    pub cpu: Option<Lp>,
    pub tdvpr: Option<Pfn>,
    pub tdcx: Vec<Pfn>,
    /// `vcpu_tdx->state == VCPU_TD_STATE_INITIALIZED`.
    pub initialized: bool,
    pub mode: GuestMode,
    /// Guest-mode exits so far: a kick is acknowledged once the vCPU has left guest mode after
    /// it (the IPI was taken), whatever it does next.
    pub exits: u64,
    pub requests: u32,
    /// `mmu->root.hpa` (direct) and `mmu->mirror_root_hpa`.
    pub root: Option<SpId>,
    pub mirror_root: Option<SpId>,
    /// `vcpu->arch.mmu_shadow_page_cache` and `mmu_external_spt_cache`: pages topped up
    /// before mmu_lock, so that building page tables under it never allocates.
    pub mmu_caches: mmu::tdp_mmu::MmuCaches,
    pub signal_pending: bool,
    /// An interrupt or event is pending (`kvm_vcpu_has_events`).
    pub pending_event: bool,
    /// Inside `tdx_handle_ept_violation`'s local retry loop, past its first RET_PF_RETRY (for
    /// the oracle: such a vCPU is not re-entering the TD).
    pub ept_retrying: bool,
    /// The SRCU read section KVM_RUN holds outside guest mode.
    pub srcu: Option<SrcuIdx>,
    /// An in-flight TDG.VP.VMCALL<MapGPA> and its userspace exit.
    pub map_gpa: vmx::tdvmcall::VcpuMapGpa,
    pub guest: GuestProgram,
    /// `vcpu->mutex`: held by vCPU ioctls (KVM_PRE_FAULT_MEMORY) and, for every vCPU, by the
    /// TDX VM-state guard (`kvm_lock_all_vcpus`).
    pub mutex: Mutex,
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
    /// `kvm->created_vcpus` (under kvm->lock): counts vCPUs from the start of KVM_CREATE_VCPU,
    /// before they are online in `vcpus`.
    pub created_vcpus: u32,
    /// `kvm->max_vcpus` (KVM_CAP_MAX_VCPUS before KVM_TDX_INIT_VM; TD_PARAMS.MAX_VCPUS).
    pub max_vcpus: u32,
    /// `kvm->arch.hypercall_exit_enabled` (KVM_CAP_EXIT_HYPERCALL): bit n lets hypercall n
    /// exit to userspace.
    pub hypercall_exit_enabled: u64,
    pub bugged: bool,
    pub dead: bool,
    /// `kvm_vm_dead` came from the guest's own access to a page it never accepted (with
    /// SEPT_VE_DISABLE): upstream's chosen answer, not harm to the host.
    pub killed_by_guest: bool,
    /// The step at which `kvm_vm_dead` had made KVM_REQ_VM_DEAD and every vCPU had left guest
    /// mode: from then on every VM and vCPU ioctl must answer -EIO.
    pub dead_since: Option<u64>,
    /// TDH.VP.ENTERs issued after `dead_since`, as (step, vCPU): a dead VM's guest runs again.
    pub entered_after_dead: Vec<(u64, usize)>,
    pub bugs: Vec<BugReport>,
    /// Private pages a failed zap left behind: (gfn, pfn) whose BLOCK, REMOVE or WBINVD failed
    /// and bugged the VM. The S-EPT may still map the page (or its cache lines stay dirty) while
    /// guest_memfd frees it: upstream accepts that window once the VM is bugged ("KVM: TDX: Drop
    /// superfluous page pinning in S-EPT management").
    pub abandoned: Vec<(Gfn, Pfn)>,
    /// Guest-visible memory events with their steps.
    pub mem_log: Vec<(u64, MemEvent)>,
    pub injected: KvmInjected,
    /// Policy `sept_off_to_side` (seed 001): KVM's record of the S-EPT it built, instead of a
    /// mirror root. Empty under every other policy.
    pub sept_side: vmx::sept_off_to_side::SeptSide,
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
    /// `kvm->lock`: outermost lock of the TDX VM-state guard, and of KVM_CREATE_VCPU's
    /// bookkeeping. Order: kvm->lock, then every vcpu->mutex, then slots_lock.
    pub lock: Mutex,
    /// Policy `sept_off_to_side` (seed 001): the one lock every S-EPT change is made under.
    /// Innermost: taken after slots_lock, a guest_memfd's invalidate lock or mmu_lock; no vCPU
    /// takes it, so its holder may kick vCPUs and wait for them.
    pub sept_lock: Mutex,
    /// tdx.c's global `tdx_lock`: around TDH.MNG.CREATE in `__tdx_td_init` and the HKID release
    /// of `tdx_mmu_release_hkid` (one VM per run, so global and per-VM coincide).
    pub tdx_lock: Mutex,
    /// The scheduler, to register each vCPU's `vcpu->mutex` at KVM_CREATE_VCPU (`mutex_init`).
    sched: Ctx,
}

impl Kvm {
    /// A copy of this VM over `module` (a copy of this VM's module) and the scheduler `cx`
    /// (a fork of this VM's; its lock handles stay valid there): for `Stack::fork`.
    pub fn fork(&self, cx: &Ctx, module: Rc<TdxModule>) -> Rc<Kvm> {
        Rc::new(Kvm {
            st: RefCell::new(self.st.borrow().clone()),
            host: module.host().clone(),
            module,
            policy: self.policy,
            mmu_lock: self.mmu_lock,
            slots_lock: self.slots_lock,
            srcu: self.srcu,
            ipi_ack: self.ipi_ack,
            lock: self.lock,
            sept_lock: self.sept_lock,
            tdx_lock: self.tdx_lock,
            sched: cx.clone(),
        })
    }

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
                created_vcpus: 0,
                entered_after_dead: Vec::new(),
                max_vcpus: u32::from(crate::scenario::MAX_VCPUS),
                hypercall_exit_enabled: 0,
                killed_by_guest: false,
                dead_since: None,
                bugged: false,
                dead: false,
                bugs: Vec::new(),
                abandoned: Vec::new(),
                mem_log: Vec::new(),
                injected: KvmInjected::default(),
                sept_side: vmx::sept_off_to_side::SeptSide::default(),
            }),
            module,
            host,
            policy,
            mmu_lock: RwLock::new(cx, "mmu_lock"),
            slots_lock: Mutex::new(cx, "slots_lock"),
            srcu: Srcu::new(cx, "kvm->srcu"),
            ipi_ack: WaitQueue::new(cx, "ipi_ack"),
            lock: Mutex::new(cx, "kvm->lock"),
            sept_lock: Mutex::new(cx, "sept_lock"),
            tdx_lock: Mutex::new(cx, "tdx_lock"),
            sched: cx.clone(),
        })
    }

    /// `KVM_BUG_ON(cond, kvm)` / `TDX_BUG_ON(err, .., kvm)`: WARN, mark the VM bugged, then
    /// `kvm_vm_dead`. On a VM already bugged it does nothing
    /// (`WARN_ON_ONCE(cond && !(kvm)->vm_bugged)`).
    pub async fn bug(&self, cx: &Ctx, location: &'static str, what: String) {
        tracing::debug!(location, %what, "KVM_BUG_ON");
        {
            let mut st = self.st.borrow_mut();
            if st.bugged {
                return;
            }
            let injected = self.module.state().injected.calls.answering(cx.current());
            st.bugs.push(BugReport {
                step: cx.step(),
                location,
                what,
                fatal: true,
                injected,
            });
            st.bugged = true;
        }
        cx.note("KVM_BUG_ON", 0, 0);
        self.vm_dead(cx).await;
    }

    /// `WARN_ON_ONCE` (and `TDX_BUG_ON` without a VM): logged, the VM goes on.
    pub fn warn(&self, cx: &Ctx, location: &'static str, what: String) {
        let injected = self.module.state().injected.calls.answering(cx.current());
        self.st.borrow_mut().bugs.push(BugReport {
            step: cx.step(),
            location,
            what,
            fatal: false,
            injected,
        });
        cx.note("WARN", 0, 0);
    }

    /// `kvm_vm_dead`: `vm_dead`, then KVM_REQ_VM_DEAD to every vCPU, which is a waiting request:
    /// the caller kicks the vCPUs in guest mode and waits until each has left it.
    pub async fn vm_dead(&self, cx: &Ctx) {
        self.st.borrow_mut().dead = true;
        if self.policy.vm_dead_makes_request {
            self.make_all_cpus_request(cx, Request::VmDead).await;
        }
        let mut st = self.st.borrow_mut();
        st.dead_since.get_or_insert(cx.step());
    }

    /// `kvm_vm_ioctl`'s first check: -EIO on a dead VM (policy `vm_ioctls_ignore_dead` leaves
    /// it out of the memory ioctls).
    pub(crate) fn vm_ioctl_gate(&self) -> KvmResult<()> {
        if self.policy.vm_ioctls_check_dead && self.is_dead() {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// `kvm_vcpu_ioctl`'s first check: -EIO on a dead VM (policy `vcpu_ioctls_ignore_dead`
    /// leaves it out). Marks the task's ioctl as begun on a dead VM or not (`AfterDead`).
    pub(crate) fn vcpu_ioctl_gate(&self, cx: &Ctx) -> KvmResult<()> {
        let dead = self.ioctl_entry(cx);
        if dead && self.policy.vcpu_ioctls_check_dead {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// `kvm_vm_ioctl`'s first check for KVM_MEMORY_ENCRYPT_OP (the TD build ioctls): -EIO on a
    /// dead VM.
    pub(crate) fn vm_encrypt_op_gate(&self, cx: &Ctx) -> KvmResult<()> {
        if self.ioctl_entry(cx) {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// At an ioctl's entry: whether the VM is dead, told to the module's `AfterDead` record.
    fn ioctl_entry(&self, cx: &Ctx) -> bool {
        let dead = self.is_dead();
        self.module.note_ioctl_entry(cx.current(), dead);
        dead
    }

    /// `kvm->vm_dead` (set by `kvm_vm_dead` and by a KVM_BUG_ON).
    pub fn is_dead(&self) -> bool {
        self.st.borrow().dead
    }

    /// KVM_CREATE_VCPU (`kvm_vm_ioctl_create_vcpu` + `tdx_vcpu_create`) with no preemption
    /// point: -EINVAL at `kvm->max_vcpus`, refused unless the TD is INITIALIZED (-EIO). Its
    /// thread runs on `lp`.
    pub fn create_vcpu(&self, lp: Lp, guest: GuestProgram) -> KvmResult<usize> {
        {
            let st = self.st.borrow();
            if st.created_vcpus >= st.max_vcpus {
                return Err(Errno::EINVAL);
            }
        }
        self.st.borrow_mut().created_vcpus += 1;
        if let Err(e) = self.tdx_vcpu_create() {
            self.st.borrow_mut().created_vcpus -= 1;
            return Err(e);
        }
        Ok(self.vcpu_online(lp, guest))
    }

    /// KVM_CREATE_VCPU (`kvm_vm_ioctl_create_vcpu`) with the kernel's preemption points: -EIO
    /// on a dead VM (`kvm_vm_ioctl`), -EINVAL at `kvm->max_vcpus`, else
    /// `kvm->created_vcpus++` under kvm->lock, then `kvm_arch_vcpu_create` (-> `tdx_vcpu_create`,
    /// -EIO unless the TD is INITIALIZED) outside it, then online under kvm->lock again; a
    /// failure drops the count under kvm->lock. KVM_TDX_INIT_VM in the window sees the count
    /// (-EBUSY).
    pub async fn kvm_vm_ioctl_create_vcpu(
        &self,
        cx: &Ctx,
        lp: Lp,
        guest: GuestProgram,
    ) -> KvmResult<usize> {
        if self.is_dead() {
            return Err(Errno::EIO);
        }
        self.lock.lock(cx).await;
        let full = {
            let mut st = self.st.borrow_mut();
            let full = st.created_vcpus >= st.max_vcpus;
            if !full {
                st.created_vcpus += 1;
            }
            full
        };
        self.lock.unlock(cx).await;
        if full {
            return Err(Errno::EINVAL);
        }
        cx.yield_at("kvm_arch_vcpu_create").await;
        if let Err(e) = self.tdx_vcpu_create() {
            self.lock.lock(cx).await;
            self.st.borrow_mut().created_vcpus -= 1;
            self.lock.unlock(cx).await;
            return Err(e);
        }
        self.lock.lock(cx).await;
        let idx = self.vcpu_online(lp, guest);
        self.lock.unlock(cx).await;
        Ok(idx)
    }

    /// `tdx_vcpu_create`: no vCPU before KVM_TDX_INIT_VM or after KVM_TDX_FINALIZE_VM (-EIO).
    fn tdx_vcpu_create(&self) -> KvmResult<()> {
        if self.st.borrow().tdx.state != TdState::Initialized {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// The end of `kvm_vm_ioctl_create_vcpu`: the vCPU (with its `vcpu->mutex`, UNINITIALIZED
    /// for TDX) goes online.
    fn vcpu_online(&self, lp: Lp, guest: GuestProgram) -> usize {
        let mutex = Mutex::new(&self.sched, "vcpu->mutex");
        let mut st = self.st.borrow_mut();
        let idx = st.vcpus.len();
        st.vcpus.push(Vcpu {
            idx: VcpuIdx(idx as u32),
            lp,
            // kvm_arch_vcpu_create loads the vCPU once (vcpu_load/vcpu_put).
            cpu: Some(lp),
            tdvpr: None,
            tdcx: Vec::new(),
            initialized: false,
            mode: GuestMode::OutsideGuest,
            exits: 0,
            requests: 0,
            root: None,
            mirror_root: None,
            mmu_caches: Default::default(),
            signal_pending: false,
            pending_event: false,
            ept_retrying: false,
            srcu: None,
            map_gpa: Default::default(),
            guest,
            mutex,
        });
        idx
    }

    /// Replaces a vCPU's guest program (the scenario loads the next program).
    pub fn set_guest_program(&self, v: usize, guest: GuestProgram) {
        self.st.borrow_mut().vcpus[v].guest = guest;
    }
}

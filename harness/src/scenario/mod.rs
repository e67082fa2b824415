//! Scenarios: what a run does. A scenario is a set of tasks (the VMM's threads and the vCPUs'
//! guest programs), each a list of ops, plus a schedule (explicit directives, fuzz bytes, or
//! fair) and an optional `expect` line. Every byte string decodes to a valid scenario
//! (`decode.rs`) and every scenario prints to and parses from a text form (`text.rs`).

pub mod decode;
pub mod mutate;
pub mod text;
pub mod wire;

use crate::addr::Gfn;

/// Limits that keep every run bounded.
pub const MAX_VCPUS: u8 = 4;
pub const MAX_TASK_OPS: usize = 32;
pub const MAX_VMM_TASKS: u8 = 2;
/// The highest gfn a scenario may name: the stack's memslot covers `[0, 0x800)`; gfns from
/// 1 GiB (`HIGH_GFN`) up are reachable through another memslot, so that S-EPT tables hang
/// off a second 1G entry too.
pub const MAX_GFN: u64 = HIGH_GFN + 0x7ff;
/// The first gfn of the second 1 GiB region.
pub const HIGH_GFN: u64 = 0x40000;
/// The most pages one op may cover (the size of guest_memfd 0).
pub const MAX_NPAGES: u64 = crate::stack::GUEST_PAGES;
/// Memslot ids scenarios may use.
pub const MAX_SLOT_ID: u8 = 7;

/// A VMM thread's op (userspace ioctls and platform events).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmOp {
    /// KVM_SET_MEMORY_ATTRIBUTES over `[gfn, gfn + npages)`.
    Convert {
        gfn: Gfn,
        npages: u64,
        private: bool,
    },
    /// Deletes the memslot covering `gfn` (KVM_SET_USER_MEMORY_REGION2 with size 0).
    DeleteSlot { gfn: Gfn },
    /// Recreates the stack's memslot (slot 0 over all guest memory, bound to guest_memfd 0),
    /// as a VMM does when it remaps a region.
    CreateSlot,
    /// KVM_SET_USER_MEMORY_REGION2 creating slot `slot` over `[gfn, gfn + npages)`, bound to
    /// guest_memfd 0 at page offset `off` (the VMM's RAM stays mapped at the gfn's address).
    /// With `dirty_log`, the request also sets KVM_MEM_LOG_DIRTY_PAGES (refused for a
    /// guest_memfd slot). On an existing slot id it is a modify (move or flags change), which
    /// upstream refuses for guest_memfd slots ("private memslots are immutable").
    CreateSlotAt {
        slot: u8,
        gfn: Gfn,
        npages: u64,
        off: u64,
        dirty_log: bool,
    },
    /// fallocate(PUNCH_HOLE) on guest_memfd over `[gfn, gfn + npages)`.
    PunchHole { gfn: Gfn, npages: u64 },
    /// fallocate(KEEP_SIZE) (allocate) on guest_memfd over `[gfn, gfn + npages)`.
    Allocate { gfn: Gfn, npages: u64 },
    /// madvise(MADV_DONTNEED) of the VMM's guest RAM behind `[gfn, gfn + npages)`: the MMU
    /// notifier zaps the shared mappings, the pages are freed.
    DontNeed { gfn: Gfn, npages: u64 },
    /// KVM_PRE_FAULT_MEMORY on a vCPU, retried while it returns -EAGAIN; `shared` passes the
    /// shared alias of the range (a TD's aliases are refused with -EINVAL).
    Prefault {
        vcpu: u8,
        gfn: Gfn,
        npages: u64,
        shared: bool,
    },
    /// A signal to a vCPU thread (KVM_RUN returns -EINTR).
    Signal { vcpu: u8 },
    /// An interrupt for a vCPU (`kvm_vcpu_has_events`).
    Interrupt { vcpu: u8 },
    /// kvm_mmu_zap_all_fast (MMIO generation wrap / nx_huge_pages toggle).
    ZapAllFast,
    /// close() of the VMM's only fd of guest_memfd 0 while it is bound and in use: the last
    /// reference goes, `kvm_gmem_release` unbinds and zaps everything it maps.
    CloseGmem,
    /// KVM_TDX_INIT_VM (with the scenario's attributes and KVM_CAP_MAX_VCPUS).
    InitVm,
    /// KVM_CREATE_VCPU: the next vCPU index, on the logical processor of that index.
    CreateVcpu,
    /// KVM_TDX_INIT_VCPU on vCPU `vcpu` (-EBADF from userspace if it was never created).
    InitVcpu { vcpu: u8 },
    /// KVM_TDX_INIT_MEM_REGION on vCPU `vcpu`: one measured page at `gfn` with `value`.
    InitMemRegion { vcpu: u8, gfn: Gfn, value: u64 },
    /// KVM_TDX_FINALIZE_VM.
    Finalize,
    /// Fault injection: the vCPU has faulted past the zero-step threshold at `gfn`.
    ZeroStep { vcpu: u8, gfn: Gfn },
    /// Fault injection: the next call of `leaf` returns TDX_OPERAND_BUSY on `operand` (one of
    /// `tdx_module::BUSY_INJECTABLE`, with an operand it locks).
    InjectBusy {
        leaf: crate::tdx_module::Leaf,
        operand: crate::tdx_module::Operand,
    },
    /// Fault injection: the next call of `leaf` returns the non-BUSY error the module's
    /// handler of it can return (`tdx_module::ERROR_INJECTABLE`).
    InjectError { leaf: crate::tdx_module::Leaf },
    /// Fault injection: after `after` more host page allocations succeed, the next `n` fail
    /// (`after` > 0 fails an operation part way, e.g. a TDCX page after the TDVPR).
    AllocFail { n: u8, after: u8 },
    /// Fault injection (a kernel bug): KVM_SET_MEMORY_ATTRIBUTES stops zapping old mappings.
    InjectSkipConvertZap,
    /// Fault injection (a kernel bug): vCPUs enter the guest without IN_GUEST_MODE.
    InjectSkipInGuestMode,
    /// Fault injection (a kernel bug): truncating guest_memfd pages leaks them.
    InjectTruncateWithoutFree,
    /// Fault injection (a kernel bug): the MMU notifier does not zap shared mappings.
    InjectNotifierWithoutZap,
    /// Stop the vCPUs and destroy the VM (waits for every vCPU thread first).
    Destroy,
}

impl VmmOp {
    /// An op that injects a kernel bug (not a platform event or a module answer): evidence
    /// scenarios use these to show an oracle check firing.
    pub fn is_injected_kernel_bug(self) -> bool {
        matches!(
            self,
            VmmOp::InjectSkipConvertZap
                | VmmOp::InjectSkipInGuestMode
                | VmmOp::InjectTruncateWithoutFree
                | VmmOp::InjectNotifierWithoutZap
        )
    }

    /// A VM or vCPU ioctl (gated by `kvm->vm_dead` in `kvm_vm_ioctl` / `kvm_vcpu_ioctl`), as
    /// opposed to a file op on guest_memfd, a signal, a host event or an injected fault.
    pub fn is_kvm_ioctl(self) -> bool {
        matches!(
            self,
            VmmOp::Convert { .. }
                | VmmOp::DeleteSlot { .. }
                | VmmOp::CreateSlot
                | VmmOp::CreateSlotAt { .. }
                | VmmOp::Prefault { .. }
                | VmmOp::InitVm
                | VmmOp::CreateVcpu
                | VmmOp::InitVcpu { .. }
                | VmmOp::InitMemRegion { .. }
                | VmmOp::Finalize
        )
    }
}

/// A guest instruction of a vCPU's program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestStep {
    Accept {
        gfn: Gfn,
    },
    /// TDG.MEM.PAGE.ACCEPT at 2M of the region starting at `gfn` (unaligned: refused).
    AcceptHuge {
        gfn: Gfn,
    },
    /// TDG.MEM.PAGE.ACCEPT (4K) of a raw GPA: unaligned, with the shared bit, or beyond the
    /// GPA width (the module refuses each with TDX_OPERAND_INVALID).
    AcceptGpa {
        gpa: crate::addr::Gpa,
    },
    Read {
        gfn: Gfn,
        shared: bool,
    },
    Write {
        gfn: Gfn,
        shared: bool,
        value: u64,
    },
    MapGpa {
        gfn: Gfn,
        npages: u64,
        private: bool,
    },
}

/// Who runs a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TaskName {
    Vmm(u8),
    Vcpu(u8),
}

/// One task's ops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskOps {
    Vmm(Vec<VmmOp>),
    Guest(Vec<GuestStep>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub name: TaskName,
    pub ops: TaskOps,
}

/// How long a directive runs its task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirUntil {
    Steps(u32),
    Point(String),
    Blocked,
}

/// One explicit-schedule directive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dir {
    pub task: TaskName,
    pub until: DirUntil,
}

/// The interleaving.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Schedule {
    /// Round robin throughout.
    #[default]
    Fair,
    /// Choices read from bytes (fuzz input), then round robin.
    Bytes(Vec<u8>),
    /// Directives, then round robin.
    Script(Vec<Dir>),
}

/// The violation kinds an `expect violation` line may name.
pub const VIOLATION_KINDS: [&str; 6] = [
    "mirror_desync",
    "page_ownership",
    "must_not_fail",
    "liveness",
    "guest_memory",
    "state_machine",
];

/// The `expect` line.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Expect {
    #[default]
    None,
    Clean,
    /// A violation of this kind (its name, e.g. `must_not_fail`).
    Violation(String),
}

/// The TD configuration the VMM chooses at KVM_TDX_INIT_VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TdConfig {
    /// ATTRIBUTES.SEPT_VE_DISABLE: an access to a PENDING page exits to KVM (which kills the
    /// VM: `tdx_is_sept_violation_unexpected_pending`) instead of raising #VE in the guest.
    pub sept_ve_disable: bool,
    /// KVM_CAP_MAX_VCPUS before KVM_TDX_INIT_VM (`kvm->max_vcpus`, passed to the module as
    /// TD_PARAMS.MAX_VCPUS); None leaves KVM's default (the model's MAX_VCPUS).
    pub max_vcpus: Option<u8>,
    /// The TD build (INIT_VM, KVM_CREATE_VCPU, INIT_VCPU, memslot, attributes,
    /// INIT_MEM_REGION, FINALIZE) is VMM ops of the scenario, run under the scheduler and the
    /// oracle; false builds it before the run, as upstream's VMM does.
    pub build_ops: bool,
}

impl TdConfig {
    /// `init_vm->attributes`.
    pub fn attributes(self) -> u64 {
        if self.sept_ve_disable {
            crate::tdx_module::ATTR_SEPT_VE_DISABLE
        } else {
            0
        }
    }
}

/// How the VMM's vCPU threads behave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmmConfig {
    /// On KVM_EXIT_MEMORY_FAULT the VMM converts the aligned block of this many pages around
    /// the fault (QEMU converts the page the exit names: 1; a careless or hostile VMM more).
    pub fault_convert_pages: u64,
}

impl Default for VmmConfig {
    fn default() -> Self {
        VmmConfig {
            fault_convert_pages: 1,
        }
    }
}

/// Block sizes `vmm fault_convert N` may name: a page, a few, a 2M region.
pub const FAULT_CONVERT_BLOCKS: [u64; 3] = [1, 4, 512];

/// A whole scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    pub vcpus: u8,
    pub td: TdConfig,
    pub vmm: VmmConfig,
    /// Pages added at build time with TDH.MEM.PAGE.ADD (KVM_TDX_INIT_MEM_REGION), with content.
    pub init_pages: Vec<(Gfn, u64)>,
    pub tasks: Vec<Task>,
    pub schedule: Schedule,
    pub expect: Expect,
}

impl TaskName {
    /// The scheduler task name the runner gives it.
    pub fn label(self) -> String {
        match self {
            TaskName::Vmm(i) => format!("vmm{i}"),
            TaskName::Vcpu(i) => format!("vcpu{i}"),
        }
    }
}

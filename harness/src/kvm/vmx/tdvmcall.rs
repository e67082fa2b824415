//! TDG.VP.VMCALL<MapGPA> in KVM (arch/x86/kvm/vmx/tdx.c: `tdx_map_gpa`, `__tdx_map_gpa`,
//! `tdx_complete_vmcall_map_gpa`): validate the guest's range, hand it to userspace as
//! KVM_EXIT_HYPERCALL(KVM_HC_MAP_GPA_RANGE) in chunks of at most 2 MiB, and turn userspace's
//! answer into the TDVMCALL status the guest reads in R10 (with R11 the GPA to resume at).

use crate::addr::{Gpa, SHARED_BIT_GPAW48};
use crate::kvm::{Errno, Kvm, KvmResult};

/// TDVMCALL status codes returned in R10 (arch/x86/include/asm/shared/tdx.h).
pub mod status {
    pub const SUCCESS: u64 = 0;
    pub const RETRY: u64 = 1;
    pub const INVALID_OPERAND: u64 = 0x8000_0000_0000_0000;
    pub const ALIGN_ERROR: u64 = 0x8000_0000_0000_0002;
    pub const SUBFUNC_UNSUPPORTED: u64 = 0x8000_0000_0000_0003;
}

/// The TDVMCALL sub-function number the guest passes in R11 (`TDVMCALL_MAP_GPA`); R11 still
/// holds it when KVM completes the call without writing R11.
pub const TDVMCALL_MAP_GPA: u64 = 0x10001;

/// `KVM_HC_MAP_GPA_RANGE`, the bit userspace sets in KVM_CAP_EXIT_HYPERCALL.
pub const KVM_HC_MAP_GPA_RANGE: u32 = 12;

/// `TDX_MAP_GPA_MAX_LEN`: one userspace exit covers at most 2 MiB.
pub const MAP_GPA_MAX_LEN: u64 = 2 << 20;

/// The TD's CPUID.0x80000008:EAX[7:0] (`cpuid_maxphyaddr`), which `kvm_vcpu_is_legal_gpa`
/// checks against; the TDX module reports the platform's width (52 on the modelled host).
pub const GUEST_MAXPHYADDR: u32 = 52;

/// `run->hypercall` for KVM_HC_MAP_GPA_RANGE as KVM fills it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapGpaExit {
    /// args[0]: the chunk's GPA with the shared bit cleared.
    pub gpa: Gpa,
    /// args[1]: its length in pages.
    pub npages: u64,
    /// args[2]: KVM_MAP_GPA_RANGE_ENCRYPTED (to private) or DECRYPTED.
    pub to_private: bool,
}

/// What KVM keeps per vCPU for an in-flight MapGPA (`vcpu_tdx->map_gpa_next/end`, the
/// `complete_userspace_io` callback, and the `run->hypercall` area shared with userspace).
#[derive(Clone, Debug, Default)]
pub struct VcpuMapGpa {
    pub next: u64,
    pub end: u64,
    /// `vcpu->arch.complete_userspace_io == tdx_complete_vmcall_map_gpa`.
    pub complete_pending: bool,
    /// The exit KVM_RUN reports (taken when KVM_RUN returns).
    pub exit: Option<MapGpaExit>,
    /// `run->hypercall.ret`, written by userspace before the next KVM_RUN.
    pub ret: u64,
}

/// `vt_is_tdx_private_gpa` on a raw register value.
fn is_private(gpa: u64) -> bool {
    !Gpa::new(gpa).is_shared()
}

/// `kvm_vcpu_is_legal_gpa`.
fn legal(gpa: u64) -> bool {
    gpa >> GUEST_MAXPHYADDR == 0
}

impl Kvm {
    /// `tdx_map_gpa`: the TDVMCALL's operands R12 (`gpa`) and R13 (`size`). Returns 1 (re-enter
    /// with the status in R10 and R11 = `gpa`) for a refused call, 0 after preparing the first
    /// userspace exit.
    pub(crate) fn tdx_map_gpa(&self, v: usize, gpa: u64, size: u64) -> i32 {
        // The registers as the TD exit left them: R10 = TDX_HYPERCALL_STANDARD (0), R11 = the
        // sub-function; a completion that writes neither leaves the guest reading SUCCESS.
        self.set_tdvmcall_ret(v, status::SUCCESS, TDVMCALL_MAP_GPA);
        let enabled = self.st.borrow().hypercall_exit_enabled & (1 << KVM_HC_MAP_GPA_RANGE) != 0;
        let refused = if !enabled {
            Some(status::SUBFUNC_UNSUPPORTED)
        } else if gpa.wrapping_add(size) <= gpa
            || !legal(gpa)
            || !legal(gpa + size - 1)
            || is_private(gpa) != is_private(gpa + size - 1)
        {
            Some(status::INVALID_OPERAND)
        } else if !gpa.is_multiple_of(4096) || !size.is_multiple_of(4096) {
            Some(status::ALIGN_ERROR)
        } else {
            None
        };
        if let Some(code) = refused {
            self.set_tdvmcall_ret(v, code, gpa);
            return 1;
        }
        {
            let mut st = self.st.borrow_mut();
            let m = &mut st.vcpus[v].map_gpa;
            m.next = gpa;
            m.end = gpa + size;
        }
        self.tdx_map_gpa_exit(v);
        0
    }

    /// `__tdx_map_gpa`: the next chunk as KVM_EXIT_HYPERCALL, `ret` zeroed, completion armed.
    fn tdx_map_gpa_exit(&self, v: usize) {
        let mut st = self.st.borrow_mut();
        let m = &mut st.vcpus[v].map_gpa;
        let size = (m.end - m.next).min(MAP_GPA_MAX_LEN);
        m.exit = Some(MapGpaExit {
            gpa: Gpa::new(m.next & !SHARED_BIT_GPAW48),
            npages: size / 4096,
            to_private: is_private(m.next),
        });
        m.ret = 0;
        m.complete_pending = true;
    }

    /// `tdx_complete_vmcall_map_gpa`, run by the next KVM_RUN before entering the guest:
    /// userspace's 0 moves to the next chunk (another exit, or done: the guest reads SUCCESS);
    /// EAGAIN and EINVAL become RETRY and INVALID_OPERAND with R11 = the refused chunk; any
    /// other value fails KVM_RUN with -EINVAL and leaves the guest's registers as they were
    /// (R10 = 0). Between chunks a pending event stops the call with RETRY at the next chunk.
    pub(crate) fn tdx_complete_vmcall_map_gpa(&self, v: usize) -> KvmResult<i32> {
        let (ret, next, end) = {
            let st = self.st.borrow();
            let m = &st.vcpus[v].map_gpa;
            (m.ret, m.next, m.end)
        };
        let code = match ret {
            0 => None,
            r if r == Errno::EAGAIN.raw() => Some(status::RETRY),
            r if r == Errno::EINVAL.raw() => Some(status::INVALID_OPERAND),
            _ => return Err(Errno::EINVAL),
        };
        if let Some(code) = code {
            self.set_tdvmcall_ret(v, code, next);
            return Ok(1);
        }
        let next = next + MAP_GPA_MAX_LEN;
        self.st.borrow_mut().vcpus[v].map_gpa.next = next;
        if next >= end {
            return Ok(1);
        }
        if self.st.borrow().vcpus[v].pending_event {
            self.set_tdvmcall_ret(v, status::RETRY, next);
            return Ok(1);
        }
        self.tdx_map_gpa_exit(v);
        Ok(0)
    }

    /// `tdvmcall_set_return_code` plus `vp_enter_args.r11`: what the guest reads after entry.
    fn set_tdvmcall_ret(&self, v: usize, r10: u64, r11: u64) {
        self.st.borrow_mut().vcpus[v].guest.tdvmcall_regs = Some((r10, r11));
    }
}

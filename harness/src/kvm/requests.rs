//! vCPU requests and kicks (include/linux/kvm_host.h, virt/kvm/kvm_main.c).

use crate::sched::Ctx;

use super::Kvm;

/// `vcpu->mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMode {
    OutsideGuest,
    InGuest,
    ExitingGuest,
}

/// The requests the model uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    VmDead,
    MmuFreeObsoleteRoots,
    TlbFlush,
    /// KVM_REQ_OUTSIDE_GUEST_MODE: a kick only (KVM_REQUEST_NO_ACTION), nothing to process.
    OutsideGuestMode,
}

impl Request {
    pub const fn bit(self) -> u32 {
        match self {
            Request::VmDead => 1 << 0,
            Request::MmuFreeObsoleteRoots => 1 << 1,
            Request::TlbFlush => 1 << 2,
            Request::OutsideGuestMode => 0,
        }
    }

    /// KVM_REQUEST_WAIT: the sender waits until the vCPU has left guest mode.
    pub const fn waits(self) -> bool {
        matches!(
            self,
            Request::VmDead
                | Request::MmuFreeObsoleteRoots
                | Request::TlbFlush
                | Request::OutsideGuestMode
        )
    }
}

impl Kvm {
    /// `kvm_make_request`.
    pub fn make_request(&self, vcpu: usize, req: Request) {
        self.st.borrow_mut().vcpus[vcpu].requests |= req.bit();
    }

    /// `kvm_check_request`: test and clear.
    pub fn check_request(&self, vcpu: usize, req: Request) -> bool {
        let mut st = self.st.borrow_mut();
        let v = &mut st.vcpus[vcpu];
        let set = v.requests & req.bit() != 0;
        v.requests &= !req.bit();
        crate::coverage::hit(
            crate::coverage::Site::Request,
            u64::from(req.bit()),
            u64::from(set),
        );
        set
    }

    /// `kvm_test_request`: test only.
    pub fn test_request(&self, vcpu: usize, req: Request) -> bool {
        let set = self.st.borrow().vcpus[vcpu].requests & req.bit() != 0;
        crate::coverage::hit(
            crate::coverage::Site::Request,
            u64::from(req.bit()) << 32,
            u64::from(set),
        );
        set
    }

    /// `kvm_request_pending`.
    pub fn request_pending(&self, vcpu: usize) -> bool {
        self.st.borrow().vcpus[vcpu].requests != 0
    }

    /// `kvm_flush_remote_tlbs`: x86 has no `flush_remote_tlbs` hook for a TD, so this is
    /// KVM_REQ_TLB_FLUSH to every vCPU, waiting for those in guest mode to exit. (For private
    /// mappings the removal hook's TDH.MEM.TRACK and kick already flushed; upstream flushes
    /// anyway, and so does the model.)
    pub async fn kvm_flush_remote_tlbs(&self, cx: &Ctx) {
        self.make_all_cpus_request(cx, Request::TlbFlush).await;
    }

    /// `kvm_make_all_cpus_request`: set the request on every vCPU, kick those in guest mode
    /// (IN_GUEST_MODE -> EXITING_GUEST_MODE, the IPI), and for KVM_REQUEST_WAIT requests wait
    /// until every kicked vCPU has left guest mode.
    pub async fn make_all_cpus_request(&self, cx: &Ctx, req: Request) {
        // (vCPU, exits at kick time) for every vCPU in or entering guest mode.
        let kicked: Vec<(usize, u64)> = {
            let mut st = self.st.borrow_mut();
            let mut k = Vec::new();
            for (i, v) in st.vcpus.iter_mut().enumerate() {
                v.requests |= req.bit();
                if v.mode == GuestMode::InGuest {
                    v.mode = GuestMode::ExitingGuest;
                }
                if v.mode == GuestMode::ExitingGuest {
                    k.push((i, v.exits));
                }
            }
            k
        };
        cx.note(
            "kvm_make_all_cpus_request",
            req.bit().into(),
            kicked.len() as u64,
        );
        if req.waits() && !kicked.is_empty() {
            // smp_call_function_many(wait): every kicked CPU has taken the IPI, i.e. its vCPU
            // left guest mode at least once since the kick.
            self.ipi_ack
                .wait_until(cx, || {
                    let st = self.st.borrow();
                    kicked.iter().all(|(i, n)| st.vcpus[*i].exits > *n)
                })
                .await;
        }
    }
}

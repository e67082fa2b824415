//! The VMM in userspace: what a vCPU thread does with KVM_RUN's exits (QEMU-like): convert
//! the range of a KVM_EXIT_MEMORY_FAULT or of a MapGPA hypercall chunk (answering the
//! hypercall), retry -EINTR, run a vCPU again a couple of times after any other error, stop at
//! the end of the guest program or when errors persist.

use crate::kvm::x86::RunExit;
use crate::kvm::{Errno, Kvm};
use crate::sched::Ctx;

/// Where the VMM maps guest RAM in its address space (one contiguous anonymous mapping, as
/// QEMU's RAM block): gfn `g`'s shared page is at `GUEST_RAM_HVA + g * 4K` whatever memslot
/// covers it.
pub const GUEST_RAM_HVA: crate::addr::Hva = crate::addr::Hva::new(0x7f00_0000_0000);

/// How a vCPU thread ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadEnd {
    GuestDone,
    Error(Errno),
    /// KVM_RUN reported KVM_EXIT_INTERNAL_ERROR (with TDH.VP.ENTER's status); QEMU stops.
    InternalError(crate::tdx_module::Status),
    /// `build ops`: the VMM never created this vCPU, so its thread never ran.
    NoVcpu,
}

/// Conversions on KVM_EXIT_MEMORY_FAULT one vCPU thread makes before the VMM gives up on it.
/// A guest whose vCPUs use one page as private and shared at once makes the VMM convert it
/// back and forth for ever (QEMU would); that livelock is the guest's, so the model's VMM
/// stops the vCPU instead (-EFAULT, as for a fault it cannot resolve).
pub const MAX_FAULT_CONVERSIONS: u32 = 32;

/// Further KVM_RUNs a vCPU thread issues after KVM_RUN failed, before it stops: a careless VMM
/// runs a vCPU again after an error, and KVM must answer consistently (a dead VM -EIO again).
pub const MAX_RUN_AFTER_ERROR: u32 = 2;

/// A vCPU thread: KVM_RUN in a loop. A KVM_EXIT_MEMORY_FAULT converts the aligned block of
/// `fault_block` pages around the fault (1: exactly the page, as QEMU does).
pub async fn vcpu_thread(kvm: &Kvm, cx: &Ctx, v: usize, fault_block: u64) -> ThreadEnd {
    let mut conversions = 0;
    let mut run_after_error = 0;
    loop {
        match kvm.kvm_run(cx, v).await {
            Ok(RunExit::Done) => return ThreadEnd::GuestDone,
            Ok(RunExit::InternalError(status)) => return ThreadEnd::InternalError(status),
            Ok(RunExit::MemoryFault(f)) => {
                // Convert the page to what the guest accessed it as, then run again; a fault
                // outside every memslot is a guest error the VMM stops on.
                let gfn = f.gpa.gfn();
                let attrs_match = {
                    let st = kvm.st.borrow();
                    st.memslots.lookup(gfn).is_none() || st.attributes.is_private(gfn) == f.private
                };
                if attrs_match || conversions == MAX_FAULT_CONVERSIONS {
                    return ThreadEnd::Error(Errno::EFAULT);
                }
                conversions += 1;
                let start = crate::addr::Gfn::new(gfn.raw() / fault_block * fault_block);
                if let Err(e) = kvm
                    .set_memory_attributes(cx, start, start.add(fault_block), f.private)
                    .await
                {
                    return ThreadEnd::Error(e);
                }
            }
            Ok(RunExit::MapGpa(exit)) => {
                // Convert the chunk and answer in `run->hypercall.ret`: 0, or EAGAIN / EINVAL
                // (the two errors the GHCI mapping knows; every other failure is EINVAL).
                let gfn = exit.gpa.gfn();
                let r = kvm
                    .set_memory_attributes(cx, gfn, gfn.add(exit.npages), exit.to_private)
                    .await;
                let ret = match r {
                    Ok(()) => 0,
                    Err(Errno::EAGAIN) => Errno::EAGAIN.raw(),
                    Err(_) => Errno::EINVAL.raw(),
                };
                kvm.set_hypercall_ret(v, ret);
            }
            Err(Errno::EINTR) => {}
            Err(e) if run_after_error == MAX_RUN_AFTER_ERROR => return ThreadEnd::Error(e),
            Err(_) => run_after_error += 1,
        }
    }
}

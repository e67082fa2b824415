//! Memslots (virt/kvm/kvm_main.c): the active set readers see under `kvm->srcu`, with the
//! generation and the KVM_MEMSLOT_INVALID state of a slot being deleted or moved.

use crate::addr::{Gfn, Hva};
use crate::ids::{GmemId, PgOff, SlotId};

/// One slot (`struct kvm_memory_slot`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Memslot {
    pub id: SlotId,
    pub base_gfn: Gfn,
    pub npages: u64,
    /// KVM_MEMSLOT_INVALID: being deleted or moved.
    pub invalid: bool,
    /// KVM_MEM_GUEST_MEMFD binding: file and offset of `base_gfn`.
    pub gmem: Option<(GmemId, PgOff)>,
    /// `userspace_addr`: where the VMM's mapping behind the shared half starts. The pages are
    /// the VMM's (`Host::user`), not the slot's: they outlive it.
    pub userspace_addr: Hva,
}

impl Memslot {
    pub fn contains(&self, gfn: Gfn) -> bool {
        gfn >= self.base_gfn && gfn.raw() < self.base_gfn.raw() + self.npages
    }

    pub fn end(&self) -> Gfn {
        self.base_gfn.add(self.npages)
    }

    /// `__gfn_to_hva_memslot`.
    pub fn gfn_to_hva(&self, gfn: Gfn) -> Hva {
        self.userspace_addr
            .add_pages(gfn.offset_from(self.base_gfn))
    }

    /// The guest_memfd page offset of `gfn` (`kvm_gmem_get_index`).
    pub fn gmem_index(&self, gfn: Gfn) -> Option<(GmemId, PgOff)> {
        self.gmem
            .map(|(f, off)| (f, PgOff(off.0 + gfn.offset_from(self.base_gfn))))
    }
}

/// The active memslot set (`struct kvm_memslots`).
#[derive(Clone, Debug, Default)]
pub struct Memslots {
    pub generation: u64,
    pub slots: Vec<Memslot>,
}

impl Memslots {
    /// `__gfn_to_memslot` (INVALID slots included: the fault path checks the flag).
    pub fn lookup(&self, gfn: Gfn) -> Option<&Memslot> {
        self.slots.iter().find(|s| s.contains(gfn))
    }

    pub fn lookup_mut(&mut self, gfn: Gfn) -> Option<&mut Memslot> {
        self.slots.iter_mut().find(|s| s.contains(gfn))
    }

    pub fn by_id(&self, id: SlotId) -> Option<&Memslot> {
        self.slots.iter().find(|s| s.id == id)
    }

    pub fn by_id_mut(&mut self, id: SlotId) -> Option<&mut Memslot> {
        self.slots.iter_mut().find(|s| s.id == id)
    }
}

use crate::sched::Ctx;

use super::{Errno, Kvm, KvmResult};

impl Kvm {
    /// `kvm_swap_active_memslots`: publish, wait for every earlier SRCU reader
    /// (`synchronize_srcu_expedited`), bump the generation.
    async fn swap_active_memslots(&self, cx: &Ctx) {
        self.srcu.synchronize(cx).await;
        self.st.borrow_mut().memslots.generation += 2;
    }

    /// KVM_SET_USER_MEMORY_REGION2 creating slot `id` over `[base, base + npages)` bound to
    /// guest_memfd `gmem` at offset `off` (`kvm_set_memory_region` KVM_MR_CREATE with
    /// `kvm_gmem_bind`). Policy `sept_off_to_side` (seed 001) then maps the slot's private gfns
    /// if the TD is runnable.
    pub async fn create_memslot(
        &self,
        cx: &Ctx,
        id: SlotId,
        base: Gfn,
        npages: u64,
        gmem: Option<(GmemId, PgOff)>,
    ) -> KvmResult<()> {
        // kvm_vm_ioctl: a dead VM answers every VM ioctl with -EIO.
        self.vm_ioctl_gate()?;
        self.slots_lock.lock(cx).await;
        // kvm_gmem_bind stores the binding under the file's invalidate lock, so it waits for a
        // punch-hole in progress.
        let bind_lock = gmem.and_then(|(file, _)| self.open_gmem_invalidate_lock(cx, file));
        if let Some(l) = bind_lock {
            l.lock(cx).await;
        }
        let mut r = self.create_memslot_locked(id, base, npages, gmem);
        if let Some(l) = bind_lock {
            l.unlock(cx).await;
        }
        if r.is_ok() {
            self.swap_active_memslots(cx).await;
            if self.policy.sept_off_to_side && gmem.is_some() {
                r = self
                    .sept_side_populate(cx, base, base.add(npages), None)
                    .await;
            }
        }
        self.slots_lock.unlock(cx).await;
        r
    }

    /// The KVM_MR_CREATE checks of `kvm_set_memory_region` (no overlap, a free slot id, a
    /// guest_memfd range inside the file) and `kvm_gmem_bind`, with slots_lock held.
    fn create_memslot_locked(
        &self,
        id: SlotId,
        base: Gfn,
        npages: u64,
        gmem: Option<(GmemId, PgOff)>,
    ) -> KvmResult<()> {
        let mut st = self.st.borrow_mut();
        if npages == 0 || st.memslots.by_id(id).is_some() {
            return Err(Errno::EINVAL);
        }
        let end = base.add(npages);
        if st
            .memslots
            .slots
            .iter()
            .any(|s| s.base_gfn < end && base < s.end())
        {
            return Err(Errno::EEXIST);
        }
        if let Some((file, off)) = gmem {
            // kvm_gmem_bind: fget() of a closed fd fails; a file whose release is still
            // waiting for a syscall is not bound either (its bindings are about to go).
            let f = st.gmem.files.get(&file).ok_or(Errno::EINVAL)?;
            if f.fd_closed || f.closed {
                return Err(Errno::EBADF);
            }
            if off.0 + npages > f.npages {
                return Err(Errno::EINVAL);
            }
            let overlaps = st.memslots.slots.iter().any(|s| {
                s.gmem.is_some_and(|(g, o)| {
                    g == file && o.0 < off.0 + npages && off.0 < o.0 + s.npages
                })
            });
            // The newest kvm_gmem_bind (linux-mm @ 2da00299) answers -EEXIST; older trees
            // answered -EINVAL.
            if overlaps {
                return Err(Errno::EEXIST);
            }
        }
        st.memslots.slots.push(Memslot {
            id,
            base_gfn: base,
            npages,
            invalid: false,
            gmem,
            // The model's VMM maps guest RAM contiguously (crate::vmm::GUEST_RAM_HVA).
            userspace_addr: crate::vmm::GUEST_RAM_HVA.add_pages(base.raw()),
        });
        Ok(())
    }

    /// KVM_SET_USER_MEMORY_REGION2 with size 0: `kvm_set_memslot(KVM_MR_DELETE)` — install the
    /// INVALID copy and wait out SRCU readers, zap the range on every root
    /// (`kvm_mmu_zap_memslot`: TDX never fast-zaps), then remove the slot and wait again.
    pub async fn delete_memslot(&self, cx: &Ctx, id: SlotId) -> KvmResult<()> {
        self.vm_ioctl_gate()?;
        self.slots_lock.lock(cx).await;
        let range = {
            let mut st = self.st.borrow_mut();
            match st.memslots.by_id_mut(id) {
                Some(s) => {
                    s.invalid = true;
                    Some((s.base_gfn, s.end()))
                }
                None => None,
            }
        };
        let Some((start, end)) = range else {
            self.slots_lock.unlock(cx).await;
            return Err(Errno::EINVAL);
        };
        cx.note("memslot invalid", start.raw(), end.raw());
        self.swap_active_memslots(cx).await;
        self.kvm_mmu_zap_memslot(cx, start, end).await;
        let slot = {
            let mut st = self.st.borrow_mut();
            let i = st
                .memslots
                .slots
                .iter()
                .position(|s| s.id == id)
                .expect("slot");
            let slot = st.memslots.slots.remove(i);
            st.mem_log.push((
                cx.step(),
                super::MemEvent::SlotDeleted {
                    start: slot.base_gfn,
                    end: slot.end(),
                },
            ));
            slot
        };
        self.swap_active_memslots(cx).await;
        // kvm_free_memslot -> kvm_gmem_unbind: under the file's invalidate lock (none if the
        // file's release already unbound the slot), so the delete waits out a punch-hole. The
        // userspace memory behind the slot stays the VMM's.
        if let Some(l) = slot
            .gmem
            .and_then(|(file, _)| self.open_gmem_invalidate_lock(cx, file))
        {
            l.lock(cx).await;
            l.unlock(cx).await;
        }
        self.slots_lock.unlock(cx).await;
        Ok(())
    }

    /// `kvm_mmu_zap_memslot`: mmu_lock for write, unmap the slot's range on mirror, direct and
    /// invalid roots, flush remote TLBs if anything went. Policy `sept_off_to_side` (seed 001)
    /// unmaps the private pages under `sept_lock`.
    pub async fn kvm_mmu_zap_memslot(&self, cx: &Ctx, start: Gfn, end: Gfn) {
        self.mmu_lock.write(cx).await;
        if self
            .kvm_tdp_mmu_unmap_gfn_range(cx, start, end, true, true)
            .await
        {
            self.kvm_flush_remote_tlbs(cx).await;
        }
        self.mmu_lock.write_unlock(cx).await;
        if self.policy.sept_off_to_side {
            self.sept_side_unmap(cx, start, end).await;
        }
    }
}

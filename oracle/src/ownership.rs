//! `page_ownership`: no page owned twice, no page the TDX module holds handed to the kernel,
//! no reclaimed page reused before it was cleared (the ledger refuses each such move), the
//! module's PAMT and the host ledger agree, and after teardown every page is free or
//! deliberately leaked (or still the VMM's own memory).

use std::collections::BTreeMap;

use harness::addr::Pfn;
use harness::host::{Host, KernelUse, Owner};
use harness::kvm::Kvm;
use harness::tdx_module::ModuleState;

/// Full check at a quiescent point; `torn_down` adds the end-of-life accounting.
pub fn check(st: &ModuleState, host: &Host, torn_down: bool) -> Vec<String> {
    let mut bad = crate::module_invariants::check(st, host);
    if torn_down {
        for (p, e) in host.unaccounted() {
            bad.push(format!(
                "{p} neither free nor deliberately leaked after teardown: {:?}",
                e.owner
            ));
        }
    }
    bad
}

/// What a live structure holds a page as, for `unreachable`.
fn expected_owners(kvm: &Kvm, host: &Host) -> BTreeMap<Pfn, Owner> {
    let st = kvm.st.borrow();
    let mut held = BTreeMap::new();
    let mut hold = |p: Pfn, o: Owner| {
        held.insert(p, o);
    };
    // A released file's page cache is gone with its inode: pages still listed there leak.
    for (&file, g) in st.gmem.files.iter().filter(|(_, g)| !g.closed) {
        for (&index, &p) in &g.pages {
            hold(p, Owner::GuestMemfd { file, index });
        }
    }
    for sp in st.mmu.sps.values() {
        hold(sp.spt, Owner::Kernel(KernelUse::MmuPage));
        if let Some(e) = sp.external_spt {
            hold(e, Owner::Kernel(KernelUse::Sept));
        }
    }
    for &p in st.sept_side.tables.values() {
        hold(p, Owner::Kernel(KernelUse::Sept));
    }
    if let Some(p) = st.tdx.tdr {
        hold(p, Owner::Kernel(KernelUse::Tdr));
    }
    for &p in &st.tdx.tdcs {
        hold(p, Owner::Kernel(KernelUse::Tdcs));
    }
    for v in &st.vcpus {
        if let Some(p) = v.tdvpr {
            hold(p, Owner::Kernel(KernelUse::Tdvpr));
        }
        for &p in &v.tdcx {
            hold(p, Owner::Kernel(KernelUse::Tdcx));
        }
        for &p in &v.mmu_caches.shadow {
            hold(p, Owner::Kernel(KernelUse::MmuPage));
        }
        for &p in &v.mmu_caches.external {
            hold(p, Owner::Kernel(KernelUse::Sept));
        }
    }
    for p in host.user.pfns() {
        hold(p, Owner::Kernel(KernelUse::UserMemory));
    }
    held
}

/// Leak accounting at a quiescent point of a live VM (issue 11 item 6): every allocated page
/// is held, as what the ledger says it is, by something live (a guest_memfd's page cache, a
/// shadow page, a vCPU's MMU cache, the TD's or a vCPU's control pages, the VMM's memory).
/// A page nothing live holds is a leak the end-of-life accounting would only see after
/// teardown, or never if the VM lives on. Deliberately leaked pages are exempt.
pub fn unreachable(kvm: &Kvm, host: &Host) -> Vec<String> {
    let held = expected_owners(kvm, host);
    let mut bad: Vec<String> = host
        .ledger
        .iter()
        .filter(|(_, e)| !matches!(e.owner, Owner::Free | Owner::Leaked(_)))
        .filter(|(p, e)| held.get(p) != Some(&e.owner))
        .map(|(p, e)| match held.get(&p) {
            Some(o) => format!("{p} is {:?} in the ledger but held as {o:?}", e.owner),
            None => format!("{p} leaked: {:?} and nothing live holds it", e.owner),
        })
        .collect();
    bad.extend(mapped_but_not_held(kvm, &held));
    bad
}

/// Leaf SPTEs whose page is not what the mapping needs: a shared (direct-root) leaf maps one
/// of the VMM's pages, a private (mirror) leaf one of a guest_memfd's. Anything else is KVM
/// mapping a page it no longer has a right to (freed by the mm, punched, reused).
fn mapped_but_not_held(kvm: &Kvm, held: &BTreeMap<Pfn, Owner>) -> Vec<String> {
    let st = kvm.st.borrow();
    let mut bad = Vec::new();
    for sp in st.mmu.sps.values() {
        for (&i, &spte) in &sp.sptes {
            if !spte.is_present() || !spte.is_leaf() {
                continue;
            }
            let p = spte.pfn();
            let ok = match held.get(&p) {
                Some(Owner::Kernel(KernelUse::UserMemory)) => !sp.mirror,
                Some(Owner::GuestMemfd { .. }) => sp.mirror,
                _ => false,
            };
            if !ok {
                let root = if sp.mirror { "mirror" } else { "direct" };
                bad.push(format!(
                    "a {root} leaf at {} entry {i} maps {p}, held as {:?}",
                    sp.base,
                    held.get(&p)
                ));
            }
        }
    }
    bad
}

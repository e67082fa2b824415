//! `mirror_desync`: KVM's mirror root and the TDX module's S-EPT must describe the same
//! mappings. A present mirror non-leaf at (level, gfn) needs an S-EPT table entry there whose
//! page is the shadow page's `external_spt`; a present mirror leaf needs an S-EPT leaf with the
//! same pfn (MAPPED or PENDING, or BLOCKED while a removal holds mmu_lock for write); and the
//! reverse. A private leaf's pfn must be guest_memfd's page for that gfn. Frozen SPTEs are in
//! flight and skipped, unless `quiescent`, where a frozen SPTE is itself a desync (a lost
//! unfreeze).
//!
//! Under policy `sept_off_to_side` (seed 001) KVM keeps no mirror of private memory: the same
//! comparison runs against its side record (`SeptSide`, tables and 4K leaves), and any private
//! mapping in a mirror root is itself a desync (the design never faults private memory in).

use harness::addr::{Gfn, Pfn, PgLevel};
use harness::kvm::{Kvm, KvmState};
use harness::tdx_module::{SeptState, Td};

/// Every disagreement, as readable lines.
pub fn check(kvm: &Kvm, quiescent: bool) -> Vec<String> {
    let st = kvm.st.borrow();
    let Some(tdr) = st.tdx.tdr else {
        return Vec::new();
    };
    let module = kvm.module.state();
    let Some(td) = module.tds.get(&tdr) else {
        return Vec::new();
    };
    if st.tdx.hkid.is_none() {
        // After the HKID is released the S-EPT is being torn down.
        return Vec::new();
    }
    if kvm.policy.sept_off_to_side {
        return check_side(&st, td, quiescent);
    }
    let mut bad = Vec::new();
    let mirrors: Vec<_> = st
        .mmu
        .roots
        .iter()
        .copied()
        .filter(|r| st.mmu.get(*r).mirror && !st.mmu.get(*r).invalid)
        .collect();
    let mut seen_tables: Vec<(PgLevel, Gfn)> = Vec::new();
    let mut seen_leaves: Vec<(PgLevel, Gfn)> = Vec::new();
    for root in mirrors {
        for (level, gfn, child) in st.mmu.tables(root) {
            seen_tables.push((level, gfn));
            let Some(child) = child else {
                bad.push(format!(
                    "mirror table {level} {gfn} points at a freed page table"
                ));
                continue;
            };
            let ext = st.mmu.get(child).external_spt;
            check_table(&mut bad, td, "mirror", level, gfn, ext);
        }
        for (_, _, level, gfn, spte) in st.mmu.leaves(root, Gfn::new(0), Gfn::new(u64::MAX >> 12)) {
            seen_leaves.push((level, gfn));
            check_leaf(
                &mut bad,
                &st,
                td,
                "mirror",
                level,
                gfn,
                spte.pfn(),
                quiescent,
            );
        }
        if quiescent {
            for (sp, idx) in st.mmu.frozen() {
                let s = st.mmu.get(sp);
                if s.mirror {
                    bad.push(format!("mirror SPTE {idx} of table {sp:?} still FROZEN"));
                }
            }
        }
    }
    // Reverse: every S-EPT entry the mirror does not have.
    for (level, gfn, e) in td.sept.iter() {
        let known = if e.state.is_leaf() {
            seen_leaves.contains(&(level, gfn))
        } else {
            seen_tables.contains(&(level, gfn))
        };
        // A table entry whose mirror SPTE is frozen is in the middle of its hook.
        if !known && quiescent {
            bad.push(format!(
                "S-EPT {level} {gfn} {:?} with no mirror SPTE",
                e.state
            ));
        }
    }
    bad
}

/// The seed 001 design's version of the check: KVM's side record against the S-EPT, both ways,
/// with the same rules as the mirror (leaf states, pfns, guest_memfd pages, blocked leaves at a
/// quiescent point, reverse only when quiescent); no mirror root may map private memory.
fn check_side(st: &KvmState, td: &Td, quiescent: bool) -> Vec<String> {
    let mut bad = Vec::new();
    let side = &st.sept_side;
    for root in st.mmu.roots.iter().filter(|r| st.mmu.get(**r).mirror) {
        for (_, _, _, gfn, spte) in st.mmu.leaves(*root, Gfn::new(0), Gfn::new(u64::MAX >> 12)) {
            bad.push(format!(
                "mirror leaf {gfn} -> {} under sept_off_to_side (a private fault installed it)",
                spte.pfn()
            ));
        }
    }
    for (&(level, gfn), &page) in &side.tables {
        check_table(&mut bad, td, "side", level, gfn, Some(page));
    }
    for (&gfn, &pfn) in &side.leaves {
        check_leaf(&mut bad, st, td, "side", PgLevel::L4K, gfn, pfn, quiescent);
    }
    if quiescent {
        for (level, gfn, e) in td.sept.iter() {
            let known = if e.state.is_leaf() {
                level == PgLevel::L4K && side.leaves.contains_key(&gfn)
            } else {
                side.tables.contains_key(&(level, gfn))
            };
            if !known {
                bad.push(format!(
                    "S-EPT {level} {gfn} {:?} with no side record",
                    e.state
                ));
            }
        }
    }
    bad
}

/// A KVM-side table entry (`what`: mirror or side) at `level` covering `gfn`, whose S-EPT page
/// KVM believes is `page`: the S-EPT must have a mapped (or blocked) table there with that page.
fn check_table(
    bad: &mut Vec<String>,
    td: &Td,
    what: &str,
    level: PgLevel,
    gfn: Gfn,
    page: Option<Pfn>,
) {
    match td.sept.get(level, gfn) {
        Some(e) if matches!(e.state, SeptState::NlMapped | SeptState::NlBlocked) => {
            if Some(e.pfn) != page {
                bad.push(format!(
                    "{what} table {level} {gfn}: S-EPT page {} but KVM's {page:?}",
                    e.pfn
                ));
            }
        }
        other => bad.push(format!(
            "{what} table {level} {gfn} present, S-EPT {:?}",
            other.map(|e| e.state)
        )),
    }
}

/// A KVM-side private leaf `gfn -> pfn`: the S-EPT must map the same page (PENDING, MAPPED or
/// blocked, but not blocked at a quiescent point), and it must be guest_memfd's page for gfn.
#[allow(clippy::too_many_arguments)]
fn check_leaf(
    bad: &mut Vec<String>,
    st: &KvmState,
    td: &Td,
    what: &str,
    level: PgLevel,
    gfn: Gfn,
    pfn: Pfn,
    quiescent: bool,
) {
    match td.sept.get(level, gfn) {
        Some(e)
            if matches!(
                e.state,
                SeptState::Mapped
                    | SeptState::Pending
                    | SeptState::Blocked
                    | SeptState::PendingBlocked
            ) =>
        {
            if e.pfn != pfn {
                bad.push(format!("{what} leaf {gfn} -> {pfn}, S-EPT -> {}", e.pfn));
            }
            if quiescent && e.state.is_blocked() {
                bad.push(format!(
                    "S-EPT leaf {gfn} left {:?} at a quiescent point",
                    e.state
                ));
            }
        }
        other => bad.push(format!(
            "{what} leaf {gfn} present, S-EPT {:?}",
            other.map(|e| e.state)
        )),
    }
    let slot = st.memslots.lookup(gfn);
    let want = slot
        .and_then(|s| s.gmem_index(gfn))
        .and_then(|(f, i)| st.gmem.files.get(&f).and_then(|g| g.pages.get(&i)).copied());
    // kvm_gmem_release unbinds the slots (slot->gmem.file = NULL) before it zaps what the file
    // maps: until its zap reaches this leaf, the leaf maps a page the released file still
    // holds (its pages go at iput, after the zap).
    let releasing = !quiescent
        && slot.is_some_and(|s| s.gmem.is_none())
        && st
            .gmem
            .files
            .values()
            .any(|g| g.closed && g.pages.values().any(|&p| p == pfn));
    if want != Some(pfn) && !releasing {
        bad.push(format!(
            "{what} leaf {gfn} -> {pfn}, guest_memfd has {want:?}"
        ));
    }
}

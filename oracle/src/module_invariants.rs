//! Invariants of the TDX module's own bookkeeping, checked against the host ledger: every
//! S-EPT entry points at a page the PAMT records for that TD with the right type, no page is
//! mapped twice, the PAMT and the ledger agree on what the module holds, TDR child counts match,
//! and TLB-epoch counts match the running vCPUs. Used by the module fuzz target; the same
//! checks back `mirror_desync` and `page_ownership` once KVM drives the module.

use std::collections::BTreeMap;

use harness::addr::Pfn;
use harness::host::{Host, TdxPageKind};
use harness::tdx_module::{LockKey, ModuleState, PageType, VcpuState};

/// Every broken module invariant, as readable lines (empty = consistent).
pub fn check(st: &ModuleState, host: &Host) -> Vec<String> {
    let mut bad = Vec::new();
    // S-EPT entries -> PAMT.
    let mut mapped: BTreeMap<Pfn, String> = BTreeMap::new();
    for (tdr, td) in &st.tds {
        if td.lifecycle == harness::tdx_module::Lifecycle::Teardown {
            // After KEY.FREEID pages are reclaimed in any order: the S-EPT is dead.
            continue;
        }
        for (level, gfn, e) in td.sept.iter() {
            let want = if e.state.is_leaf() {
                PageType::Reg
            } else {
                PageType::Ept
            };
            let pages = if e.state.is_leaf() { level.pages() } else { 1 };
            for i in 0..pages {
                let p = e.pfn.add(i);
                let pe = st.pamt.get(p);
                if pe.pt != want || pe.owner != Some(*tdr) {
                    bad.push(format!(
                        "S-EPT {level} {gfn} ({:?}) -> {p}: PAMT says {:?} owned by {:?}",
                        e.state, pe.pt, pe.owner
                    ));
                }
                let here = format!("{level} {gfn}");
                if let Some(prev) = mapped.insert(p, here.clone()) {
                    bad.push(format!("{p} mapped twice: at {prev} and {here}"));
                }
            }
        }
    }
    // PAMT <-> ledger, and child counts.
    let mut children: BTreeMap<Pfn, u64> = BTreeMap::new();
    for (p, e) in st.pamt.iter() {
        let kind = match e.pt {
            PageType::Tdr => TdxPageKind::Tdr,
            PageType::Tdcx => TdxPageKind::Tdcx,
            PageType::Tdvpr => TdxPageKind::Tdvpr,
            PageType::Ept => TdxPageKind::Sept,
            PageType::Reg => TdxPageKind::Guest,
            PageType::Nda => continue,
        };
        if let Some(o) = e.owner {
            *children.entry(o).or_default() += 1;
        }
        match host.ledger.get(p) {
            Ok(le) => match le.tdx {
                Some(h) if h.kind == kind => {}
                other => bad.push(format!("{p}: PAMT {:?}, ledger hold {other:?}", e.pt)),
            },
            Err(err) => bad.push(format!("{p}: PAMT entry for a page the host lacks: {err}")),
        }
        if e.pt == PageType::Reg {
            // A REG page must be mapped by some S-EPT leaf (the module never keeps one unmapped).
            if !mapped.contains_key(&p) {
                bad.push(format!("{p}: PT_REG page mapped by no S-EPT leaf"));
            }
        }
    }
    for (p, le) in host.ledger.iter() {
        if le.tdx.is_some() && st.pamt.get(p).pt == PageType::Nda {
            bad.push(format!(
                "{p}: ledger says the module holds it, PAMT says NDA"
            ));
        }
    }
    for (tdr, td) in &st.tds {
        let n = children.get(tdr).copied().unwrap_or(0);
        if td.chldcnt != n {
            bad.push(format!(
                "TD {}: chldcnt {} but {n} child pages in the PAMT",
                td.id, td.chldcnt
            ));
        }
        // A TDH.VP.ENTER in flight (a READY vCPU whose TDVPR is held shared: a run that ran out
        // of steps can stop inside one) may or may not have counted itself in yet.
        let entering = st.vcpus.values().any(|v| {
            v.tdr == *tdr
                && v.state != VcpuState::Active
                && st
                    .locks
                    .word(LockKey::Pamt(v.tdvpr))
                    .is_some_and(|w| !w.readers.is_empty())
        });
        let active = st
            .vcpus
            .values()
            .filter(|v| v.tdr == *tdr && v.state == VcpuState::Active)
            .count() as u32;
        if !entering && td.refcount[0] + td.refcount[1] != active {
            bad.push(format!(
                "TD {}: epoch refcounts {:?} but {active} vCPUs inside",
                td.id, td.refcount
            ));
        }
    }
    for (step, e) in &host.refused {
        bad.push(format!("host refused at step {step}: {e}"));
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;
    use harness::tdx_module::drive::{run, teardown, ModuleProgram};

    #[test]
    fn consistent_after_build_and_silent() {
        let (p, s) = ModuleProgram::decode(&[]);
        let r = run(&p, s);
        assert!(check(&r.m.state(), &r.m.host().borrow()).is_empty());
    }

    #[test]
    fn fires_on_a_pamt_entry_the_ledger_does_not_know() {
        let (p, s) = ModuleProgram::decode(&[]);
        let r = run(&p, s);
        // Corrupt the host side: the ledger forgets that the module holds the TDR.
        let tdr = r.td.tdr;
        let _ = r.m.host().borrow_mut().ledger.module_release(tdr);
        let bad = check(&r.m.state(), &r.m.host().borrow());
        assert!(
            bad.iter().any(|b| b.contains("PAMT Tdr, ledger hold None")),
            "{bad:?}"
        );
        // And a double mapping made by hand: the same page behind two S-EPT leaves.
        let mut st = r.m.state().clone();
        let td = st.tds.get_mut(&tdr).unwrap();
        let e = harness::tdx_module::SeptEntry {
            state: harness::tdx_module::SeptState::Mapped,
            pfn: r.td.tdcs[0],
            accept_counter: 0,
        };
        td.sept
            .set(harness::addr::PgLevel::L4K, harness::addr::Gfn::new(1), e);
        td.sept
            .set(harness::addr::PgLevel::L4K, harness::addr::Gfn::new(2), e);
        let bad = check(&st, &r.m.host().borrow());
        assert!(bad.iter().any(|b| b.contains("mapped twice")), "{bad:?}");
        let _ = teardown;
    }
}

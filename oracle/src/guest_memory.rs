//! `guest_memory`: what the guest observes must match a simple reference model of the TDX
//! memory ABI, replayed in step order:
//! - a private page is readable only once accepted (TDG.MEM.PAGE.ACCEPT zeroes it) or added at
//!   build time with its content (KVM_TDX_INIT_MEM_REGION, logged as it happens); before that an access gives #VE;
//! - it then reads what the guest last wrote;
//! - a conversion to shared (by MapGPA or the VMM), a punched hole or a deleted memslot
//!   discards it: the next private access needs a new ACCEPT and reads zero;
//! - shared pages read what was last written through the shared alias: they are the VMM's
//!   memory, which outlives memslots (a slot deleted and re-created over the same userspace
//!   addresses shows the same data), and read zero until written.

use std::collections::BTreeMap;

use harness::addr::Gfn;
use harness::guest::Observation;
use harness::kvm::{Kvm, MemEvent};
use harness::tdx_module::Code;

#[derive(Clone, Copy, Debug, Default)]
struct PageModel {
    accepted: bool,
    content: u64,
    shared: u64,
}

enum Ev {
    Mem(MemEvent),
    Obs(usize, Observation),
}

/// Replays every observation against the reference model; returns the mismatches.
pub fn check(kvm: &Kvm) -> Vec<String> {
    let st = kvm.st.borrow();
    let mut evs: Vec<(u64, usize, Ev)> = Vec::new();
    for (i, (step, e)) in st.mem_log.iter().enumerate() {
        evs.push((*step, i, Ev::Mem(*e)));
    }
    for (v, vc) in st.vcpus.iter().enumerate() {
        for (i, (step, o)) in vc.guest.seen.iter().enumerate() {
            evs.push((*step, 1_000_000 * (v + 1) + i, Ev::Obs(v, *o)));
        }
    }
    evs.sort_by_key(|(s, i, _)| (*s, *i));
    let mut pages: BTreeMap<Gfn, PageModel> = BTreeMap::new();
    let mut bad = Vec::new();
    let discard = |pages: &mut BTreeMap<Gfn, PageModel>, start: Gfn, end: Gfn| {
        for p in pages.range_mut(start..end).map(|(_, p)| p) {
            p.accepted = false;
            p.content = 0;
        }
    };
    for (step, _, ev) in evs {
        match ev {
            Ev::Mem(MemEvent::Converted {
                start,
                end,
                private,
            }) => {
                if !private {
                    discard(&mut pages, start, end);
                }
            }
            Ev::Mem(MemEvent::PunchedHole { start, end }) => discard(&mut pages, start, end),
            Ev::Mem(MemEvent::SlotDeleted { start, end }) => discard(&mut pages, start, end),
            Ev::Mem(MemEvent::SharedDropped { start, end }) => {
                for p in pages.range_mut(start..end).map(|(_, p)| p) {
                    p.shared = 0;
                }
            }
            Ev::Mem(MemEvent::Added { gfn, content }) => {
                let p = pages.entry(gfn).or_default();
                p.accepted = true;
                p.content = content;
            }
            Ev::Obs(v, o) => {
                let who = format!("vcpu{v} at step {step}");
                match o {
                    Observation::Accepted { gpa, code } => {
                        let p = pages.entry(gpa.gfn()).or_default();
                        match code {
                            Code::Success => {
                                p.accepted = true;
                                p.content = 0;
                            }
                            Code::PageAlreadyAccepted if !p.accepted => bad.push(format!(
                                "{who}: ACCEPT of {} said already accepted, but it was discarded or never accepted",
                                gpa.gfn()
                            )),
                            _ => {}
                        }
                    }
                    Observation::AcceptedHuge { gpa, code } => {
                        // KVM maps TD memory at 4K only, so a 2M ACCEPT finds a table or a
                        // 4K leaf below; SUCCESS would accept and zero the whole region.
                        if code == Code::Success {
                            let base = gpa.gfn();
                            for i in 0..512 {
                                let p = pages.entry(base.add(i)).or_default();
                                p.accepted = true;
                                p.content = 0;
                            }
                        }
                    }
                    Observation::Read { gpa, value } if gpa.is_shared() => {
                        let p = pages.entry(gpa.gfn()).or_default();
                        if value != p.shared {
                            bad.push(format!(
                                "{who}: shared read of {} gave {value:#x}, expected {:#x}",
                                gpa.gfn(),
                                p.shared
                            ));
                        }
                    }
                    Observation::Wrote { gpa, value } if gpa.is_shared() => {
                        pages.entry(gpa.gfn()).or_default().shared = value;
                    }
                    Observation::Read { gpa, value } => {
                        let p = pages.entry(gpa.gfn()).or_default();
                        if !p.accepted {
                            bad.push(format!(
                                "{who}: private read of {} succeeded ({value:#x}) but the page is not accepted (expected #VE)",
                                gpa.gfn()
                            ));
                        } else if value != p.content {
                            bad.push(format!(
                                "{who}: private read of {} gave {value:#x}, expected {:#x}",
                                gpa.gfn(),
                                p.content
                            ));
                        }
                    }
                    Observation::Wrote { gpa, value } => {
                        let p = pages.entry(gpa.gfn()).or_default();
                        if !p.accepted {
                            bad.push(format!(
                                "{who}: private write to {} succeeded but the page is not accepted (expected #VE)",
                                gpa.gfn()
                            ));
                        }
                        p.content = value;
                    }
                    Observation::VirtualizationException { gpa } => {
                        let p = pages.entry(gpa.gfn()).or_default();
                        if p.accepted {
                            bad.push(format!("{who}: #VE on {}, which is accepted", gpa.gfn()));
                        }
                    }
                    Observation::MapGpa { .. } | Observation::Mmio { .. } => {}
                }
            }
        }
    }
    bad
}

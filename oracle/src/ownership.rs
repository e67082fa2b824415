//! `page_ownership`: no page owned twice, no page the TDX module holds handed to the kernel,
//! no reclaimed page reused before it was cleared (the ledger refuses each such move), the
//! module's PAMT and the host ledger agree, and after teardown every page is free or
//! deliberately leaked (or still the VMM's own memory).

use harness::host::Host;
use harness::tdx_module::ModuleState;

/// Refused moves since index `from` (cheap, for per-step checks).
pub fn refused_since(host: &Host, from: usize) -> Vec<String> {
    host.refused
        .iter()
        .skip(from)
        .map(|(step, e)| format!("host refused at step {step}: {e}"))
        .collect()
}

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

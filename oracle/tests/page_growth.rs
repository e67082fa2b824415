//! The host's page count may not grow across repeated cycles over the same range (issue 11
//! item 6): a metamorphic check. Each row is one cycle of VMM ops; the scenario runs it 2 and
//! 6 times and the pages in use at the quiescent end must be the same, on upstream. The same
//! rows under an injected kernel bug that keeps punched pages in guest_memfd's cache show the
//! count growing with the cycles (for the rows that punch).

use harness::host::Census;
use harness::policy::Policy;
use harness::run::RunConfig;
use harness::scenario::text::parse;
use harness::sched::TraceMode;
use oracle::check::run_scenario;

/// (cycle, what it exercises, whether it frees guest_memfd pages by punching)
const CYCLES: &[(&str, &str, bool)] = &[
    (
        "prefault vcpu0 0x10 1\n  punch_hole 0x10 1",
        "AUG by prefault, then BLOCK/TRACK/REMOVE and truncation",
        true,
    ),
    (
        "allocate 0x10 4\n  punch_hole 0x10 4",
        "fallocate into the page cache, then truncation",
        true,
    ),
    (
        "prefault vcpu0 0x11 2\n  convert 0x11 2 shared\n  convert 0x11 2 private",
        "a private mapping zapped by conversion, the page kept by guest_memfd",
        false,
    ),
    (
        "prefault vcpu0 0x12 1\n  zap_all_fast",
        "a fast zap obsoleting the roots, the next prefault loading new ones",
        false,
    ),
    (
        "prefault vcpu0 0x200 1\n  convert 0x200 1 shared\n  punch_hole 0x200 1\n  \
         convert 0x200 1 private",
        "a page in a second 2M region: its S-EPT table stays, the page goes",
        true,
    ),
];

/// Pages in use after `n` cycles (the run must be clean and reach its quiescent end).
fn in_use_after(cycle: &str, n: usize, inject: &str) -> (Census, Option<String>) {
    let mut text = format!("vcpus 1\ntask vmm0\n{inject}");
    for _ in 0..n {
        text.push_str(&format!("  {cycle}\n"));
    }
    let sc = parse(&text).unwrap_or_else(|e| panic!("{cycle}: {e}\n{text}"));
    let rep = run_scenario(&sc, &RunConfig::new(Policy::UPSTREAM, TraceMode::Full));
    let census = rep.run.stack.host.borrow().ledger.census();
    (census, rep.violation.map(|v| v.signature()))
}

#[test]
fn upstream_page_count_is_flat_across_repeated_cycles() {
    for &(cycle, what, _) in CYCLES {
        let (two, v2) = in_use_after(cycle, 2, "");
        let (six, v6) = in_use_after(cycle, 6, "");
        assert_eq!((v2, v6), (None, None), "{what}: clean runs");
        assert_eq!(
            two.in_use, six.in_use,
            "{what}: {two} after 2 cycles, {six} after 6"
        );
        assert_eq!(six.leaked, 0, "{what}");
    }
}

#[test]
fn a_kernel_that_keeps_punched_pages_grows_with_every_cycle() {
    let inject = "  inject_truncate_without_free\n";
    for &(cycle, what, punches) in CYCLES.iter().filter(|c| c.2) {
        let (two, _) = in_use_after(cycle, 2, inject);
        let (six, _) = in_use_after(cycle, 6, inject);
        assert!(punches);
        assert!(
            six.in_use > two.in_use,
            "{what}: {two} after 2 cycles, {six} after 6"
        );
    }
}

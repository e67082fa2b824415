//! Injected TDX_OPERAND_BUSY (issue 11 item 3, `inject_busy`): for every leaf BUSY can be
//! injected into and every operand it locks, upstream takes its BUSY path (the fault retried,
//! `tdh_do_no_vcpus`' kick and retry, VP.ENTER re-entered) and the run stays clean; the leaf
//! succeeds after the injected BUSY. One row per leaf; each runs once per operand.

use harness::policy::Policy;
use harness::run::RunConfig;
use harness::scenario::text::{parse, print};
use harness::sched::TraceMode;
use harness::tdx_module::{busy_operands, Leaf, BUSY_INJECTABLE};
use oracle::check::run_scenario;

/// A scenario that makes the leaf's next call come after the injection; `{inject}` is
/// replaced by the `inject_busy` line.
fn template(leaf: Leaf) -> &'static str {
    match leaf {
        // The guest's ACCEPT faults; the injection comes first.
        Leaf::MemPageAug | Leaf::VpEnter => {
            "vcpus 1\ntask vmm0\n  {inject}\ntask vcpu0\n  accept 0x10\n  write 0x10 0x5\n\
             schedule\n  vmm0 until blocked\nexpect clean\n"
        }
        // A page in a 2M region nothing mapped yet: the fault adds its 4K S-EPT table.
        Leaf::MemSeptAdd => {
            "vcpus 1\ntask vmm0\n  {inject}\ntask vcpu0\n  accept 0x400\n  read 0x400\n\
             schedule\n  vmm0 until blocked\nexpect clean\n"
        }
        // Converting an accepted page to shared zaps it: BLOCK, TRACK, REMOVE.
        Leaf::MemRangeBlock | Leaf::MemTrack | Leaf::MemPageRemove => {
            "vcpus 1\ntask vcpu0\n  accept 0x10\n  write 0x10 0x5\ntask vmm0\n  {inject}\n  \
             convert 0x10 1 shared\nschedule\n  vcpu0 until blocked\nexpect clean\n"
        }
        other => panic!("no template for {other}"),
    }
}

#[test]
fn upstream_survives_an_injected_busy_on_every_injectable_leaf_and_operand() {
    let mut rows = 0;
    for leaf in BUSY_INJECTABLE {
        for op in busy_operands(leaf) {
            let case = format!("{leaf} busy on {}", op.name());
            let inject = format!("inject_busy {leaf} {}", op.name());
            let text = template(leaf).replace("{inject}", &inject);
            let sc = parse(&text).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(parse(&print(&sc)).unwrap(), sc, "{case}: round trip");
            let rep = run_scenario(&sc, &RunConfig::new(Policy::UPSTREAM, TraceMode::Full));
            assert_eq!(
                rep.violation.as_ref().map(|v| v.signature()),
                None,
                "{case}"
            );
            assert_eq!(
                rep.run.stack.kvm.module.state().injected.calls.fired,
                1,
                "{case}: the injection fired"
            );
            // The leaf's trace notes: the injected BUSY, then a call that succeeded.
            let trace = rep.run.stack.ex.render_trace();
            let injected = trace
                .lines()
                .position(|l| l.contains("injected 0x80000200"))
                .unwrap_or_else(|| panic!("{case}: no injected note\n{trace}"));
            let ok = format!("{leaf} 0x0 ");
            assert!(
                trace.lines().skip(injected).any(|l| l.contains(&ok)),
                "{case}: {leaf} never succeeded after the injected BUSY\n{trace}"
            );
            rows += 1;
        }
    }
    assert!(rows >= 2 * BUSY_INJECTABLE.len(), "{rows} rows");
}

/// Malformed `inject_busy` lines: a leaf that cannot be injected into, an operand the leaf
/// does not lock, a missing operand.
#[test]
fn inject_busy_rejects_what_the_module_cannot_return() {
    let rows = [
        (
            "inject_busy TDH.MNG.CREATE RCX",
            "is not a leaf BUSY can be injected",
        ),
        ("inject_busy TDH.MEM.TRACK KOT", "does not lock `KOT`"),
        ("inject_busy TDH.MEM.PAGE.AUG", "expected an operand"),
        ("inject_busy TDH.MEM.PAGE.AUG SEPT_TREE RCX", ""),
    ];
    for (line, want) in rows {
        let text = format!("vcpus 1\ntask vmm0\n  {line}\n");
        let err = parse(&text).expect_err(line).to_string();
        assert!(err.contains("line 3"), "{line}: {err}");
        assert!(err.contains(want), "{line}: {err}");
    }
}

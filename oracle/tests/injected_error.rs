//! Injected SEAMCALL failures (issue 11 item 3, `inject_error`): for every leaf KVM calls, the
//! module returns a non-BUSY status its handler can return, and upstream's error path runs.
//! Each row names upstream's reaction (the VM bugged, a WARN and a leaked page, an exit to
//! userspace, an errno with no bug) and the oracle judges what the path leaves behind: clean
//! on upstream, the abandoned page accepted only where upstream bugs the VM.

use harness::kvm::Errno;
use harness::policy::Policy;
use harness::run::RunConfig;
use harness::scenario::text::{parse, print};
use harness::sched::TraceMode;
use harness::tdx_module::{Leaf, ERROR_INJECTABLE};
use harness::vmm::ThreadEnd;
use oracle::check::{run_scenario, Report};

/// The build as ops with the injection first; the guest runs once the TD is finalized.
const BUILD: &str = "vcpus 1\nbuild ops\ntask vmm0\n  {inject}\n  init_vm\n  create_slot\n  \
    create_vcpu\n  init_vcpu vcpu0\n  convert 0x30 1 private\n  init_mem_region vcpu0 0x30 0x7\n  \
    finalize\ntask vcpu0\n  accept 0x10\n  write 0x10 0x5\n  read 0x30\nexpect clean\n";
/// The guest's ACCEPT faults (AUG; VP.ENTER is the vCPU's first call after the injection).
const FAULT: &str = "vcpus 1\ntask vmm0\n  {inject}\ntask vcpu0\n  accept 0x10\n  \
    write 0x10 0x5\nschedule\n  vmm0 until blocked\nexpect clean\n";
/// A fault in a 2M region nothing mapped yet: SEPT.ADD of its 4K table.
const NEW_TABLE: &str = "vcpus 1\ntask vmm0\n  {inject}\ntask vcpu0\n  accept 0x400\n  \
    read 0x400\nschedule\n  vmm0 until blocked\nexpect clean\n";
/// An accepted page converted to shared and punched out, then teardown: the zap path.
const ZAP: &str = "vcpus 1\ntask vcpu0\n  accept 0x10\n  write 0x10 0x5\ntask vmm0\n  \
    {inject}\n  convert 0x10 1 shared\n  punch_hole 0x10 1\n  destroy\nschedule\n  \
    vcpu0 until blocked\nexpect clean\n";
/// Teardown of a TD whose guest touched a page.
const TEARDOWN: &str = "vcpus 1\ntask vcpu0\n  accept 0x10\n  write 0x10 0x5\ntask vmm0\n  \
    {inject}\n  destroy\nschedule\n  vcpu0 until blocked\nexpect clean\n";

/// Upstream's reaction to the failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reaction {
    /// KVM_BUG_ON / TDX_BUG_ON: the VM is bugged.
    Bugged,
    /// A WARN (TDX_BUG_ON without a VM); the page is leaked, the VM is not bugged.
    Warned,
    /// KVM_EXIT_INTERNAL_ERROR to userspace, nothing bugged.
    ExitToUser,
    /// An errno to the ioctl, nothing bugged (a user-supplied operand).
    Errno(Errno),
}

/// One row per leaf of `ERROR_INJECTABLE`: (leaf, scenario, upstream's reaction, upstream line).
const ROWS: &[(Leaf, &str, Reaction, &str)] = &[
    (
        Leaf::MngKeyConfig,
        BUILD,
        Reaction::Bugged,
        "__tdx_td_init: TDX_BUG_ON(TDH_MNG_KEY_CONFIG)",
    ),
    (
        Leaf::MngAddcx,
        BUILD,
        Reaction::Bugged,
        "__tdx_td_init: TDX_BUG_ON(TDH_MNG_ADDCX)",
    ),
    (
        Leaf::MngInit,
        BUILD,
        Reaction::Errno(Errno::EINVAL),
        "__tdx_td_init: TDX_OPERAND_INVALID from TDH.MNG.INIT -> -EINVAL, teardown",
    ),
    (
        Leaf::VpCreate,
        BUILD,
        Reaction::Bugged,
        "tdx_td_vcpu_init: TDX_BUG_ON(TDH_VP_CREATE)",
    ),
    (
        Leaf::VpAddcx,
        BUILD,
        Reaction::Bugged,
        "tdx_td_vcpu_init: TDX_BUG_ON(TDH_VP_ADDCX)",
    ),
    (
        Leaf::VpInit,
        BUILD,
        Reaction::Bugged,
        "tdx_td_vcpu_init: TDX_BUG_ON(TDH_VP_INIT)",
    ),
    (
        Leaf::MemPageAdd,
        BUILD,
        Reaction::Bugged,
        "tdx_mem_page_add: TDX_BUG_ON_2(TDH_MEM_PAGE_ADD)",
    ),
    (
        Leaf::MrExtend,
        BUILD,
        Reaction::Bugged,
        "tdx_gmem_post_populate: TDX_BUG_ON_2(TDH_MR_EXTEND)",
    ),
    (
        Leaf::MrFinalize,
        BUILD,
        Reaction::Bugged,
        "tdx_td_finalize: TDX_BUG_ON(TDH_MR_FINALIZE)",
    ),
    (
        Leaf::VpEnter,
        FAULT,
        Reaction::ExitToUser,
        "tdx_handle_exit: TDX_ERROR -> unhandled_exit",
    ),
    (
        Leaf::MemSeptAdd,
        NEW_TABLE,
        Reaction::Bugged,
        "tdx_sept_map_nonleaf_spte: TDX_BUG_ON_2",
    ),
    (
        Leaf::MemPageAug,
        FAULT,
        Reaction::Bugged,
        "tdx_mem_page_aug: TDX_BUG_ON_2(TDH_MEM_PAGE_AUG)",
    ),
    (
        Leaf::MemRangeBlock,
        ZAP,
        Reaction::Bugged,
        "tdx_sept_remove_leaf_spte: TDX_BUG_ON_2(BLOCK)",
    ),
    (
        Leaf::MemTrack,
        ZAP,
        Reaction::Bugged,
        "tdx_track: TDX_BUG_ON(TDH_MEM_TRACK)",
    ),
    (
        Leaf::MemPageRemove,
        ZAP,
        Reaction::Bugged,
        "tdx_sept_remove_leaf_spte: TDX_BUG_ON_2(REMOVE)",
    ),
    (
        Leaf::PhymemPageWbinvd,
        ZAP,
        Reaction::Bugged,
        "tdx_sept_remove_leaf_spte: TDX_BUG_ON(WBINVD)",
    ),
    (
        Leaf::VpFlush,
        TEARDOWN,
        Reaction::Bugged,
        "tdx_flush_vp_on_cpu: KVM_BUG_ON",
    ),
    (
        Leaf::MngVpflushdone,
        TEARDOWN,
        Reaction::Bugged,
        "tdx_mmu_release_hkid: TDX_BUG_ON(VPFLUSHDONE)",
    ),
    (
        Leaf::MngKeyFreeid,
        TEARDOWN,
        Reaction::Bugged,
        "tdx_hkid_free: TDX_BUG_ON(TDH_MNG_KEY_FREEID)",
    ),
    (
        Leaf::PhymemPageReclaim,
        TEARDOWN,
        Reaction::Warned,
        "__tdx_reclaim_page: TDX_BUG_ON_3(.., NULL)",
    ),
];

fn reaction(rep: &Report) -> Option<Reaction> {
    let kvm = &rep.run.stack.kvm;
    let st = kvm.st.borrow();
    if st.bugs.iter().any(|b| b.fatal) {
        return Some(Reaction::Bugged);
    }
    if st.bugs.iter().any(|b| !b.fatal) {
        return Some(Reaction::Warned);
    }
    let ends: Vec<_> = rep.run.thread_ends.iter().map(|e| e.get()).collect();
    if ends
        .iter()
        .any(|e| matches!(e, Some(ThreadEnd::InternalError(_))))
    {
        return Some(Reaction::ExitToUser);
    }
    rep.run
        .vmm_errors
        .borrow()
        .first()
        .map(|e| Reaction::Errno(e.errno))
}

fn run(leaf: Leaf, template: &str, policy: Policy) -> Report {
    let text = template.replace("{inject}", &format!("inject_error {leaf}"));
    let sc = parse(&text).unwrap_or_else(|e| panic!("{leaf}: {e}"));
    assert_eq!(parse(&print(&sc)).unwrap(), sc, "{leaf}: round trip");
    run_scenario(&sc, &RunConfig::new(policy, TraceMode::Full))
}

#[test]
fn upstream_answers_every_injected_failure_as_its_source_says_and_leaves_no_harm() {
    assert_eq!(
        ROWS.len(),
        ERROR_INJECTABLE.len(),
        "one row per injectable leaf"
    );
    for &(leaf, template, want, line) in ROWS {
        let rep = run(leaf, template, Policy::UPSTREAM);
        let failures = rep
            .run
            .stack
            .kvm
            .module
            .state()
            .injected
            .calls
            .failures
            .clone();
        assert_eq!(failures.len(), 1, "{leaf}: the injection fired once");
        assert_eq!(failures[0].leaf, leaf);
        assert_eq!(
            reaction(&rep),
            Some(want),
            "{leaf}: upstream's reaction ({line})"
        );
        assert_eq!(
            rep.violation.as_ref().map(|v| v.signature()),
            None,
            "{leaf}: upstream's aftermath is clean"
        );
    }
}

/// The abandoned page is accepted only because upstream bugs the VM: a kernel that merely
/// warns about a failed zap lets the VM run on and hands the page back to the host while the
/// TDX module still holds it.
#[test]
fn a_zap_failure_that_only_warns_hands_a_held_page_to_the_host() {
    let policy = Policy::by_name("zap_failure_warns_only").expect("policy");
    for leaf in [
        Leaf::MemRangeBlock,
        Leaf::MemPageRemove,
        Leaf::PhymemPageWbinvd,
    ] {
        let rep = run(leaf, ZAP, policy);
        let v = rep
            .violation
            .unwrap_or_else(|| panic!("{leaf}: no violation"));
        assert_eq!(
            v.kind.to_string(),
            "page_ownership",
            "{leaf}: {}",
            v.signature()
        );
        assert!(v.detail.contains("host refused"), "{leaf}: {}", v.detail);
    }
}

/// Malformed `inject_error` lines.
#[test]
fn inject_error_rejects_leaves_kvm_never_calls() {
    let rows = [
        (
            "inject_error TDH.MEM.RANGE.UNBLOCK",
            "is not a leaf an error can be injected into",
        ),
        (
            "inject_error TDG.MEM.PAGE.ACCEPT",
            "is not a leaf an error can be injected into",
        ),
        ("inject_error", "expected a SEAMCALL leaf"),
        ("inject_error TDH.MEM.TRACK RCX", ""),
    ];
    for (line, want) in rows {
        let text = format!("vcpus 1\ntask vmm0\n  {line}\n");
        let err = parse(&text).expect_err(line).to_string();
        assert!(err.contains("line 3"), "{line}: {err}");
        assert!(err.contains(want), "{line}: {err}");
    }
}

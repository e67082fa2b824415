//! The TD build as scenario ops (issue 11 item 7, `build ops`): KVM_TDX_INIT_VM,
//! KVM_CREATE_VCPU, KVM_TDX_INIT_VCPU, KVM_TDX_INIT_MEM_REGION and KVM_TDX_FINALIZE_VM run
//! under the scheduler and the oracle, in order, out of order, twice, from two threads, with
//! KVM_CAP_MAX_VCPUS; each answers upstream's errno, and the vCPU threads (which wait for the
//! machine to be ready) run, fail KVM_RUN, or never start. One row per case.

use harness::kvm::Errno;
use harness::policy::Policy;
use harness::run::RunConfig;
use harness::scenario::text::{parse, print};
use harness::sched::TraceMode;
use harness::vmm::ThreadEnd;
use oracle::check::run_scenario;

/// vCPU 0's program in every row: accept, write and read back a page.
const GUEST: &str = "task vcpu0\n  accept 0x10\n  write 0x10 0x5\n  read 0x10\n";
/// The upstream build up to KVM_TDX_FINALIZE_VM, with one vCPU.
const BUILD: &str = "  init_vm\n  create_vcpu\n  init_vcpu vcpu0\n  create_slot\n  \
                     convert 0x0 2048 private\n";

struct Row {
    name: &'static str,
    /// Header lines after `vcpus N` and `build ops`.
    header: &'static str,
    vcpus: u8,
    /// Text after vCPU 0's task (more tasks, vmm0's ops, a schedule).
    rest: String,
    errnos: &'static [Errno],
    ends: &'static [Option<ThreadEnd>],
}

const DONE: Option<ThreadEnd> = Some(ThreadEnd::GuestDone);
const NO_VCPU: Option<ThreadEnd> = Some(ThreadEnd::NoVcpu);

#[test]
fn build_ops_answer_upstreams_errnos() {
    let vmm = |ops: &str| format!("task vmm0\n{ops}");
    let rows = [
        Row {
            name: "in order",
            header: "",
            vcpus: 1,
            rest: vmm(&format!(
                "{BUILD}  init_mem_region vcpu0 0x20 0x77\n  finalize\n"
            )),
            errnos: &[],
            ends: &[DONE],
        },
        Row {
            name: "KVM_CREATE_VCPU before INIT_VM: tdx_vcpu_create -EIO (by design)",
            header: "",
            vcpus: 1,
            rest: vmm(&format!("  create_vcpu\n{BUILD}  finalize\n")),
            errnos: &[Errno::EIO],
            ends: &[DONE],
        },
        Row {
            name: "INIT_VM twice: -EINVAL",
            header: "",
            vcpus: 1,
            rest: vmm(&format!("  init_vm\n{BUILD}  finalize\n")),
            errnos: &[Errno::EINVAL],
            ends: &[DONE],
        },
        Row {
            name: "FINALIZE twice: -EINVAL",
            header: "",
            vcpus: 1,
            rest: vmm(&format!("{BUILD}  finalize\n  finalize\n")),
            errnos: &[Errno::EINVAL],
            ends: &[DONE],
        },
        Row {
            name: "KVM_CREATE_VCPU after FINALIZE: -EIO (by design); that vCPU never runs",
            header: "",
            vcpus: 2,
            rest: format!(
                "task vcpu1\n  read 0x11\n{}",
                vmm(&format!("{BUILD}  finalize\n  create_vcpu\n"))
            ),
            errnos: &[Errno::EIO],
            ends: &[DONE, NO_VCPU],
        },
        Row {
            name: "KVM_CAP_MAX_VCPUS 1: the second KVM_CREATE_VCPU is -EINVAL",
            header: "max_vcpus 1\n",
            vcpus: 2,
            rest: format!(
                "task vcpu1\n  read 0x11\n{}",
                vmm(&format!("{BUILD}  create_vcpu\n  finalize\n"))
            ),
            errnos: &[Errno::EINVAL],
            ends: &[DONE, NO_VCPU],
        },
        Row {
            name: "INIT_VCPU on a vCPU never created: no fd (-EBADF)",
            header: "",
            vcpus: 2,
            rest: vmm(&format!("{BUILD}  init_vcpu vcpu1\n  finalize\n")),
            errnos: &[Errno::EBADF],
            ends: &[DONE, None],
        },
        Row {
            name: "INIT_MEM_REGION after FINALIZE: -EINVAL",
            header: "",
            vcpus: 1,
            rest: vmm(&format!(
                "{BUILD}  finalize\n  init_mem_region vcpu0 0x20 0x7\n"
            )),
            errnos: &[Errno::EINVAL],
            ends: &[DONE],
        },
        Row {
            name: "no FINALIZE: KVM_RUN is -EINVAL (tried again twice)",
            header: "",
            vcpus: 1,
            rest: vmm(BUILD),
            errnos: &[],
            ends: &[Some(ThreadEnd::Error(Errno::EINVAL))],
        },
        Row {
            name: "destroyed half built: teardown frees everything",
            header: "",
            vcpus: 1,
            rest: vmm("  init_vm\n  create_vcpu\n  init_vcpu vcpu0\n  destroy\n"),
            errnos: &[],
            ends: &[Some(ThreadEnd::Error(Errno::EINVAL))],
        },
        Row {
            name: "no VMM thread: nothing builds, the vCPU thread finds no vCPU",
            header: "",
            vcpus: 1,
            rest: String::new(),
            errnos: &[],
            ends: &[NO_VCPU],
        },
        Row {
            name: "INIT_VM while another thread is inside KVM_CREATE_VCPU: -EBUSY",
            header: "",
            vcpus: 1,
            rest: "task vmm0\n  init_vm\ntask vmm1\n  create_vcpu\nschedule\n  \
                   vmm1 until kvm_arch_vcpu_create\n  vmm0 until blocked\n"
                .into(),
            errnos: &[Errno::EBUSY, Errno::EIO],
            ends: &[Some(ThreadEnd::NoVcpu)],
        },
    ];
    for r in rows {
        let text = format!(
            "vcpus {}\n{}build ops\n{GUEST}{}",
            r.vcpus, r.header, r.rest
        );
        let sc = parse(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", r.name));
        assert_eq!(parse(&print(&sc)).unwrap(), sc, "{}: round trip", r.name);
        let rep = run_scenario(&sc, &RunConfig::new(Policy::UPSTREAM, TraceMode::Ring(64)));
        assert_eq!(
            rep.violation.as_ref().map(|v| v.signature()),
            None,
            "{}",
            r.name
        );
        assert_eq!(rep.run.vmm_errnos(), r.errnos, "{}", r.name);
        let ends: Vec<_> = rep.run.thread_ends.iter().map(|e| e.get()).collect();
        assert_eq!(ends, r.ends, "{}", r.name);
    }
}

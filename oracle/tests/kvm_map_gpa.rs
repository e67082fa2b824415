//! TDG.VP.VMCALL<MapGPA> end to end (issue 17 item 9): the Linux guest's retry loop, KVM's
//! validation, 2 MiB chunking, completion from `run->hypercall.ret` and the event check
//! between chunks, and a VMM that answers each chunk from a script. One row per case.

use std::cell::RefCell;
use std::rc::Rc;

use harness::addr::Gpa;
use harness::guest::{GuestOp, GuestProgram, Observation, MAP_GPA_RETRIES_PER_PAGE};
use harness::kvm::vmx::tdvmcall::status;
use harness::kvm::x86::RunExit;
use harness::kvm::Errno;
use harness::policy::Policy;
use harness::sched::TraceMode;
use harness::stack::Stack;

const EAGAIN: u64 = 11;
const EINVAL: u64 = 22;
const MIB: u64 = 1 << 20;
const SHARED: u64 = 1 << 47;

/// What one MapGPA op did: the TDVMCALLs the guest issued, the userspace exits (gfn,
/// npages, to_private), KVM_RUN's errors, and the status the guest ended with.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    calls: u64,
    exits: Vec<(u64, u64, bool)>,
    errors: Vec<Errno>,
    status: Option<u64>,
}

struct Case {
    name: &'static str,
    cap: bool,
    pending_event: bool,
    gpa: u64,
    size: u64,
    /// `run->hypercall.ret` for each exit in turn (0 once the script runs out).
    answers: &'static [u64],
    want_calls: u64,
    want_exits: &'static [(u64, u64, bool)],
    want_errors: &'static [Errno],
    want_status: u64,
}

/// Runs vCPU 0 with the one op, answering exits from `answers`, KVM_RUN again after errors.
fn run(c: &Case) -> Seen {
    let mut s = Stack::new(Policy::UPSTREAM, 600, TraceMode::Full);
    s.build_runnable(1);
    if !c.cap {
        s.kvm.enable_cap_exit_hypercall(0).unwrap();
    }
    s.kvm.st.borrow_mut().vcpus[0].pending_event = c.pending_event;
    s.kvm.set_guest_program(
        0,
        GuestProgram::new(vec![GuestOp::MapGpa {
            gpa: Gpa::new(c.gpa),
            size: c.size,
        }]),
    );
    let out = Rc::new(RefCell::new(Seen::default()));
    let o = out.clone();
    let answers = c.answers.to_vec();
    s.run_setup(move |cx, kvm| async move {
        let mut next = answers.into_iter();
        for _ in 0..32 {
            match kvm.kvm_run(&cx, 0).await {
                Ok(RunExit::MapGpa(e)) => {
                    o.borrow_mut()
                        .exits
                        .push((e.gpa.gfn().raw(), e.npages, e.to_private));
                    kvm.set_hypercall_ret(0, next.next().unwrap_or(0));
                }
                Ok(RunExit::Done) => break,
                Ok(other) => panic!("unexpected exit {other:?}"),
                Err(e) => o.borrow_mut().errors.push(e),
            }
        }
    });
    let mut seen = out.take();
    // Every TDVMCALL is a guest-mode exit; so is the end of the program.
    seen.calls = s.kvm.st.borrow().vcpus[0].exits - 1;
    seen.status = s.kvm.st.borrow().vcpus[0]
        .guest
        .seen
        .iter()
        .find_map(|(_, o)| match o {
            Observation::MapGpa { status, .. } => Some(*status),
            _ => None,
        });
    seen
}

const fn case(name: &'static str, gpa: u64, size: u64) -> Case {
    Case {
        name,
        cap: true,
        pending_event: false,
        gpa,
        size,
        answers: &[],
        want_calls: 1,
        want_exits: &[],
        want_errors: &[],
        want_status: status::SUCCESS,
    }
}

#[test]
fn map_gpa_contract() {
    let retries = MAP_GPA_RETRIES_PER_PAGE as usize;
    assert_eq!(retries, 3, "the rows below spell out three attempts");
    let rows = [
        Case {
            cap: false,
            want_status: status::SUBFUNC_UNSUPPORTED,
            ..case("no KVM_CAP_EXIT_HYPERCALL", SHARED | 0x10_000, 4096)
        },
        Case {
            want_status: status::INVALID_OPERAND,
            ..case("size 0", SHARED | 0x10_000, 0)
        },
        Case {
            want_status: status::INVALID_OPERAND,
            ..case("wraps", u64::MAX - 4095, 8192)
        },
        Case {
            want_status: status::INVALID_OPERAND,
            ..case("beyond MAXPHYADDR", 1 << 52, 4096)
        },
        Case {
            want_status: status::INVALID_OPERAND,
            ..case("private and shared mixed", SHARED - 4096, 8192)
        },
        Case {
            want_status: status::ALIGN_ERROR,
            ..case("unaligned gpa", SHARED | 0x10_800, 4096)
        },
        Case {
            want_status: status::ALIGN_ERROR,
            ..case("unaligned size", SHARED | 0x10_000, 100)
        },
        Case {
            want_exits: &[(0x10, 1, false)],
            ..case("one shared page", SHARED | 0x10_000, 4096)
        },
        Case {
            want_exits: &[(0, 512, true), (512, 256, true)],
            ..case("3 MiB private in two chunks", 0, 3 * MIB)
        },
        Case {
            answers: &[EAGAIN, 0],
            want_calls: 2,
            want_exits: &[(0x10, 1, false), (0x10, 1, false)],
            ..case("EAGAIN once: the guest retries", SHARED | 0x10_000, 4096)
        },
        Case {
            answers: &[EAGAIN, EAGAIN, EAGAIN],
            want_calls: 3,
            want_exits: &[(0x10, 1, false), (0x10, 1, false), (0x10, 1, false)],
            want_status: status::RETRY,
            ..case(
                "EAGAIN three times: the guest gives up",
                SHARED | 0x10_000,
                4096,
            )
        },
        Case {
            answers: &[0, EAGAIN, 0],
            want_calls: 2,
            want_exits: &[(0, 512, true), (512, 256, true), (512, 256, true)],
            ..case("EAGAIN on the second chunk resumes there", 0, 3 * MIB)
        },
        Case {
            answers: &[EINVAL],
            want_exits: &[(0x10, 1, false)],
            want_status: status::INVALID_OPERAND,
            ..case("EINVAL", SHARED | 0x10_000, 4096)
        },
        Case {
            answers: &[7],
            want_exits: &[(0x10, 1, false)],
            want_errors: &[Errno::EINVAL],
            // KVM_RUN fails; the next one enters with R10 untouched: the guest reads SUCCESS.
            ..case("a value GHCI does not know", SHARED | 0x10_000, 4096)
        },
        Case {
            pending_event: true,
            want_calls: 2,
            want_exits: &[(0, 512, true), (512, 256, true)],
            ..case("an event between chunks: RETRY at the next", 0, 3 * MIB)
        },
    ];
    for c in &rows {
        let got = run(c);
        let want = Seen {
            calls: c.want_calls,
            exits: c.want_exits.to_vec(),
            errors: c.want_errors.to_vec(),
            status: Some(c.want_status),
        };
        assert_eq!(got, want, "{}", c.name);
    }
}

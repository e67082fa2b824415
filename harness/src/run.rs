//! Running a scenario: build the stack (upstream TD build), spawn one task per scenario task,
//! step the ops phase under the scenario's schedule, then a liveness phase under a fair
//! schedule until everything is done or the budget ends. An observer sees every step and may
//! stop the run (the oracle does, at the first violation).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::guest::{GuestOp, GuestProgram};
use crate::kvm::{Errno, GuestMode, KernelBug, Kvm};
use crate::policy::Policy;
use crate::scenario::{
    DirUntil, GuestStep, Scenario, Schedule, TaskName, TaskOps, TdConfig, VmmOp,
};
use crate::sched::{
    Completion, Ctx, Directive, InputChooser, Outcome, RoundRobin, Script, StepInfo, TaskId,
    TraceMode, Until,
};
use crate::stack::Stack;
use crate::vmm::{vcpu_thread, ThreadEnd};

thread_local! {
    /// Scheduler steps the last finished run took (`last_run_steps`).
    static LAST_RUN_STEPS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Scheduler steps of the last run this thread finished: a deterministic cost of the input
/// (the engine favours cheap inputs with it).
pub fn last_run_steps() -> u64 {
    LAST_RUN_STEPS.with(std::cell::Cell::get)
}

/// Windows of the liveness budget a run may spend while it still makes progress (SEAMCALLs
/// keep succeeding). Sixteen: policy `sept_off_to_side` unmapping hundreds of pages while
/// vCPUs keep re-entering needs six under the fuzzing memslot; only a run that keeps
/// succeeding SEAMCALLs spends more than one.
pub const LIVENESS_WINDOWS: u32 = 16;

/// Bounds of a run.
#[derive(Clone, Copy, Debug)]
pub struct RunConfig {
    pub policy: Policy,
    pub trace: TraceMode,
    /// Steps for the scenario's schedule.
    pub ops_budget: u64,
    /// Further steps under a fair schedule for the work still pending.
    pub liveness_budget: u64,
    pub host_pages: usize,
    /// A kernel bug switched on before the run starts (`tdxfuzz fuzz --kernel-bug`).
    pub kernel_bug: Option<KernelBug>,
    /// Pages of guest_memfd 0 and of the memslot the build binds.
    pub guest_pages: u64,
}

/// Memslot pages of a fuzzing run under policy `sept_off_to_side`: the decoder's pages at
/// 0x10-0x12 (three sharing a 4K table) stay inside it; those of the next 2M region at 0x200
/// are reached through memslots the ops create. The design maps and unmaps every page of its
/// memslots, so its cost grows with them: at 0x20 pages a campaign runs at about 60% of
/// upstream's rate, at 0x240 (both regions) at 7%.
pub const FUZZ_SIDE_GUEST_PAGES: u64 = 0x20;

impl RunConfig {
    /// The default bounds. Policy `sept_off_to_side` (seed 001) backs the whole memslot from
    /// the start, and a memslot delete, create or teardown unmaps or maps all of it (about 8
    /// steps a page, more while other tasks share the CPU): it gets the memory and the steps.
    pub fn new(policy: Policy, trace: TraceMode) -> Self {
        Self::with_guest_pages(policy, trace, crate::stack::GUEST_PAGES)
    }

    /// The bounds for a fuzzing run: as `new`, except that policy `sept_off_to_side` gets a
    /// memslot of `FUZZ_SIDE_GUEST_PAGES` (it maps and unmaps every page of it, which at full
    /// size costs 50 to 100 times an upstream run; `bench --sept` keeps the full size). Gfns
    /// past it have no memslot (their faults are emulated MMIO) and initial pages past it are
    /// not added.
    pub fn for_fuzzing(policy: Policy, trace: TraceMode) -> Self {
        let pages = if policy.sept_off_to_side {
            FUZZ_SIDE_GUEST_PAGES
        } else {
            crate::stack::GUEST_PAGES
        };
        Self::with_guest_pages(policy, trace, pages)
    }

    /// The bounds for a build memslot (and guest_memfd 0) of `guest_pages` pages.
    pub fn with_guest_pages(policy: Policy, trace: TraceMode, guest_pages: u64) -> Self {
        let side_pages = if policy.sept_off_to_side {
            guest_pages
        } else {
            0
        };
        RunConfig {
            policy,
            trace,
            ops_budget: 20_000,
            liveness_budget: 40_000 + 64 * side_pages,
            host_pages: 700 + side_pages as usize,
            kernel_bug: None,
            guest_pages,
        }
    }
}

/// A VMM op that failed, with KVM's TD state when it was issued and when it returned (the
/// errno table's context: another thread may move the state while the ioctl runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmmError {
    pub op: VmmOp,
    pub errno: Errno,
    pub td_state: crate::kvm::TdState,
    pub td_state_after: crate::kvm::TdState,
}

/// What VMM ioctls answered on a dead VM, when it was not -EIO.
pub type DeadAnswers = Rc<RefCell<Vec<(VmmOp, Result<(), Errno>)>>>;

/// A finished run, for the oracle's checks.
pub struct Run {
    pub stack: Stack,
    pub tasks: Vec<(TaskName, TaskId)>,
    /// How the ops phase ended, and how the run ended.
    pub ops_outcome: Outcome,
    pub outcome: Outcome,
    /// How each vCPU thread ended (None: still running or never started).
    pub thread_ends: Vec<Rc<Cell<Option<ThreadEnd>>>>,
    /// Errors the VMM's ioctls returned, with the op.
    pub vmm_errors: Rc<RefCell<Vec<VmmError>>>,
    /// VM and vCPU ioctls issued after the VM was dead (`Kvm::dead_since`) that did not
    /// answer -EIO, with what they answered.
    pub dead_vm_answers: DeadAnswers,
    /// Whether the VM was destroyed.
    pub destroyed: Rc<Cell<bool>>,
    schedule: Schedule,
    cfg: RunConfig,
}

fn guest_program(ops: &[GuestStep]) -> GuestProgram {
    GuestProgram::new(
        ops.iter()
            .map(|s| match *s {
                GuestStep::Accept { gfn } => GuestOp::Accept { gpa: gfn.gpa() },
                GuestStep::AcceptHuge { gfn } => GuestOp::AcceptHuge { gpa: gfn.gpa() },
                GuestStep::AcceptGpa { gpa } => GuestOp::Accept { gpa },
                GuestStep::Read { gfn, shared } => GuestOp::Read {
                    gpa: if shared {
                        gfn.gpa().to_shared()
                    } else {
                        gfn.gpa()
                    },
                },
                GuestStep::Write { gfn, shared, value } => GuestOp::Write {
                    gpa: if shared {
                        gfn.gpa().to_shared()
                    } else {
                        gfn.gpa()
                    },
                    value,
                },
                GuestStep::MapGpa {
                    gfn,
                    npages,
                    private,
                } => GuestOp::MapGpa {
                    gpa: if private {
                        gfn.gpa()
                    } else {
                        gfn.gpa().to_shared()
                    },
                    size: npages * 4096,
                },
            })
            .collect(),
    )
}

/// An `inject_*` op: the kernel bug is on from now.
fn arm(kvm: &Kvm, bug: KernelBug) -> Result<(), Errno> {
    bug.arm(&mut kvm.st.borrow_mut().injected);
    Ok(())
}

/// Marks a vCPU signalled or interrupted and kicks it out of guest mode (`kvm_vcpu_kick`).
fn kick(kvm: &Kvm, v: usize, signal: bool) {
    let mut st = kvm.st.borrow_mut();
    let Some(vc) = st.vcpus.get_mut(v) else {
        return;
    };
    if signal {
        vc.signal_pending = true;
    } else {
        vc.pending_event = true;
    }
    if vc.mode == GuestMode::InGuest {
        vc.mode = GuestMode::ExitingGuest;
    }
}

/// One VMM op. `td` is the scenario's TD configuration (KVM_TDX_INIT_VM's arguments);
/// `machine_ready` lets the vCPU threads run (`build ops`).
async fn vmm_op(
    kvm: &Kvm,
    cx: &Ctx,
    op: VmmOp,
    td: TdConfig,
    machine_ready: Completion,
) -> Result<(), Errno> {
    cx.yield_at("vmm op").await;
    match op {
        VmmOp::Convert {
            gfn,
            npages,
            private,
        } => {
            kvm.set_memory_attributes(cx, gfn, gfn.add(npages), private)
                .await
        }
        VmmOp::DeleteSlot { gfn } => {
            let id = kvm.st.borrow().memslots.lookup(gfn).map(|s| s.id);
            match id {
                Some(id) => kvm.delete_memslot(cx, id).await,
                // No slot there: the dead-VM check still comes first.
                None => kvm.vm_ioctl_gate().and(Err(Errno::EINVAL)),
            }
        }
        VmmOp::CreateSlotAt {
            dirty_log: true, ..
        } => {
            // check_memory_region_flags: "Dirty logging private memory is not currently
            // supported" (after the dead-VM check of kvm_vm_ioctl).
            kvm.vm_ioctl_gate()?;
            Err(Errno::EINVAL)
        }
        VmmOp::CreateSlotAt {
            slot,
            gfn,
            npages,
            off,
            dirty_log: false,
        } => {
            kvm.create_memslot(
                cx,
                crate::ids::SlotId(u16::from(slot)),
                gfn,
                npages,
                Some((crate::ids::GmemId(0), crate::ids::PgOff(off))),
            )
            .await
        }
        VmmOp::CreateSlot => {
            // Slot 0 over the whole of guest_memfd 0.
            let file = crate::ids::GmemId(0);
            let pages = kvm
                .st
                .borrow()
                .gmem
                .files
                .get(&file)
                .map_or(0, |g| g.npages);
            kvm.create_memslot(
                cx,
                crate::ids::SlotId(0),
                crate::addr::Gfn::new(0),
                pages,
                Some((file, crate::ids::PgOff(0))),
            )
            .await
        }
        VmmOp::PunchHole { gfn, npages } => {
            // fallocate() on the VMM's guest_memfd fd: the file backs gfn g at offset g (slot 0
            // binds it at 0), whether or not a memslot is bound right now.
            let file = crate::ids::GmemId(0);
            kvm.kvm_gmem_punch_hole(cx, file, crate::ids::PgOff(gfn.raw()), npages)
                .await
        }
        VmmOp::DontNeed { gfn, npages } => {
            let hva = crate::vmm::GUEST_RAM_HVA.add_pages(gfn.raw());
            kvm.kvm_mmu_notifier_invalidate_range(cx, hva, npages).await;
            Ok(())
        }
        VmmOp::Allocate { gfn, npages } => {
            let file = crate::ids::GmemId(0);
            kvm.kvm_gmem_allocate(cx, file, crate::ids::PgOff(gfn.raw()), npages)
                .await
        }
        VmmOp::Prefault { vcpu, .. }
        | VmmOp::InitVcpu { vcpu }
        | VmmOp::InitMemRegion { vcpu, .. }
            if kvm.st.borrow().vcpus.len() <= usize::from(vcpu) =>
        {
            // No vCPU fd to issue the ioctl on (KVM_CREATE_VCPU never returned one).
            Err(Errno::EBADF)
        }
        VmmOp::InitVm => {
            let (max_vcpus, attributes) = {
                let st = kvm.st.borrow();
                (st.max_vcpus, td.attributes())
            };
            kvm.tdx_td_init_attrs(cx, crate::ids::Hkid(32), max_vcpus, attributes)
                .await
        }
        VmmOp::CreateVcpu => {
            // The thread of vCPU n runs on logical processor n (the module has four).
            let lp = crate::tdx_module::Lp((kvm.st.borrow().created_vcpus % 4) as u8);
            kvm.kvm_vm_ioctl_create_vcpu(cx, lp, GuestProgram::default())
                .await
                .map(|_| ())
        }
        VmmOp::InitVcpu { vcpu } => kvm.tdx_td_vcpu_init(cx, usize::from(vcpu)).await,
        VmmOp::InitMemRegion { vcpu, gfn, value } => {
            kvm.tdx_vcpu_init_mem_region(cx, usize::from(vcpu), gfn.gpa(), value, 1, true)
                .await
        }
        VmmOp::Finalize => {
            let r = kvm.tdx_td_finalize(cx).await;
            if r.is_ok() {
                // QEMU starts running its vCPUs once the machine is ready.
                machine_ready.complete_all(cx).await;
            }
            r
        }
        VmmOp::Prefault {
            vcpu,
            gfn,
            npages,
            shared,
        } => loop {
            let gpa = if shared {
                gfn.gpa().to_shared()
            } else {
                gfn.gpa()
            };
            match kvm
                .kvm_vcpu_pre_fault_memory(cx, usize::from(vcpu), gpa, npages << 12)
                .await
            {
                // Userspace retries -EAGAIN (a memslot update was in flight).
                Err(Errno::EAGAIN) => cx.yield_at("prefault: retry").await,
                r => break r.map(|_| ()),
            }
        },
        VmmOp::Signal { vcpu } => {
            kick(kvm, usize::from(vcpu), true);
            Ok(())
        }
        VmmOp::Interrupt { vcpu } => {
            kick(kvm, usize::from(vcpu), false);
            Ok(())
        }
        VmmOp::ZapAllFast => {
            kvm.kvm_mmu_zap_all_fast(cx).await;
            Ok(())
        }
        VmmOp::CloseGmem => kvm.gmem_close(cx, crate::ids::GmemId(0)).await,
        VmmOp::ZeroStep { vcpu, gfn } => {
            // The module logs only GPAs the instruction at RIP took hardware EPT violations on
            // (td_exit_epf_stepping_log, called from td_ept_violation.c): inject only when the
            // vCPU's current instruction is a load or store of this private gfn. TDG.MEM.PAGE.
            // ACCEPT's exits (async_tdexit_ept_violation) are not logged.
            let target = {
                let st = kvm.st.borrow();
                st.vcpus.get(usize::from(vcpu)).and_then(|v| {
                    let touches = match v.guest.ops.get(v.guest.pc) {
                        Some(GuestOp::Read { gpa }) | Some(GuestOp::Write { gpa, .. }) => {
                            !gpa.is_shared() && gpa.gfn() == gfn
                        }
                        _ => false,
                    };
                    v.tdvpr.filter(|_| touches)
                })
            };
            if let Some(t) = target {
                kvm.module.inject_zero_step(t, gfn.gpa());
            }
            Ok(())
        }
        VmmOp::AllocFail { n, after } => {
            kvm.host
                .borrow_mut()
                .ledger
                .inject_alloc_failures(u32::from(after), u32::from(n));
            Ok(())
        }
        VmmOp::InjectBusy { leaf, operand } => {
            kvm.module.inject(|i| i.calls.arm(leaf, operand));
            Ok(())
        }
        VmmOp::InjectError { leaf } => {
            kvm.module.inject(|i| {
                i.calls.arm_error(leaf);
            });
            Ok(())
        }
        VmmOp::InjectNotifierWithoutZap => arm(kvm, KernelBug::NotifierWithoutZap),
        VmmOp::InjectTruncateWithoutFree => arm(kvm, KernelBug::TruncateWithoutFree),
        VmmOp::InjectSkipConvertZap => arm(kvm, KernelBug::SkipConvertZap),
        VmmOp::InjectSkipInGuestMode => arm(kvm, KernelBug::SkipInGuestMode),
        VmmOp::Destroy => {
            // The caller has waited for every vCPU and VMM thread (`destroy_when_last`).
            kvm.destroy_vm(cx).await;
            Ok(())
        }
    }
}

/// A VMM thread's end of issuing ioctls: its own completion, and the count of VMM threads
/// still going; the last one lets the vCPU threads of a `build ops` scenario go (each then
/// finds out whether its vCPU exists). Counted once per thread.
#[derive(Clone)]
struct VmmEnd {
    mine: Completion,
    counted: Rc<Cell<bool>>,
    left: Rc<Cell<usize>>,
    machine_ready: Completion,
}

impl VmmEnd {
    async fn done(&self, cx: &Ctx) {
        self.mine.complete_all(cx).await;
        if !self.counted.replace(true) {
            self.left.set(self.left.get() - 1);
            if self.left.get() == 0 {
                self.machine_ready.complete_all(cx).await;
            }
        }
    }
}

/// Before VmmOp::Destroy: the VM goes with the last reference to it (`kvm_put_kvm`). This
/// thread closes its fd (`end`: it issues nothing more), the VMM stops every vCPU thread
/// (`exited`), every other VMM thread finishes its ioctls (`vmm_done`: one in flight holds the
/// fd); a second close finds the VM gone (false).
async fn destroy_when_last(
    cx: &Ctx,
    end: &VmmEnd,
    vmm_done: &[Completion],
    exited: &[Completion],
    destroyed: &Cell<bool>,
) -> bool {
    end.done(cx).await;
    for c in vmm_done.iter().chain(exited) {
        c.wait(cx).await;
    }
    !destroyed.replace(true)
}

/// Builds the stack for `sc` (the upstream TD build, then one task per scenario task), ready to
/// run. The caller makes its observer from `run.stack`'s handles, then calls `Run::execute`.
pub fn prepare(sc: &Scenario, cfg: &RunConfig) -> Run {
    let max_vcpus = sc.td.max_vcpus.unwrap_or(crate::scenario::MAX_VCPUS);
    let mut stack = if sc.td.build_ops {
        let mut stack = Stack::new(cfg.policy, cfg.host_pages, cfg.trace);
        stack.guest_pages = cfg.guest_pages;
        stack.prepare_for_build_ops(max_vcpus);
        stack
    } else {
        // The upstream build, from a snapshot when this thread built the same TD before.
        crate::snapshot::built(&crate::snapshot::BuildKey {
            policy: cfg.policy,
            host_pages: cfg.host_pages,
            trace: cfg.trace,
            guest_pages: cfg.guest_pages,
            max_vcpus,
            vcpus: sc.vcpus,
            // A smaller fuzzing memslot (`for_fuzzing`) measures only the initial pages
            // inside it.
            init: sc
                .init_pages
                .iter()
                .copied()
                .filter(|(g, _)| g.raw() < cfg.guest_pages)
                .collect(),
            attributes: sc.td.attributes(),
        })
    };
    if let Some(bug) = cfg.kernel_bug {
        bug.arm(&mut stack.kvm.st.borrow_mut().injected);
    }
    let cx = stack.cx.clone();
    // `build ops`: the vCPU threads wait until KVM_TDX_FINALIZE_VM succeeded or every VMM
    // thread is done.
    let machine_ready = Completion::new(&cx, "machine ready");
    let exited: Vec<Completion> = (0..sc.vcpus)
        .map(|_| Completion::new(&cx, "vcpu thread exit"))
        .collect();
    let vmm_errors: Rc<RefCell<Vec<VmmError>>> = Rc::default();
    let dead_vm_answers: DeadAnswers = Rc::default();
    let destroyed = Rc::new(Cell::new(false));
    let thread_ends: Vec<Rc<Cell<Option<ThreadEnd>>>> =
        (0..sc.vcpus).map(|_| Rc::default()).collect();
    // One per VMM task: done issuing ioctls (its ops ended, or it reached Destroy).
    let vmm_done: Vec<Completion> = sc
        .tasks
        .iter()
        .filter(|t| matches!(t.ops, TaskOps::Vmm(_)))
        .map(|_| Completion::new(&cx, "vmm thread done"))
        .collect();
    let vmm_left = Rc::new(Cell::new(vmm_done.len()));
    let mut next_vmm = 0;
    let mut tasks = Vec::new();
    for t in &sc.tasks {
        let id = match (&t.ops, t.name) {
            (TaskOps::Guest(ops), TaskName::Vcpu(v)) => {
                let v = usize::from(v);
                let program = guest_program(ops);
                let build_ops = sc.td.build_ops;
                let fault_block = sc.vmm.fault_convert_pages;
                if !build_ops {
                    stack.kvm.set_guest_program(v, program.clone());
                }
                let (kvm, cx2, end, done) = (
                    stack.kvm.clone(),
                    cx.clone(),
                    thread_ends[v].clone(),
                    exited[v],
                );
                let vmm_threads = vmm_left.get();
                stack.ex.spawn(t.name.label(), async move {
                    if build_ops {
                        // With no VMM thread nothing builds the TD: the vCPU thread finds no
                        // vCPU at once.
                        if vmm_threads > 0 {
                            machine_ready.wait(&cx2).await;
                        }
                        if kvm.st.borrow().vcpus.len() <= v {
                            end.set(Some(ThreadEnd::NoVcpu));
                            done.complete_all(&cx2).await;
                            return;
                        }
                        kvm.set_guest_program(v, program);
                    }
                    end.set(Some(vcpu_thread(&kvm, &cx2, v, fault_block).await));
                    done.complete_all(&cx2).await;
                })
            }
            (TaskOps::Vmm(ops), _) => {
                let (kvm, cx2, ops, errs, ex, d, dead_answers) = (
                    stack.kvm.clone(),
                    cx.clone(),
                    ops.clone(),
                    vmm_errors.clone(),
                    exited.clone(),
                    destroyed.clone(),
                    dead_vm_answers.clone(),
                );
                let vmm_end = VmmEnd {
                    mine: vmm_done[next_vmm],
                    counted: Rc::default(),
                    left: vmm_left.clone(),
                    machine_ready,
                };
                let all = vmm_done.clone();
                let td = sc.td;
                next_vmm += 1;
                stack.ex.spawn(t.name.label(), async move {
                    for op in ops {
                        if op == VmmOp::Destroy
                            && !destroy_when_last(&cx2, &vmm_end, &all, &ex, &d).await
                        {
                            break;
                        }
                        let (dead_before, td_state) = {
                            let st = kvm.st.borrow();
                            (st.dead_since.is_some(), st.tdx.state)
                        };
                        // Every op of the VMM (ioctl or file op) begins here, on a dead VM or
                        // not; the ioctl gates mark it again as they check.
                        kvm.module.note_ioctl_entry(cx2.current(), kvm.is_dead());
                        let r = vmm_op(&kvm, &cx2, op, td, machine_ready).await;
                        // -EBADF: no vCPU fd to issue it on, so no ioctl reached KVM.
                        let ioctl = op.is_kvm_ioctl() && r != Err(Errno::EBADF);
                        if crate::coverage::enabled() {
                            use std::hash::{Hash, Hasher};
                            let mut h = std::hash::DefaultHasher::new();
                            std::mem::discriminant(&op).hash(&mut h);
                            let errno = r.err().map_or(0, |e| e.raw());
                            crate::coverage::hit(crate::coverage::Site::Errno, h.finish(), errno);
                        }
                        if dead_before && ioctl && r != Err(Errno::EIO) {
                            dead_answers.borrow_mut().push((op, r));
                        }
                        if let Err(e) = r {
                            errs.borrow_mut().push(VmmError {
                                op,
                                errno: e,
                                td_state,
                                td_state_after: kvm.st.borrow().tdx.state,
                            });
                        }
                        if op == VmmOp::Destroy {
                            break;
                        }
                    }
                    vmm_end.done(&cx2).await;
                })
            }
            _ => unreachable!("the parser pairs guest ops with vCPU tasks"),
        };
        tasks.push((t.name, id));
    }
    // vCPUs without a program have no thread: nothing to join at destroy.
    for (v, c) in exited.iter().enumerate() {
        if !tasks.iter().any(|(n, _)| *n == TaskName::Vcpu(v as u8)) {
            let (c, cx2) = (*c, cx.clone());
            stack.ex.spawn(format!("vcpu{v}-idle"), async move {
                c.complete_all(&cx2).await
            });
        }
    }
    Run {
        stack,
        tasks,
        ops_outcome: Outcome::AllDone,
        outcome: Outcome::AllDone,
        thread_ends,
        vmm_errors,
        dead_vm_answers,
        destroyed,
        schedule: sc.schedule.clone(),
        cfg: *cfg,
    }
}

impl Run {
    /// The errnos the VMM's ioctls returned, in order.
    pub fn vmm_errnos(&self) -> Vec<Errno> {
        self.vmm_errors.borrow().iter().map(|e| e.errno).collect()
    }

    /// Runs the ops phase under the scenario's schedule, then (if work is pending) the liveness
    /// phase under round robin.
    pub fn execute(&mut self, observer: &mut dyn FnMut(&StepInfo) -> bool) {
        let ops_limit = self.stack.ex.steps() + self.cfg.ops_budget;
        let tasks = self.tasks.clone();
        let id_of = |n: TaskName| tasks.iter().find(|(t, _)| *t == n).map(|(_, id)| *id);
        let ex = &mut self.stack.ex;
        self.ops_outcome = match &self.schedule {
            Schedule::Fair => ex.run(&mut RoundRobin::new(), ops_limit, observer),
            Schedule::Bytes(b) => ex.run(&mut InputChooser::new(b), ops_limit, observer),
            Schedule::Script(dirs) => {
                let dirs = dirs
                    .iter()
                    .filter_map(|d| {
                        Some(Directive {
                            task: id_of(d.task)?,
                            until: match &d.until {
                                DirUntil::Steps(n) => Until::Steps(*n),
                                DirUntil::Point(p) => Until::Point(p.clone()),
                                DirUntil::Blocked => Until::Blocked,
                            },
                        })
                    })
                    .collect();
                ex.run(&mut Script::new(dirs), ops_limit, observer)
            }
        };
        let module = &self.stack.kvm.module;
        self.outcome = match &self.ops_outcome {
            Outcome::BudgetExhausted(_) => {
                // Long legitimate work (a zap or a prefault of thousands of pages) is not a
                // hang: while a window of the liveness budget saw SEAMCALLs succeed, run
                // another, up to LIVENESS_WINDOWS in all.
                let mut windows = 0;
                loop {
                    let before = module.state().succeeded;
                    let limit = ex.steps() + self.cfg.liveness_budget;
                    let out = ex.run(&mut RoundRobin::new(), limit, observer);
                    windows += 1;
                    let moved = module.state().succeeded > before;
                    if !matches!(out, Outcome::BudgetExhausted(_))
                        || !moved
                        || windows >= LIVENESS_WINDOWS
                    {
                        break out;
                    }
                }
            }
            other => other.clone(),
        };
        LAST_RUN_STEPS.with(|c| c.set(ex.steps()));
    }

    /// The scheduler task of a scenario task.
    pub fn task(&self, n: TaskName) -> Option<TaskId> {
        self.tasks.iter().find(|(t, _)| *t == n).map(|(_, id)| *id)
    }
}

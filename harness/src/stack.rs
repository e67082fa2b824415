//! The whole stack for one run: scheduler, host memory, TDX module, KVM with its policy, and
//! the upstream build of a runnable TD (what a VMM does before the guest runs).

use std::future::Future;
use std::rc::Rc;

use crate::addr::Gfn;
use crate::guest::GuestProgram;
use crate::host::HostRef;
use crate::ids::{Hkid, PgOff, SlotId};
use crate::kvm::Kvm;
use crate::policy::Policy;
use crate::sched::{Chooser, Ctx, Executor, Outcome, RoundRobin, TaskId, TraceMode};
use crate::tdx_module::{Lp, ModuleConfig, TdxModule};
use crate::vmm::{vcpu_thread, ThreadEnd};

/// Guest-physical size of the model's TD memory: one memslot of this many 4K pages at gfn 0,
/// bound to one guest_memfd.
pub const GUEST_PAGES: u64 = 2048;

/// One run's world.
pub struct Stack {
    pub ex: Executor,
    pub cx: Ctx,
    pub host: HostRef,
    pub module: Rc<TdxModule>,
    pub kvm: Rc<Kvm>,
    /// Pages of guest_memfd 0 and of the memslot the build binds (GUEST_PAGES unless a run's
    /// configuration says otherwise).
    pub guest_pages: u64,
}

impl Stack {
    pub fn new(policy: Policy, host_pages: usize, mode: TraceMode) -> Stack {
        let ex = Executor::new(mode);
        let cx = ex.ctx();
        let host = crate::host::Host::shared(host_pages);
        let module = Rc::new(TdxModule::new(ModuleConfig::default(), host.clone()));
        let kvm = Kvm::new(&cx, module.clone(), policy);
        Stack {
            ex,
            cx,
            host,
            module,
            kvm,
            guest_pages: GUEST_PAGES,
        }
    }

    /// An independent copy of this stack, as if built again by the same calls (same state,
    /// trace and step count); only between runs with every task finished. A run starts from
    /// a fork of a built TD instead of repeating the build (`run::prepare`).
    pub fn fork(&self) -> Stack {
        let (ex, cx) = self.ex.fork();
        let host: HostRef = Rc::new(std::cell::RefCell::new(self.host.borrow().clone()));
        let module = Rc::new(self.module.fork(host.clone()));
        let kvm = self.kvm.fork(&cx, module.clone());
        Stack {
            ex,
            cx,
            host,
            module,
            kvm,
            guest_pages: self.guest_pages,
        }
    }

    /// Runs one task to completion (round robin); panics unless everything finishes.
    pub fn run_setup<F: Future<Output = ()> + 'static>(
        &mut self,
        f: impl FnOnce(Ctx, Rc<Kvm>) -> F,
    ) {
        let fut = f(self.cx.clone(), self.kvm.clone());
        self.ex.spawn("setup", fut);
        let out = self
            .ex
            .run(&mut RoundRobin::new(), 1_000_000, &mut |_| true);
        assert_eq!(out, Outcome::AllDone, "setup must finish");
    }

    /// A runnable TD with `nvcpus` vCPUs (vCPU i on LP i) and one private memslot of
    /// GUEST_PAGES pages bound to guest_memfd 0: KVM_TDX_INIT_VM, KVM_CREATE_VCPU +
    /// KVM_TDX_INIT_VCPU each, the memslot, attributes private, KVM_TDX_FINALIZE_VM.
    pub fn build_runnable(&mut self, nvcpus: u8) {
        self.build_with(nvcpus, &[]);
    }

    /// `build_runnable` plus, before finalize, KVM_TDX_INIT_MEM_REGION (measured PAGE.ADD) of
    /// each `(gfn, content)` page through vCPU 0.
    pub fn build_with(&mut self, nvcpus: u8, init_pages: &[(Gfn, u64)]) {
        self.build_configured(nvcpus, init_pages, 0);
    }

    /// `build_with` with `init_vm->attributes` for KVM_TDX_INIT_VM: [`Self::build_prefix`]
    /// then [`Self::build_finish`] (two setup tasks, so that a snapshot can stand between them).
    pub fn build_configured(&mut self, nvcpus: u8, init_pages: &[(Gfn, u64)], attributes: u64) {
        self.build_prefix(nvcpus, attributes);
        self.build_finish(init_pages);
    }

    /// The TD build up to its pages: KVM_TDX_INIT_VM, each vCPU, the memslot over guest_memfd
    /// 0, every page private.
    pub fn build_prefix(&mut self, nvcpus: u8, attributes: u64) {
        let pages = self.guest_pages;
        self.run_setup(move |cx, kvm| async move {
            // QEMU enables MapGPA exits for a TD (KVM_CAP_EXIT_HYPERCALL).
            kvm.enable_cap_exit_hypercall(1 << crate::kvm::vmx::tdvmcall::KVM_HC_MAP_GPA_RANGE)
                .expect("KVM_CAP_EXIT_HYPERCALL");
            let max_vcpus = kvm.st.borrow().max_vcpus;
            kvm.tdx_td_init_attrs(&cx, Hkid(32), max_vcpus, attributes)
                .await
                .expect("KVM_TDX_INIT_VM");
            for i in 0..nvcpus {
                let v = kvm
                    .create_vcpu(Lp(i), GuestProgram::default())
                    .expect("KVM_CREATE_VCPU");
                kvm.tdx_td_vcpu_init(&cx, v)
                    .await
                    .expect("KVM_TDX_INIT_VCPU");
            }
            let g = kvm.create_guest_memfd(pages);
            kvm.create_memslot(&cx, SlotId(0), Gfn::new(0), pages, Some((g, PgOff(0))))
                .await
                .expect("memslot");
            kvm.set_memory_attributes(&cx, Gfn::new(0), Gfn::new(pages), true)
                .await
                .expect("attributes");
        });
    }

    /// The rest of the TD build after [`Self::build_prefix`]: KVM_TDX_INIT_MEM_REGION of each
    /// `(gfn, content)` page through vCPU 0, then KVM_TDX_FINALIZE_VM.
    pub fn build_finish(&mut self, init_pages: &[(Gfn, u64)]) {
        let init = init_pages.to_vec();
        self.run_setup(move |cx, kvm| async move {
            for (gfn, v) in init {
                kvm.tdx_vcpu_init_mem_region(&cx, 0, gfn.gpa(), v, 1, true)
                    .await
                    .expect("KVM_TDX_INIT_MEM_REGION");
            }
            kvm.tdx_td_finalize(&cx).await.expect("KVM_TDX_FINALIZE_VM");
        });
    }

    /// What the VMM does before the TD build when the build is the scenario's (`build ops`):
    /// KVM_CAP_MAX_VCPUS, KVM_CAP_EXIT_HYPERCALL for MapGPA, and KVM_CREATE_GUEST_MEMFD of
    /// guest_memfd 0 (GUEST_PAGES pages; the memslot is an op).
    pub fn prepare_for_build_ops(&mut self, max_vcpus: u8) {
        let kvm = &self.kvm;
        kvm.st.borrow_mut().max_vcpus = u32::from(max_vcpus);
        kvm.enable_cap_exit_hypercall(1 << crate::kvm::vmx::tdvmcall::KVM_HC_MAP_GPA_RANGE)
            .expect("KVM_CAP_EXIT_HYPERCALL before any vCPU");
        kvm.create_guest_memfd(self.guest_pages);
    }

    /// Spawns vCPU `v`'s userspace thread running `program`; its end is written to `out`.
    pub fn spawn_vcpu(
        &mut self,
        v: usize,
        program: GuestProgram,
    ) -> (TaskId, Rc<std::cell::Cell<Option<ThreadEnd>>>) {
        self.kvm.set_guest_program(v, program);
        let out = Rc::new(std::cell::Cell::new(None));
        let (cx, kvm, o) = (self.cx.clone(), self.kvm.clone(), out.clone());
        let id = self.ex.spawn(format!("vcpu{v}"), async move {
            o.set(Some(vcpu_thread(&kvm, &cx, v, 1).await));
        });
        (id, out)
    }

    /// Spawns a task with the stack's context and KVM.
    pub fn spawn<F: Future<Output = ()> + 'static>(
        &mut self,
        name: &str,
        f: impl FnOnce(Ctx, Rc<Kvm>) -> F,
    ) -> TaskId {
        let fut = f(self.cx.clone(), self.kvm.clone());
        self.ex.spawn(name.to_string(), fut)
    }

    /// Runs under `chooser` for at most `budget` more steps.
    pub fn run(&mut self, chooser: &mut dyn Chooser, budget: u64) -> Outcome {
        let limit = self.ex.steps() + budget;
        self.ex.run(chooser, limit, &mut |_| true)
    }
}

//! A vCPU's roots are loaded and freed under mmu_lock (issue 17 item 10):
//! `kvm_tdp_mmu_alloc_root` takes it for read, and so does `kvm_mmu_free_roots` when it drops
//! an obsolete root. While another thread holds mmu_lock for write, KVM_RUN cannot get a root
//! and so cannot enter the guest.

use harness::addr::Gpa;
use harness::guest::{GuestOp, GuestProgram};
use harness::policy::Policy;
use harness::sched::{Directive, Outcome, Script, TraceMode, Until};
use harness::stack::Stack;

/// Where the vCPU's roots stand when the lock holder takes mmu_lock.
#[derive(Clone, Copy, Debug)]
enum Roots {
    /// First KVM_RUN: `kvm_mmu_load` allocates the mirror and direct roots.
    None,
    /// A fast zap made the direct root obsolete: KVM_RUN frees it, then allocates a new one.
    Obsolete,
}

#[test]
fn kvm_run_gets_its_roots_under_mmu_lock() {
    for roots in [Roots::None, Roots::Obsolete] {
        let mut s = Stack::new(Policy::UPSTREAM, 600, TraceMode::Full);
        s.build_runnable(1);
        if let Roots::Obsolete = roots {
            s.run_setup(|cx, kvm| async move {
                kvm.kvm_mmu_reload(&cx, 0).await.unwrap();
                kvm.kvm_mmu_zap_all_fast(&cx).await;
            });
        }
        let holder = s.spawn("holder", |cx, kvm| async move {
            kvm.mmu_lock.write(&cx).await;
            cx.yield_at("test:holding mmu_lock").await;
            kvm.mmu_lock.write_unlock(&cx).await;
        });
        let program = GuestProgram::new(vec![GuestOp::Read {
            gpa: Gpa::new(0x20 << 12).to_shared(),
        }]);
        let (vcpu, _) = s.spawn_vcpu(0, program);
        let mut sc = Script::new(vec![
            Directive {
                task: holder,
                until: Until::Point("test:holding mmu_lock".into()),
            },
            Directive {
                task: vcpu,
                until: Until::Blocked,
            },
        ]);
        let out = s.run(&mut sc, 20_000);
        assert_eq!(out, Outcome::AllDone, "{roots:?}");
        let trace = s.ex.render_trace();
        let unlock = trace
            .find("holder       write_unlock(mmu_lock)")
            .unwrap_or_else(|| panic!("{roots:?}: no unlock\n{trace}"));
        let enter = trace
            .find("TDH.VP.ENTER")
            .unwrap_or_else(|| panic!("{roots:?}: never entered\n{trace}"));
        assert!(
            unlock < enter,
            "{roots:?}: the vCPU entered while mmu_lock was held for write\n{trace}"
        );
    }
}

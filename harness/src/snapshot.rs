//! Snapshots of built TDs: most runs start with the same upstream TD build (KVM_TDX_INIT_VM,
//! the vCPUs, the memslot, KVM_TDX_INIT_MEM_REGION, KVM_TDX_FINALIZE_VM) under a
//! deterministic round-robin schedule, and that build is a quarter of a fuzzing run's cost. A
//! run forks a stack built once for its configuration instead (`Stack::fork`: the same state,
//! trace and step count), and replays the build's feedback-map hits, so the run, its trace and
//! its coverage are byte for byte those of a fresh build.
//!
//! The cache is per thread, bounded, and evicts the least recently used build; whether a
//! build is cached never changes a run (the tests compare runs with the cache on and off).

use std::cell::{Cell, RefCell};

use crate::addr::Gfn;
use crate::policy::Policy;
use crate::sched::TraceMode;
use crate::stack::Stack;

/// Built stacks kept per thread (a fuzzing campaign meets a handful of configurations most of
/// the time; a bound keeps odd ones from piling up).
const CAPACITY: usize = 64;

/// Everything a configured build depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildKey {
    pub policy: Policy,
    pub host_pages: usize,
    pub trace: TraceMode,
    pub guest_pages: u64,
    pub max_vcpus: u8,
    pub vcpus: u8,
    /// KVM_TDX_INIT_MEM_REGION pages and their contents, in order.
    pub init: Vec<(Gfn, u64)>,
    pub attributes: u64,
}

struct Built {
    key: BuildKey,
    /// Whether the feedback map was on while it was built (its hits are only known then).
    coverage: bool,
    stack: Stack,
    hits: Vec<(u32, u8)>,
}

thread_local! {
    static CACHE: RefCell<Vec<Built>> = const { RefCell::new(Vec::new()) };
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Turns the cache on (the default) or off for this thread; off also empties it.
pub fn enable(on: bool) {
    ENABLED.with(|e| e.set(on));
    if !on {
        CACHE.with(|c| c.borrow_mut().clear());
    }
}

/// The stack `key` describes, built (`Stack::build_configured`): a fork of the cached build,
/// or a new build that joins the cache.
pub fn built(key: &BuildKey) -> Stack {
    if !ENABLED.with(Cell::get) {
        return build(key);
    }
    let coverage = crate::coverage::enabled();
    let forked = CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let i = c
            .iter()
            .rposition(|b| b.coverage == coverage && b.key == *key)?;
        // Least recently used first: the entry just used moves to the back.
        let b = c.remove(i);
        crate::coverage::replay(&b.hits);
        let stack = b.stack.fork();
        c.push(b);
        Some(stack)
    });
    if let Some(stack) = forked {
        return stack;
    }
    let (template, hits) = crate::coverage::capture(|| build(key));
    let stack = template.fork();
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() == CAPACITY {
            c.remove(0);
        }
        c.push(Built {
            key: key.clone(),
            coverage,
            stack: template,
            hits,
        });
    });
    stack
}

/// `Stack::build_configured` on a new stack.
fn build(key: &BuildKey) -> Stack {
    let mut stack = Stack::new(key.policy, key.host_pages, key.trace);
    stack.guest_pages = key.guest_pages;
    stack.kvm.st.borrow_mut().max_vcpus = u32::from(key.max_vcpus);
    stack.build_configured(key.vcpus, &key.init, key.attributes);
    stack
}

//! Snapshots of built TDs: most runs start with the same upstream TD build (KVM_TDX_INIT_VM,
//! the vCPUs, the memslot, KVM_TDX_INIT_MEM_REGION, KVM_TDX_FINALIZE_VM) under a
//! deterministic round-robin schedule, and that build is a quarter of a fuzzing run's cost. A
//! run forks a stack built once for its configuration instead (`Stack::fork`: the same state,
//! trace and step count), and replays the build's feedback-map hits, so the run, its trace and
//! its coverage are byte for byte those of a fresh build.
//!
//! Two levels: the build up to the private attributes (`Stack::build_prefix`) depends on a
//! handful of configurations, the initial pages (`Stack::build_finish`) differ from input to
//! input. A build missing from the cache forks the cached prefix of its configuration and
//! only adds its pages and finalizes.
//!
//! The caches are per thread, bounded, and evict the least recently used build; whether a
//! build is cached never changes a run (the tests compare runs with the cache on and off).

use std::cell::{Cell, RefCell};

use crate::addr::Gfn;
use crate::policy::Policy;
use crate::sched::TraceMode;
use crate::stack::Stack;

/// Built stacks kept per thread and level (a fuzzing campaign meets a handful of
/// configurations most of the time; a bound keeps odd ones from piling up).
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

/// The part of a [`BuildKey`] the build's first half depends on (all but the pages).
#[derive(Clone, Debug, PartialEq)]
struct PrefixKey {
    policy: Policy,
    host_pages: usize,
    trace: TraceMode,
    guest_pages: u64,
    max_vcpus: u8,
    vcpus: u8,
    attributes: u64,
}

impl BuildKey {
    fn prefix(&self) -> PrefixKey {
        PrefixKey {
            policy: self.policy,
            host_pages: self.host_pages,
            trace: self.trace,
            guest_pages: self.guest_pages,
            max_vcpus: self.max_vcpus,
            vcpus: self.vcpus,
            attributes: self.attributes,
        }
    }
}

struct Built<K> {
    key: K,
    /// Whether the feedback map was on while it was built (its hits are only known then).
    coverage: bool,
    stack: Stack,
    hits: Vec<(u32, u8)>,
}

/// A least-recently-used list of builds.
struct Lru<K>(Vec<Built<K>>);

impl<K: PartialEq> Lru<K> {
    /// A fork of the build of `key` (its hits replayed), if cached; it becomes the most
    /// recently used.
    fn fork(&mut self, key: &K, coverage: bool) -> Option<(Stack, Vec<(u32, u8)>)> {
        let i = self
            .0
            .iter()
            .rposition(|b| b.coverage == coverage && b.key == *key)?;
        let b = self.0.remove(i);
        crate::coverage::replay(&b.hits);
        let out = (b.stack.fork(), b.hits.clone());
        self.0.push(b);
        Some(out)
    }

    fn insert(&mut self, built: Built<K>) {
        if self.0.len() == CAPACITY {
            self.0.remove(0);
        }
        self.0.push(built);
    }
}

thread_local! {
    static PREFIXES: RefCell<Lru<PrefixKey>> = const { RefCell::new(Lru(Vec::new())) };
    static BUILDS: RefCell<Lru<BuildKey>> = const { RefCell::new(Lru(Vec::new())) };
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Turns the cache on (the default) or off for this thread; off also empties it.
pub fn enable(on: bool) {
    ENABLED.with(|e| e.set(on));
    if !on {
        PREFIXES.with(|c| c.borrow_mut().0.clear());
        BUILDS.with(|c| c.borrow_mut().0.clear());
    }
}

/// Drops the complete builds and keeps their first halves, so that the next build of a
/// configuration seen before forks its cached first half and finishes it (for tests).
pub fn forget_complete_builds() {
    BUILDS.with(|c| c.borrow_mut().0.clear());
}

/// The stack `key` describes, built (`Stack::build_configured`): a fork of the cached build,
/// or a new build (from the cached first half, if any) that joins the cache.
pub fn built(key: &BuildKey) -> Stack {
    if !ENABLED.with(Cell::get) {
        let mut stack = prefix(key);
        stack.build_finish(&key.init);
        return stack;
    }
    let coverage = crate::coverage::enabled();
    if let Some((stack, _)) = BUILDS.with(|c| c.borrow_mut().fork(key, coverage)) {
        return stack;
    }
    let pkey = key.prefix();
    let (mut template, mut hits) = match PREFIXES.with(|c| c.borrow_mut().fork(&pkey, coverage)) {
        Some(forked) => forked,
        None => {
            let (template, hits) = crate::coverage::capture(|| prefix(key));
            let stack = template.fork();
            PREFIXES.with(|c| {
                c.borrow_mut().insert(Built {
                    key: pkey,
                    coverage,
                    stack: template,
                    hits: hits.clone(),
                })
            });
            (stack, hits)
        }
    };
    let ((), finish_hits) = crate::coverage::capture(|| template.build_finish(&key.init));
    hits.extend(finish_hits);
    let stack = template.fork();
    BUILDS.with(|c| {
        c.borrow_mut().insert(Built {
            key: key.clone(),
            coverage,
            stack: template,
            hits,
        })
    });
    stack
}

/// A new stack with the build's first half (`Stack::build_prefix`) done.
fn prefix(key: &BuildKey) -> Stack {
    let mut stack = Stack::new(key.policy, key.host_pages, key.trace);
    stack.guest_pages = key.guest_pages;
    stack.kvm.st.borrow_mut().max_vcpus = u32::from(key.max_vcpus);
    stack.build_prefix(key.vcpus, key.attributes);
    stack
}

//! The feedback map (issue 12): a fixed-size hit-count map the model fills while it runs, for a
//! coverage-guided engine to observe instead of compiler instrumentation. It rewards what a
//! race fuzzer needs to reach: new interleavings (edges between a task's consecutive yield
//! points), new TDX module answers (leaf, status, busy operand), lock contention, retry-loop
//! depths, request checks, errnos, zero-step mitigation, INVALID memslots and frozen SPTEs met
//! by another task.
//!
//! One thread-local map, off by default: a site costs one flag test until an engine turns the
//! map on. The map never feeds back into the run, so a run's trace does not depend on it.

use std::cell::{Cell, RefCell};

/// Entries in the map (a power of two).
pub const MAP_SIZE: usize = 1 << 15;

/// What a hit is about; each kind hashes into its own region of the index space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Site {
    /// A task went from one yield point to the next: (previous point, point).
    Edge = 1,
    /// A context switch: (the point the task that ran before stands at, the point this task
    /// resumes from): which pairs of program points interleave.
    Interleave,
    /// A SEAMCALL ended: (leaf number, raw status incl. the busy operand).
    Seamcall,
    /// A TDCALL ended: (leaf number, raw status).
    Tdcall,
    /// A task blocked on a lock, SRCU or completion: (object name, waiter and holder kinds).
    Contention,
    /// A kernel retry loop went round again: (loop name, iterations in AFL buckets).
    Retry,
    /// A KVM request was tested or consumed: (request bit, whether it was pending).
    Request,
    /// A VMM op returned: (op kind, errno or 0).
    Errno,
    /// TDH.VP.ENTER ran the zero-step filter (the threshold was reached): (0, 0).
    ZeroStep,
    /// A fault or prefault met an INVALID memslot: (prefault?, 0).
    InvalidSlot,
    /// A task found a mirror SPTE frozen by another: (level, 0).
    FrozenSeen,
}

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    static MAP: RefCell<Map> = const { RefCell::new(Map { counts: Vec::new(), touched: Vec::new() }) };
}

/// The counts, and the entries this run touched (so that taking and clearing the map costs
/// what the run hit, not the map's size).
struct Map {
    counts: Vec<u8>,
    touched: Vec<u32>,
}

/// Turns the map on (zeroed) or off for this thread.
pub fn enable(on: bool) {
    ENABLED.with(|e| e.set(on));
    MAP.with(|m| {
        let mut m = m.borrow_mut();
        m.counts.clear();
        m.touched.clear();
        if on {
            m.counts.resize(MAP_SIZE, 0);
        }
    });
}

/// Whether the map is on.
pub fn enabled() -> bool {
    ENABLED.with(Cell::get)
}

/// Moves the run's hits into `dst` (`MAP_SIZE` bytes, zero where this run hit nothing, as a
/// map observer leaves it before each run) as AFL's hit-count classes, and zeroes the map;
/// calls `each` with every index the run hit. Classes, not raw counts: an engine that keeps
/// any input raising some entry's maximum would otherwise keep one for every extra pass
/// through a loop (and did: thousands of near-copies in a young corpus).
pub fn take_into(dst: &mut [u8], mut each: impl FnMut(usize)) {
    drain(|i, count| {
        dst[i] = class(count);
        each(i);
    });
}

/// Zeroes the map, calling `each` with every index the run hit and its hit-count class (see
/// [`take_into`]): the sparse form of the same map.
pub fn take_classes(mut each: impl FnMut(usize, u8)) {
    drain(|i, count| each(i, class(count)));
}

/// Runs `f` on an empty map and returns its hits as (index, count); afterwards the map holds
/// what it held before plus those hits, exactly as if `f` had run on it. A run that starts
/// from a snapshot of a built TD replays the build's hits with [`replay`].
pub fn capture<R>(f: impl FnOnce() -> R) -> (R, Vec<(u32, u8)>) {
    if !enabled() {
        return (f(), Vec::new());
    }
    let fresh = Map {
        counts: vec![0; MAP_SIZE],
        touched: Vec::new(),
    };
    /// Puts the outer map back, also when `f` panics (a harness bug the campaign survives).
    struct Restore(Option<Map>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(outer) = self.0.take() {
                MAP.with(|m| *m.borrow_mut() = outer);
            }
        }
    }
    let outer = Restore(Some(
        MAP.with(|m| std::mem::replace(&mut *m.borrow_mut(), fresh)),
    ));
    let r = f();
    let mut hits = Vec::new();
    drain(|i, count| hits.push((i as u32, count)));
    drop(outer);
    replay(&hits);
    (r, hits)
}

/// Adds hits `capture` returned, as if they happened now (counts wrap as single hits do).
pub fn replay(hits: &[(u32, u8)]) {
    if !enabled() {
        return;
    }
    MAP.with(|m| {
        let mut m = m.borrow_mut();
        let Map { counts, touched } = &mut *m;
        for &(i, count) in hits {
            let c = &mut counts[i as usize];
            if *c == 0 {
                touched.push(i);
            }
            *c = c.wrapping_add(count);
        }
    });
}

/// Zeroes the map, calling `each` with every index the run hit (no observer to fill).
pub fn take(mut each: impl FnMut(usize)) {
    drain(|i, _| each(i));
}

/// Zeroes every entry the run touched, calling `f` with its index and count once. An entry
/// listed twice (its count wrapped to 0 and went on) is already 0 the second time: skipped.
fn drain(mut f: impl FnMut(usize, u8)) {
    MAP.with(|m| {
        let mut m = m.borrow_mut();
        let Map { counts, touched } = &mut *m;
        for &i in touched.iter() {
            let i = i as usize;
            let count = std::mem::take(&mut counts[i]);
            if count != 0 {
                f(i, count);
            }
        }
        touched.clear();
    });
}

/// Entries hit since the map was last taken.
#[cfg(test)]
fn entries() -> usize {
    MAP.with(|m| m.borrow().touched.len())
}

/// Records one hit of `site` with arguments `a` and `b` (hit counts wrap, as AFL's do).
#[inline]
pub fn hit(site: Site, a: u64, b: u64) {
    if !enabled() {
        return;
    }
    let i = index(site, a, b);
    MAP.with(|m| {
        let mut m = m.borrow_mut();
        if m.counts[i] == 0 {
            m.touched.push(i as u32);
        }
        // Wrapping back to 0 and on lists `i` once more; `drain` skips the second listing.
        m.counts[i] = m.counts[i].wrapping_add(1);
    });
}

/// The map index of a hit: a SplitMix64 finaliser over the site and its arguments.
fn index(site: Site, a: u64, b: u64) -> usize {
    let mut z = (site as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(a.rotate_left(21))
        ^ b.rotate_left(43).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z as usize) & (MAP_SIZE - 1)
}

/// AFL's hit-count class of a count, one bit per bucket (`count_class_lookup8`): 1, 2, 3,
/// 4-7, 8-15, 16-31, 32-127, 128+ -> 1, 2, 4, ..., 128 (0 stays 0), so that a larger class is
/// a larger value for a max-reducing feedback.
pub fn class(count: u8) -> u8 {
    match count {
        0 => 0,
        c => 1 << (bucket(u32::from(c)) - 1),
    }
}

/// AFL's hit-count buckets: 0, 1, 2, 3, 4-7, 8-15, 16-31, 32-127, 128+ -> 0..=8.
pub fn bucket(n: u32) -> u64 {
    match n {
        0 => 0,
        1 => 1,
        2 => 2,
        3 => 3,
        4..=7 => 4,
        8..=15 => 5,
        16..=31 => 6,
        32..=127 => 7,
        _ => 8,
    }
}

/// A stable key for a static name (its text, not its address, so that keys agree between the
/// processes of a multi-core campaign).
pub fn name_key(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A cheap key for a name compiled into the binary: its offset from an anchor in the same
/// read-only data, which address randomisation shifts as a whole (so keys, and with them a
/// campaign's choices, are the same from run to run of one binary).
#[inline]
pub fn static_key(s: &'static str) -> u64 {
    static ANCHOR: &str = "tdxfuzz coverage anchor";
    (s.as_ptr() as u64).wrapping_sub(ANCHOR.as_ptr() as u64) ^ ((s.len() as u64) << 48)
}

/// The kind of a task by its name: 1 vCPU, 2 VMM, 3 anything else.
pub fn task_kind(name: &str) -> u64 {
    if name.starts_with("vcpu") {
        1
    } else if name.starts_with("vmm") {
        2
    } else {
        3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_land_only_when_enabled_and_take_clears() {
        enable(false);
        hit(Site::Seamcall, 6, 0);
        assert_eq!(entries(), 0, "off: nothing recorded");
        enable(true);
        hit(Site::Seamcall, 6, 0);
        hit(Site::Seamcall, 6, 0);
        hit(Site::Seamcall, 6, 0x8000_0200_0000_0000);
        assert_eq!(entries(), 2);
        let mut dst = vec![0u8; MAP_SIZE];
        let mut hit_entries = 0;
        take_into(&mut dst, |_| hit_entries += 1);
        assert_eq!(hit_entries, 2);
        // Classes: one hit is 1, two hits are 2.
        assert_eq!(dst.iter().map(|&b| u32::from(b)).sum::<u32>(), 3);
        assert_eq!(entries(), 0, "taken");
        enable(false);
    }

    #[test]
    fn an_entry_that_wraps_is_taken_once_with_its_count() {
        enable(true);
        for _ in 0..258 {
            hit(Site::Retry, 1, 1);
        }
        let mut dst = vec![0u8; MAP_SIZE];
        let mut seen = 0;
        take_into(&mut dst, |_| seen += 1);
        assert_eq!(seen, 1, "listed twice, taken once");
        assert_eq!(dst[index(Site::Retry, 1, 1)], class(2), "258 wraps to 2");
        enable(false);
    }

    /// Hits made inside `capture`, then replayed, leave the map exactly as the same hits
    /// made directly would, including counts that wrap.
    #[test]
    fn captured_hits_replay_as_if_made_directly() {
        let hits = |n: u32| {
            hit(Site::Edge, 1, 2);
            for _ in 0..n {
                hit(Site::Retry, 3, 4);
            }
        };
        let taken = || {
            let mut dst = vec![0u8; MAP_SIZE];
            take_into(&mut dst, |_| {});
            dst
        };
        enable(true);
        for n in [0, 1, 200, 300] {
            hit(Site::Retry, 3, 4);
            hits(n);
            hits(n);
            let direct = taken();
            hit(Site::Retry, 3, 4);
            let ((), captured) = capture(|| hits(n));
            replay(&captured);
            assert_eq!(taken(), direct, "{n} hits");
            assert_ne!(captured.len(), 0, "{n}: the edge at least");
        }
        enable(false);
    }

    #[test]
    fn buckets_are_afl_s() {
        let rows = [
            (1, 1),
            (3, 3),
            (4, 4),
            (7, 4),
            (8, 5),
            (31, 6),
            (32, 7),
            (127, 7),
            (128, 8),
        ];
        for (n, b) in rows {
            assert_eq!(bucket(n), b, "{n}");
        }
    }

    #[test]
    fn classes_are_afl_s() {
        let rows = [
            (0, 0),
            (1, 1),
            (2, 2),
            (3, 4),
            (4, 8),
            (7, 8),
            (8, 16),
            (16, 32),
            (31, 32),
            (32, 64),
            (127, 64),
            (128, 128),
            (255, 128),
        ];
        for (n, c) in rows {
            assert_eq!(class(n), c, "{n}");
        }
    }

    #[test]
    fn sites_with_the_same_arguments_differ() {
        assert_ne!(index(Site::Seamcall, 1, 2), index(Site::Tdcall, 1, 2));
        assert_ne!(index(Site::Edge, 1, 2), index(Site::Edge, 2, 1));
    }
}

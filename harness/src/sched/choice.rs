//! Choice sources: who runs next at a scheduling decision.
//!
//! One small trait, one type per strategy (the shape of shuttle's `scheduler/`). A decision is
//! only asked for when two or more tasks are runnable, so single-task stretches consume no input.

use super::{Point, TaskId};

/// What the executor tells a chooser at a decision.
pub struct Decision<'a> {
    /// The task that ran last, if it is still runnable.
    pub current: Option<TaskId>,
    /// The point the last task stopped at.
    pub last_point: Point,
    /// Runnable tasks in id order (at least two).
    pub runnable: &'a [TaskId],
    /// Step number of the decision.
    pub step: u64,
}

/// A source of scheduling decisions.
pub trait Chooser {
    /// Picks one of `d.runnable`.
    fn choose(&mut self, d: &Decision<'_>) -> TaskId;
}

/// Fair rotation: the next runnable task after the current one, in id order. Used for the
/// liveness phase (every runnable task runs within `n` decisions) and as every fallback.
#[derive(Clone, Debug, Default)]
pub struct RoundRobin {
    last: Option<TaskId>,
}

impl RoundRobin {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Chooser for RoundRobin {
    fn choose(&mut self, d: &Decision<'_>) -> TaskId {
        let after = d.current.or(self.last);
        let pick = match after {
            Some(cur) => d
                .runnable
                .iter()
                .copied()
                .find(|t| *t > cur)
                .unwrap_or(d.runnable[0]),
            None => d.runnable[0],
        };
        self.last = Some(pick);
        pick
    }
}

/// Decisions read from fuzz input bytes, one byte per decision; round robin once they run out.
///
/// A byte below 0x80 keeps the current task running (if it still can), so most inputs model a
/// few preemptions rather than a context switch at every yield; any other byte picks
/// `runnable[(b & 0x7f) % n]`.
#[derive(Clone, Debug)]
pub struct InputChooser<'a> {
    bytes: &'a [u8],
    pos: usize,
    fallback: RoundRobin,
}

impl<'a> InputChooser<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        InputChooser {
            bytes,
            pos: 0,
            fallback: RoundRobin::new(),
        }
    }

    /// Bytes consumed so far.
    pub fn consumed(&self) -> usize {
        self.pos
    }
}

impl Chooser for InputChooser<'_> {
    fn choose(&mut self, d: &Decision<'_>) -> TaskId {
        let Some(&b) = self.bytes.get(self.pos) else {
            return self.fallback.choose(d);
        };
        self.pos += 1;
        match d.current {
            Some(cur) if b < 0x80 => cur,
            _ => d.runnable[usize::from(b & 0x7f) % d.runnable.len()],
        }
    }
}

/// splitmix64: a tiny deterministic generator for seeded strategies (no OS entropy, ever).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-ish value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Probabilistic Concurrency Testing (Burckhardt et al.): random task priorities, highest
/// runnable priority runs, and at `depth - 1` random steps the running task drops to the lowest
/// priority. Finds bugs of depth `d` with probability >= 1/(n * k^(d-1)). Not fair: a spinning
/// high-priority task starves the rest, so it is a baseline, never the liveness phase.
#[derive(Clone, Debug)]
pub struct Pct {
    rng: SplitMix64,
    priorities: Vec<u64>,
    change_points: Vec<u64>,
    next_low: u64,
}

impl Pct {
    /// `depth` bug depth, `max_steps` the expected run length for placing change points.
    pub fn new(seed: u64, depth: u32, max_steps: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let mut change_points: Vec<u64> = (1..depth).map(|_| rng.below(max_steps.max(1))).collect();
        change_points.sort_unstable();
        Pct {
            rng,
            priorities: Vec::new(),
            change_points,
            next_low: 0,
        }
    }

    fn priority(&mut self, t: TaskId) -> u64 {
        let i = t.0 as usize;
        while self.priorities.len() <= i {
            // High band: above every demoted priority.
            let p = (1 << 32) + self.rng.below(1 << 31);
            self.priorities.push(p);
        }
        self.priorities[i]
    }
}

impl Chooser for Pct {
    fn choose(&mut self, d: &Decision<'_>) -> TaskId {
        if self.change_points.first().is_some_and(|&c| d.step >= c) {
            self.change_points.remove(0);
            if let Some(cur) = d.current {
                self.priority(cur);
                // Demoted tasks rank below every undemoted one, later demotions lower still.
                self.priorities[cur.0 as usize] = (1 << 31) - 1 - self.next_low;
                self.next_low += 1;
            }
        }
        let mut best = d.runnable[0];
        let mut best_p = self.priority(best);
        for &t in &d.runnable[1..] {
            let p = self.priority(t);
            if p > best_p {
                best = t;
                best_p = p;
            }
        }
        best
    }
}

/// How long a scripted directive keeps its task running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Until {
    /// This many decisions.
    Steps(u32),
    /// Until the task has just yielded at a point whose name is this string.
    Point(String),
    /// As long as the task is runnable (it finishes or blocks).
    Blocked,
}

/// One directive of an explicit schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Directive {
    pub task: TaskId,
    pub until: Until,
}

/// An explicit schedule: run task A until X, then B until Y, ...; round robin afterwards. A
/// directive whose task is not runnable is skipped, so a schedule never wedges a run.
#[derive(Clone, Debug)]
pub struct Script {
    directives: Vec<Directive>,
    pos: usize,
    steps_in: u32,
    fallback: RoundRobin,
}

impl Script {
    pub fn new(directives: Vec<Directive>) -> Self {
        Script {
            directives,
            pos: 0,
            steps_in: 0,
            fallback: RoundRobin::new(),
        }
    }

    /// True once every directive has been used up.
    pub fn finished(&self) -> bool {
        self.pos >= self.directives.len()
    }

    fn point_name(p: &Point) -> Option<&'static str> {
        match *p {
            Point::Yield(s) | Point::YieldArg(s, _) => Some(s),
            _ => None,
        }
    }
}

impl Chooser for Script {
    fn choose(&mut self, d: &Decision<'_>) -> TaskId {
        while let Some(dir) = self.directives.get(self.pos) {
            // Is the current directive complete given what just happened?
            let ran_last = d.current == Some(dir.task);
            let done = match &dir.until {
                Until::Steps(n) => self.steps_in >= *n,
                Until::Point(name) => {
                    self.steps_in > 0
                        && ran_last
                        && Self::point_name(&d.last_point) == Some(name.as_str())
                }
                Until::Blocked => false,
            };
            let runnable = d.runnable.contains(&dir.task);
            if done || !runnable {
                self.pos += 1;
                self.steps_in = 0;
                continue;
            }
            self.steps_in += 1;
            return dir.task;
        }
        self.fallback.choose(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec<'a>(cur: Option<u32>, r: &'a [TaskId], step: u64) -> Decision<'a> {
        Decision {
            current: cur.map(TaskId),
            last_point: Point::Yield("x"),
            runnable: r,
            step,
        }
    }

    #[test]
    fn round_robin_rotates() {
        let r = [TaskId(0), TaskId(1), TaskId(2)];
        let mut rr = RoundRobin::new();
        assert_eq!(rr.choose(&dec(Some(0), &r, 0)), TaskId(1));
        assert_eq!(rr.choose(&dec(Some(2), &r, 1)), TaskId(0));
        assert_eq!(rr.choose(&dec(None, &r, 2)), TaskId(1));
    }

    #[test]
    fn input_chooser_keeps_or_switches() {
        let r = [TaskId(0), TaskId(1)];
        let bytes = [0x00, 0x81, 0x80];
        let mut c = InputChooser::new(&bytes);
        assert_eq!(c.choose(&dec(Some(0), &r, 0)), TaskId(0));
        assert_eq!(c.choose(&dec(Some(0), &r, 1)), TaskId(1));
        assert_eq!(c.choose(&dec(Some(1), &r, 2)), TaskId(0));
        assert_eq!(c.consumed(), 3);
        // Exhausted: round robin.
        assert_eq!(c.choose(&dec(Some(0), &r, 3)), TaskId(1));
    }

    #[test]
    fn pct_is_seed_deterministic() {
        let r = [TaskId(0), TaskId(1), TaskId(2)];
        let picks = |seed| {
            let mut p = Pct::new(seed, 3, 10);
            (0..10)
                .map(|s| p.choose(&dec(Some(0), &r, s)).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(picks(7), picks(7));
    }

    #[test]
    fn script_runs_until_point_then_skips_unrunnable() {
        let r = [TaskId(0), TaskId(1)];
        let mut s = Script::new(vec![
            Directive {
                task: TaskId(0),
                until: Until::Point("p".into()),
            },
            Directive {
                task: TaskId(5),
                until: Until::Steps(3),
            },
            Directive {
                task: TaskId(1),
                until: Until::Steps(1),
            },
        ]);
        let mut d = dec(Some(0), &r, 0);
        assert_eq!(s.choose(&d), TaskId(0));
        d.last_point = Point::Yield("p");
        // Task 0 reached "p": directive done, task 5 is not runnable, task 1 runs once.
        assert_eq!(s.choose(&d), TaskId(1));
        d.current = Some(TaskId(1));
        d.last_point = Point::Yield("q");
        assert_eq!(s.choose(&d), TaskId(0)); // fallback round robin
        assert!(s.finished());
    }
}

//! Corpus scheduling by cost: every corpus entry carries the scheduler steps its run took
//! (`RunSteps`, deterministic where wall time is not), and the scheduler goes round the corpus
//! like a queue but takes an expensive entry (one that zaps or maps thousands of pages) only
//! now and then, so cheap inputs get most of the mutations. (LibAFL's minimizer scheduler would
//! do similar, but it walks a `HashMap` to pick its favourites, so a seed would no longer give
//! the same campaign.)

use std::borrow::Cow;

use std::num::NonZeroUsize;

use libafl::corpus::{Corpus, CorpusId, Testcase};
use libafl::feedbacks::{Feedback, StateInitializer};
use libafl::schedulers::{QueueScheduler, Scheduler};
use libafl::state::{HasCorpus, HasRand};
use libafl::{Error, HasMetadata};
use libafl_bolts::rands::Rand;
use libafl_bolts::Named;
use serde::{Deserialize, Serialize};

/// Scheduler steps the entry's run took.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct RunSteps(pub u64);

libafl_bolts::impl_serdeany!(RunSteps);

/// Never makes an input interesting; tags every new corpus entry with `RunSteps`.
pub struct StepsFeedback;

impl Named for StepsFeedback {
    fn name(&self) -> &Cow<'static, str> {
        static NAME: Cow<'static, str> = Cow::Borrowed("StepsFeedback");
        &NAME
    }
}

impl<S> StateInitializer<S> for StepsFeedback {}

impl<EM, I, OT, S> Feedback<EM, I, OT, S> for StepsFeedback {
    fn append_metadata(
        &mut self,
        _state: &mut S,
        _manager: &mut EM,
        _observers: &OT,
        testcase: &mut Testcase<I>,
    ) -> Result<(), Error> {
        // The entry's own run has just finished on this thread.
        testcase.add_metadata(RunSteps(harness::run::last_run_steps()));
        Ok(())
    }
}

/// Entries whose run took at most this many steps are always taken in their turn; one of
/// `n` steps is taken with probability `CHEAP_STEPS / n` (the median entry of a long campaign
/// runs about 600 steps, the slowest tenth more than 10,000).
pub const CHEAP_STEPS: u64 = 2_000;

/// A queue over the corpus that skips expensive entries most of the time (see the module doc).
#[derive(Debug, Default)]
pub struct CostQueueScheduler {
    queue: QueueScheduler,
}

impl<I, S> Scheduler<I, S> for CostQueueScheduler
where
    S: HasCorpus<I> + HasRand,
{
    fn on_add(&mut self, state: &mut S, id: CorpusId) -> Result<(), Error> {
        self.queue.on_add(state, id)
    }

    fn next(&mut self, state: &mut S) -> Result<CorpusId, Error> {
        // At most one lap: if every entry is expensive, the last one drawn goes.
        for _ in 1..state.corpus().count() {
            let id = self.queue.next(state)?;
            let steps = state
                .corpus()
                .get(id)?
                .borrow()
                .metadata::<RunSteps>()
                .map_or(0, |m| m.0);
            let bound = NonZeroUsize::new(steps as usize).unwrap_or(NonZeroUsize::MIN);
            let take = steps <= CHEAP_STEPS || (state.rand_mut().below(bound) as u64) < CHEAP_STEPS;
            if take {
                return Ok(id);
            }
        }
        self.queue.next(state)
    }

    fn set_current_scheduled(
        &mut self,
        state: &mut S,
        next_id: Option<CorpusId>,
    ) -> Result<(), Error> {
        <QueueScheduler as Scheduler<I, S>>::set_current_scheduled(&mut self.queue, state, next_id)
    }
}

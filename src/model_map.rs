//! The engine's view of the model's feedback map, kept sparse: a run touches a few hundred of
//! the map's `MAP_SIZE` entries, so the observer carries only those (index, hit-count class)
//! pairs and the feedback compares only them with the campaign's maxima. LibAFL's
//! `MaxMapFeedback` over a dense map zeroes and scans all `MAP_SIZE` bytes per run (and
//! serialises them into every corpus event between clients), which cost a tenth of a
//! campaign's time. Semantics are `MaxMapFeedback`'s: an input is interesting when some entry
//! reaches a class above the largest any corpus entry reached, and the maxima move when the
//! input joins the corpus.

use std::borrow::Cow;
use std::cell::RefCell;

use harness::coverage::MAP_SIZE;
use libafl::corpus::Testcase;
use libafl::executors::ExitKind;
use libafl::feedbacks::{Feedback, StateInitializer};
use libafl::observers::{Observer, ObserversTuple};
use libafl::{Error, HasNamedMetadata};
use libafl_bolts::tuples::{Handle, Handled, MatchName, MatchNameRef};
use libafl_bolts::Named;
use serde::{Deserialize, Serialize};

thread_local! {
    /// The last run's hits, left by the harness for the observer to collect.
    static LAST_RUN: RefCell<Vec<(u32, u8)>> = const { RefCell::new(Vec::new()) };
}

/// Hands the run that just ended its hits (index, class); the observer collects them.
pub fn finish_run(hits: &mut Vec<(u32, u8)>) {
    LAST_RUN.with(|l| std::mem::swap(&mut *l.borrow_mut(), hits));
    hits.clear();
}

/// Observes the model's map entries one run hit, as (index, class) pairs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelMapObserver {
    name: Cow<'static, str>,
    hits: Vec<(u32, u8)>,
}

impl ModelMapObserver {
    pub fn new(name: &'static str) -> Self {
        Self {
            name: Cow::Borrowed(name),
            hits: Vec::new(),
        }
    }

    /// The last run's entries (index, class), each once.
    pub fn hits(&self) -> &[(u32, u8)] {
        &self.hits
    }
}

impl Named for ModelMapObserver {
    fn name(&self) -> &Cow<'static, str> {
        &self.name
    }
}

impl<I, S> Observer<I, S> for ModelMapObserver {
    fn pre_exec(&mut self, _state: &mut S, _input: &I) -> Result<(), Error> {
        self.hits.clear();
        Ok(())
    }

    fn post_exec(&mut self, _state: &mut S, _input: &I, _exit: &ExitKind) -> Result<(), Error> {
        LAST_RUN.with(|l| std::mem::swap(&mut *l.borrow_mut(), &mut self.hits));
        Ok(())
    }
}

/// The largest class any corpus entry reached, per map entry (in the state, so that a
/// restarted client keeps it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelMapMaxima {
    pub max: Vec<u8>,
}

libafl_bolts::impl_serdeany!(ModelMapMaxima);

/// Interesting when an entry's class exceeds its maximum in [`ModelMapMaxima`].
pub struct ModelMapFeedback {
    observer: Handle<ModelMapObserver>,
}

impl ModelMapFeedback {
    pub fn new(observer: &ModelMapObserver) -> Self {
        Self {
            observer: observer.handle(),
        }
    }

    fn hits<'a, OT: MatchName>(&self, observers: &'a OT) -> Result<&'a [(u32, u8)], Error> {
        observers
            .get(&self.observer)
            .map(|o| o.hits())
            .ok_or_else(|| Error::key_not_found("the model map observer"))
    }
}

impl Named for ModelMapFeedback {
    fn name(&self) -> &Cow<'static, str> {
        self.observer.name()
    }
}

impl<S: HasNamedMetadata> StateInitializer<S> for ModelMapFeedback {
    fn init_state(&mut self, state: &mut S) -> Result<(), Error> {
        state.add_named_metadata_checked(
            self.name(),
            ModelMapMaxima {
                max: vec![0; MAP_SIZE],
            },
        )?;
        Ok(())
    }
}

impl<EM, I, OT, S> Feedback<EM, I, OT, S> for ModelMapFeedback
where
    OT: ObserversTuple<I, S>,
    S: HasNamedMetadata,
{
    fn is_interesting(
        &mut self,
        state: &mut S,
        _manager: &mut EM,
        _input: &I,
        observers: &OT,
        _exit_kind: &ExitKind,
    ) -> Result<bool, Error> {
        let max = &state.named_metadata::<ModelMapMaxima>(self.name())?.max;
        Ok(self
            .hits(observers)?
            .iter()
            .any(|&(i, class)| class > max[i as usize]))
    }

    fn append_metadata(
        &mut self,
        state: &mut S,
        _manager: &mut EM,
        observers: &OT,
        _testcase: &mut Testcase<I>,
    ) -> Result<(), Error> {
        let max = &mut state.named_metadata_mut::<ModelMapMaxima>(self.name())?.max;
        for &(i, class) in self.hits(observers)? {
            let m = &mut max[i as usize];
            *m = (*m).max(class);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libafl::corpus::InMemoryCorpus;
    use libafl::events::NopEventManager;
    use libafl::feedbacks::CrashFeedback;
    use libafl::inputs::BytesInput;
    use libafl::state::StdState;
    use libafl_bolts::rands::StdRand;
    use libafl_bolts::tuples::tuple_list;

    type State =
        StdState<InMemoryCorpus<BytesInput>, BytesInput, StdRand, InMemoryCorpus<BytesInput>>;

    /// Runs "an input" whose run hit `hits` through the observer, as the executor does.
    fn observe(o: &mut ModelMapObserver, state: &mut State, hits: &[(u32, u8)]) {
        let input = BytesInput::new(vec![0]);
        Observer::<BytesInput, State>::pre_exec(o, state, &input).unwrap();
        finish_run(&mut hits.to_vec());
        Observer::<BytesInput, State>::post_exec(o, state, &input, &ExitKind::Ok).unwrap();
    }

    #[test]
    fn an_input_is_interesting_when_an_entry_passes_the_corpus_maximum() {
        type Hits = &'static [(u32, u8)];
        // (hits of the runs that joined the corpus, hits of the new run, interesting?)
        let rows: &[(&[Hits], Hits, bool)] = &[
            (&[], &[(5, 1)], true),
            (&[], &[], false),
            (&[&[(5, 1)]], &[(5, 1)], false),
            (&[&[(5, 1)]], &[(5, 2)], true),
            (&[&[(5, 1)]], &[(5, 1), (9, 1)], true),
            (&[&[(5, 4)]], &[(5, 2)], false),
            (&[&[(5, 4)], &[(7, 1)]], &[(7, 1), (5, 4)], false),
            (&[&[(5, 1), (7, 128)]], &[(7, 64), (5, 2)], true),
        ];
        for (corpus, run, want) in rows {
            let mut o = ModelMapObserver::new("model");
            let mut feedback = ModelMapFeedback::new(&o);
            let mut objective = CrashFeedback::new();
            let mut state: State = StdState::new(
                StdRand::with_seed(1),
                InMemoryCorpus::new(),
                InMemoryCorpus::new(),
                &mut feedback,
                &mut objective,
            )
            .unwrap();
            let mut mgr = NopEventManager::new();
            let input = BytesInput::new(vec![0]);
            for hits in corpus.iter() {
                observe(&mut o, &mut state, hits);
                let observers = tuple_list!(o.clone());
                let mut tc = Testcase::new(input.clone());
                feedback
                    .append_metadata(&mut state, &mut mgr, &observers, &mut tc)
                    .unwrap();
            }
            observe(&mut o, &mut state, run);
            // The observer travels to other clients serialised: judge that copy.
            let sent: ModelMapObserver =
                postcard::from_bytes(&postcard::to_allocvec(&o).unwrap()).unwrap();
            let observers = tuple_list!(sent);
            let got = feedback
                .is_interesting(&mut state, &mut mgr, &input, &observers, &ExitKind::Ok)
                .unwrap();
            assert_eq!(got, *want, "corpus {corpus:?}, run {run:?}");
        }
    }
}

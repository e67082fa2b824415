//! The engine's structure-aware mutator: decodes a stack input (either form), makes one edit of
//! `harness::scenario::mutate` (splicing from another corpus entry where the edit wants one),
//! and writes the result in the exact form (`harness::scenario::wire`), which the byte havoc
//! stage then mutates field by field.

use std::borrow::Cow;
use std::num::NonZeroUsize;

use harness::scenario::{decode::decode, mutate, wire};
use libafl::corpus::Corpus;
use libafl::inputs::{BytesInput, HasMutatorBytes};
use libafl::mutators::{MutationResult, Mutator};
use libafl::state::{HasCorpus, HasRand};
use libafl::Error;
use libafl_bolts::rands::Rand;
use libafl_bolts::Named;

/// LibAFL's generator as the scenario mutator's source of choices.
struct FromRand<'a, R>(&'a mut R);

impl<R: Rand> mutate::Pick for FromRand<'_, R> {
    fn below(&mut self, n: usize) -> usize {
        self.0
            .below(NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN))
    }
}

/// See the module doc. Off (every call skipped) for targets whose input is not a scenario.
pub struct ScenarioMutator {
    pub enabled: bool,
}

impl Named for ScenarioMutator {
    fn name(&self) -> &Cow<'static, str> {
        static NAME: Cow<'static, str> = Cow::Borrowed("ScenarioMutator");
        &NAME
    }
}

impl<S> Mutator<BytesInput, S> for ScenarioMutator
where
    S: HasCorpus<BytesInput> + HasRand,
{
    fn mutate(&mut self, state: &mut S, input: &mut BytesInput) -> Result<MutationResult, Error> {
        if !self.enabled {
            return Ok(MutationResult::Skipped);
        }
        let mut s = decode(input.mutator_bytes());
        // Another corpus entry, for the splice edit.
        let other = match state.corpus().count() {
            0 => None,
            n => {
                let nth = state
                    .rand_mut()
                    .below(NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN));
                let id = state.corpus().nth(nth);
                let mut tc = state.corpus().get(id)?.borrow_mut();
                Some(decode(tc.load_input(state.corpus())?.mutator_bytes()))
            }
        };
        match mutate::mutate(&mut s, &mut FromRand(state.rand_mut()), other.as_ref()) {
            Some(_) => {
                *input = BytesInput::new(wire::encode(&s));
                Ok(MutationResult::Mutated)
            }
            None => Ok(MutationResult::Skipped),
        }
    }

    fn post_exec(
        &mut self,
        _state: &mut S,
        _new_corpus_id: Option<libafl::corpus::CorpusId>,
    ) -> Result<(), Error> {
        Ok(())
    }
}

//! The coverage-guided engine behind `tdxfuzz fuzz` (issue 12): LibAFL in process, observing
//! the model's own feedback map (`harness::coverage`: yield-point edges per task, SEAMCALL and
//! TDCALL answers, lock contention, retry depths, requests, errnos) instead of compiler
//! instrumentation, so it needs no nightly and no sanitizer. Inputs that reach new map entries
//! (or new hit-count buckets) join the corpus and are mutated further; every violation is
//! bucketed by signature through the same `Recorder` as the random loop, and a panic of the
//! harness is a `harness_bug` finding, never the end of the campaign.

use anyhow::{anyhow, Result};
use harness::coverage::{self, MAP_SIZE};
use libafl::corpus::{Corpus, InMemoryCorpus};
use libafl::events::{
    EventFirer, EventReceiver, EventRestarter, ProgressReporter, SendExiting, SimpleEventManager,
};
use libafl::executors::{ExitKind, InProcessExecutor};
use libafl::feedback_or;
use libafl::feedbacks::CrashFeedback;
use libafl::fuzzer::{Evaluator, Fuzzer, StdFuzzer};
use libafl::generators::RandBytesGenerator;
use libafl::inputs::{BytesInput, HasTargetBytes};
use libafl::monitors::NopMonitor;
use libafl::mutators::{havoc_mutations, HavocScheduledMutator};
use libafl::stages::StdMutationalStage;
use libafl::state::{HasCorpus, HasExecutions, HasMaxSize, StdState};
use libafl_bolts::rands::StdRand;
use libafl_bolts::tuples::tuple_list;
use libafl_bolts::ToSlice;

use crate::campaign::{exec, Campaign, Found, Recorder};
use crate::cost::{CostQueueScheduler, StepsFeedback};
use crate::mirrored_corpus::MirroredCorpus;
use crate::model_map::{self, ModelMapFeedback, ModelMapObserver};
use crate::scenario_mutator::ScenarioMutator;
use crate::Target;

/// Random inputs the corpus starts from when no seed directory is given.
const INITIAL_INPUTS: usize = 32;

/// The longest input the mutators may make: the decoder's bounds on ops, threads and pages
/// are reached well before this, and longer inputs only cost time.
const MAX_INPUT_LEN: usize = 512;

/// The fuzzer's state (serialisable: a restarting client hands it to its next process).
pub type State = StdState<MirroredCorpus, BytesInput, StdRand, InMemoryCorpus<BytesInput>>;

/// Runs a coverage-guided campaign in this process; `c.corpus` seeds it (none: random
/// inputs).
pub fn run(c: &Campaign) -> Result<Found> {
    let mut mgr = SimpleEventManager::new(NopMonitor::new());
    fuzz(c, None, &mut mgr)
}

/// The campaign under event manager `mgr` (this process alone, or one client of `--jobs`),
/// from `restored` if a restarted client brings its state back.
pub fn fuzz<EM>(c: &Campaign, restored: Option<State>, mgr: &mut EM) -> Result<Found>
where
    EM: EventFirer<BytesInput, State>
        + EventRestarter<State>
        + EventReceiver<BytesInput, State>
        + ProgressReporter<State>
        + SendExiting,
{
    let target = c.target;
    let rec = std::cell::RefCell::new(Recorder::new(c)?);
    coverage::enable(true);
    let mut failure: Option<anyhow::Error> = None;
    // The run's map entries as (index, class), handed to the observer after each run.
    let mut hits: Vec<(u32, u8)> = Vec::new();
    let mut harness_fn = |input: &BytesInput| {
        let bytes = input.target_bytes();
        let data = bytes.to_slice();
        // The model's map is zero here: `take_classes` below left it so.
        let t = std::time::Instant::now();
        let v = exec(c, data);
        rec.borrow_mut().timed(t.elapsed(), data);
        // With the feedback off the map is measured but the observer sees nothing: no input
        // is ever interesting.
        {
            let mut rec = rec.borrow_mut();
            coverage::take_classes(|i, class| {
                rec.cover(i);
                if c.feedback {
                    hits.push((i as u32, class));
                }
            });
        }
        if let Some(v) = v {
            // A new kind of violation is new coverage too: keep the input that reached it.
            let i = (coverage::name_key(&v.key) as usize) & (MAP_SIZE - 1);
            if c.feedback {
                hits.push((i as u32, 1));
            }
            rec.borrow_mut().cover(i);
            if let Err(e) = rec.borrow_mut().record(&v, data) {
                failure.get_or_insert(e);
            }
        }
        model_map::finish_run(&mut hits);
        ExitKind::Ok
    };
    let observer = ModelMapObserver::new("model");
    // New map entries make an input interesting; every corpus entry records its run's steps,
    // which the scheduler reads to skip expensive entries most of the time.
    let mut feedback = feedback_or!(ModelMapFeedback::new(&observer), StepsFeedback);
    let mut objective = CrashFeedback::new();
    let fresh = restored.is_none();
    let mut state: State = match restored {
        Some(s) => s,
        None => StdState::new(
            StdRand::with_seed(c.seed),
            // The working corpus, mirrored to disk as it grows (raw inputs: `tdxfuzz print`
            // reads them); with --jobs the clients share the directory.
            MirroredCorpus::new(
                c.artifacts
                    .join(crate::campaign::target_name(c.target))
                    .join("corpus"),
            )
            .map_err(|e| anyhow!("the corpus directory: {e}"))?,
            InMemoryCorpus::new(),
            &mut feedback,
            &mut objective,
        )
        .map_err(|e| anyhow!("LibAFL state: {e}"))?,
    };
    state.set_max_size(MAX_INPUT_LEN);
    let mut fuzzer = StdFuzzer::new(CostQueueScheduler::default(), feedback, objective);
    let mut executor = InProcessExecutor::builder()
        .harness(&mut harness_fn)
        .observers(tuple_list!(observer))
        .fuzzer(&mut fuzzer)
        .state(&mut state)
        .event_mgr(mgr)
        // Every run is bounded by its step budgets, so LibAFL's wall-clock timeout (which ends
        // the process, and one client of --jobs) is left out of reach; the recorder keeps the
        // slowest input instead.
        .timeout(std::time::Duration::from_secs(24 * 3600))
        .build()
        .map_err(|e| anyhow!("LibAFL executor: {e}"))?;
    // The executor installed a panic hook that saves the input and exits the process: put
    // the campaign's own back, so that a panic of the harness unwinds into `exec`'s catch and
    // becomes a `harness_bug` finding, and the campaign goes on.
    oracle::harness_bug::install_quiet_hook();
    match &c.corpus {
        _ if !fresh => {}
        Some(dir) => {
            for input in seed_inputs(dir, target)? {
                fuzzer
                    .add_input(&mut state, &mut executor, mgr, input)
                    .map_err(|e| anyhow!("seeding from {}: {e}", dir.display()))?;
            }
        }
        None => {
            let mut generator = RandBytesGenerator::new(std::num::NonZeroUsize::new(256).unwrap());
            // Without feedback none would be interesting: keep them all.
            if c.feedback {
                state.generate_initial_inputs(
                    &mut fuzzer,
                    &mut executor,
                    &mut generator,
                    mgr,
                    INITIAL_INPUTS,
                )
            } else {
                state.generate_initial_inputs_forced(
                    &mut fuzzer,
                    &mut executor,
                    &mut generator,
                    mgr,
                    INITIAL_INPUTS,
                )
            }
            .map_err(|e| anyhow!("initial inputs: {e}"))?;
        }
    }
    // Byte havoc, then edits of the scenario (stack inputs only), on each corpus entry.
    let havoc = HavocScheduledMutator::new(havoc_mutations());
    let edits = ScenarioMutator {
        enabled: target == Target::Stack,
    };
    let mut stages = tuple_list!(
        StdMutationalStage::new(havoc),
        StdMutationalStage::new(edits)
    );
    loop {
        let execs = *state.executions();
        let extra = format!(" | corpus {}", state.corpus().count());
        // Checked between stages (each runs many inputs).
        if rec.borrow().done(c.stop, execs) {
            break;
        }
        rec.borrow_mut().status(execs, &extra);
        fuzzer
            .fuzz_one(&mut stages, &mut executor, &mut state, mgr)
            .map_err(|e| anyhow!("fuzzing: {e}"))?;
        mgr.maybe_report_progress(&mut state, std::time::Duration::from_secs(1))
            .map_err(|e| anyhow!("reporting progress: {e}"))?;
    }
    let execs = *state.executions();
    let extra = format!(", corpus {}", state.corpus().count());
    drop(executor);
    coverage::enable(false);
    state
        .corpus_mut()
        .flush()
        .map_err(|e| anyhow!("writing the corpus: {e}"))?;
    if let Some(e) = failure {
        return Err(e);
    }
    rec.into_inner().finish(execs, &extra)
}

/// The seed inputs in `dir` (every file, sorted by name). A text scenario seeds the stack
/// target in the exact binary form (`harness::scenario::wire`), so the mutators start from
/// the scenario it says; any other file is a raw input.
fn seed_inputs(dir: &std::path::Path, target: Target) -> Result<Vec<BytesInput>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| anyhow!("reading {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let bytes = std::fs::read(&f).map_err(|e| anyhow!("reading {}: {e}", f.display()))?;
        let input = match crate::load::load_bytes(&f.display().to_string(), &bytes) {
            _ if target != Target::Stack => bytes,
            crate::load::Loaded::Ok(sc) if crate::load::is_text(&bytes) => {
                harness::scenario::wire::encode(&sc)
            }
            crate::load::Loaded::Ok(_) => bytes,
            crate::load::Loaded::Bad(msg) => anyhow::bail!("seed input: {msg}"),
        };
        out.push(BytesInput::new(input));
    }
    if out.is_empty() {
        anyhow::bail!("no seed inputs in {}", dir.display());
    }
    Ok(out)
}

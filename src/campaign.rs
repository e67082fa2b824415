//! The in-process campaign behind `tdxfuzz fuzz`: generate inputs, run the target, bucket
//! findings by signature, write one artifact per distinct finding, and show a live status line.
//! Inputs are random bytes from a seeded generator for now (coverage guidance comes with the
//! fuzzing-engine work), so a campaign with `--runs` is reproducible from its seed. A panic of
//! the harness is a `harness_bug` finding, not the end of the campaign; findings whose
//! signature a known input (`corpus/known/`) shows are reported once as known.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crash_triage::Buckets;
use harness::sched::choice::SplitMix64;
use indicatif::{ProgressBar, ProgressStyle};
use oracle::known::Known;
use oracle::Violation;

use harness::kvm::KernelBug;
use harness::policy::Policy;

use crate::Target;

/// When a campaign ends.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    Seconds(u64),
    Runs(u64),
}

/// Set by SIGINT: the campaign loops stop at their next check and finish cleanly (summary,
/// smallest inputs, the corpus already on disk).
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Makes Ctrl-C end the campaign cleanly instead of killing the process.
pub fn stop_on_ctrl_c() {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
}

/// True once Ctrl-C was pressed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Runs one input of `c`'s target; a panic of the harness is caught and becomes a
/// `harness_bug` violation.
pub fn exec(c: &Campaign, data: &[u8]) -> Option<Violation> {
    oracle::harness_bug::catch(|| {
        if let Some(n) = c.panic_every.filter(|&n| n > 0) {
            let fnv = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            if fnv % n == 0 {
                panic!("injected harness panic (--inject-harness-panic {n})");
            }
        }
        exec_target(c.target, c.policy, c.kernel_bug, data)
    })
}

fn exec_target(
    target: Target,
    policy: Policy,
    bug: Option<KernelBug>,
    data: &[u8],
) -> Option<Violation> {
    match target {
        Target::Stack => oracle::targets::stack_with_bug(policy, bug, data),
        Target::TdxModule => {
            let bad = oracle::targets::tdx_module(data);
            (!bad.is_empty()).then(|| oracle::targets::module_violation(&bad))
        }
        Target::Scheduler => oracle::targets::scheduler(data),
    }
}

/// The artifacts subdirectory (and summary name) of a target.
pub fn target_name(target: Target) -> &'static str {
    match target {
        Target::Stack => "stack",
        Target::TdxModule => "tdx_module",
        Target::Scheduler => "scheduler",
    }
}

/// Replays the known inputs of the stack target (text scenarios or raw inputs in `dir`) under
/// `policy`; says which ran clean.
fn load_known(dir: &Path, policy: Policy, quiet: bool) -> Result<Known> {
    let mut inputs = Vec::new();
    for f in crate::load::scenario_files(dir)? {
        match crate::load::load(&f)? {
            crate::load::Loaded::Ok(sc) => inputs.push((f.display().to_string(), sc)),
            crate::load::Loaded::Bad(msg) => anyhow::bail!("known input: {msg}"),
        }
    }
    let (known, stale) = Known::replay(inputs.iter().map(|(n, s)| (n.clone(), s)), policy);
    for name in stale.iter().filter(|_| !quiet) {
        println!(
            "known input {name} runs clean under {}: stale?",
            policy.name
        );
    }
    Ok(known)
}

/// What a campaign runs and where its findings go.
#[derive(Clone, Debug)]
pub struct Campaign {
    pub target: Target,
    pub policy: Policy,
    pub kernel_bug: Option<KernelBug>,
    pub stop: Stop,
    pub seed: u64,
    pub artifacts: std::path::PathBuf,
    /// Inputs of known findings (stack target).
    pub known: Option<std::path::PathBuf>,
    /// Seed inputs (LibAFL engine).
    pub corpus: Option<std::path::PathBuf>,
    /// Stop at the first new finding of this violation kind (`a|b`: either), not shown by
    /// upstream on the same input (time-to-detect measurements).
    pub stop_on_kind: Option<String>,
    /// No status line and no summary (measurements that run many campaigns).
    pub quiet: bool,
    /// Fault injection for the campaign itself: the harness panics on inputs whose hash is a
    /// multiple of this.
    pub panic_every: Option<u64>,
    /// The LibAFL engine keeps inputs that reach new map entries (off: the map is measured
    /// but no input joins the corpus, the baseline the feedback is judged against).
    pub feedback: bool,
    /// This campaign is client N of `--jobs`: at the end it writes its buckets to
    /// `client-N.tsv` for the launcher's summary.
    pub client: Option<usize>,
}

/// Totals of a campaign.
#[derive(Clone, Debug, Default)]
pub struct Found {
    /// Distinct signatures no known input shows.
    pub new: usize,
    /// Distinct known signatures hit.
    pub known: usize,
    /// Inputs run.
    pub execs: u64,
    /// Feedback-map entries any input reached, sampled about once a second: (seconds, entries).
    pub coverage: Vec<(f64, usize)>,
    /// Seconds to the first new finding of `Campaign::stop_on_kind`, if one showed.
    pub detected_at: Option<f64>,
    /// Scheduler steps of all runs (stack target): the model's work, which the inputs an
    /// engine picks make larger or smaller.
    pub steps: u64,
}

/// Where a campaign's findings go: one artifact per distinct signature (raw input and report),
/// buckets with hit counts and the smallest input, new vs known, and the live status line.
pub struct Recorder {
    client: Option<usize>,
    stop_on_kind: Option<String>,
    quiet: bool,
    target: Target,
    policy: Policy,
    dir: std::path::PathBuf,
    known: Known,
    buckets: Buckets,
    pub found: Found,
    /// The slowest input so far and its wall time (runs are bounded in steps, not time).
    slowest: (Duration, Vec<u8>),
    /// Seconds into the campaign at which each signature was first seen.
    first_at: std::collections::BTreeMap<String, f64>,
    /// Feedback-map entries any input of the campaign reached (whether or not the engine
    /// uses the map), and how many.
    reached: Vec<bool>,
    entries: usize,
    bar: ProgressBar,
    start: Instant,
}

impl Recorder {
    /// Creates the artifact directory, replays the known inputs and starts the status line.
    pub fn new(c: &Campaign) -> Result<Recorder> {
        let (target, policy) = (c.target, c.policy);
        let dir = c.artifacts.join(target_name(target));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let known = match (target, &c.known) {
            (Target::Stack, Some(k)) => load_known(k, policy, c.quiet)?,
            _ => Known::default(),
        };
        oracle::harness_bug::install_quiet_hook();
        let bar = status_bar(c.quiet)?;
        Ok(Recorder {
            client: c.client,
            stop_on_kind: c.stop_on_kind.clone(),
            quiet: c.quiet,
            target,
            policy,
            dir,
            known,
            buckets: Buckets::new(),
            found: Found::default(),
            first_at: Default::default(),
            slowest: (Duration::ZERO, Vec::new()),
            reached: vec![false; harness::coverage::MAP_SIZE],
            entries: 0,
            bar,
            start: Instant::now(),
        })
    }

    /// Seconds since the campaign started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Whether the campaign is over: its stop rule, or the finding it was told to stop on.
    pub fn done(&self, stop: Stop, execs: u64) -> bool {
        self.found.detected_at.is_some() || interrupted() || stop.reached(execs, self.elapsed())
    }

    /// Buckets a violation of `input`; the first of its signature is written out and named.
    pub fn record(&mut self, v: &Violation, input: &[u8]) -> Result<()> {
        if self.buckets.add(v, input) {
            let base = self.dir.join(v.signature_hash());
            fs::write(base.with_extension("bin"), input)?;
            fs::write(base.with_extension("txt"), v.to_string())?;
            let at = self.start.elapsed().as_secs_f64();
            self.first_at.insert(v.signature(), at);
            match self.known.name_of(v) {
                Some(k) => {
                    self.found.known += 1;
                    self.bar
                        .println(format!("[{at:.1}s] known: {} (as {k})", v.signature()));
                }
                None => {
                    self.found.new += 1;
                    // A detection is the policy's doing only if upstream, given the same
                    // input, does not show the same signature.
                    let kind = v.kind.to_string();
                    let expected = self
                        .stop_on_kind
                        .as_deref()
                        .is_some_and(|k| k.split('|').any(|k| k == kind));
                    if expected && !self.upstream_shows(v, input) {
                        self.found.detected_at.get_or_insert(at);
                    }
                    self.bar
                        .println(format!("[{at:.1}s] new: {}", v.signature()));
                }
            }
        }
        Ok(())
    }

    /// True if the input gives the same signature under upstream (with no injected bug).
    fn upstream_shows(&self, v: &Violation, input: &[u8]) -> bool {
        let upstream =
            oracle::harness_bug::catch(|| exec_target(self.target, Policy::UPSTREAM, None, input));
        upstream.is_some_and(|u| u.signature() == v.signature())
    }

    /// Notes a run that just ended: how long it took (the slowest input is written out at the
    /// end) and its scheduler steps.
    pub fn timed(&mut self, took: Duration, input: &[u8]) {
        self.found.steps += harness::run::last_run_steps();
        if took > self.slowest.0 {
            self.slowest = (took, input.to_vec());
        }
    }

    /// Counts map entry `i`, hit by a run, among the entries the campaign reached.
    pub fn cover(&mut self, i: usize) {
        if !self.reached[i] {
            self.reached[i] = true;
            self.entries += 1;
        }
    }

    /// Updates the status line; `extra` is the engine's own part (its corpus).
    pub fn status(&mut self, execs: u64, extra: &str) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        if self
            .found
            .coverage
            .last()
            .is_none_or(|&(t, _)| secs - t >= 1.0)
        {
            self.found.coverage.push((secs, self.entries));
        }
        self.bar.set_message(format!(
            "{} [{}] | execs {execs} ({:.0}/s){extra} | map {} | new findings {} | known {}",
            target_name(self.target),
            self.policy.name,
            execs as f64 / secs,
            self.entries,
            self.found.new,
            self.found.known,
        ));
    }

    /// Ends the status line and prints the summary table; keeps each smallest reproducer.
    pub fn finish(mut self, execs: u64, extra: &str) -> Result<Found> {
        let _ = std::panic::take_hook();
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        self.bar.finish_and_clear();
        self.found.execs = execs;
        self.found.coverage.push((secs, self.entries));
        if let Some(id) = self.client {
            self.write_client_summary(id, execs, secs)?;
        }
        if self.quiet {
            return Ok(self.found);
        }
        if !self.slowest.1.is_empty() {
            fs::write(self.dir.join("slowest.bin"), &self.slowest.1)?;
            println!(
                "slowest input: {:.3} s ({})",
                self.slowest.0.as_secs_f64(),
                self.dir.join("slowest.bin").display()
            );
        }
        println!(
            "{}: {execs} execs in {secs:.1}s ({:.0}/s){extra}, map {} entries, {} new and {} \
             known distinct finding(s)",
            target_name(self.target),
            execs as f64 / secs,
            self.entries,
            self.found.new,
            self.found.known
        );
        for (sig, b) in self.buckets.iter() {
            let tag = self.tag(&b.violation);
            let at = self.first_at.get(sig.as_str()).copied().unwrap_or(0.0);
            println!(
                "  {tag:<5} {:>7} hits  first at {at:>6.1}s  {sig}  (smallest input {} bytes)",
                b.hits,
                b.smallest.len()
            );
            fs::write(
                self.dir
                    .join(b.violation.signature_hash())
                    .with_extension("min.bin"),
                &b.smallest,
            )?;
        }
        Ok(self.found)
    }
}

/// The live status line (a spinner with the elapsed time and a message), hidden when `quiet`.
pub fn status_bar(quiet: bool) -> Result<ProgressBar> {
    if quiet {
        return Ok(ProgressBar::hidden());
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {msg}",
    )?);
    bar.enable_steady_tick(Duration::from_millis(200));
    Ok(bar)
}

impl Recorder {
    /// "known" if a known input shows the signature, else "NEW".
    fn tag(&self, v: &Violation) -> &'static str {
        if self.known.name_of(v).is_some() {
            "known"
        } else {
            "NEW"
        }
    }

    /// `client-N.tsv`: a header line (execs, seconds, map entries), then one line per bucket:
    /// tag, hits, first seen (s), signature hash, smallest input (hex), signature.
    fn write_client_summary(&self, id: usize, execs: u64, secs: f64) -> Result<()> {
        let mut out = format!("execs\t{execs}\t{secs}\t{}\n", self.entries);
        for (sig, b) in self.buckets.iter() {
            let tag = self.tag(&b.violation);
            let at = self.first_at.get(sig.as_str()).copied().unwrap_or(0.0);
            let hex: String = b.smallest.iter().map(|x| format!("{x:02x}")).collect();
            out += &format!(
                "{tag}\t{}\t{at}\t{}\t{hex}\t{sig}\n",
                b.hits,
                b.violation.signature_hash()
            );
        }
        let path = self.dir.join(format!("client-{id}.tsv"));
        fs::write(&path, out).with_context(|| format!("writing {}", path.display()))
    }
}

impl Stop {
    /// Whether a campaign that has run `execs` inputs for `elapsed` is over.
    pub fn reached(self, execs: u64, elapsed: Duration) -> bool {
        match self {
            Stop::Runs(n) => execs >= n,
            Stop::Seconds(s) => elapsed >= Duration::from_secs(s),
        }
    }
}

/// Runs the random-input campaign (`--engine random`): seeded random bytes, no feedback.
pub fn run(c: &Campaign) -> Result<Found> {
    let mut rec = Recorder::new(c)?;
    let mut rng = SplitMix64::new(c.seed);
    let mut execs: u64 = 0;
    let mut buf = Vec::with_capacity(512);
    // The map is filled and measured, not used: this loop is the feedback-off baseline.
    harness::coverage::enable(true);
    // The clock is read every 256 inputs.
    let clock_due = |execs: u64| matches!(c.stop, Stop::Runs(_)) || execs.is_multiple_of(256);
    while !(clock_due(execs) && rec.done(c.stop, execs)) {
        buf.clear();
        let len = rng.below(256) as usize;
        buf.extend((0..len).map(|_| rng.next_u64() as u8));
        execs += 1;
        let t = Instant::now();
        let v = exec(c, &buf);
        rec.timed(t.elapsed(), &buf);
        harness::coverage::take(|i| rec.cover(i));
        if let Some(v) = v {
            rec.record(&v, &buf)?;
        }
        if execs.is_multiple_of(64) {
            rec.status(execs, "");
        }
    }
    harness::coverage::enable(false);
    rec.finish(execs, "")
}

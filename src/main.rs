//! `tdxfuzz`: the command line (spec section 5).

mod bench;
mod campaign;
mod cost;
mod engine;
mod jobs;
mod load;
mod matrix;
mod mirrored_corpus;
mod model_map;
mod scenario_mutator;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Result};
use clap::{Parser, Subcommand, ValueEnum};
use harness::policy::Policy;
use harness::run::RunConfig;
use harness::sched::TraceMode;

#[derive(Parser)]
#[command(
    name = "tdxfuzz",
    version,
    about = "Fuzzing and conformance harness for KVM's Intel TDX private-memory path"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// The campaign's engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// LibAFL in process, guided by the model's feedback map.
    Libafl,
    /// Seeded random bytes, no feedback (the first milestone's loop).
    Random,
}

/// What a campaign fuzzes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// The whole stack: scenarios (guest, VMM, KVM, TDX module) under fuzzed interleavings.
    Stack,
    /// The TDX module alone: SEAMCALL/TDCALL programs against module invariants.
    TdxModule,
    /// Lock programs over the scheduler's primitives (the scheduler's own self-test).
    Scheduler,
}

#[derive(Subcommand)]
enum Cmd {
    /// Lists the policies with the invariant each is expected to break.
    Policies,
    /// Replays scenario files (text or raw fuzz input). Exit 0 clean, 1 violation, 2 bad input.
    Run {
        files: Vec<PathBuf>,
        #[arg(long, default_value = "upstream")]
        policy: String,
        /// Print the interleaving as a timeline.
        #[arg(long)]
        trace: bool,
        /// Run text scenarios with a campaign's bounds (under `sept_off_to_side` a 0x20-page
        /// memslot) instead of the full ones; raw fuzz inputs always run with them.
        #[arg(long)]
        fuzzing: bool,
    },
    /// Prints scenario files (text or raw fuzz input) in the text form.
    Print { files: Vec<PathBuf> },
    /// Replays the regression corpus under every policy and prints the policy x scenario table.
    Matrix {
        #[arg(long, default_value = "corpus/regressions")]
        dir: PathBuf,
    },
    /// Runs a fuzzing campaign with a live status line; findings go to artifacts/.
    Fuzz {
        #[arg(long, value_enum, default_value = "stack")]
        target: Target,
        #[arg(long, default_value = "upstream")]
        policy: String,
        /// Stop after this many seconds.
        #[arg(long, conflicts_with = "runs")]
        seconds: Option<u64>,
        /// Stop after this many inputs.
        #[arg(long)]
        runs: Option<u64>,
        /// Seed of the input generator (a campaign with --runs is reproducible from its seed).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where findings are written.
        #[arg(long, default_value = "artifacts")]
        artifacts: PathBuf,
        /// Inputs of known findings (stack target): their signatures are reported once as
        /// known, not as new. Default: corpus/known here, else the source tree's.
        #[arg(long)]
        known: Option<PathBuf>,
        /// Switch on an injected kernel bug in every run (skip_convert_zap,
        /// skip_in_guest_mode, truncate_without_free, notifier_without_zap), to measure how
        /// fast the campaign finds what it breaks.
        #[arg(long, value_parser = parse_kernel_bug)]
        kernel_bug: Option<harness::kvm::KernelBug>,
        /// The engine: coverage-guided (LibAFL, fed by the model's feedback map) or the old
        /// seeded random loop.
        #[arg(long, value_enum, default_value = "libafl")]
        engine: Engine,
        /// Seed inputs for the LibAFL engine (default: random inputs, an empty corpus).
        #[arg(long)]
        corpus: Option<PathBuf>,
        /// LibAFL clients, one per core, sharing their corpus over LLMP (default: every
        /// core). With more than one, `--runs` and `--seconds` apply to each client.
        #[arg(long)]
        jobs: Option<usize>,
        /// The port this machine's LibAFL broker listens on (default: a free one).
        #[arg(long)]
        broker_port: Option<u16>,
        /// Connect this machine's broker to another machine's (`HOST:PORT`); see README.
        #[arg(long)]
        remote_broker: Option<std::net::SocketAddr>,
        /// Fault injection for the campaign itself: the harness panics on about one input in
        /// N, to show that a panic is a finding and not the end of the campaign.
        #[arg(long, hide = true)]
        inject_harness_panic: Option<u64>,
    },
    /// Prints throughput figures.
    Bench {
        /// Scheduler yield points per second on a 4-task lock-heavy workload.
        #[arg(long)]
        scheduler: bool,
        /// Rounds per task of the scheduler workload.
        #[arg(long, default_value_t = 200_000)]
        rounds: u32,
        /// Whole-stack executions per second on random scenarios.
        #[arg(long)]
        stack: bool,
        /// Upstream's mirror-root S-EPT against seed 001's S-EPT off to the side: SEAMCALLs,
        /// peak host pages, conversion latency in steps, on one workload.
        #[arg(long)]
        sept: bool,
        /// The LibAFL engine (feedback on and off) against the random loop on the stack
        /// target, one after the other on one core: execs/s and feedback-map entries reached
        /// over time.
        #[arg(long)]
        engines: bool,
        /// Seconds per engine for --engines.
        #[arg(long, default_value_t = 30)]
        engine_seconds: u64,
        /// Time to detect each broken policy from an empty corpus (engines: --detect-engines).
        #[arg(long)]
        detect: bool,
        /// Seeds per policy and engine for --detect.
        #[arg(long, default_value_t = 5)]
        detect_seeds: u64,
        /// Seconds at most per campaign for --detect.
        #[arg(long, default_value_t = 60)]
        detect_limit: u64,
        /// Engines --detect measures, comma-separated (libafl, random).
        #[arg(long, value_delimiter = ',', default_value = "libafl")]
        detect_engines: Vec<Engine>,
    },
}

/// `corpus/known` in the working directory, else in the source tree this binary was built
/// from (so a campaign started elsewhere still knows the known findings).
pub fn default_known_dir() -> Option<PathBuf> {
    [
        PathBuf::from("corpus/known"),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/known"),
    ]
    .into_iter()
    .find(|d| d.is_dir())
}

fn policy(name: &str) -> Result<Policy> {
    Policy::by_name(name).ok_or_else(|| anyhow!("unknown policy `{name}` (see `tdxfuzz policies`)"))
}

fn main() -> ExitCode {
    // `tdxfuzz run ... | head` closes stdout early: end quietly, as a shell tool does, instead
    // of panicking in println!.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Policies => {
            println!("{:<34} expected invariant broken", "policy");
            for (p, expect) in Policy::ALL {
                println!("{:<34} {expect}", p.name);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            files,
            policy: p,
            trace,
            fuzzing,
        } => run_files(&files, policy(&p)?, trace, fuzzing),
        Cmd::Print { files } => {
            let mut code = 0u8;
            for f in &files {
                match load::load(f)? {
                    load::Loaded::Ok(sc) => {
                        println!("# {}", f.display());
                        print!("{}", harness::scenario::text::print(&sc));
                    }
                    load::Loaded::Bad(msg) => {
                        eprintln!("error: {msg}");
                        code = 2;
                    }
                }
            }
            Ok(ExitCode::from(code))
        }
        Cmd::Matrix { dir } => {
            print!("{}", matrix::render(&dir)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fuzz {
            target,
            policy: p,
            seconds,
            runs,
            seed,
            artifacts,
            known,
            kernel_bug,
            engine,
            corpus,
            jobs,
            broker_port,
            remote_broker,
            inject_harness_panic,
        } => {
            let stop = match (seconds, runs) {
                (_, Some(r)) => campaign::Stop::Runs(r),
                (Some(s), None) => campaign::Stop::Seconds(s),
                (None, None) => campaign::Stop::Seconds(60),
            };
            let known = known.or_else(default_known_dir);
            let c = campaign::Campaign {
                target,
                policy: policy(&p)?,
                kernel_bug,
                stop,
                seed,
                artifacts,
                known,
                corpus,
                stop_on_kind: None,
                quiet: false,
                panic_every: inject_harness_panic,
                feedback: true,
                client: None,
            };
            campaign::stop_on_ctrl_c();
            let jobs = jobs.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
            });
            let found = match engine {
                Engine::Libafl if jobs > 1 || remote_broker.is_some() => {
                    return jobs::run(&c, jobs, broker_port, remote_broker)
                        .map(|_| ExitCode::SUCCESS);
                }
                Engine::Libafl => engine::run(&c)?,
                Engine::Random => campaign::run(&c)?,
            };
            // Findings are the product of a campaign, not a failure of the command.
            println!(
                "{} new and {} known distinct finding(s); reports in {}",
                found.new,
                found.known,
                c.artifacts.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            scheduler,
            rounds,
            stack,
            sept,
            engines,
            engine_seconds,
            detect,
            detect_seeds,
            detect_limit,
            detect_engines,
        } => {
            if !scheduler && !stack && !sept && !engines && !detect {
                return Err(anyhow!(
                    "nothing to benchmark: pass --scheduler, --stack, --sept, --engines and/or \
                     --detect"
                ));
            }
            if engines {
                bench::engines(engine_seconds)?;
            }
            if detect {
                bench::detect(detect_seeds.max(1), detect_limit, &detect_engines)?;
            }
            if scheduler {
                bench::scheduler(rounds);
            }
            if stack {
                bench::stack();
            }
            if sept {
                bench::sept();
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `tdxfuzz run`: 0 clean, 1 violation (first line `violation: KIND SIGNATURE`), 2 bad input.
fn run_files(files: &[PathBuf], policy: Policy, trace: bool, fuzzing: bool) -> Result<ExitCode> {
    if files.is_empty() {
        return Err(anyhow!("no scenario files given"));
    }
    let mut code = 0u8;
    for f in files {
        let sc = match load::load(f)? {
            load::Loaded::Ok(s) => s,
            load::Loaded::Bad(msg) => {
                eprintln!("error: {msg}");
                code = 2;
                continue;
            }
        };
        let mode = if trace {
            TraceMode::Full
        } else {
            TraceMode::Ring(64)
        };
        // A raw input comes from a campaign: replay it as the campaign ran it.
        let raw = std::fs::read(f).is_ok_and(|b| !load::is_text(&b));
        let cfg = if fuzzing || raw {
            RunConfig::for_fuzzing(policy, mode)
        } else {
            RunConfig::new(policy, mode)
        };
        let report = oracle::check::run_scenario(&sc, &cfg);
        match &report.violation {
            Some(v) => {
                print!("{v}");
                code = code.max(1);
            }
            None => println!(
                "clean: {} ({} steps, policy {}){}",
                f.display(),
                report.run.stack.ex.steps(),
                policy.name,
                report
                    .wedged
                    .as_ref()
                    .map(|w| format!("; wedged by zero-step mitigation: {w}"))
                    .unwrap_or_default()
            ),
        }
        if trace {
            print!("{}", report.run.stack.ex.render_trace());
        }
    }
    Ok(ExitCode::from(code))
}

fn parse_kernel_bug(s: &str) -> Result<harness::kvm::KernelBug, String> {
    harness::kvm::KernelBug::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = harness::kvm::KernelBug::ALL
            .iter()
            .map(|b| b.name())
            .collect();
        format!(
            "unknown kernel bug `{s}` (expected one of {})",
            names.join(", ")
        )
    })
}

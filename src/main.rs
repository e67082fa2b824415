//! `tdxfuzz`: the command line (spec section 5).

mod bench;
mod campaign;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

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

/// What a campaign fuzzes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// Lock programs over the scheduler's primitives (the scheduler's own self-test).
    Scheduler,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs a fuzzing campaign with a live status line; findings go to artifacts/.
    Fuzz {
        #[arg(long, value_enum, default_value = "scheduler")]
        target: Target,
        /// Stop after this many seconds.
        #[arg(long, conflicts_with = "runs")]
        seconds: Option<u64>,
        /// Stop after this many inputs.
        #[arg(long)]
        runs: Option<u64>,
        /// Seed of the input generator (the campaign is reproducible for a given seed and runs).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where findings are written.
        #[arg(long, default_value = "artifacts")]
        artifacts: PathBuf,
    },
    /// Prints throughput figures.
    Bench {
        /// Scheduler yield points per second on a 4-task lock-heavy workload.
        #[arg(long)]
        scheduler: bool,
        /// Rounds per task of the scheduler workload.
        #[arg(long, default_value_t = 200_000)]
        rounds: u32,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Fuzz {
            target,
            seconds,
            runs,
            seed,
            artifacts,
        } => {
            let stop = match (seconds, runs) {
                (_, Some(r)) => campaign::Stop::Runs(r),
                (Some(s), None) => campaign::Stop::Seconds(s),
                (None, None) => campaign::Stop::Seconds(60),
            };
            let found = campaign::run(target, stop, seed, &artifacts)?;
            // Findings are the product of a campaign, not a failure of the command.
            println!(
                "{found} distinct finding(s); reports in {}",
                artifacts.display()
            );
            Ok(())
        }
        Cmd::Bench { scheduler, rounds } => {
            if !scheduler {
                anyhow::bail!("nothing to benchmark: pass --scheduler");
            }
            bench::scheduler(rounds);
            Ok(())
        }
    }
}

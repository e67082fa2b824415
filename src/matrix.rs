//! `tdxfuzz matrix`: every regression scenario under every policy, as one table.

use std::fmt::Write;
use std::path::Path;

use anyhow::{anyhow, Result};
use harness::policy::Policy;
use harness::run::RunConfig;
use harness::sched::TraceMode;

use crate::load::{load, scenario_files, Loaded};

/// The table as text (markdown), with a legend of scenario numbers.
pub fn render(dir: &Path) -> Result<String> {
    let files = scenario_files(dir)?;
    let mut scenarios = Vec::new();
    for f in &files {
        match load(f)? {
            Loaded::Ok(s) => scenarios.push(s),
            Loaded::Bad(e) => return Err(anyhow!(e)),
        }
    }
    let mut out = String::new();
    let _ = write!(out, "| policy |");
    for i in 0..scenarios.len() {
        let _ = write!(out, " {} |", i + 1);
    }
    let _ = writeln!(out);
    let _ = write!(out, "|---|");
    for _ in &scenarios {
        let _ = write!(out, "---|");
    }
    let _ = writeln!(out);
    for (p, _) in Policy::ALL {
        let _ = write!(out, "| {} |", p.name);
        for s in &scenarios {
            let r = oracle::check::run_scenario(s, &RunConfig::new(p, TraceMode::Ring(0)));
            let cell = r.violation.map(|v| v.kind.name()).unwrap_or("");
            let _ = write!(out, " {cell} |");
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out);
    for (i, f) in files.iter().enumerate() {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let _ = writeln!(out, "{}. {name}", i + 1);
    }
    Ok(out)
}

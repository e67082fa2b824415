//! `tdxfuzz fuzz --jobs N`: N LibAFL clients, one per core, through LibAFL's `Launcher`. The
//! launcher forks a broker and the clients; each client runs the same engine
//! (`engine::fuzz`) under an LLMP restarting event manager, so inputs one client finds
//! interesting reach every other client over LLMP, and a client that crashes is restarted with
//! its state. The broker's monitor drives the status line; every client writes its findings
//! to the shared artifacts directory and, at the end, its buckets to `client-N.tsv`, which the
//! launching process merges into the summary (the clients' own output goes to `clients.log`).
//!
//! Several machines: LibAFL's launcher connects its broker to another machine's broker
//! (`--remote-broker HOST:PORT`); brokers bind to localhost unless the binary is built with
//! `--features multi-machine` (LibAFL's `llmp_bind_public`).

use std::collections::BTreeMap;
use std::fs;

use anyhow::{anyhow, Context, Result};
use libafl::events::{ClientDescription, EventConfig, Launcher, SendExiting};
use libafl::monitors::SimpleMonitor;
use libafl_bolts::core_affinity::Cores;
use libafl_bolts::shmem::{ShMemProvider, StdShMemProvider};

use crate::campaign::Campaign;

/// A free TCP port on localhost for the broker (so that two campaigns on one machine do not
/// meet on LibAFL's default port).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a port for the broker")?;
    Ok(l.local_addr()?.port())
}

/// Totals of a `--jobs` campaign: inputs run by all clients, and the longest client's seconds.
pub struct Totals {
    pub execs: u64,
    pub secs: f64,
}

/// Runs `c` as `jobs` clients (at most one per core); prints the merged summary unless `c` is
/// quiet.
pub fn run(
    c: &Campaign,
    jobs: usize,
    port: Option<u16>,
    remote: Option<std::net::SocketAddr>,
) -> Result<Totals> {
    let available = Cores::all()
        .map_err(|e| anyhow!("listing cores: {e}"))?
        .ids
        .len();
    let jobs = jobs.clamp(1, available.max(1));
    let cores = Cores::from_cmdline(&format!("0-{}", jobs - 1))
        .map_err(|e| anyhow!("cores 0-{}: {e}", jobs - 1))?;
    let dir = c.artifacts.join(crate::campaign::target_name(c.target));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for old in client_summaries(&dir)? {
        fs::remove_file(old)?;
    }
    let port = match port {
        Some(p) => p,
        None => free_port()?,
    };
    if !c.quiet {
        println!("{jobs} clients; broker on port {port}");
    }
    let launcher_pid = std::process::id();
    let bar = crate::campaign::status_bar(c.quiet)?;
    let status_dir = dir.clone();
    let status_bar = bar.clone();
    let monitor = SimpleMonitor::new(move |line: &str| {
        // The broker's line (clients, corpus, executions, exec/sec) and the distinct findings
        // the clients have written so far.
        let findings = fs::read_dir(&status_dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "txt"))
                    .count()
            })
            .unwrap_or(0);
        let line = line.split_once("] ").map_or(line, |(_, rest)| rest);
        status_bar.set_message(format!("{line} | findings {findings}"));
    });
    let run_client = |state: Option<crate::engine::State>,
                      mut mgr: libafl::events::LlmpRestartingEventManager<
        (),
        libafl::inputs::BytesInput,
        crate::engine::State,
        _,
        _,
    >,
                      desc: ClientDescription| {
        let mut mine = c.clone();
        mine.seed = c.seed.wrapping_add(desc.id() as u64);
        mine.quiet = true;
        mine.client = Some(desc.id());
        if let Err(e) = crate::engine::fuzz(&mine, state, &mut mgr) {
            eprintln!("client {}: {e:#}", desc.id());
        }
        // A clean exit: the restarter must not start this client again.
        mgr.send_exiting()
    };
    // The clients' own output (errors, LibAFL's messages); their findings go to `dir`.
    let clients_log = dir.join("clients.log").display().to_string();
    let shmem = StdShMemProvider::new().map_err(|e| anyhow!("shared memory: {e}"))?;
    let result = Launcher::builder()
        .shmem_provider(shmem)
        .configuration(EventConfig::from_name("tdxfuzz"))
        .monitor(monitor)
        .run_client(run_client)
        .cores(&cores)
        .broker_port(port)
        .remote_broker_addr(remote)
        .stdout_file(Some("/dev/null"))
        .stderr_file(Some(&clients_log))
        .build()
        .launch();
    if std::process::id() != launcher_pid {
        // A client, or a client's restarter: the launching process reports.
        std::process::exit(0);
    }
    bar.finish_and_clear();
    match result {
        Ok(()) | Err(libafl::Error::ShuttingDown) => {}
        Err(e) => return Err(anyhow!("launcher: {e}")),
    }
    summarize(&dir, c.target, jobs, c.quiet)
}

fn client_summaries(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let mut v: Vec<_> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("client-") && n.ends_with(".tsv"))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// One signature across clients.
struct Merged {
    tag: String,
    hits: u64,
    first_at: f64,
    hash: String,
    smallest: Vec<u8>,
}

/// Merges the clients' `client-N.tsv` into one summary (hits summed, first seen and smallest
/// input the least over clients) and writes each signature's smallest input.
fn summarize(
    dir: &std::path::Path,
    target: crate::Target,
    jobs: usize,
    quiet: bool,
) -> Result<Totals> {
    let (mut execs, mut secs, mut entries) = (0u64, 0f64, 0usize);
    let mut sigs: BTreeMap<String, Merged> = BTreeMap::new();
    let files = client_summaries(dir)?;
    for f in &files {
        let text = fs::read_to_string(f)?;
        for line in text.lines() {
            let cols: Vec<&str> = line.splitn(6, '\t').collect();
            match cols.as_slice() {
                ["execs", n, s, e] => {
                    execs += n.parse::<u64>().unwrap_or(0);
                    secs = secs.max(s.parse().unwrap_or(0.0));
                    entries = entries.max(e.parse().unwrap_or(0));
                }
                [tag, hits, at, hash, hex, sig] => {
                    let smallest: Vec<u8> = (0..hex.len() / 2)
                        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
                        .collect();
                    let at: f64 = at.parse().unwrap_or(0.0);
                    let m = sigs.entry(sig.to_string()).or_insert_with(|| Merged {
                        tag: tag.to_string(),
                        hits: 0,
                        first_at: at,
                        hash: hash.to_string(),
                        smallest: smallest.clone(),
                    });
                    m.hits += hits.parse::<u64>().unwrap_or(0);
                    m.first_at = m.first_at.min(at);
                    if smallest.len() < m.smallest.len() {
                        m.smallest = smallest;
                    }
                }
                _ => {}
            }
        }
    }
    // Findings of clients that wrote no summary (Ctrl-C ends a client at once): their reports
    // are on disk, their hit counts are not.
    let merged: Vec<String> = sigs.values().map(|m| m.hash.clone()).collect();
    for e in fs::read_dir(dir)?.filter_map(|e| e.ok()) {
        let path = e.path();
        let hash = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if path.extension().is_none_or(|x| x != "txt") || merged.iter().any(|h| h == hash) {
            continue;
        }
        let report = fs::read_to_string(&path)?;
        let sig = report
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("violation: "))
            .and_then(|l| l.split_once(' '))
            .map_or("?", |(_, sig)| sig);
        sigs.insert(
            sig.to_string(),
            Merged {
                tag: "seen".into(),
                hits: 0,
                first_at: 0.0,
                hash: hash.to_string(),
                smallest: fs::read(path.with_extension("bin")).unwrap_or_default(),
            },
        );
    }
    let secs = secs.max(1e-9);
    let new = sigs.values().filter(|m| m.tag == "NEW").count();
    for m in sigs.values() {
        fs::write(dir.join(&m.hash).with_extension("min.bin"), &m.smallest)?;
    }
    if quiet {
        return Ok(Totals { execs, secs });
    }
    println!(
        "{}: {execs} execs in {secs:.1}s ({:.0}/s) over {} of {jobs} clients, map {entries} \
         entries (the most one client reached), {} distinct finding(s)",
        crate::campaign::target_name(target),
        execs as f64 / secs,
        files.len(),
        sigs.len()
    );
    for (sig, m) in &sigs {
        println!(
            "  {:<5} {:>7} hits  first at {:>6.1}s  {sig}  (smallest input {} bytes)",
            m.tag,
            m.hits,
            m.first_at,
            m.smallest.len()
        );
    }
    let seen = sigs.values().filter(|m| m.tag == "seen").count();
    if seen > 0 {
        println!("  (\"seen\": reported by a client that was interrupted; hits not counted)");
    }
    println!(
        "{new} new and {} known distinct finding(s); reports in {}",
        sigs.len() - new - seen,
        dir.parent().unwrap_or(dir).display()
    );
    Ok(Totals { execs, secs })
}

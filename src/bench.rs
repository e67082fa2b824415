//! Throughput benchmarks. Wall-clock time is measured here, outside the runs, never inside.

use std::time::Instant;

use harness::sched::choice::SplitMix64;
use harness::sched::workload::lock_heavy;
use harness::sched::{Chooser, Executor, InputChooser, Outcome, Pct, RoundRobin, TraceMode};

fn one(label: &str, rounds: u32, chooser: &mut dyn Chooser) {
    let mut ex = Executor::new(TraceMode::Ring(64));
    lock_heavy().spawn(&mut ex, rounds);
    let mut switches: u64 = 0;
    let mut last = None;
    let t = Instant::now();
    let out = ex.run(chooser, u64::MAX, &mut |s| {
        if last != Some(s.task) {
            switches += 1;
            last = Some(s.task);
        }
        true
    });
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(out, Outcome::AllDone, "the benchmark workload must finish");
    let steps = ex.steps();
    println!(
        "{label:<14} {steps:>12} {switches:>12} {secs:>8.3} {:>10.2}M {:>10.2}M",
        steps as f64 / secs / 1e6,
        switches as f64 / secs / 1e6,
    );
}

/// `tdxfuzz bench --scheduler`: yield points per second for 4 tasks over SRCU, an rwlock and a
/// mutex, under three choosers.
pub fn scheduler(rounds: u32) {
    println!("scheduler: 4 tasks x {rounds} rounds of lock_heavy (srcu + mmu_lock rw + mutex)");
    println!(
        "{:<14} {:>12} {:>12} {:>8} {:>11} {:>11}",
        "chooser", "yield points", "switches", "seconds", "points/s", "switches/s"
    );
    one("round-robin", rounds, &mut RoundRobin::new());
    let mut rng = SplitMix64::new(1);
    let bytes: Vec<u8> = (0..1 << 20).map(|_| rng.next_u64() as u8).collect();
    one("input-bytes", rounds, &mut InputChooser::new(&bytes));
    one("pct(d=3)", rounds, &mut Pct::new(7, 3, 1_000_000));
}

/// `tdxfuzz bench --stack`: whole-stack executions per second (decode, build the TD, run the
/// scenario, check) over random inputs, and the scheduler steps they took.
pub fn stack() {
    let mut rng = SplitMix64::new(11);
    let n = 300;
    let mut steps: u64 = 0;
    let mut found = 0;
    let t = Instant::now();
    for _ in 0..n {
        let len = 32 + rng.below(200) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let sc = harness::scenario::decode::decode(&data);
        let cfg = harness::run::RunConfig::new(
            harness::policy::Policy::UPSTREAM,
            TraceMode::Ring(oracle::liveness::RECENT),
        );
        let r = oracle::check::run_scenario(&sc, &cfg);
        steps += r.run.stack.ex.steps();
        found += usize::from(r.violation.is_some());
    }
    let secs = t.elapsed().as_secs_f64();
    println!("stack: {n} random scenarios on upstream in {secs:.2}s");
    println!(
        "  {:.0} execs/s, {:.0} steps/exec, {:.2}M steps/s, {found} with a violation",
        n as f64 / secs,
        steps as f64 / n as f64,
        steps as f64 / secs / 1e6
    );
}

/// What one design cost on the `--sept` workload.
struct SeptCost {
    /// TDH.* SEAMCALLs issued (successful or not) in each phase: build, guest, conversions,
    /// re-accept, teardown.
    seamcalls: [usize; 5],
    /// Host pages in use at the peak (ledger census, every step).
    peak_pages: usize,
    /// Private EPT violations KVM handled (`kvm_tdp_mmu_page_fault` on a private GPA).
    private_faults: usize,
    /// Steps from the start to the end of each KVM_SET_MEMORY_ATTRIBUTES: to shared, to private.
    to_shared: Vec<u64>,
    to_private: Vec<u64>,
    steps: u64,
    /// The oracle's findings (guest memory, S-EPT sync, bugs, ownership after teardown).
    violations: Vec<String>,
}

/// TDH.* notes in the trace so far (one per SEAMCALL, whatever its status).
fn seamcalls(ex: &Executor) -> usize {
    ex.trace()
        .events()
        .filter(|e| matches!(e.point, harness::sched::Point::Note { what, .. } if what.starts_with("TDH.")))
        .count()
}

/// Runs the `--sept` workload under `policy`: build a 2-vCPU TD; vCPU 0 accepts, writes and
/// reads gfns 0x10..0x18 and vCPU 1 gfns 0x200..0x208; the VMM converts 0x10..0x14 to shared
/// one page at a time, then back to private, while vCPU 1 keeps reading its pages; vCPU 0
/// accepts the four again and reads them (zero); teardown.
fn sept_workload(policy: harness::policy::Policy) -> SeptCost {
    use std::cell::RefCell;
    use std::rc::Rc;

    use harness::addr::{Gfn, Gpa};
    use harness::guest::{GuestOp, GuestProgram};
    use harness::stack::{Stack, GUEST_PAGES};

    let pages = 700 + GUEST_PAGES as usize;
    let mut s = Stack::new(policy, pages, TraceMode::Full);
    s.build_runnable(2);
    let host = s.host.clone();
    let mut peak = host.borrow().ledger.census().in_use;
    let mut marks = vec![seamcalls(&s.ex)];
    let gpa = |g: u64| Gpa::new(g << 12);
    let touch = |base: u64| {
        let mut ops = Vec::new();
        for g in base..base + 8 {
            ops.push(GuestOp::Accept { gpa: gpa(g) });
            ops.push(GuestOp::Write {
                gpa: gpa(g),
                value: 0x1000 + g,
            });
            ops.push(GuestOp::Read { gpa: gpa(g) });
        }
        GuestProgram::new(ops)
    };
    // A vCPU's next program continues its old one (the oracle replays every observation).
    let then = |s: &Stack, v: usize, ops: Vec<GuestOp>| {
        let mut p = s.kvm.st.borrow().vcpus[v].guest.clone();
        p.ops.extend(ops);
        p
    };
    let mut run = |s: &mut Stack| {
        let limit = s.ex.steps() + 2_000_000;
        let out = s.ex.run(&mut RoundRobin::new(), limit, &mut |_| {
            peak = peak.max(host.borrow().ledger.census().in_use);
            true
        });
        assert_eq!(out, Outcome::AllDone, "the --sept workload must finish");
        seamcalls(&s.ex)
    };
    // Guest: 16 pages accepted and touched.
    s.spawn_vcpu(0, touch(0x10));
    s.spawn_vcpu(1, touch(0x200));
    marks.push(run(&mut s));
    // Conversions, with vCPU 1 in the guest reading its pages.
    let reads: Vec<GuestOp> = (0..256)
        .map(|i| GuestOp::Read {
            gpa: gpa(0x200 + i % 8),
        })
        .collect();
    let p = then(&s, 1, reads);
    s.spawn_vcpu(1, p);
    let lat: Rc<RefCell<Vec<(bool, u64)>>> = Rc::default();
    let l = lat.clone();
    s.spawn("vmm", move |cx, kvm| async move {
        for private in [false, true] {
            for g in 0x10..0x14 {
                let start = cx.step();
                kvm.set_memory_attributes(&cx, Gfn::new(g), Gfn::new(g + 1), private)
                    .await
                    .expect("KVM_SET_MEMORY_ATTRIBUTES");
                l.borrow_mut().push((private, cx.step() - start));
            }
        }
    });
    marks.push(run(&mut s));
    // The guest accepts the converted pages again.
    let mut ops = Vec::new();
    for g in 0x10..0x14 {
        ops.push(GuestOp::Accept { gpa: gpa(g) });
        ops.push(GuestOp::Read { gpa: gpa(g) });
    }
    let p = then(&s, 0, ops);
    s.spawn_vcpu(0, p);
    marks.push(run(&mut s));
    let mut violations = oracle::sept_sync::check(&s.kvm, true);
    // Teardown.
    s.spawn(
        "destroy",
        |cx, kvm| async move { kvm.destroy_vm(&cx).await },
    );
    marks.push(run(&mut s));
    let kvm = &s.kvm;
    violations.extend(oracle::guest_memory::check(kvm));
    violations.extend(
        kvm.st
            .borrow()
            .bugs
            .iter()
            .map(|b| format!("{}: {}", b.location, b.what)),
    );
    violations.extend(oracle::ownership::check(
        &kvm.module.state(),
        &s.host.borrow(),
        true,
    ));
    violations.extend(s.host.borrow().refused.iter().map(|(_, e)| e.to_string()));
    for v in 0..2 {
        if kvm.st.borrow().vcpus[v].guest.pc != kvm.st.borrow().vcpus[v].guest.ops.len() {
            violations.push(format!("vcpu{v} did not finish its program"));
        }
    }
    let lat = lat.borrow();
    let private_faults =
        s.ex.trace()
            .events()
            .filter(|e| {
                matches!(e.point, harness::sched::Point::YieldArg("kvm_tdp_mmu_page_fault", a)
                if !Gpa::new(a).is_shared())
            })
            .count();
    SeptCost {
        seamcalls: [
            marks[0],
            marks[1] - marks[0],
            marks[2] - marks[1],
            marks[3] - marks[2],
            marks[4] - marks[3],
        ],
        peak_pages: peak,
        private_faults,
        to_shared: lat.iter().filter(|(p, _)| !p).map(|(_, n)| *n).collect(),
        to_private: lat.iter().filter(|(p, _)| *p).map(|(_, n)| *n).collect(),
        steps: s.ex.steps(),
        violations,
    }
}

/// `avg/max` of step counts.
fn avg_max(v: &[u64]) -> String {
    let max = v.iter().copied().max().unwrap_or(0);
    let avg = v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    format!("{avg:.0}/{max}")
}

/// `tdxfuzz bench --sept`: upstream's mirror-root S-EPT against seed 001's S-EPT off to the
/// side (`sept_off_to_side`) on one workload: SEAMCALLs per phase, peak host pages, conversion
/// latency in scheduler steps, and the oracle's verdict.
pub fn sept() {
    println!(
        "sept: 2 vCPUs accept and touch 16 pages; the VMM converts 4 pages to shared and back \
         (one KVM_SET_MEMORY_ATTRIBUTES each, vCPU 1 in the guest); vCPU 0 re-accepts them; \
         teardown. Memslot of {} pages.",
        harness::stack::GUEST_PAGES
    );
    println!(
        "{:<17} {:>9} {:>30} {:>10} {:>8} {:>14} {:>14} {:>8}  violation",
        "policy",
        "SEAMCALLs",
        "build/guest/convert/accept/down",
        "peak pages",
        "pv flts",
        "to-shared a/m",
        "to-private a/m",
        "steps"
    );
    for name in ["upstream", "sept_off_to_side"] {
        let policy = harness::policy::Policy::by_name(name).expect("policy");
        let c = sept_workload(policy);
        let phases = c
            .seamcalls
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("/");
        let verdict = c
            .violations
            .first()
            .cloned()
            .unwrap_or_else(|| "none".into());
        println!(
            "{name:<17} {:>9} {phases:>30} {:>10} {:>8} {:>14} {:>14} {:>8}  {verdict}",
            c.seamcalls.iter().sum::<usize>(),
            c.peak_pages,
            c.private_faults,
            avg_max(&c.to_shared),
            avg_max(&c.to_private),
            c.steps,
        );
    }
}

/// A quiet campaign on the stack target from an empty corpus.
fn campaign(
    policy: harness::policy::Policy,
    stop: crate::campaign::Stop,
    seed: u64,
    dir: std::path::PathBuf,
    stop_on_kind: Option<String>,
) -> crate::campaign::Campaign {
    crate::campaign::Campaign {
        target: crate::Target::Stack,
        policy,
        kernel_bug: None,
        stop,
        seed,
        artifacts: dir,
        known: crate::default_known_dir(),
        corpus: None,
        stop_on_kind,
        quiet: true,
        panic_every: None,
        feedback: true,
        client: None,
    }
}

/// `tdxfuzz bench --engines`: the LibAFL engine with its feedback on, the same engine with it
/// off (the same mutators and seed; no input joins the corpus), and the random loop, each for
/// `secs` seconds on the stack target under upstream from an empty corpus (seed 1), one after
/// the other: execs/s, and the feedback-map entries any input reached at a quarter, half and
/// the end of the run.
pub fn engines(secs: u64) -> anyhow::Result<()> {
    use crate::campaign::{self, Stop};
    use harness::policy::Policy;
    let dir = std::env::temp_dir().join("tdxfuzz-bench-engines");
    let stop = Stop::Seconds(secs);
    let libafl = crate::engine::run(&campaign(
        Policy::UPSTREAM,
        stop,
        1,
        dir.join("libafl"),
        None,
    ))?;
    let mut off = campaign(Policy::UPSTREAM, stop, 1, dir.join("libafl-off"), None);
    off.feedback = false;
    let libafl_off = crate::engine::run(&off)?;
    let random = campaign::run(&campaign(
        Policy::UPSTREAM,
        stop,
        1,
        dir.join("random"),
        None,
    ))?;
    // Two clients, one per core (the machine's other work competes with them).
    let two = crate::jobs::run(
        &campaign(Policy::UPSTREAM, stop, 1, dir.join("jobs2"), None),
        2,
        None,
        None,
    )?;
    let at = |f: &campaign::Found, frac: f64| -> usize {
        let t = secs as f64 * frac;
        f.coverage
            .iter()
            .take_while(|&&(s, _)| s <= t + 0.5)
            .last()
            .map_or(0, |&(_, e)| e)
    };
    println!("engines: stack target, upstream, seed 1, {secs} s each on one core, empty corpus");
    println!(
        "{:<8} {:>10} {:>9} {:>11} {:>12} {:>12} {:>12} {:>9}",
        "engine", "execs", "execs/s", "steps/exec", "map @25%", "map @50%", "map @100%", "findings"
    );
    for (name, f) in [
        ("libafl", &libafl),
        ("no-fb", &libafl_off),
        ("random", &random),
    ] {
        println!(
            "{name:<8} {:>10} {:>9.0} {:>11.0} {:>12} {:>12} {:>12} {:>9}",
            f.execs,
            f.execs as f64 / secs as f64,
            f.steps as f64 / f.execs.max(1) as f64,
            at(f, 0.25),
            at(f, 0.5),
            at(f, 1.0),
            f.new + f.known
        );
    }
    println!(
        "libafl --jobs 2: {} execs, {:.0} execs/s, {:.2} times one job",
        two.execs,
        two.execs as f64 / two.secs,
        (two.execs as f64 / two.secs) / (libafl.execs as f64 / secs as f64)
    );
    Ok(())
}

/// `tdxfuzz bench --detect`: for every policy expected to break an invariant, `seeds`
/// campaigns of each engine from an empty corpus, each stopped at its first new finding of
/// the expected kind or after `limit` seconds: the median and the longest time to detect.
pub fn detect(seeds: u64, limit: u64, engines: &[crate::Engine]) -> anyhow::Result<()> {
    use crate::campaign::{self, Stop};
    use harness::policy::Policy;
    let dir = std::env::temp_dir().join("tdxfuzz-bench-detect");
    println!(
        "time to detect: stack target, empty corpus, seeds 1..={seeds}, at most {limit} s per \
         campaign, one core"
    );
    let name = |e: &crate::Engine| match e {
        crate::Engine::Libafl => "libafl",
        crate::Engine::Random => "random",
    };
    let mut head = format!("{:<34} {:<28}", "policy", "expected");
    for e in engines {
        head += &format!(
            " {:>14} {:>14}",
            format!("{} median", name(e)),
            format!("{} max", name(e))
        );
    }
    println!("{head}");
    for (policy, expected) in Policy::ALL {
        if expected == "none" {
            continue;
        }
        let mut cells = Vec::new();
        for e in engines {
            let engine = name(e);
            let mut times: Vec<Option<f64>> = Vec::new();
            for seed in 1..=seeds {
                let c = campaign(
                    policy,
                    Stop::Seconds(limit),
                    seed,
                    dir.join(format!("{}-{engine}-{seed}", policy.name)),
                    Some(expected.to_string()),
                );
                let found = match e {
                    crate::Engine::Libafl => crate::engine::run(&c)?,
                    crate::Engine::Random => campaign::run(&c)?,
                };
                times.push(found.detected_at);
            }
            // Misses sort last (as "> limit").
            times.sort_by(|a, b| match (a, b) {
                (Some(x), Some(y)) => x.total_cmp(y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            });
            let show = |t: Option<f64>| t.map_or(format!("> {limit} s"), |t| format!("{t:.1} s"));
            cells.push(show(times[times.len() / 2]));
            cells.push(show(*times.last().expect("at least one seed")));
        }
        let mut row = format!("{:<34} {:<28}", policy.name, expected);
        for c in cells {
            row += &format!(" {c:>14}");
        }
        println!("{row}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

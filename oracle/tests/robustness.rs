//! Bad input never crashes the harness: random bytes always decode and run to a verdict, and
//! mutated text either parses or gives an error with its line and column.

use harness::policy::Policy;
use harness::run::RunConfig;
use harness::scenario::text::{parse, print};
use harness::sched::choice::SplitMix64;
use harness::sched::TraceMode;

#[test]
fn random_bytes_run_to_a_verdict() {
    let mut rng = SplitMix64::new(99);
    for i in 0..300u64 {
        let len = (i % 180) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let sc = harness::scenario::decode::decode(&data);
        let r =
            oracle::check::run_scenario(&sc, &RunConfig::new(Policy::UPSTREAM, TraceMode::Ring(8)));
        // Bounded: the two phases' budgets plus the build.
        assert!(r.run.stack.ex.steps() < 100_000);
    }
}

#[test]
fn mutated_text_parses_or_points_at_the_error() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus/regressions");
    let seeds: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    let mut rng = SplitMix64::new(5);
    let alphabet = b" \n0x123456789abcdefvcpusmtakrdlwg_#-";
    let mut ok = 0;
    for i in 0..1000usize {
        let mut t: Vec<u8> = seeds[i % seeds.len()].clone().into_bytes();
        for _ in 0..1 + rng.below(4) {
            let pos = rng.below(t.len() as u64 + 1) as usize;
            match rng.below(3) {
                0 if pos < t.len() => {
                    t.remove(pos);
                }
                1 => t.insert(pos, alphabet[rng.below(alphabet.len() as u64) as usize]),
                _ if pos < t.len() => t[pos] = alphabet[rng.below(alphabet.len() as u64) as usize],
                _ => {}
            }
        }
        let text = String::from_utf8_lossy(&t);
        match parse(&text) {
            Ok(s) => {
                ok += 1;
                assert_eq!(parse(&print(&s)).unwrap(), s);
            }
            Err(e) => {
                let lines = text.lines().count().max(1);
                assert!(e.line >= 1 && e.line <= lines + 1, "{e} (of {lines} lines)");
                assert!(e.col >= 1);
            }
        }
    }
    assert!(
        ok > 0 && ok < 1000,
        "mutations should sometimes still parse ({ok})"
    );
}

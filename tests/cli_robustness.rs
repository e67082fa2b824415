//! Bad input never crashes `tdxfuzz run`: random byte strings and mutated scenario texts give
//! exit code 0 (clean), 1 (violation) or 2 (bad input, with file, line and column), never a
//! panic, each run bounded. The test runs a sample; `TDXFUZZ_ROBUSTNESS=10000` runs 10,000
//! random inputs and a tenth as many mutated texts (the long run of the closing note).

use std::path::{Path, PathBuf};
use std::process::Command;

use harness::sched::choice::SplitMix64;

fn count() -> usize {
    std::env::var("TDXFUZZ_ROBUSTNESS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400)
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tdxfuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `tdxfuzz run` on the files in chunks; every exit code must be 0, 1 or 2, stderr free
/// of panics, and each bad-input message must name its file, line and column.
fn run_all(files: &[PathBuf]) -> [usize; 3] {
    let mut codes = [0usize; 3];
    for chunk in files.chunks(200) {
        let out = Command::new(env!("CARGO_BIN_EXE_tdxfuzz"))
            .arg("run")
            .args(chunk)
            .output()
            .expect("run tdxfuzz");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        let code = out.status.code().expect("exited, not killed");
        assert!((0..=2).contains(&code), "exit {code}: {stderr}");
        for line in stderr.lines().filter(|l| l.starts_with("error: ")) {
            assert!(
                line.contains(".tdx: line ") && line.contains("column "),
                "{line}"
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let verdicts = stdout
            .lines()
            .filter(|l| l.starts_with("clean: ") || l.starts_with("violation: "))
            .count();
        let bad = stderr.lines().filter(|l| l.starts_with("error: ")).count();
        assert_eq!(verdicts + bad, chunk.len(), "one verdict per file");
        codes[code as usize] += 1;
    }
    codes
}

#[test]
fn random_bytes_give_exit_codes_0_1_2() {
    let dir = scratch("bytes");
    let mut rng = SplitMix64::new(0x7d_f022);
    let files: Vec<PathBuf> = (0..count())
        .map(|i| {
            let len = rng.below(300) as usize;
            let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            let p = dir.join(format!("{i}.bin"));
            std::fs::write(&p, data).unwrap();
            p
        })
        .collect();
    run_all(&files);
    std::fs::remove_dir_all(dir).unwrap();
}

/// One to four byte-level edits (delete, insert or replace with scenario-ish characters).
fn mutate(rng: &mut SplitMix64, text: &str) -> String {
    let alphabet = b" \n0x123456789abcdefvcpusmtakrdlwg_#-";
    let mut t = text.as_bytes().to_vec();
    for _ in 0..1 + rng.below(4) {
        let pos = rng.below(t.len() as u64 + 1) as usize;
        let c = alphabet[rng.below(alphabet.len() as u64) as usize];
        match rng.below(3) {
            0 if pos < t.len() => {
                t.remove(pos);
            }
            1 => t.insert(pos, c),
            _ if pos < t.len() => t[pos] = c,
            _ => {}
        }
    }
    String::from_utf8_lossy(&t).into_owned()
}

#[test]
fn mutated_scenario_texts_give_exit_codes_0_1_2() {
    let regressions = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/regressions");
    let mut seeds: Vec<PathBuf> = std::fs::read_dir(regressions)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    seeds.sort();
    let seeds: Vec<String> = seeds
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let dir = scratch("text");
    let mut rng = SplitMix64::new(0x5ce_0a12);
    let n = (count() / 10).max(100);
    let files: Vec<PathBuf> = (0..n)
        .map(|i| {
            let p = dir.join(format!("{i}.tdx"));
            std::fs::write(&p, mutate(&mut rng, &seeds[i % seeds.len()])).unwrap();
            p
        })
        .collect();
    let codes = run_all(&files);
    assert!(codes[2] > 0, "some mutations must be bad input: {codes:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A raw input replays with the bounds the campaign ran it under (`RunConfig::for_fuzzing`:
/// under `sept_off_to_side` a 0x20-page memslot), as `--fuzzing` makes a text scenario do;
/// without `--fuzzing` a text scenario gets the full 2048 pages. The steps say which: the
/// design maps and unmaps every page of its memslot.
#[test]
fn raw_inputs_replay_with_the_campaigns_bounds() {
    let dir = scratch("bounds");
    let text = "vcpus 1\ntask vcpu0\n  accept 0x10\n  read 0x10\ntask vmm0\n  destroy\n";
    let sc = harness::scenario::text::parse(text).unwrap();
    let txt = dir.join("s.tdx");
    let raw = dir.join("s.bin");
    std::fs::write(&txt, text).unwrap();
    std::fs::write(&raw, harness::scenario::wire::encode(&sc)).unwrap();
    let steps = |f: &Path, fuzzing: bool| -> String {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tdxfuzz"));
        c.args(["run", "--policy", "sept_off_to_side"]).arg(f);
        if fuzzing {
            c.arg("--fuzzing");
        }
        let out = String::from_utf8(c.output().unwrap().stdout).unwrap();
        assert!(out.starts_with("clean: "), "{out}");
        out.split('(')
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .to_string()
    };
    let full = steps(&txt, false);
    let fuzzing = steps(&txt, true);
    assert_ne!(full, fuzzing, "the memslot size made no difference");
    assert_eq!(steps(&raw, false), fuzzing);
}

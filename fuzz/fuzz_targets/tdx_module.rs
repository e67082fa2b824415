//! The TDX module alone: arbitrary SEAMCALL/TDCALL programs with fuzzed interleavings, then the
//! upstream teardown; any broken module invariant or unreturned page is a crash.
#![no_main]

#[path = "common/extra_counters.rs"]
mod extra_counters;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let bad = extra_counters::with_model_feedback(|| oracle::targets::tdx_module(data));
    assert!(
        bad.is_empty(),
        "module invariants broken:\n{}",
        bad.join("\n")
    );
});

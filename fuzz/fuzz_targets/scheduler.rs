//! Lock programs under fuzzed schedules: a replay that diverges panics; deadlocks are expected
//! findings of random programs, so only harness bugs crash this target.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = oracle::targets::scheduler(data);
});

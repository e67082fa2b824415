//! The whole stack on the upstream policy: any violation not already known
//! (`oracle::targets::is_known`) is a crash (a finding to triage).
#![no_main]

#[path = "common/extra_counters.rs"]
mod extra_counters;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let found = extra_counters::with_model_feedback(|| {
        oracle::targets::stack_new_findings(harness::policy::Policy::UPSTREAM, data)
    });
    if let Some(v) = found {
        panic!("{v}");
    }
});

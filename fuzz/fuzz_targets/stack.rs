//! The whole stack on the upstream policy: any violation not already known
//! (`oracle::targets::is_known`) is a crash (a finding to triage).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(v) = oracle::targets::stack_new_findings(harness::policy::Policy::UPSTREAM, data) {
        panic!("{v}");
    }
});

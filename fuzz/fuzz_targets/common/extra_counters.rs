//! The model's feedback map (`harness::coverage`) as libFuzzer extra counters: libFuzzer reads
//! the ELF section `__libfuzzer_extra_counters` after every input, beside the compiler's edge
//! counters, so the cargo-fuzz targets are rewarded for new model states too (SEAMCALL answers,
//! interleavings, retry depths, ...), as the LibAFL engine is.

use harness::coverage::{self, MAP_SIZE};

#[used]
#[link_section = "__libfuzzer_extra_counters"]
static mut EXTRA_COUNTERS: [u8; MAP_SIZE] = [0; MAP_SIZE];

/// Runs `f` with the map on and copies its hits into the extra counters (libFuzzer zeroes them
/// before each input).
pub fn with_model_feedback<T>(f: impl FnOnce() -> T) -> T {
    if !coverage::enabled() {
        coverage::enable(true);
    }
    let out = f();
    // SAFETY: libFuzzer runs inputs on this one thread and reads the section only between them.
    let counters = unsafe { &mut *std::ptr::addr_of_mut!(EXTRA_COUNTERS) };
    coverage::take_into(counters, |_| {});
    out
}

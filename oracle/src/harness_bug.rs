//! `harness_bug`: a panic inside the model or the oracle. One bad input must not end a
//! campaign and lose what it found, so every engine runs the target through `catch`, which
//! turns the panic into a finding with a stable signature (the message's first line with its
//! numbers masked, and the source location) that is saved and bucketed like any other.

use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};

use crate::{Violation, ViolationKind};

thread_local! {
    /// Where the last panic on this thread happened (the hook records it; the payload lacks it).
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs a panic hook that records the panic's location for `catch` and prints nothing (a
/// campaign reports harness bugs as findings). Call once, before fuzzing.
pub fn install_quiet_hook() {
    panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        LAST_PANIC.with(|p| *p.borrow_mut() = Some(at));
    }));
}

/// Runs `f`; a panic becomes a `harness_bug` violation.
pub fn catch(f: impl FnOnce() -> Option<Violation>) -> Option<Violation> {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic with a non-string payload".to_string());
            let at = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_default();
            let first = msg.lines().next().unwrap_or("").to_string();
            Some(Violation {
                kind: ViolationKind::HarnessBug,
                location: "harness panic",
                key: format!("{} at {at}", crate::check::stable(&first)),
                detail: format!("the harness panicked at {at}: {msg}"),
                step: 0,
                tasks: Vec::new(),
                recent: Vec::new(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_a_finding_and_the_next_input_runs() {
        // (The quiet hook is process-wide; tests leave the default one in place.)
        let v = catch(|| panic!("setup must finish after 1000 steps")).unwrap();
        assert_eq!(v.kind, ViolationKind::HarnessBug);
        assert!(v.key.contains("setup must finish"), "{}", v.key);
        assert!(!v.key.contains("1000"), "digits are masked: {}", v.key);
        // Same bug, other numbers: same signature.
        let w = catch(|| panic!("setup must finish after 2000 steps")).unwrap();
        assert_eq!(v.key, w.key);
        assert_eq!(catch(|| None), None);
    }
}

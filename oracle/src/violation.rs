//! A violation: what broke, where, and the evidence.

use std::fmt;

/// The six invariant kinds (spec section 3), and a panic of the harness itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ViolationKind {
    MirrorDesync,
    PageOwnership,
    MustNotFail,
    Liveness,
    GuestMemory,
    StateMachine,
    /// The model or the oracle panicked on this input: a bug of tdxfuzz, not of the kernel.
    HarnessBug,
}

impl ViolationKind {
    pub const ALL: [ViolationKind; 7] = [
        ViolationKind::MirrorDesync,
        ViolationKind::PageOwnership,
        ViolationKind::MustNotFail,
        ViolationKind::Liveness,
        ViolationKind::GuestMemory,
        ViolationKind::StateMachine,
        ViolationKind::HarnessBug,
    ];

    /// The name used on the command line, in `expect` lines and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            ViolationKind::MirrorDesync => "mirror_desync",
            ViolationKind::PageOwnership => "page_ownership",
            ViolationKind::MustNotFail => "must_not_fail",
            ViolationKind::Liveness => "liveness",
            ViolationKind::GuestMemory => "guest_memory",
            ViolationKind::StateMachine => "state_machine",
            ViolationKind::HarnessBug => "harness_bug",
        }
    }

    /// Parses a kind name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One broken invariant with its evidence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: ViolationKind,
    /// Upstream function (or SEAMCALL leaf) where it was detected.
    pub location: &'static str,
    /// The distinguishing part of the signature (e.g. the lock names of a cycle, or the op
    /// kinds involved); no addresses, steps or task numbers, so it is stable across inputs.
    pub key: String,
    /// Human-readable detail with the concrete values.
    pub detail: String,
    /// Step at which it was detected.
    pub step: u64,
    /// Names of the tasks involved.
    pub tasks: Vec<String>,
    /// The last trace lines before detection.
    pub recent: Vec<String>,
}

impl Violation {
    /// `kind:location:key`, the dedupe key of triage and the second word of `violation:` lines.
    pub fn signature(&self) -> String {
        format!("{}:{}:{}", self.kind, self.location, self.key)
    }

    /// A short stable hash of the signature, for file names.
    pub fn signature_hash(&self) -> String {
        let h = self
            .signature()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
        format!("{h:016x}")
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "violation: {} {}", self.kind, self.signature())?;
        writeln!(f, "  at step {} in {}", self.step, self.location)?;
        writeln!(f, "  {}", self.detail)?;
        if !self.tasks.is_empty() {
            writeln!(f, "  tasks: {}", self.tasks.join(", "))?;
        }
        if !self.recent.is_empty() {
            writeln!(f, "  last {} events:", self.recent.len())?;
            for line in &self.recent {
                writeln!(f, "    {line}")?;
            }
        }
        Ok(())
    }
}

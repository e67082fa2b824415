//! `aftermath`: what an injected SEAMCALL failure (`inject_error`) may leave behind on upstream,
//! and nothing more. KVM's reports answering the failure are not bugs (`BugReport::injected`);
//! once such a report has bugged the VM, upstream also accepts -EIO from every later ioctl and,
//! for a private page whose zap failed (`KvmState::abandoned`), the mirror/S-EPT divergence at
//! its gfn and the page going back to the host while the TDX module still holds it (the window
//! "KVM: TDX: Drop superfluous page pinning in S-EPT management" accepts). Every other check
//! still judges the run: a desync elsewhere, a leak, a guest entry or a SEAMCALL after death, a
//! hang.

use std::collections::BTreeSet;

use harness::addr::{Gfn, Pfn};
use harness::kvm::Kvm;
use harness::tdx_module::{Leaf, Status};

/// What the oracle lets pass because an injected failure explains it.
#[derive(Clone, Debug, Default)]
pub struct Tolerated {
    /// The VM was bugged by KVM's answer to an injected failure.
    pub bugged: bool,
    pfns: BTreeSet<Pfn>,
    gfns: BTreeSet<Gfn>,
    /// Statuses of injected TDH.VP.ENTER failures: KVM_EXIT_INTERNAL_ERROR is upstream's answer.
    entry_failures: Vec<Status>,
}

impl Tolerated {
    /// What `kvm`'s run may show because of its injected failures.
    pub fn of(kvm: &Kvm) -> Tolerated {
        let st = kvm.st.borrow();
        let bugged = crate::must_not_fail::bugged_by_injection(&st.bugs);
        let entry_failures = kvm
            .module
            .state()
            .injected
            .calls
            .failures
            .iter()
            .filter(|f| f.leaf == Leaf::VpEnter)
            .map(|f| f.status)
            .collect();
        let (gfns, pfns) = if bugged {
            st.abandoned.iter().copied().unzip()
        } else {
            Default::default()
        };
        Tolerated {
            bugged,
            pfns,
            gfns,
            entry_failures,
        }
    }

    /// Whether a refused move of `pfn` is the abandoned page going back to the host.
    pub fn page(&self, pfn: Option<Pfn>) -> bool {
        pfn.is_some_and(|p| self.pfns.contains(&p))
    }

    /// Whether KVM_EXIT_INTERNAL_ERROR with `status` answers an injected VP.ENTER failure.
    pub fn entry_failure(&self, status: Status) -> bool {
        self.entry_failures.contains(&status)
    }

    /// `findings` without those about an abandoned page or its gfn.
    pub fn filter(&self, findings: Vec<String>) -> Vec<String> {
        let tokens: Vec<String> = self
            .pfns
            .iter()
            .map(|p| p.to_string())
            .chain(self.gfns.iter().map(|g| g.to_string()))
            .collect();
        findings
            .into_iter()
            .filter(|f| !tokens.iter().any(|t| mentions(f, t)))
            .collect()
    }
}

/// Whether `text` names `token` (`pfn:0x12` is not named by `pfn:0x123`).
fn mentions(text: &str, token: &str) -> bool {
    text.match_indices(token).any(|(i, _)| {
        !text[i + token.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_hexdigit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_named_only_whole() {
        let rows = [
            ("pfn:0x12 leaked", "pfn:0x12", true),
            ("pfn:0x123 leaked", "pfn:0x12", false),
            ("at gfn:0x10, pfn:0x12", "gfn:0x10", true),
            ("pfn:0x120 and pfn:0x12", "pfn:0x12", true),
            ("nothing here", "pfn:0x12", false),
        ];
        for (text, token, want) in rows {
            assert_eq!(mentions(text, token), want, "{text} / {token}");
        }
    }

    #[test]
    fn only_abandoned_pages_are_filtered() {
        let t = Tolerated {
            bugged: true,
            pfns: [Pfn::new(0x1019)].into(),
            gfns: [Gfn::new(0x10)].into(),
            entry_failures: Vec::new(),
        };
        let kept = t.filter(vec![
            "pfn:0x1019 neither free nor deliberately leaked".into(),
            "mirror leaf gfn:0x10 missing in the S-EPT".into(),
            "pfn:0x101a leaked".into(),
        ]);
        assert_eq!(kept, vec!["pfn:0x101a leaked".to_string()]);
        assert!(t.page(Some(Pfn::new(0x1019))));
        assert!(!t.page(Some(Pfn::new(0x101a))) && !t.page(None));
    }
}

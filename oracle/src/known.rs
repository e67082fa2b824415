//! Known findings: inputs of findings on upstream that are understood and written up
//! (`corpus/known/`, README "Findings"). A campaign replays them first and remembers their
//! signatures; a finding with one of those signatures is reported once as known and does not
//! count as new, so that what is new stands out.

use std::collections::BTreeMap;

use harness::policy::Policy;
use harness::run::RunConfig;
use harness::scenario::Scenario;
use harness::sched::TraceMode;

use crate::Violation;

/// Signatures of the known findings, each with the name of the input that shows it.
#[derive(Clone, Debug, Default)]
pub struct Known {
    sigs: BTreeMap<String, String>,
}

impl Known {
    /// Replays each `(name, scenario)` under `policy`; those that give a violation become known
    /// signatures. Returns the set and the names of inputs that ran clean (stale entries).
    pub fn replay<'a>(
        inputs: impl IntoIterator<Item = (String, &'a Scenario)>,
        policy: Policy,
    ) -> (Known, Vec<String>) {
        let mut known = Known::default();
        let mut clean = Vec::new();
        for (name, sc) in inputs {
            let cfg = RunConfig::new(policy, TraceMode::Ring(crate::liveness::RECENT));
            match crate::check::run_scenario(sc, &cfg).violation {
                Some(v) => {
                    known.sigs.entry(v.signature()).or_insert(name);
                }
                None => clean.push(name),
            }
        }
        (known, clean)
    }

    /// The known input whose signature `v` has, if any.
    pub fn name_of(&self, v: &Violation) -> Option<&str> {
        self.sigs.get(&v.signature()).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.sigs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sigs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use harness::scenario::text::parse;

    const FAST_ZAP_VS_EPT_LOOP: &str = include_str!("../../corpus/known/fast-zap-vs-ept-loop.tdx");

    #[test]
    fn a_known_input_names_its_signature_and_nothing_else() {
        let sc = parse(FAST_ZAP_VS_EPT_LOOP).unwrap();
        let clean = parse("vcpus 1\ntask vcpu0\n  accept 0x10\n").unwrap();
        let (known, stale) = Known::replay(
            [("fast-zap".to_string(), &sc), ("clean".to_string(), &clean)],
            Policy::UPSTREAM,
        );
        assert_eq!(known.len(), 1);
        assert_eq!(stale, ["clean"]);
        let cfg = RunConfig::new(Policy::UPSTREAM, TraceMode::Ring(8));
        let v = crate::check::run_scenario(&sc, &cfg).violation.unwrap();
        assert_eq!(known.name_of(&v), Some("fast-zap"));
        let other = Violation {
            key: "something else".into(),
            ..v
        };
        assert_eq!(known.name_of(&other), None);
    }
}

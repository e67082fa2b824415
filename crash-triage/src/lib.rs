//! Crash triage: bucket findings by signature so that one bug is one report, keeping the
//! smallest input seen for each bucket.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use oracle::Violation;

/// One distinct finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// The first violation seen with this signature.
    pub violation: Violation,
    /// How many inputs hit it.
    pub hits: u64,
    /// The smallest input that hit it (ties keep the earlier one).
    pub smallest: Vec<u8>,
}

/// Findings keyed by signature, in signature order (deterministic reports).
#[derive(Clone, Debug, Default)]
pub struct Buckets {
    map: BTreeMap<String, Bucket>,
}

impl Buckets {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a finding; returns true if its signature is new.
    pub fn add(&mut self, v: &Violation, input: &[u8]) -> bool {
        let sig = v.signature();
        match self.map.get_mut(&sig) {
            Some(b) => {
                b.hits += 1;
                if input.len() < b.smallest.len() {
                    b.smallest = input.to_vec();
                }
                false
            }
            None => {
                self.map.insert(
                    sig,
                    Bucket {
                        violation: v.clone(),
                        hits: 1,
                        smallest: input.to_vec(),
                    },
                );
                true
            }
        }
    }

    /// Number of distinct signatures.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Buckets in signature order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Bucket)> {
        self.map.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oracle::ViolationKind;

    fn v(key: &str, step: u64) -> Violation {
        Violation {
            kind: ViolationKind::Liveness,
            location: "x",
            key: key.into(),
            detail: format!("at {step}"),
            step,
            tasks: vec![],
            recent: vec![],
        }
    }

    #[test]
    fn dedupes_by_signature_and_keeps_smallest() {
        let mut b = Buckets::new();
        assert!(b.add(&v("a", 1), &[1, 2, 3]));
        assert!(!b.add(&v("a", 9), &[4]));
        assert!(b.add(&v("b", 1), &[5, 6]));
        assert_eq!(b.len(), 2);
        let (sig, a) = b.iter().next().unwrap();
        assert_eq!(sig, "liveness:x:a");
        assert_eq!(a.hits, 2);
        assert_eq!(a.smallest, vec![4]);
        assert_eq!(a.violation.step, 1);
    }
}

//! Keeping label cardinality bounded.
//!
//! Every distinct label value is a time series that Prometheus stores for weeks, so a value
//! taken from outside the code (a model name a client typed, one of thousands of key aliases)
//! must not create series without limit.

use std::collections::HashSet;
use std::sync::RwLock;

/// Value used for an empty or missing label (e.g. a key without an alias, a request without a
/// key).
pub const NONE: &str = "none";
/// Value that stands for every value beyond the limit, or outside the allowed set.
pub const OTHER: &str = "other";

/// The label values one label may take: the first `limit` distinct values seen (later ones are
/// reported as [`OTHER`]).
#[derive(Debug)]
pub struct BoundedValues {
    seen: RwLock<HashSet<String>>,
    limit: usize,
}

impl BoundedValues {
    /// Admits the first `limit` distinct values.
    pub fn first_seen(limit: usize) -> Self {
        Self {
            seen: RwLock::new(HashSet::new()),
            limit,
        }
    }

    /// The label value to record for `value`.
    pub fn label(&self, value: Option<&str>) -> String {
        let value = match value {
            None | Some("") => return NONE.to_string(),
            Some(v) => v,
        };
        // A poisoned lock only means another thread panicked mid-insert; the set is still valid.
        let seen = self.seen.read().unwrap_or_else(|e| e.into_inner());
        if seen.contains(value) {
            return value.to_string();
        }
        if seen.len() >= self.limit {
            return OTHER.to_string();
        }
        drop(seen);
        let mut seen = self.seen.write().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= self.limit && !seen.contains(value) {
            return OTHER.to_string();
        }
        seen.insert(value.to_string());
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_seen_admits_up_to_the_limit_then_reports_other() {
        let values = BoundedValues::first_seen(2);
        assert_eq!(values.label(Some("a")), "a");
        assert_eq!(values.label(Some("b")), "b");
        assert_eq!(values.label(Some("c")), OTHER);
        assert_eq!(
            values.label(Some("a")),
            "a",
            "admitted values stay admitted"
        );
        assert_eq!(values.label(None), NONE);
        assert_eq!(values.label(Some("")), NONE);
    }
}

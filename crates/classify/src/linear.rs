//! The linear-scan oracle.
//!
//! Rules are kept sorted by (priority, id) and a lookup returns the first
//! that matches: the definition of the answer, against which the fast
//! classifier is tested rule set by rule set and trace by trace.

use crate::rule::IdAlloc;
use crate::{Classifier, Key, Match, Rule, RuleError, RuleId};

/// A classifier that tests every rule in priority order.
#[derive(Debug, Clone, Default)]
pub struct LinearScan {
    /// Sorted by (priority, id).
    rules: Vec<(Rule, RuleId)>,
    ids: IdAlloc,
}

impl LinearScan {
    /// An empty classifier.
    pub fn new() -> LinearScan {
        LinearScan::default()
    }

    /// A classifier holding `rules`; the i-th rule gets id `i`.
    pub fn from_rules(rules: impl IntoIterator<Item = Rule>) -> Result<LinearScan, RuleError> {
        let mut c = LinearScan::new();
        for rule in rules {
            rule.validate()?;
            let id = RuleId(c.ids.alloc()?);
            c.rules.push((rule, id));
        }
        c.rules.sort_by_key(|(r, id)| (r.priority, *id));
        Ok(c)
    }

    /// The rule installed under `id`.
    pub fn get(&self, id: RuleId) -> Option<&Rule> {
        self.rules.iter().find(|(_, i)| *i == id).map(|(r, _)| r)
    }
}

impl Classifier for LinearScan {
    fn insert(&mut self, rule: Rule) -> Result<RuleId, RuleError> {
        rule.validate()?;
        let id = RuleId(self.ids.alloc()?);
        let at = self
            .rules
            .partition_point(|(r, i)| (r.priority, *i) < (rule.priority, id));
        self.rules.insert(at, (rule, id));
        Ok(id)
    }

    fn remove(&mut self, id: RuleId) -> bool {
        match self.rules.iter().position(|(_, i)| *i == id) {
            Some(at) => {
                self.rules.remove(at);
                self.ids.free(id.0);
                true
            }
            None => false,
        }
    }

    fn lookup(&self, key: &Key) -> Option<Match> {
        self.rules.iter().find(|(r, _)| r.matches(key)).map(|(r, id)| Match {
            id: *id,
            priority: r.priority,
            action: r.action,
        })
    }

    fn len(&self) -> usize {
        self.rules.len()
    }

    fn memory_bytes(&self) -> usize {
        self.rules.capacity() * size_of::<(Rule, RuleId)>() + self.ids.memory_bytes()
    }
}

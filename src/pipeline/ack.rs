//! End-to-end acknowledgement: a Kafka offset is committed only after every result derived from
//! it (and from every earlier offset of the same partition) was accepted by the sinks.
//!
//! Each message is registered with the number of units it produced (alerts, or one dead letter);
//! each delivered unit calls [`AckTracker::done`]. Per partition we keep the pending messages in
//! offset order; the commit point is the first offset still pending (or one past the last done).

use std::collections::{BTreeMap, HashMap};

/// Where an input came from. Files replayed without Kafka use topic "file" and partition 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AckToken {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// ```
/// use blink::pipeline::{AckToken, AckTracker};
/// let tok = |offset| AckToken { topic: "alerts".into(), partition: 0, offset };
/// let mut acks = AckTracker::default();
/// acks.register(&tok(41), 1);
/// acks.register(&tok(42), 2); // a container with two alerts
/// assert_eq!(acks.done(&tok(42)), (None, false));
/// assert_eq!(acks.done(&tok(42)), (Some(41), true)); // 41 still pending: commit stays at 41
/// assert_eq!(acks.done(&tok(41)), (Some(43), true)); // everything delivered: next to read is 43
/// ```
#[derive(Debug, Default)]
pub struct AckTracker {
    /// (topic, partition) → offset → units still outstanding.
    pending: HashMap<(String, i32), BTreeMap<i64, usize>>,
    /// (topic, partition) → highest offset seen done + 1 (Kafka's "next offset to read").
    done_to: HashMap<(String, i32), i64>,
}

impl AckTracker {
    /// Register a message that produced `units` results. Messages of one partition must be
    /// registered in offset order (the decode stage is sequential).
    /// Returns a commit point when `units == 0` lets it advance at once.
    pub fn register(&mut self, token: &AckToken, units: usize) -> Option<i64> {
        let key = (token.topic.clone(), token.partition);
        let entry = self.pending.entry(key.clone()).or_default();
        if units > 0 {
            entry.insert(token.offset, units);
            None
        } else {
            let head = entry.keys().next().copied();
            let to = self.done_to.entry(key).or_insert(token.offset + 1);
            *to = (*to).max(token.offset + 1);
            match head {
                Some(_) => None,
                None => Some(*to),
            }
        }
    }

    /// One unit of `token`'s message was delivered. Returns the new commit point of the
    /// partition when it advanced, and whether the message is now complete.
    pub fn done(&mut self, token: &AckToken) -> (Option<i64>, bool) {
        let key = (token.topic.clone(), token.partition);
        let Some(entry) = self.pending.get_mut(&key) else { return (None, false) };
        let Some(left) = entry.get_mut(&token.offset) else { return (None, false) };
        *left = left.saturating_sub(1);
        if *left > 0 {
            return (None, false);
        }
        entry.remove(&token.offset);
        let to = self.done_to.entry(key).or_insert(token.offset + 1);
        *to = (*to).max(token.offset + 1);
        // Registration is in offset order, so everything before the first pending offset is done.
        let commit = entry.keys().next().copied().unwrap_or(*to);
        (Some(commit), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(offset: i64) -> AckToken {
        AckToken { topic: "t".into(), partition: 0, offset }
    }

    #[test]
    fn commit_waits_for_earlier_offsets() {
        let mut t = AckTracker::default();
        t.register(&tok(0), 2);
        t.register(&tok(1), 1);
        // Offset 1 finishes first: the commit point may not pass offset 0.
        assert_eq!(t.done(&tok(1)), (Some(0), true));
        assert_eq!(t.done(&tok(0)), (None, false));
        assert_eq!(t.done(&tok(0)), (Some(2), true));
    }

    #[test]
    fn empty_message_commits_when_nothing_is_pending() {
        let mut t = AckTracker::default();
        assert_eq!(t.register(&tok(5), 0), Some(6));
        t.register(&tok(6), 1);
        assert_eq!(t.register(&tok(7), 0), None);
        assert_eq!(t.done(&tok(6)), (Some(8), true));
    }

    #[test]
    fn unknown_tokens_are_ignored() {
        let mut t = AckTracker::default();
        assert_eq!(t.done(&tok(3)), (None, false));
    }
}

//! The pipe-holder search, paced. A walk over every fd on the host is the
//! costliest lookup a stall asks for (seconds on a big node), and a process
//! whose threads keep blocking on pipes would otherwise have the session
//! walk the host for each one and report nothing else meanwhile.
//!
//! Two rules bound it: an answer is reused for a few seconds per (reader,
//! fd, pipe), and the searches share a budget of wall time that refills at
//! `REFILL_PER_SEC`; when it is spent the holders are not searched (the
//! stall is reported without them, and nothing that needs them is
//! claimed) and the skip is counted.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::proc::Holders;

/// Search time earned per second of wall time: at most a fifth of the
/// session's time goes to holder searches under a flood.
const REFILL_PER_SEC: Duration = Duration::from_millis(200);
/// Search time saved up while nothing asks: what one search on a big host
/// may take when it is rare.
const MAX_SAVED: Duration = Duration::from_secs(1);
/// Below this, a search would be cut short before it found anything.
const MIN_SEARCH: Duration = Duration::from_millis(20);
/// How long an answer is reused. A pipe's holders change when a process
/// forks, closes or exits; a few seconds' staleness is the price.
const REUSE_FOR: Duration = Duration::from_secs(2);
/// Answers kept, at most (the oldest go first past it).
const MAX_KEPT: usize = 1024;

type Key = (u32, i32, String);

pub struct HolderSearch {
    kept: HashMap<Key, (Instant, Holders)>,
    saved: Duration,
    refilled: Instant,
    skipped: u64,
}

impl HolderSearch {
    pub fn new(now: Instant) -> HolderSearch {
        HolderSearch {
            kept: HashMap::new(),
            saved: MAX_SAVED,
            refilled: now,
            skipped: 0,
        }
    }

    /// The holders of pipe `target` read by `pid` through `fd`: a recent
    /// answer, or `search(budget)` run with what is left of the budget;
    /// None when the budget is spent (counted in `skipped`).
    pub fn find(
        &mut self,
        now: Instant,
        pid: u32,
        fd: i32,
        target: &str,
        search: impl FnOnce(Duration) -> Holders,
    ) -> Option<Holders> {
        let key = (pid, fd, target.to_string());
        if let Some((at, h)) = self.kept.get(&key)
            && now.saturating_duration_since(*at) < REUSE_FOR
        {
            return Some(h.clone());
        }
        self.refill(now);
        if self.saved < MIN_SEARCH {
            self.skipped += 1;
            return None;
        }
        let started = Instant::now();
        let h = search(self.saved);
        self.saved = self.saved.saturating_sub(started.elapsed());
        self.keep(now, key, h.clone());
        Some(h)
    }

    /// Searches skipped because the budget was spent.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    fn refill(&mut self, now: Instant) {
        let earned = now
            .saturating_duration_since(self.refilled)
            .mul_f64(REFILL_PER_SEC.as_secs_f64());
        self.saved = (self.saved + earned).min(MAX_SAVED);
        self.refilled = now;
    }

    fn keep(&mut self, now: Instant, key: Key, h: Holders) {
        if self.kept.len() >= MAX_KEPT {
            self.kept
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < REUSE_FOR);
            if self.kept.len() >= MAX_KEPT {
                self.kept.clear();
            }
        }
        self.kept.insert(key, (now, h));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A search that takes `d` of wall time and finds nothing.
    fn taking(d: Duration) -> impl FnOnce(Duration) -> Holders {
        move |_| {
            std::thread::sleep(d);
            Holders {
                complete: true,
                ..Default::default()
            }
        }
    }

    #[test]
    fn an_answer_is_reused_for_the_same_pipe_and_reader_only() {
        let t0 = Instant::now();
        let mut s = HolderSearch::new(t0);
        assert!(
            s.find(t0, 1, 3, "pipe:[9]", taking(Duration::ZERO))
                .is_some()
        );
        let again = s.find(t0 + Duration::from_secs(1), 1, 3, "pipe:[9]", |_| {
            panic!("searched again")
        });
        assert!(again.unwrap().complete);
        // Another pipe behind the same fd number is searched.
        let mut searched = false;
        s.find(t0 + Duration::from_secs(1), 1, 3, "pipe:[10]", |_| {
            searched = true;
            Holders::default()
        });
        assert!(searched);
        // And the same one once the answer is old.
        let mut searched = false;
        s.find(t0 + Duration::from_secs(3), 1, 3, "pipe:[9]", |_| {
            searched = true;
            Holders::default()
        });
        assert!(searched);
    }

    #[test]
    fn searches_past_the_budget_are_skipped_and_counted_until_it_refills() {
        let t0 = Instant::now();
        let mut s = HolderSearch::new(t0);
        // Each search is given what is left, and uses it all.
        let mut given = Vec::new();
        for fd in 0..3 {
            let h = s.find(t0, 1, fd, "pipe:[1]", |budget| {
                given.push(budget);
                std::thread::sleep(budget.min(Duration::from_millis(600)));
                Holders::default()
            });
            if fd < 2 {
                assert!(h.is_some(), "search {fd}");
            } else {
                assert!(h.is_none(), "the budget is spent");
            }
        }
        assert_eq!(given[0], MAX_SAVED);
        assert!(given[1] <= Duration::from_millis(400), "{given:?}");
        assert_eq!(s.skipped(), 1);
        // A second of quiet earns a fifth of a second of search.
        let later = t0 + Duration::from_secs(1);
        let mut budget = Duration::ZERO;
        s.find(later, 1, 9, "pipe:[1]", |b| {
            budget = b;
            Holders::default()
        })
        .expect("refilled");
        assert!(budget >= Duration::from_millis(150), "{budget:?}");
        assert!(budget <= Duration::from_millis(250), "{budget:?}");
    }
}

//! How often a worker whose event loop is not known is searched again. A
//! search reads the worker's fd table and the interest lists of its epoll
//! fds, which the worker sizes: a worker that never shows its loop (one
//! with no listener in an epoll, or a hostile one) must not cost that every
//! second for as long as it lives.
use std::collections::HashMap;

/// Searched every round (a second) at first: a booting worker shows its
/// loop as soon as it serves.
const EVERY_ROUND: u32 = 10;
/// Then every this many rounds...
const SLOWER: u32 = 10;
/// ...until this many rounds have passed: then it is given up on (its loop
/// stays unknown, and the verdict says so).
const GIVE_UP: u32 = 300;

#[derive(Debug, Default)]
pub struct LoopSearch {
    rounds: HashMap<u32, u32>,
}

impl LoopSearch {
    /// Of the workers whose loop is not known, those to search this round.
    /// Workers not listed (found, or gone) are forgotten.
    pub fn due(&mut self, without_loop: &[u32]) -> Vec<u32> {
        self.rounds.retain(|pid, _| without_loop.contains(pid));
        without_loop
            .iter()
            .copied()
            .filter(|&pid| {
                let n = self.rounds.entry(pid).or_insert(0);
                *n = n.saturating_add(1);
                match *n {
                    0..=EVERY_ROUND => true,
                    n if n <= GIVE_UP => n % SLOWER == 0,
                    _ => false,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 20, item 2: a worker whose loop is never found was searched
    /// every second for as long as it lived.
    #[test]
    fn a_worker_whose_loop_never_shows_is_searched_less_then_given_up() {
        let mut s = LoopSearch::default();
        let searched = (0..GIVE_UP + 100).filter(|_| s.due(&[7]) == [7]).count() as u32;
        assert_eq!(searched, EVERY_ROUND + (GIVE_UP - EVERY_ROUND) / SLOWER);
        assert!(s.due(&[7]).is_empty(), "given up");
        // Found (or gone): forgotten; a new worker starts afresh.
        assert!(s.due(&[]).is_empty());
        assert_eq!(s.due(&[8]), [8]);
    }
}

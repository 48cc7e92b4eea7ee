//! The order in which loads read the store's disk.
//!
//! One load already keeps the disk busy (the loader's readers keep about 14
//! reads in flight), so loads that read it at the same time share its rate
//! and all finish late: four loads of 0.77 s each started together end
//! after about 3 s, every one of them. Admitted one at a time, the first
//! ends after 0.77 s, the second after 1.5 s, and the last after the same
//! 3 s: on average a load ends after 1.9 s instead of 3 s. The manager takes a turn before it reserves
//! the copy's room, so a load waiting for its turn holds no room, and the
//! copies it would evict keep serving (a model in the memory tier goes up
//! to the GPU meanwhile). Among the loads waiting, the smallest goes first,
//! ties in arrival order; and a load at most a quarter of the size of
//! every load reading starts beside them (a 0.6B model does not wait
//! seconds behind an 8B one).
//!
//! Where one load does not keep the disk busy (small requests on a disk
//! that wants many more in flight), turns cost throughput: the limit is
//! the daemon's `--disk-loads`.
//!
//! Only the manager's reads of the disk queue here; a load from the memory
//! tier to a GPU never waits for the disk.

use std::collections::BTreeSet;
use std::sync::{Condvar, Mutex, MutexGuard};

/// A load this many times smaller than every load reading the disk starts
/// beside them, whatever the limit: it takes the disk's rate from them for
/// a short while (at most a quarter of their time) rather than wait for
/// the whole of theirs.
const BESIDE: u64 = 4;

/// Admits reads of the disk, at most `limit` at a time (0: no limit),
/// smallest first; a much smaller one also beside them ([`BESIDE`]).
#[derive(Debug)]
pub(crate) struct DiskQueue {
    limit: usize,
    state: Mutex<QueueState>,
    turn: Condvar,
}

/// Loads as (bytes, ticket): the ticket orders equal sizes by arrival.
type Key = (u64, u64);

#[derive(Debug, Default)]
struct QueueState {
    running: BTreeSet<Key>,
    waiting: BTreeSet<Key>,
    next_ticket: u64,
}

impl QueueState {
    /// Whether `me`, first in line, may read now.
    fn may_start(&self, me: Key, limit: usize) -> bool {
        self.running.len() < limit
            || self
                .running
                .first()
                .is_some_and(|&(smallest, _)| me.0.saturating_mul(BESIDE) <= smallest)
    }
}

/// A turn on the disk, ended when dropped.
pub(crate) struct DiskTurn<'a> {
    held: Option<(&'a DiskQueue, Key)>,
}

impl DiskQueue {
    pub fn new(limit: usize) -> Self {
        DiskQueue {
            limit,
            state: Mutex::default(),
            turn: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a turn to read `bytes` from the disk.
    pub fn enter(&self, bytes: u64) -> DiskTurn<'_> {
        if self.limit == 0 {
            return DiskTurn { held: None };
        }
        let mut st = self.lock();
        let me = (bytes, st.next_ticket);
        st.next_ticket += 1;
        st.waiting.insert(me);
        while st.waiting.first() != Some(&me) || !st.may_start(me, self.limit) {
            st = self.turn.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.waiting.remove(&me);
        st.running.insert(me);
        // The next in line may read too (a limit above 1, or beside).
        self.turn.notify_all();
        DiskTurn {
            held: Some((self, me)),
        }
    }

    /// Loads reading the disk at once, at most (0: no limit).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Loads reading the disk now, and loads waiting for a turn.
    pub fn load(&self) -> (usize, usize) {
        let st = self.lock();
        (st.running.len(), st.waiting.len())
    }
}

impl Drop for DiskTurn<'_> {
    fn drop(&mut self) {
        if let Some((q, me)) = self.held {
            q.lock().running.remove(&me);
            q.turn.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// Polls until `n` loads wait.
    fn until_waiting(q: &DiskQueue, n: usize) {
        until(q, |_, waiting| waiting >= n, &format!("{n} waiting"));
    }

    /// Polls until `ready(reading, waiting)` holds.
    fn until(q: &DiskQueue, ready: impl Fn(usize, usize) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ready(q.load().0, q.load().1) {
            assert!(Instant::now() < deadline, "never {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn one_at_a_time_smallest_first() {
        let q = DiskQueue::new(1);
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            let first = q.enter(100);
            for (k, bytes) in [300u64, 50, 200, 50].into_iter().enumerate() {
                let (q, tx) = (&q, tx.clone());
                s.spawn(move || {
                    let _turn = q.enter(bytes);
                    tx.send(bytes).unwrap();
                });
                // Arrival order is the tie-break: each is queued before the next.
                until_waiting(q, k + 1);
            }
            assert_eq!(q.load(), (1, 4));
            assert!(rx.try_recv().is_err(), "nobody read beside the first");
            drop(first);
        });
        let order: Vec<u64> = rx.try_iter().collect();
        assert_eq!(order, [50, 50, 200, 300]);
        assert_eq!(q.load(), (0, 0));
    }

    #[test]
    fn a_much_smaller_load_reads_beside_a_big_one() {
        let q = DiskQueue::new(1);
        let big = q.enter(1000);
        // A quarter of the size or less: at once, beside it.
        let small = q.enter(250);
        assert_eq!(q.load(), (2, 0));
        std::thread::scope(|s| {
            // Not a quarter of the smallest reading (250): it waits, and
            // so does one that is not a quarter of the big one.
            let waiters = [100u64, 600].map(|b| {
                let q = &q;
                s.spawn(move || drop(q.enter(b)))
            });
            until_waiting(&q, 2);
            drop(small);
            // 100 is a quarter of 1000 or less: it reads beside big; 600 not.
            until(&q, |_, waiting| waiting <= 1, "100 reading beside 1000");
            assert_eq!(q.load().1, 1, "600 waits for the big load");
            drop(big);
            for w in waiters {
                w.join().unwrap();
            }
        });
        assert_eq!(q.load(), (0, 0));
    }

    #[test]
    fn a_limit_of_two_lets_two_read() {
        let q = DiskQueue::new(2);
        let a = q.enter(1);
        let b = q.enter(1);
        assert_eq!(q.load(), (2, 0));
        std::thread::scope(|s| {
            let waiter = s.spawn(|| drop(q.enter(1)));
            until_waiting(&q, 1);
            drop(a);
            waiter.join().unwrap();
        });
        drop(b);
        assert_eq!(q.load(), (0, 0));
    }

    #[test]
    fn no_limit_never_waits() {
        let q = DiskQueue::new(0);
        let turns: Vec<_> = (0..64).map(|i| q.enter(i)).collect();
        assert_eq!(q.load(), (0, 0));
        drop(turns);
    }
}

//! Log lines that an attacker could repeat thousands of times a second (a refused connection,
//! a failed handshake) are summarised: the first of a kind is logged at once, the rest of an
//! interval are counted and reported in one line when the interval is over (by the next event
//! of that kind, or by [`Throttle::flush`] called periodically). Lock-free: two atomics per
//! kind.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One slot per kind of event (an index below the `kinds` given to [`Throttle::new`]).
#[derive(Debug)]
pub struct Throttle {
    start: Instant,
    interval_ms: u64,
    slots: Vec<Slot>,
}

#[derive(Debug, Default)]
struct Slot {
    /// Events since the last line.
    pending: AtomicU64,
    /// When the last line was written, in ms since `start`, plus 1 (0: never).
    last: AtomicU64,
}

impl Throttle {
    /// At most one line per kind every `interval`, for `kinds` kinds.
    pub fn new(kinds: usize, interval: Duration) -> Throttle {
        Throttle {
            start: Instant::now(),
            interval_ms: u64::try_from(interval.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            slots: (0..kinds).map(|_| Slot::default()).collect(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
    }

    /// Records one event of `kind`. `Some(n)`: write a line now, for `n` events (this one and
    /// those held back since the last line); `None`: held back.
    pub fn hit(&self, kind: usize) -> Option<u64> {
        let slot = self.slots.get(kind)?;
        slot.pending.fetch_add(1, Ordering::Relaxed);
        self.due(slot, self.now_ms())
    }

    /// For each kind with events held back for a whole interval: `(kind, count)`, to be
    /// written now.
    pub fn flush(&self) -> Vec<(usize, u64)> {
        let now = self.now_ms();
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.pending.load(Ordering::Relaxed) > 0)
            .filter_map(|(i, s)| self.due(s, now).map(|n| (i, n)))
            .collect()
    }

    /// Claims the slot's line if the interval since the last one is over.
    fn due(&self, slot: &Slot, now: u64) -> Option<u64> {
        let last = slot.last.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < self.interval_ms {
            return None;
        }
        slot.last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        match slot.pending.swap(0, Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_event_logs_then_one_summary_per_interval() {
        let t = Throttle::new(2, Duration::from_millis(200));
        assert_eq!(t.hit(0), Some(1), "the first of a kind is logged");
        for _ in 0..99 {
            assert_eq!(t.hit(0), None, "held back within the interval");
        }
        assert_eq!(t.hit(1), Some(1), "kinds are throttled apart");
        assert!(t.flush().is_empty(), "nothing due before the interval ends");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.flush(), vec![(0, 99)], "one summary with the count");
        assert!(t.flush().is_empty());
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.hit(0), Some(1), "a quiet interval later, logged at once");
        assert_eq!(t.hit(5), None, "an unknown kind is ignored");
    }
}

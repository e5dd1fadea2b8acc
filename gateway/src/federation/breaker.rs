//! One circuit breaker per upstream endpoint, kept in this process (replicas do not share
//! breaker state; each learns an endpoint's health from its own calls).
//!
//! Closed → (N consecutive failures) → Open → (cooldown) → HalfOpen: one probe call →
//! success: Closed, failure: Open again for another cooldown.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { since: Instant },
}

#[derive(Debug, Clone, Copy)]
struct State {
    failures: u32,
    phase: Phase,
}

/// What the breaker allows for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Closed: call.
    Go,
    /// Half-open: this call is the probe.
    Probe,
    /// Open: do not call; retry after this long.
    Refuse { retry_in: Duration },
}

/// The breakers of all endpoints.
#[derive(Debug)]
pub struct Breakers {
    threshold: u32,
    cooldown: Duration,
    map: Mutex<HashMap<String, State>>,
}

impl Breakers {
    pub fn new(threshold: u32, cooldown: Duration) -> Breakers {
        Breakers {
            threshold: threshold.max(1),
            cooldown,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn with<T>(&self, id: &str, f: impl FnOnce(&mut State) -> T) -> T {
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let state = map.entry(id.to_string()).or_insert(State {
            failures: 0,
            phase: Phase::Closed,
        });
        f(state)
    }

    /// May endpoint `id` be called now?
    pub fn admit(&self, id: &str) -> Admit {
        let cooldown = self.cooldown;
        self.with(id, |s| {
            let now = Instant::now();
            match s.phase {
                Phase::Closed => Admit::Go,
                Phase::Open { until } if now >= until => {
                    s.phase = Phase::HalfOpen { since: now };
                    Admit::Probe
                }
                Phase::Open { until } => Admit::Refuse {
                    retry_in: until - now,
                },
                // A probe that never reported (dropped) does not block the endpoint forever.
                Phase::HalfOpen { since } if now.duration_since(since) >= cooldown => {
                    s.phase = Phase::HalfOpen { since: now };
                    Admit::Probe
                }
                Phase::HalfOpen { since } => Admit::Refuse {
                    retry_in: cooldown.saturating_sub(now.duration_since(since)),
                },
            }
        })
    }

    pub fn success(&self, id: &str) {
        self.with(id, |s| {
            s.failures = 0;
            s.phase = Phase::Closed;
        });
    }

    pub fn failure(&self, id: &str) {
        let (threshold, cooldown) = (self.threshold, self.cooldown);
        self.with(id, |s| {
            s.failures = s.failures.saturating_add(1);
            let reopen = matches!(s.phase, Phase::HalfOpen { .. }) || s.failures >= threshold;
            if reopen {
                s.phase = Phase::Open {
                    until: Instant::now() + cooldown,
                };
            }
        });
    }

    /// `closed`, `open` or `half-open` (for logs and tests).
    pub fn state(&self, id: &str) -> &'static str {
        self.with(id, |s| match s.phase {
            Phase::Closed => "closed",
            Phase::Open { .. } => "open",
            Phase::HalfOpen { .. } => "half-open",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_probes_after_cooldown() {
        let b = Breakers::new(3, Duration::from_millis(40));
        for _ in 0..2 {
            assert_eq!(b.admit("h"), Admit::Go);
            b.failure("h");
        }
        assert_eq!(b.state("h"), "closed");
        b.failure("h");
        assert_eq!(b.state("h"), "open");
        assert!(matches!(b.admit("h"), Admit::Refuse { .. }));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(b.admit("h"), Admit::Probe);
        // Only one probe at a time.
        assert!(matches!(b.admit("h"), Admit::Refuse { .. }));
        b.failure("h");
        assert_eq!(b.state("h"), "open");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(b.admit("h"), Admit::Probe);
        b.success("h");
        assert_eq!(b.state("h"), "closed");
        assert_eq!(b.admit("h"), Admit::Go);
        // Other endpoints are independent.
        assert_eq!(b.admit("other"), Admit::Go);
    }
}

//! The agent logs every refused lease key with its reason (never the key:
//! it is a bearer capability), at a bounded rate, so that someone probing
//! the agent with forged or stale keys is visible without being able to
//! flood the log.

use leasehold_core::key::KeyRejection;
use std::sync::Mutex;

/// At most this many refusals are logged one by one per window; the rest
/// are counted and summed up when the window ends.
pub const REFUSALS_LOGGED_PER_WINDOW: u64 = 20;
pub const REFUSAL_WINDOW_MS: u64 = 10_000;

#[derive(Default)]
pub struct RefusedKeyLog {
    window: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    started_at_ms: u64,
    logged: u64,
    suppressed: u64,
}

/// What to do with one refusal.
#[derive(Debug, PartialEq, Eq)]
pub enum Logging {
    /// Log it; `suppressed` more were refused unlogged in the window before.
    Log {
        suppressed_before: u64,
    },
    Suppress,
}

impl RefusedKeyLog {
    /// Decides whether a refusal at `now_ms` is logged (pure apart from the
    /// window's counters, so it is tested without a logger).
    pub fn decide(&self, now_ms: u64) -> Logging {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let mut suppressed_before = 0;
        if now_ms.saturating_sub(window.started_at_ms) >= REFUSAL_WINDOW_MS {
            suppressed_before = window.suppressed;
            *window = Window {
                started_at_ms: now_ms,
                logged: 0,
                suppressed: 0,
            };
        }
        if window.logged < REFUSALS_LOGGED_PER_WINDOW {
            window.logged += 1;
            Logging::Log { suppressed_before }
        } else {
            window.suppressed += 1;
            Logging::Suppress
        }
    }

    pub fn note(&self, partition: Option<u32>, reason: &KeyRejection, now_ms: u64) {
        if let Logging::Log { suppressed_before } = self.decide(now_ms) {
            if suppressed_before > 0 {
                tracing::warn!(
                    suppressed = suppressed_before,
                    "more lease keys were refused in the last window than were logged"
                );
            }
            tracing::warn!(?partition, reason = ?reason, "refused a lease key: {reason}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_up_to_the_limit_then_counted_and_reported_in_the_next_window() {
        let log = RefusedKeyLog::default();
        let start = 1_000_000;
        for _ in 0..REFUSALS_LOGGED_PER_WINDOW {
            assert_eq!(
                log.decide(start),
                Logging::Log {
                    suppressed_before: 0
                }
            );
        }
        for _ in 0..5 {
            assert_eq!(log.decide(start + 1), Logging::Suppress);
        }
        assert_eq!(
            log.decide(start + REFUSAL_WINDOW_MS),
            Logging::Log {
                suppressed_before: 5
            }
        );
        assert_eq!(
            log.decide(start + REFUSAL_WINDOW_MS + 1),
            Logging::Log {
                suppressed_before: 0
            }
        );
    }
}

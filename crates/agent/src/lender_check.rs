//! Who may use the agent's lender interface: the agent's own credential (a
//! host credential, or the lender's token for agents started with one), or
//! any token the broker says belongs to the lender of this host. The second
//! lets `leasehold up` keep only a host credential on disk while its lender
//! still manages the host with the lender's own token.

use std::collections::HashMap;
use std::sync::Mutex;

/// How long the broker's answer about a token is trusted.
pub const LENDER_ANSWER_TTL_MS: u64 = 60_000;
/// At most this many tokens are remembered (then all are forgotten).
const MAX_REMEMBERED: usize = 256;
/// At most this many broker lookups per window, so that anonymous clients
/// with made-up tokens cannot make the agent hammer the broker.
pub const LOOKUPS_PER_WINDOW: u32 = 20;
pub const LOOKUP_WINDOW_MS: u64 = 10_000;

#[derive(Default)]
pub struct LenderCheck {
    answers: Mutex<HashMap<String, (bool, u64)>>,
    lookups: Mutex<(u64, u32)>,
}

/// What to do with a token that is not the agent's own.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Known(bool),
    AskBroker,
    /// Too many lookups lately: refuse without asking.
    Refuse,
}

impl LenderCheck {
    pub fn verdict(&self, token: &str, now_ms: u64) -> Verdict {
        let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((is_lender, until_ms)) = answers.get(token) {
            if now_ms < *until_ms {
                return Verdict::Known(*is_lender);
            }
        }
        drop(answers);
        let mut lookups = self.lookups.lock().unwrap_or_else(|p| p.into_inner());
        if now_ms.saturating_sub(lookups.0) >= LOOKUP_WINDOW_MS {
            *lookups = (now_ms, 0);
        }
        if lookups.1 >= LOOKUPS_PER_WINDOW {
            return Verdict::Refuse;
        }
        lookups.1 += 1;
        Verdict::AskBroker
    }

    /// The answer about `token`: remembered, refused when lookups are
    /// spent, else `ask`'s (remembered unless it has none: the broker
    /// could not be asked, so ask again later).
    pub async fn answer<F>(&self, token: &str, now_ms: u64, ask: impl FnOnce() -> F) -> bool
    where
        F: std::future::Future<Output = Option<bool>>,
    {
        match self.verdict(token, now_ms) {
            Verdict::Known(answer) => answer,
            Verdict::Refuse => false,
            Verdict::AskBroker => {
                let answer = ask().await;
                if let Some(answer) = answer {
                    self.remember(token, answer, now_ms);
                }
                answer.unwrap_or(false)
            }
        }
    }

    pub fn remember(&self, token: &str, is_lender: bool, now_ms: u64) {
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        if answers.len() >= MAX_REMEMBERED {
            answers.clear();
        }
        answers.insert(
            token.to_string(),
            (is_lender, now_ms + LENDER_ANSWER_TTL_MS),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_remembered_for_a_while_and_lookups_are_rate_limited() {
        let check = LenderCheck::default();
        assert_eq!(check.verdict("t", 1_000), Verdict::AskBroker);
        check.remember("t", true, 1_000);
        assert_eq!(check.verdict("t", 2_000), Verdict::Known(true));
        let later = 1_000 + LENDER_ANSWER_TTL_MS;
        assert_eq!(check.verdict("t", later), Verdict::AskBroker);
        for n in 1..LOOKUPS_PER_WINDOW {
            assert_eq!(
                check.verdict(&format!("x{n}"), later),
                Verdict::AskBroker,
                "{n}"
            );
        }
        assert_eq!(check.verdict("flood", later), Verdict::Refuse);
        assert_eq!(
            check.verdict("flood", later + LOOKUP_WINDOW_MS),
            Verdict::AskBroker
        );
    }
}

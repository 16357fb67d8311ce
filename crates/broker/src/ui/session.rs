//! The dashboard's sessions: a random id in an HttpOnly cookie stands for
//! the hash of the token entered on the login page, so the token itself
//! never reaches a cookie or a script. Sessions are bounded in number (per
//! token and in all) and expire; each request resolves the principal again
//! from the hash, exactly as a bearer token is resolved.

use std::collections::HashMap;

/// A session lasts this long from its login: a working day.
pub(crate) const SESSION_TTL_MS: u64 = 12 * 3600 * 1000;
/// At most this many sessions in all; a new one evicts the oldest.
pub(crate) const MAX_SESSIONS: usize = 1024;
/// At most this many sessions per token, so one principal logging in again
/// and again cannot push everybody else's sessions out.
pub(crate) const MAX_SESSIONS_PER_TOKEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Session {
    token_sha256: String,
    created_at_ms: u64,
}

/// Session id → session, bounded and expiring on the broker's clock.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    by_id: HashMap<String, Session>,
}

impl Sessions {
    /// Records a session for `token_sha256` under `session_id` (random, made
    /// by the caller), first dropping expired sessions and, at a bound, the
    /// oldest session of this token or of all.
    pub(crate) fn open(&mut self, session_id: String, token_sha256: String, now_ms: u64) {
        self.by_id
            .retain(|_, s| now_ms < s.created_at_ms.saturating_add(SESSION_TTL_MS));
        let of_token = self
            .by_id
            .values()
            .filter(|s| s.token_sha256 == token_sha256)
            .count();
        if of_token >= MAX_SESSIONS_PER_TOKEN {
            self.evict_oldest(|s| s.token_sha256 == token_sha256);
        }
        if self.by_id.len() >= MAX_SESSIONS {
            self.evict_oldest(|_| true);
        }
        self.by_id.insert(
            session_id,
            Session {
                token_sha256,
                created_at_ms: now_ms,
            },
        );
    }

    fn evict_oldest(&mut self, among: impl Fn(&Session) -> bool) {
        let oldest = self
            .by_id
            .iter()
            .filter(|(_, s)| among(s))
            .min_by_key(|(id, s)| (s.created_at_ms, (*id).clone()))
            .map(|(id, _)| id.clone());
        if let Some(id) = oldest {
            self.by_id.remove(&id);
        }
    }

    /// The token hash of a live session; an expired one is forgotten.
    pub(crate) fn token_of(&mut self, session_id: &str, now_ms: u64) -> Option<String> {
        let session = self.by_id.get(session_id)?;
        if now_ms >= session.created_at_ms.saturating_add(SESSION_TTL_MS) {
            self.by_id.remove(session_id);
            return None;
        }
        Some(session.token_sha256.clone())
    }

    pub(crate) fn close(&mut self, session_id: &str) {
        self.by_id.remove(session_id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_id.len()
    }
}

/// A fresh session id: 256 random bits, hex.
pub(crate) fn new_session_id() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_resolves_until_it_expires_and_not_after_close() {
        let mut sessions = Sessions::default();
        sessions.open("s1".into(), "hash-a".into(), 1_000);
        assert_eq!(sessions.token_of("s1", 1_000).as_deref(), Some("hash-a"));
        assert_eq!(
            sessions
                .token_of("s1", 1_000 + SESSION_TTL_MS - 1)
                .as_deref(),
            Some("hash-a")
        );
        assert_eq!(sessions.token_of("s1", 1_000 + SESSION_TTL_MS), None);
        assert_eq!(sessions.len(), 0, "an expired session is forgotten");
        sessions.open("s2".into(), "hash-a".into(), 5_000);
        sessions.close("s2");
        assert_eq!(sessions.token_of("s2", 5_000), None);
        assert_eq!(sessions.token_of("unknown", 5_000), None);
    }

    #[test]
    fn sessions_are_bounded_per_token_and_in_all() {
        let mut sessions = Sessions::default();
        for i in 0..MAX_SESSIONS_PER_TOKEN as u64 + 3 {
            sessions.open(format!("a{i}"), "hash-a".into(), i);
        }
        assert_eq!(sessions.len(), MAX_SESSIONS_PER_TOKEN);
        assert_eq!(sessions.token_of("a0", 100), None, "the oldest went first");
        let newest = format!("a{}", MAX_SESSIONS_PER_TOKEN + 2);
        assert!(sessions.token_of(&newest, 100).is_some());
        for i in 0..MAX_SESSIONS as u64 {
            sessions.open(format!("b{i}"), format!("hash-b{i}"), 1_000 + i);
        }
        assert_eq!(sessions.len(), MAX_SESSIONS);
        assert!(sessions
            .token_of(&format!("b{}", MAX_SESSIONS - 1), 5_000)
            .is_some());
    }

    #[test]
    fn session_ids_are_long_and_differ() {
        let first = new_session_id();
        assert_eq!(first.len(), 64);
        assert_ne!(first, new_session_id());
    }
}

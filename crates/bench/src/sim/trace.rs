//! The trace of one seed: every operation and every answer, one line each.
//! Its SHA-256 digest shows that a seed reproduces exactly; the last lines
//! are printed when an invariant fails.

use sha2::{Digest, Sha256};
use std::collections::VecDeque;

/// How many of the latest lines a failure report shows.
const TAIL_LINES: usize = 40;

pub struct Trace {
    hasher: Sha256,
    lines: usize,
    /// The latest lines (every line when `keep_all`).
    kept: VecDeque<String>,
    keep_all: bool,
}

impl Trace {
    pub fn new(keep_all: bool) -> Self {
        Trace {
            hasher: Sha256::new(),
            lines: 0,
            kept: VecDeque::new(),
            keep_all,
        }
    }

    pub fn record(&mut self, line: String) {
        self.hasher.update(line.as_bytes());
        self.hasher.update(b"\n");
        self.lines += 1;
        self.kept.push_back(line);
        if !self.keep_all && self.kept.len() > TAIL_LINES {
            self.kept.pop_front();
        }
    }

    pub fn digest_hex(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }

    pub fn line_count(&self) -> usize {
        self.lines
    }

    /// The kept lines: the whole trace with `keep_all`, else the latest.
    pub fn kept_lines(&self) -> Vec<String> {
        self.kept.iter().cloned().collect()
    }
}

//! Canaries: a candidate version takes a share of a component's requests and messages
//! next to the active one, is watched, and is rolled back by the node itself when it
//! fails too often (or promoted after a healthy window, when asked).
//!
//! A failure is a 5xx answer, a trap, a deadline or memory kill, or a handler error. The
//! failure rate is judged over fixed windows (`window`): once a window has seen at least
//! `min_requests` calls of the candidate and more than `max_failure_rate` of them failed,
//! the candidate is rolled back. With `promote_after`, a candidate that has run that long
//! and whose current window is healthy (with at least `min_requests`) is promoted.
//! Requests are split by weight; with `sticky_header` or `sticky_cookie` the split is by a
//! hash of that value, so one user keeps seeing one version.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::runtime::version::Version;

fn default_window() -> Duration {
    Duration::from_secs(30)
}
fn default_max_failure_rate() -> f64 {
    0.1
}
fn default_min_requests() -> u64 {
    10
}

/// How a canary runs: its share, how it is judged, and whether it is promoted by itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryPolicy {
    /// Percentage (1-99) of requests and messages that go to the candidate.
    pub weight: u8,
    /// Split by a hash of this request header instead of at random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_header: Option<String>,
    /// Split by a hash of this cookie instead of at random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_cookie: Option<String>,
    /// The window the failure rate is measured over (default 30s).
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: Duration,
    /// Roll back when more than this share of a window's calls fail (default 0.1).
    #[serde(default = "default_max_failure_rate")]
    pub max_failure_rate: f64,
    /// Calls a window needs before it is judged (default 10).
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Promote by itself once it has run this long with a healthy window.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub promote_after: Option<Duration>,
}

impl CanaryPolicy {
    /// What is wrong with the policy, if anything.
    pub fn problem(&self) -> Option<String> {
        if !(1..=99).contains(&self.weight) {
            return Some(format!(
                "weight must be 1-99 (percent), not {}",
                self.weight
            ));
        }
        if !(0.0..1.0).contains(&self.max_failure_rate) {
            return Some("max_failure_rate must be at least 0 and below 1".into());
        }
        if self.window.is_zero() {
            return Some("window must be longer than zero".into());
        }
        if self.min_requests == 0 {
            return Some("min_requests must be at least 1".into());
        }
        if self.sticky_header.is_some() && self.sticky_cookie.is_some() {
            return Some("choose sticky_header or sticky_cookie, not both".into());
        }
        None
    }
}

/// What the node decided after a canary call.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Continue,
    RollBack(String),
    Promote,
}

/// A running canary: the candidate, its policy and its counts.
pub struct Canary {
    pub version: Arc<Version>,
    pub policy: CanaryPolicy,
    pub started: Instant,
    pub started_at: SystemTime,
    window: Mutex<Window>,
    pub calls: AtomicU64,
    pub failures: AtomicU64,
    split: AtomicU64,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    calls: u64,
    failures: u64,
}

impl Canary {
    pub fn new(version: Arc<Version>, policy: CanaryPolicy) -> Self {
        Self {
            version,
            policy,
            started: Instant::now(),
            started_at: SystemTime::now(),
            window: Mutex::new(Window {
                start: Instant::now(),
                calls: 0,
                failures: 0,
            }),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            split: AtomicU64::new(0),
        }
    }

    /// Whether this call goes to the candidate. `sticky` is the value of the sticky header
    /// or cookie when the policy has one and the request carries it.
    pub fn takes(&self, sticky: Option<&[u8]>) -> bool {
        let roll = match sticky {
            Some(value) => fnv1a(value),
            None => splitmix(self.split.fetch_add(1, Ordering::Relaxed)),
        };
        roll % 100 < u64::from(self.policy.weight)
    }

    /// Counts one call of the candidate and judges the window.
    pub fn record(&self, failed: bool) -> Verdict {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let mut window = self.window.lock().expect("canary window lock");
        if window.start.elapsed() > self.policy.window {
            *window = Window {
                start: Instant::now(),
                calls: 0,
                failures: 0,
            };
        }
        window.calls += 1;
        window.failures += u64::from(failed);
        if window.calls < self.policy.min_requests {
            return Verdict::Continue;
        }
        let rate = window.failures as f64 / window.calls as f64;
        if rate > self.policy.max_failure_rate {
            return Verdict::RollBack(format!(
                "{} of its last {} calls failed ({:.0}% > {:.0}% allowed)",
                window.failures,
                window.calls,
                rate * 100.0,
                self.policy.max_failure_rate * 100.0
            ));
        }
        match self.policy.promote_after {
            Some(after) if self.started.elapsed() >= after => Verdict::Promote,
            _ => Verdict::Continue,
        }
    }
}

/// Spreads a counter evenly over 0..2^64 so that consecutive calls do not alternate.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A stable hash of a sticky value (the same user lands on the same side every time).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    splitmix(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_follows_the_weight() {
        let taken = (0..10_000u64).filter(|i| splitmix(*i) % 100 < 20).count();
        assert!((1_800..2_200).contains(&taken), "{taken} of 10000 at 20%");
        let sticky = (0..10_000u64)
            .filter(|i| fnv1a(format!("user-{i}").as_bytes()) % 100 < 20)
            .count();
        assert!((1_800..2_200).contains(&sticky), "{sticky} of 10000 at 20%");
    }
}

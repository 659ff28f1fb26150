//! Per-key rate limiting (token bucket, via `governor`) and the `X-RateLimit-*` headers.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use governor::Quota;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;

use crate::domain::ids::ApiKeyId;

/// Whose bucket a request draws from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// An authenticated API key.
    Key(ApiKeyId),
    /// Requests without a valid key, per client address (slows down key guessing).
    Anonymous(IpAddr),
}

/// The limiter and its quota.
pub struct RateLimiter {
    limiter: governor::RateLimiter<
        Bucket,
        DefaultKeyedStateStore<Bucket>,
        DefaultClock,
        StateInformationMiddleware,
    >,
    burst: u32,
    per_second: u32,
}

/// What a check decided, with the numbers for the headers.
#[derive(Debug, Clone, Copy)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again (or, when refused, until a request fits).
    pub reset_s: u64,
}

impl RateLimiter {
    /// `per_second` tokens flow in each second; a bucket holds at most `burst`.
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Self {
            limiter: governor::RateLimiter::keyed(quota)
                .with_middleware::<StateInformationMiddleware>(),
            burst: burst.get(),
            per_second: per_second.get(),
        }
    }

    pub fn check(&self, bucket: &Bucket) -> Decision {
        match self.limiter.check_key(bucket) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let missing = self.burst.saturating_sub(remaining);
                Decision {
                    allowed: true,
                    limit: self.burst,
                    remaining,
                    reset_s: u64::from(missing.div_ceil(self.per_second)),
                }
            }
            Err(not_until) => {
                let wait: Duration = not_until.wait_time_from(DefaultClock::default().now());
                Decision {
                    allowed: false,
                    limit: self.burst,
                    remaining: 0,
                    reset_s: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
                }
            }
        }
    }

    /// Forgets buckets that have refilled; called periodically so memory stays bounded.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

impl Decision {
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        headers.insert("x-ratelimit-limit", HeaderValue::from(self.limit));
        headers.insert("x-ratelimit-remaining", HeaderValue::from(self.remaining));
        headers.insert("x-ratelimit-reset", HeaderValue::from(self.reset_s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_burst_and_counts_down() {
        let nz = |n| NonZeroU32::new(n).expect("non-zero");
        let limiter = RateLimiter::new(nz(1), nz(3));
        let bucket = Bucket::Key(ApiKeyId::new());
        let remaining: Vec<u32> = (0..3).map(|_| limiter.check(&bucket).remaining).collect();
        assert_eq!(remaining, vec![2, 1, 0]);
        let refused = limiter.check(&bucket);
        assert!(!refused.allowed);
        assert!(refused.reset_s >= 1);
        // Another key has its own bucket.
        assert!(limiter.check(&Bucket::Key(ApiKeyId::new())).allowed);
    }
}

//! The delivery policy: when to try again, when to give up, when to turn a failing
//! endpoint off. Pure functions of their inputs (`now` and the jitter draw are passed in),
//! so every schedule is tested without sleeping.

use std::time::Duration;

use super::time::EpochMillis;

/// Delays between attempts: after attempt `n` fails, wait `delays[n - 1]`; after the
/// last delay's attempt fails, give up. The default (5s, 5m, 30m, 2h, 5h, 10h, 10h)
/// makes 8 attempts over about 28 hours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule {
    delays: Vec<Duration>,
}

/// How far a scheduled delay may move either way (±20 %), so that a receiver that came
/// back is not hit by every delayed delivery in the same second.
pub const JITTER: f64 = 0.2;

impl RetrySchedule {
    pub fn new(delays: Vec<Duration>) -> Result<Self, String> {
        if delays.is_empty() {
            return Err("the retry schedule needs at least one delay".to_owned());
        }
        if delays.iter().any(Duration::is_zero) {
            return Err("retry delays must be greater than zero".to_owned());
        }
        Ok(Self { delays })
    }

    /// `5s,5m,30m,2h,5h,10h,10h`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let delays = text
            .split(',')
            .map(|part| super::time::parse_duration(part.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(delays)
    }

    /// Attempts in all: the first plus one per delay.
    pub fn max_attempts(&self) -> u32 {
        u32::try_from(self.delays.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }

    /// The longest step: the cap on a receiver's `Retry-After`.
    pub fn largest_step(&self) -> Duration {
        self.delays.iter().max().copied().unwrap_or_default()
    }

    /// When to try again after `attempts_made` attempts (all failed), or `None` when the
    /// schedule is exhausted. `jitter_draw` is uniform in [0, 1). A receiver's
    /// `Retry-After` replaces the step, capped at the largest step, without jitter.
    pub fn next(
        &self,
        attempts_made: u32,
        now: EpochMillis,
        retry_after: Option<Duration>,
        jitter_draw: f64,
    ) -> Option<EpochMillis> {
        let index = usize::try_from(attempts_made.checked_sub(1)?).ok()?;
        let step = *self.delays.get(index)?;
        let delay = match retry_after {
            Some(asked) => asked.min(self.largest_step()),
            None => step.mul_f64(1.0 - JITTER + 2.0 * JITTER * jitter_draw.clamp(0.0, 1.0)),
        };
        let millis = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        Some(now.saturating_add(millis))
    }
}

impl Default for RetrySchedule {
    fn default() -> Self {
        let h = |n: u64| Duration::from_secs(n * 3600);
        Self {
            delays: vec![
                Duration::from_secs(5),
                Duration::from_secs(300),
                Duration::from_secs(1800),
                h(2),
                h(5),
                h(10),
                h(10),
            ],
        }
    }
}

/// Whether an endpoint that has failed without a success since `failing_since` has failed
/// for long enough to be disabled.
pub fn should_disable(
    failing_since: EpochMillis,
    now: EpochMillis,
    disable_after: Duration,
) -> bool {
    let limit = i64::try_from(disable_after.as_millis()).unwrap_or(i64::MAX);
    now.saturating_sub(failing_since) >= limit
}

/// Parses a `Retry-After` header: delay-seconds or an HTTP date (relative to `now`).
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn default_schedule_is_the_contracts() {
        let s = RetrySchedule::default();
        assert_eq!(
            s,
            RetrySchedule::parse("5s,5m,30m,2h,5h,10h,10h").expect("parses")
        );
        assert_eq!(s.max_attempts(), 8);
        assert_eq!(s.largest_step(), Duration::from_secs(36_000));
        // Midpoint draw = no jitter.
        assert_eq!(s.next(1, 0, None, 0.5), Some(5_000));
        assert_eq!(s.next(2, 0, None, 0.5), Some(300_000));
        assert_eq!(s.next(7, 0, None, 0.5), Some(36_000_000));
        assert_eq!(s.next(8, 0, None, 0.5), None);
        assert_eq!(s.next(0, 0, None, 0.5), None);
    }

    #[test]
    fn retry_after_replaces_the_step_capped_at_the_largest() {
        let s = RetrySchedule::parse("1s,2s").expect("parses");
        assert_eq!(
            s.next(1, 1_000, Some(Duration::from_millis(1_500)), 0.0),
            Some(2_500)
        );
        assert_eq!(
            s.next(1, 0, Some(Duration::from_secs(3600)), 0.9),
            Some(2_000)
        );
        assert_eq!(s.next(2, 0, Some(Duration::from_secs(1)), 0.9), Some(1_000));
        assert_eq!(s.next(3, 0, Some(Duration::from_secs(1)), 0.9), None);
    }

    #[test]
    fn refuses_bad_schedules() {
        for bad in ["", "0s", "5s,,5m", "5x", "5s,0ms"] {
            assert!(RetrySchedule::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_retry_after() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn disables_exactly_at_the_limit() {
        let five_days = Duration::from_secs(5 * 86_400);
        assert!(!should_disable(0, 5 * 86_400_000 - 1, five_days));
        assert!(should_disable(0, 5 * 86_400_000, five_days));
    }

    proptest! {
        #[test]
        fn next_stays_within_the_jitter_band(
            delays in proptest::collection::vec(1u64..100_000, 1..10),
            attempts in 1u32..12,
            now in 0i64..4_000_000_000_000,
            draw in 0.0f64..1.0,
        ) {
            let schedule = RetrySchedule::new(delays.iter().map(|ms| Duration::from_millis(*ms)).collect()).expect("valid");
            match schedule.next(attempts, now, None, draw) {
                None => prop_assert!(attempts as usize > delays.len()),
                Some(at) => {
                    let step = delays[attempts as usize - 1] as f64;
                    let wait = (at - now) as f64;
                    prop_assert!(wait >= step * (1.0 - JITTER) - 1.0 && wait <= step * (1.0 + JITTER) + 1.0, "{wait} vs {step}");
                }
            }
        }

        #[test]
        fn retry_after_never_exceeds_the_largest_step(
            delays in proptest::collection::vec(1u64..100_000, 1..10),
            asked in 0u64..1_000_000,
            draw in 0.0f64..1.0,
        ) {
            let schedule = RetrySchedule::new(delays.iter().map(|ms| Duration::from_millis(*ms)).collect()).expect("valid");
            let at = schedule.next(1, 0, Some(Duration::from_millis(asked)), draw).expect("first retry exists");
            prop_assert!(at as u64 <= *delays.iter().max().expect("non-empty"));
            prop_assert!(at as u64 == asked.min(*delays.iter().max().expect("non-empty")));
        }
    }
}

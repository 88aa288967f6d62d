//! Delivery policy: how long to wait before trying again (exponential backoff with full
//! jitter) and how many notifications a rule may send per minute (a token bucket).

use std::time::{Duration, Instant};

use rand::Rng;

/// The wait before attempt `failed + 1`, after `failed` failed attempts (`failed >= 1`):
/// uniform in `[0, min(max, first · 2^(failed-1))]` ("full jitter": receivers coming back
/// from an outage are not hit by every sender at once). A receiver's `Retry-After` is a floor.
pub fn backoff(
    rng: &mut impl Rng,
    first: Duration,
    max: Duration,
    failed: u32,
    retry_after: Option<Duration>,
) -> Duration {
    let doublings = failed.saturating_sub(1).min(64) as i32;
    let cap = (first.as_secs_f64() * 2f64.powi(doublings)).min(max.as_secs_f64());
    let jittered = Duration::from_secs_f64(rng.gen_range(0.0..=cap));
    retry_after.map_or(jittered, |r| jittered.max(r))
}

/// A token bucket: `per_minute` notifications a minute, a burst of up to `per_minute`.
#[derive(Debug, Clone)]
pub struct RateLimit {
    per_minute: u32,
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    /// `per_minute = 0`: no limit.
    pub fn new(per_minute: u32, now: Instant) -> RateLimit {
        RateLimit { per_minute, tokens: per_minute as f64, at: now }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.per_minute as f64 / 60.0).min(self.per_minute as f64);
        self.at = now;
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until a token is there (zero if one is).
    pub fn wait(&mut self, now: Instant) -> Duration {
        if self.per_minute == 0 {
            return Duration::ZERO;
        }
        self.refill(now);
        let missing = (1.0 - self.tokens).max(0.0);
        Duration::from_secs_f64(missing * 60.0 / self.per_minute as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_in_its_bounds_and_spreads() {
        let mut rng = crate::testing::rng();
        for _ in 0..200 {
            let first = Duration::from_millis(rng.gen_range(1..5000));
            let max = first * rng.gen_range(1..500);
            for failed in [1u32, 2, 3, 5, 10, 30, 64, 1000, u32::MAX] {
                let cap =
                    (first.as_secs_f64() * 2f64.powi(failed.saturating_sub(1).min(200) as i32)).min(max.as_secs_f64());
                let waits: Vec<f64> =
                    (0..50).map(|_| backoff(&mut rng, first, max, failed, None).as_secs_f64()).collect();
                assert!(waits.iter().all(|w| *w >= 0.0 && *w <= cap + 1e-9), "{failed} {cap} {waits:?}");
                // Jitter: not all the same, and some in each half of the range.
                assert!(waits.iter().any(|w| *w < cap / 2.0) && waits.iter().any(|w| *w > cap / 2.0), "{waits:?}");
            }
            let ra = Duration::from_secs(rng.gen_range(1..100));
            let w = backoff(&mut rng, first, max, 1, Some(ra));
            assert!(w >= ra && w <= ra.max(first));
        }
    }

    #[test]
    fn rate_limit_allows_per_minute_then_holds() {
        let mut rng = crate::testing::rng();
        for _ in 0..50 {
            let per_minute = rng.gen_range(1..200u32);
            let t0 = Instant::now();
            let mut r = RateLimit::new(per_minute, t0);
            let burst = (0..per_minute * 2).filter(|_| r.try_take(t0)).count() as u32;
            assert_eq!(burst, per_minute);
            let wait = r.wait(t0);
            let want = 60.0 / per_minute as f64;
            assert!((wait.as_secs_f64() - want).abs() < 1e-6, "{wait:?} {want}");
            assert!(!r.try_take(t0 + wait.mul_f64(0.99)));
            assert!(r.try_take(t0 + wait + Duration::from_micros(1)));
            // Over ten minutes at a steady pace: at most per_minute·10 plus the first burst.
            let mut r = RateLimit::new(per_minute, t0);
            let mut sent = 0u32;
            let step = Duration::from_millis(rng.gen_range(10..500));
            let mut t = t0;
            while t < t0 + Duration::from_secs(600) {
                while r.try_take(t) {
                    sent += 1;
                }
                t += step;
            }
            assert!(sent <= per_minute * 11 && sent + per_minute >= per_minute * 10, "{per_minute} {sent}");
        }
        let mut free = RateLimit::new(0, Instant::now());
        assert!((0..10_000).all(|_| free.try_take(Instant::now())));
        assert_eq!(free.wait(Instant::now()), Duration::ZERO);
    }
}

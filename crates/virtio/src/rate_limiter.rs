//! Token-bucket rate limiters, as Firecracker defines them for its block, network and
//! entropy devices: a bucket of `size` tokens refilled at `size` per `refill_time`, plus an
//! optional one-time burst spent first and never refilled; a limiter has a bytes bucket
//! and an operations bucket, and an operation passes only when both have its tokens.
//!
//! A device asks [`RateLimiter::consume`] before it serves a request; when the answer is
//! "wait", it leaves the request where it is (on the ring, or a held frame) and reports
//! the wait in [`crate::QueueOutcome::throttled`], and its I/O thread runs the queue
//! again when that time has passed. An operation larger than a bucket's size passes when
//! the bucket is full and leaves it in debt, which refills before anything else passes.

use std::time::{Duration, Instant};

/// One bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u64,
    /// Tokens available; negative after an operation larger than `size`.
    budget: i128,
    one_time_burst: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; None when `size` or `refill_time_ms` is 0 (no limit, as Firecracker).
    pub fn new(size: u64, one_time_burst: u64, refill_time_ms: u64) -> Option<TokenBucket> {
        if size == 0 || refill_time_ms == 0 {
            return None;
        }
        Some(TokenBucket {
            size,
            refill_ns: refill_time_ms.saturating_mul(1_000_000),
            budget: i128::from(size),
            one_time_burst,
            last: Instant::now(),
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let tokens = elapsed * u128::from(self.size) / u128::from(self.refill_ns);
        if tokens == 0 {
            return;
        }
        // Only the time the whole tokens took moves `last`: fractions carry over.
        let used_ns = tokens * u128::from(self.refill_ns) / u128::from(self.size);
        self.last += Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
        let tokens = i128::try_from(tokens).unwrap_or(i128::MAX);
        self.budget = self
            .budget
            .saturating_add(tokens)
            .min(i128::from(self.size));
        if self.budget == i128::from(self.size) {
            // A full bucket does not save up time.
            self.last = now;
        }
    }

    /// How much must be there for `n` tokens to pass (a full bucket for more than `size`).
    fn needed(&self, n: u64) -> i128 {
        i128::from(n.min(self.size))
    }

    fn available(&self) -> i128 {
        self.budget + i128::from(self.one_time_burst)
    }

    /// Time until `n` tokens can pass (zero when they can now).
    fn wait_for(&self, n: u64) -> Duration {
        let missing = self.needed(n) - self.available();
        if missing <= 0 {
            return Duration::ZERO;
        }
        let ns = (missing as u128 * u128::from(self.refill_ns)).div_ceil(u128::from(self.size));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    fn take(&mut self, n: u64) {
        let from_burst = n.min(self.one_time_burst);
        self.one_time_burst -= from_burst;
        self.budget -= i128::from(n - from_burst);
    }
}

/// A bucket's new setting in an update: as it was, none, or a new (full) bucket.
#[derive(Debug, Clone)]
pub enum BucketUpdate {
    Keep,
    Disable,
    Set(TokenBucket),
}

/// A bytes bucket and an operations bucket.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    pub fn new(bandwidth: Option<TokenBucket>, ops: Option<TokenBucket>) -> Self {
        RateLimiter { bandwidth, ops }
    }

    /// Whether it limits anything.
    pub fn is_limited(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }

    /// One operation of `ops` operations and `bytes` bytes: taken from both buckets, or
    /// neither and the time after which it would pass.
    pub fn consume(&mut self, ops: u64, bytes: u64) -> Result<(), Duration> {
        self.consume_at(Instant::now(), ops, bytes)
    }

    fn consume_at(&mut self, now: Instant, ops: u64, bytes: u64) -> Result<(), Duration> {
        let mut wait = Duration::ZERO;
        for (b, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, ops)] {
            if let Some(b) = b.as_mut() {
                b.refill(now);
                wait = wait.max(b.wait_for(n));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        if let Some(b) = self.bandwidth.as_mut() {
            b.take(bytes);
        }
        if let Some(b) = self.ops.as_mut() {
            b.take(ops);
        }
        Ok(())
    }

    /// Firecracker's PATCH: each bucket kept, removed or replaced.
    pub fn update(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        for (slot, u) in [(&mut self.bandwidth, bandwidth), (&mut self.ops, ops)] {
            match u {
                BucketUpdate::Keep => {}
                BucketUpdate::Disable => *slot = None,
                BucketUpdate::Set(b) => *slot = Some(b),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_bucket_limits_to_its_refill_rate() {
        // 1000 bytes per 100 ms.
        let mut r = RateLimiter::new(TokenBucket::new(1000, 0, 100), None);
        let t0 = Instant::now();
        r.bandwidth.as_mut().unwrap().last = t0;
        assert_eq!(r.consume_at(t0, 1, 600), Ok(()));
        assert_eq!(r.consume_at(t0, 1, 400), Ok(()));
        // Empty: 500 bytes take 50 ms to come back.
        assert_eq!(r.consume_at(t0, 1, 500), Err(ms(50)));
        assert_eq!(r.consume_at(t0 + ms(49), 1, 500), Err(ms(1)));
        assert_eq!(r.consume_at(t0 + ms(50), 1, 500), Ok(()));
        // Over a long time, never more than one bucket saved up.
        assert_eq!(r.consume_at(t0 + ms(10_000), 1, 1000), Ok(()));
        assert!(r.consume_at(t0 + ms(10_000), 1, 1).is_err());
    }

    #[test]
    fn both_buckets_must_pass_and_neither_is_charged_otherwise() {
        let mut r = RateLimiter::new(TokenBucket::new(1000, 0, 100), TokenBucket::new(2, 0, 100));
        let t0 = Instant::now();
        for b in [&mut r.bandwidth, &mut r.ops] {
            b.as_mut().unwrap().last = t0;
        }
        assert_eq!(r.consume_at(t0, 1, 10), Ok(()));
        assert_eq!(r.consume_at(t0, 1, 10), Ok(()));
        // Out of operations: the bytes are not taken either.
        assert_eq!(r.consume_at(t0, 1, 10), Err(ms(50)));
        assert_eq!(r.bandwidth.as_ref().unwrap().budget, 980);
    }

    #[test]
    fn one_time_burst_goes_first_and_does_not_refill() {
        let mut r = RateLimiter::new(None, TokenBucket::new(1, 5, 1000));
        let t0 = Instant::now();
        r.ops.as_mut().unwrap().last = t0;
        for _ in 0..6 {
            assert_eq!(r.consume_at(t0, 1, 0), Ok(()));
        }
        assert_eq!(r.consume_at(t0, 1, 0), Err(ms(1000)));
        assert_eq!(r.consume_at(t0 + ms(1000), 1, 0), Ok(()));
        assert_eq!(r.consume_at(t0 + ms(1000), 1, 0), Err(ms(1000)));
    }

    #[test]
    fn an_operation_larger_than_the_bucket_passes_full_and_leaves_debt() {
        let mut r = RateLimiter::new(TokenBucket::new(100, 0, 100), None);
        let t0 = Instant::now();
        r.bandwidth.as_mut().unwrap().last = t0;
        assert_eq!(r.consume_at(t0, 1, 250), Ok(()));
        // 150 bytes of debt plus 1 byte: 151 ms.
        assert_eq!(r.consume_at(t0, 1, 1), Err(ms(151)));
        assert_eq!(r.consume_at(t0 + ms(151), 1, 1), Ok(()));
    }

    #[test]
    fn zero_size_or_refill_time_is_no_limit_and_updates_apply() {
        assert!(TokenBucket::new(0, 0, 100).is_none());
        assert!(TokenBucket::new(100, 0, 0).is_none());
        let mut r = RateLimiter::default();
        assert!(!r.is_limited());
        assert_eq!(r.consume(1, u64::MAX), Ok(()));
        r.update(
            BucketUpdate::Set(TokenBucket::new(1, 0, 1000).unwrap()),
            BucketUpdate::Keep,
        );
        assert!(r.is_limited());
        assert_eq!(r.consume(1, 1), Ok(()));
        assert!(r.consume(1, 1).is_err());
        r.update(BucketUpdate::Disable, BucketUpdate::Keep);
        assert_eq!(r.consume(1, 1), Ok(()));
    }
}

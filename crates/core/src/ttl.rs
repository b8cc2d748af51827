//! TTL arithmetic: jitter and soft expiry. Pure functions of their inputs
//! (the random sample is passed in), so they are property-tested.

use std::time::Duration;

/// `ttl` scaled by `1 + jitter * (2u - 1)`, for a uniform sample `u` in
/// `[0, 1)`: a value in `[ttl * (1 - jitter), ttl * (1 + jitter)]`. Never
/// zero for a non-zero `ttl`, and saturating instead of overflowing.
pub fn jittered(ttl: Duration, jitter: f64, u: f64) -> Duration {
    let factor = 1.0 + jitter.clamp(0.0, 1.0) * (2.0 * u.clamp(0.0, 1.0) - 1.0);
    let scaled = Duration::try_from_secs_f64(ttl.as_secs_f64() * factor).unwrap_or(Duration::MAX);
    if ttl.is_zero() { ttl } else { scaled.max(Duration::from_millis(1)) }
}

/// How long after a fill an entry with lifetime `ttl` turns soft (served,
/// but reloaded in the background): `ttl * refresh_ahead`.
pub fn soft_after(ttl: Duration, refresh_ahead: f64) -> Duration {
    ttl.mul_f64(refresh_ahead.clamp(0.0, 1.0))
}

/// How long a filled entry lives and when it turns soft.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub soft: Duration,
    pub hard: Duration,
}

impl Lifetime {
    /// An entry that is never refreshed ahead: soft and hard expiry coincide.
    pub fn fixed(ttl: Duration) -> Lifetime {
        Lifetime { soft: ttl, hard: ttl }
    }

    /// A jittered TTL with its soft expiry at `refresh_ahead` of it.
    pub fn jittered(ttl: Duration, jitter: f64, refresh_ahead: f64, u: f64) -> Lifetime {
        let hard = jittered(ttl, jitter, u);
        Lifetime { soft: soft_after(hard, refresh_ahead), hard }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn jitter_stays_within_its_bounds(ms in 1u64..10_000_000, jitter in 0.0f64..=0.5, u in 0.0f64..1.0) {
            let ttl = Duration::from_millis(ms);
            let got = jittered(ttl, jitter, u).as_secs_f64();
            let (low, high) = (ttl.as_secs_f64() * (1.0 - jitter), ttl.as_secs_f64() * (1.0 + jitter));
            // One nanosecond of rounding either way, and the 1 ms floor.
            prop_assert!(got >= (low - 1e-9).min(0.001) && got <= high + 1e-9, "{got} not in [{low}, {high}]");
            prop_assert!(got > 0.0);
        }

        #[test]
        fn soft_expiry_comes_before_hard_expiry(ms in 1u64..10_000_000, jitter in 0.0f64..=0.5, ahead in 0.1f64..=1.0, u in 0.0f64..1.0) {
            let life = Lifetime::jittered(Duration::from_millis(ms), jitter, ahead, u);
            prop_assert!(life.soft <= life.hard);
        }

        #[test]
        fn huge_ttls_saturate_instead_of_panicking(secs in u64::MAX / 2..u64::MAX, u in 0.0f64..1.0) {
            let _ = jittered(Duration::from_secs(secs), 0.5, u);
        }
    }

    #[test]
    fn jitter_spreads_over_the_whole_range() {
        let ttl = Duration::from_secs(100);
        assert_eq!(jittered(ttl, 0.2, 0.0), Duration::from_secs(80));
        assert_eq!(jittered(ttl, 0.2, 0.5), Duration::from_secs(100));
        assert!(jittered(ttl, 0.2, 0.999_999) > Duration::from_secs(119));
        assert_eq!(jittered(ttl, 0.0, 0.9), ttl);
    }
}

//! Time as the scheduler sees it. The scheduler never reads the system
//! clock itself: maintenance windows, soak times and timeouts all go through
//! a [`Clock`], so tests drive time by hand instead of sleeping.
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;

    /// UTC day of the week, 0 = Monday .. 6 = Sunday.
    fn weekday(&self) -> u32 {
        utc_weekday(self.now_ms())
    }

    /// UTC hour of the day, 0..=23.
    fn hour(&self) -> u32 {
        utc_hour(self.now_ms())
    }
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        trellis_core::time::now_ms()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    ms: Arc<AtomicI64>,
}

impl ManualClock {
    pub fn new(now_ms: i64) -> Self {
        Self {
            ms: Arc::new(AtomicI64::new(now_ms)),
        }
    }

    /// A clock set to a UTC weekday (0 = Monday) and hour, in some week of 2026.
    pub fn at(weekday: u32, hour: u32) -> Self {
        // 2026-01-05 00:00 UTC is a Monday.
        const MONDAY: i64 = 1_767_571_200_000;
        Self::new(MONDAY + i64::from(weekday) * DAY_MS + i64::from(hour) * HOUR_MS)
    }

    /// The time this clock shows.
    pub fn now_ms_value(&self) -> i64 {
        self.ms.load(Ordering::SeqCst)
    }

    pub fn set(&self, now_ms: i64) {
        self.ms.store(now_ms, Ordering::SeqCst);
    }

    pub fn advance_ms(&self, ms: i64) {
        self.ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.ms.load(Ordering::SeqCst)
    }
}

pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// UTC weekday of an instant, 0 = Monday (1970-01-01 was a Thursday).
pub fn utc_weekday(ms: i64) -> u32 {
    let days = ms.div_euclid(DAY_MS);
    (days + 3).rem_euclid(7) as u32
}

/// UTC hour of an instant.
pub fn utc_hour(ms: i64) -> u32 {
    (ms.rem_euclid(DAY_MS) / HOUR_MS) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weekday_and_hour() {
        // 1970-01-01 00:00 was a Thursday.
        assert_eq!(utc_weekday(0), 3);
        let c = ManualClock::at(0, 2);
        assert_eq!((c.weekday(), c.hour()), (0, 2));
        let c = ManualClock::at(6, 23);
        assert_eq!((c.weekday(), c.hour()), (6, 23));
        c.advance_ms(HOUR_MS);
        assert_eq!((c.weekday(), c.hour()), (0, 0));
    }
}

//! Which gateway a device tries next, and when: a state machine over the
//! outcomes of connection attempts, without I/O, clock or randomness (the
//! caller connects, and turns a backoff level into a jittered wait).
//!
//! A busy home region is not a lost region. Our gateway gives no busy
//! signal a device could tell apart: its admission control (the handshake
//! token bucket) closes a connection right after accepting it, before the
//! nonce, and a saturated key vault makes it close the connection after the
//! device's handshake bytes. So the rule goes by TCP accept versus refuse:
//!
//! - **Not served** ([`Failure::NotServed`]): the TCP connect is refused or
//!   times out, or the connection is accepted but no nonce comes within the
//!   handshake step limit (a gateway sends it at once; a silent listener is
//!   a hung process). The device moves on to the next endpoint at once.
//! - **Turned away** ([`Failure::TurnedAway`]): the connection was
//!   accepted, then the handshake failed: closed or reset by the gateway
//!   (busy, most often), no reply in time, or refused. The device retries
//!   the same endpoint after a jittered exponential backoff, and moves on
//!   only after [`DEFAULT_MAX_TURNED_AWAY`] (5) such failures in a row
//!   there, so a gateway that keeps failing handshakes (its key vault gone,
//!   say) does not hold the device for ever.
//! - After a whole pass over the endpoints without a session, the device
//!   backs off and starts again from the first endpoint of the pass (home,
//!   or the one that last worked).

use crate::session::SessionError;

/// Consecutive turned-away handshakes at one endpoint before the device
/// moves on to the next.
pub const DEFAULT_MAX_TURNED_AWAY: u32 = 5;

/// Why a connection attempt did not give a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Nothing serves there: TCP connect refused or timed out, or accepted
    /// and then silent (no nonce).
    NotServed,
    /// Accepted, then the handshake failed (busy, most often).
    TurnedAway,
}

impl Failure {
    /// A handshake that failed on an accepted connection.
    pub fn of_handshake(error: &SessionError) -> Self {
        if error.no_nonce() {
            Self::NotServed
        } else {
            Self::TurnedAway
        }
    }
}

/// What to do before the next attempt, at [`Failover::current`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try at once.
    Now,
    /// Wait a backoff of this level (exponent) first.
    Backoff(u32),
}

/// The endpoint choice of one device. Endpoints are indices into its list,
/// in preferred order.
#[derive(Debug, Clone)]
pub struct Failover {
    endpoints: usize,
    max_turned_away: u32,
    /// Where the current pass started.
    start: usize,
    current: usize,
    /// Endpoints left behind in the current pass.
    moved: usize,
    /// Turned-away handshakes in a row at `current`.
    turned_away: u32,
    /// Whole passes without a session since the last one.
    passes: u32,
}

impl Failover {
    /// Starts at endpoint 0 of `endpoints` (at least one). A
    /// `max_turned_away` of 1 moves on after any failure.
    pub fn new(endpoints: usize, max_turned_away: u32) -> Self {
        Failover {
            endpoints: endpoints.max(1),
            max_turned_away: max_turned_away.max(1),
            start: 0,
            current: 0,
            moved: 0,
            turned_away: 0,
            passes: 0,
        }
    }

    /// The endpoint to try next.
    pub fn current(&self) -> usize {
        self.current
    }

    /// A session was established at [`Failover::current`].
    pub fn connected(&mut self) {
        self.passes = 0;
        self.turned_away = 0;
        self.moved = 0;
        self.start = self.current;
    }

    /// A new pass from `from` (a reconnect after a session ended: home, or
    /// the endpoint that last worked).
    pub fn restart_at(&mut self, from: usize) {
        self.start = from % self.endpoints;
        self.current = self.start;
        self.moved = 0;
        self.turned_away = 0;
    }

    /// The attempt at [`Failover::current`] failed; where next and when.
    pub fn failed(&mut self, failure: Failure) -> Next {
        if failure == Failure::TurnedAway {
            self.turned_away += 1;
            if self.turned_away < self.max_turned_away {
                // Same endpoint, later; the level grows with each refusal
                // here (and with the passes already made).
                return Next::Backoff(self.passes + self.turned_away - 1);
            }
        }
        self.turned_away = 0;
        self.moved += 1;
        if self.moved < self.endpoints {
            self.current = (self.current + 1) % self.endpoints;
            return Next::Now;
        }
        // Every endpoint failed: back off, then the same order again.
        self.moved = 0;
        self.current = self.start;
        let level = self.passes;
        self.passes = self.passes.saturating_add(1);
        Next::Backoff(level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Failure::*;

    /// (endpoint tried, what happened) → the next decisions.
    fn run(f: &mut Failover, outcomes: &[Failure]) -> Vec<(usize, Next)> {
        outcomes
            .iter()
            .map(|&o| {
                let n = f.failed(o);
                (f.current(), n)
            })
            .collect()
    }

    #[test]
    fn a_busy_gateway_is_retried_with_growing_backoff_then_left_after_the_limit() {
        let mut f = Failover::new(4, DEFAULT_MAX_TURNED_AWAY);
        let got = run(&mut f, &[TurnedAway; 5]);
        assert_eq!(
            got,
            vec![
                (0, Next::Backoff(0)),
                (0, Next::Backoff(1)),
                (0, Next::Backoff(2)),
                (0, Next::Backoff(3)),
                // The fifth in a row: on to the next gateway, at once.
                (1, Next::Now),
            ]
        );
        // The count starts again at the next gateway.
        assert_eq!(f.failed(TurnedAway), Next::Backoff(0));
        assert_eq!(f.current(), 1);
    }

    #[test]
    fn a_gateway_that_does_not_accept_is_left_at_once() {
        let mut f = Failover::new(3, DEFAULT_MAX_TURNED_AWAY);
        assert_eq!(f.failed(NotServed), Next::Now);
        assert_eq!(f.current(), 1);
        // Turned away once at 1, then 1 stops accepting: on to 2.
        assert_eq!(f.failed(TurnedAway), Next::Backoff(0));
        assert_eq!(f.failed(NotServed), Next::Now);
        assert_eq!(f.current(), 2);
    }

    #[test]
    fn a_success_between_refusals_resets_the_count() {
        let mut f = Failover::new(2, 3);
        f.failed(TurnedAway);
        f.failed(TurnedAway);
        f.connected();
        f.restart_at(0);
        assert_eq!(f.failed(TurnedAway), Next::Backoff(0));
        assert_eq!(f.failed(TurnedAway), Next::Backoff(1));
        assert_eq!(f.current(), 0);
        assert_eq!(f.failed(TurnedAway), Next::Now);
        assert_eq!(f.current(), 1);
    }

    #[test]
    fn a_whole_failed_pass_backs_off_and_starts_again_where_it_started() {
        let mut f = Failover::new(2, DEFAULT_MAX_TURNED_AWAY);
        assert_eq!(f.failed(NotServed), Next::Now);
        assert_eq!(f.failed(NotServed), Next::Backoff(0));
        assert_eq!(f.current(), 0);
        assert_eq!(f.failed(NotServed), Next::Now);
        assert_eq!(f.failed(NotServed), Next::Backoff(1));
        // Busy retries in a later pass wait longer from the start.
        assert_eq!(f.failed(TurnedAway), Next::Backoff(2));
        // A session resets the levels; a pass from endpoint 1 (the one
        // that last worked) wraps round to 0.
        f.current = 1;
        f.connected();
        f.restart_at(1);
        assert_eq!(f.failed(NotServed), Next::Now);
        assert_eq!(f.current(), 0);
        assert_eq!(f.failed(NotServed), Next::Backoff(0));
        assert_eq!(f.current(), 1);
    }

    #[test]
    fn a_limit_of_one_moves_on_after_any_failure() {
        // The behaviour before issue 10 item 9.
        let mut f = Failover::new(3, 1);
        assert_eq!(f.failed(TurnedAway), Next::Now);
        assert_eq!(f.failed(TurnedAway), Next::Now);
        assert_eq!(f.failed(NotServed), Next::Backoff(0));
        assert_eq!(f.current(), 0);
    }

    #[test]
    fn one_endpoint_is_retried_whatever_happens() {
        let mut f = Failover::new(1, 2);
        assert_eq!(f.failed(TurnedAway), Next::Backoff(0));
        assert_eq!(f.failed(TurnedAway), Next::Backoff(0));
        assert_eq!(f.failed(NotServed), Next::Backoff(1));
        assert_eq!(f.current(), 0);
    }

    #[test]
    fn handshake_failures_are_classified_by_whether_the_gateway_spoke() {
        // Accepted and never sent a nonce: nobody serves there.
        let silent = SessionError::HandshakeTimeout(crate::session::NONCE_STEP);
        assert_eq!(Failure::of_handshake(&silent), NotServed);
        // Closed or reset after accept (admission control, a saturated key
        // vault), or no reply to our handshake bytes: busy.
        for busy in [
            SessionError::Closed,
            SessionError::Io(std::io::ErrorKind::ConnectionReset.into()),
            SessionError::HandshakeTimeout("server reply"),
        ] {
            assert_eq!(Failure::of_handshake(&busy), TurnedAway, "{busy}");
        }
    }
}

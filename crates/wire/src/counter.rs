//! Message-id counters: the protocol's only defence against replayed and
//! reordered frames (AES-CBC alone authenticates nothing), so every non-ACK
//! message must carry exactly the previous id plus one.

use crate::error::CounterError;

/// Checks the ids a peer sends.
#[derive(Debug, Clone, Default)]
pub struct IncomingCounter {
    last: Option<u16>,
}

impl IncomingCounter {
    pub fn new() -> Self {
        IncomingCounter { last: None }
    }

    /// Takes the peer's Hello id as the starting point.
    pub fn start(&mut self, hello_id: u16) {
        self.last = Some(hello_id);
    }

    /// The id expected next, if started.
    pub fn expected(&self) -> Option<u16> {
        self.last.map(|l| l.wrapping_add(1))
    }

    /// Accepts `id` only if it is the previous id + 1 (65535 wraps to 0).
    /// An id up to half the id space behind is a replay or reordering; one
    /// further off is a skip ahead.
    pub fn check(&mut self, id: u16) -> Result<(), CounterError> {
        let Some(expected) = self.expected() else {
            return Err(CounterError::NotStarted { got: id });
        };
        if id == expected {
            self.last = Some(id);
            return Ok(());
        }
        let behind = expected.wrapping_sub(id);
        if behind <= 32768 {
            Err(CounterError::Replayed { expected, got: id })
        } else {
            Err(CounterError::Skipped { expected, got: id })
        }
    }
}

/// Produces our own ids.
#[derive(Debug, Clone)]
pub struct OutgoingCounter {
    next: u16,
}

impl OutgoingCounter {
    /// `start` is the first id `next` returns (the Hello's id).
    pub fn new(start: u16) -> Self {
        OutgoingCounter { next: start }
    }

    // Named `next` because callers were written against that name; it is
    // never exhausted, so an Iterator would only add `Option` noise.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u16 {
        let id = self.next;
        self.next = self.next.wrapping_add(1);
        id
    }

    /// The id the next call to `next` will return.
    pub fn peek(&self) -> u16 {
        self.next
    }
}

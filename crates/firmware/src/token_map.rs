//! A map keyed by a one-byte CoAP token.
//!
//! A session or a transfer waits on a handful of tokens at a time (a
//! firmware window is 8 chunks, a session's other requests a few more), so
//! the map is a vector searched in order: at these sizes a scan over a few
//! cache lines costs less than hashing, inserting and removing in a hash
//! table, which (even with foldhash) was about 7 % of the gateway's CPU in
//! a firmware transfer with 512-byte chunks (perf, 2026-12-04). An empty
//! map allocates nothing, which matters for idle sessions.

/// Token -> value, at most one value per token. Iteration order is not
/// meaningful (a removal moves the last entry into the gap).
#[derive(Debug, Clone)]
pub struct TokenMap<V> {
    entries: Vec<(u8, V)>,
}

impl<V> Default for TokenMap<V> {
    fn default() -> Self {
        TokenMap {
            entries: Vec::new(),
        }
    }
}

impl<V> TokenMap<V> {
    fn position(&self, token: u8) -> Option<usize> {
        self.entries.iter().position(|(t, _)| *t == token)
    }

    /// Sets the value of `token`, returning the one it replaces.
    pub fn insert(&mut self, token: u8, value: V) -> Option<V> {
        match self.position(token) {
            Some(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            None => {
                self.entries.push((token, value));
                None
            }
        }
    }

    pub fn remove(&mut self, token: &u8) -> Option<V> {
        let i = self.position(*token)?;
        Some(self.entries.swap_remove(i).1)
    }

    pub fn get(&self, token: &u8) -> Option<&V> {
        self.position(*token).map(|i| &self.entries[i].1)
    }

    pub fn contains_key(&self, token: &u8) -> bool {
        self.position(*token).is_some()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries the map can hold without allocating.
    pub fn capacity(&self) -> usize {
        self.entries.capacity()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u8, &V)> {
        self.entries.iter().map(|(t, v)| (t, v))
    }

    /// Keeps the entries for which `keep` returns true.
    pub fn retain(&mut self, mut keep: impl FnMut(&u8, &mut V) -> bool) {
        self.entries.retain_mut(|(t, v)| keep(t, v));
    }

    /// Takes every entry out, leaving the map empty (its allocation kept).
    pub fn drain(&mut self) -> impl Iterator<Item = (u8, V)> + '_ {
        self.entries.drain(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The same operations on this map and on a `HashMap` give the same
    /// contents and the same answers, for every token.
    #[test]
    fn behaves_as_a_hash_map() {
        let mut ours = TokenMap::default();
        let mut reference = HashMap::new();
        // A fixed pseudo-random walk over inserts, removes and retains.
        let mut x: u32 = 0x2545_f491;
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            // Few distinct tokens, so replacing and removing present ones is common.
            let token = (x % 24) as u8;
            match x % 7 {
                0..=2 => assert_eq!(ours.insert(token, step), reference.insert(token, step)),
                3 | 4 => assert_eq!(ours.remove(&token), reference.remove(&token)),
                5 => {
                    let keep = |t: &u8, v: &mut u32| !(u32::from(*t) + *v).is_multiple_of(3);
                    ours.retain(keep);
                    reference.retain(keep);
                }
                _ => assert_eq!(ours.get(&token), reference.get(&token)),
            }
            assert_eq!(ours.len(), reference.len());
            assert_eq!(ours.contains_key(&token), reference.contains_key(&token));
        }
        let mut drained: Vec<(u8, u32)> = ours.drain().collect();
        let mut expected: Vec<(u8, u32)> = reference.into_iter().collect();
        drained.sort_unstable();
        expected.sort_unstable();
        assert_eq!(drained, expected);
        assert!(ours.is_empty());
    }

    #[test]
    fn an_empty_map_allocates_nothing() {
        let map: TokenMap<[u8; 64]> = TokenMap::default();
        assert_eq!(map.capacity(), 0);
    }
}

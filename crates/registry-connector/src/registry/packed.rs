//! Instance metadata packed into one string: what a source keeps for every instance it
//! mirrors.
//!
//! A Eureka mirror of 10,000 applications × 3 instances with three metadata entries each
//! held 210,000 allocations for metadata alone as a sorted vector of boxed keys and
//! values (seven per instance, each with glibc's 16-byte header and rounding). Packed,
//! an instance's metadata is one allocation. Lookups parse the string: they happen when
//! a service is built, a handful of keys over a handful of entries, never per byte of an
//! answer.
//!
//! The layout is `<len>:<key><len>:<value>` per entry, lengths in bytes as decimal
//! digits, entries sorted by key without duplicates. Lengths rather than separators, so
//! that any key or value (a `:` or a NUL in it) round-trips.

use std::fmt;

use super::metadata::MetadataLookup;

/// Sorted, deduplicated key-value pairs in one allocation (see the module documentation).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct CompactMetadata {
    packed: Box<str>,
}

impl CompactMetadata {
    pub fn new() -> Self {
        Self::default()
    }

    /// Entries in key order.
    pub fn iter(&self) -> Entries<'_> {
        Entries { rest: &self.packed }
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.packed.is_empty()
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Sets `key` to `value` (repacks: for building and tests, not for a hot path).
    pub fn insert(&mut self, key: String, value: String) {
        let mut entries: Vec<(String, String)> = self
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        entries.push((key, value));
        *self = entries.into_iter().collect();
    }
}

/// Of two entries with one key the last wins, whatever the order given.
impl FromIterator<(String, String)> for CompactMetadata {
    fn from_iter<T: IntoIterator<Item = (String, String)>>(entries: T) -> Self {
        let mut pairs: Vec<(String, String)> = entries.into_iter().collect();
        // Stable, so that among equal keys the order of arrival stays and the last is kept.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs.reverse();
        pairs.dedup_by(|later, earlier| later.0 == earlier.0);
        pairs.reverse();
        let size: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
        let mut packed = String::with_capacity(size);
        for (key, value) in &pairs {
            for part in [key, value] {
                packed.push_str(&part.len().to_string());
                packed.push(':');
                packed.push_str(part);
            }
        }
        Self {
            packed: packed.into_boxed_str(),
        }
    }
}

impl MetadataLookup for CompactMetadata {
    fn value(&self, key: &str) -> Option<&str> {
        self.get(key)
    }
}

impl fmt::Debug for CompactMetadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// The entries of a [`CompactMetadata`], in key order.
pub struct Entries<'a> {
    rest: &'a str,
}

impl<'a> Entries<'a> {
    /// The next length-prefixed part. Only `FromIterator` writes the string, so a part
    /// always parses; an impossible one ends the iteration rather than panicking.
    fn part(&mut self) -> Option<&'a str> {
        let (len, tail) = self.rest.split_once(':')?;
        let len: usize = len.parse().ok()?;
        let part = tail.get(..len)?;
        self.rest = &tail[len..];
        Some(part)
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let key = self.part()?;
        let value = self.part()?;
        Some((key, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> CompactMetadata {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn entries_come_back_sorted_and_the_last_of_a_key_wins() {
        let m = meta(&[("zone", "a"), ("version", "1"), ("zone", "b")]);
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            [("version", "1"), ("zone", "b")]
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m.get("zone"), Some("b"));
        assert_eq!(m.get("zon"), None);
        assert_eq!(m.value("version"), Some("1"));
    }

    #[test]
    fn any_text_round_trips() {
        let odd = [
            ("", ""),
            ("a:b", "1:2:"),
            ("nul\0key", "ünïcödé 🚀"),
            ("12", "34"),
            ("k", &"x".repeat(1000)),
        ];
        let m = meta(&odd);
        let mut want: Vec<(&str, &str)> = odd.to_vec();
        want.sort();
        assert_eq!(m.iter().collect::<Vec<_>>(), want);
        for (k, v) in odd {
            assert_eq!(m.get(k), Some(v), "{k:?}");
        }
    }

    #[test]
    fn empty_and_insert() {
        let mut m = CompactMetadata::new();
        assert!(m.is_empty());
        assert_eq!(m.iter().count(), 0);
        m.insert("b".into(), "2".into());
        m.insert("a".into(), "1".into());
        m.insert("b".into(), "3".into());
        assert_eq!(m.iter().collect::<Vec<_>>(), [("a", "1"), ("b", "3")]);
        assert_eq!(format!("{m:?}"), r#"{"a": "1", "b": "3"}"#);
        assert_eq!(m, meta(&[("b", "3"), ("a", "1")]));
    }
}

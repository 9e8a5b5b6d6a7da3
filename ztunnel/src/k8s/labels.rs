//! Compact, shared strings for what every pod of a large cluster repeats.
//!
//! Ten thousand pods carry the same few namespaces, nodes, service accounts and label keys and
//! values. Held as one `String` each (and labels as a `BTreeMap`, whose smallest node is about
//! 550 bytes), they were most of the daemon's memory for a large state. An [`Interner`] hands
//! out one `Arc<str>` per distinct text, and [`Labels`] keeps a pod's labels as one sorted
//! slice of such pairs: a pod with two labels costs one 96-byte allocation instead of about
//! 700 bytes.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

/// One `Arc<str>` per distinct text, so equal texts share their bytes.
///
/// Texts no longer used anywhere else are dropped by [`Interner::sweep`], which runs by itself
/// whenever the set has doubled since the last sweep, so churn (labels with hashes in them,
/// pods coming and going) does not grow it for ever.
#[derive(Debug, Default)]
pub struct Interner {
    set: HashSet<SharedStr>,
    /// Size after the last sweep.
    swept: usize,
}

impl Interner {
    /// The shared copy of `s`.
    pub fn intern(&mut self, s: &str) -> SharedStr {
        if let Some(a) = self.set.get(s) {
            return a.clone();
        }
        if self.set.len() >= 2 * self.swept.max(1024) {
            self.sweep();
        }
        let a = SharedStr::from(s);
        self.set.insert(a.clone());
        a
    }

    /// Drops the texts that only the interner still holds.
    pub fn sweep(&mut self) {
        self.set.retain(|a| Arc::strong_count(&a.0) > 1);
        self.set.shrink_to_fit();
        self.swept = self.set.len();
    }

    /// Distinct texts held.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// No text held.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// `labels` as a [`Labels`], keys and values interned.
    pub fn labels(&mut self, labels: &BTreeMap<String, String>) -> Labels {
        // A BTreeMap iterates in key order: the slice is sorted as `get` expects.
        Labels(
            labels
                .iter()
                .map(|(k, v)| (self.intern(k), self.intern(v)))
                .collect(),
        )
    }
}

/// A text shared through an [`Interner`]: reads as a `&str` and compares with `str` and
/// `String`, so code written for a `String` field reads it unchanged.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SharedStr(Arc<str>);

impl SharedStr {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for SharedStr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for SharedStr {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SharedStr {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for SharedStr {
    /// A text not shared with anything yet (tests, one-off values).
    fn from(s: &str) -> SharedStr {
        SharedStr(Arc::from(s))
    }
}

impl std::fmt::Display for SharedStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for SharedStr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl PartialEq<str> for SharedStr {
    fn eq(&self, o: &str) -> bool {
        *self.0 == *o
    }
}

impl PartialEq<&str> for SharedStr {
    fn eq(&self, o: &&str) -> bool {
        *self.0 == **o
    }
}

impl PartialEq<String> for SharedStr {
    fn eq(&self, o: &String) -> bool {
        *self.0 == **o
    }
}

impl PartialEq<SharedStr> for str {
    fn eq(&self, o: &SharedStr) -> bool {
        *self == *o.0
    }
}

impl PartialEq<SharedStr> for &str {
    fn eq(&self, o: &SharedStr) -> bool {
        **self == *o.0
    }
}

impl PartialEq<SharedStr> for String {
    fn eq(&self, o: &SharedStr) -> bool {
        **self == *o.0
    }
}

/// An immutable label set, sorted by key (see the module documentation for why not a map).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Labels(Arc<[(SharedStr, SharedStr)]>);

impl Labels {
    /// The value of label `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    /// Whether label `key` is set.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The labels in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No label.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every `key: value` of `selector` is among these labels (an empty selector
    /// selects everything).
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector
            .iter()
            .all(|(k, v)| self.get(k) == Some(v.as_str()))
    }
}

impl From<&BTreeMap<String, String>> for Labels {
    /// Labels not shared with any other set (tests, one-off look-ups).
    fn from(m: &BTreeMap<String, String>) -> Labels {
        Labels(
            m.iter()
                .map(|(k, v)| (SharedStr::from(k.as_str()), SharedStr::from(v.as_str())))
                .collect(),
        )
    }
}

impl Serialize for Labels {
    /// As a map, like the Kubernetes object it came from.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interned_texts_are_shared_and_swept_when_unused() {
        let mut i = Interner::default();
        let a = i.intern("ns-1");
        let b = i.intern("ns-1");
        assert!(Arc::ptr_eq(&a.0, &b.0));
        let c = i.intern("gone");
        drop(c);
        i.sweep();
        assert_eq!(i.len(), 1, "only the text still used elsewhere stays");
    }

    #[test]
    fn labels_look_up_match_and_serialize_as_a_map() {
        let mut i = Interner::default();
        let m: BTreeMap<String, String> = [("b", "2"), ("a", "1"), ("c", "3")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let l = i.labels(&m);
        assert_eq!(l.get("a"), Some("1"));
        assert_eq!(l.get("c"), Some("3"));
        assert_eq!(l.get("d"), None);
        let sel = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(l.matches(&sel(&[("a", "1"), ("c", "3")])));
        assert!(!l.matches(&sel(&[("a", "2")])));
        assert!(l.matches(&BTreeMap::new()));
        assert_eq!(
            serde_json::to_string(&l).expect("serializes"),
            r#"{"a":"1","b":"2","c":"3"}"#
        );
        assert_eq!(Labels::from(&m), l);
    }
}

//! `GET /apps/delta`, decoded as it is read and against the delta before it.
//!
//! Right after a mass registration every delta repeats every change of the server's last
//! three minutes (30,000 instances at 10,000 applications, some 25 MB of JSON). Such a
//! delta is neither held whole (its entries are hashed and decoded one by one as the
//! body streams in) nor decoded again entry by entry at every poll (see [`DeltaMemo`]).

use std::fmt;
use std::io::Read;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserializer;
use serde_json::value::RawValue;
use serde_json::Value;

use super::api::{Application, Applications, Instance};

/// What the last delta held, entry by entry: a hash of each instance entry's raw text
/// (with its application). Right after a mass registration every delta repeats every
/// change of the server's last three minutes (30,000 instances at 10,000 applications),
/// and decoding them all again at each poll made the poll's work, not its interval,
/// bound the latency. An entry whose exact text the last delta already carried was
/// applied then (a delta entry is the instance's current state), so it is skipped
/// without being decoded. A full read fills it with its own entries: an instance that did
/// not change has the same text in `/apps` and in `/apps/delta`, so the first delta
/// after a full read decodes only what changed since (30,000 entries decoded again and
/// held beside the fresh copy otherwise, right after a mass registration).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeltaMemo {
    entries: std::collections::HashSet<u64>,
}

impl DeltaMemo {
    fn key(app: &str, raw: &str) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        app.hash(&mut hasher);
        raw.hash(&mut hasher);
        hasher.finish()
    }

    /// Entries remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A delta decoded against the last one: only its new entries, and the memo of all of
/// them for the next.
#[derive(Debug)]
pub struct DecodedDelta {
    pub applications: Applications,
    pub memo: DeltaMemo,
    /// Entries skipped because the last delta carried them unchanged.
    pub skipped: usize,
}

/// Decodes a `GET /apps/delta` body (or a `GET /apps` one, with an empty `last`) as it
/// is read, skipping the entries `last` already held (see [`DeltaMemo`]). The result equals [`super::api::decode_applications`] of the
/// same body minus those entries.
pub fn read_delta(body: impl Read, last: &DeltaMemo) -> Result<DecodedDelta, serde_json::Error> {
    let mut out = DecodedDelta {
        applications: Applications::default(),
        memo: DeltaMemo::default(),
        skipped: 0,
    };
    let mut de = serde_json::Deserializer::from_reader(body);
    Envelope {
        last,
        out: &mut out,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(out)
}

/// [`read_delta`] of a body in memory.
pub fn decode_delta(body: &[u8], last: &DeltaMemo) -> Result<DecodedDelta, serde_json::Error> {
    read_delta(body, last)
}

/// The delta's entries go straight into the result: serde's seeds carry it down the
/// document (`{"applications":{"apps__hashcode":..,"application":[{"name":..,
/// "instance":[..]}]}}`), so that no list of the whole body is ever built.
struct Envelope<'a> {
    last: &'a DeltaMemo,
    out: &'a mut DecodedDelta,
}

impl<'de> DeserializeSeed<'de> for Envelope<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Envelope<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an applications document")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "applications" && !seen {
                seen = true;
                map.next_value_seed(Apps {
                    last: self.last,
                    out: &mut *self.out,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        if !seen {
            return Err(serde::de::Error::missing_field("applications"));
        }
        Ok(())
    }
}

/// The `applications` object: the hash code and the application list.
struct Apps<'a> {
    last: &'a DeltaMemo,
    out: &'a mut DecodedDelta,
}

impl<'de> DeserializeSeed<'de> for Apps<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Apps<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an applications object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "apps__hashcode" => {
                    self.out.applications.apps_hashcode = lenient_text(map.next_value()?);
                }
                "application" => map.next_value_seed(OneOrMany(App {
                    last: self.last,
                    out: &mut *self.out,
                }))?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// As [`super::api`]'s lenient strings: numbers and booleans as text, anything else none.
fn lenient_text(value: Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Something that takes each element of a list in turn.
trait Element {
    fn element<'de, D: Deserializer<'de>>(&mut self, d: D) -> Result<(), D::Error>;
}

/// A list, a single object standing for a list of one, or nothing (null, or a scalar as
/// Eureka's XML-minded JSON may write an empty list), each element given to `E`.
struct OneOrMany<E>(E);

impl<'de, E: Element> DeserializeSeed<'de> for OneOrMany<E> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// One element of a list, given to the [`Element`].
struct Each<'a, E>(&'a mut E);

impl<'de, E: Element> DeserializeSeed<'de> for Each<'_, E> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.0.element(d)
    }
}

impl<'de, E: Element> Visitor<'de> for OneOrMany<E> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list, a single object or null")
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Each(&mut self.0))?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, map: A) -> Result<(), A::Error> {
        self.0
            .element(serde::de::value::MapAccessDeserializer::new(map))
    }

    fn visit_unit<Er: serde::de::Error>(self) -> Result<(), Er> {
        Ok(())
    }

    fn visit_none<Er: serde::de::Error>(self) -> Result<(), Er> {
        Ok(())
    }

    fn visit_str<Er: serde::de::Error>(self, _: &str) -> Result<(), Er> {
        Ok(())
    }

    fn visit_bool<Er: serde::de::Error>(self, _: bool) -> Result<(), Er> {
        Ok(())
    }

    fn visit_i64<Er: serde::de::Error>(self, _: i64) -> Result<(), Er> {
        Ok(())
    }

    fn visit_u64<Er: serde::de::Error>(self, _: u64) -> Result<(), Er> {
        Ok(())
    }

    fn visit_f64<Er: serde::de::Error>(self, _: f64) -> Result<(), Er> {
        Ok(())
    }
}

/// Each application: its name and its instance list, the list read raw (one
/// application's worth) and split once the name is known (the hash of an entry includes
/// its application, and nothing says the name comes first).
struct App<'a> {
    last: &'a DeltaMemo,
    out: &'a mut DecodedDelta,
}

impl Element for App<'_> {
    fn element<'de, D: Deserializer<'de>>(&mut self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(AppVisitor {
            last: self.last,
            out: &mut *self.out,
        })
    }
}

struct AppVisitor<'a> {
    last: &'a DeltaMemo,
    out: &'a mut DecodedDelta,
}

impl<'de> Visitor<'de> for AppVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an application object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut name: Option<String> = None;
        let mut instances: Option<Box<RawValue>> = None;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "name" if name.is_none() => name = map.next_value::<Option<String>>()?,
                "instance" if instances.is_none() => instances = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let name = name.unwrap_or_default();
        let mut decoded = Vec::new();
        for raw in raw_elements(instances.as_deref()).map_err(serde::de::Error::custom)? {
            let key = DeltaMemo::key(&name, raw.get());
            self.out.memo.entries.insert(key);
            if self.last.entries.contains(&key) {
                self.out.skipped += 1;
                continue;
            }
            decoded.push(
                serde_json::from_str::<Instance>(raw.get()).map_err(serde::de::Error::custom)?,
            );
        }
        if !decoded.is_empty() {
            self.out.applications.applications.push(Application {
                name,
                instances: decoded,
            });
        }
        Ok(())
    }
}

/// The elements of a raw list, a raw single object standing for a list of one, or none.
fn raw_elements(raw: Option<&RawValue>) -> Result<Vec<&RawValue>, serde_json::Error> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let text = raw.get().trim_start();
    if text.starts_with('[') {
        serde_json::from_str(raw.get())
    } else if text.starts_with('{') {
        Ok(vec![serde_json::from_str(raw.get())?])
    } else {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::eureka::api::decode_applications;

    const DELTA: &str = r#"{"applications":{"versions__delta":"3","apps__hashcode":"UP_3_",
        "application":[
          {"name":"ORDERS","instance":[
            {"instanceId":"o-1","app":"ORDERS","ipAddr":"192.0.2.1","status":"UP","port":{"$":8080,"@enabled":"true"},"actionType":"ADDED"},
            {"instanceId":"o-2","app":"ORDERS","ipAddr":"192.0.2.2","status":"UP","port":{"$":8080,"@enabled":"true"},"actionType":"ADDED"}]},
          {"name":"BILLING","instance":
            {"instanceId":"b-1","app":"BILLING","ipAddr":"192.0.2.3","status":"UP","port":{"$":9090,"@enabled":"true"},"actionType":"MODIFIED"}}]}}"#;

    #[test]
    fn a_delta_decodes_like_a_full_answer_the_first_time() {
        let plain = decode_applications(DELTA.as_bytes()).expect("decodes");
        let first = decode_delta(DELTA.as_bytes(), &DeltaMemo::default()).expect("decodes");
        assert_eq!(first.applications, plain);
        assert_eq!(first.skipped, 0);
        assert_eq!(first.memo.len(), 3);
    }

    #[test]
    fn entries_the_last_delta_carried_are_skipped() {
        let first = decode_delta(DELTA.as_bytes(), &DeltaMemo::default()).expect("decodes");
        let again = decode_delta(DELTA.as_bytes(), &first.memo).expect("decodes");
        assert_eq!(again.skipped, 3);
        assert!(again.applications.applications.is_empty());
        assert_eq!(again.applications.apps_hashcode.as_deref(), Some("UP_3_"));
        // One entry changes (o-2 goes DOWN): only it is decoded.
        let changed = DELTA.replacen(
            r#""ipAddr":"192.0.2.2","status":"UP""#,
            r#""ipAddr":"192.0.2.2","status":"DOWN""#,
            1,
        );
        let next = decode_delta(changed.as_bytes(), &again.memo).expect("decodes");
        assert_eq!(next.skipped, 2);
        assert_eq!(next.applications.applications.len(), 1);
        let only = &next.applications.applications[0];
        assert_eq!((only.name.as_str(), only.instances.len()), ("ORDERS", 1));
        assert_eq!(only.instances[0].instance_id.as_deref(), Some("o-2"));
        // An entry of the same text under another application is not the same entry.
        let moved = DELTA.replace(r#""name":"BILLING""#, r#""name":"PAYMENTS""#);
        let other = decode_delta(moved.as_bytes(), &first.memo).expect("decodes");
        assert_eq!(other.skipped, 2);
    }

    #[test]
    fn instances_before_the_name_and_single_objects_decode_alike() {
        let reordered = r#"{"applications":{"application":{"instance":
            {"instanceId":"b-1","app":"BILLING","ipAddr":"192.0.2.3","status":"UP","actionType":"MODIFIED"},
            "name":"BILLING"},"apps__hashcode":"UP_1_"}}"#;
        let plain = decode_applications(reordered.as_bytes()).expect("decodes");
        let first = decode_delta(reordered.as_bytes(), &DeltaMemo::default()).expect("decodes");
        assert_eq!(first.applications, plain);
        assert_eq!(first.memo.len(), 1);
        // The same entry in the usual order hashes alike: its text and application.
        let usual = r#"{"applications":{"apps__hashcode":"UP_1_","application":[{"name":"BILLING","instance":[
            {"instanceId":"b-1","app":"BILLING","ipAddr":"192.0.2.3","status":"UP","actionType":"MODIFIED"}]}]}}"#;
        let again = decode_delta(usual.as_bytes(), &first.memo).expect("decodes");
        assert_eq!(again.skipped, 1);
        assert!(
            decode_delta(b"{}", &DeltaMemo::default()).is_err(),
            "no applications"
        );
    }

    /// A reader that hands out one byte per call, as a slow body would.
    struct Trickle<'a>(&'a [u8]);

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let Some((first, rest)) = self.0.split_first() else {
                return Ok(0);
            };
            match buf.first_mut() {
                Some(slot) => {
                    *slot = *first;
                    self.0 = rest;
                    Ok(1)
                }
                None => Ok(0),
            }
        }
    }

    #[test]
    fn a_body_read_as_it_arrives_decodes_like_one_in_memory() {
        let whole = decode_applications(DELTA.as_bytes()).expect("decodes");
        let streamed =
            read_delta(Trickle(DELTA.as_bytes()), &DeltaMemo::default()).expect("decodes");
        assert_eq!(streamed.applications, whole);
        assert_eq!(streamed.memo.len(), 3);
        let trailing = br#"{"applications":{}} trailing"#;
        assert!(read_delta(Trickle(trailing), &DeltaMemo::default()).is_err());
    }

    #[test]
    fn empty_and_null_deltas() {
        for body in [
            r#"{"applications":{"apps__hashcode":"","application":[]}}"#,
            r#"{"applications":{"apps__hashcode":"","application":null}}"#,
            r#"{"applications":{"apps__hashcode":""}}"#,
        ] {
            let d = decode_delta(body.as_bytes(), &DeltaMemo::default()).expect(body);
            assert!(d.applications.applications.is_empty(), "{body}");
            assert!(d.memo.is_empty());
        }
        assert!(decode_delta(b"<xml/>", &DeltaMemo::default()).is_err());
    }
}

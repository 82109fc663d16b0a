//! YAML helpers shared by the loaders: turning `serde_yaml_ng` errors into [`Problem`]s,
//! finding the line of a field path, and deserializing one sub-tree of a document.
//!
//! `serde_yaml_ng` keeps no positions in its `Value`, but it does attach the position of the
//! current node to any error raised while deserializing. So to find where a field is, we walk
//! the document along the path and raise a marker error at the target node; the error then
//! carries the node's line. Documents of a multi-document stream are parsed by one parser, so
//! these lines count from the start of the whole text, not of the document (checked by the
//! `third_document_errors_report_lines_of_the_whole_file` test in `pool_file`).

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess};
use serde::{Deserialize, Deserializer};

use crate::error::{FieldPath, Problem, Segment};

const MARKER: &str = "infergate-api: located";

/// Checks that every document of `text` is well-formed YAML.
///
/// Run this first: `serde_yaml_ng` deserializes the events parsed before a syntax error and
/// reports the syntax error only if that succeeds, so a broken document could otherwise show
/// up as a confusing type or missing-field error.
pub(crate) fn check_syntax(text: &str) -> Result<(), serde_yaml_ng::Error> {
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        Option::<IgnoredAny>::deserialize(document)?;
    }
    Ok(())
}

/// Deserializes the node at `path` of document `doc` (0-based, empty documents counted) as `T`.
/// `Ok(None)` means the path does not exist in the document.
pub(crate) fn deserialize_at<T: DeserializeOwned>(
    text: &str,
    doc: usize,
    path: &FieldPath,
) -> Result<Option<T>, serde_yaml_ng::Error> {
    let Some(document) = serde_yaml_ng::Deserializer::from_str(text).nth(doc) else {
        return Ok(None);
    };
    At::<T> {
        path: path.segments(),
        mark_key: false,
        target: PhantomData,
    }
    .deserialize(document)
}

/// The 1-based line (in the whole text) of the field at `path` in document `doc`, or of its
/// nearest existing ancestor when the field itself is absent (for example a defaulted one).
pub(crate) fn line_of(text: &str, doc: usize, path: &FieldPath) -> Option<usize> {
    let segments = path.segments();
    (0..=segments.len())
        .rev()
        .find_map(|len| locate(text, doc, &segments[..len]))
}

fn locate(text: &str, doc: usize, segments: &[Segment]) -> Option<usize> {
    let document = serde_yaml_ng::Deserializer::from_str(text).nth(doc)?;
    let seed = At::<Found> {
        path: segments,
        mark_key: true,
        target: PhantomData,
    };
    match seed.deserialize(document) {
        Err(err) if err.to_string().contains(MARKER) => err.location().map(|l| l.line()),
        _ => None,
    }
}

/// Turns a `serde_yaml_ng` error into a [`Problem`], splitting off its path and position.
pub(crate) fn problem_from_yaml(
    err: &serde_yaml_ng::Error,
    file: &str,
    object: Option<String>,
) -> Problem {
    let location = err.location();
    let mut message = err.to_string();
    if let Some(loc) = &location {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(at) = message.find(&suffix) {
            message.replace_range(at..at + suffix.len(), "");
        }
    }
    // serde_yaml_ng writes `path: message`; a path never contains a space, a message's
    // first words do ("invalid type: ...").
    let mut path = FieldPath::root();
    if let Some((head, rest)) = message.split_once(": ") {
        if !head.is_empty() && !head.contains(' ') {
            path = FieldPath::parse(head);
            message = rest.to_string();
        }
    }
    let (path, message) = name_the_field(path, message);
    Problem {
        file: file.to_string(),
        line: location.map(|l| l.line()),
        object,
        path,
        message,
    }
}

/// serde reports unknown and missing fields at their parent; point at the field itself.
fn name_the_field(path: FieldPath, message: String) -> (FieldPath, String) {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, tail)) = rest.split_once('`') {
            let tail = tail.trim_start_matches(',').trim();
            let hint = if tail == "there are no fields" {
                "this object takes no fields".to_string()
            } else if tail.is_empty() {
                String::new()
            } else {
                tail.replace('`', "")
            };
            let message = if hint.is_empty() {
                "unknown field".to_string()
            } else {
                format!("unknown field ({hint})")
            };
            return (path.key(field), message);
        }
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        if let Some((field, _)) = rest.split_once('`') {
            return (path.key(field), "required field is missing".to_string());
        }
    }
    (path, message)
}

/// Walks to `path`, then deserializes `T` there.
struct At<'p, T> {
    path: &'p [Segment],
    /// When the last step is a key, raise the marker on the key itself (its line), not on
    /// its value (which may start on a later line).
    mark_key: bool,
    target: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for At<'_, T> {
    type Value = Option<T>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<T>, D::Error> {
        match self.path.split_first() {
            None => T::deserialize(deserializer).map(Some),
            Some((step, rest)) => deserializer.deserialize_any(Walk::<T> {
                step,
                rest,
                mark_key: self.mark_key,
                target: PhantomData,
            }),
        }
    }
}

struct Walk<'p, T> {
    step: &'p Segment,
    rest: &'p [Segment],
    mark_key: bool,
    target: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> de::Visitor<'de> for Walk<'_, T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<T>, A::Error> {
        let mut found = None;
        if let Segment::Key(wanted) = self.step {
            let mark_here = self.mark_key && self.rest.is_empty();
            while let Some(matched) = map.next_key_seed(KeyIs { wanted, mark_here })? {
                if matched {
                    found = map.next_value_seed(At::<T> {
                        path: self.rest,
                        mark_key: self.mark_key,
                        target: PhantomData,
                    })?;
                    break;
                }
                map.next_value::<IgnoredAny>()?;
            }
        }
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(found)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<T>, A::Error> {
        let mut found = None;
        if let Segment::Index(wanted) = self.step {
            for _ in 0..*wanted {
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    return Ok(None);
                }
            }
            found = seq
                .next_element_seed(At::<T> {
                    path: self.rest,
                    mark_key: self.mark_key,
                    target: PhantomData,
                })?
                .flatten();
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(found)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_none<E>(self) -> Result<Option<T>, E> {
        Ok(None)
    }
}

/// Deserializes a mapping key and tells whether it is the wanted one.
struct KeyIs<'a> {
    wanted: &'a str,
    mark_here: bool,
}

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> de::Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        if key != self.wanted {
            return Ok(false);
        }
        if self.mark_here {
            return Err(E::custom(MARKER));
        }
        Ok(true)
    }
    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }
}

/// A target that fails on purpose, so that the error carries the position of its node.
struct Found;

impl<'de> Deserialize<'de> for Found {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Found, D::Error> {
        // The error must come from inside a deserializer call to get that node's mark.
        deserializer.deserialize_any(FoundVisitor)
    }
}

struct FoundVisitor;

impl<'de> de::Visitor<'de> for FoundVisitor {
    type Value = Found;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Found, A::Error> {
        Err(de::Error::custom(MARKER))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Found, A::Error> {
        Err(de::Error::custom(MARKER))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Found, E> {
        Err(E::custom(MARKER))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Found, E> {
        Err(E::custom(MARKER))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Found, E> {
        Err(E::custom(MARKER))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Found, E> {
        Err(E::custom(MARKER))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Found, E> {
        Err(E::custom(MARKER))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Found, E> {
        Err(E::custom(MARKER))
    }
    fn visit_none<E: de::Error>(self) -> Result<Found, E> {
        Err(E::custom(MARKER))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
a: 1
---
spec:
  rules:
  - targets:
    - modelRewrite: x
      weight: 0
";

    #[test]
    fn locates_a_key_in_a_later_document_by_its_line_in_the_whole_text() {
        let path = FieldPath::parse("spec.rules[0].targets[0].weight");
        assert_eq!(line_of(TEXT, 1, &path), Some(7));
        assert_eq!(line_of(TEXT, 1, &FieldPath::parse("spec.rules")), Some(4));
    }

    #[test]
    fn missing_field_falls_back_to_its_nearest_ancestor() {
        let path = FieldPath::parse("spec.rules[0].matches");
        assert_eq!(line_of(TEXT, 1, &path), Some(5));
    }

    #[test]
    fn deserializes_one_subtree() {
        let w: Option<i64> = deserialize_at(
            TEXT,
            1,
            &FieldPath::parse("spec.rules[0].targets[0].weight"),
        )
        .unwrap();
        assert_eq!(w, Some(0));
        let absent: Option<i64> = deserialize_at(TEXT, 1, &FieldPath::parse("spec.nope")).unwrap();
        assert_eq!(absent, None);
    }

    #[test]
    fn unknown_field_error_points_at_the_field() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Inner {
            a: u8,
        }
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Outer {
            inner: Inner,
        }
        let err = serde_yaml_ng::from_str::<Outer>("inner:\n  a: 1\n  b: 2\n").unwrap_err();
        let problem = problem_from_yaml(&err, "f.yaml", None);
        assert_eq!(problem.line, Some(3));
        assert_eq!(problem.path.to_string(), "inner.b");
        assert_eq!(problem.message, "unknown field (expected a)");
    }
}

//! YAML reading and writing of MarsDB: parsing with locations, locating a
//! field path in a document, and a writer whose output YAML 1.1 readers
//! (PyYAML, the reference) read back unchanged.

use std::fmt;
use std::path::Path;
use std::sync::OnceLock;

use regex::Regex;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::error::ValidationError;
use super::types::{now_micros, Database, MacAddr};
use super::wire::{yaml_error, WireDb};
use super::Validator;

/// What to apply while parsing, besides the schema.
#[derive(Default)]
pub(crate) struct ParseOptions<'a> {
    /// The file the text comes from (named in errors).
    pub file: Option<&'a Path>,
    /// `EXECUTOR_VPDU_ENDPOINT`: force the VPDU entry.
    pub vpdu_endpoint: Option<&'a str>,
    /// Extra validation.
    pub validator: Option<&'a Validator>,
}

/// Parses, converts and validates a document.
pub(crate) fn parse(
    text: &str,
    previous: Option<&Database>,
    opts: &ParseOptions<'_>,
) -> Result<Database, ValidationError> {
    let with_file = |e: ValidationError| match opts.file {
        Some(f) => e.with_file(f),
        None => e,
    };
    let wire: WireDb = serde_yaml::from_str(text).map_err(|e| {
        // The schema error may come before a syntax error further down;
        // report the syntax error first, it is the one to fix.
        let first = match serde_yaml::from_str::<IgnoredAny>(text) {
            Err(syntax) => syntax,
            Ok(_) => e,
        };
        with_file(yaml_error(&first))
    })?;
    let mut db = wire.into_domain(previous, now_micros());
    if let Some(ep) = opts.vpdu_endpoint {
        db.apply_vpdu_endpoint(ep);
    }
    let checked = db
        .validate()
        .and_then(|()| opts.validator.map_or(Ok(()), |v| v(&db)));
    if let Err(mut e) = checked {
        if e.line.is_none() {
            if let Some((line, col)) = locate(text, &e.path) {
                e = e.at(line, col);
            }
        }
        return Err(with_file(e));
    }
    Ok(db)
}

const MARKER: &str = "\u{1}marsdb-locate\u{1}";

/// The 1-based line and column of the node at the dotted `path` in the YAML
/// `text` (or of its deepest existing ancestor), if the text parses that far.
pub(crate) fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
    if path.is_empty() {
        return None;
    }
    let de = serde_yaml::Deserializer::from_str(text);
    match (Locate { rest: path }).deserialize(de) {
        Err(e) if e.to_string().contains(MARKER) => e.location().map(|l| (l.line(), l.column())),
        _ => None,
    }
}

struct Locate<'p> {
    /// The remaining dotted path; empty when this node is the target.
    rest: &'p str,
}

fn found<E: de::Error>() -> E {
    E::custom(MARKER)
}

impl<'de> DeserializeSeed<'de> for Locate<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

fn key_matches(key: &str, seg_path: &str) -> Option<usize> {
    // Returns the length of `seg_path` consumed when `key` matches its start.
    let matches_seg = |seg: &str| {
        key == seg
            || matches!((key.parse::<MacAddr>(), seg.parse::<MacAddr>()), (Ok(a), Ok(b)) if a == b)
    };
    if matches_seg(seg_path) {
        return Some(seg_path.len());
    }
    let mut idx = 0;
    while let Some(off) = seg_path[idx..].find('.') {
        let end = idx + off;
        if matches_seg(&seg_path[..end]) {
            return Some(end + 1);
        }
        idx = end + 1;
    }
    None
}

impl<'de> Visitor<'de> for Locate<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(found())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(found())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(found())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(found())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(found())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(found())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(found())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.rest.is_empty() {
            return Err(found());
        }
        let (seg, rest) = self.rest.split_once('.').unwrap_or((self.rest, ""));
        let Ok(index) = seg.parse::<usize>() else {
            return Err(found());
        };
        let mut i = 0;
        loop {
            if i == index {
                return match seq.next_element_seed(Locate { rest })? {
                    Some(()) | None => Err(found()),
                };
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(found());
            }
            i += 1;
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.rest.is_empty() {
            return Err(found());
        }
        while let Some(key) = map.next_key::<KeyRepr>()? {
            if let Some(consumed) = key.0.as_deref().and_then(|k| key_matches(k, self.rest)) {
                map.next_value_seed(Locate {
                    rest: &self.rest[consumed..],
                })?;
                return Err(found());
            }
            map.next_value::<IgnoredAny>()?;
        }
        Err(found())
    }
}

/// A mapping key as a string, when it is a scalar.
struct KeyRepr(Option<String>);

impl<'de> de::Deserialize<'de> for KeyRepr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyRepr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyRepr, E> {
                Ok(KeyRepr(Some(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyRepr, E> {
                Ok(KeyRepr(Some(v.to_string())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyRepr, E> {
                Ok(KeyRepr(Some(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<KeyRepr, E> {
                Ok(KeyRepr(Some(v.to_string())))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyRepr, E> {
                Ok(KeyRepr(Some(v.to_string())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyRepr, E> {
                Ok(KeyRepr(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<KeyRepr, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(KeyRepr(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<KeyRepr, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(KeyRepr(None))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------- writer

/// Writes the database as YAML in schema order.
pub(crate) fn emit(db: &Database) -> String {
    let value = match serde_json::to_value(WireDb::from_domain(db)) {
        Ok(v) => v,
        // Only possible with a non-string map key, which the wire types
        // cannot hold.
        Err(e) => unreachable!("MarsDB wire types always serialise: {e}"),
    };
    let mut out = String::new();
    if let Value::Object(map) = &value {
        emit_map(&mut out, map, 0, 0);
    }
    out
}

/// `depth` 0 is the document; 2 is a DUT entry (where `first_seen` lives).
fn emit_map(out: &mut String, map: &serde_json::Map<String, Value>, indent: usize, depth: usize) {
    for (k, v) in map {
        push_indent(out, indent);
        out.push_str(&quote(k));
        out.push(':');
        match v {
            Value::Object(m) if !m.is_empty() => {
                out.push('\n');
                emit_map(out, m, indent + 2, depth + 1);
            }
            Value::Array(a) if !a.is_empty() => {
                out.push('\n');
                emit_seq(out, a, indent, depth + 1);
            }
            Value::String(s) if depth == 2 && k == "first_seen" => {
                out.push(' ');
                out.push_str(s);
                out.push('\n');
            }
            _ => {
                out.push(' ');
                out.push_str(&scalar(v));
                out.push('\n');
            }
        }
    }
}

fn emit_seq(out: &mut String, seq: &[Value], indent: usize, depth: usize) {
    for v in seq {
        let nested = match v {
            Value::Object(m) if !m.is_empty() => {
                let mut s = String::new();
                emit_map(&mut s, m, indent + 2, depth + 1);
                Some(s)
            }
            Value::Array(a) if !a.is_empty() => {
                let mut s = String::new();
                emit_seq(&mut s, a, indent + 2, depth + 1);
                Some(s)
            }
            _ => None,
        };
        push_indent(out, indent);
        out.push_str("- ");
        match nested {
            // The nested block starts with `indent + 2` spaces: the "- "
            // takes their place on its first line.
            Some(s) => out.push_str(&s[indent + 2..]),
            None => {
                out.push_str(&scalar(v));
                out.push('\n');
            }
        }
    }
}

fn push_indent(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => number(n),
        Value::String(s) => quote(s),
        Value::Array(_) => "[]".to_string(),
        Value::Object(_) => "{}".to_string(),
    }
}

/// Numbers: floats always have a `.` and a signed exponent, as YAML 1.1
/// requires to read them as floats.
fn number(n: &serde_json::Number) -> String {
    let s = n.to_string();
    if !n.is_f64() {
        return s;
    }
    let (mantissa, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s.as_str(), None),
    };
    let mut out = mantissa.to_string();
    if !out.contains('.') {
        out.push_str(".0");
    }
    if let Some(exp) = exp {
        out.push('e');
        if !exp.starts_with(['-', '+']) {
            out.push('+');
        }
        out.push_str(exp);
    }
    out
}

/// YAML 1.1 implicit (non-string) scalars, as PyYAML resolves them.
fn yaml11_implicit() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(concat!(
            r"^(?:",
            r"(?i:y|n|yes|no|true|false|on|off)",
            r"|~|null|Null|NULL",
            r"|[-+]?0b[0-1_]+|[-+]?0o[0-7_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?[0-9][0-9_]*",
            r"|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?",
            r"|[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?",
            r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+",
            r"|[-+]?\.(?i:inf)|\.(?i:nan)",
            r"|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:(?:[Tt]|[ \t]+).*)?",
            r"|<<|=",
            r")$"
        ))
        .expect("static regex")
    })
}

/// Whether `s` can be written as a plain scalar and read back as the same
/// string by YAML 1.1 and 1.2 readers. Conservative: anything unusual is
/// quoted (quoting is always correct, just noisier).
fn plain_is_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    if first.is_whitespace()
        || s.ends_with(char::is_whitespace)
        || s.ends_with(':')
        || "-?:,[]{}#&*!|>'\"%@`".contains(first)
        || s.contains(": ")
        || s.contains(" #")
        || s.chars()
            .any(|c| special_char(c) || "#,[]{}'\"`\\".contains(c))
    {
        return false;
    }
    // Implicit scalars all start with one of these.
    let may_be_implicit = first.is_ascii_digit() || "+-.~<=yYnNtTfFoO".contains(first);
    !(may_be_implicit && yaml11_implicit().is_match(s))
}

/// Characters that only a double-quoted scalar can carry unchanged.
fn special_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{feff}' | '\u{2028}' | '\u{2029}')
}

/// A string scalar as plain, single-quoted or double-quoted YAML text.
fn quote(s: &str) -> String {
    if plain_is_safe(s) {
        return s.to_string();
    }
    if !s.chars().any(special_char) {
        format!("'{}'", s.replace('\'', "''"))
    } else {
        // JSON strings are valid YAML double-quoted scalars; YAML also
        // breaks lines at U+2028/U+2029, which JSON leaves as they are.
        serde_json::to_string(s)
            .unwrap_or_else(|_| "''".to_string())
            .replace('\u{2028}', "\\u2028")
            .replace('\u{2029}', "\\u2029")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_yaml11_readers_reading_strings() {
        for s in [
            "52:54:00:11:22:33",
            "1",
            "on",
            "Yes",
            "null",
            "~",
            "1e3",
            "0x1f",
            "2021-12-22",
            "1.5",
            "",
            " lead",
            "a: b",
            "#x",
            "- x",
            "-",
            "a #b",
            "x,y",
            "[a]",
            "{a}",
            "*ref",
            "&anchor",
            "!tag",
            "|",
            ">",
            "%x",
            "@x",
            "`x",
            "0o17",
            ".5",
            "+1",
            "trailing ",
            "colon:",
            "back\\slash",
            "quote\"d",
        ] {
            let q = quote(s);
            assert!(q.starts_with('\'') || q.starts_with('"'), "{s:?} -> {q}");
            let back: String = serde_yaml::from_str(&q).unwrap();
            assert_eq!(back, s);
        }
        for s in [
            "de:ad:be:ef:ca:fe",
            "gfx9",
            "amdgpu:pciid:0x1002:0x1636",
            "ttyUSB0",
            "10.0.0.2",
        ] {
            assert_eq!(quote(s), s);
        }
        for multi in ["two\nlines", "tab\there", "ls\u{2028}x", "bom\u{feff}"] {
            let q = quote(multi);
            assert!(q.starts_with('"'), "{q}");
            let back: String = serde_yaml::from_str(&q).unwrap();
            assert_eq!(back, multi);
        }
    }

    #[test]
    fn floats_are_yaml11_floats() {
        let n = |f: f64| number(&serde_json::Number::from_f64(f).unwrap());
        assert_eq!(n(30.0), "30.0");
        assert_eq!(n(0.1), "0.1");
        let big = n(1e20);
        assert!(
            yaml11_implicit().is_match(&big) && big.contains('.'),
            "{big}"
        );
        let back: f64 = serde_yaml::from_str(&big).unwrap();
        assert_eq!(back, 1e20);
    }

    #[test]
    fn locate_finds_nested_nodes() {
        let text = "pdus:\n  APC:\n    driver: x\nduts:\n  DE:AD:BE:EF:CA:FE:\n    pdu: APC2\n    tags:\n    - a\n    - b\n";
        assert_eq!(locate(text, "duts.de:ad:be:ef:ca:fe.pdu"), Some((6, 10)));
        assert_eq!(locate(text, "pdus.APC.driver"), Some((3, 13)));
        assert_eq!(locate(text, "duts.de:ad:be:ef:ca:fe.tags.1"), Some((9, 7)));
        // A missing leaf points at its parent.
        let parent = locate(text, "duts.de:ad:be:ef:ca:fe.comment").unwrap();
        assert!(parent.0 >= 5 && parent.0 <= 9, "{parent:?}");
        assert_eq!(
            locate("{unclosed: [", "duts.x"),
            None,
            "a syntax error: no location"
        );
    }
}

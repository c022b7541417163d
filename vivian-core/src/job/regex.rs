//! Console pattern regular expressions with Python `re` semantics.
//!
//! Job files are written for the reference executor, which compiles each
//! console pattern as a Python **bytes** regular expression and applies it
//! with `search` to one console line (the bytes up to and including `\n`).
//! The Rust `regex` crate differs from Python on a few points that matter for
//! such patterns, so a pattern is translated before compilation:
//!
//! * Python's `$` (without `re.MULTILINE`) also matches just before a final
//!   `\n`; console lines end in `\n`, so `^JOB_RESULT=0\r$` must match
//!   `JOB_RESULT=0\r\n`. It is translated to `(?m:$)`, which is equivalent on
//!   a haystack whose only `\n` is the last byte (always true for a line).
//! * `\Z` (end of string) becomes `\z`.
//! * A `{` that does not start a valid repetition is a literal in Python and
//!   is escaped; `{,n}` becomes `{0,n}`.
//! * Bytes patterns are ASCII-only for classes (`\d`, `\w`, `\s`) and `.`
//!   matches any byte but `\n`: the regex is built with Unicode disabled.
//!
//! Python features the `regex` crate lacks (look-around, back-references)
//! are refused with the crate's error message.

use regex::bytes::{Regex, RegexBuilder};

/// Translates a Python `re` pattern into the `regex` crate's syntax (see
/// the module documentation for the rules).
pub fn translate_python_regex(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut i = 0;
    let mut in_class = false;
    // Position (in `chars`) of the first character of the current class body,
    // where `]` is a literal.
    let mut class_start = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' {
            match chars.get(i + 1) {
                Some('Z') if !in_class => out.push_str("\\z"),
                Some(&n) => {
                    out.push('\\');
                    out.push(n);
                }
                None => out.push('\\'),
            }
            i += 2;
            continue;
        }
        if in_class {
            if c == ']' && i != class_start {
                in_class = false;
                out.push(']');
            } else if c == '[' {
                // A literal `[` inside a class: the regex crate would read it
                // as a nested class.
                out.push_str("\\[");
            } else if c == '&' || c == '~' || c == '-' && chars.get(i + 1) == Some(&'-') {
                // Set operators of the regex crate (`&&`, `~~`, `--`) are
                // literals in Python.
                out.push('\\');
                out.push(c);
            } else {
                out.push(c);
            }
            i += 1;
            continue;
        }
        match c {
            '[' => {
                in_class = true;
                out.push('[');
                i += 1;
                if chars.get(i) == Some(&'^') {
                    out.push('^');
                    i += 1;
                }
                class_start = i;
            }
            '$' => {
                out.push_str("(?m:$)");
                i += 1;
            }
            '{' => {
                // Valid repetitions: {n}, {n,}, {n,m}, {,m}.
                let rest: String = chars[i + 1..].iter().collect();
                match parse_repetition(&rest) {
                    Some((text, consumed)) => {
                        out.push('{');
                        out.push_str(&text);
                        out.push('}');
                        i += 1 + consumed;
                    }
                    None => {
                        out.push_str("\\{");
                        i += 1;
                    }
                }
            }
            '}' => {
                out.push_str("\\}");
                i += 1;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Parses the body of a repetition after `{`; returns the body to emit and
/// the number of characters consumed (including the closing `}`).
fn parse_repetition(rest: &str) -> Option<(String, usize)> {
    let end = rest.find('}')?;
    let body = &rest[..end];
    let (min, max) = match body.split_once(',') {
        Some((a, b)) => (a, Some(b)),
        None => (body, None),
    };
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if !digits(min) || !max.is_none_or(digits) {
        return None;
    }
    let text = match max {
        None if min.is_empty() => return None,
        None => min.to_string(),
        Some(m) if min.is_empty() && m.is_empty() => return None,
        Some(m) if min.is_empty() => format!("0,{m}"),
        Some(m) => format!("{min},{m}"),
    };
    Some((text, end + 1))
}

/// Compiles a console pattern with Python bytes-regex semantics.
pub fn compile_python_regex(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(&translate_python_regex(pattern))
        .unicode(false)
        .size_limit(1 << 20)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, line: &[u8]) -> bool {
        compile_python_regex(pattern).unwrap().is_match(line)
    }

    #[test]
    fn dollar_matches_before_the_final_newline() {
        assert!(m("^JOB_RESULT=0\r$", b"JOB_RESULT=0\r\n"));
        assert!(m("^JOB_RESULT=0\r$", b"JOB_RESULT=0\r"));
        assert!(!m("^JOB_RESULT=0$", b"JOB_RESULT=0\r\n"));
        assert!(m(
            r"^\[[\d \.]{12}\] reboot: Power Down$",
            b"[   12.345678] reboot: Power Down\n"
        ));
        assert!(!m("^$", b"abc\n"));
        assert!(m("c\\Z", b"abc"));
        assert!(!m("c\\Z", b"abc\n"));
    }

    #[test]
    fn python_literals_are_kept_literal() {
        assert!(m("a{", b"a{"));
        assert!(m("{foo}", b"x{foo}y"));
        assert!(m("^a{,2}b", b"aab"));
        assert!(m("[[]x", b"[x"));
        assert!(m("[]a]", b"]"));
        assert!(m("[a&&b]", b"&"));
        assert!(m("[$]", b"$"));
        assert!(m("\\$", b"$"));
    }

    #[test]
    fn bytes_semantics() {
        assert!(!m("\\d", "٣".as_bytes()));
        assert!(m("^.$", &[0xff, b'\n']));
        assert!(m("é", "café\n".as_bytes()));
    }

    #[test]
    fn unsupported_python_features_are_errors() {
        assert!(compile_python_regex("(?=a)").is_err());
        assert!(compile_python_regex("(a)\\1").is_err());
        assert!(compile_python_regex("(").is_err());
    }
}

//! Quoted values of rule options: `content` byte strings and `msg` texts.
//!
//! A content string mixes text and hex (`"GET |20|/"`): bytes between pipes
//! are hex pairs, optionally separated by spaces; outside them a backslash
//! escapes `"`, `;`, `\`, `:` and `|`. Everything else is taken literally,
//! byte for byte, so a rule file in UTF-8 matches UTF-8 payloads.

/// Why a value did not decode; `at` is the byte offset in the value text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ValueError {
    pub at: usize,
    pub reason: String,
}

impl ValueError {
    fn new(at: usize, reason: impl Into<String>) -> Self {
        ValueError {
            at,
            reason: reason.into(),
        }
    }
}

/// Strips one pair of enclosing double quotes, reporting where the text starts.
pub(crate) fn unquote(value: &str) -> Result<(&str, usize), ValueError> {
    let v = value.trim();
    let lead = value.len() - value.trim_start().len();
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') && !ends_escaped(&v[..v.len() - 1]) {
        Ok((&v[1..v.len() - 1], lead + 1))
    } else {
        Err(ValueError::new(lead, "expected a value in double quotes"))
    }
}

/// Whether `s` ends with an odd number of backslashes (so its last quote is escaped).
fn ends_escaped(s: &str) -> bool {
    s.bytes().rev().take_while(|&b| b == b'\\').count() % 2 == 1
}

/// Decodes the inside of a content string to bytes.
pub(crate) fn decode_content(text: &str) -> Result<Vec<u8>, ValueError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    let mut in_hex = false;
    let mut hex_start = 0;
    let mut nibble: Option<u8> = None;
    while i < bytes.len() {
        let b = bytes[i];
        if in_hex {
            match b {
                b'|' => {
                    if nibble.is_some() {
                        return Err(ValueError::new(i, "odd number of hex digits between pipes"));
                    }
                    if i == hex_start + 1 {
                        return Err(ValueError::new(hex_start, "empty hex block ||"));
                    }
                    in_hex = false;
                }
                b' ' | b'\t' => {
                    if nibble.is_some() {
                        return Err(ValueError::new(i, "space inside a hex byte"));
                    }
                }
                _ => {
                    let v = (b as char)
                        .to_digit(16)
                        .ok_or_else(|| ValueError::new(i, format!("{:?} is not a hex digit", b as char)))?
                        as u8;
                    match nibble.take() {
                        Some(hi) => out.push(hi << 4 | v),
                        None => nibble = Some(v),
                    }
                }
            }
            i += 1;
            continue;
        }
        match b {
            b'|' => {
                in_hex = true;
                hex_start = i;
            }
            b'\\' => {
                let next = *bytes
                    .get(i + 1)
                    .ok_or_else(|| ValueError::new(i, "backslash at the end of the string"))?;
                if !matches!(next, b'"' | b';' | b'\\' | b':' | b'|') {
                    return Err(ValueError::new(
                        i,
                        format!("\\{} is not an escape (only \\\" \\; \\\\ \\: \\| are)", next as char),
                    ));
                }
                out.push(next);
                i += 1;
            }
            b'"' => return Err(ValueError::new(i, "unescaped '\"' inside the string")),
            b';' => return Err(ValueError::new(i, "unescaped ';' inside the string")),
            _ => out.push(b),
        }
        i += 1;
    }
    if in_hex {
        return Err(ValueError::new(hex_start, "hex block is not closed with '|'"));
    }
    Ok(out)
}

/// Decodes a quoted text value such as `msg` (escapes as in content, no hex).
pub(crate) fn decode_text(value: &str) -> Result<String, ValueError> {
    let (inner, start) = match unquote(value) {
        Ok(v) => v,
        // Unquoted text is accepted as written.
        Err(_) => return Ok(value.trim().to_string()),
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.char_indices();
    while let Some((i, c)) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some((_, n)) => out.push(n),
                None => return Err(ValueError::new(start + i, "backslash at the end of the text")),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_strings_decode() {
        let cases: &[(&str, &[u8])] = &[
            ("abc", b"abc"),
            ("|41 42|C", b"ABC"),
            ("|4142|", b"AB"),
            ("a|0d 0a|b", b"a\r\nb"),
            (r#"\"q\""#, b"\"q\""),
            (r"a\;b", b"a;b"),
            (r"a\\b", b"a\\b"),
            (r"a\:b\|", b"a:b|"),
            ("uid=0|28|root|29|", b"uid=0(root)"),
        ];
        for (text, want) in cases {
            assert_eq!(decode_content(text).as_deref(), Ok(*want), "{text}");
        }
    }

    #[test]
    fn bad_content_strings_name_the_offset() {
        let cases: &[(&str, usize)] = &[
            ("|4|", 2),
            ("ab|41", 2),
            ("|zz|", 1),
            (r"a\x", 1),
            ("a;b", 1),
            ("a\"b", 1),
            ("||", 0),
            ("x\\", 1),
            ("|4 1|", 2),
        ];
        for (text, at) in cases {
            let err = decode_content(text).unwrap_err();
            assert_eq!(err.at, *at, "{text}: {}", err.reason);
        }
    }

    #[test]
    fn quotes() {
        assert_eq!(unquote(r#" "abc" "#).unwrap(), ("abc", 2));
        assert!(unquote(r#""abc\""#).is_err());
        assert!(unquote("abc").is_err());
        assert_eq!(decode_text(r#""a \"b\" c""#).unwrap(), r#"a "b" c"#);
    }
}

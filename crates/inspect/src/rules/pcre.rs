//! The `pcre` keyword: a Perl-style regular expression, translated to the
//! `regex` crate's byte-oriented, linear-time engine.
//!
//! `pcre:"/pattern/flags"` (quotes optional, `!` in front negates). Flags:
//! `i` caseless, `s` dot matches newline, `m` multi-line, `x` extended, `A`
//! anchored at the start of the searched data, `E` `$` only at the very end,
//! `G` ungreedy, `R` relative to the previous match; and the buffer flags `U`
//! (http.uri), `H` (http.header), `M` (http.method), `V` (http.user_agent),
//! `W` (http.host), `S` (http.stat_code).
//!
//! The translation keeps PCRE's meaning where the engines differ: the pattern
//! runs on bytes with Unicode off (`.` is any byte, `\xff` the byte 0xff,
//! classes are ASCII), a backslash before punctuation is a literal, `\<` and
//! `\>` are the characters (not word boundaries), and without `E` or `m` a `$`
//! also matches before a final newline. Constructs the engine cannot run in
//! linear time (backreferences, lookaround, atomic groups, possessive
//! quantifiers, recursion) are refused with the offset of the construct, not
//! silently approximated.

use regex::bytes::{Regex, RegexBuilder};

use super::Buffer;
use super::content::ValueError;

/// Compiled size limit for one pattern: bounds the memory a rule file can make us allocate.
const SIZE_LIMIT: usize = 1 << 20;

/// A compiled `pcre` keyword.
#[derive(Debug, Clone)]
pub struct Pcre {
    /// The pattern as written between the slashes.
    pub source: String,
    pub(crate) regex: Regex,
    /// Matches when the pattern does not.
    pub negated: bool,
    /// Searches from the end of the previous match (`R`).
    pub relative: bool,
    /// Matches only at the start of the searched data (`A`).
    pub anchored: bool,
    /// The buffer a buffer flag (`U`, `H`, …) chose.
    pub buffer: Option<Buffer>,
}

impl Pcre {
    /// Finds the pattern in `data` (already cut to where the search starts);
    /// returns the match's start and end.
    pub(crate) fn find(&self, data: &[u8]) -> Option<(usize, usize)> {
        self.regex.find(data).map(|m| (m.start(), m.end()))
    }
}

impl PartialEq for Pcre {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
            && self.regex.as_str() == other.regex.as_str()
            && self.negated == other.negated
            && self.relative == other.relative
            && self.anchored == other.anchored
            && self.buffer == other.buffer
    }
}

/// Parses the value of a `pcre` keyword.
pub(crate) fn parse(value: &str) -> Result<Pcre, ValueError> {
    let lead = value.len() - value.trim_start().len();
    let mut v = value.trim();
    let mut at = lead;
    let negated = v.starts_with('!');
    if negated {
        v = &v[1..];
        at += 1;
    }
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        v = &v[1..v.len() - 1];
        at += 1;
    }
    if !v.starts_with('/') {
        return Err(ValueError {
            at,
            reason: "a pcre must be written /pattern/flags".into(),
        });
    }
    let close = v.rfind('/').filter(|&i| i > 0).ok_or_else(|| ValueError {
        at,
        reason: "the pcre pattern has no closing '/'".into(),
    })?;
    let pattern = &v[1..close];
    let flags = &v[close + 1..];
    let mut inline = String::new();
    let (mut relative, mut anchored, mut dollar_endonly, mut multiline) = (false, false, false, false);
    let mut buffer = None;
    for (i, f) in flags.char_indices() {
        let pos = at + close + 1 + i;
        let set_buffer = |b: &mut Option<Buffer>, new: Buffer| -> Result<(), ValueError> {
            if b.is_some() {
                return Err(ValueError {
                    at: pos,
                    reason: "more than one buffer flag".into(),
                });
            }
            *b = Some(new);
            Ok(())
        };
        match f {
            'i' => inline.push('i'),
            's' => inline.push('s'),
            'm' => {
                inline.push('m');
                multiline = true;
            }
            'x' => inline.push('x'),
            'G' => inline.push('U'),
            'A' => anchored = true,
            'E' => dollar_endonly = true,
            'R' => relative = true,
            'U' => set_buffer(&mut buffer, Buffer::HttpUri)?,
            'H' => set_buffer(&mut buffer, Buffer::HttpHeader)?,
            'M' => set_buffer(&mut buffer, Buffer::HttpMethod)?,
            'V' => set_buffer(&mut buffer, Buffer::HttpUserAgent)?,
            'W' => set_buffer(&mut buffer, Buffer::HttpHost)?,
            'S' => set_buffer(&mut buffer, Buffer::HttpStatCode)?,
            other => {
                return Err(ValueError {
                    at: pos,
                    reason: format!("pcre flag {other:?} is not supported (supported: ismxAEGR and U H M V W S)"),
                });
            }
        }
    }
    let inline = format!("(?{inline}-u)");
    let body = translate(pattern, !(dollar_endonly || multiline)).map_err(|e| ValueError {
        at: at + 1 + e.at,
        reason: e.reason,
    })?;
    let full = if anchored {
        format!("{inline}\\A(?:{body})")
    } else {
        format!("{inline}{body}")
    };
    let regex = RegexBuilder::new(&full)
        .size_limit(SIZE_LIMIT)
        .dfa_size_limit(SIZE_LIMIT)
        .build()
        .map_err(|e| ValueError {
            at: at + 1,
            reason: format!("the pcre pattern does not compile: {}", first_line(&e.to_string())),
        })?;
    Ok(Pcre {
        source: pattern.to_string(),
        regex,
        negated,
        relative,
        anchored,
        buffer,
    })
}

fn first_line(s: &str) -> &str {
    s.lines().rfind(|l| l.starts_with("error:")).unwrap_or(s).trim()
}

/// Rewrites PCRE syntax into the regex crate's, refusing what it cannot run.
fn translate(pattern: &str, dollar_before_newline: bool) -> Result<String, ValueError> {
    let refuse = |at: usize, what: &str| ValueError {
        at,
        reason: format!("pcre {what} is not supported (the engine runs in linear time)"),
    };
    let chars: Vec<(usize, char)> = pattern.char_indices().collect();
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut in_class = false;
    let mut i = 0;
    while i < chars.len() {
        let (at, c) = chars[i];
        match c {
            '\\' => {
                let Some(&(_, n)) = chars.get(i + 1) else {
                    return Err(ValueError {
                        at,
                        reason: "pcre pattern ends with a backslash".into(),
                    });
                };
                match n {
                    '1'..='9' if !in_class => return Err(refuse(at, "backreference")),
                    'g' | 'k' if !in_class => return Err(refuse(at, "backreference")),
                    'Z' if !in_class => out.push_str(if dollar_before_newline { r"(?:\n?\z)" } else { r"\z" }),
                    'G' | 'K' | 'R' | 'X' | 'C' if !in_class => return Err(refuse(at, &format!("\\{n}"))),
                    '<' | '>' => out.push(n),
                    // PCRE's \h (horizontal space) and \H.
                    'h' => out.push_str(if in_class { r" \t" } else { r"[ \t]" }),
                    'H' if !in_class => out.push_str(r"[^ \t]"),
                    c2 if c2.is_ascii_punctuation() => {
                        out.push('\\');
                        out.push(c2);
                    }
                    c2 => {
                        out.push('\\');
                        out.push(c2);
                    }
                }
                i += 2;
                continue;
            }
            '[' if !in_class => {
                in_class = true;
                out.push('[');
                // A ']' right after '[' or '[^' is a literal.
                if let Some(&(_, '^')) = chars.get(i + 1) {
                    out.push('^');
                    i += 1;
                }
                if let Some(&(_, ']')) = chars.get(i + 1) {
                    out.push_str(r"\]");
                    i += 1;
                }
                i += 1;
                continue;
            }
            '[' if in_class => {
                // POSIX classes ([:alpha:]) pass through; a lone '[' is a literal.
                if let Some(&(_, ':')) = chars.get(i + 1) {
                    out.push('[');
                } else {
                    out.push_str(r"\[");
                }
            }
            ']' if in_class => {
                in_class = false;
                out.push(']');
            }
            '(' if !in_class => {
                if let Some(&(_, '?')) = chars.get(i + 1) {
                    let next = chars.get(i + 2).map(|&(_, c)| c);
                    match next {
                        Some('=') | Some('!') => return Err(refuse(at, "lookahead")),
                        Some('<') if matches!(chars.get(i + 3).map(|&(_, c)| c), Some('=') | Some('!')) => {
                            return Err(refuse(at, "lookbehind"));
                        }
                        Some('>') => return Err(refuse(at, "atomic group")),
                        Some('R') | Some('0'..='9') | Some('&') => return Err(refuse(at, "recursion")),
                        Some('(') => return Err(refuse(at, "conditional")),
                        Some('#') => {
                            // A comment group: skip to its ')'.
                            while i < chars.len() && chars[i].1 != ')' {
                                i += 1;
                            }
                            i += 1;
                            continue;
                        }
                        _ => {}
                    }
                }
                out.push('(');
            }
            '+' | '*' | '?' | '}' if !in_class => {
                out.push(c);
                // PCRE's possessive quantifiers (a++, a*+, a?+, a{2}+) have no linear-time equivalent.
                if matches!(chars.get(i + 1), Some(&(_, '+'))) {
                    return Err(refuse(at, "possessive quantifier"));
                }
            }
            '$' if !in_class && dollar_before_newline => out.push_str(r"(?:\n?\z)"),
            _ => out.push(c),
        }
        i += 1;
    }
    if in_class {
        return Err(ValueError {
            at: pattern.len(),
            reason: "pcre character class is not closed".into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pcre: &str, data: &[u8]) -> bool {
        let p = parse(pcre).unwrap_or_else(|e| panic!("{pcre}: {e:?}"));
        p.find(data).is_some() != p.negated
    }

    #[test]
    fn pcre_semantics() {
        let cases: &[(&str, &[u8], bool)] = &[
            ("/blah/", b"xxblahxx", true),
            ("/BLAH/i", b"xxblahxx", true),
            ("/BLAH/", b"xxblahxx", false),
            ("!/blah/", b"xxblahxx", false),
            (r#""/^\/search\?q=[0-9]{1,3}/U""#, b"/search?q=123", true),
            (r#""/\x0d\x0aHost\: \d+\.\d+/""#, b"GET /\r\nHost: 1.2.3.4\r\n", true),
            ("/^.{1,2}$/", b"ab", true),
            ("/^.{1,2}$/", b"ab\n", true),
            ("/^.{1,2}$/E", b"ab\n", false),
            ("/^.{1,2}$/", b"abc", false),
            ("/a.b/", b"a\nb", false),
            ("/a.b/s", b"a\nb", true),
            ("/^b$/m", b"a\nb\nc", true),
            ("/\\xff/", b"\x00\xff", true),
            ("/a b/x", b"ab", true),
            ("/a+?/G", b"aaa", true),
            ("/x\\<y/", b"x<y", true),
            ("/^\\x00/R", b"\x00", true),
            ("/[]a]/", b"]", true),
            ("/[^]a]/", b"]", false),
            ("/\\d\\Z/", b"x1\n", true),
            ("/a(?#comment)b/", b"ab", true),
        ];
        for (p, data, want) in cases {
            assert_eq!(matches(p, data), *want, "{p} on {:?}", String::from_utf8_lossy(data));
        }
    }

    #[test]
    fn flags_choose_buffers_and_modes() {
        let p = parse("/x/RAU").unwrap();
        assert!(p.relative && p.anchored);
        assert_eq!(p.buffer, Some(Buffer::HttpUri));
        assert_eq!(parse("/x/W").unwrap().buffer, Some(Buffer::HttpHost));
        assert!(parse("/x/UH").is_err());
    }

    #[test]
    fn unsupported_constructs_are_refused_with_their_offset() {
        let cases: &[(&str, usize, &str)] = &[
            (r"/(a)\1/", 4, "backreference"),
            ("/a(?=b)/", 2, "lookahead"),
            ("/a(?<!b)/", 2, "lookbehind"),
            ("/(?>a)/", 1, "atomic"),
            ("/a++/", 2, "possessive"),
            ("/x/Q", 3, "flag"),
            ("noslash", 0, "/pattern/"),
            ("/abc", 0, "closing"),
            ("/[abc/", 5, "not closed"),
        ];
        for (p, at, what) in cases {
            let e = parse(p).unwrap_err();
            assert!(e.reason.contains(what), "{p}: {}", e.reason);
            assert_eq!(e.at, *at, "{p}: {}", e.reason);
        }
    }
}

//! Which characters a policy may hold, and how input is shown back.
//!
//! Three rules, each for a reason:
//!
//! - A policy file holds only what YAML's grammar allows (`c-printable`:
//!   tab, line feed, carriage return, and printable characters), less a few
//!   that YAML allows but that make a file read differently from how it
//!   looks: a carriage return not followed by a line feed (the parser breaks
//!   the line, editors and terminals may not), NEL and the Unicode line and
//!   paragraph separators (line breaks in YAML 1.1, not in 1.2), the
//!   bidirectional overrides and isolates (they reorder what an editor shows:
//!   "Trojan Source", refused by rustc for the same reason), and a
//!   byte-order mark anywhere but at the start. [`check_file`] finds the
//!   first one. Before this check the parser took a NUL for the end of the
//!   file, and silently dropped every rule after it.
//! - A name (of a VM, zone, group, rule, tag, service, …) holds no control,
//!   format, invisible or unusual space character ([`name_problem`]): two
//!   names that look the same must be the same name. Escapes in quoted
//!   scalars (`"\u202E"`) can produce any character, so this is checked on
//!   the parsed value.
//! - Input quoted in a diagnostic is escaped (`\u{202e}`) and cut
//!   ([`quote`], [`escape_line`]), so a diagnostic can neither drive the
//!   operator's terminal nor be the size of its input.

use std::fmt::Write as _;

use crate::limits::MAX_QUOTED_CHARS;

/// A character a policy file may not hold, where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadChar {
    /// The character.
    pub ch: char,
    /// 1-based line.
    pub line: u32,
    /// 1-based column, in characters.
    pub column: u32,
    /// What it is, for the message.
    pub what: &'static str,
}

/// Why `c` (followed by `next`) may not be in a policy file, if it may not.
fn file_problem(c: char, next: Option<char>) -> Option<&'static str> {
    Some(match c {
        '\t' | '\n' => return None,
        '\r' if next == Some('\n') => return None,
        '\r' => "a carriage return not followed by a line feed",
        '\0' => "a NUL character",
        '\u{1}'..='\u{1f}' | '\u{7f}' => "a control character",
        '\u{85}' => "a next-line character (NEL, a line break in YAML 1.1 only)",
        '\u{80}'..='\u{9f}' => "a C1 control character",
        '\u{2028}' | '\u{2029}' => "a Unicode line or paragraph separator",
        '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
            "a bidirectional override or isolate (it reorders what an editor shows)"
        }
        '\u{feff}' => "a byte-order mark after the start of the file",
        '\u{fffe}' | '\u{ffff}' => "a noncharacter",
        _ => return None,
    })
}

/// The first character of `text` that a policy file may not hold.
///
/// `text` is a whole file without its leading byte-order mark, if it had
/// one (see [`strip_bom`]). Lines are counted at line feeds.
pub fn check_file(text: &str) -> Result<(), BadChar> {
    let bytes = text.as_bytes();
    let plain = |b: u8| (0x20..0x7f).contains(&b) || b == b'\n' || b == b'\t';
    let mut i = 0;
    while i < bytes.len() {
        // Printable ASCII is almost all of a policy: skip it 32 bytes at a
        // time (a test of the whole block, which the compiler vectorizes).
        if let Some(block) = bytes.get(i..i + 32)
            && block.iter().fold(true, |all, &b| all & plain(b))
        {
            i += 32;
            continue;
        }
        let b = bytes[i];
        if plain(b) {
            i += 1;
            continue;
        }
        let mut rest = text[i..].chars();
        let c = rest.next().expect("i is on a character boundary");
        if let Some(what) = file_problem(c, rest.next()) {
            let (line, column) = position(text, i);
            return Err(BadChar {
                ch: c,
                line,
                column,
                what,
            });
        }
        i += c.len_utf8();
    }
    Ok(())
}

/// The 1-based line and column (in characters) of byte `at` of `text`.
pub fn position(text: &str, at: usize) -> (u32, u32) {
    let before = &text.as_bytes()[..at];
    let line = memchr::memchr_iter(b'\n', before).count() + 1;
    let start = memchr::memrchr(b'\n', before).map_or(0, |n| n + 1);
    let column = text[start..at].chars().count() + 1;
    (
        u32::try_from(line).unwrap_or(u32::MAX),
        u32::try_from(column).unwrap_or(u32::MAX),
    )
}

/// `text` without a leading UTF-8 byte-order mark (which YAML allows, and
/// which is no column of the first line).
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Why `c` may not be in a name, if it may not.
pub fn name_problem(c: char) -> Option<&'static str> {
    let u = c as u32;
    Some(match c {
        ' ' => return None,
        _ if c.is_control() => "a control character",
        '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
            "a bidirectional control character"
        }
        '\u{2028}' | '\u{2029}' => "a line or paragraph separator",
        _ if c.is_whitespace() => "a space other than U+0020",
        // Format characters and default-ignorable code points: nothing to
        // see, and a different name.
        '\u{ad}'
        | '\u{34f}'
        | '\u{600}'..='\u{605}'
        | '\u{6dd}'
        | '\u{70f}'
        | '\u{890}'..='\u{891}'
        | '\u{8e2}'
        | '\u{115f}'..='\u{1160}'
        | '\u{17b4}'..='\u{17b5}'
        | '\u{180b}'..='\u{180f}'
        | '\u{200b}'..='\u{200d}'
        | '\u{2060}'..='\u{206f}'
        | '\u{3164}'
        | '\u{fe00}'..='\u{fe0f}'
        | '\u{feff}'
        | '\u{ffa0}'
        | '\u{fff0}'..='\u{fffb}'
        | '\u{110bd}'
        | '\u{110cd}'
        | '\u{13430}'..='\u{1343f}'
        | '\u{1bca0}'..='\u{1bca3}'
        | '\u{1d173}'..='\u{1d17a}'
        | '\u{e0000}'..='\u{e0fff}' => "an invisible or formatting character",
        _ if (0xfdd0..=0xfdef).contains(&u) || u & 0xfffe == 0xfffe => "a noncharacter",
        _ => return None,
    })
}

/// The first character of `name` that a name may not hold.
pub fn check_name(name: &str) -> Option<(char, &'static str)> {
    name.chars().find_map(|c| name_problem(c).map(|w| (c, w)))
}

/// Write `c` escaped, as Rust writes it (`\t`, `\u{202e}`).
fn escape_char(out: &mut String, c: char) {
    match c {
        '\t' => out.push_str("\\t"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\0' => out.push_str("\\0"),
        _ => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
}

/// `s` in double quotes, every character [`name_problem`] names escaped,
/// as are `"` and `\`, and cut after [`MAX_QUOTED_CHARS`] characters.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(4 * MAX_QUOTED_CHARS) + 2);
    out.push('"');
    for (i, c) in s.chars().enumerate() {
        if i == MAX_QUOTED_CHARS {
            out.push('…');
            break;
        }
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            _ if name_problem(c).is_some() && c != ' ' => escape_char(&mut out, c),
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `s` with every character [`name_problem`] names escaped but tabs (a
/// source line shown under a diagnostic: tabs keep the caret aligned).
/// Also returns, for the caret, how many columns each character took.
pub fn escape_line(s: &str) -> (String, Vec<usize>) {
    let mut out = String::with_capacity(s.len());
    let mut widths = Vec::with_capacity(s.len());
    for c in s.chars() {
        if c != '\t' && name_problem(c).is_some() {
            // Escapes are ASCII: their bytes are their columns.
            let before = out.len();
            escape_char(&mut out, c);
            widths.push(out.len() - before);
        } else {
            out.push(c);
            widths.push(1);
        }
    }
    (out, widths)
}

/// A character for a message: `U+202E`.
pub fn code_point(c: char) -> String {
    format!("U+{:04X}", c as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bad_character_is_found_where_it_is() {
        assert_eq!(check_file("a: 1\r\nb: 2\n\tc\n"), Ok(()));
        let e = check_file("a: 1\nb: é\0\n").unwrap_err();
        assert_eq!((e.ch, e.line, e.column), ('\0', 2, 5));
        let e = check_file("a\rb").unwrap_err();
        assert_eq!((e.ch, e.line, e.column), ('\r', 1, 2));
        assert!(check_file("\u{feff}a").is_err());
        assert_eq!(check_file(strip_bom("\u{feff}a")), Ok(()));
        assert_eq!(check_file("日本語: ü\u{1F600}\u{a0}\n"), Ok(()));
    }

    #[test]
    fn names() {
        assert_eq!(check_name("web-1.0 ü 日本"), None);
        for c in [
            '\u{202e}',
            '\u{200b}',
            '\u{a0}',
            '\u{ad}',
            '\u{1b}',
            '\u{e0041}',
            '\u{1fffe}',
            '\u{fe0f}',
        ] {
            assert!(check_name(&format!("a{c}")).is_some(), "{c:?}");
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("a\u{202e}b\"\\\n"), "\"a\\u{202e}b\\\"\\\\\\n\"");
        let long = quote(&"x".repeat(1000));
        assert_eq!(long.chars().count(), MAX_QUOTED_CHARS + 3);
        assert!(long.ends_with("…\""));
        let (line, widths) = escape_line("a\u{200b}\tb");
        assert_eq!(line, "a\\u{200b}\tb");
        assert_eq!(widths, [1, 8, 1, 1]);
    }
}

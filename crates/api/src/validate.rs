//! What a request document may hold: the limits, the characters refused,
//! and the checks of single fields that each document's check (next to the
//! document, in [`crate::documents`]) is made of, before the controller acts on it.
//!
//! One rule decides the answer to a refusal, so the OpenAPI document can say
//! in advance which requests are refused and how:
//! - **400**: the request breaks the document's schema (a wrong type, a
//!   missing or unknown field, a character the pattern excludes);
//! - **413**: something is over a size or count limit (a string's
//!   `maxLength`, an array's `maxItems`, a file's or the whole policy's bytes);
//! - **422**: the request fits the schema but cannot be done: an invalid
//!   policy, or a rule about map *keys* (file names, tag keys, counter
//!   names), which OpenAPI 3.0 has no way to state (`propertyNames` is 3.1).
//!
//! The limits keep every change's record under the audit trail's record
//! limit ([`MAX_CHANGE_RECORD_BYTES`]): a change the trail cannot hold is
//! refused before anything is stored, never committed without its record.
//!
//! Text that people read back (names, tag keys and values, messages) may not
//! hold control characters, nor the invisible ones that reorder or hide
//! text on a terminal (bidirectional overrides, zero-width characters):
//! [`hidden`] says which; [`Quoted`] shows any string with them escaped.

use std::collections::BTreeMap;
use std::fmt;

/// The longest long-poll wait an agent may ask for, in seconds (more is refused).
pub const MAX_WAIT_S: u64 = 300;
/// The most policy files in one apply.
pub const MAX_FILES: usize = 1024;
/// The most bytes in one policy file.
pub const MAX_FILE_BYTES: usize = 16 << 20;
/// The most bytes of file names and texts in one apply: a 50,000-VM
/// datacenter is about 9 MiB.
pub const MAX_BUNDLE_BYTES: usize = 24 << 20;
/// The longest file name, in characters.
pub const MAX_FILE_NAME_CHARS: usize = 255;
/// The longest apply message, in characters.
pub const MAX_MESSAGE_CHARS: usize = 4096;
/// The longest tag key, in characters.
pub const MAX_TAG_KEY_CHARS: usize = 128;
/// The longest tag value, in characters.
pub const MAX_TAG_VALUE_CHARS: usize = 256;
/// The most tags one request sets, and the most it removes.
pub const MAX_TAGS_PER_REQUEST: usize = 64;
/// The most tag keys the API may set or remove on one VM (its overlay entry).
pub const MAX_OVERLAY_TAGS_PER_VM: usize = 64;
/// The most bytes of the whole tag overlay (every VM's entry, encoded): it
/// travels in every change's compare-and-swap and every agent's bundle.
pub const MAX_OVERLAY_BYTES: usize = 8 << 20;
/// The longest token name, in characters.
pub const MAX_TOKEN_NAME_CHARS: usize = 64;
/// The longest host name (as DNS: 253).
pub const MAX_HOST_NAME_CHARS: usize = 253;
/// The longest agent version string, in characters.
pub const MAX_AGENT_VERSION_CHARS: usize = 128;
/// The most counters one agent report carries.
pub const MAX_COUNTERS: usize = 1024;
/// The longest counter name, in characters.
pub const MAX_COUNTER_NAME_CHARS: usize = 128;
/// The most bytes of a file diff kept in a change record; past it the
/// record says how much was left out and names each file's digest (the
/// version's files themselves stay in the store).
pub const MAX_CHANGE_DIFF: usize = 1 << 20;
/// The most bytes of one change record, encoded. Well under the audit
/// trail's record limit, so a change that passes is one the trail can hold.
pub const MAX_CHANGE_RECORD_BYTES: usize = 4 << 20;
const _: () = assert!(MAX_CHANGE_RECORD_BYTES < palisade_audit::segment::MAX_PAYLOAD as usize);

/// The characters a printed name or value may not hold, as a regular
/// expression class (for the OpenAPI document's patterns): C0 and C1
/// controls, DEL, and the invisible formatting characters of [`hidden`].
pub const HIDDEN_CLASS: &str =
    r"\u0000-\u001f\u007f-\u009f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff";

/// Whether `c` is a control character or an invisible one that can hide or
/// reorder text on a terminal: C0/C1 controls and DEL; the soft hyphen; the
/// bidirectional marks, embeddings, overrides and isolates (U+061C,
/// U+200E–U+200F, U+202A–U+202E, U+2066–U+2069); zero-width and joining
/// characters (U+180E, U+200B–U+200D, U+2060–U+2064, U+FEFF); and the line
/// and paragraph separators (U+2028, U+2029).
pub fn hidden(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}'
        | '\u{7f}'..='\u{9f}'
        | '\u{ad}'
        | '\u{61c}'
        | '\u{180e}'
        | '\u{200b}'..='\u{200f}'
        | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{2069}'
        | '\u{feff}')
}

/// A string shown in double quotes with [`hidden`] characters, quotes and
/// backslashes escaped (`\u{1b}`), so a message can name what it refuses
/// without passing it on to a terminal.
pub struct Quoted<'a>(pub &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        // Long values are cut: a refusal quotes enough to find the input.
        for (shown, c) in self.0.chars().enumerate() {
            if shown == 80 {
                return write!(f, "…\" ({} characters)", self.0.chars().count());
            }
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                c if hidden(c) => write!(f, "\\u{{{:x}}}", u32::from(c))?,
                c => write!(f, "{c}")?,
            }
        }
        f.write_str("\"")
    }
}

/// A string with [`hidden`] characters and backslashes escaped, unquoted
/// (for names in running text, such as an actor's).
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                c if hidden(c) => write!(f, "\\u{{{:x}}}", u32::from(c))?,
                c => write!(f, "{c}")?,
            }
        }
        Ok(())
    }
}

/// How a request is refused (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestErrorKind {
    /// It breaks the document's schema: 400.
    Malformed,
    /// It is over a size or count limit: 413.
    TooLarge,
    /// It fits the schema but cannot be done: 422.
    Unprocessable,
}

/// A request refused by a check of this module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    /// Which kind of refusal.
    pub kind: RequestErrorKind,
    /// What is wrong, naming the field.
    pub message: String,
}

impl RequestError {
    pub(crate) fn malformed(message: String) -> RequestError {
        RequestError {
            kind: RequestErrorKind::Malformed,
            message,
        }
    }

    pub(crate) fn too_large(message: String) -> RequestError {
        RequestError {
            kind: RequestErrorKind::TooLarge,
            message,
        }
    }

    pub(crate) fn unprocessable(message: String) -> RequestError {
        RequestError {
            kind: RequestErrorKind::Unprocessable,
            message,
        }
    }

    /// The same refusal as a 422: for a rule the document states about a
    /// map key, which the schema cannot check.
    pub(crate) fn on_key(self) -> RequestError {
        RequestError::unprocessable(self.message)
    }
}

/// Check printed text `value` of field `what`: at most `max` characters
/// (413), at least `min` (400), none [`hidden`] (400).
pub fn check_text(what: &str, value: &str, min: usize, max: usize) -> Result<(), RequestError> {
    if let Some(c) = value.chars().find(|&c| hidden(c)) {
        return Err(RequestError::malformed(format!(
            "{what} {} holds the control or invisible character U+{:04X}",
            Quoted(value),
            u32::from(c)
        )));
    }
    let n = value.chars().count();
    if n > max {
        return Err(RequestError::too_large(format!(
            "{what} {} has {n} characters; the limit is {max}",
            Quoted(value)
        )));
    }
    if n < min {
        return Err(RequestError::malformed(format!("{what} {} is empty", Quoted(value))));
    }
    Ok(())
}

/// A token name: 1 to [`MAX_TOKEN_NAME_CHARS`] of `A-Z a-z 0-9 . _ @ + -`.
pub fn check_token_name(name: &str) -> Result<(), RequestError> {
    let n = name.chars().count();
    if n > MAX_TOKEN_NAME_CHARS {
        return Err(RequestError::too_large(format!(
            "token name {} has {n} characters; the limit is {MAX_TOKEN_NAME_CHARS}",
            Quoted(name)
        )));
    }
    let ok = n > 0 && name.chars().all(|c| c.is_ascii_alphanumeric() || "._@+-".contains(c));
    if !ok {
        return Err(RequestError::malformed(format!(
            "token name {} must be 1 to {MAX_TOKEN_NAME_CHARS} printable characters without spaces: \
             letters, digits and . _ @ + -",
            Quoted(name)
        )));
    }
    Ok(())
}

/// The pattern of [`check_token_name`], for the document.
pub const TOKEN_NAME_PATTERN: &str = r"^[A-Za-z0-9._@+-]+(?![\s\S])";

/// A host name as an agent's certificate would carry it: labels of
/// `A-Z a-z 0-9 _ -` joined by single dots, the first starting with a
/// letter or digit, at most [`MAX_HOST_NAME_CHARS`] in all.
pub fn check_host(host: &str) -> Result<(), RequestError> {
    if host.len() > MAX_HOST_NAME_CHARS {
        return Err(RequestError::too_large(format!(
            "host name {} has {} characters; the limit is {MAX_HOST_NAME_CHARS}",
            Quoted(host),
            host.chars().count()
        )));
    }
    let label_ok = |l: &str| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let ok = host.split('.').all(label_ok) && host.starts_with(|c: char| c.is_ascii_alphanumeric());
    if !ok {
        return Err(RequestError::malformed(format!(
            "host name {} must be labels of letters, digits, _ and - joined by single dots, \
             starting with a letter or digit",
            Quoted(host)
        )));
    }
    Ok(())
}

/// The pattern of [`check_host`], for the document.
pub const HOST_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*(?![\s\S])";

/// A policy file name: a plain `*.yaml` or `*.yml` name (no directory, not
/// hidden), printable, at most [`MAX_FILE_NAME_CHARS`].
pub fn check_file_name(name: &str) -> Result<(), RequestError> {
    check_text("file name", name, 1, MAX_FILE_NAME_CHARS)?;
    let stem = name.strip_suffix(".yaml").or_else(|| name.strip_suffix(".yml"));
    let ok =
        stem.is_some_and(|s| !s.is_empty()) && !name.starts_with('.') && !name.contains('/') && !name.contains('\\');
    if !ok {
        return Err(RequestError::unprocessable(format!(
            "file name {} must be a plain *.yaml or *.yml name (no directory, not starting with a dot)",
            Quoted(name)
        )));
    }
    Ok(())
}

/// The files of an apply or a diff: at least one, at most [`MAX_FILES`],
/// each name checked ([`check_file_name`]), each file at most
/// [`MAX_FILE_BYTES`], all at most [`MAX_BUNDLE_BYTES`].
pub fn check_files(files: &BTreeMap<String, String>) -> Result<(), RequestError> {
    if files.is_empty() {
        return Err(RequestError::malformed("no policy files given".into()));
    }
    if files.len() > MAX_FILES {
        return Err(RequestError::too_large(format!(
            "{} policy files; the limit is {MAX_FILES}",
            files.len()
        )));
    }
    let mut total = 0usize;
    for (name, text) in files {
        check_file_name(name).map_err(RequestError::on_key)?;
        if text.len() > MAX_FILE_BYTES {
            return Err(RequestError::too_large(format!(
                "policy file {} has {} bytes; the limit is {MAX_FILE_BYTES}",
                Quoted(name),
                text.len()
            )));
        }
        total += name.len() + text.len();
    }
    if total > MAX_BUNDLE_BYTES {
        return Err(RequestError::too_large(format!(
            "the policy files come to {total} bytes; the limit is {MAX_BUNDLE_BYTES}"
        )));
    }
    Ok(())
}

/// A tag key: printable, 1 to [`MAX_TAG_KEY_CHARS`] characters.
pub fn check_tag_key(key: &str) -> Result<(), RequestError> {
    check_text("tag key", key, 1, MAX_TAG_KEY_CHARS)
}

/// A tag value: printable, at most [`MAX_TAG_VALUE_CHARS`] characters.
pub fn check_tag_value(key: &str, value: &str) -> Result<(), RequestError> {
    check_text(&format!("value of tag {}", Quoted(key)), value, 0, MAX_TAG_VALUE_CHARS)
}

/// The most refused heads (and refused keys) a controller keeps per host;
/// later ones are counted ([`crate::documents::AuditHeadInfo::conflicts_seen`]).
pub const MAX_HEAD_CONFLICTS: usize = 16;

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The pattern of `N` bytes of hex, for the document.
pub fn hex_pattern(n: usize) -> String {
    format!("^[0-9a-fA-F]{{{}}}(?![\\s\\S])", 2 * n)
}

/// Field `what` as exactly `N` bytes of hex: a character that is not a
/// hex digit (400), more than `2N` digits (413), fewer (400).
pub fn check_hex<const N: usize>(what: &str, value: &str) -> Result<[u8; N], RequestError> {
    if let Some(c) = value.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(RequestError::malformed(format!(
            "{what} must be hex digits; it holds {}",
            Quoted(&c.to_string())
        )));
    }
    if value.len() > 2 * N {
        return Err(RequestError::too_large(format!(
            "{what} has {} hex digits; it must have {}",
            value.len(),
            2 * N
        )));
    }
    if value.len() < 2 * N {
        return Err(RequestError::malformed(format!(
            "{what} has {} hex digits; it must have {}",
            value.len(),
            2 * N
        )));
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        // ASCII hex digits, length 2N: each slice is in bounds and parses.
        *o = u8::from_str_radix(&value[2 * i..2 * i + 2], 16)
            .map_err(|e| RequestError::malformed(format!("{what}: {e}")))?;
    }
    Ok(out)
}

/// An ed25519 public key as 64 hex digits ([`check_hex`]); one that is not
/// a point of the curve is refused with 422.
pub fn public_key(what: &str, value: &str) -> Result<[u8; 32], RequestError> {
    let k = check_hex::<32>(what, value)?;
    let probe = palisade_audit::SignedHead {
        seq: 0,
        hash: [0; 32],
        time_ns: 0,
        signature: [0; 64],
        public_key: k,
    };
    if probe.verifying_key().is_none() {
        return Err(RequestError::unprocessable(format!(
            "{what} {} is not an ed25519 public key",
            Quoted(value)
        )));
    }
    Ok(k)
}

/// The fields of a flow record in JSON (`phase` and `reason` are its
/// [`palisade_audit::record::Phase`], flattened).
pub const FLOW_RECORD_FIELDS: [&str; 17] = [
    "time_ns",
    "flow_id",
    "host",
    "phase",
    "reason",
    "src",
    "dst",
    "protocol",
    "icmp",
    "verdict",
    "decided_by",
    "packets_out",
    "bytes_out",
    "packets_in",
    "bytes_in",
    "start_ns",
    "last_ns",
];
/// The fields of a flow record's `src` and `dst`.
pub const ENDPOINT_FIELDS: [&str; 3] = ["addr", "port", "vm"];
/// The fields of an endpoint's `vm`.
pub const VM_IDENTITY_FIELDS: [&str; 7] = ["name", "uuid", "vnic", "zone", "cluster", "host", "tags"];
/// The fields of a flow record's `icmp`.
pub const ICMP_FIELDS: [&str; 2] = ["type", "code"];
/// The fields of each of a flow record's `decided_by`.
pub const DECISION_FIELDS: [&str; 4] = ["rule", "level", "policy_version", "chain"];

/// Refuse a field a flow batch's records do not have, at any depth, naming
/// it (`records[3].src.colour`). Serde's decoding of a flow record (whose
/// phase is flattened into it) passes unknown fields over without a word,
/// so the batch is looked at as JSON first.
pub fn check_flow_batch_fields(batch: &serde_json::Value) -> Result<(), RequestError> {
    use serde_json::Value;
    fn fields(v: &Value, known: &[&str], at: &str) -> Result<(), RequestError> {
        let Some(obj) = v.as_object() else {
            return Ok(()); // a wrong type is decoding's to refuse
        };
        match obj.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(RequestError::malformed(format!(
                "unknown field {} in the request body",
                Quoted(&format!("{at}.{k}"))
            ))),
            None => Ok(()),
        }
    }
    fields(batch, &["records"], "")?;
    let Some(records) = batch.get("records").and_then(Value::as_array) else {
        return Ok(());
    };
    for (i, r) in records.iter().enumerate() {
        let at = format!("records[{i}]");
        fields(r, &FLOW_RECORD_FIELDS, &at)?;
        for end in ["src", "dst"] {
            let Some(e) = r.get(end) else { continue };
            fields(e, &ENDPOINT_FIELDS, &format!("{at}.{end}"))?;
            if let Some(vm) = e.get("vm") {
                fields(vm, &VM_IDENTITY_FIELDS, &format!("{at}.{end}.vm"))?;
            }
        }
        if let Some(icmp) = r.get("icmp") {
            fields(icmp, &ICMP_FIELDS, &format!("{at}.icmp"))?;
        }
        for (j, d) in r
            .get("decided_by")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            fields(d, &DECISION_FIELDS, &format!("{at}.decided_by[{j}]"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_characters_are_refused_and_quoted_escaped() {
        for bad in [
            "\u{0}",
            "a\nb",
            "\u{1b}[2J",
            "\u{7f}",
            "\u{85}",
            "\u{202e}x",
            "z\u{200b}w",
            "\u{feff}",
            "\u{2066}",
        ] {
            assert!(check_tag_key(bad).is_err(), "{bad:?}");
            let shown = Quoted(bad).to_string();
            assert!(!shown.chars().any(hidden), "{shown:?}");
        }
        for good in ["tier", "é", "日本", "a b", "x=y", "\u{1F600}"] {
            assert!(check_tag_key(good).is_ok(), "{good:?}");
        }
        assert_eq!(Quoted("a\"\\\u{1b}").to_string(), r#""a\"\\\u{1b}""#);
    }

    #[test]
    fn names_follow_their_rules() {
        let cases: &[(&str, bool)] = &[
            ("hv1", true),
            ("lab-h1.example.com", true),
            ("h_1", true),
            ("..", false),
            ("a..b", false),
            ("-x", false),
            (".x", false),
            ("x.", false),
            ("../tokens/x", false),
            ("x y", false),
            ("", false),
        ];
        for (h, ok) in cases {
            assert_eq!(check_host(h).is_ok(), *ok, "{h:?}");
        }
        assert!(check_host(&"a".repeat(254)).is_err());
        for (n, ok) in [
            ("ci", true),
            ("a@b.c+d", true),
            ("has space", false),
            ("", false),
            ("x/y", false),
        ] {
            assert_eq!(check_token_name(n).is_ok(), ok, "{n:?}");
        }
        for (n, ok) in [
            ("policy.yaml", true),
            ("a.yml", true),
            (".yaml", false),
            (".hidden.yaml", false),
            ("a/b.yaml", false),
            ("a.json", false),
            ("a\u{0}.yaml", false),
        ] {
            assert_eq!(check_file_name(n).is_ok(), ok, "{n:?}");
        }
    }

    #[test]
    fn refusals_are_of_the_documented_kind() {
        use RequestErrorKind::*;
        let tag = |set: &[(&str, &str)], remove: &[&str]| crate::documents::TagRequest {
            set: set.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            remove: remove.iter().map(|k| k.to_string()).collect(),
        };
        let kind = |r: Result<(), RequestError>| r.unwrap_err().kind;
        assert_eq!(kind(tag(&[("k", &"v".repeat(257))], &[]).check()), TooLarge);
        assert_eq!(kind(tag(&[("k", "\u{1b}")], &[]).check()), Malformed);
        assert_eq!(kind(tag(&[("", "v")], &[]).check()), Unprocessable);
        assert_eq!(kind(tag(&[("\u{1b}", "v")], &[]).check()), Unprocessable);
        assert_eq!(kind(tag(&[], &[""]).check()), Malformed);
        assert_eq!(kind(tag(&[("a", "1")], &["a"]).check()), Unprocessable);
        assert!(tag(&[("a", "")], &["b"]).check().is_ok());
    }

    #[test]
    fn hex_fields_are_refused_as_documented() {
        use RequestErrorKind::*;
        let kind = |r: Result<[u8; 32], RequestError>| r.map(|_| ()).unwrap_err().kind;
        let key = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
        assert!(check_hex::<32>("k", key).is_ok());
        assert_eq!(
            check_hex::<32>("k", &key.to_uppercase()).unwrap(),
            check_hex::<32>("k", key).unwrap()
        );
        assert_eq!(kind(check_hex::<32>("k", &format!("{key}00"))), TooLarge);
        assert_eq!(kind(check_hex::<32>("k", &key[..62])), Malformed);
        assert_eq!(kind(check_hex::<32>("k", &format!(" {}", &key[1..]))), Malformed);
        assert_eq!(kind(check_hex::<32>("k", &key.replace('3', "g"))), Malformed);
        // A multi-byte character is not a hex digit (and is no slicing hazard).
        assert_eq!(kind(check_hex::<32>("k", &format!("é{}", &key[2..]))), Malformed);
        assert!(public_key("k", key).is_ok());
        // Some 32-byte strings are no point of the curve: 422, not 400.
        let not_a_point = (0u8..=255)
            .map(|b| hex(&[b; 32]))
            .find(|h| public_key("k", h).is_err())
            .expect("a value that does not decompress");
        assert_eq!(kind(public_key("k", &not_a_point)), Unprocessable);
        // The document's pattern says the same as the check.
        assert_eq!(hex_pattern(32), "^[0-9a-fA-F]{64}(?![\\s\\S])");
    }
}

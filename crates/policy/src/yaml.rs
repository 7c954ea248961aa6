//! A YAML document as a tree whose every node knows its line and column.
//!
//! serde_yaml forgets positions, and diagnostics need them for values, not just
//! for syntax errors; so the tree is built from yaml-rust2's event stream,
//! which marks every event. The events are pulled one at a time and the tree
//! is built on an explicit stack, never by recursion, so that the structure
//! of the text cannot take the thread's stack; and the text is held to the
//! bounds of [`crate::limits`] as it is read: collections nest at most
//! [`MAX_DEPTH`] deep (an alias counts as deep as what it copies), aliases
//! copy a bounded number of nodes, and the only tags are the core schema's
//! `!!str`, `!!seq` and `!!map`. Anchors and aliases are resolved by copying
//! the anchored node (with its own position, where the definition is); scalar
//! text is shared between the copies.
//!
//! The text is expected to have passed [`crate::chars::check_file`]: the
//! scanner takes a NUL for the end of its input.

use std::collections::HashMap;
use std::sync::Arc;

use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::diag::DiagnosticKind;
use crate::limits::{ALIAS_ALLOWANCE, ALIAS_RATIO, MAX_ALIAS_NODES, MAX_DEPTH};
use crate::model::Span;

/// What a node holds.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// A scalar; `quoted` when written in quotes or tagged `!!str` (so
    /// `"yes"` stays a string).
    Scalar {
        /// The text (shared by the copies an alias makes).
        value: Arc<str>,
        /// Whether it was quoted, a block scalar or tagged `!!str`.
        quoted: bool,
    },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in source order.
    Map(Vec<(Node, Node)>),
}

/// A positioned YAML node.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Contents.
    pub kind: NodeKind,
    /// Where it starts.
    pub span: Span,
}

impl Node {
    /// The scalar text, if a scalar.
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }

    /// Whether this is an unquoted empty or `~`/`null` scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, NodeKind::Scalar { value, quoted: false } if value.is_empty() || &**value == "~" || &**value == "null")
    }

    /// A short word for the node's shape, for "expected X, found Y" messages.
    pub fn shape(&self) -> &'static str {
        match &self.kind {
            NodeKind::Scalar { .. } if self.is_null() => "nothing",
            NodeKind::Scalar { .. } => "a scalar",
            NodeKind::Seq(_) => "a list",
            NodeKind::Map(_) => "a mapping",
        }
    }
}

/// Why a text could not be read as YAML, positioned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// What kind of problem: [`DiagnosticKind::YamlSyntax`],
    /// [`DiagnosticKind::LimitExceeded`] or [`DiagnosticKind::UnsupportedTag`].
    pub kind: DiagnosticKind,
    /// Where.
    pub span: Span,
    /// What.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
}

/// The parse of a text, with what its aliases cost.
#[derive(Debug)]
pub(crate) struct Parsed {
    /// One node per document.
    pub docs: Vec<Node>,
    /// Whether the text used an alias (or an anchor).
    pub aliases: bool,
}

/// An open collection.
struct Frame {
    node: Node,
    anchor: usize,
    /// A mapping's pending key.
    key: Option<Node>,
    /// Nodes in the tree before this one.
    nodes_before: u64,
    /// The greatest height of a child (a scalar's is 0).
    child_height: usize,
    /// Opened with `[` or `{` (else a block collection): where an
    /// unclosed-collection error points.
    flow: Option<char>,
    /// Where it opened, for that error.
    mark: Marker,
}

/// An anchored node, for its aliases.
struct Anchored {
    node: Node,
    /// Nodes in it, itself included.
    size: u64,
    /// Collections on its longest path (a scalar's is 0).
    height: usize,
}

/// A position in the text by character, moved to each event's mark to see
/// which character opens a collection.
struct Cursor<'t> {
    text: &'t str,
    chars: usize,
    byte: usize,
}

impl Cursor<'_> {
    /// The character at character index `at`.
    fn char_at(&mut self, at: usize) -> Option<char> {
        while self.chars < at {
            let c = self.text[self.byte..].chars().next()?;
            self.byte += c.len_utf8();
            self.chars += 1;
        }
        while self.chars > at {
            let c = self.text[..self.byte].chars().next_back()?;
            self.byte -= c.len_utf8();
            self.chars -= 1;
        }
        self.text[self.byte..].chars().next()
    }
}

struct Builder<'t> {
    file: Arc<str>,
    /// Lines before the text's first (it is cut from a longer file).
    line_offset: u32,
    /// Collections around the text (it is cut from inside them).
    base_depth: usize,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Anchored>,
    docs: Vec<Node>,
    /// Nodes built from the text's own events.
    written: u64,
    /// Nodes copied: by aliases, and for each anchor the copy kept of it.
    copied: u64,
    /// Nodes in the documents' trees: those written and those aliases copied.
    tree: u64,
    cursor: Cursor<'t>,
    /// The line and column just past the text's last character.
    end: (u32, u32),
}

/// `!!str`, `!!seq`, `!!map`, as yaml-rust2 resolves them (a `%TAG`
/// directive that moves `!!` elsewhere makes them other tags).
const CORE: &str = "tag:yaml.org,2002:";

fn tag_name(t: &Tag) -> String {
    match t.handle.strip_prefix(CORE) {
        Some(rest) if t.handle.len() == CORE.len() => format!("!!{rest}{}", t.suffix),
        _ => format!("{}{}", t.handle, t.suffix),
    }
}

impl Builder<'_> {
    fn span(&self, m: Marker) -> Span {
        // yaml-rust2 lines are 1-based, columns 0-based.
        let mut at = (
            u32::try_from(m.line()).unwrap_or(u32::MAX),
            u32::try_from(m.col()).unwrap_or(u32::MAX).saturating_add(1),
        );
        // At the end of a text without a final newline, the scanner marks
        // an empty value on a line after the last: it is at the end.
        if at > self.end {
            at = self.end;
        }
        Span {
            file: self.file.clone(),
            line: at.0.saturating_add(self.line_offset),
            column: at.1,
        }
    }

    fn error(&self, kind: DiagnosticKind, m: Marker, message: String, hint: Option<String>) -> SyntaxError {
        SyntaxError {
            kind,
            span: self.span(m),
            message,
            hint,
        }
    }

    /// Refuse a tag other than the one that says what the node already is.
    fn check_tag(&self, tag: Option<&Tag>, allowed: &str, m: Marker) -> Result<bool, SyntaxError> {
        let Some(t) = tag else { return Ok(false) };
        if t.handle == CORE && t.suffix == allowed {
            return Ok(true);
        }
        Err(self.error(
            DiagnosticKind::UnsupportedTag,
            m,
            format!("the tag {} is not supported", crate::chars::quote(&tag_name(t))),
            Some("a policy's values are untagged; only !!str, !!seq and !!map are accepted, where they say what the value is".into()),
        ))
    }

    /// Count `n` more copied nodes against the allowance.
    fn copy(&mut self, n: u64, m: Marker, what: &str) -> Result<(), SyntaxError> {
        self.copied = self.copied.saturating_add(n);
        let allowed = ALIAS_ALLOWANCE
            .saturating_add(ALIAS_RATIO.saturating_mul(self.written))
            .min(MAX_ALIAS_NODES);
        if self.copied <= allowed {
            return Ok(());
        }
        Err(self.error(
            DiagnosticKind::LimitExceeded,
            m,
            format!(
                "{what} brings the nodes copied by aliases to {}, over the limit of {allowed} here",
                self.copied
            ),
            Some(format!(
                "aliases may copy {ALIAS_ALLOWANCE} nodes plus {ALIAS_RATIO} for each node written out before them, {MAX_ALIAS_NODES} at most; write the values out, or share less"
            )),
        ))
    }

    fn too_deep(&self, m: Marker, what: &str) -> SyntaxError {
        self.error(
            DiagnosticKind::LimitExceeded,
            m,
            format!("{what} nests collections more than {MAX_DEPTH} levels deep"),
            Some("a policy nests a few levels deep; this text is not a policy".into()),
        )
    }

    /// Add a finished node to the open collection (or as a document).
    fn push_value(&mut self, node: Node, height: usize) {
        let Some(parent) = self.stack.last_mut() else {
            self.docs.push(node);
            return;
        };
        parent.child_height = parent.child_height.max(height);
        match &mut parent.node.kind {
            NodeKind::Seq(items) => items.push(node),
            NodeKind::Map(entries) => match parent.key.take() {
                None => parent.key = Some(node),
                Some(k) => entries.push((k, node)),
            },
            NodeKind::Scalar { .. } => {}
        }
    }

    /// Keep a copy of an anchored node for its aliases.
    fn anchor(&mut self, id: usize, node: &Node, size: u64, height: usize, m: Marker) -> Result<(), SyntaxError> {
        if id == 0 {
            return Ok(());
        }
        self.copy(size, m, "this anchor")?;
        let anchored = Anchored {
            node: node.clone(),
            size,
            height,
        };
        self.anchors.insert(id, anchored);
        Ok(())
    }

    fn open(&mut self, kind: NodeKind, anchor: usize, m: Marker) -> Result<(), SyntaxError> {
        if self.base_depth + self.stack.len() >= MAX_DEPTH {
            return Err(self.too_deep(m, "this collection"));
        }
        self.written += 1;
        self.tree += 1;
        let flow = self.cursor.char_at(m.index()).filter(|c| matches!(c, '[' | '{'));
        let frame = Frame {
            node: Node {
                kind,
                span: self.span(m),
            },
            anchor,
            key: None,
            nodes_before: self.tree - 1,
            child_height: 0,
            flow,
            mark: m,
        };
        self.stack.push(frame);
        Ok(())
    }

    fn close(&mut self, m: Marker) -> Result<(), SyntaxError> {
        let Some(f) = self.stack.pop() else { return Ok(()) };
        let height = f.child_height + 1;
        // Nodes in the tree now, less those before it: its own and its copies'.
        let size = self.tree - f.nodes_before;
        self.anchor(f.anchor, &f.node, size, height, m)?;
        self.push_value(f.node, height);
        Ok(())
    }

    fn on_event(&mut self, ev: Event, m: Marker) -> Result<(), SyntaxError> {
        match ev {
            Event::Scalar(value, style, anchor, tag) => {
                let tagged_str = self.check_tag(tag.as_ref(), "str", m)?;
                self.written += 1;
                self.tree += 1;
                let node = Node {
                    kind: NodeKind::Scalar {
                        value: value.into(),
                        quoted: style != TScalarStyle::Plain || tagged_str,
                    },
                    span: self.span(m),
                };
                self.anchor(anchor, &node, 1, 0, m)?;
                self.push_value(node, 0);
            }
            Event::SequenceStart(anchor, tag) => {
                self.check_tag(tag.as_ref(), "seq", m)?;
                self.open(NodeKind::Seq(Vec::new()), anchor, m)?;
            }
            Event::MappingStart(anchor, tag) => {
                self.check_tag(tag.as_ref(), "map", m)?;
                self.open(NodeKind::Map(Vec::new()), anchor, m)?;
            }
            Event::SequenceEnd | Event::MappingEnd => self.close(m)?,
            Event::Alias(id) => {
                let Some(a) = self.anchors.get(&id) else {
                    return Err(self.error(DiagnosticKind::YamlSyntax, m, "alias to an unknown anchor".into(), None));
                };
                let (size, height) = (a.size, a.height);
                if self.base_depth + self.stack.len() + height > MAX_DEPTH {
                    return Err(self.too_deep(m, "this alias"));
                }
                self.copy(size, m, "this alias")?;
                self.tree += size;
                let node = self.anchors[&id].node.clone();
                self.push_value(node, height);
            }
            // Anchors are per document.
            Event::DocumentStart => self.anchors.clear(),
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
        }
        Ok(())
    }

    /// The parser's error, or, when a flow collection opened on an earlier
    /// line is still open, an error pointing at where it opened: the parser
    /// only notices a missing `]` or `}` where the text stops making sense.
    fn parse_error(&self, e: &yaml_rust2::ScanError) -> SyntaxError {
        let stopped = self.span(*e.marker());
        let open = self.stack.iter().rev().find_map(|f| Some((f.flow?, f)));
        match open {
            Some((c, f)) if f.mark.line() < e.marker().line() => {
                let (what, close) = if c == '[' {
                    ("flow sequence", ']')
                } else {
                    ("flow mapping", '}')
                };
                let message = format!(
                    "the {what} opened here with \"{c}\" is not closed before {}:{}, where the parser stopped: {}",
                    stopped.line,
                    stopped.column,
                    e.info()
                );
                self.error(
                    DiagnosticKind::YamlSyntax,
                    f.mark,
                    message,
                    Some(format!("close it with \"{close}\"")),
                )
            }
            // The scanner's own bound: it looks ahead through flow
            // collections, so it meets its 256th open one before this
            // builder meets the 65th.
            _ if e.info() == "recursion limit exceeded" => self.too_deep(*e.marker(), "this flow collection"),
            _ => SyntaxError {
                kind: DiagnosticKind::YamlSyntax,
                span: stopped,
                message: e.info().to_string(),
                hint: None,
            },
        }
    }
}

/// Parse `text` (named `file`) into one node per document.
pub fn parse(file: &Arc<str>, text: &str) -> Result<Vec<Node>, SyntaxError> {
    parse_at(file, text, 1)
}

/// Parse `text`, cut from `file` where it starts on line `first_line`
/// (1-based), so that positions are the file's.
pub fn parse_at(file: &Arc<str>, text: &str, first_line: u32) -> Result<Vec<Node>, SyntaxError> {
    parse_in(file, text, first_line, 0).map(|p| p.docs)
}

/// [`parse_at`] for a text cut from inside `depth` collections, so that
/// the depth limit counts them.
pub(crate) fn parse_in(file: &Arc<str>, text: &str, first_line: u32, depth: usize) -> Result<Parsed, SyntaxError> {
    let mut b = Builder {
        file: file.clone(),
        line_offset: first_line.saturating_sub(1),
        base_depth: depth,
        stack: Vec::new(),
        anchors: HashMap::new(),
        docs: Vec::new(),
        written: 0,
        copied: 0,
        tree: 0,
        end: crate::chars::position(text, text.len()),
        cursor: Cursor {
            text,
            chars: 0,
            byte: 0,
        },
    };
    let mut parser = Parser::new_from_str(text);
    loop {
        match parser.next_token() {
            Ok((Event::StreamEnd, _)) => break,
            Ok((ev, mark)) => b.on_event(ev, mark)?,
            Err(e) => return Err(b.parse_error(&e)),
        }
    }
    Ok(Parsed {
        docs: b.docs,
        aliases: b.copied > 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        let f: Arc<str> = "t.yaml".into();
        let docs = parse(&f, "a: 1\nb:\n  - x\n  - {c: \"d\"}\n").unwrap();
        let NodeKind::Map(m) = &docs[0].kind else {
            panic!("not a map")
        };
        assert_eq!(m[0].0.as_str(), Some("a"));
        assert_eq!((m[0].1.span.line, m[0].1.span.column), (1, 4));
        let NodeKind::Seq(s) = &m[1].1.kind else {
            panic!("not a seq")
        };
        assert_eq!((s[0].span.line, s[0].span.column), (3, 5));
        let NodeKind::Map(inner) = &s[1].kind else {
            panic!("not a map")
        };
        assert_eq!((inner[0].1.span.line, inner[0].1.span.column), (4, 9));
        assert!(matches!(inner[0].1.kind, NodeKind::Scalar { quoted: true, .. }));
    }

    #[test]
    fn syntax_error_is_positioned() {
        let f: Arc<str> = "t.yaml".into();
        let e = parse(&f, "a: [1, 2\nb: 3\n").unwrap_err();
        assert_eq!((e.span.line, e.span.column), (1, 4), "{e:?}");
        assert!(e.message.contains("not closed"), "{e:?}");
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let f: Arc<str> = "t.yaml".into();
        for text in [
            "[".repeat(100_000),
            format!("{}{}", "[".repeat(50_000), "]".repeat(50_000)),
            format!("{}x", "- ".repeat(100_000)),
        ] {
            let e = parse(&f, &text).unwrap_err();
            assert_eq!(e.kind, DiagnosticKind::LimitExceeded, "{e:?}");
        }
    }

    #[test]
    fn positions_of_a_cut_text_are_the_files() {
        let f: Arc<str> = "t.yaml".into();
        let docs = parse_at(&f, "  - { a: 1 }\n", 40).unwrap();
        let NodeKind::Seq(s) = &docs[0].kind else {
            panic!("not a seq")
        };
        assert_eq!((s[0].span.line, s[0].span.column), (40, 5));
        let e = parse_at(&f, "a: [1, 2\nb: 3\n", 40).unwrap_err();
        assert!(e.span.line >= 40, "{e:?}");
    }

    #[test]
    fn aliases_copy() {
        let f: Arc<str> = "t.yaml".into();
        let docs = parse(&f, "a: &x [1]\nb: *x\n").unwrap();
        let NodeKind::Map(m) = &docs[0].kind else {
            panic!("not a map")
        };
        assert_eq!(m[0].1.kind, m[1].1.kind);
    }

    #[test]
    fn anchors_are_per_document() {
        let f: Arc<str> = "t.yaml".into();
        let e = parse(&f, "a: &x 1\n---\nb: *x\n").unwrap_err();
        assert_eq!((e.span.line, e.span.column), (3, 4), "{e:?}");
    }

    #[test]
    fn the_depth_of_a_cut_text_counts_what_it_was_cut_from() {
        let f: Arc<str> = "t.yaml".into();
        let text = format!("{}x", "- ".repeat(MAX_DEPTH - 1));
        assert!(parse_in(&f, &text, 1, 1).is_ok());
        assert!(parse_in(&f, &text, 1, 2).is_err());
    }
}

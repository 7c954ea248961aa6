//! A YAML document as a tree whose every node knows its line and column.
//!
//! serde_yaml forgets positions, and diagnostics need them for values, not just
//! for syntax errors; so the tree is built from yaml-rust2's event stream,
//! which marks every event. Anchors and aliases are resolved by copying the
//! anchored node (with its own position, where the definition is).

use std::sync::Arc;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::model::Span;

/// What a node holds.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// A scalar; `quoted` when written in quotes (so `"yes"` stays a string).
    Scalar {
        /// The text.
        value: String,
        /// Whether it was quoted or a block scalar.
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
        matches!(&self.kind, NodeKind::Scalar { value, quoted: false } if value.is_empty() || value == "~" || value == "null")
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

/// A syntax error, positioned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// Where.
    pub span: Span,
    /// What.
    pub message: String,
}

struct Builder {
    file: Arc<str>,
    /// Lines before the text's first (it is cut from a longer file).
    line_offset: u32,
    stack: Vec<(Node, Option<usize>)>,
    /// A mapping's pending key, per open mapping (parallel to `stack`).
    keys: Vec<Option<Node>>,
    anchors: Vec<(usize, Node)>,
    docs: Vec<Node>,
    error: Option<SyntaxError>,
}

impl Builder {
    fn span(&self, m: Marker) -> Span {
        // yaml-rust2 lines are 1-based, columns 0-based.
        Span {
            file: self.file.clone(),
            line: (m.line() as u32).saturating_add(self.line_offset),
            column: m.col() as u32 + 1,
        }
    }

    fn push_value(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.push((anchor, node.clone()));
        }
        let Some((parent, _)) = self.stack.last_mut() else {
            self.docs.push(node);
            return;
        };
        match &mut parent.kind {
            NodeKind::Seq(items) => items.push(node),
            NodeKind::Map(entries) => {
                // `keys` is pushed and popped together with `stack`, so it has an entry here.
                let slot = self.keys.last_mut().expect("keys parallel to stack");
                match slot.take() {
                    None => *slot = Some(node),
                    Some(k) => entries.push((k, node)),
                }
            }
            NodeKind::Scalar { .. } => {}
        }
    }

    fn close(&mut self) {
        if let Some((node, anchor)) = self.stack.pop() {
            self.keys.pop();
            self.push_value(node, anchor.unwrap_or(0));
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let span = self.span(mark);
        match ev {
            Event::Scalar(value, style, anchor, _) => {
                let quoted = style != TScalarStyle::Plain;
                self.push_value(
                    Node {
                        kind: NodeKind::Scalar { value, quoted },
                        span,
                    },
                    anchor,
                );
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push((
                    Node {
                        kind: NodeKind::Seq(Vec::new()),
                        span,
                    },
                    Some(anchor),
                ));
                self.keys.push(None);
            }
            Event::MappingStart(anchor, _) => {
                self.stack.push((
                    Node {
                        kind: NodeKind::Map(Vec::new()),
                        span,
                    },
                    Some(anchor),
                ));
                self.keys.push(None);
            }
            Event::SequenceEnd | Event::MappingEnd => self.close(),
            Event::Alias(id) => match self.anchors.iter().rev().find(|(a, _)| *a == id) {
                Some((_, n)) => {
                    let n = n.clone();
                    self.push_value(n, 0);
                }
                None => {
                    if self.error.is_none() {
                        self.error = Some(SyntaxError {
                            span,
                            message: "alias to an unknown anchor".into(),
                        });
                    }
                }
            },
            _ => {}
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
    let mut b = Builder {
        file: file.clone(),
        line_offset: first_line.saturating_sub(1),
        stack: Vec::new(),
        keys: Vec::new(),
        anchors: Vec::new(),
        docs: Vec::new(),
        error: None,
    };
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut b, true) {
        let m = e.marker();
        return Err(SyntaxError {
            span: b.span(*m),
            message: e.info().to_string(),
        });
    }
    match b.error {
        Some(e) => Err(e),
        None => Ok(b.docs),
    }
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
        assert!(e.span.line >= 1);
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let f: Arc<str> = "t.yaml".into();
        let text = "[".repeat(100_000);
        let _ = parse(&f, &text);
        let text = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
        let _ = parse(&f, &text);
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
}

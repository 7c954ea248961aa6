//! Policy texts built by a program, and what the loader must do with any
//! of them: shared by the `policy_yaml` fuzz target
//! (`fuzz/fuzz_targets/policy_yaml.rs`) and `tests/fuzz_regressions.rs`,
//! which replays the inputs it found and runs generated programs.
//!
//! Random bytes rarely make deep or aliased YAML; this reads its input as a
//! program whose instructions open and close block and flow collections,
//! put anchors and aliases, tags, comments, document markers and odd
//! characters, and repeat an instruction thousands of times, so a few bytes
//! make 100,000 levels of nesting or a billion laughs. [`check`] then
//! loads the text and holds the loader to its limits.

use std::fmt::Write as _;

use palisade_policy::limits::{ALIAS_ALLOWANCE, ALIAS_RATIO, MAX_DEPTH};
use palisade_policy::yaml::{Node, NodeKind};
use palisade_policy::{MemorySource, load};

/// What is open where the next node goes.
#[derive(Clone, Copy, PartialEq)]
enum Open {
    BlockSeq { indent: usize },
    BlockMap { indent: usize },
    FlowSeq { first: bool },
    FlowMap { first: bool },
}

/// Characters a program may drop anywhere: some the grammar refuses, some
/// it allows but the loader does not, some harmless.
const ODD: &[char] = &[
    '\0', '\u{1}', '\u{1b}', '\u{7f}', '\u{85}', '\u{9b}', '\r', '\t', '\u{feff}', '\u{202e}', '\u{2066}', '\u{2028}',
    '\u{200b}', '\u{a0}', '\u{fffe}', 'é', '日', '#', ':', '"', '\'', '&', '*', '!', '%', '|', '>', '-', '?', ',', '[',
    ']', '{', '}', ' ', '\n',
];

/// Scalars a program may write (quoted ones with escapes that make control
/// and invisible characters after parsing).
const SCALARS: &[&str] = &[
    "x",
    "any",
    "10.0.0.1/8",
    "tcp/443",
    "\"a\\u202Eb\"",
    "\"\\0\"",
    "\"\\e[2J\"",
    "'q'",
    "12345678901234567890123456",
    "~",
    "|\n  block\n",
    "allow",
    "\"\\u200B\"",
];

const TAGS: &[&str] = &["!!str ", "!!binary ", "!!int ", "!x ", "!!seq ", "!!map ", "! "];

/// The most instructions a program runs (repeats included), so a short
/// input cannot ask for a text of gigabytes.
const MAX_STEPS: usize = 20_000;

/// The longest text a program writes: it stops there.
const MAX_TEXT: usize = 1 << 20;

/// Block collections deeper than this are written as flow ones, so the
/// indentation (and the text) does not grow with the square of the depth.
const MAX_INDENT: usize = 2 * (MAX_DEPTH + 16);

/// Build the text `program` describes.
pub fn build(program: &[u8]) -> String {
    let mut b = Build {
        out: String::new(),
        open: Vec::new(),
        anchors: 0,
        keys: 0,
        pending_prefix: String::new(),
    };
    let mut steps = 0;
    let mut i = 0;
    while i < program.len() && steps < MAX_STEPS && b.out.len() < MAX_TEXT {
        let op = program[i];
        let arg = program.get(i + 1).copied().unwrap_or(0);
        i += 1;
        if op & 0xf0 == 0xf0 {
            // Repeat the next instruction (op's low bits × 256 + arg) + 1 times.
            i += 1;
            let times = ((usize::from(op & 0x0f) << 8) | usize::from(arg)) + 1;
            let (Some(&next), next_arg) = (program.get(i), program.get(i + 1).copied().unwrap_or(0)) else {
                break;
            };
            i += 2;
            for _ in 0..times {
                if steps >= MAX_STEPS || b.out.len() >= MAX_TEXT {
                    break;
                }
                b.step(next, next_arg);
                steps += 1;
            }
        } else {
            i += usize::from(b.step(op, arg));
            steps += 1;
        }
    }
    b.out
}

struct Build {
    out: String,
    open: Vec<Open>,
    anchors: usize,
    keys: usize,
    /// An anchor or tag to write before the next node.
    pending_prefix: String,
}

impl Build {
    /// Run one instruction; whether it used its argument.
    fn step(&mut self, op: u8, arg: u8) -> bool {
        match op % 12 {
            0 => self.node_start(|b| b.open_block_seq()),
            1 => self.node_start(|b| b.open_block_map()),
            2 => self.node_start(|b| {
                b.out.push('[');
                b.open.push(Open::FlowSeq { first: true });
            }),
            3 => self.node_start(|b| {
                b.out.push('{');
                b.open.push(Open::FlowMap { first: true });
            }),
            4 => self.close(),
            5 => {
                let s = SCALARS[usize::from(arg) % SCALARS.len()];
                self.node_start(|b| b.out.push_str(s));
                return true;
            }
            6 => {
                self.pending_prefix.push_str(&format!("&a{} ", self.anchors));
                self.anchors += 1;
            }
            7 => {
                // One of the latest anchors written (arg 0: the last, which
                // may still be open), or one never defined.
                let n = self.anchors.checked_sub(1 + usize::from(arg % 4)).unwrap_or(99);
                self.node_start(|b| {
                    let _ = write!(b.out, "*a{n}");
                });
                return true;
            }
            8 => {
                self.pending_prefix.push_str(TAGS[usize::from(arg) % TAGS.len()]);
                return true;
            }
            9 => {
                self.out.push(ODD[usize::from(arg) % ODD.len()]);
                return true;
            }
            10 => self.out.push_str(" # a comment\n"),
            _ => {
                // Back to the top: a new document, or the rest of this one.
                self.open.clear();
                self.out.push_str(if arg & 1 == 0 { "\n---\n" } else { "\n" });
                return true;
            }
        }
        false
    }

    /// Where the next node goes, written: a new entry of the open collection.
    fn entry(&mut self) {
        if let Some(Open::FlowSeq { first } | Open::FlowMap { first }) = self.open.last_mut()
            && !std::mem::replace(first, false)
        {
            self.out.push_str(", ");
        }
        match self.open.last().copied() {
            None | Some(Open::FlowSeq { .. }) => {}
            Some(Open::BlockSeq { indent }) => {
                self.newline(indent);
                self.out.push_str("- ");
            }
            Some(Open::BlockMap { indent }) => {
                self.newline(indent);
                self.key();
            }
            Some(Open::FlowMap { .. }) => self.key(),
        }
    }

    fn key(&mut self) {
        let _ = write!(self.out, "k{}: ", self.keys);
        self.keys += 1;
    }

    fn newline(&mut self, indent: usize) {
        if !self.out.is_empty() && !self.out.ends_with('\n') {
            self.out.push('\n');
        }
        self.out.extend(std::iter::repeat_n(' ', indent));
    }

    fn node_start(&mut self, write: impl FnOnce(&mut Build)) {
        self.entry();
        let prefix = std::mem::take(&mut self.pending_prefix);
        self.out.push_str(&prefix);
        write(self);
    }

    /// Whether a collection opened now is a flow one: inside a flow
    /// collection, or past [`MAX_INDENT`].
    fn in_flow(&self) -> bool {
        match self.open.last() {
            Some(Open::FlowSeq { .. } | Open::FlowMap { .. }) => true,
            Some(Open::BlockSeq { indent } | Open::BlockMap { indent }) => *indent >= MAX_INDENT,
            None => false,
        }
    }

    /// A block collection's entries go on lines of their own, deeper than
    /// the one it is in; inside a flow collection it is a flow one.
    fn child_indent(&self) -> usize {
        match self.open.last() {
            Some(Open::BlockSeq { indent } | Open::BlockMap { indent }) => indent + 2,
            _ => 0,
        }
    }

    fn open_block_seq(&mut self) {
        if self.in_flow() {
            self.out.push('[');
            self.open.push(Open::FlowSeq { first: true });
        } else {
            let indent = self.child_indent();
            self.open.push(Open::BlockSeq { indent });
        }
    }

    fn open_block_map(&mut self) {
        if self.in_flow() {
            self.out.push('{');
            self.open.push(Open::FlowMap { first: true });
        } else {
            let indent = self.child_indent();
            self.open.push(Open::BlockMap { indent });
        }
    }

    fn close(&mut self) {
        match self.open.pop() {
            Some(Open::FlowSeq { .. }) => self.out.push(']'),
            Some(Open::FlowMap { .. }) => self.out.push('}'),
            _ => {}
        }
    }
}

/// Nodes in a tree and its depth in collections, walked without recursion.
fn measure(docs: &[Node]) -> (u64, usize) {
    let mut nodes = 0u64;
    let mut deepest = 0;
    let mut todo: Vec<(&Node, usize)> = docs.iter().map(|d| (d, 0)).collect();
    while let Some((n, depth)) = todo.pop() {
        nodes += 1;
        match &n.kind {
            NodeKind::Scalar { .. } => deepest = deepest.max(depth),
            NodeKind::Seq(items) => {
                deepest = deepest.max(depth + 1);
                todo.extend(items.iter().map(|i| (i, depth + 1)));
            }
            NodeKind::Map(entries) => {
                deepest = deepest.max(depth + 1);
                for (k, v) in entries {
                    todo.push((k, depth + 1));
                    todo.push((v, depth + 1));
                }
            }
        }
    }
    (nodes, deepest)
}

/// Whether `c` would move an operator's cursor or reorder what is shown.
fn raw(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// Load `text` and check what the loader promises for any text: no panic
/// (the caller sees one), every diagnostic inside the text, the tree within
/// the depth limit and what aliases may copy, diagnostics printed escaped
/// and of bounded size.
pub fn check(text: &str) -> Result<(), String> {
    let loaded = load(&MemorySource::new().with("p.yaml", text)).map_err(|e| e.to_string())?;
    // Positions: lines as the loader counts them (at LF), columns within
    // the line or just past its end (a missing value is reported there).
    let shown = palisade_policy::chars::strip_bom(text);
    let lines: Vec<&str> = shown.split('\n').collect();
    for d in &loaded.diagnostics {
        let Some(line) = lines.get((d.line as usize).wrapping_sub(1)) else {
            return Err(format!("{d}: line {} of {}", d.line, lines.len()));
        };
        let width = line.chars().count() + 1;
        if d.column == 0 || d.column as usize > width {
            return Err(format!("{d}: column {} of a line of {width}", d.column));
        }
    }
    let out = loaded.render();
    if let Some(c) = out.chars().find(|&c| raw(c)) {
        return Err(format!("{:?} printed raw", c));
    }
    let most = loaded.diagnostics.len() * 2_000;
    if out.len() > most {
        return Err(format!(
            "{} bytes of diagnostics for {}",
            out.len(),
            loaded.diagnostics.len()
        ));
    }
    // The tree itself: within the depth limit, and no bigger than the
    // nodes the text can write (fewer than two a byte) and what aliases may
    // copy on top.
    if palisade_policy::chars::check_file(shown).is_ok()
        && let Ok(docs) = palisade_policy::yaml::parse(&"p.yaml".into(), shown)
    {
        let (nodes, depth) = measure(&docs);
        if depth > MAX_DEPTH {
            return Err(format!("a tree {depth} deep"));
        }
        let written = 2 * shown.len() as u64 + 2;
        let bound = written + ALIAS_ALLOWANCE + ALIAS_RATIO * written;
        if nodes > bound {
            return Err(format!("{nodes} nodes from {} bytes", shown.len()));
        }
    }
    Ok(())
}

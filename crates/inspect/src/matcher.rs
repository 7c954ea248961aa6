//! Running one buffer's payload keywords against data.
//!
//! The keywords of a buffer form a [`Program`]: contents, pcres, isdataat
//! and bsize in rule order. Placement follows the rule language: `offset`
//! counts from the start of the data and `depth` from the offset, `distance` and `within`
//! from the end of the previous match in the same buffer (`within` from
//! there plus `distance`), a negated content must be absent from its
//! window, `endswith` ties the match to the end of the data. When a later
//! keyword fails and depends on the position of an earlier match, the earlier
//! content or pcre is tried again at its next occurrence; the total number of
//! steps one evaluation may take is bounded (`budget`), so a rule built to
//! backtrack cannot make a packet cost more than a fixed amount of work.
//!
//! Stream data comes with an `origin`: the bytes before it were inspected
//! already and are there only so a pattern cut across segments is still
//! found. Absolute positions (`offset`, `depth`, `startswith`, absolute
//! `isdataat`) count from the origin, an unanchored content may start before
//! it, and a match must use at least one byte after it, so data already
//! inspected never matches twice.

use memchr::memmem;

use crate::rules::{Content, Pcre, Step, UintMatch};

/// Steps one evaluation of a program may take before it gives up (no match).
pub const DEFAULT_BUDGET: u32 = 3000;

/// A content search.
#[derive(Debug, Clone)]
enum Searcher {
    Exact(Box<memmem::Finder<'static>>),
    /// Lowercased needle; compared ASCII case-insensitively.
    NoCase(Vec<u8>),
}

impl Searcher {
    fn new(pattern: &[u8], nocase: bool) -> Self {
        if nocase {
            Searcher::NoCase(pattern.to_ascii_lowercase())
        } else {
            Searcher::Exact(Box::new(memmem::Finder::new(pattern).into_owned()))
        }
    }

    fn find(&self, hay: &[u8]) -> Option<usize> {
        match self {
            Searcher::Exact(f) => f.find(hay),
            Searcher::NoCase(needle) => find_nocase(hay, needle),
        }
    }
}

/// ASCII case-insensitive search for a lowercased needle.
fn find_nocase(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    if hay.len() < needle.len() {
        return None;
    }
    let last_start = hay.len() - needle.len();
    let upper = first.to_ascii_uppercase();
    let mut at = 0;
    while at <= last_start {
        let rel = if upper == first {
            memchr::memchr(first, &hay[at..=last_start])?
        } else {
            memchr::memchr2(first, upper, &hay[at..=last_start])?
        };
        let pos = at + rel;
        if hay[pos + 1..pos + needle.len()].eq_ignore_ascii_case(rest) {
            return Some(pos);
        }
        at = pos + 1;
    }
    None
}

#[derive(Debug, Clone)]
struct ContentOp {
    searcher: Searcher,
    len: usize,
    negated: bool,
    offset: usize,
    depth: Option<usize>,
    distance: Option<i64>,
    within: Option<usize>,
    endswith: bool,
    relative: bool,
}

#[derive(Debug, Clone)]
enum Op {
    Content(ContentOp),
    Pcre(Box<Pcre>),
    IsDataAt {
        negated: bool,
        offset: usize,
        relative: bool,
    },
    Bsize(UintMatch),
}

/// One buffer's payload keywords, ready to run.
#[derive(Debug, Clone)]
pub struct Program {
    ops: Vec<Op>,
    /// Whether a relative keyword follows op i.
    next_relative: Vec<bool>,
    /// Whether any op is a positive content or pcre (only then can a match "use" new bytes).
    has_positive: bool,
}

/// How an evaluation step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Res {
    Match,
    NoMatch,
    /// No match, and retrying earlier keywords cannot help.
    Discontinue,
}

impl Program {
    /// Compiles a buffer's steps.
    pub fn new(steps: &[Step]) -> Program {
        let ops: Vec<Op> = steps
            .iter()
            .map(|s| match s {
                Step::Content(c) => Op::Content(content_op(c)),
                Step::Pcre(p) => Op::Pcre(Box::new(p.clone())),
                Step::IsDataAt {
                    negated,
                    offset,
                    relative,
                } => Op::IsDataAt {
                    negated: *negated,
                    offset: *offset as usize,
                    relative: *relative,
                },
                Step::Bsize(m) => Op::Bsize(*m),
            })
            .collect();
        let next_relative = (0..steps.len())
            .map(|i| steps.get(i + 1).is_some_and(Step::is_relative))
            .collect();
        let has_positive = steps.iter().any(|s| match s {
            Step::Content(c) => !c.negated,
            Step::Pcre(p) => !p.negated,
            _ => false,
        });
        Program {
            ops,
            next_relative,
            has_positive,
        }
    }

    /// Whether the program matches `data`, whose first `origin` bytes were
    /// inspected before (0 for buffers seen whole). `budget` is decremented per
    /// step; at zero the evaluation stops without a match.
    pub fn matches(&self, data: &[u8], origin: usize, budget: &mut u32) -> bool {
        let origin = origin.min(data.len());
        let need_new = origin > 0 && self.has_positive;
        // An empty buffer still exists (bsize:0, negated contents).
        self.run(0, data, origin, origin, 0, need_new, budget) == Res::Match
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        i: usize,
        data: &[u8],
        origin: usize,
        prev: usize,
        max_end: usize,
        need_new: bool,
        budget: &mut u32,
    ) -> Res {
        let Some(op) = self.ops.get(i) else {
            return if !need_new || max_end > origin {
                Res::Match
            } else {
                Res::NoMatch
            };
        };
        if *budget == 0 {
            return Res::Discontinue;
        }
        *budget -= 1;
        match op {
            Op::Content(c) => self.content(i, c, data, origin, prev, max_end, need_new, budget),
            Op::Pcre(p) => self.pcre(i, p, data, origin, prev, max_end, need_new, budget),
            Op::IsDataAt {
                negated,
                offset,
                relative,
            } => {
                let has = if *relative {
                    prev + offset <= data.len()
                } else {
                    origin + offset < data.len()
                };
                match (has, negated) {
                    (true, false) | (false, true) => self.run(i + 1, data, origin, prev, max_end, need_new, budget),
                    // More data cannot appear by moving an earlier match further on.
                    (false, false) => Res::Discontinue,
                    (true, true) if *relative => Res::NoMatch,
                    (true, true) => Res::Discontinue,
                }
            }
            Op::Bsize(m) => {
                if m.matches(data.len() as u64) {
                    self.run(i + 1, data, origin, prev, max_end, need_new, budget)
                } else {
                    Res::Discontinue
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn content(
        &self,
        i: usize,
        c: &ContentOp,
        data: &[u8],
        origin: usize,
        prev: usize,
        max_end: usize,
        need_new: bool,
        budget: &mut u32,
    ) -> Res {
        let len = data.len();
        let (start, mut end) = if c.relative {
            let d = c.distance.unwrap_or(0);
            let start = (prev as i64 + d).max(0) as usize;
            let end = match c.within {
                Some(w) => (prev as i64 + d + w as i64).max(0) as usize,
                None => len,
            };
            (start, end)
        } else if c.offset == 0 && c.depth.is_none() {
            // Unanchored: may start in the already-inspected bytes.
            (0, len)
        } else {
            // depth counts from offset.
            (origin + c.offset, c.depth.map_or(len, |d| origin + c.offset + d))
        };
        end = end.min(len);
        let mut from = start;
        loop {
            if *budget == 0 {
                return Res::Discontinue;
            }
            let found = if from > end || end - from < c.len || (c.endswith && end < len) {
                None
            } else {
                c.searcher.find(&data[from..end]).map(|p| from + p)
            };
            if c.negated {
                return match found {
                    None => self.run(i + 1, data, origin, prev, max_end, need_new, budget),
                    Some(pos) if c.endswith && pos + c.len != len => {
                        // Present, but not at the end: a negated endswith holds.
                        self.run(i + 1, data, origin, prev, max_end, need_new, budget)
                    }
                    Some(_) if !c.relative && !self.next_relative[i] => Res::Discontinue,
                    Some(_) => Res::NoMatch,
                };
            }
            let Some(pos) = found else {
                return if c.relative { Res::NoMatch } else { Res::Discontinue };
            };
            let match_end = pos + c.len;
            if !c.endswith || match_end == len {
                let r = self.run(i + 1, data, origin, match_end, max_end.max(match_end), need_new, budget);
                match r {
                    Res::Match | Res::Discontinue => return r,
                    Res::NoMatch => {
                        let stale = need_new && match_end <= origin;
                        if !self.next_relative[i] && !stale {
                            return Res::Discontinue;
                        }
                    }
                }
            }
            *budget = budget.saturating_sub(1);
            from = pos + 1;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn pcre(
        &self,
        i: usize,
        p: &Pcre,
        data: &[u8],
        origin: usize,
        prev: usize,
        max_end: usize,
        need_new: bool,
        budget: &mut u32,
    ) -> Res {
        let start = if p.relative { prev } else { origin };
        if start > data.len() {
            return if p.negated {
                self.run(i + 1, data, origin, prev, max_end, need_new, budget)
            } else {
                Res::NoMatch
            };
        }
        let mut from = start;
        loop {
            let found = p.find(&data[from..]).map(|(s, e)| (from + s, from + e));
            if p.negated {
                return match found {
                    None => self.run(i + 1, data, origin, prev, max_end, need_new, budget),
                    Some(_) => Res::NoMatch,
                };
            }
            let Some((s, e)) = found else {
                return Res::NoMatch;
            };
            let r = self.run(i + 1, data, origin, e, max_end.max(e), need_new, budget);
            match r {
                Res::Match | Res::Discontinue => return r,
                Res::NoMatch => {
                    let stale = need_new && e <= origin;
                    if (!self.next_relative[i] && !stale) || p.anchored || s + 1 > data.len() {
                        return Res::NoMatch;
                    }
                }
            }
            if *budget == 0 {
                return Res::Discontinue;
            }
            *budget -= 1;
            from = s + 1;
        }
    }
}

fn content_op(c: &Content) -> ContentOp {
    ContentOp {
        searcher: Searcher::new(&c.pattern, c.nocase),
        len: c.pattern.len(),
        negated: c.negated,
        offset: c.offset as usize,
        depth: c.depth.map(|d| d as usize),
        distance: c.distance.map(i64::from),
        within: c.within.map(|w| w as usize),
        endswith: c.endswith,
        relative: c.is_relative(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Buffer, RuleContext, parse_rule};

    /// The program of `buffer` in a rule whose options are `opts`.
    fn program(opts: &str, buffer: Buffer) -> Program {
        let text = format!("alert tcp any any -> any any ({opts} sid:1;)");
        let rule = parse_rule(&text, &RuleContext::default()).unwrap_or_else(|e| panic!("{text}: {e}"));
        Program::new(&rule.buffer(buffer).expect("buffer used").steps)
    }

    fn check(opts: &str, data: &[u8]) -> bool {
        let mut budget = DEFAULT_BUDGET;
        program(opts, Buffer::Payload).matches(data, 0, &mut budget)
    }

    /// Each keyword's placement semantics, one table (Suricata's documented meaning).
    #[test]
    fn payload_keyword_semantics() {
        let cases: &[(&str, &[u8], bool)] = &[
            // content, nocase
            (r#"content:"abc";"#, b"xxabcxx", true),
            (r#"content:"ABC";"#, b"xxabcxx", false),
            (r#"content:"ABC"; nocase;"#, b"xxabcxx", true),
            (r#"content:"|00 ff|";"#, b"\x01\x00\xff", true),
            // offset / depth: absolute window [offset, depth)
            (r#"content:"abc"; offset:2;"#, b"xxabc", true),
            (r#"content:"abc"; offset:3;"#, b"xxabc", false),
            (r#"content:"abc"; depth:5;"#, b"xxabc", true),
            (r#"content:"abc"; depth:4;"#, b"xxabc", false),
            (r#"content:"abc"; offset:1; depth:4;"#, b"xabcx", true),
            // depth counts from offset
            (r#"content:"abc"; offset:2; depth:3;"#, b"xxabc", true),
            (
                r#"content:"|01 00 00 01|"; offset:2; depth:4;"#,
                b"\x8f\xcf\x01\x00\x00\x01\x00",
                true,
            ),
            (r#"content:"abc"; offset:2; depth:3;"#, b"xxxabc", false),
            // startswith / endswith
            (r#"content:"GET"; startswith;"#, b"GET /", true),
            (r#"content:"GET"; startswith;"#, b" GET /", false),
            (r#"content:"exe"; endswith;"#, b"a.exe", true),
            (r#"content:"exe"; endswith;"#, b"a.exe ", false),
            (r#"content:"ab"; endswith;"#, b"abxab", true),
            (r#"content:"data|0a 0a|"; startswith; endswith;"#, b"data\n\n", true),
            (r#"content:"data|0a 0a|"; startswith; endswith;"#, b"data\n\nx", false),
            // distance / within: relative to the previous match's end
            (r#"content:"a"; content:"b"; distance:2;"#, b"axxb", true),
            (r#"content:"a"; content:"b"; distance:3;"#, b"axxb", false),
            (r#"content:"a"; content:"b"; within:3;"#, b"axxb", true),
            (r#"content:"a"; content:"b"; within:2;"#, b"axxb", false),
            (r#"content:"a"; content:"b"; distance:1; within:2;"#, b"axxb", true),
            (r#"content:"a"; content:"b"; distance:1; within:1;"#, b"axxb", false),
            (r#"content:"b"; content:"a"; distance:-4;"#, b"axxb", true),
            (r#"content:"b"; content:"a"; distance:-3;"#, b"axxb", false),
            // backtracking: the first "a" fails, the second works
            (r#"content:"a"; content:"b"; within:1;"#, b"axab", true),
            (
                r#"content:"this"; content:"is"; within:6; content:"big"; within:8; content:"string"; within:8;"#,
                b"/now_this_is_is_big_big_string_now",
                true,
            ),
            // negation
            (r#"content:!"foo";"#, b"bar", true),
            (r#"content:!"foo";"#, b"afoo", false),
            (r#"content:"a"; content:!"b"; within:2;"#, b"axb", false),
            (r#"content:"a"; content:!"b"; within:2;"#, b"axxb", true),
            (r#"content:!".google.com"; endswith;"#, b"www.google.com", false),
            (r#"content:!".google.com"; endswith;"#, b"www.google.com.evil", true),
            (r#"content:!".google.com"; endswith;"#, b"example.com", true),
            // isdataat
            (r#"content:"fix_this"; isdataat:4,relative;"#, b"fix_this1234", true),
            (r#"content:"fix_this"; isdataat:5,relative;"#, b"fix_this1234", false),
            (
                r#"content:"fix_this"; isdataat:!10,relative;"#,
                b"fix_this_and_yes_fix_this_now",
                true,
            ),
            (r#"isdataat:3;"#, b"abcd", true),
            (r#"isdataat:4;"#, b"abcd", false),
            (r#"isdataat:!4;"#, b"abcd", true),
            // pcre
            (r#"pcre:"/^GET \/[a-z]+/";"#, b"GET /abc", true),
            (r#"content:"GET"; pcre:"/^ \//R";"#, b"GET /", true),
            (r#"content:"GET"; pcre:"/^\//R";"#, b"GET /", false),
            (r#"pcre:!"/evil/i";"#, b"good", true),
            (r#"content:"a"; pcre:"/^b/R";"#, b"acab", true),
        ];
        for (opts, data, want) in cases {
            assert_eq!(
                check(opts, data),
                *want,
                "{opts} on {:?}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn bsize_counts_the_whole_buffer() {
        let p = program(r#"http.host; bsize:<3;"#, Buffer::HttpHost);
        let mut b = DEFAULT_BUDGET;
        assert!(p.matches(b"ab", 0, &mut b));
        assert!(!p.matches(b"abc", 0, &mut b));
        let p = program(r#"http.user_agent; bsize:0;"#, Buffer::HttpUserAgent);
        assert!(p.matches(b"", 0, &mut b));
        let p = program(r#"dns.query; content:"google.com"; bsize:<=20;"#, Buffer::DnsQuery);
        assert!(p.matches(b"google.com", 0, &mut b));
    }

    #[test]
    fn stream_origin_finds_split_patterns_once() {
        let p = program(r#"content:"EVIL";"#, Buffer::Payload);
        let mut b = DEFAULT_BUDGET;
        // "EV" was inspected before, "IL" is new: found.
        assert!(p.matches(b"xxEVIL", 4, &mut b));
        // Entirely in the old part: not again.
        assert!(!p.matches(b"EVILxx", 4, &mut b));
        // Old occurrence, then a new one.
        assert!(p.matches(b"EVILxxEVIL", 4, &mut b));
        // Anchored contents count from the origin.
        let p = program(r#"content:"SMB"; depth:8;"#, Buffer::Payload);
        assert!(p.matches(b"old_bytes\0\0\0\0SMB", 9, &mut b));
        assert!(!p.matches(b"SMBold_bytes", 9, &mut b));
    }

    #[test]
    fn the_budget_bounds_backtracking() {
        // Every "a" is a candidate and the last keyword never matches.
        let p = program(
            r#"content:"a"; content:"a"; distance:0; content:"a"; distance:0; content:"b"; distance:0;"#,
            Buffer::Payload,
        );
        let data = vec![b'a'; 2000];
        let mut b = 500;
        assert!(!p.matches(&data, 0, &mut b));
        assert_eq!(b, 0, "the budget was used up, not exceeded");
    }

    #[test]
    fn nocase_search() {
        assert_eq!(find_nocase(b"xxHeLLo", b"hello"), Some(2));
        assert_eq!(find_nocase(b"hell", b"hello"), None);
        assert_eq!(find_nocase(b"x1y", b"1y"), Some(1));
        assert_eq!(find_nocase(b"", b"a"), None);
    }
}

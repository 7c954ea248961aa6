//! Cutting a policy file's `vms:` list into one text per VM.
//!
//! At datacenter scale the inventory is one long list, and a new policy
//! version usually changes a handful of its entries; parsing 50,000 VMs of
//! YAML again takes about half a second. [`split_vms`] cuts a file into a
//! *skeleton* (the file with the list's items blanked, newlines kept, so
//! every position in it holds) and the items' texts with their first lines,
//! so that [`crate::load::Loader`] can parse each item on its own and reuse
//! what it built from an item whose text it has seen before.
//!
//! The cut is conservative: it is made only where the lines say plainly
//! where each item starts and ends: one `vms:` key at column 1 with nothing
//! after it, items that start with `-` at one indentation, and every other
//! line of an item indented deeper, blank or a comment. Anything else
//! (document markers, directives, lone carriage returns, a byte-order mark,
//! a second `vms:`, tabs in the list's indentation) and the file is parsed
//! whole. The loader checks what lines cannot show: the skeleton must parse
//! to one mapping with `vms` as its key at that line and nothing as its
//! value, and each item to a list of exactly one entry; otherwise, too, the
//! file is parsed whole, so errors are always reported as a whole parse
//! reports them.

/// A file cut at its `vms:` list.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Split<'a> {
    /// The file with every item's lines emptied (their newlines kept).
    pub skeleton: String,
    /// The 1-based line of the `vms:` key.
    pub key_line: u32,
    /// The items, in order.
    pub items: Vec<Item<'a>>,
}

/// One entry of the list: its lines, verbatim.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Item<'a> {
    /// The 1-based line it starts on.
    pub line: u32,
    /// Its lines, newlines included (the indentation too, so columns hold).
    pub text: &'a str,
}

/// Cut `text` at its `vms:` list, or `None` when it has none or the cut
/// would not be plain (see the module's documentation).
pub(crate) fn split_vms(text: &str) -> Option<Split<'_>> {
    let bytes = text.as_bytes();
    // yaml-rust2 breaks lines at a lone CR as well; here lines end at LF.
    let lone_cr = memchr::memchr_iter(b'\r', bytes).any(|i| bytes.get(i + 1) != Some(&b'\n'));
    if text.starts_with('\u{feff}') || lone_cr {
        return None;
    }
    // Byte ranges of the lines, each with its newline.
    let mut lines: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    for i in memchr::memchr_iter(b'\n', bytes) {
        lines.push((start, i + 1));
        start = i + 1;
    }
    if start < bytes.len() {
        lines.push((start, bytes.len()));
    }
    let content = |l: usize| text[lines[l].0..lines[l].1].trim_end_matches(['\n', '\r']);

    let mut key = None;
    for l in 0..lines.len() {
        let c = content(l);
        if c.starts_with("---") || c.starts_with("...") || c.starts_with('%') {
            return None;
        }
        if is_vms_key(c) {
            if key.is_some() {
                return None;
            }
            key = Some(l);
        }
    }
    let key = key?;

    let mut l = key + 1;
    while l < lines.len() && is_blank_or_comment(content(l)) {
        l += 1;
    }
    if l >= lines.len() {
        return None;
    }
    let first = content(l);
    let indent = indentation(first)?;
    if !is_entry(&first[indent..]) {
        return None;
    }
    // (first line, line after the last) of each item.
    let mut ranges = Vec::new();
    let mut current = l;
    let mut end = lines.len();
    // Comments at the list's indentation or less just above an entry are
    // about it: they go with it, so that removing an entry and its comment
    // leaves the entry before unchanged. (Such a line cannot be part of a
    // block scalar of the entry before: that would be indented deeper.)
    let mut comment_above: Option<usize> = None;
    l += 1;
    while l < lines.len() {
        let c = content(l);
        if is_blank_or_comment(c) {
            let shallow_comment = c.trim_start_matches(' ').starts_with('#') && indentation(c)? <= indent;
            if shallow_comment {
                comment_above.get_or_insert(l);
            } else if !c.trim_start_matches(' ').is_empty() {
                comment_above = None;
            }
            l += 1;
            continue;
        }
        let ind = indentation(c)?;
        let above = comment_above.take();
        if ind > indent {
            l += 1;
            continue;
        }
        if ind == indent && is_entry(&c[ind..]) {
            let start = above.unwrap_or(l);
            ranges.push((current, start));
            current = start;
        } else if ind == 0 {
            end = l;
            break;
        } else {
            return None;
        }
        l += 1;
    }
    ranges.push((current, end));

    let after = lines.get(end).map_or(text.len(), |r| r.0);
    let before = lines[ranges[0].0].0;
    let mut skeleton = String::with_capacity(before + (end - ranges[0].0) + (text.len() - after));
    skeleton.push_str(&text[..before]);
    for &(a, b) in &ranges {
        for &(_, e) in &lines[a..b] {
            if bytes[e - 1] == b'\n' {
                skeleton.push('\n');
            }
        }
    }
    skeleton.push_str(&text[after..]);
    let items = ranges
        .iter()
        .map(|&(a, b)| Item {
            line: line_number(a),
            text: &text[lines[a].0..lines[b - 1].1],
        })
        .collect();
    Some(Split {
        skeleton,
        key_line: line_number(key),
        items,
    })
}

fn line_number(index: usize) -> u32 {
    u32::try_from(index + 1).unwrap_or(u32::MAX)
}

/// `vms:` at column 1, then nothing but spaces and perhaps a comment.
fn is_vms_key(line: &str) -> bool {
    line.strip_prefix("vms:").is_some_and(|rest| {
        let t = rest.trim_start_matches(' ');
        rest.is_empty() || (rest.starts_with(' ') && (t.is_empty() || t.starts_with('#')))
    })
}

fn is_blank_or_comment(line: &str) -> bool {
    let t = line.trim_start_matches(' ');
    t.is_empty() || t.starts_with('#')
}

/// Leading spaces; `None` when a tab (or any other blank) is among them.
fn indentation(line: &str) -> Option<usize> {
    let n = line.len() - line.trim_start_matches(' ').len();
    match line[n..].chars().next() {
        Some(c) if c.is_whitespace() => None,
        _ => Some(n),
    }
}

fn is_entry(rest: &str) -> bool {
    rest == "-" || rest.starts_with("- ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Skeleton, key line, and each item's (line, text).
    type Cut<'a> = (String, u32, Vec<(u32, &'a str)>);

    fn cut(text: &str) -> Option<Cut<'_>> {
        split_vms(text).map(|s| {
            (
                s.skeleton,
                s.key_line,
                s.items.iter().map(|i| (i.line, i.text)).collect(),
            )
        })
    }

    #[test]
    fn items_are_cut_at_their_dashes_and_positions_kept() {
        let text = "zones: [{ name: z, vlan: 10 }]\nvms:  # the VMs\n  - { name: a }\n  # about b\n  - name: b\n    tags:\n\n      t: x\n  -\n    name: c\ngroups: {}\n";
        let (skeleton, key, items) = cut(text).expect("cut");
        assert_eq!(key, 2);
        assert_eq!(
            items,
            vec![
                (3, "  - { name: a }\n"),
                (4, "  # about b\n  - name: b\n    tags:\n\n      t: x\n"),
                (9, "  -\n    name: c\n"),
            ]
        );
        assert_eq!(
            skeleton,
            "zones: [{ name: z, vlan: 10 }]\nvms:  # the VMs\n\n\n\n\n\n\n\n\ngroups: {}\n"
        );
        assert_eq!(skeleton.lines().count(), text.lines().count());
    }

    #[test]
    fn only_shallow_comments_go_with_the_entry_below() {
        let text = "vms:\n  - a: |+\n      x\n      # x too\n\n  # about b\n\n  - b\n";
        let (_, _, items) = cut(text).expect("cut");
        assert_eq!(
            items,
            vec![
                (2, "  - a: |+\n      x\n      # x too\n\n"),
                (6, "  # about b\n\n  - b\n")
            ]
        );
    }

    #[test]
    fn a_list_at_column_one_and_a_last_line_without_newline() {
        let (skeleton, key, items) = cut("vms:\n- { name: a }\n- { name: b }").expect("cut");
        assert_eq!(key, 1);
        assert_eq!(items, vec![(2, "- { name: a }\n"), (3, "- { name: b }")]);
        assert_eq!(skeleton, "vms:\n\n");
    }

    #[test]
    fn crlf_lines_are_cut_like_lf_lines() {
        let (skeleton, _, items) = cut("vms:\r\n  - { name: a }\r\nzones: []\r\n").expect("cut");
        assert_eq!(items, vec![(2, "  - { name: a }\r\n")]);
        assert_eq!(skeleton, "vms:\r\n\nzones: []\r\n");
    }

    #[test]
    fn anything_not_plain_is_left_whole() {
        for text in [
            "zones: []\n",
            "vms: []\n",
            "vms:\nzones: []\n",
            "vms: # c\n",
            "vms:\n  [a, b]\n",
            "vms:\n  - a\nvms:\n  - b\n",
            "---\nvms:\n  - a\n",
            "vms:\n  - a\n...\n",
            "%YAML 1.2\nvms:\n  - a\n",
            "\u{feff}vms:\n  - a\n",
            "vms:\n  - a\r  - b\n",
            "vms:\n\t- a\n",
            "vms:\n  - a\n \t- b\n",
            "vms:\n  - a\n - b\n",
            "vms:x\n  - a\n",
            "vms:#x\n  - a\n",
            "  vms:\n  - a\n",
        ] {
            assert_eq!(cut(text), None, "{text:?}");
        }
    }
}

//! Hostile policy text: structure and bytes an attacker (or an accident)
//! can put in a policy file, each refused with an error at its position,
//! none crashing the loader, none loading fewer rules than the file states.
//!
//! Diagnostic kinds are compared by their stable code, and the limits are
//! restated here (`tests/limits.rs` checks they are the library's), so
//! that these tests also build against the loader before the limits.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use palisade_policy::{Diagnostic, DirSource, Loaded, MemorySource, PolicySource, load};

/// Collections nested deeper than this are refused.
const MAX_DEPTH: usize = 64;
/// A policy file longer than this is refused.
const MAX_FILE_BYTES: u64 = 32 << 20;

const BASE: &str = "datacenter: { name: dc1, default: allow }\nzones: [{ name: web, vlan: 100 }]\n";

fn load_text(text: &str) -> Loaded {
    load(&MemorySource::new().with("p.yaml", text)).expect("a memory source reads")
}

/// `text` as `x.yaml`, after a `base.yaml` that declares the datacenter.
fn load_x(text: &str) -> Loaded {
    let src = MemorySource::new().with("base.yaml", BASE).with("x.yaml", text);
    load(&src).expect("a memory source reads")
}

/// Run `f` on a thread with a 256 KiB stack: a parser that recursed once
/// per level would overflow it long before the depth limit is reached.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(f)
        .expect("spawn")
        .join()
        .expect("the loader did not panic")
}

fn first_error(l: &Loaded) -> &Diagnostic {
    l.diagnostics
        .iter()
        .find(|d| d.is_error())
        .unwrap_or_else(|| panic!("no error in {:#?}", l.diagnostics))
}

fn expect_error(l: &Loaded, code: &str, line: u32, column: u32, what: &str) {
    let d = first_error(l);
    assert_eq!(
        (d.kind.code(), d.line, d.column),
        (code, line, column),
        "{what}: got {d} (all: {:#?})",
        l.diagnostics
    );
}

// ---- 1. nesting depth ------------------------------------------------------

/// (what, text, line, column of the collection one level too deep)
fn deep_cases() -> Vec<(&'static str, String, u32, u32)> {
    const N: usize = 100_000;
    let over = MAX_DEPTH as u32 + 1;
    // Block mappings nested one per line: the text grows with the square of
    // the depth, so this one stops just past the limit.
    let mut nested_maps = String::new();
    for i in 0..=MAX_DEPTH + 5 {
        nested_maps.push_str(&" ".repeat(i));
        nested_maps.push_str("a:\n");
    }
    nested_maps.push_str(&" ".repeat(MAX_DEPTH + 6));
    nested_maps.push_str("x\n");
    let mut seq_of_maps = String::new();
    for i in 0..=MAX_DEPTH {
        seq_of_maps.push_str(&" ".repeat(2 * i));
        seq_of_maps.push_str("- a:\n");
    }
    seq_of_maps.push_str(&" ".repeat(2 * MAX_DEPTH + 4));
    seq_of_maps.push_str("x\n");
    vec![
        ("block sequences", format!("{}x", "- ".repeat(N)), 1, 2 * over - 1),
        (
            "explicit-key block mappings",
            format!("{}x", "? ".repeat(N)),
            1,
            2 * over - 1,
        ),
        // yaml-rust2 marks a block mapping at its first key's `:`.
        ("block mappings, one per line", nested_maps, over, over + 1),
        // The level-k collection of `- a:` lines: odd levels are sequences
        // (line (k+1)/2, at the dash), even ones the mappings (at the key).
        // (yaml-rust2 marks a nested block sequence at its first entry, two
        // columns after the dash.)
        ("sequences of mappings", seq_of_maps, over.div_ceil(2), over + 2),
        // Inside flow collections the scanner looks ahead for a possible
        // key, and refuses the 256th open one before the parser has seen
        // the 65th: the error is there.
        ("flow sequences", "[".repeat(N), 1, 256),
        ("flow mappings", "{a: ".repeat(N), 1, 4 * 255 + 1),
        (
            "flow inside block",
            format!("{}{}", "- ".repeat(MAX_DEPTH - 2), "[".repeat(N)),
            1,
            2 * (MAX_DEPTH as u32 - 2) + 256,
        ),
        // The 256th is the 128th `{`, 5 columns per pair.
        ("flow mappings in flow sequences", "[{a: ".repeat(N), 1, 5 * 127 + 2),
        // Block collections hold the limit in flow ones too.
        (
            "a few flow levels deep in block ones",
            format!("{}{}x", "- ".repeat(MAX_DEPTH - 2), "[".repeat(3)),
            1,
            2 * (MAX_DEPTH as u32 - 2) + 3,
        ),
    ]
}

#[test]
fn deep_nesting_is_a_positioned_error_not_a_stack_overflow() {
    for (what, text, line, column) in deep_cases() {
        let loaded = on_small_stack(move || load_text(&text));
        expect_error(&loaded, "limit-exceeded", line, column, what);
        let d = first_error(&loaded);
        assert!(d.message.contains("64"), "{what}: {d}");
    }
}

#[test]
fn nesting_up_to_the_limit_is_accepted() {
    let text = format!("{}x", "- ".repeat(MAX_DEPTH));
    let loaded = on_small_stack(move || load_text(&text));
    // A bare list is not a policy file, but it is not too deep either.
    assert!(
        loaded.diagnostics.iter().all(|d| d.kind.code() != "limit-exceeded"),
        "{:#?}",
        loaded.diagnostics
    );
}

// ---- 2. aliases ------------------------------------------------------------

/// `a0: &a0 [x × 10]`, then `aN: &aN [*aN-1 × 10]`: level N holds 10^(N+1) leaves.
fn laughs(levels: usize) -> String {
    let mut t = format!("a0: &a0 [{}]\n", ["x"; 10].join(", "));
    for n in 1..levels {
        let prev = format!("*a{}", n - 1);
        t.push_str(&format!("a{n}: &a{n} [{}]\n", [prev.as_str(); 10].join(", ")));
    }
    t
}

#[test]
fn an_alias_bomb_is_refused_where_it_goes_off() {
    // Six levels are a million leaves (the old loader built them all, 100 MB).
    let loaded = load_text(&laughs(6));
    // Copied before line 4: a0's anchor 11, a1's aliases 10 × 11 and anchor
    // 111, a2's 10 × 111 and 1,111: 2,453. Written out: 19 nodes, so 10,190
    // may be copied; a3's seventh alias of 1,111 nodes is the first past it.
    expect_error(&loaded, "limit-exceeded", 4, 10 + 5 * 6, "billion laughs");
    assert!(
        first_error(&loaded).message.contains("alias"),
        "{}",
        first_error(&loaded)
    );
}

#[test]
fn a_large_file_cannot_copy_without_bound() {
    // 300,000 nodes written out would let aliases copy 3 million by the
    // ratio; the absolute bound stops them at a million.
    let pad = vec!["y"; 300_000].join(",");
    let a = vec!["x"; 999].join(",");
    let aliases = vec!["*a"; 1_100].join(",");
    let text = format!("pad: [{pad}]\na: &a [{a}]\nb: [{aliases}]\n");
    let loaded = load_text(&text);
    // Copied before `b`: the anchor, 1,000 nodes; each alias 1,000 more.
    expect_error(&loaded, "limit-exceeded", 3, 5 + 3 * 999, "copies past a million");
    assert!(
        first_error(&loaded).message.contains("1000000"),
        "{}",
        first_error(&loaded)
    );
}

#[test]
fn an_alias_cannot_nest_past_the_depth_limit() {
    let deep = |n: usize| format!("{}x{}", "[".repeat(n), "]".repeat(n));
    let text = format!("a: &d {}\nb: {}*d{}\n", deep(60), "[".repeat(10), "]".repeat(10));
    let loaded = on_small_stack(move || load_text(&text));
    expect_error(&loaded, "limit-exceeded", 2, 14, "alias under nesting");
}

#[test]
fn honest_anchors_stay_legal() {
    // One tag map shared by 5,000 VMs (as PyYAML writes a shared dict):
    // 15,000 nodes copied, beyond the fixed allowance but a small part of
    // what the file writes out.
    let mut t = format!("{BASE}vms:\n");
    for i in 0..5_000u32 {
        let tags = if i == 0 {
            "&t { tier: web }".to_string()
        } else {
            "*t".to_string()
        };
        t.push_str(&format!(
            "  - {{ name: vm{i}, uuid: 00000000-0000-4000-8000-{i:012x}, tags: {tags}, vnics: [{{ name: vm{i}.0, mac: \"02:00:00:00:{:02x}:{:02x}\", ips: [10.1.{}.{}], zone: web }}] }}\n",
            i >> 8,
            i & 0xff,
            i >> 8,
            i & 0xff
        ));
    }
    let loaded = load_text(&t);
    assert!(!loaded.has_errors(), "{}", loaded.render());
    assert_eq!(loaded.model.inventory.vms.len(), 5_000);
    assert!(
        loaded
            .model
            .inventory
            .vms
            .iter()
            .all(|v| v.tags.get("tier").map(String::as_str) == Some("web"))
    );
}

// ---- 3. bytes outside the grammar, file size -------------------------------

const DENY_ALL: &str = "rules:\n  datacenter:\n    - { id: deny-all, from: any, to: any, action: deny }\n";

/// (what, the line inserted before the deny-all rule, column of the bad character)
const BAD_CHARACTERS: &[(&str, &str, u32)] = &[
    ("NUL", "# a comment \0 here", 13),
    ("SOH", "# \u{1}", 3),
    ("ESC", "# \u{1b}[2J", 3),
    ("DEL", "#\u{7f}", 2),
    ("NEL (C1)", "# \u{85}", 3),
    ("CSI (C1)", "# \u{9b}", 3),
    ("right-to-left override", "# \u{202e} evil", 3),
    ("left-to-right isolate", "#\u{2066}", 2),
    ("line separator", "# \u{2028}", 3),
    ("paragraph separator", "# \u{2029}", 3),
    ("byte-order mark after the start", "# \u{feff}", 3),
    ("noncharacter U+FFFE", "# \u{fffe}", 3),
    ("noncharacter U+FFFF", "# \u{ffff}", 3),
    ("lone carriage return", "# old\rmac", 6),
];

#[test]
fn a_character_outside_the_grammar_is_an_error_where_it_is() {
    for (what, line, column) in BAD_CHARACTERS {
        let text = format!("{BASE}{line}\n{DENY_ALL}");
        let loaded = load_text(&text);
        // The old loader stopped at the NUL: 0 rules, no error, and with
        // `default: allow` every flow was allowed.
        expect_error(&loaded, "bad-character", 3, *column, what);
        // Shown escaped: nothing in the output moves the terminal's cursor
        // or reorders the text.
        let out = loaded.render();
        let raw = |c: char| {
            (c.is_control() && c != '\n')
                || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
        };
        assert!(!out.chars().any(raw), "{what}: printed raw: {out:?}");
        assert!(out.contains("3 | #"), "{what}: {out}");
    }
}

#[test]
fn the_nul_cut_does_not_open_the_policy() {
    let text = format!("{BASE}version: 1\n# cut \0 here\n{DENY_ALL}");
    let loaded = load_text(&text);
    assert!(
        loaded.has_errors(),
        "loaded with {} rules",
        loaded.model.policy.rules.len()
    );
    // Without the NUL the same file has its rule.
    let clean = load_text(&text.replace('\0', ""));
    assert!(!clean.has_errors(), "{}", clean.render());
    assert_eq!(clean.model.policy.rules.len(), 1);
}

#[test]
fn a_text_over_the_size_limit_is_refused_unparsed() {
    let mut text = String::from("# ");
    text.push_str(&"x".repeat(MAX_FILE_BYTES as usize - 2));
    text.push('\n');
    let loaded = load_text(&text);
    expect_error(&loaded, "limit-exceeded", 1, 1, "file size");
    assert!(first_error(&loaded).message.contains("MiB"), "{}", first_error(&loaded));
    // Header, source line with its caret, hint.
    assert_eq!(loaded.render().lines().count(), 5, "{}", loaded.render());
}

/// A fresh directory under the system's temporary one, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("palisade-hostile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        Dir(p)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Read `path` with a [`DirSource`] on another thread, failing (not hanging)
/// if that blocks: a FIFO must never be opened for a blocking read.
fn files_of(path: &Path) -> Result<Vec<(PathBuf, String)>, String> {
    let (tx, rx) = mpsc::channel();
    let p = path.to_owned();
    std::thread::spawn(move || {
        let _ = tx.send(DirSource::new(p).files().map_err(|e| format!("{e}")));
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("reading {} blocked", path.display()))
}

#[test]
fn a_huge_file_is_refused_before_it_is_read() {
    let dir = Dir::new("huge");
    let f = std::fs::File::create(dir.join("policy.yaml")).unwrap();
    // 1 GiB of NULs, sparse: reading it whole would take a gigabyte.
    f.set_len(1 << 30).unwrap();
    let err = files_of(&dir.0).expect_err("a 1 GiB policy file");
    assert!(err.contains("policy.yaml") && err.contains("1073741824"), "{err}");
    // Just over the limit is refused too, exactly at it is read.
    f.set_len(MAX_FILE_BYTES + 1).unwrap();
    assert!(files_of(&dir.0).is_err());
    f.set_len(MAX_FILE_BYTES).unwrap();
    let files = files_of(&dir.0).expect("a file at the limit is read");
    assert_eq!(files[0].1.len() as u64, MAX_FILE_BYTES);
}

#[test]
fn invalid_utf8_is_an_error_at_its_position() {
    let cases: &[(&str, &[u8], &str)] = &[
        ("a stray continuation byte", b"version: 1\nzones: \x80\n", ":2:8"),
        ("an encoded surrogate", b"version: 1\n# \xed\xa0\x80\n", ":2:3"),
        ("a truncated sequence at the end", b"version: 1\n\xe2\x82", ":2:1"),
        ("Latin-1", b"datacenter: { name: caf\xe9 }\n", ":1:24"),
    ];
    for (what, bytes, at) in cases {
        let dir = Dir::new("utf8");
        std::fs::write(dir.join("p.yaml"), bytes).unwrap();
        let err = files_of(&dir.0).expect_err(what);
        assert!(err.contains(&format!("p.yaml{at}")), "{what}: {err}");
        assert!(err.contains("UTF-8"), "{what}: {err}");
    }
}

// ---- 4. entries that are not regular files ---------------------------------

#[test]
fn an_entry_that_is_not_a_regular_file_is_an_error_naming_it() {
    use std::os::unix::fs::symlink;
    type Make = fn(&Dir, &Path);
    let cases: &[(&str, Make)] = &[
        ("a broken symlink", |_, p| symlink("no-such-file", p).unwrap()),
        ("a symlink loop", |_, p| symlink(p.file_name().unwrap(), p).unwrap()),
        ("a symlink to a directory", |d, p| symlink(&d.0, p).unwrap()),
        ("a symlink to /dev/zero", |_, p| symlink("/dev/zero", p).unwrap()),
        ("a FIFO", |_, p| {
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        }),
        ("a directory", |_, p| std::fs::create_dir(p).unwrap()),
    ];
    for (what, make) in cases {
        let dir = Dir::new("special");
        std::fs::write(dir.join("a.yaml"), format!("{BASE}{DENY_ALL}")).unwrap();
        make(&dir, &dir.join("policy.yaml"));
        let err = files_of(&dir.0).expect_err(what);
        assert!(err.contains("policy.yaml"), "{what}: {err}");
        // Named directly, it is refused as well.
        let err = files_of(&dir.join("policy.yaml")).expect_err(what);
        assert!(err.contains("policy.yaml"), "{what} (named): {err}");
    }
}

#[test]
fn a_symlink_to_a_regular_file_is_followed() {
    let dir = Dir::new("link");
    let target = Dir::new("link-target");
    std::fs::write(target.join("real.yaml"), format!("{BASE}{DENY_ALL}")).unwrap();
    std::os::unix::fs::symlink(target.join("real.yaml"), dir.join("policy.yaml")).unwrap();
    let loaded = load(&DirSource::new(&dir.0)).expect("a symlink to a file is read");
    assert!(!loaded.has_errors(), "{}", loaded.render());
    assert_eq!(loaded.model.policy.rules.len(), 1);
}

#[test]
fn an_emacs_lock_file_is_not_a_policy_file() {
    // Emacs marks a file being edited with `.#NAME`, a dangling symlink.
    let dir = Dir::new("emacs");
    std::fs::write(dir.join("policy.yaml"), format!("{BASE}{DENY_ALL}")).unwrap();
    std::os::unix::fs::symlink("root@host.1234:1700000000", dir.join(".#policy.yaml")).unwrap();
    let files = files_of(&dir.0).expect("the lock file is no policy file");
    assert_eq!(files.len(), 1);
}

// ---- 5. byte-order mark ----------------------------------------------------

#[test]
fn a_leading_byte_order_mark_is_accepted() {
    let loaded = load_text(&format!("\u{feff}{BASE}{DENY_ALL}"));
    assert!(!loaded.has_errors(), "{}", loaded.render());
    assert_eq!(loaded.model.inventory.datacenter.name, "dc1");
    // Positions on the first line are the ones an editor shows (the mark is no column).
    let loaded = load_text("\u{feff}datacenter: { name: dc1, defualt: deny }\n");
    let d = loaded
        .diagnostics
        .iter()
        .find(|d| d.kind.code() == "unknown-key")
        .expect("unknown key");
    assert_eq!((d.line, d.column), (1, 26), "{d}");
}

// ---- 6. diagnostics stay small ---------------------------------------------

#[test]
fn a_long_line_is_clipped_around_the_column() {
    // 1 MB on one line, the mistake at its end (the old loader printed the
    // line and a megabyte of caret padding).
    let filler: String = (0..50_000).map(|i| format!("s{i}: tcp/80, ")).collect();
    let text = format!("services: {{ {filler}oops: tcp/99999 }}\n");
    let column = text.find("tcp/99999").unwrap() as u32 + 1;
    let loaded = load_x(&text);
    let d = loaded
        .diagnostics
        .iter()
        .find(|d| d.kind.code() == "port-out-of-range")
        .expect("a bad port");
    assert_eq!((d.line, d.column), (1, column));
    let out = crate::render_one(&loaded, d);
    assert!(out.len() < 600, "{} bytes:\n{out}", out.len());
    assert!(out.contains('…'), "{out}");
    // The caret is under the bad port.
    let lines: Vec<&str> = out.lines().collect();
    let caret = lines[3].chars().position(|c| c == '^').expect("a caret");
    let above: String = lines[2].chars().skip(caret).take(9).collect();
    assert_eq!(above, "tcp/99999", "{out}");
}

#[test]
fn a_long_value_is_clipped_in_the_message() {
    let key = "k".repeat(1 << 20);
    let loaded = load_text(&format!("{key}: 1\n"));
    let d = first_error(&loaded);
    assert!(d.message.len() < 300, "{} bytes", d.message.len());
    assert!(loaded.render().len() < 1_000, "{} bytes", loaded.render().len());
}

#[test]
fn many_diagnostics_are_capped() {
    let text: String = (0..5_000).map(|i| format!("k{i}: 1\n")).collect();
    let loaded = load_text(&text);
    assert!(loaded.has_errors());
    assert!(loaded.diagnostics.len() <= 1_001, "{}", loaded.diagnostics.len());
    let last = loaded.diagnostics.last().unwrap();
    assert!(last.is_error() && last.message.contains("more"), "{last}");
}

/// One diagnostic rendered with its source line.
fn render_one(l: &Loaded, d: &Diagnostic) -> String {
    palisade_policy::diag::render(std::slice::from_ref(d), &l.sources)
}

// ---- 7. clearer messages ---------------------------------------------------

#[test]
fn an_unclosed_flow_collection_points_where_it_opened() {
    let cases: &[(&str, u32, u32)] = &[
        ("zones: [{ name: web, vlan: 100 }\nvms: []\n", 1, 8),
        ("datacenter: { name: dc1, default: deny\nzones: []\n", 1, 13),
        (
            "groups:\n  g: { tags: { tier: web }\n  h: { ips: [10.0.0.0/8] }\n",
            2,
            6,
        ),
    ];
    for (text, line, column) in cases {
        let loaded = load_x(text);
        expect_error(&loaded, "yaml-syntax", *line, *column, text);
        let d = first_error(&loaded);
        assert!(d.message.contains("not closed"), "{d}");
    }
}

#[test]
fn an_integer_too_large_is_out_of_range() {
    let loaded = load_text(&format!("{BASE}version: 12345678901234567890123456\n"));
    expect_error(&loaded, "invalid-value", 3, 10, "version");
    assert!(
        first_error(&loaded).message.contains("out of range"),
        "{}",
        first_error(&loaded)
    );
    let loaded = load_text(&format!("{BASE}version: -3\n"));
    assert!(first_error(&loaded).message.contains("-3"), "{}", first_error(&loaded));
}

/// Every kind of name, with `{}` where the invisible character goes.
const NAMES: &[(&str, &str)] = &[
    (
        "VM",
        "vms: [{ name: \"web{}1\", uuid: 00000000-0000-4000-8000-000000000001, vnics: [] }]\n",
    ),
    (
        "vNIC",
        "vms: [{ name: w, uuid: 00000000-0000-4000-8000-000000000001, vnics: [{ name: \"w{}0\", mac: \"02:00:00:00:00:01\", ips: [10.0.1.1], zone: web }] }]\n",
    ),
    (
        "tag key",
        "vms: [{ name: w, uuid: 00000000-0000-4000-8000-000000000001, tags: { \"ti{}er\": web }, vnics: [] }]\n",
    ),
    (
        "tag value",
        "vms: [{ name: w, uuid: 00000000-0000-4000-8000-000000000001, tags: { tier: \"w{}eb\" }, vnics: [] }]\n",
    ),
    (
        "host",
        "vms: [{ name: w, uuid: 00000000-0000-4000-8000-000000000001, host: \"h{}1\", vnics: [] }]\n",
    ),
    ("zone", "zones: [{ name: \"d{}mz\", vlan: 200 }]\n"),
    ("cluster", "clusters: [{ name: \"p{}rod\" }]\n"),
    ("group", "groups: { \"ad{}mins\": { ips: [10.9.0.0/24] } }\n"),
    ("service", "services: { \"ht{}tps\": tcp/443 }\n"),
    ("profile", "profiles: { \"fu{}ll\": { signatures: [all] } }\n"),
    (
        "rule id",
        "rules: { datacenter: [{ id: \"allow{}-all\", from: any, to: any, action: allow }] }\n",
    ),
    (
        "rule peer",
        "rules: { datacenter: [{ id: r, from: \"any{}\", to: any, action: allow }] }\n",
    ),
];

const INVISIBLE: &[(char, &str)] = &[
    ('\u{202e}', "\\u{202e}"),
    ('\u{200b}', "\\u{200b}"),
    ('\u{2066}', "\\u{2066}"),
    ('\u{00ad}', "\\u{ad}"),
    ('\u{00a0}', "\\u{a0}"),
    ('\u{feff}', "\\u{feff}"),
];

#[test]
fn invisible_characters_are_refused_in_names_and_shown_escaped() {
    for (what, template) in NAMES {
        for (c, escaped) in INVISIBLE {
            // Written as a YAML escape, so the file itself is plain text.
            let yaml_escape = format!("\\u{:04X}", *c as u32);
            let loaded = load_x(&template.replace("{}", &yaml_escape));
            let d = loaded
                .diagnostics
                .iter()
                .find(|d| d.kind.code() == "bad-character")
                .unwrap_or_else(|| panic!("{what} with {escaped}: {}", loaded.render()));
            assert!(d.is_error() && d.file == "x.yaml" && d.line == 1, "{what}: {d}");
            let out = loaded.render();
            assert!(out.contains(escaped), "{what}: {out}");
            assert!(!out.contains(*c), "{what}: printed raw: {out}");
        }
    }
}

#[test]
fn quoted_input_is_escaped_in_every_message() {
    // An unknown key and a bad port, each holding a control character
    // written as a YAML escape.
    for text in [
        "\"dat\\eacenter\": 1\n",
        "services: { s: \"tcp/44\\u200b3\" }\n",
        "vms: [{ name: w, uuid: \"0000\\u202E\", vnics: [] }]\n",
    ] {
        let loaded = load_text(text);
        let out = loaded.render();
        assert!(loaded.has_errors(), "{text}");
        assert!(!out.contains(['\u{1b}', '\u{200b}', '\u{202e}']), "printed raw: {out}");
        assert!(out.contains("\\u{"), "{out}");
    }
}

#[test]
fn a_cidr_with_host_bits_set_is_a_warning() {
    let text = format!(
        "{BASE}groups: {{ admins: {{ ips: [10.9.0.77/16] }} }}\nrules:\n  datacenter:\n    - {{ id: r, from: 192.168.1.1/24, to: admins, action: allow }}\n"
    );
    let loaded = load_text(&text);
    assert!(!loaded.has_errors(), "{}", loaded.render());
    let warnings: Vec<_> = loaded
        .diagnostics
        .iter()
        .filter(|d| d.kind.code() == "host-bits-set")
        .collect();
    assert_eq!(warnings.len(), 2, "{:#?}", loaded.diagnostics);
    assert_eq!((warnings[0].line, warnings[0].column), (3, 27));
    assert!(warnings[0].message.contains("10.9.0.0/16"), "{}", warnings[0]);
    assert_eq!((warnings[1].line, warnings[1].column), (6, 22));
}

#[test]
fn unknown_tags_are_refused() {
    let cases: &[(&str, u32, u32)] = &[
        // At the tagged value (the parser marks nodes, not their tags).
        ("version: !!binary MQ==\n", 1, 19),
        ("version: !!int 1\n", 1, 16),
        ("zones: !custom [{ name: web, vlan: 1 }]\n", 1, 16),
        ("groups: { g: !!set { a, b } }\n", 1, 20),
        (
            "%TAG !! tag:example.com,2000:\n---\ngroups: { g: { name: !!str dc1 } }\n",
            3,
            28,
        ),
    ];
    for (text, line, column) in cases {
        let loaded = load_x(text);
        expect_error(&loaded, "unsupported-tag", *line, *column, text);
    }
    // The core schema's !!str, !!seq and !!map say what the text already is.
    let loaded = load_text(
        "datacenter: !!map { name: !!str dc1, default: deny }\nzones: !!seq [{ name: web, vlan: 100 }]\nversion: 1\n",
    );
    assert!(!loaded.has_errors(), "{}", loaded.render());
}

// ---- 8. every reader goes through the same checks --------------------------

#[test]
fn a_dir_source_and_a_memory_source_give_the_same_diagnostics() {
    let text = format!("{BASE}# \u{202e}\n{DENY_ALL}");
    let dir = Dir::new("same");
    std::fs::write(dir.join("p.yaml"), &text).unwrap();
    let from_dir = load(&DirSource::new(dir.join("p.yaml"))).unwrap();
    let from_memory = load(&MemorySource::new().with(dir.join("p.yaml"), text)).unwrap();
    assert_eq!(from_dir.diagnostics, from_memory.diagnostics);
    assert!(from_dir.has_errors());
}

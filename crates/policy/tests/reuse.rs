//! A [`Loader`] kept from one load to the next reuses the VMs it built from
//! unchanged `vms:` entries, and its result is always [`load`]'s: the same
//! model (positions included) and the same diagnostics, whatever changed.

use palisade_policy::MemorySource;
use palisade_policy::load::{Loaded, Loader, Reuse, load};

const HEAD: &str = "datacenter: { name: dc, default: deny }\nzones: [{ name: z, vlan: 10 }]\n";
const TAIL: &str = "groups: { web: { tags: { tier: web } } }\nrules:\n  datacenter:\n    - { id: w, from: web, to: web, action: allow }\n";

fn vm(i: u32) -> String {
    format!(
        "  - {{ name: vm{i}, uuid: 00000000-0000-4000-8000-{i:012x}, tags: {{ tier: web }}, \
         vnics: [{{ name: vm{i}.0, mac: \"02:00:00:00:00:{i:02x}\", ips: [10.0.0.{i}], zone: z }}] }}\n"
    )
}

/// A VM written in block style over several lines, with a comment and a blank line.
fn block_vm(i: u32) -> String {
    format!(
        "  # the block one\n  - name: vm{i}\n    uuid: 00000000-0000-4000-8000-{i:012x}\n\n    tags:\n      tier: web\n    \
         vnics:\n      - name: vm{i}.0\n        mac: \"02:00:00:00:00:{i:02x}\"\n        ips: [10.0.0.{i}]\n        zone: z\n"
    )
}

fn inventory(vms: &[String]) -> String {
    format!("{HEAD}vms:\n{}{TAIL}", vms.concat())
}

fn source(files: &[(&str, &str)]) -> MemorySource {
    files.iter().fold(MemorySource::new(), |s, (n, t)| s.with(n, *t))
}

fn same(a: &Loaded, b: &Loaded, what: &str) {
    assert_eq!(a.model, b.model, "{what}: models differ");
    assert_eq!(a.diagnostics, b.diagnostics, "{what}: diagnostics differ");
}

/// Load `before`, then `after`, with one loader; check `after` against a
/// fresh load and return how the loader came by its VMs.
fn reload(before: &[(&str, &str)], after: &[(&str, &str)], what: &str) -> Reuse {
    let mut loader = Loader::new();
    let first = loader.load(&source(before)).expect("memory source");
    same(&first, &load(&source(before)).expect("memory source"), what);
    let second = loader.load(&source(after)).expect("memory source");
    same(&second, &load(&source(after)).expect("memory source"), what);
    loader.reuse()
}

#[test]
fn unchanged_entries_are_reused_and_the_result_is_a_fresh_loads() {
    let base: Vec<String> = (1..=6).map(|i| if i == 3 { block_vm(i) } else { vm(i) }).collect();
    let text = inventory(&base);
    let with = |f: &dyn Fn(&mut Vec<String>)| {
        let mut v = base.clone();
        f(&mut v);
        inventory(&v)
    };
    let reuse = |reused, parsed, whole_files| Reuse {
        reused,
        parsed,
        whole_files,
    };
    let rows: Vec<(&str, String, Reuse)> = vec![
        ("nothing changed", text.clone(), reuse(6, 0, 0)),
        ("one VM appended", with(&|v| v.push(vm(7))), reuse(6, 1, 0)),
        (
            "one VM inserted first: the rest move down",
            with(&|v| v.insert(0, block_vm(9))),
            reuse(6, 1, 0),
        ),
        (
            "one VM removed from the middle",
            with(&|v| drop(v.remove(2))),
            reuse(5, 0, 0),
        ),
        (
            "one VM changed",
            with(&|v| v[4] = v[4].replace("tier: web", "tier: db")),
            reuse(5, 1, 0),
        ),
        (
            "lines added above the list",
            format!("# a comment\n\n{text}"),
            reuse(6, 0, 0),
        ),
        // An entry with a diagnostic has the file parsed whole: an empty
        // value's position is the next token's, which may be in the next entry.
        (
            "an error in one entry",
            with(&|v| v[1] = v[1].replace("10.0.0.2", "10.0.0.300")),
            reuse(0, 0, 1),
        ),
        (
            "an entry's last value left empty",
            with(&|v| v[2] = v[2].replace("        zone: z\n", "        zone:\n\n")),
            reuse(0, 0, 1),
        ),
        (
            "a duplicate VM",
            with(&|v| {
                let dup = v[0].clone();
                v.push(dup);
            }),
            reuse(6, 1, 0),
        ),
        (
            "an entry that does not parse",
            with(&|v| v[1] = "  - { name: [\n".into()),
            reuse(0, 0, 1),
        ),
        (
            "a syntax error after the list",
            format!("{text}rules: [\n"),
            reuse(0, 0, 1),
        ),
        (
            "an anchor in one entry, an alias in another",
            with(&|v| {
                v[0] = v[0].replace("tags: {", "tags: &t {");
                v[1] = v[1].replace("tags: { tier: web }", "tags: *t");
            }),
            reuse(0, 0, 1),
        ),
        (
            "the list written in flow style",
            format!("{HEAD}vms: [{}]\n", vm(1).trim_start_matches("  - ").trim_end()),
            reuse(0, 0, 1),
        ),
        ("a second document", format!("{text}---\nzones: []\n"), reuse(0, 0, 1)),
        ("vms given twice", format!("\"vms\": []\n{text}"), reuse(6, 0, 0)),
        (
            "an entry less indented than the list",
            with(&|v| v[1] = format!(" {}", v[1].trim_start())),
            reuse(0, 0, 1),
        ),
        // What the loader bounds, inside one entry: the result is still the
        // whole parse's, and the limit is crossed at the same position.
        (
            "an anchor and its alias in one entry",
            with(&|v| v[1] = v[1].replace("tags: { tier: web }", "tags: &t { tier: web }, host: *t")),
            reuse(0, 0, 1),
        ),
        (
            "an entry nested as deep as the limit allows",
            with(&|v| {
                v[1] = v[1].replace(
                    "ips: [10.0.0.2]",
                    &format!("ips: {}1{}", "[".repeat(59), "]".repeat(59)),
                )
            }),
            reuse(0, 0, 1),
        ),
        (
            "an entry nested one level past the depth limit",
            with(&|v| {
                v[1] = v[1].replace(
                    "ips: [10.0.0.2]",
                    &format!("ips: {}1{}", "[".repeat(60), "]".repeat(60)),
                )
            }),
            reuse(0, 0, 1),
        ),
        (
            "a NUL in an entry",
            with(&|v| v[1] = v[1].replace("tier: web", "tier: w\0eb")),
            reuse(0, 0, 0),
        ),
        (
            "an invisible character in an entry's name",
            with(&|v| v[1] = v[1].replace("name: vm2,", "name: \"vm\\u200B2\",")),
            reuse(0, 0, 1),
        ),
    ];
    for (what, after, expect) in rows {
        let got = reload(&[("inv.yaml", &text)], &[("inv.yaml", &after)], what);
        assert_eq!(got, expect, "{what}");
    }
}

#[test]
fn entries_are_reused_only_in_the_file_they_were_built_in() {
    let text = inventory(&[vm(1), vm(2)]);
    let got = reload(&[("a.yaml", &text)], &[("b.yaml", &text)], "renamed");
    assert_eq!((got.reused, got.parsed), (0, 2));
    // Two files, the list moving from one to the other, and back.
    let parts = (format!("{HEAD}vms:\n{}", vm(1)), format!("vms:\n{}{TAIL}", vm(2)));
    let got = reload(
        &[("a.yaml", &parts.0), ("b.yaml", &parts.1)],
        &[("a.yaml", &parts.0), ("b.yaml", &parts.1.replace("vm2", "vm3"))],
        "two files",
    );
    // Two lists in one merged policy: each file's own entries are reused.
    assert_eq!((got.reused, got.parsed, got.whole_files), (1, 1, 0));
}

#[test]
fn only_the_last_loads_entries_are_remembered() {
    let mut loader = Loader::new();
    let a = inventory(&[vm(1), vm(2)]);
    let b = inventory(&[vm(3)]);
    loader.load(&source(&[("i.yaml", &a)])).expect("memory source");
    loader.load(&source(&[("i.yaml", &b)])).expect("memory source");
    loader.load(&source(&[("i.yaml", &a)])).expect("memory source");
    assert_eq!(
        loader.reuse().reused,
        0,
        "vm1 and vm2 were forgotten by the second load"
    );
}

#[test]
fn a_thousand_vms_and_one_more_parses_one() {
    let mut vms: Vec<String> = (0..1000).map(|i| vm(i % 250)).collect();
    // Distinct texts: the names differ even where the addresses repeat.
    for (i, v) in vms.iter_mut().enumerate() {
        *v = v.replacen(&format!("name: vm{}", i % 250), &format!("name: n{i}"), 1);
    }
    let before = inventory(&vms);
    vms.insert(500, vm(251).replacen("name: vm251", "name: extra", 1));
    let after = inventory(&vms);
    let got = reload(&[("i.yaml", &before)], &[("i.yaml", &after)], "one more");
    assert_eq!(
        got,
        Reuse {
            reused: 1000,
            parsed: 1,
            whole_files: 0
        }
    );
}

/// Every input the `policy_reuse` fuzz target found a failure with
/// (`fuzz/regressions/policy_reuse/NAME`, described in `NAME.txt`): two
/// texts split at the first NUL, loaded in turn by one loader.
#[test]
fn every_committed_fuzz_input_passes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/policy_reuse");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|e| e == "txt") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("input");
        let text = String::from_utf8_lossy(&bytes);
        let (first, second) = text.split_once('\0').unwrap_or((&text, &text));
        let what = path.display().to_string();
        reload(&[("p.yaml", first)], &[("p.yaml", second)], &what);
        checked += 1;
    }
    assert!(checked > 0, "no inputs in {}", dir.display());
}

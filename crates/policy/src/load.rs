//! YAML → model, collecting every problem on the way.
//!
//! Each file of a [`PolicySource`] is a mapping whose top-level keys may be any
//! of the inventory keys (`datacenter`, `clusters`, `zones`, `vms`) and policy
//! keys (`version`, `groups`, `services`, `profiles`, `inspection_defaults`,
//! `rules`); files are merged in load order (lists concatenate, names must stay
//! unique). The builder walks the positioned tree of [`crate::yaml`] by hand, so
//! every shape error, unknown key and bad value is reported at its own line
//! and column, and it keeps going after each one. Name references are recorded
//! with their position and checked afterwards by [`crate::validate`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use foldhash::HashMap as FastMap;
use ipnet::IpNet;

use crate::chars::{self, quote};
use crate::diag::{Diagnostic, DiagnosticKind as K, Severity, did_you_mean};
use crate::limits::{MAX_DIAGNOSTICS, MAX_FILE_BYTES};
use crate::model::*;
use crate::source::{PolicySource, SourceError, SourceMap};
use crate::validate::{self, RefKind, Reference};
use crate::yaml::{self, Node, NodeKind};

/// A loaded policy: the model (as complete as the errors allowed), every
/// diagnostic, and the source texts for rendering them.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The model. Only trustworthy when [`Loaded::has_errors`] is false.
    pub model: Model,
    /// Errors and warnings, in file order.
    pub diagnostics: Vec<Diagnostic>,
    /// The texts.
    pub sources: SourceMap,
}

impl Loaded {
    /// Whether any diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }

    /// The diagnostics rendered with source lines.
    pub fn render(&self) -> String {
        crate::diag::render(&self.diagnostics, &self.sources)
    }
}

/// Load, merge and validate every file of `src`.
pub fn load(src: &dyn PolicySource) -> Result<Loaded, SourceError> {
    let files = src.files()?;
    Ok(load_files(&files, |b, file, text| b.whole_file(file, text)))
}

/// A loader that remembers what it built from each entry of the `vms:`
/// lists it read, by the entry's text, and reuses it when a later load
/// finds the same text again (at any line: positions are moved with it).
///
/// At 50,000 VMs, parsing and building the inventory takes most of a
/// second, and a new policy version usually changes a few VMs; with a
/// loader kept from one version to the next, only the entries that
/// changed are parsed. The result is the same as [`load`]'s, diagnostics
/// included: a list is cut into entries only where that is plain from its
/// lines (see the `split` module), and a file whose list cannot be cut,
/// whose pieces do not parse, or whose entries build with a diagnostic, is
/// parsed whole. Only entries that built a VM without any diagnostic are
/// remembered, and only those of the last load.
#[derive(Debug, Default)]
pub struct Loader {
    vms: FastMap<Box<str>, BuiltVm>,
    last: Reuse,
}

/// How the last [`Loader::load`] came by its VMs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reuse {
    /// VMs reused from the load before.
    pub reused: usize,
    /// `vms:` entries parsed on their own.
    pub parsed: usize,
    /// Files parsed whole.
    pub whole_files: usize,
}

/// What one `vms:` entry built, where.
#[derive(Debug, Clone)]
struct BuiltVm {
    file: Arc<str>,
    line: u32,
    vm: Vm,
    refs: Vec<Reference>,
}

impl BuiltVm {
    /// Move every position by the lines the entry moved. (Every position
    /// is on or after the entry's first line, so none goes below `line`.)
    fn move_to(&mut self, line: u32) {
        let shift =
            |span: &mut Span| span.line = (i64::from(span.line) + i64::from(line) - i64::from(self.line)) as u32;
        shift(&mut self.vm.span);
        for nic in &mut self.vm.vnics {
            shift(&mut nic.span);
        }
        for r in &mut self.refs {
            shift(&mut r.span);
        }
        self.line = line;
    }
}

/// A `vms:` entry ready for the builder.
enum Entry {
    Reused(BuiltVm),
    Parsed { line: u32, node: Node },
}

/// A file cut at its `vms:` list.
struct CutVms {
    /// The file with the entries' lines emptied, parsed (one document).
    skeleton: Node,
    /// The entries, for the builder to take at the key.
    vms: CutEntries,
}

/// A file's `vms:` entries, for the builder to take at the key's line.
struct CutEntries {
    key_line: u32,
    entries: Vec<(Box<str>, Entry)>,
}

impl Loader {
    /// A loader that remembers nothing yet.
    pub fn new() -> Loader {
        Loader::default()
    }

    /// Load, merge and validate every file of `src`, as [`load`] does,
    /// reusing the VMs that the last load built from the same text.
    pub fn load(&mut self, src: &dyn PolicySource) -> Result<Loaded, SourceError> {
        let files = src.files()?;
        let mut earlier = std::mem::take(&mut self.vms);
        // Files to parse whole: those whose cut entries did not all build
        // cleanly. An empty value takes its position from the token after
        // it, which for an entry's last value is in the next entry: such a
        // value is always a diagnostic (a VM's fields are never empty when
        // valid), and its position must be the whole parse's.
        let mut whole: Vec<Arc<str>> = Vec::new();
        loop {
            let mut reuse = Reuse::default();
            let mut kept = FastMap::default();
            let mut diagnosed = Vec::new();
            let loaded = load_files(&files, |b, file, text| {
                let cut = if whole.contains(file) {
                    None
                } else {
                    cut_vms(&mut earlier, file, text)
                };
                match cut {
                    Some(cut) => {
                        for (_, e) in &cut.vms.entries {
                            match e {
                                Entry::Reused(_) => reuse.reused += 1,
                                Entry::Parsed { .. } => reuse.parsed += 1,
                            }
                        }
                        b.cut_vms = Some(cut.vms);
                        b.cut_diagnosed = false;
                        b.file(&cut.skeleton);
                        b.cut_vms = None;
                        if b.cut_diagnosed {
                            diagnosed.push(file.clone());
                        }
                        kept.extend(b.built_vms.drain(..));
                    }
                    None => {
                        reuse.whole_files += 1;
                        b.whole_file(file, text);
                    }
                }
            });
            if diagnosed.is_empty() {
                self.vms = kept;
                self.last = reuse;
                return Ok(loaded);
            }
            // Once more, those files whole (the entries built stay
            // available for the others); a file parsed whole is never
            // diagnosed here, so this ends.
            earlier.extend(kept);
            whole.extend(diagnosed);
        }
    }

    /// How the last load came by its VMs.
    pub fn reuse(&self) -> Reuse {
        self.last
    }
}

/// Cut `text`'s `vms:` list into entries, taking those seen before out of
/// `earlier` and parsing the others; `None` (with `earlier` as it was) when
/// the file is to be parsed whole.
fn cut_vms(earlier: &mut FastMap<Box<str>, BuiltVm>, file: &Arc<str>, text: &str) -> Option<CutVms> {
    let split = crate::split::split_vms(text)?;
    let mut docs = yaml::parse(file, &split.skeleton).ok()?;
    let doc = docs.pop().filter(|_| docs.is_empty())?;
    let NodeKind::Map(top) = &doc.kind else { return None };
    let at_key = top
        .iter()
        .any(|(k, v)| k.as_str() == Some("vms") && k.span.line == split.key_line && k.span.column == 1 && v.is_null());
    if !at_key {
        return None;
    }
    let mut entries: Vec<(Box<str>, Entry)> = Vec::with_capacity(split.items.len());
    let mut failed = false;
    for item in &split.items {
        let seen = earlier.remove_entry(item.text);
        let entry = match seen {
            Some((key, mut built)) if built.file == *file => {
                built.move_to(item.line);
                (key, Entry::Reused(built))
            }
            seen => {
                if let Some((key, built)) = seen {
                    earlier.insert(key, built);
                }
                match one_entry(file, item) {
                    Some(node) => (item.text.into(), Entry::Parsed { line: item.line, node }),
                    None => {
                        failed = true;
                        break;
                    }
                }
            }
        };
        entries.push(entry);
    }
    if failed {
        // Put back what was taken: the whole parse builds fresh, and the
        // next load may still find them.
        for (key, e) in entries {
            if let Entry::Reused(built) = e {
                earlier.insert(key, built);
            }
        }
        return None;
    }
    Some(CutVms {
        skeleton: doc,
        vms: CutEntries {
            key_line: split.key_line,
            entries,
        },
    })
}

/// The one entry an item's text parses to, or `None`.
fn one_entry(file: &Arc<str>, item: &crate::split::Item<'_>) -> Option<Node> {
    // Inside the file's mapping, as in the whole parse. An entry with an
    // anchor or an alias is parsed whole: what aliases may copy depends on
    // everything before them in the file.
    let parsed = yaml::parse_in(file, item.text, item.line, 1).ok()?;
    if parsed.aliases {
        return None;
    }
    let mut docs = parsed.docs;
    let doc = docs.pop().filter(|_| docs.is_empty())?;
    match doc.kind {
        NodeKind::Seq(mut entries) if entries.len() == 1 => entries.pop(),
        _ => None,
    }
}

/// Build and validate the model of `files`, each read into the builder by `read`.
fn load_files(
    files: &[(std::path::PathBuf, String)],
    mut read: impl FnMut(&mut ModelBuilder, &Arc<str>, &str),
) -> Loaded {
    let mut b = ModelBuilder::default();
    let mut sources = SourceMap::default();
    for (path, text) in files {
        let name = display(path);
        let file: Arc<str> = name.as_str().into();
        b.first_file.get_or_insert_with(|| file.clone());
        let text = chars::strip_bom(text);
        if b.check_text(&file, text) {
            read(&mut b, &file, text);
        }
        sources.add(name, text.to_string());
    }
    let (model, mut diags, refs) = b.finish();
    validate::validate(&model, &refs, &mut diags);
    // Report in reading order: file, then position (stable, so ties keep check order).
    let order: Vec<String> = files.iter().map(|(p, _)| display(p)).collect();
    diags.sort_by_key(|d| (order.iter().position(|f| *f == d.file), d.line, d.column));
    cap(&mut diags);
    Loaded {
        model,
        diagnostics: diags,
        sources,
    }
}

/// Keep the first [`MAX_DIAGNOSTICS`], and say what was left out (as an
/// error if any of it was one, so the policy stays refused).
fn cap(diags: &mut Vec<Diagnostic>) {
    if diags.len() <= MAX_DIAGNOSTICS {
        return;
    }
    let rest = diags.split_off(MAX_DIAGNOSTICS);
    let errors = rest.iter().filter(|d| d.is_error()).count();
    let first = &rest[0];
    diags.push(Diagnostic {
        severity: if errors > 0 { Severity::Error } else { Severity::Warning },
        kind: K::LimitExceeded,
        file: first.file.clone(),
        line: first.line,
        column: first.column,
        message: format!(
            "{} more diagnostics from here on are not shown ({errors} errors, {} warnings)",
            rest.len(),
            rest.len() - errors
        ),
        hint: Some(format!("only the first {MAX_DIAGNOSTICS} are listed; fix those first")),
    });
}

fn display(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

const TOP_KEYS: &[&str] = &[
    "datacenter",
    "clusters",
    "zones",
    "vms",
    "version",
    "groups",
    "services",
    "profiles",
    "inspection_defaults",
    "rules",
    "service_chains",
];

#[derive(Default)]
struct ModelBuilder {
    diags: Vec<Diagnostic>,
    refs: Vec<Reference>,
    first_file: Option<Arc<str>>,
    datacenter: Option<(Datacenter, Span)>,
    clusters: Vec<Cluster>,
    zones: Vec<Zone>,
    vms: Vec<Vm>,
    version: Option<(u64, Span)>,
    groups: Vec<Group>,
    services: Vec<Service>,
    profiles: Vec<Profile>,
    inspection_defaults: Option<(InspectionDefaults, Span)>,
    rules: Vec<Rule>,
    service_chains: Vec<ServiceChain>,
    /// The current file's `vms:` entries, when the [`Loader`] cut them out
    /// (the file's text being read then has nothing under the key).
    cut_vms: Option<CutEntries>,
    /// What those entries built cleanly, for the loader to remember.
    built_vms: Vec<(Box<str>, BuiltVm)>,
    /// Whether one of them built with a diagnostic.
    cut_diagnosed: bool,
    /// Whether a file was refused or did not parse (what it declares is
    /// missing, and the error says why).
    unread: bool,
}

/// A mapping's entries, looked up by key.
struct Fields<'a> {
    entries: Vec<(&'a str, &'a Node, &'a Node)>,
    span: Span,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Node> {
        self.entries.iter().find(|(k, _, _)| *k == key).map(|(_, _, v)| *v)
    }
}

impl ModelBuilder {
    fn err(&mut self, kind: K, span: &Span, msg: impl Into<String>) {
        self.diags.push(Diagnostic::error(kind, span, msg));
    }

    fn err_hint(&mut self, kind: K, span: &Span, msg: impl Into<String>, hint: impl Into<String>) {
        self.diags.push(Diagnostic::error(kind, span, msg).with_hint(hint));
    }

    fn wrong(&mut self, node: &Node, expected: &str) {
        let msg = format!("expected {expected}, found {}", node.shape());
        self.err(K::WrongType, &node.span, msg);
    }

    fn reference(&mut self, kind: RefKind, name: &str, span: &Span) {
        self.refs.push(Reference {
            kind,
            name: name.to_string(),
            span: span.clone(),
        });
    }

    /// The entries of a mapping, reporting unknown and repeated keys.
    fn fields<'a>(&mut self, node: &'a Node, allowed: &[&str], what: &str) -> Option<Fields<'a>> {
        let NodeKind::Map(m) = &node.kind else {
            self.wrong(node, &format!("a mapping ({what})"));
            return None;
        };
        let mut entries: Vec<(&'a str, &'a Node, &'a Node)> = Vec::new();
        for (k, v) in m {
            let Some(key) = k.as_str() else {
                self.wrong(k, "a string key");
                continue;
            };
            if !allowed.contains(&key) {
                let hint = did_you_mean(key, "key", allowed.iter().copied());
                self.err_hint(
                    K::UnknownKey,
                    &k.span,
                    format!("unknown key {} in {what}", quote(key)),
                    hint,
                );
                continue;
            }
            if entries.iter().any(|(e, _, _)| *e == key) {
                self.err(
                    K::DuplicateName,
                    &k.span,
                    format!("key \"{key}\" is given twice in {what}"),
                );
                continue;
            }
            entries.push((key, k, v));
        }
        Some(Fields {
            entries,
            span: node.span.clone(),
        })
    }

    /// Whether a file's text may be parsed: not over the size limit, and
    /// holding only characters a policy file may (see [`crate::chars`]).
    /// Otherwise the one diagnostic saying why.
    fn check_text(&mut self, file: &Arc<str>, text: &str) -> bool {
        let at = |line, column| Span {
            file: file.clone(),
            line,
            column,
        };
        if text.len() as u64 > MAX_FILE_BYTES {
            let msg = format!(
                "the file is {} bytes, over the limit of {} MiB for a policy file",
                text.len(),
                MAX_FILE_BYTES >> 20
            );
            self.err_hint(K::LimitExceeded, &at(1, 1), msg, "split it into several files");
            self.unread = true;
            return false;
        }
        match chars::check_file(text) {
            Ok(()) => true,
            Err(bad) => {
                let msg = format!(
                    "{} ({}) is not allowed in a policy file",
                    bad.what,
                    chars::code_point(bad.ch)
                );
                let hint = "a policy file holds printable characters, tabs and line breaks (LF or CRLF); \
                            the file was not read";
                self.err_hint(K::BadCharacter, &at(bad.line, bad.column), msg, hint);
                self.unread = true;
                false
            }
        }
    }

    /// Whether a string read as a name (or any identifier) is one: no
    /// control, format, invisible or unusual space character in it.
    fn clean_name(&mut self, node: &Node, s: &str) -> bool {
        let Some((c, what)) = chars::check_name(s) else {
            return true;
        };
        let msg = format!("{} holds {what} ({})", quote(s), chars::code_point(c));
        let hint = "names, tags and values are visible text: two that look alike must be alike";
        self.err_hint(K::BadCharacter, &node.span, msg, hint);
        false
    }

    fn required<'a>(&mut self, f: &Fields<'a>, key: &str, what: &str) -> Option<&'a Node> {
        let v = f.get(key);
        if v.is_none() {
            self.err(K::MissingField, &f.span, format!("{what} has no \"{key}\""));
        }
        v
    }

    fn string(&mut self, node: &Node) -> Option<String> {
        match &node.kind {
            NodeKind::Scalar { value, .. } if !node.is_null() => {
                self.clean_name(node, value).then(|| value.to_string())
            }
            _ => {
                self.wrong(node, "a string");
                None
            }
        }
    }

    /// A scalar or a list of scalars.
    fn strings<'a>(&mut self, node: &'a Node) -> Vec<&'a Node> {
        match &node.kind {
            NodeKind::Seq(items) => {
                let mut out = Vec::new();
                for it in items {
                    if matches!(it.kind, NodeKind::Scalar { .. }) && !it.is_null() {
                        if self.clean_name(it, it.as_str().unwrap_or_default()) {
                            out.push(it);
                        }
                    } else {
                        self.wrong(it, "a string");
                    }
                }
                out
            }
            NodeKind::Scalar { value, .. } if !node.is_null() => {
                if self.clean_name(node, value) {
                    vec![node]
                } else {
                    Vec::new()
                }
            }
            _ => {
                self.wrong(node, "a string or a list of strings");
                Vec::new()
            }
        }
    }

    fn seq<'a>(&mut self, node: &'a Node, what: &str) -> &'a [Node] {
        match &node.kind {
            NodeKind::Seq(items) => items,
            _ if node.is_null() => &[],
            _ => {
                self.wrong(node, &format!("a list ({what})"));
                &[]
            }
        }
    }

    fn integer(&mut self, node: &Node) -> Option<u64> {
        match &node.kind {
            NodeKind::Scalar { value, quoted: false } => match value.parse::<u64>() {
                Ok(n) => Some(n),
                Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => {
                    let msg = format!("{} is out of range", quote(value));
                    self.err_hint(K::InvalidValue, &node.span, msg, format!("at most {}", u64::MAX));
                    None
                }
                Err(_) => {
                    let msg = format!("expected a non-negative integer, found {}", quote(value));
                    self.err(K::WrongType, &node.span, msg);
                    None
                }
            },
            _ => {
                self.wrong(node, "a non-negative integer");
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node) -> Option<bool> {
        match node.as_str() {
            Some("true") => Some(true),
            Some("false") => Some(false),
            _ => {
                self.wrong(node, "true or false");
                None
            }
        }
    }

    fn action(&mut self, node: &Node, allow_final_only: bool) -> Option<Action> {
        let s = self.string(node)?;
        match Action::parse(&s) {
            Some(a) if !(allow_final_only && matches!(a, Action::Pass | Action::Reject)) => Some(a),
            Some(a) => {
                self.err_hint(
                    K::InvalidAction,
                    &node.span,
                    format!("\"{a}\" is not a valid default"),
                    "a default is \"allow\" or \"deny\"",
                );
                None
            }
            None => {
                let hint = if allow_final_only {
                    "a default is \"allow\" or \"deny\"".to_string()
                } else {
                    did_you_mean(&s, "action", ["allow", "deny", "reject", "pass"])
                };
                self.err_hint(
                    K::InvalidAction,
                    &node.span,
                    format!("{} is not an action", quote(&s)),
                    hint,
                );
                None
            }
        }
    }

    /// Parse one file's text and read its documents.
    fn whole_file(&mut self, file: &Arc<str>, text: &str) {
        match yaml::parse(file, text) {
            Err(e) => {
                self.unread = true;
                let d = Diagnostic::error(e.kind, &e.span, e.message);
                self.diags.push(match e.hint {
                    Some(h) => d.with_hint(h),
                    None => d,
                });
            }
            Ok(docs) => {
                for doc in &docs {
                    self.file(doc);
                }
            }
        }
    }

    /// The `vms:` entries the loader cut out: reused ones as they are, the
    /// others built, and remembered when they built cleanly.
    fn cut_vms(&mut self, cut: CutEntries) {
        for (key, entry) in cut.entries {
            match entry {
                Entry::Reused(built) => {
                    self.vms.push(built.vm.clone());
                    self.refs.extend(built.refs.iter().cloned());
                    self.built_vms.push((key, built));
                }
                Entry::Parsed { line, node } => {
                    let (diags, refs, vms) = (self.diags.len(), self.refs.len(), self.vms.len());
                    self.vm(&node);
                    if self.diags.len() != diags {
                        self.cut_diagnosed = true;
                    } else if self.vms.len() == vms + 1 {
                        let built = BuiltVm {
                            file: node.span.file.clone(),
                            line,
                            vm: self.vms[vms].clone(),
                            refs: self.refs[refs..].to_vec(),
                        };
                        self.built_vms.push((key, built));
                    }
                }
            }
        }
    }

    fn file(&mut self, doc: &Node) {
        if doc.is_null() {
            return;
        }
        let Some(f) = self.fields(doc, TOP_KEYS, "a policy file") else {
            return;
        };
        for (key, k, v) in &f.entries {
            match *key {
                "datacenter" => self.datacenter(k, v),
                "clusters" => {
                    for c in self.seq(v, "clusters") {
                        self.cluster(c);
                    }
                }
                "zones" => {
                    for z in self.seq(v, "zones") {
                        self.zone(z);
                    }
                }
                "vms" => match self.cut_vms.take_if(|c| c.key_line == k.span.line) {
                    Some(cut) => self.cut_vms(cut),
                    None => {
                        for vm in self.seq(v, "vms") {
                            self.vm(vm);
                        }
                    }
                },
                "version" => {
                    if let Some((_, first)) = &self.version {
                        let msg = format!("version is already set at {first}");
                        self.err(K::DuplicateName, &k.span, msg);
                    } else if let Some(n) = self.integer(v) {
                        self.version = Some((n, k.span.clone()));
                    }
                }
                "groups" => self.groups(v),
                "services" => self.services(v),
                "profiles" => self.profiles(v),
                "inspection_defaults" => self.inspection_defaults(k, v),
                "rules" => self.rules(v),
                "service_chains" => self.service_chains(v),
                _ => {}
            }
        }
    }

    fn datacenter(&mut self, k: &Node, v: &Node) {
        if let Some((_, first)) = &self.datacenter {
            let msg = format!("the datacenter is already declared at {first}");
            self.err(K::DuplicateName, &k.span, msg);
            return;
        }
        let Some(f) = self.fields(v, &["name", "default"], "the datacenter") else {
            return;
        };
        let name = self.required(&f, "name", "the datacenter").and_then(|n| self.string(n));
        let default = f
            .get("default")
            .and_then(|d| self.action(d, true))
            .unwrap_or(Action::Deny);
        if let Some(name) = name {
            self.datacenter = Some((Datacenter { name, default }, k.span.clone()));
        }
    }

    fn cluster(&mut self, node: &Node) {
        let Some(f) = self.fields(node, &["name", "hosts"], "a cluster") else {
            return;
        };
        let name_node = self.required(&f, "name", "a cluster");
        let name = name_node.and_then(|n| self.string(n));
        // Point at the name: that is what duplicate-name diagnostics are about.
        let span = name_node.map_or_else(|| node.span.clone(), |n| n.span.clone());
        let hosts = match f.get("hosts") {
            Some(h) => self
                .strings(h)
                .into_iter()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect(),
            None => Vec::new(),
        };
        if let Some(name) = name {
            self.clusters.push(Cluster { name, hosts, span });
        }
    }

    fn zone(&mut self, node: &Node) {
        let allowed = ["name", "vlan", "vni", "default", "on_failure"];
        let Some(f) = self.fields(node, &allowed, "a zone") else {
            return;
        };
        let name_node = self.required(&f, "name", "a zone");
        let name = name_node.and_then(|n| self.string(n));
        // Point at the name: that is what duplicate-name diagnostics are about.
        let span = name_node.map_or_else(|| node.span.clone(), |n| n.span.clone());
        let segment = match (f.get("vlan"), f.get("vni")) {
            (Some(v), None) => self.integer(v).and_then(|n| {
                if (1..=4094).contains(&n) {
                    Some(Segment::Vlan(n as u16))
                } else {
                    self.err_hint(
                        K::VlanOutOfRange,
                        &v.span,
                        format!("VLAN id {n} is out of range"),
                        "VLAN ids are 1 to 4094 (0 and 4095 are reserved)",
                    );
                    None
                }
            }),
            (None, Some(v)) => self.integer(v).and_then(|n| {
                if n < 1 << 24 {
                    Some(Segment::Vni(n as u32))
                } else {
                    self.err_hint(
                        K::VniOutOfRange,
                        &v.span,
                        format!("VNI {n} does not fit in 24 bits"),
                        "a VXLAN network identifier is 0 to 16777215",
                    );
                    None
                }
            }),
            (Some(_), Some(v)) => {
                self.err_hint(
                    K::InvalidValue,
                    &v.span,
                    "a zone has a VLAN id or a VNI, not both",
                    "remove one",
                );
                None
            }
            (None, None) => {
                self.err_hint(
                    K::MissingField,
                    &f.span,
                    "a zone needs \"vlan\" or \"vni\"",
                    "e.g. vlan: 100",
                );
                None
            }
        };
        let default = f.get("default").and_then(|d| self.action(d, true));
        let on_failure = match f.get("on_failure") {
            None => OnFailure::Closed,
            Some(n) => self.on_failure(n),
        };
        if let Some(name) = name {
            // A zone whose segment was wrong is kept (with the reserved VLAN 0,
            // already reported) so that its vNICs and rules do not cascade into
            // "unknown zone" errors.
            let segment = segment.unwrap_or(Segment::Vlan(0));
            self.zones.push(Zone {
                name,
                segment,
                default,
                on_failure,
                span,
            });
        }
    }

    fn vm(&mut self, node: &Node) {
        let allowed = ["name", "uuid", "cluster", "host", "tags", "vnics"];
        let Some(f) = self.fields(node, &allowed, "a VM") else {
            return;
        };
        let name_node = self.required(&f, "name", "a VM");
        let name = name_node.and_then(|n| self.string(n));
        // Point at the name: that is what duplicate-name diagnostics are about.
        let span = name_node.map_or_else(|| node.span.clone(), |n| n.span.clone());
        let uuid = self
            .required(&f, "uuid", "a VM")
            .and_then(|n| self.string(n).map(|s| (s, n)));
        let uuid = uuid.and_then(|(s, n)| {
            if is_uuid(&s) {
                Some(s.to_ascii_lowercase())
            } else {
                self.err_hint(
                    K::InvalidValue,
                    &n.span,
                    format!("{} is not a UUID", quote(&s)),
                    "8-4-4-4-12 hex digits",
                );
                None
            }
        });
        let cluster = f.get("cluster").and_then(|n| {
            let s = self.string(n)?;
            self.reference(RefKind::Cluster, &s, &n.span);
            Some(s)
        });
        let host = f.get("host").and_then(|n| self.string(n));
        let tags = f.get("tags").map(|t| self.tags(t)).unwrap_or_default();
        let mut vnics = Vec::new();
        if let Some(list) = self.required(&f, "vnics", "a VM") {
            for n in self.seq(list, "vNICs") {
                if let Some(v) = self.vnic(n) {
                    vnics.push(v);
                }
            }
        }
        // Kept even with a bad or missing UUID (already reported), so that
        // rules naming the VM do not cascade into "unknown VM" errors.
        if let Some(name) = name {
            let uuid = uuid.unwrap_or_default();
            self.vms.push(Vm {
                name,
                uuid,
                cluster,
                host,
                tags,
                vnics,
                span,
            });
        }
    }

    fn tags(&mut self, node: &Node) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let NodeKind::Map(m) = &node.kind else {
            self.wrong(node, "a mapping of tags");
            return out;
        };
        for (k, v) in m {
            if let (Some(k), Some(v)) = (self.string(k), self.string(v)) {
                out.insert(k, v);
            }
        }
        out
    }

    fn vnic(&mut self, node: &Node) -> Option<Vnic> {
        let f = self.fields(node, &["name", "mac", "ips", "zone"], "a vNIC")?;
        let name_node = self.required(&f, "name", "a vNIC");
        let name = name_node.and_then(|n| self.string(n));
        // Point at the name: that is what duplicate-name diagnostics are about.
        let span = name_node.map_or_else(|| node.span.clone(), |n| n.span.clone());
        let mac = self.required(&f, "mac", "a vNIC").and_then(|n| {
            let s = self.string(n)?;
            match parse_mac(&s) {
                Some(m) => Some(m),
                None => {
                    self.err_hint(
                        K::InvalidValue,
                        &n.span,
                        format!("{} is not a MAC address", quote(&s)),
                        "e.g. 02:00:00:00:01:01",
                    );
                    None
                }
            }
        });
        let mut ips = Vec::new();
        if let Some(list) = self.required(&f, "ips", "a vNIC") {
            for n in self.strings(list) {
                let s = n.as_str().unwrap_or_default();
                match s.parse::<IpAddr>() {
                    Ok(ip) => ips.push(ip),
                    Err(_) => self.err_hint(
                        K::BadCidr,
                        &n.span,
                        format!("{} is not an IP address", quote(s)),
                        "a vNIC address is a single IPv4 or IPv6 address, without prefix length",
                    ),
                }
            }
        }
        let zone = self.required(&f, "zone", "a vNIC").and_then(|n| {
            let s = self.string(n)?;
            self.reference(RefKind::Zone, &s, &n.span);
            Some(s)
        });
        Some(Vnic {
            name: name?,
            mac: mac?,
            ips,
            zone: zone?,
            span,
        })
    }

    fn groups(&mut self, node: &Node) {
        let NodeKind::Map(m) = &node.kind else {
            if !node.is_null() {
                self.wrong(node, "a mapping of group names to definitions");
            }
            return;
        };
        for (k, v) in m {
            let Some(name) = self.string(k) else { continue };
            if let Some(def) = self.group_def(v) {
                self.groups.push(Group {
                    name,
                    def,
                    span: k.span.clone(),
                });
            }
        }
    }

    fn group_def(&mut self, node: &Node) -> Option<GroupDef> {
        if node.as_str() == Some("external") {
            return Some(GroupDef::External);
        }
        if matches!(node.kind, NodeKind::Scalar { .. }) {
            let msg = format!(
                "a group is `external` or a mapping, found {}",
                quote(node.as_str().unwrap_or_default())
            );
            self.err_hint(
                K::WrongType,
                &node.span,
                msg,
                "e.g. { tags: { tier: web } } or { ips: [10.0.0.0/24] }",
            );
            return None;
        }
        let allowed = ["tags", "name", "zone", "cluster", "ips"];
        let f = self.fields(node, &allowed, "a group")?;
        if let Some(list) = f.get("ips") {
            if let Some((k, _, _)) = f.entries.iter().find(|(k, _, _)| *k != "ips") {
                let msg = format!("an IP-set group cannot also select by \"{k}\"");
                self.err_hint(
                    K::InvalidValue,
                    &f.span,
                    msg,
                    "define two groups and list both where needed",
                );
            }
            let mut nets = Vec::new();
            for n in self.strings(list) {
                if let Some(net) = self.net(n) {
                    nets.push((net, n.span.clone()));
                }
            }
            // Overlap is checked here, where each block's position is known.
            for i in 0..nets.len() {
                for j in 0..i {
                    let (a, b) = (&nets[j].0, &nets[i].0);
                    if a.contains(b) || b.contains(a) {
                        let msg = format!("{b} overlaps {a} in the same IP set");
                        let hint = format!(
                            "remove the narrower block or merge them (the other is at {})",
                            nets[j].1
                        );
                        let span = nets[i].1.clone();
                        self.err_hint(K::OverlappingCidr, &span, msg, hint);
                    }
                }
            }
            return Some(GroupDef::Ips(nets.into_iter().map(|(n, _)| n).collect()));
        }
        let mut sel = Selector::default();
        if let Some(t) = f.get("tags") {
            sel.tags = self.tags(t);
        }
        sel.name = f.get("name").and_then(|n| self.string(n));
        if let Some(n) = f.get("zone") {
            sel.zone = self.string(n);
            if let Some(z) = &sel.zone {
                self.reference(RefKind::Zone, z, &n.span);
            }
        }
        if let Some(n) = f.get("cluster") {
            sel.cluster = self.string(n);
            if let Some(c) = &sel.cluster {
                self.reference(RefKind::Cluster, c, &n.span);
            }
        }
        Some(GroupDef::Selector(sel))
    }

    fn net(&mut self, n: &Node) -> Option<IpNet> {
        let s = n.as_str().unwrap_or_default();
        match parse_net(s) {
            Some(net) => {
                if s.parse::<IpNet>().is_ok_and(|written| written != net) {
                    let msg = format!("{} has host bits set; it is read as {net}", quote(s));
                    let hint = format!("write {net}, or the address alone for just that host");
                    self.diags
                        .push(Diagnostic::warning(K::HostBitsSet, &n.span, msg).with_hint(hint));
                }
                Some(net)
            }
            None => {
                self.err_hint(
                    K::BadCidr,
                    &n.span,
                    format!("{} is not a CIDR block", quote(s)),
                    "e.g. 10.9.0.0/24 or fd00::/64",
                );
                None
            }
        }
    }

    fn services(&mut self, node: &Node) {
        let NodeKind::Map(m) = &node.kind else {
            if !node.is_null() {
                self.wrong(node, "a mapping of service names to protocol/port specs");
            }
            return;
        };
        for (k, v) in m {
            let Some(name) = self.string(k) else { continue };
            let mut entries = Vec::new();
            for n in self.strings(v) {
                let s = n.as_str().unwrap_or_default();
                match self.service_entry(s, n) {
                    Some(Some(e)) => entries.push(e),
                    Some(None) => self.err_hint(
                        K::InvalidValue,
                        &n.span,
                        format!("{} is not a protocol/port spec", quote(s)),
                        "e.g. tcp/443, udp/53, tcp/8000-8080, icmp/echo-request, any",
                    ),
                    None => {}
                }
            }
            self.services.push(Service {
                name,
                entries,
                span: k.span.clone(),
            });
        }
    }

    /// `Some(Some(e))`: a spec; `Some(None)`: not a spec (maybe a name);
    /// `None`: a spec with an error already reported.
    fn service_entry(&mut self, s: &str, n: &Node) -> Option<Option<ServiceEntry>> {
        if s == "any" {
            return Some(Some(ServiceEntry::ANY));
        }
        let mut parts = s.split('/');
        let p = parts.next().unwrap_or_default();
        let rest: Vec<&str> = parts.collect();
        let proto = match p {
            "tcp" => proto::TCP,
            "udp" => proto::UDP,
            "sctp" => proto::SCTP,
            "icmp" => proto::ICMP,
            "icmpv6" => proto::ICMPV6,
            "ip" => {
                let Some(num) = rest
                    .first()
                    .and_then(|x| x.parse::<u8>().ok())
                    .filter(|_| rest.len() == 1)
                else {
                    self.err_hint(
                        K::InvalidValue,
                        &n.span,
                        format!("{} needs a protocol number", quote(s)),
                        "e.g. ip/47",
                    );
                    return None;
                };
                return Some(Some(ServiceEntry {
                    proto: Some(num),
                    ..ServiceEntry::ANY
                }));
            }
            _ => return Some(None),
        };
        let mut e = ServiceEntry {
            proto: Some(proto),
            ..ServiceEntry::ANY
        };
        if proto::has_ports(proto) {
            match rest.as_slice() {
                [] => {}
                [ports] => {
                    let (lo, hi) = match ports.split_once('-') {
                        Some((a, b)) => (a, b),
                        None => (*ports, *ports),
                    };
                    let (lo, hi) = match (lo.parse::<u64>(), hi.parse::<u64>()) {
                        (Ok(lo), Ok(hi)) => (lo, hi),
                        _ => {
                            let msg = format!("{} is not a port or port range", quote(ports));
                            self.err_hint(K::PortOutOfRange, &n.span, msg, "ports are 0 to 65535, ranges lo-hi");
                            return None;
                        }
                    };
                    if hi > 65535 || lo > 65535 {
                        let msg = format!("port {} is out of range", hi.max(lo));
                        self.err_hint(K::PortOutOfRange, &n.span, msg, "ports are 0 to 65535");
                        return None;
                    }
                    if lo > hi {
                        let msg = format!("port range {lo}-{hi} is empty");
                        self.err_hint(K::PortOutOfRange, &n.span, msg, format!("write {hi}-{lo}"));
                        return None;
                    }
                    e.dst_ports = Some((lo as u16, hi as u16));
                }
                _ => return Some(None),
            }
        } else {
            if rest.len() > 2 {
                return Some(None);
            }
            if let Some(t) = rest.first() {
                let Some(ty) = icmp_type(proto, t) else {
                    let msg = format!("{} is not an ICMP type", quote(t));
                    self.err_hint(
                        K::InvalidValue,
                        &n.span,
                        msg,
                        "a number 0-255 or echo-request, echo-reply, …",
                    );
                    return None;
                };
                e.icmp_type = Some(ty);
            }
            if let Some(c) = rest.get(1) {
                let Ok(code) = c.parse::<u8>() else {
                    self.err_hint(
                        K::InvalidValue,
                        &n.span,
                        format!("{} is not an ICMP code", quote(c)),
                        "0-255",
                    );
                    return None;
                };
                e.icmp_code = Some(code);
            }
        }
        Some(Some(e))
    }

    fn profiles(&mut self, node: &Node) {
        let NodeKind::Map(m) = &node.kind else {
            if !node.is_null() {
                self.wrong(node, "a mapping of profile names");
            }
            return;
        };
        for (k, v) in m {
            let Some(name) = self.string(k) else { continue };
            let Some(f) = self.fields(v, &["signatures"], "a profile") else {
                continue;
            };
            let signatures = match self.required(&f, "signatures", "a profile") {
                Some(s) => self
                    .strings(s)
                    .into_iter()
                    .filter_map(|n| n.as_str().map(str::to_string))
                    .collect(),
                None => Vec::new(),
            };
            self.profiles.push(Profile {
                name,
                signatures,
                span: k.span.clone(),
            });
        }
    }

    /// `service_chains:`, a mapping of chain names to `{ on_failure,
    /// stages | appliances, probe }`: `stages:` is a list of `{ appliances }`,
    /// `appliances:` alone is the one-stage form.
    fn service_chains(&mut self, node: &Node) {
        let NodeKind::Map(m) = &node.kind else {
            if !node.is_null() {
                self.wrong(node, "a mapping of service chain names");
            }
            return;
        };
        for (k, v) in m {
            let Some(name) = self.string(k) else { continue };
            let Some(f) = self.fields(
                v,
                &["on_failure", "appliances", "stages", "probe", "description"],
                "a service chain",
            ) else {
                continue;
            };
            let on_failure = match f.get("on_failure") {
                None => OnFailure::Closed,
                Some(n) => self.on_failure(n),
            };
            let stages = match (f.get("stages"), f.get("appliances")) {
                (Some(list), None) => self.chain_stages(&name, list),
                (None, Some(list)) => vec![ChainStage {
                    appliances: self.stage_appliances(&name, list),
                    span: list.span.clone(),
                }],
                (Some(_), Some(list)) => {
                    self.err_hint(
                        K::InvalidValue,
                        &list.span,
                        format!("service chain {} has both `stages` and `appliances`", quote(&name)),
                        "`appliances:` is the one-stage form: list it as the first of `stages:` instead",
                    );
                    Vec::new()
                }
                (None, None) => {
                    self.err_hint(
                        K::MissingField,
                        &f.span,
                        format!("service chain {} has no \"stages\" (or \"appliances\")", quote(&name)),
                        "e.g. appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.out }]",
                    );
                    Vec::new()
                }
            };
            let probe = match f.get("probe") {
                None => Some(ChainProbe::default()),
                Some(n) => self.chain_probe(n),
            };
            self.service_chains.push(ServiceChain {
                name,
                on_failure,
                stages,
                probe,
                span: k.span.clone(),
            });
        }
    }

    /// A chain's `stages:`: a list of `{ appliances }`, at most
    /// [`ServiceChain::MAX_STAGES`].
    fn chain_stages(&mut self, chain: &str, list: &Node) -> Vec<ChainStage> {
        let items = self.seq(list, "stages");
        if items.is_empty() {
            self.err_hint(
                K::MissingField,
                &list.span,
                format!("service chain {} has no stage", quote(chain)),
                "e.g. stages: [{ appliances: [{ vm: fw-1, in: fw-1.in, out: fw-1.out }] }]",
            );
        }
        let mut stages = Vec::new();
        for (n, item) in items.iter().enumerate() {
            if n == ServiceChain::MAX_STAGES {
                self.err_hint(
                    K::InvalidValue,
                    &item.span,
                    format!(
                        "service chain {} has more than {} stages",
                        quote(chain),
                        ServiceChain::MAX_STAGES
                    ),
                    "a steered connection records one instance per stage: split the chain's work differently",
                );
                break;
            }
            let Some(f) = self.fields(item, &["appliances", "description"], "a chain stage") else {
                continue;
            };
            let Some(list) = self.required(&f, "appliances", "a chain stage") else {
                continue;
            };
            stages.push(ChainStage {
                appliances: self.stage_appliances(chain, list),
                span: item.span.clone(),
            });
        }
        stages
    }

    /// One stage's `appliances:`: its instances (at least one).
    fn stage_appliances(&mut self, chain: &str, list: &Node) -> Vec<Appliance> {
        let items = self.seq(list, "appliances");
        if items.is_empty() {
            self.err_hint(
                K::MissingField,
                &list.span,
                format!("service chain {} has no appliance", quote(chain)),
                "e.g. appliances: [{ vm: ips-1, in: ips-1.in, out: ips-1.out }]",
            );
        }
        items.iter().filter_map(|a| self.appliance(a)).collect()
    }

    /// A chain's `probe:`: `off`, or `{ interval_ms, down_after, up_after }`
    /// (each defaulted when omitted, each bounded).
    fn chain_probe(&mut self, node: &Node) -> Option<ChainProbe> {
        if node.as_str() == Some("off") {
            return None;
        }
        let mut probe = ChainProbe::default();
        let Some(f) = self.fields(node, &["interval_ms", "down_after", "up_after"], "a probe") else {
            return Some(probe);
        };
        let limits = [
            ("interval_ms", ChainProbe::MIN_INTERVAL_MS, ChainProbe::MAX_INTERVAL_MS),
            ("down_after", 1, ChainProbe::MAX_ROUNDS),
            ("up_after", 1, ChainProbe::MAX_ROUNDS),
        ];
        for (key, min, max) in limits {
            let Some(n) = f.get(key) else { continue };
            let Some(v) = self.integer(n) else { continue };
            if v < u64::from(min) || v > u64::from(max) {
                self.err_hint(
                    K::InvalidValue,
                    &n.span,
                    format!("probe {key} {v} is out of range"),
                    format!("{min}..={max}"),
                );
                continue;
            }
            let v = v as u32;
            match key {
                "interval_ms" => probe.interval_ms = v,
                "down_after" => probe.down_after = v,
                _ => probe.up_after = v,
            }
        }
        Some(probe)
    }

    /// One appliance of a service chain: `{ vm: VM, in: VNIC, out: VNIC }`,
    /// or `{ external: { address: IPV4, vni_in: VNI, vni_out: VNI } }`.
    fn appliance(&mut self, node: &Node) -> Option<Appliance> {
        let f = self.fields(node, &["vm", "in", "out", "external"], "an appliance")?;
        if let Some(ext) = f.get("external") {
            if let Some(other) = ["vm", "in", "out"].iter().find_map(|k| f.get(k)) {
                self.err_hint(
                    K::InvalidValue,
                    &other.span,
                    "an appliance is either a VM's vNICs or external, not both",
                    "external: { address: 192.0.2.10, vni_in: 5001, vni_out: 5002 } alone",
                );
                return None;
            }
            return self.external_appliance(ext);
        }
        let vm = self.required(&f, "vm", "an appliance");
        let vnic_in = self.required(&f, "in", "an appliance");
        let vnic_out = self.required(&f, "out", "an appliance");
        let (vm, vnic_in, vnic_out) = (vm?, vnic_in?, vnic_out?);
        let name = self.string(vm)?;
        self.reference(RefKind::Vm, &name, &vm.span);
        Some(Appliance {
            vm: name,
            vnic_in: self.string(vnic_in)?,
            vnic_out: self.string(vnic_out)?,
            span: vm.span.clone(),
            vnic_spans: [vnic_in.span.clone(), vnic_out.span.clone()],
            external: None,
        })
    }

    /// An external appliance: `{ address: IPV4, vni_in: VNI, vni_out: VNI }`,
    /// its address a unicast IPv4 address (the underlay's family), its VNIs
    /// in 1..=2^24-1 (VNI 0 is an untagged segment's). Clashes with segments
    /// and other instances are the validation's.
    fn external_appliance(&mut self, node: &Node) -> Option<Appliance> {
        let what = "an external appliance";
        let f = self.fields(node, &["address", "vni_in", "vni_out"], what)?;
        let address = self.required(&f, "address", what);
        let vni_in = self.required(&f, "vni_in", what);
        let vni_out = self.required(&f, "vni_out", what);
        let (address, vni_in, vni_out) = (address?, vni_in?, vni_out?);
        let ip = match address.as_str().map(str::parse::<IpAddr>) {
            Some(Ok(IpAddr::V4(ip))) => ip,
            Some(Ok(IpAddr::V6(_))) => {
                self.err_hint(
                    K::InvalidValue,
                    &address.span,
                    "an external appliance's address must be IPv4",
                    "the underlay (VXLAN between tunnel endpoints) is IPv4",
                );
                return None;
            }
            Some(Err(_)) => {
                let msg = format!("{} is not an IPv4 address", quote(address.as_str().unwrap_or_default()));
                self.err_hint(K::InvalidValue, &address.span, msg, "e.g. address: 192.0.2.10");
                return None;
            }
            None => {
                self.wrong(address, "an IPv4 address");
                return None;
            }
        };
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() {
            self.err_hint(
                K::InvalidValue,
                &address.span,
                format!("{ip} cannot be an external appliance's address"),
                "a unicast underlay address (not 0.0.0.0, loopback, multicast or broadcast)",
            );
            return None;
        }
        let mut vni = |n: &Node| {
            let v = self.integer(n)?;
            if v == 0 || v > u64::from(ExternalAppliance::MAX_VNI) {
                self.err_hint(
                    K::InvalidValue,
                    &n.span,
                    format!("VNI {v} is out of range"),
                    format!("1..={} (VNI 0 is the untagged segment's)", ExternalAppliance::MAX_VNI),
                );
                return None;
            }
            Some(v as u32)
        };
        let (vi, vo) = (vni(vni_in), vni(vni_out));
        let external = ExternalAppliance {
            address: ip,
            vni_in: vi?,
            vni_out: vo?,
        };
        Some(Appliance {
            vm: external.name(),
            vnic_in: external.side_name(external.vni_in),
            vnic_out: external.side_name(external.vni_out),
            span: node.span.clone(),
            vnic_spans: [vni_in.span.clone(), vni_out.span.clone()],
            external: Some(external),
        })
    }

    fn on_failure(&mut self, n: &Node) -> OnFailure {
        match n.as_str() {
            Some("open") => OnFailure::Open,
            Some("closed") => OnFailure::Closed,
            _ => {
                self.err_hint(
                    K::InvalidValue,
                    &n.span,
                    "on_failure must be open or closed",
                    "open | closed",
                );
                OnFailure::Closed
            }
        }
    }

    fn inspection_defaults(&mut self, k: &Node, v: &Node) {
        if let Some((_, first)) = &self.inspection_defaults {
            let msg = format!("inspection_defaults are already set at {first}");
            self.err(K::DuplicateName, &k.span, msg);
            return;
        }
        let allowed = ["north_south", "inter_zone", "intra_zone"];
        let Some(f) = self.fields(v, &allowed, "inspection_defaults") else {
            return;
        };
        let mut get = |key: &str| {
            let n = f.get(key)?;
            let s = self.string(n)?;
            self.reference(RefKind::Profile, &s, &n.span);
            Some(s)
        };
        let d = InspectionDefaults {
            north_south: get("north_south"),
            inter_zone: get("inter_zone"),
            intra_zone: get("intra_zone"),
        };
        self.inspection_defaults = Some((d, k.span.clone()));
    }

    fn rules(&mut self, node: &Node) {
        let NodeKind::Map(m) = &node.kind else {
            if !node.is_null() {
                self.wrong(
                    node,
                    "a mapping of levels (datacenter, cluster:NAME, zone:NAME, vm:NAME) to rule lists",
                );
            }
            return;
        };
        for (k, v) in m {
            let Some(key) = self.string(k) else { continue };
            let (level, scope) = match key.split_once(':') {
                None if key == "datacenter" => (Level::Datacenter, None),
                Some((l, s)) if !s.trim().is_empty() => {
                    let scope = s.trim().to_string();
                    let (level, kind) = match l.trim() {
                        "cluster" => (Level::Cluster, RefKind::Cluster),
                        "zone" => (Level::Zone, RefKind::Zone),
                        "vm" => (Level::Vm, RefKind::Vm),
                        _ => {
                            self.bad_level(k, &key);
                            continue;
                        }
                    };
                    self.reference(kind, &scope, &k.span);
                    (level, Some(scope))
                }
                _ => {
                    self.bad_level(k, &key);
                    continue;
                }
            };
            for r in self.seq(v, "rules") {
                if let Some(rule) = self.rule(r, level, scope.clone()) {
                    self.rules.push(rule);
                }
            }
        }
    }

    fn bad_level(&mut self, k: &Node, key: &str) {
        let hint = "levels are datacenter, cluster:NAME, zone:NAME and vm:NAME";
        self.err_hint(
            K::UnknownKey,
            &k.span,
            format!("{} is not a rule level", quote(key)),
            hint,
        );
    }

    fn peers(&mut self, node: &Node) -> Vec<Peer> {
        let mut out = Vec::new();
        for n in self.strings(node) {
            let s = n.as_str().unwrap_or_default();
            if s == "any" {
                out.push(Peer::Any);
            } else if looks_like_address(s) {
                if let Some(net) = self.net(n) {
                    out.push(Peer::Net(net));
                }
            } else {
                self.reference(RefKind::Group, s, &n.span);
                out.push(Peer::Group(s.to_string()));
            }
        }
        out
    }

    fn rule(&mut self, node: &Node, level: Level, scope: Option<String>) -> Option<Rule> {
        let allowed = [
            "id",
            "from",
            "to",
            "service",
            "action",
            "log",
            "inspect",
            "applied_to",
            "description",
            "redirect",
        ];
        let f = self.fields(node, &allowed, "a rule")?;
        let id = self.required(&f, "id", "a rule").and_then(|n| {
            let s = self.string(n)?;
            Some((s, n.span.clone()))
        });
        let from = self.required(&f, "from", "a rule").map(|n| self.peers(n));
        let to = self.required(&f, "to", "a rule").map(|n| self.peers(n));
        let service = match f.get("service") {
            None => vec![ServiceRef::Any],
            Some(n) => {
                let mut out = Vec::new();
                for s in self.strings(n) {
                    let text = s.as_str().unwrap_or_default();
                    match self.service_entry(text, s) {
                        Some(Some(ServiceEntry::ANY)) => out.push(ServiceRef::Any),
                        Some(Some(e)) => out.push(ServiceRef::Inline(e)),
                        Some(None) => {
                            self.reference(RefKind::Service, text, &s.span);
                            out.push(ServiceRef::Named(text.to_string()));
                        }
                        None => {}
                    }
                }
                out
            }
        };
        let action = self
            .required(&f, "action", "a rule")
            .and_then(|n| self.action(n, false));
        let log = f.get("log").and_then(|n| self.boolean(n)).unwrap_or(false);
        let inspect = f.get("inspect").and_then(|n| {
            let s = self.string(n)?;
            self.reference(RefKind::Profile, &s, &n.span);
            Some(s)
        });
        let applied_to = f.get("applied_to").map(|n| self.peers(n));
        let redirect = f.get("redirect").and_then(|n| {
            let s = self.string(n)?;
            self.reference(RefKind::ServiceChain, &s, &n.span);
            if let Some(a) = action
                && a != Action::Allow
            {
                self.err_hint(
                    K::InvalidValue,
                    &n.span,
                    format!("a rule whose action is {a} cannot redirect"),
                    "redirect steers allowed flows through a service chain: use action: allow",
                );
            }
            Some(s)
        });
        let (id, id_span) = id?;
        Some(Rule {
            id,
            level,
            scope,
            from: from?,
            to: to?,
            service,
            action: action?,
            log,
            inspect,
            applied_to,
            span: id_span,
            redirect,
        })
    }

    fn finish(mut self) -> (Model, Vec<Diagnostic>, Vec<Reference>) {
        let datacenter = match self.datacenter.take() {
            Some((d, _)) => d,
            // A file that could not be read may be the one declaring it.
            None if self.unread => Datacenter {
                name: String::new(),
                default: Action::Deny,
            },
            None => {
                let span = Span {
                    file: self.first_file.clone().unwrap_or_else(|| "<none>".into()),
                    line: 1,
                    column: 1,
                };
                self.err_hint(
                    K::MissingField,
                    &span,
                    "no file declares the datacenter",
                    "add `datacenter: { name: dc1, default: deny }` to the inventory",
                );
                Datacenter {
                    name: String::new(),
                    default: Action::Deny,
                }
            }
        };
        // Stable sort: level order, file order within a level.
        self.rules.sort_by_key(|r| r.level);
        let model = Model {
            inventory: Inventory {
                datacenter,
                clusters: self.clusters,
                zones: self.zones,
                vms: self.vms,
            },
            policy: Policy {
                version: self.version.map(|(v, _)| v).unwrap_or(0),
                groups: self.groups,
                services: self.services,
                profiles: self.profiles,
                inspection_defaults: self.inspection_defaults.map(|(d, _)| d).unwrap_or_default(),
                rules: self.rules,
                service_chains: self.service_chains,
            },
        };
        (model, self.diags, self.refs)
    }
}

/// Whether a `from`/`to` element is meant as an address (so a typo in it is a
/// bad CIDR, not an unknown group).
fn looks_like_address(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_digit()) && (s.contains('.') || s.contains(':')) || s.contains("::")
}

/// An address or CIDR block (a bare address is a /32 or /128).
pub fn parse_net(s: &str) -> Option<IpNet> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Some(n.trunc());
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

fn parse_mac(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    ok.then(|| parts.join(":").to_ascii_lowercase())
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

fn icmp_type(proto: u8, s: &str) -> Option<u8> {
    if let Ok(n) = s.parse::<u8>() {
        return Some(n);
    }
    let v4 = proto == proto::ICMP;
    Some(match s {
        "echo-request" => {
            if v4 {
                8
            } else {
                128
            }
        }
        "echo-reply" => {
            if v4 {
                0
            } else {
                129
            }
        }
        "destination-unreachable" => {
            if v4 {
                3
            } else {
                1
            }
        }
        "time-exceeded" => {
            if v4 {
                11
            } else {
                3
            }
        }
        "packet-too-big" if !v4 => 2,
        "neighbor-solicitation" if !v4 => 135,
        "neighbor-advertisement" if !v4 => 136,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(parse_mac("02-00-00-00-01-0A").as_deref(), Some("02:00:00:00:01:0a"));
        assert!(parse_mac("02:00:00:00:01").is_none());
        assert!(is_uuid("4f6c1e2a-0000-4000-8000-000000000001"));
        assert!(!is_uuid("4f6c"));
        assert_eq!(
            parse_net("10.0.0.1/24").map(|n| n.to_string()).as_deref(),
            Some("10.0.0.0/24")
        );
        assert_eq!(
            parse_net("10.0.0.1").map(|n| n.to_string()).as_deref(),
            Some("10.0.0.1/32")
        );
        assert!(looks_like_address("10.0.0.300/24"));
        assert!(!looks_like_address("web-servers"));
        assert_eq!(icmp_type(proto::ICMPV6, "echo-request"), Some(128));
    }
}

//! Cross-reference and consistency checks on a loaded model.
//!
//! The loader records every name reference with its position; this module
//! checks they resolve, and that names, addresses, MACs and segments are
//! unique. Selector groups that match nothing are warned about: they are
//! legal (a tag may simply not be used yet) but often a typo.

use std::collections::{BTreeMap, HashMap};

use crate::diag::{Diagnostic, DiagnosticKind as K, did_you_mean};
use crate::model::{GroupDef, Model, Segment, Span};

/// What a name reference points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefKind {
    /// A group (`from`, `to`, `applied_to`).
    Group,
    /// A service.
    Service,
    /// A zone.
    Zone,
    /// A cluster.
    Cluster,
    /// A VM.
    Vm,
    /// An inspection profile.
    Profile,
}

/// A name used somewhere, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// What it should name.
    pub kind: RefKind,
    /// The name.
    pub name: String,
    /// Where it is used.
    pub span: Span,
}

/// Report every first-seen/duplicate pair among `items`.
fn duplicates<'a>(
    diags: &mut Vec<Diagnostic>,
    kind: K,
    what: &str,
    items: impl IntoIterator<Item = (&'a str, &'a Span)>,
) {
    let mut seen: HashMap<&str, &Span> = HashMap::new();
    for (name, span) in items {
        if let Some(first) = seen.get(name) {
            diags.push(
                Diagnostic::error(kind, span, format!("{what} \"{name}\" is defined twice"))
                    .with_hint(format!("the first definition is at {first}; names must be unique")),
            );
        } else {
            seen.insert(name, span);
        }
    }
}

/// Check `model` against `refs`, appending diagnostics.
pub fn validate(model: &Model, refs: &[Reference], diags: &mut Vec<Diagnostic>) {
    let inv = &model.inventory;
    let pol = &model.policy;
    duplicates(
        diags,
        K::DuplicateName,
        "cluster",
        inv.clusters.iter().map(|c| (c.name.as_str(), &c.span)),
    );
    duplicates(
        diags,
        K::DuplicateName,
        "zone",
        inv.zones.iter().map(|z| (z.name.as_str(), &z.span)),
    );
    duplicates(
        diags,
        K::DuplicateName,
        "VM",
        inv.vms.iter().map(|v| (v.name.as_str(), &v.span)),
    );
    duplicates(
        diags,
        K::DuplicateName,
        "vNIC",
        inv.vnics().map(|(_, n)| (n.name.as_str(), &n.span)),
    );
    duplicates(
        diags,
        K::DuplicateName,
        "group",
        pol.groups.iter().map(|g| (g.name.as_str(), &g.span)),
    );
    duplicates(
        diags,
        K::DuplicateName,
        "service",
        pol.services.iter().map(|s| (s.name.as_str(), &s.span)),
    );
    duplicates(
        diags,
        K::DuplicateName,
        "profile",
        pol.profiles.iter().map(|p| (p.name.as_str(), &p.span)),
    );
    duplicates(
        diags,
        K::DuplicateRuleId,
        "rule",
        pol.rules.iter().map(|r| (r.id.as_str(), &r.span)),
    );

    let mut ips = BTreeMap::new();
    let mut macs = BTreeMap::new();
    for (vm, nic) in inv.vnics() {
        for ip in &nic.ips {
            if let Some(first) = ips.insert(*ip, (&vm.name, &nic.name)) {
                diags.push(
                    Diagnostic::error(
                        K::DuplicateIp,
                        &nic.span,
                        format!("address {ip} of vNIC \"{}\" is taken", nic.name),
                    )
                    .with_hint(format!("vNIC \"{}\" of VM \"{}\" already has it", first.1, first.0)),
                );
            }
        }
        if let Some(first) = macs.insert(nic.mac.clone(), &nic.name) {
            diags.push(
                Diagnostic::error(
                    K::DuplicateMac,
                    &nic.span,
                    format!("MAC {} of vNIC \"{}\" is taken", nic.mac, nic.name),
                )
                .with_hint(format!("vNIC \"{first}\" already has it")),
            );
        }
    }
    let mut segments: HashMap<Segment, &str> = HashMap::new();
    for z in inv.zones.iter().filter(|z| z.segment != Segment::Vlan(0)) {
        if let Some(first) = segments.insert(z.segment, &z.name) {
            diags.push(
                Diagnostic::error(
                    K::InvalidValue,
                    &z.span,
                    format!("zone \"{}\" reuses the segment of zone \"{first}\"", z.name),
                )
                .with_hint("each zone is its own L2 segment: give it another VLAN id or VNI"),
            );
        }
    }
    for vm in &inv.vms {
        let cluster = vm
            .cluster
            .as_deref()
            .and_then(|c| inv.clusters.iter().find(|k| k.name == c));
        if let (Some(c), Some(h)) = (cluster, &vm.host)
            && !c.hosts.is_empty()
            && !c.hosts.contains(h)
        {
            diags.push(
                Diagnostic::error(
                    K::InvalidValue,
                    &vm.span,
                    format!("host \"{h}\" of VM \"{}\" is not in cluster \"{}\"", vm.name, c.name),
                )
                .with_hint(did_you_mean(h, "host", c.hosts.iter().map(String::as_str))),
            );
        }
    }

    for r in refs {
        let (kind, what, names): (K, &str, Vec<&str>) = match r.kind {
            RefKind::Group => (
                K::UnknownGroup,
                "group",
                pol.groups.iter().map(|g| g.name.as_str()).collect(),
            ),
            RefKind::Service => (
                K::UnknownService,
                "service",
                pol.services.iter().map(|s| s.name.as_str()).collect(),
            ),
            RefKind::Zone => (
                K::UnknownZone,
                "zone",
                inv.zones.iter().map(|z| z.name.as_str()).collect(),
            ),
            RefKind::Cluster => (
                K::UnknownCluster,
                "cluster",
                inv.clusters.iter().map(|c| c.name.as_str()).collect(),
            ),
            RefKind::Vm => (K::UnknownVm, "VM", inv.vms.iter().map(|v| v.name.as_str()).collect()),
            RefKind::Profile => (
                K::UnknownProfile,
                "profile",
                pol.profiles.iter().map(|p| p.name.as_str()).collect(),
            ),
        };
        if !names.contains(&r.name.as_str()) {
            let hint = did_you_mean(&r.name, what, names.iter().copied());
            diags.push(
                Diagnostic::error(kind, &r.span, format!("{what} \"{}\" is not defined", r.name)).with_hint(hint),
            );
        }
    }

    for g in &pol.groups {
        if let GroupDef::Selector(sel) = &g.def
            && !inv.vnics().any(|(vm, nic)| sel.matches(vm, nic))
        {
            diags.push(
                Diagnostic::warning(
                    K::EmptySelector,
                    &g.span,
                    format!("group \"{}\" selects no vNIC", g.name),
                )
                .with_hint("check the tag values, name glob, zone and cluster it requires (they all must hold)"),
            );
        }
    }
}

//! Cross-reference and consistency checks on a loaded model.
//!
//! The loader records every name reference with its position; this module
//! checks they resolve, and that names, addresses, MACs and segments are
//! unique. Selector groups that match nothing are warned about: they are
//! legal (a tag may simply not be used yet) but often a typo.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use foldhash::{HashMap as FastMap, HashSet as FastSet};

use crate::chars::quote;
use crate::diag::{Diagnostic, DiagnosticKind as K, did_you_mean};
use crate::model::{ExternalAppliance, GroupDef, Model, Segment, Span};

/// What a name reference points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// A service chain (`redirect`).
    ServiceChain,
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
    let items = items.into_iter();
    let mut seen: FastMap<&str, &Span> = FastMap::with_capacity_and_hasher(items.size_hint().0, Default::default());
    for (name, span) in items {
        if let Some(first) = seen.get(name) {
            diags.push(
                Diagnostic::error(kind, span, format!("{what} {} is defined twice", quote(name)))
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
        K::DuplicateName,
        "service chain",
        pol.service_chains.iter().map(|c| (c.name.as_str(), &c.span)),
    );
    service_chains(model, diags);
    duplicates(
        diags,
        K::DuplicateRuleId,
        "rule",
        pol.rules.iter().map(|r| (r.id.as_str(), &r.span)),
    );

    let nics = inv.vms.iter().map(|v| v.vnics.len()).sum();
    let mut ips = FastMap::with_capacity_and_hasher(nics, Default::default());
    let mut macs = FastMap::with_capacity_and_hasher(nics, Default::default());
    for (vm, nic) in inv.vnics() {
        for ip in &nic.ips {
            if let Some(first) = ips.insert(*ip, (&vm.name, &nic.name)) {
                diags.push(
                    Diagnostic::error(
                        K::DuplicateIp,
                        &nic.span,
                        format!("address {ip} of vNIC {} is taken", quote(&nic.name)),
                    )
                    .with_hint(format!(
                        "vNIC {} of VM {} already has it",
                        quote(first.1),
                        quote(first.0)
                    )),
                );
            }
        }
        if let Some(first) = macs.insert(nic.mac.as_str(), &nic.name) {
            diags.push(
                Diagnostic::error(
                    K::DuplicateMac,
                    &nic.span,
                    format!("MAC {} of vNIC {} is taken", nic.mac, quote(&nic.name)),
                )
                .with_hint(format!("vNIC {} already has it", quote(first))),
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
                    format!("zone {} reuses the segment of zone {}", quote(&z.name), quote(first)),
                )
                .with_hint("each zone is its own L2 segment: give it another VLAN id or VNI"),
            );
        }
    }
    // Sets, not lists: at 50,000 VMs on 1,000 hosts, scanning a cluster's
    // host list per VM and the names per reference took longer than the rest.
    let clusters: FastMap<&str, FastSet<&str>> = inv
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), c.hosts.iter().map(String::as_str).collect()))
        .collect();
    for vm in &inv.vms {
        let cluster = vm.cluster.as_deref().and_then(|c| clusters.get_key_value(c));
        if let (Some((name, hosts)), Some(h)) = (cluster, &vm.host)
            && !hosts.is_empty()
            && !hosts.contains(h.as_str())
        {
            let c = inv.clusters.iter().find(|k| k.name == *name);
            diags.push(
                Diagnostic::error(
                    K::InvalidValue,
                    &vm.span,
                    format!(
                        "host {} of VM {} is not in cluster {}",
                        quote(h),
                        quote(&vm.name),
                        quote(name)
                    ),
                )
                .with_hint(did_you_mean(
                    h,
                    "host",
                    c.into_iter().flat_map(|c| c.hosts.iter().map(String::as_str)),
                )),
            );
        }
    }

    let names = |kind: RefKind| -> Vec<&str> {
        match kind {
            RefKind::Group => pol.groups.iter().map(|g| g.name.as_str()).collect(),
            RefKind::Service => pol.services.iter().map(|s| s.name.as_str()).collect(),
            RefKind::Zone => inv.zones.iter().map(|z| z.name.as_str()).collect(),
            RefKind::Cluster => inv.clusters.iter().map(|c| c.name.as_str()).collect(),
            RefKind::Vm => inv.vms.iter().map(|v| v.name.as_str()).collect(),
            RefKind::Profile => pol.profiles.iter().map(|p| p.name.as_str()).collect(),
            RefKind::ServiceChain => pol.service_chains.iter().map(|c| c.name.as_str()).collect(),
        }
    };
    let mut defined: HashMap<RefKind, FastSet<&str>> = HashMap::new();
    for r in refs {
        let known = defined
            .entry(r.kind)
            .or_insert_with(|| names(r.kind).into_iter().collect());
        if !known.contains(r.name.as_str()) {
            let (kind, what) = match r.kind {
                RefKind::Group => (K::UnknownGroup, "group"),
                RefKind::Service => (K::UnknownService, "service"),
                RefKind::Zone => (K::UnknownZone, "zone"),
                RefKind::Cluster => (K::UnknownCluster, "cluster"),
                RefKind::Vm => (K::UnknownVm, "VM"),
                RefKind::Profile => (K::UnknownProfile, "profile"),
                RefKind::ServiceChain => (K::UnknownServiceChain, "service chain"),
            };
            let hint = did_you_mean(&r.name, what, names(r.kind));
            diags.push(
                Diagnostic::error(kind, &r.span, format!("{what} {} is not defined", quote(&r.name))).with_hint(hint),
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
                    format!("group {} selects no vNIC", quote(&g.name)),
                )
                .with_hint("check the tag values, name glob, zone and cluster it requires (they all must hold)"),
            );
        }
    }
}

/// An external appliance's two VNIs: distinct, neither a zone's segment
/// (a VLAN zone travels the underlay in its VLAN id as VNI, a VNI zone in
/// its VNI: a packet back from the appliance must not be taken for one of
/// the segment's), and no (address, VNI) serving two instances (a packet
/// back from the appliance must name one instance and side).
fn external_appliance<'m>(
    model: &'m Model,
    chain: &'m str,
    ext: &ExternalAppliance,
    spans: &'m [Span; 2],
    tunnels: &mut FastMap<(Ipv4Addr, u32), (&'m str, &'m Span)>,
    diags: &mut Vec<Diagnostic>,
) {
    if ext.vni_in == ext.vni_out {
        diags.push(
            Diagnostic::error(
                K::InvalidValue,
                &spans[1],
                format!(
                    "an external appliance's vni_in and vni_out are the same VNI {}",
                    ext.vni_in
                ),
            )
            .with_hint("its two sides are told apart by their VNIs"),
        );
        return;
    }
    for (vni, span) in [ext.vni_in, ext.vni_out].into_iter().zip(spans) {
        let zone = model.inventory.zones.iter().find(|z| match z.segment {
            Segment::Vlan(v) => u32::from(v) == vni,
            Segment::Vni(v) => v == vni,
        });
        if let Some(z) = zone {
            diags.push(
                Diagnostic::error(
                    K::InvalidValue,
                    span,
                    format!("VNI {vni} is zone {}'s segment", quote(&z.name)),
                )
                .with_hint("an external appliance's VNIs must differ from every zone's VLAN id and VNI"),
            );
        } else if let Some((other, first)) = tunnels.insert((ext.address, vni), (chain, span)) {
            diags.push(
                Diagnostic::error(
                    K::InvalidValue,
                    span,
                    format!(
                        "VNI {vni} at {} already serves an appliance of chain {}",
                        ext.address,
                        quote(other)
                    ),
                )
                .with_hint(format!(
                    "first used at {first}; an (address, VNI) is one side of one appliance instance"
                )),
            );
        }
    }
}

/// The appliances of every service chain: each names a declared VM and two
/// distinct vNICs of that VM, and no vNIC serves two instances (a steered
/// packet coming back on it must name one instance).
fn service_chains(model: &Model, diags: &mut Vec<Diagnostic>) {
    let inv = &model.inventory;
    let mut taken: FastMap<&str, (&str, &Span)> = FastMap::default();
    let mut tunnels: FastMap<(Ipv4Addr, u32), (&str, &Span)> = FastMap::default();
    for chain in &model.policy.service_chains {
        for a in chain.appliances() {
            if let Some(ext) = &a.external {
                external_appliance(model, &chain.name, ext, &a.vnic_spans, &mut tunnels, diags);
                continue;
            }
            // An undefined VM is reported by the references.
            let Some(vm) = inv.vm(&a.vm) else { continue };
            let same = a.vnic_in == a.vnic_out;
            let sides = if same { 1 } else { 2 };
            for (nic, span) in [&a.vnic_in, &a.vnic_out].into_iter().zip(&a.vnic_spans).take(sides) {
                let found = vm.vnics.iter().find(|n| &n.name == nic);
                if let Some(n) = found
                    && !n.ips.is_empty()
                {
                    diags.push(
                        Diagnostic::warning(
                            K::InvalidValue,
                            span,
                            format!("appliance vNIC {} has addresses", quote(nic)),
                        )
                        .with_hint(
                            "an appliance side only passes steered packets back: traffic of its own from it is dropped",
                        ),
                    );
                }
                if found.is_none() {
                    diags.push(
                        Diagnostic::error(
                            K::InvalidValue,
                            span,
                            format!("VM {} has no vNIC {}", quote(&vm.name), quote(nic)),
                        )
                        .with_hint(did_you_mean(
                            nic,
                            "vNIC",
                            vm.vnics.iter().map(|n| n.name.as_str()),
                        )),
                    );
                } else if let Some((other, first)) = taken.insert(nic, (&chain.name, span)) {
                    diags.push(
                        Diagnostic::error(
                            K::InvalidValue,
                            span,
                            format!(
                                "vNIC {} already serves an appliance of chain {}",
                                quote(nic),
                                quote(other)
                            ),
                        )
                        .with_hint(format!(
                            "first used at {first}; a vNIC is one side of one appliance instance"
                        )),
                    );
                }
            }
            if same {
                diags.push(
                    Diagnostic::error(
                        K::InvalidValue,
                        &a.vnic_spans[1],
                        format!("an appliance's `in` and `out` are the same vNIC {}", quote(&a.vnic_in)),
                    )
                    .with_hint("a bump-in-the-wire appliance receives on one vNIC and sends on the other"),
                );
            }
        }
    }
}

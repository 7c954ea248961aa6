//! Prometheus text exposition of the agent's state.

use std::fmt::Write;

use palisade_datapath::Tally;
use palisade_datapath::port::PortId;
use palisade_datapath::{Counters, DropReason, Engine};
use palisade_io::port::PortStats;

use crate::trail::TrailStats;

/// Everything the metrics page shows.
#[derive(Debug)]
pub struct Snapshot<'a> {
    /// Host name (a label on every metric).
    pub host: &'a str,
    /// Every worker's engine (the metrics are their sums).
    pub engines: &'a [&'a Engine],
    /// (port name, interface, I/O stats) of each attached port.
    pub ports: &'a [(String, String, PortStats)],
    /// The engine port of each entry of `ports`.
    pub port_ids: &'a [PortId],
    /// The underlay socket's I/O stats.
    pub overlay: PortStats,
    /// Outputs with nowhere to go (plain uplink frames; this agent has no physical uplink).
    pub unroutable: u64,
    /// Outputs that could not be rendered.
    pub render_errors: u64,
    /// Policy reloads that failed (the previous policy stayed in force).
    pub policy_errors: u64,
    /// The audit trail, when enabled.
    pub audit: Option<TrailStats>,
    /// The live IPFIX export, when enabled.
    pub ipfix: Option<palisade_audit::ipfix::ExportStats>,
    /// Flow records the controller channel had no room for (controller mode).
    pub controller_dropped: Option<u64>,
    /// The connection-table snapshots (crash recovery).
    pub snapshots: crate::snapshot::SnapshotStats,
    /// State files refused at start, by reason.
    pub state_refused: &'a std::collections::BTreeMap<&'static str, u64>,
    /// The workers' crash journals, summed.
    pub journal: crate::journal::JournalStats,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Render the exposition text.
pub fn render(s: &Snapshot<'_>) -> String {
    let mut o = String::new();
    let h = esc(s.host);
    let c = s.engines.iter().fold(Counters::default(), |mut all, e| {
        all.merge(e.counters());
        all
    });
    let sum = |f: &dyn Fn(&Engine) -> u64| -> u64 { s.engines.iter().map(|e| f(e)).sum() };
    let mut metric = |name: &str, kind: &str, help: &str, rows: &[(String, u64)]| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let sep = if labels.is_empty() { "" } else { "," };
            let _ = writeln!(o, "{name}{{host=\"{h}\"{sep}{labels}}} {v}");
        }
    };
    let one = |v: u64| vec![(String::new(), v)];
    metric(
        "palisade_packets_total",
        "counter",
        "Frames the engine processed.",
        &one(c.packets),
    );
    let per_worker: Vec<_> = s
        .engines
        .iter()
        .enumerate()
        .map(|(i, e)| (format!("worker=\"{i}\""), e.counters().packets))
        .collect();
    metric(
        "palisade_worker_packets_total",
        "counter",
        "Frames each datapath worker processed (the kernel's steering spread).",
        &per_worker,
    );
    metric(
        "palisade_forwarded_total",
        "counter",
        "Frames forwarded.",
        &one(c.forwarded),
    );
    let drops: Vec<_> = DropReason::ALL
        .iter()
        .map(|r| (format!("reason=\"{}\"", r.name()), c.dropped(*r)))
        .collect();
    metric("palisade_drops_total", "counter", "Frames dropped, by reason.", &drops);
    metric(
        "palisade_flow_cache_hits_total",
        "counter",
        "Flow-cache hits.",
        &one(c.cache_hits),
    );
    metric(
        "palisade_flow_cache_misses_total",
        "counter",
        "Flow-cache misses (slow path).",
        &one(c.cache_misses),
    );
    metric(
        "palisade_classifications_total",
        "counter",
        "Flows classified against policy.",
        &one(c.classifications),
    );
    metric(
        "palisade_revalidations_total",
        "counter",
        "Connections re-validated after a policy change.",
        &one(c.revalidations),
    );
    metric(
        "palisade_trusted_total",
        "counter",
        "Flows trusted on another host's VXLAN-GBP verdict.",
        &one(c.trusted),
    );
    metric(
        "palisade_connections_created_total",
        "counter",
        "Connections created.",
        &one(c.conns_created),
    );
    metric(
        "palisade_flooded_total",
        "counter",
        "Frames flooded in their segment.",
        &one(c.flooded),
    );
    metric(
        "palisade_encapsulated_total",
        "counter",
        "Frames sent to other hosts over VXLAN.",
        &one(c.encapsulated),
    );
    metric(
        "palisade_flow_table_entries",
        "gauge",
        "Flow-cache entries in use.",
        &one(sum(&|e| e.flow_table().len() as u64)),
    );
    metric(
        "palisade_flow_table_capacity",
        "gauge",
        "Flow-cache capacity.",
        &one(sum(&|e| e.flow_table().capacity() as u64)),
    );
    metric(
        "palisade_connections",
        "gauge",
        "Tracked connections.",
        &one(sum(&|e| e.conntrack().len() as u64)),
    );
    metric(
        "palisade_connections_capacity",
        "gauge",
        "Connection-table capacity.",
        &one(sum(&|e| e.conntrack().capacity() as u64)),
    );
    metric(
        "palisade_policy_version",
        "gauge",
        "Policy version in force.",
        &one(s.engines.first().map_or(0, |e| e.policy_version())),
    );
    metric(
        "palisade_policy_reload_errors_total",
        "counter",
        "Policy reloads refused (the previous policy stayed).",
        &one(s.policy_errors),
    );
    metric(
        "palisade_unroutable_outputs_total",
        "counter",
        "Outputs to a plain uplink this agent does not have.",
        &one(s.unroutable),
    );
    metric(
        "palisade_render_errors_total",
        "counter",
        "Outputs that could not be rendered.",
        &one(s.render_errors),
    );
    let port_rows = |f: &dyn Fn(&PortStats) -> u64| -> Vec<(String, u64)> {
        let mut rows: Vec<_> = s
            .ports
            .iter()
            .map(|(n, i, st)| (format!("port=\"{}\",interface=\"{}\"", esc(n), esc(i)), f(st)))
            .collect();
        rows.push(("port=\"underlay\",interface=\"udp\"".into(), f(&s.overlay)));
        rows
    };
    metric(
        "palisade_port_rx_frames_total",
        "counter",
        "Frames received per port.",
        &port_rows(&|p| p.rx_frames),
    );
    metric(
        "palisade_port_tx_frames_total",
        "counter",
        "Frames sent per port.",
        &port_rows(&|p| p.tx_frames),
    );
    metric(
        "palisade_port_rx_bytes_total",
        "counter",
        "Bytes received per port.",
        &port_rows(&|p| p.rx_bytes),
    );
    metric(
        "palisade_port_tx_bytes_total",
        "counter",
        "Bytes sent per port.",
        &port_rows(&|p| p.tx_bytes),
    );
    metric(
        "palisade_port_kernel_drops_total",
        "counter",
        "Frames the kernel dropped (ring full).",
        &port_rows(&|p| p.kernel_drops),
    );
    metric(
        "palisade_port_truncated_total",
        "counter",
        "Frames too large for the ring (not forwarded).",
        &port_rows(&|p| p.truncated),
    );
    metric(
        "palisade_port_tx_errors_total",
        "counter",
        "Send errors per port.",
        &port_rows(&|p| p.tx_errors),
    );
    let vnic_drops: Vec<_> = s
        .ports
        .iter()
        .zip(s.port_ids)
        .flat_map(|((n, _, _), id)| {
            DropReason::ALL
                .iter()
                .map(move |r| {
                    (
                        format!("port=\"{}\",reason=\"{}\"", esc(n), r.name()),
                        sum(&|e| e.port_dropped(*id, *r)),
                    )
                })
                .filter(|(_, v)| *v > 0)
        })
        .collect();
    metric(
        "palisade_port_drops_total",
        "counter",
        "Frames a port sent that were dropped, by reason.",
        &vnic_drops,
    );
    // Each worker registers the rules that decided its flows; sum them by rule and level.
    let mut by_rule: Vec<(String, Tally)> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for r in s.engines.iter().flat_map(|e| e.rules()) {
        let labels = format!("rule=\"{}\",level=\"{}\"", esc(&r.rule), r.level);
        match index.get(&labels) {
            Some(&i) => {
                let t = &mut by_rule[i].1;
                t.packets += r.tally.packets;
                t.bytes += r.tally.bytes;
                t.hits += r.tally.hits;
            }
            None => {
                index.insert(labels.clone(), by_rule.len());
                by_rule.push((labels, r.tally));
            }
        }
    }
    let rules: Vec<_> = by_rule.iter().map(|(l, t)| (l.clone(), t.packets)).collect();
    metric(
        "palisade_rule_packets_total",
        "counter",
        "Packets of flows each rule decided.",
        &rules,
    );
    let hits: Vec<_> = by_rule.iter().map(|(l, t)| (l.clone(), t.hits)).collect();
    metric(
        "palisade_rule_hits_total",
        "counter",
        "Classifications each rule decided.",
        &hits,
    );
    if let Some(x) = s.ipfix {
        metric(
            "palisade_ipfix_records_total",
            "counter",
            "Flow records exported over IPFIX.",
            &one(x.records_exported),
        );
        metric(
            "palisade_ipfix_messages_total",
            "counter",
            "IPFIX messages sent.",
            &one(x.messages_sent),
        );
        metric(
            "palisade_ipfix_rate_limited_total",
            "counter",
            "Flow records not exported because of the rate limit (they stay in the audit trail).",
            &one(x.records_dropped_rate_limit),
        );
        metric(
            "palisade_ipfix_send_errors_total",
            "counter",
            "IPFIX messages that failed to send.",
            &one(x.send_errors),
        );
    }
    if let Some(d) = s.controller_dropped {
        metric(
            "palisade_controller_flow_records_dropped_total",
            "counter",
            "Flow records not sent to the controller (its queue was full; they stay in the local trail).",
            &one(d),
        );
    }
    let snap = &s.snapshots;
    metric(
        "palisade_state_snapshots_total",
        "counter",
        "Rounds of connection-table snapshots written (what a start after a crash resumes from).",
        &one(snap.written),
    );
    metric(
        "palisade_state_snapshot_failures_total",
        "counter",
        "Rounds of connection-table snapshots in which a file could not be written.",
        &one(snap.failures),
    );
    metric(
        "palisade_state_snapshot_connections",
        "gauge",
        "Connections in the last snapshot round.",
        &one(snap.last_connections),
    );
    metric(
        "palisade_state_snapshot_microseconds",
        "gauge",
        "How long the last snapshot round took (encoding and writing).",
        &one(snap.last_duration_ns / 1_000),
    );
    metric(
        "palisade_state_files_refused_total",
        "counter",
        "Saved, snapshotted or journaled state files refused at start (corrupt, truncated, foreign or without room).",
        &one(s.state_refused.values().sum()),
    );
    let by_reason: Vec<(String, u64)> = s
        .state_refused
        .iter()
        .map(|(reason, n)| (format!("reason=\"{reason}\""), *n))
        .collect();
    metric(
        "palisade_state_refused_total",
        "counter",
        "State files refused at start, by reason (truncated, checksum, bad_magic, wrong_version, malformed, \
         foreign, no_room, not_regular, unreadable).",
        &by_reason,
    );
    metric(
        "palisade_state_journal_records_total",
        "counter",
        "Connection events written to the crash journals (what a crash since the last snapshot keeps).",
        &one(s.journal.records),
    );
    metric(
        "palisade_state_journal_overflows_total",
        "counter",
        "Connection events the crash journals had no room for before the next snapshot.",
        &one(s.journal.overflows),
    );
    service_chain_metrics(s.engines, &mut metric);
    if let Some(a) = s.audit {
        metric(
            "palisade_audit_records_total",
            "counter",
            "Flow records made durable.",
            &one(a.written),
        );
        metric(
            "palisade_audit_pending_records",
            "gauge",
            "Flow records waiting for the next batch.",
            &one(a.pending),
        );
        metric(
            "palisade_audit_unsigned_records",
            "gauge",
            "Durable audit records not yet covered by a signed checkpoint (the window a tail cut could hide in).",
            &one(a.last_seq.saturating_sub(a.signed_seq)),
        );
        metric(
            "palisade_audit_head_publish_failures_total",
            "counter",
            "Signed heads that could not be published outside the trail.",
            &one(a.publish_failures),
        );
        if let Some(seq) = a.controller_seq {
            metric(
                "palisade_audit_head_controller_seq",
                "gauge",
                "The sequence number of the last signed head the controller accepted.",
                &one(seq),
            );
        }
    }
    o
}

/// Writes one metric: name, type, help and its rows (labels, value).
type Emit<'a> = dyn FnMut(&str, &str, &str, &[(String, u64)]) + 'a;

/// The service chains' counters, summed over the workers (every worker runs
/// the same chains in the same order): per instance the packets sent into
/// the appliance and returned from it, the connections steered to it and
/// whether it is up; per chain the failovers, the packets bypassed (`open`)
/// or dropped (`closed`) while no instance was up, and the offloads.
fn service_chain_metrics(engines: &[&Engine], metric: &mut Emit<'_>) {
    let Some(first) = engines.first() else { return };
    if first.service_chains().is_empty() {
        return;
    }
    let chains = first.service_chains();
    let sum = |f: &dyn Fn(&palisade_datapath::ChainStats) -> u64, ci: usize| -> u64 {
        engines.iter().filter_map(|e| e.service_chains().get(ci)).map(f).sum()
    };
    let per_instance = |f: &dyn Fn(&palisade_datapath::InstanceStats) -> u64| -> Vec<(String, u64)> {
        let mut rows = Vec::new();
        for (ci, c) in chains.iter().enumerate() {
            for (ii, i) in c.instances.iter().enumerate() {
                let v = engines
                    .iter()
                    .filter_map(|e| e.service_chains().get(ci)?.instances.get(ii))
                    .map(f)
                    .sum();
                rows.push((instance_labels(c, i), v));
            }
        }
        rows
    };
    metric(
        "palisade_service_chain_sent_total",
        "counter",
        "Packets sent into a service-chain appliance instance.",
        &per_instance(&|i| i.sent),
    );
    metric(
        "palisade_service_chain_returned_total",
        "counter",
        "Packets that came back from a service-chain appliance instance and went on.",
        &per_instance(&|i| i.returned),
    );
    metric(
        "palisade_service_chain_flows_total",
        "counter",
        "Connections steered to a service-chain appliance instance (first choice or failover).",
        &per_instance(&|i| i.flows),
    );
    // External instances (over the underlay): their tunnel traffic by address and VNIs.
    let external = |f: &dyn Fn(&palisade_datapath::InstanceStats) -> u64| -> Vec<(String, u64)> {
        let mut rows = Vec::new();
        for (ci, c) in chains.iter().enumerate() {
            for (ii, i) in c.instances.iter().enumerate() {
                let Some(x) = i.external else { continue };
                let v = engines
                    .iter()
                    .filter_map(|e| e.service_chains().get(ci)?.instances.get(ii))
                    .map(f)
                    .sum();
                let labels = format!(
                    "{},vni_in=\"{}\",vni_out=\"{}\"",
                    instance_labels(c, i),
                    x.vni_in,
                    x.vni_out
                );
                rows.push((labels, v));
            }
        }
        rows
    };
    metric(
        "palisade_service_chain_external_sent_total",
        "counter",
        "Packets sent VXLAN-encapsulated over the underlay into an external service-chain appliance.",
        &external(&|i| i.sent),
    );
    metric(
        "palisade_service_chain_external_returned_total",
        "counter",
        "Packets that came back over the underlay from an external service-chain appliance and went on.",
        &external(&|i| i.returned),
    );
    // Every worker is given the same link state: the first one's is the host's.
    let up: Vec<(String, u64)> = chains
        .iter()
        .flat_map(|c| {
            c.instances.iter().map(|i| {
                let labels = instance_labels(c, i);
                (labels, u64::from(i.up))
            })
        })
        .collect();
    metric(
        "palisade_service_chain_instance_up",
        "gauge",
        "Whether a service-chain appliance instance is up (both vNICs attached and with carrier).",
        &up,
    );
    let per_chain = |f: &dyn Fn(&palisade_datapath::ChainStats) -> u64| -> Vec<(String, u64)> {
        chains
            .iter()
            .enumerate()
            .map(|(ci, c)| (format!("chain=\"{}\"", esc(&c.name)), sum(f, ci)))
            .collect()
    };
    metric(
        "palisade_service_chain_failovers_total",
        "counter",
        "Connections moved from a service-chain instance that went down to another.",
        &per_chain(&|c| c.failovers),
    );
    metric(
        "palisade_service_chain_bypassed_total",
        "counter",
        "Packets that skipped a chain stage because none of its instances was up (on_failure: open).",
        &per_chain(&|c| c.bypassed),
    );
    metric(
        "palisade_service_chain_down_drops_total",
        "counter",
        "Packets dropped because none of a chain stage's instances was up (on_failure: closed).",
        &per_chain(&|c| c.dropped),
    );
    metric(
        "palisade_service_chain_offloads_total",
        "counter",
        "Connections an appliance offloaded (allow or drop).",
        &per_chain(&|c| c.offloaded),
    );
    let probe_up: Vec<(String, u64)> = chains
        .iter()
        .filter(|c| c.probe.is_some())
        .flat_map(|c| {
            c.instances.iter().map(|i| {
                let labels = instance_labels(c, i);
                (labels, u64::from(i.probe_up))
            })
        })
        .collect();
    metric(
        "palisade_service_chain_probe_up",
        "gauge",
        "Whether a probed service-chain instance's health probes answer (hysteresis applied).",
        &probe_up,
    );
    metric(
        "palisade_service_chain_probes_returned_total",
        "counter",
        "Health probes that came back through a service-chain instance and passed the checks.",
        &per_instance(&|i| i.probes_returned),
    );
    metric(
        "palisade_service_chain_probes_rejected_total",
        "counter",
        "Probe-shaped frames from a chain's appliance ports that failed the checks (tag, instance, side).",
        &per_chain(&|c| c.probes_rejected),
    );
}

/// The labels of a chain's instance: its chain and appliance VM, and its
/// stage (numbered from 1) when the chain has several.
fn instance_labels(c: &palisade_datapath::ChainStats, i: &palisade_datapath::InstanceStats) -> String {
    let mut labels = format!("chain=\"{}\",appliance=\"{}\"", esc(&c.name), esc(&i.vm));
    if c.stages > 1 {
        labels.push_str(&format!(",stage=\"{}\"", u32::from(i.stage) + 1));
    }
    labels
}

/// The probe monitor's counters per probed instance: frames sent, rounds
/// lost, times taken out of service.
pub fn probe_metrics(host: &str, monitor: &palisade_datapath::probe::ProbeMonitor) -> String {
    let mut rows: Vec<_> = monitor.instances().collect();
    if rows.is_empty() {
        return String::new();
    }
    rows.sort_by(|a, b| (&a.chain, &a.vm).cmp(&(&b.chain, &b.vm)));
    let mut o = String::new();
    let h = esc(host);
    type Field = fn(&palisade_datapath::probe::InstanceProbe) -> u64;
    let families: [(&str, &str, Field); 3] = [
        (
            "palisade_service_chain_probes_sent_total",
            "Health probe frames sent into a service-chain instance (two a round).",
            |i| i.sent,
        ),
        (
            "palisade_service_chain_probe_rounds_missed_total",
            "Probe rounds in which a probe did not come back through the instance in time.",
            |i| i.missed,
        ),
        (
            "palisade_service_chain_probe_downs_total",
            "Times an instance's lost probes took it out of service.",
            |i| i.downs,
        ),
    ];
    for (name, help, f) in families {
        o.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
        for i in &rows {
            o.push_str(&format!(
                "{name}{{host=\"{h}\",chain=\"{}\",appliance=\"{}\"}} {}\n",
                esc(&i.chain),
                esc(&i.vm),
                f(i)
            ));
        }
    }
    o
}

/// The fail-open metrics: each zone's `on_failure` as the fallback plan has
/// it (`palisade_fallback_planned{zone,mode}`: 1 for the mode the zone gets
/// if the agent dies; an open zone without a plan gets `closed`), whether
/// the fallback forwards now (`palisade_fallback_active{zone}`: always 0 from
/// a running agent, which removed it at start; kept so a dashboard has one
/// series per zone to alert on), and the length of the fail-open episode the
/// start ended (`palisade_fallback_last_active_seconds{zone}`).
pub fn fallback(
    host: &str,
    zones: &std::collections::BTreeMap<String, palisade_api::health::FailureMode>,
    planned_open: Option<&[String]>,
    last: Option<&crate::fallback::Episode>,
) -> String {
    let h = esc(host);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP palisade_fallback_planned The mode each zone fails in if the agent dies (fail-open plan written).\n\
         # TYPE palisade_fallback_planned gauge"
    );
    for z in zones.keys() {
        let open = planned_open.is_some_and(|p| p.iter().any(|o| o == z));
        let mode = if open { "open" } else { "closed" };
        let _ = writeln!(
            o,
            "palisade_fallback_planned{{host=\"{h}\",zone=\"{}\",mode=\"{mode}\"}} 1",
            esc(z)
        );
    }
    let _ = writeln!(
        o,
        "# HELP palisade_fallback_active Whether the zone forwards through the kernel fallback now.\n\
         # TYPE palisade_fallback_active gauge"
    );
    for z in zones.keys() {
        let _ = writeln!(o, "palisade_fallback_active{{host=\"{h}\",zone=\"{}\"}} 0", esc(z));
    }
    let _ = writeln!(
        o,
        "# HELP palisade_fallback_last_active_seconds How long the zone forwarded unfiltered while the agent was gone, before this start.\n\
         # TYPE palisade_fallback_last_active_seconds gauge"
    );
    if let Some(e) = last {
        for z in &e.zones {
            let _ = writeln!(
                o,
                "palisade_fallback_last_active_seconds{{host=\"{h}\",zone=\"{}\"}} {:.3}",
                esc(z),
                e.active_ms() as f64 / 1000.0
            );
        }
    }
    o
}

/// What became of the connections the fail-open episode this start ended
/// let through (`palisade_fallback_takeover_connections_total{outcome}`:
/// `picked_up` as established under the policy, or `cut`; see
/// [`crate::takeover`]). Nothing when this start ended no episode.
pub fn fallback_takeover(host: &str, counts: Option<crate::takeover::TakeOverCounts>) -> String {
    let Some(c) = counts else {
        return String::new();
    };
    let h = esc(host);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP palisade_fallback_takeover_connections_total TCP connections the last fail-open episode let through that this agent met mid-stream: picked up under the policy, or cut.\n\
         # TYPE palisade_fallback_takeover_connections_total counter"
    );
    for (outcome, n) in [("picked_up", c.picked_up), ("cut", c.cut)] {
        let _ = writeln!(
            o,
            "palisade_fallback_takeover_connections_total{{host=\"{h}\",outcome=\"{outcome}\"}} {n}"
        );
    }
    o
}

/// Inline inspection's counters (`palisade_inspect_*`), summed over the workers.
pub fn inspection(
    host: &str,
    c: &crate::inspection::InlineCounters,
    load_errors: u64,
    alerts_overwritten: u64,
    alerts: &crate::agent::AlertStats,
    pushed: Option<crate::upstream::AlertPushStats>,
) -> String {
    let mut out = String::new();
    let host = esc(host);
    let mut rows: Vec<(&str, &str, u64)> = vec![
        ("packets_total", "Frames inspected inline.", c.packets),
        ("bytes_total", "Bytes of the frames inspected inline.", c.bytes),
        ("alerts_total", "Alerts raised by inline inspection.", c.alerts),
        ("drops_total", "Flows dropped by a drop signature.", c.drops),
        ("rejects_total", "Flows rejected by a reject signature.", c.rejects),
        (
            "bypassed_total",
            "Frames forwarded uninspected: the port's inspection budget was spent and its zone fails open.",
            c.bypassed,
        ),
        (
            "budget_drops_total",
            "Frames dropped uninspected: the port's inspection budget was spent and its zone fails closed.",
            c.budget_drops,
        ),
        (
            "unknown_profile_total",
            "Frames of flows whose inspection profile the loaded signatures lack.",
            c.unknown_profile,
        ),
        (
            "undecodable_total",
            "Frames the inspector could not decode (forwarded).",
            c.undecodable,
        ),
        (
            "flows_evicted_total",
            "Inspected flows forgotten to make room.",
            c.flows_evicted,
        ),
        (
            "alerts_discarded_total",
            "Alert records not kept (a worker raised more than the control thread took).",
            c.alerts_discarded + alerts_overwritten,
        ),
        (
            "alerts_shed_total",
            "Alerts a worker shed past its bound (not recorded one by one: an \"alerts not recorded\" audit record counts them).",
            c.alerts_discarded,
        ),
        (
            "blocked_alerts_shed_total",
            "Of the alerts shed, drop or reject alerts (past their own, larger bound).",
            c.blocked_discarded,
        ),
        (
            "alerts_coalesced_total",
            "Repeated alert-only hits of a signature on a flow folded into one record's count.",
            c.alerts_coalesced,
        ),
        (
            "alerts_recorded_total",
            "Alert records queued for the audit trail.",
            alerts.recorded,
        ),
        (
            "alerts_not_recorded_records_total",
            "\"Alerts not recorded\" records written to the audit trail.",
            alerts.gap_records,
        ),
        (
            "load_errors_total",
            "Signature loads that failed at a policy change (the previous signatures stayed).",
            load_errors,
        ),
    ];
    if let Some(p) = pushed {
        rows.extend([
            ("alerts_pushed_total", "Alerts the controller accepted.", p.pushed),
            (
                "alerts_push_shed_total",
                "Alerts not sent to the controller: too many waiting, or refused as malformed (they are in the trail).",
                p.shed,
            ),
            (
                "alerts_push_failures_total",
                "Alert pushes to the controller that failed (retried).",
                p.failures,
            ),
        ]);
    }
    for (name, help, v) in rows {
        inspect_series(&mut out, "counter", name, help, &host, v);
    }
    out
}

/// One `palisade_inspect_NAME{host="HOST"}` series of `kind` (counter or
/// gauge) with its HELP and TYPE lines.
fn inspect_series(out: &mut String, kind: &str, name: &str, help: &str, host: &str, v: impl std::fmt::Display) {
    use std::fmt::Write as _;
    let _ = write!(
        out,
        "# HELP palisade_inspect_{name} {help}\n# TYPE palisade_inspect_{name} {kind}\npalisade_inspect_{name}{{host=\"{host}\"}} {v}\n"
    );
}

/// What inline inspection holds now (every worker's): gauges beside its counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InlineGauges {
    /// Inspected flows tracked.
    pub flows: usize,
    /// Stream bytes those flows hold (reassembly, charged to the workers' budgets).
    pub held_bytes: usize,
    /// Flows taken from another host's migration, held until its commit.
    pub staged_flows: usize,
}

impl InlineGauges {
    /// Add one worker's `inline`.
    pub fn add(&mut self, inline: &crate::inspection::Inline) {
        self.flows += inline.flows();
        self.held_bytes += inline.stream_memory_in_use();
        self.staged_flows += inline.staged_total();
    }
}

/// Inline inspection's state and its live migration counts, in the
/// Prometheus text format (`palisade_inspect_*`, beside [`inspection`]'s):
/// the flows and held bytes now, the flows carried in and out, those taken
/// up mid-stream or of an unknown profile, and the sections refused.
pub fn inspection_state(host: &str, g: &InlineGauges, c: &crate::inspection::InlineCounters) -> String {
    let mut out = String::new();
    let host = esc(host);
    let gauges: [(&str, &str, usize); 3] = [
        ("flows", "Inspected flows tracked by inline inspection.", g.flows),
        (
            "held_bytes",
            "Stream bytes the inspected flows hold for reassembly.",
            g.held_bytes,
        ),
        (
            "migration_staged_flows",
            "Inspected flows taken from a migration's pre-copy or delta, held until its commit.",
            g.staged_flows,
        ),
    ];
    for (name, help, v) in gauges {
        inspect_series(&mut out, "gauge", name, help, &host, v);
    }
    let counters: [(&str, &str, u64); 5] = [
        (
            "migration_flows_in_total",
            "Inspected flows taken over from another host with their state (live migration).",
            c.flows_migrated_in,
        ),
        (
            "migration_flows_out_total",
            "Inspected flows' records sent to another host (pre-copy, delta or whole).",
            c.flows_migrated_out,
        ),
        (
            "migration_midstream_total",
            "Migrated flows whose reassembly or parser state could not be taken, resumed mid-stream.",
            c.migrated_midstream,
        ),
        (
            "migration_unknown_profile_total",
            "Migrated flows not taken over: their inspection profile is unknown here.",
            c.migrated_unknown_profile,
        ),
        (
            "migration_sections_refused_total",
            "Inspection sections from another host refused (nothing of them taken up).",
            c.migration_sections_refused,
        ),
    ];
    for (name, help, v) in counters {
        inspect_series(&mut out, "counter", name, help, &host, v);
    }
    out
}

#[cfg(test)]
mod tests {
    use core::net::Ipv4Addr;

    use palisade_datapath::port::{self, UplinkConfig, VnicPort};
    use palisade_datapath::{Engine, EngineConfig, EventSink, FlowEvent, PolicyLookup, Results};
    use palisade_policy::compile::Compiler;
    use palisade_policy::model::Segment as ZoneSegment;
    use palisade_policy::{MemorySource, load};
    use palisade_wire::ethernet::EthernetAddress;
    use palisade_wire::tcp::TcpFlags;

    struct NoEvents;
    impl EventSink for NoEvents {
        fn event(&mut self, _: &FlowEvent) {}
    }

    const POLICY: &str = r#"
version: 1
datacenter: { name: dc1, default: deny }
zones: [{ name: web, vlan: 100 }]
vms:
  - { name: web-1, uuid: 00000000-0000-4000-8000-000000000001, tags: { tier: web }, vnics: [{ name: web-1.0, mac: "02:00:00:00:00:01", ips: [10.0.0.1], zone: web }] }
groups:
  web: { tags: { tier: web } }
  internet: external
service_chains:
  ns-ext:
    appliances: [{ external: { address: 192.0.2.10, vni_in: 7001, vni_out: 7002 } }]
rules:
  zone:web:
    - { id: web-in, from: internet, to: web, service: tcp/80, action: allow, redirect: ns-ext }
"#;

    #[test]
    fn an_external_instance_is_named_by_address_and_its_tunnel_traffic_counted_with_its_vnis() {
        let loaded = load(&MemorySource::new().with("p.yaml", POLICY)).unwrap();
        assert!(!loaded.has_errors(), "{}", loaded.render());
        let uplink = UplinkConfig {
            local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 1]),
            local_ip: Ipv4Addr::new(192, 168, 0, 1),
            gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
            flood: vec![],
        };
        let mut e = Engine::new(
            EngineConfig::new(uplink),
            Box::new(PolicyLookup::new(Compiler::new(loaded.model.clone()).unwrap())),
        );
        e.add_vnic(port::vnic_from_model(&loaded.model, "web-1.0", &[], 100).unwrap())
            .unwrap();
        let router_mac = [2, 0, 0, 0, 0xee, 1];
        let router = e
            .add_vnic(VnicPort {
                name: "edge-web".into(),
                vm: "edge".into(),
                mac: EthernetAddress(router_mac),
                ips: vec![],
                zone: "web".into(),
                segment: port::zone_segment(ZoneSegment::Vlan(100)),
                group_id: 0,
                strict: false,
                max_conns: 100,
                any_source: true,
            })
            .unwrap();
        let syn = palisade_testkit::engine::tcp_v4_frame(
            (router_mac, Ipv4Addr::new(203, 0, 113, 9), 40000),
            ([2, 0, 0, 0, 0, 1], Ipv4Addr::new(10, 0, 0, 1), 80),
            (1, 0),
            TcpFlags::SYN,
            &[],
        );
        let mut results = Results::default();
        let p = e.process(1, router, &syn, &mut NoEvents, &mut results);
        assert_eq!(p.outputs[0].encap.map(|x| x.remote), Some(Ipv4Addr::new(192, 0, 2, 10)));
        let mut rows = Vec::new();
        super::service_chain_metrics(&[&e], &mut |name: &str, _: &str, _: &str, r: &[(String, u64)]| {
            for (labels, v) in r {
                rows.push(format!("{name}{{{labels}}} {v}"));
            }
        });
        let tunnel = "chain=\"ns-ext\",appliance=\"192.0.2.10\",vni_in=\"7001\",vni_out=\"7002\"";
        for want in [
            format!("palisade_service_chain_external_sent_total{{{tunnel}}} 1"),
            format!("palisade_service_chain_external_returned_total{{{tunnel}}} 0"),
            "palisade_service_chain_sent_total{chain=\"ns-ext\",appliance=\"192.0.2.10\"} 1".to_string(),
            "palisade_service_chain_instance_up{chain=\"ns-ext\",appliance=\"192.0.2.10\"} 1".to_string(),
        ] {
            assert!(rows.contains(&want), "{want} not in {rows:#?}");
        }
    }
}

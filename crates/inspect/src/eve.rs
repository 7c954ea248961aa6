//! EVE JSON records, with Suricata's field names so existing tooling reads
//! them: `alert`, `drop` and `flow` events.
//!
//! Common fields: `timestamp` (ISO 8601 with microseconds and a `+0000`
//! offset), `flow_id`, `pcap_cnt` (offline only), `event_type`, `src_ip`,
//! `src_port`, `dest_ip`, `dest_port` (or `icmp_type` and `icmp_code`),
//! `proto`, `app_proto`. Alerts add `direction` and the `alert` object
//! (`action`, `gid`, `signature_id`, `rev`, `signature`, `category`,
//! `severity`, `metadata`). Application records (`http`, `tls`, `dns`) carry
//! the fields Suricata's do for what the parsers see. Palisade's identity of the traffic (the VM, its
//! zone, the policy rule that chose inspection) goes in an optional
//! `palisade` object, which Suricata tooling ignores.

use core::net::IpAddr;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::app::AppRecord;
use crate::engine::{Alert, AlertAction};
use crate::flow::{Direction, FlowState, FlowVerdict};
use crate::ruleset::RuleSet;
use crate::tcp::TcpState;

/// Which records to write (the `types` of an `eve-log` output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EveOptions {
    /// `alert` records.
    pub alert: bool,
    /// `flow` records, one per flow when it ends.
    pub flow: bool,
    /// `drop` records (IPS mode only), if enabled.
    pub drop: Option<DropLog>,
    /// `http` records, one per transaction.
    pub http: bool,
    /// `dns` records, one per query.
    pub dns: bool,
    /// `tls` records, one per handshake.
    pub tls: bool,
}

/// The `drop` output's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropLog {
    /// Add the alert that caused the drop (`alerts: yes`).
    pub alerts: bool,
    /// Log only the first dropped packet of each direction of a flow
    /// (`flows: start`), rather than every one (`flows: all`); drops a rule
    /// caused directly are always logged.
    pub flows_start: bool,
}

impl Default for EveOptions {
    /// Suricata's default configuration: alerts, flows and the application
    /// protocols; no drops.
    fn default() -> Self {
        EveOptions {
            alert: true,
            flow: true,
            drop: None,
            http: true,
            dns: true,
            tls: true,
        }
    }
}

/// Who the traffic belongs to, in Palisade's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The VM.
    pub vm: Option<String>,
    /// Its zone.
    pub zone: Option<String>,
    /// The policy rule that selected inspection.
    pub rule: Option<String>,
    /// The inspection profile.
    pub profile: Option<String>,
}

impl Identity {
    fn to_value(&self) -> Option<Value> {
        let mut m = Map::new();
        for (k, v) in [
            ("vm", &self.vm),
            ("zone", &self.zone),
            ("rule", &self.rule),
            ("profile", &self.profile),
        ] {
            if let Some(v) = v {
                m.insert(k.into(), Value::String(v.clone()));
            }
        }
        (!m.is_empty()).then_some(Value::Object(m))
    }
}

/// Addresses and ports of a record, in the direction it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    /// IP protocol.
    pub proto: u8,
    /// Source.
    pub src: IpAddr,
    /// Source port.
    pub sp: u16,
    /// Destination.
    pub dst: IpAddr,
    /// Destination port.
    pub dp: u16,
    /// ICMP type and code, for ICMP.
    pub icmp: Option<(u8, u8)>,
}

/// Suricata's protocol names.
pub fn proto_name(p: u8) -> String {
    match p {
        1 => "ICMP".into(),
        2 => "IGMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        47 => "GRE".into(),
        50 => "ESP".into(),
        51 => "AH".into(),
        58 => "IPv6-ICMP".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}

/// `2024-01-31T12:34:56.123456+0000`.
pub fn timestamp(t: Duration) -> String {
    let secs = t.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}+0000",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        t.subsec_micros()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn header(
    event: &str,
    ts: Duration,
    flow_id: Option<u64>,
    pcap_cnt: Option<u64>,
    t: &Tuple,
    app: Option<&str>,
) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("timestamp".into(), Value::String(timestamp(ts)));
    m.insert("flow_id".into(), json!(flow_id));
    if let Some(n) = pcap_cnt {
        m.insert("pcap_cnt".into(), json!(n));
    }
    m.insert("event_type".into(), Value::String(event.into()));
    m.insert("src_ip".into(), Value::String(t.src.to_string()));
    match t.icmp {
        Some(_) => {}
        None if t.proto == 6 || t.proto == 17 || t.proto == 132 => {
            m.insert("src_port".into(), json!(t.sp));
        }
        None => {}
    }
    m.insert("dest_ip".into(), Value::String(t.dst.to_string()));
    if t.icmp.is_none() && (t.proto == 6 || t.proto == 17 || t.proto == 132) {
        m.insert("dest_port".into(), json!(t.dp));
    }
    m.insert("proto".into(), Value::String(proto_name(t.proto)));
    m.insert("ip_v".into(), json!(if t.src.is_ipv4() { 4 } else { 6 }));
    if let Some((ty, code)) = t.icmp {
        m.insert("icmp_type".into(), json!(ty));
        m.insert("icmp_code".into(), json!(code));
    }
    if let Some(a) = app {
        m.insert("app_proto".into(), Value::String(a.into()));
    }
    m
}

/// The `alert` object of an alert (also used in drop records).
pub fn alert_object(rules: &RuleSet, alert: &Alert) -> Value {
    let sig = rules.get(alert.sig);
    let r = &sig.rule;
    let mut a = Map::new();
    a.insert(
        "action".into(),
        Value::String(
            match alert.action {
                AlertAction::Allowed => "allowed",
                AlertAction::Blocked => "blocked",
            }
            .into(),
        ),
    );
    a.insert("gid".into(), json!(r.gid));
    a.insert("signature_id".into(), json!(r.sid));
    a.insert("rev".into(), json!(r.rev));
    a.insert("signature".into(), Value::String(r.msg.clone()));
    a.insert(
        "category".into(),
        Value::String(rules.category(alert.sig).unwrap_or("").into()),
    );
    a.insert("severity".into(), json!(sig.priority));
    if !r.metadata.is_empty() {
        let mut md: Map<String, Value> = Map::new();
        for entry in &r.metadata {
            let (k, v) = entry.split_once(' ').unwrap_or((entry.as_str(), ""));
            let list = md
                .entry(k.trim().to_string())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(l) = list {
                l.push(Value::String(v.trim().to_string()));
            }
        }
        a.insert("metadata".into(), Value::Object(md));
    }
    Value::Object(a)
}

/// An `alert` record (`flow_id` is `None` for a packet that has no flow).
#[allow(clippy::too_many_arguments)]
pub fn alert_record(
    rules: &RuleSet,
    alert: &Alert,
    ts: Duration,
    flow_id: Option<u64>,
    pcap_cnt: Option<u64>,
    tuple: &Tuple,
    app: Option<&str>,
    identity: Option<&Identity>,
) -> Value {
    let mut m = header("alert", ts, flow_id, pcap_cnt, tuple, app);
    m.insert(
        "direction".into(),
        Value::String(
            match alert.direction {
                Direction::ToServer => "to_server",
                Direction::ToClient => "to_client",
            }
            .into(),
        ),
    );
    m.insert("alert".into(), alert_object(rules, alert));
    if let Some(v) = identity.and_then(Identity::to_value) {
        m.insert("palisade".into(), v);
    }
    Value::Object(m)
}

/// A `drop` record.
#[allow(clippy::too_many_arguments)]
pub fn drop_record(
    rules: &RuleSet,
    cause: Option<&Alert>,
    reason: &str,
    ts: Duration,
    flow_id: Option<u64>,
    pcap_cnt: Option<u64>,
    tuple: &Tuple,
    ip_len: usize,
    ttl: u8,
    app: Option<&str>,
    identity: Option<&Identity>,
) -> Value {
    let mut m = header("drop", ts, flow_id, pcap_cnt, tuple, app);
    m.insert("drop".into(), json!({ "len": ip_len, "ttl": ttl, "reason": reason }));
    if let Some(a) = cause {
        m.insert("alert".into(), alert_object(rules, a));
    }
    if let Some(v) = identity.and_then(Identity::to_value) {
        m.insert("palisade".into(), v);
    }
    Value::Object(m)
}

fn text(b: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(b).into_owned())
}

fn rrtype(t: u16) -> String {
    match t {
        1 => "A".into(),
        2 => "NS".into(),
        5 => "CNAME".into(),
        6 => "SOA".into(),
        12 => "PTR".into(),
        15 => "MX".into(),
        16 => "TXT".into(),
        28 => "AAAA".into(),
        33 => "SRV".into(),
        65 => "HTTPS".into(),
        255 => "ANY".into(),
        n => n.to_string(),
    }
}

fn rcode(c: u8) -> String {
    match c {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => n.to_string(),
    }
}

/// Whether `options` asks for records of this kind.
pub fn wants(options: &EveOptions, record: &AppRecord) -> bool {
    match record {
        AppRecord::Http { .. } => options.http,
        AppRecord::Tls { .. } => options.tls,
        AppRecord::Dns { .. } => options.dns,
    }
}

/// The `http`, `tls` or `dns` records of a transaction (a DNS query and its
/// answer are two records, as in Suricata); `tuple` goes from client to server.
pub fn app_records(
    record: &AppRecord,
    ts: Duration,
    flow_id: u64,
    pcap_cnt: Option<u64>,
    tuple: &Tuple,
    identity: Option<&Identity>,
) -> Vec<Value> {
    if let AppRecord::Dns {
        id,
        queries,
        rcode: Some(rc),
        query_seen: true,
    } = record
    {
        let query = AppRecord::Dns {
            id: *id,
            queries: queries.clone(),
            rcode: None,
            query_seen: true,
        };
        let answer = AppRecord::Dns {
            id: *id,
            queries: queries.clone(),
            rcode: Some(*rc),
            query_seen: false,
        };
        return [query, answer]
            .iter()
            .map(|r| app_record(r, ts, flow_id, pcap_cnt, tuple, identity))
            .collect();
    }
    vec![app_record(record, ts, flow_id, pcap_cnt, tuple, identity)]
}

fn app_record(
    record: &AppRecord,
    ts: Duration,
    flow_id: u64,
    pcap_cnt: Option<u64>,
    tuple: &Tuple,
    identity: Option<&Identity>,
) -> Value {
    let (event, app, body) = match record {
        AppRecord::Http {
            method,
            url,
            hostname,
            user_agent,
            protocol,
            status,
            length,
            http2,
        } => {
            let mut h = Map::new();
            if let Some(v) = hostname {
                h.insert("hostname".into(), text(v));
            }
            h.insert("url".into(), text(url));
            if let Some(v) = user_agent {
                h.insert("http_user_agent".into(), text(v));
            }
            h.insert("http_method".into(), text(method));
            if !protocol.is_empty() {
                h.insert("protocol".into(), text(protocol));
            }
            if let Some(code) = status
                .as_deref()
                .and_then(|s| std::str::from_utf8(s).ok()?.parse::<u16>().ok())
            {
                h.insert("status".into(), json!(code));
            }
            h.insert("length".into(), json!(length));
            ("http", if *http2 { "http2" } else { "http" }, Value::Object(h))
        }
        AppRecord::Tls { sni, version } => {
            let mut t = Map::new();
            if let Some(v) = sni {
                t.insert("sni".into(), text(v));
            }
            let v = match version {
                0x0300 => "SSLv3".to_string(),
                0x0301 => "TLSv1".to_string(),
                0x0302 => "TLS 1.1".to_string(),
                0x0303 => "TLS 1.2".to_string(),
                0x0304 => "TLS 1.3".to_string(),
                n => format!("{n:#06x}"),
            };
            t.insert("version".into(), Value::String(v));
            ("tls", "tls", Value::Object(t))
        }
        AppRecord::Dns {
            id, queries, rcode: rc, ..
        } => {
            let mut d = Map::new();
            d.insert("version".into(), json!(3));
            d.insert(
                "type".into(),
                Value::String(if rc.is_some() { "response" } else { "request" }.into()),
            );
            d.insert("id".into(), json!(id));
            if let Some(c) = rc {
                d.insert("rcode".into(), Value::String(rcode(*c)));
            }
            d.insert(
                "queries".into(),
                Value::Array(
                    queries
                        .iter()
                        .map(|(name, t)| json!({ "rrname": String::from_utf8_lossy(name), "rrtype": rrtype(*t) }))
                        .collect(),
                ),
            );
            ("dns", "dns", Value::Object(d))
        }
    };
    let mut m = header(event, ts, Some(flow_id), pcap_cnt, tuple, Some(app));
    m.insert(event.into(), body);
    if let Some(v) = identity.and_then(Identity::to_value) {
        m.insert("palisade".into(), v);
    }
    Value::Object(m)
}

/// A `flow` record for a flow that ended (`reason`: `timeout`, `shutdown`, `tcp_reuse`).
pub fn flow_record(
    flow: &FlowState,
    flow_id: u64,
    start: Duration,
    end: Duration,
    reason: &str,
    icmp: Option<(u8, u8)>,
    identity: Option<&Identity>,
) -> Value {
    let (c, s) = (flow.client(), flow.server());
    let tuple = Tuple {
        proto: flow.protocol(),
        src: c.0,
        sp: c.1,
        dst: s.0,
        dp: s.1,
        icmp,
    };
    let mut m = header("flow", start, Some(flow_id), None, &tuple, flow.app_name());
    let counts = flow.counts();
    let state = match flow.tcp_state() {
        Some(TcpState::Closed) => "closed",
        Some(TcpState::None | TcpState::SynSent | TcpState::SynRecv) => "new",
        Some(_) => "established",
        None if counts.packets[0] > 0 && counts.packets[1] > 0 => "established",
        None => "new",
    };
    let mut f = Map::new();
    f.insert("pkts_toserver".into(), json!(counts.packets[0]));
    f.insert("pkts_toclient".into(), json!(counts.packets[1]));
    f.insert("bytes_toserver".into(), json!(counts.bytes[0]));
    f.insert("bytes_toclient".into(), json!(counts.bytes[1]));
    f.insert("start".into(), Value::String(timestamp(start)));
    f.insert("end".into(), Value::String(timestamp(end)));
    f.insert("age".into(), json!(end.saturating_sub(start).as_secs()));
    f.insert("state".into(), Value::String(state.into()));
    f.insert("reason".into(), Value::String(reason.into()));
    f.insert("alerted".into(), Value::Bool(flow.alerted()));
    match flow.verdict() {
        FlowVerdict::Drop => {
            f.insert("action".into(), Value::String("drop".into()));
        }
        FlowVerdict::Pass => {
            f.insert("action".into(), Value::String("pass".into()));
        }
        FlowVerdict::Inspect => {}
    }
    m.insert("flow".into(), Value::Object(f));
    if let Some(v) = identity.and_then(Identity::to_value) {
        m.insert("palisade".into(), v);
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(Duration::from_micros(0)), "1970-01-01T00:00:00.000000+0000");
        assert_eq!(
            timestamp(Duration::new(1_468_449_727, 199_844_000)),
            "2016-07-13T22:42:07.199844+0000"
        );
        assert_eq!(
            timestamp(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000000+0000"
        );
    }
}

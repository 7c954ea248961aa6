//! Inline inspection's alerts, as agents push them: kept in memory, per
//! host, for `GET /v1/alerts`.
//!
//! Why memory and not the store or the controller's audit log: each alert
//! is already durable where it was raised (the host's signed audit trail,
//! which `palisade flows --dir … --kind alert` and `audit verify` read), so
//! the controller's copy is the operator's view across hosts, not the
//! evidence. Kept per host with a fixed bound ([`ALERTS_PER_HOST`], oldest
//! first out, over at most [`MAX_ALERT_HOSTS`] hosts), one noisy or
//! compromised host can only push out its own alerts, never another
//! host's, and cannot grow the controller's store (etcd is for
//! configuration, not an event stream) or its trail. Memory is bounded in
//! bytes too: a record is at most [`MAX_ALERT_RECORD_BYTES`] encoded, and
//! past [`MAX_ALERT_BYTES`] for all hosts together the host holding the
//! most bytes loses its oldest (the noisy host, again, before the others). What this costs: the
//! alerts of a controller that restarts are gone from its view (they stay
//! in the hosts' trails), and with several controllers each holds the alerts
//! pushed to it.

use std::collections::{HashMap, VecDeque};

use palisade_api::{
    ALERTS_PER_HOST, AlertCounts, AlertList, AlertPushResponse, AlertQuery, MAX_ALERT_BATCH, MAX_ALERT_BYTES,
    MAX_ALERT_HOSTS, MAX_ALERT_RECORD_BYTES,
};
use palisade_audit::record::AlertRecord;

/// Why a push or a query was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlertError {
    /// Over a count limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// Well formed, but not this host's, or a filter out of range (400).
    #[error("{0}")]
    BadRequest(String),
}

#[derive(Debug, Default)]
struct HostAlerts {
    /// Each alert with its encoded size.
    ring: VecDeque<(AlertRecord, usize)>,
    /// The encoded bytes of `ring`.
    bytes: usize,
    evicted: u64,
    /// When it was last pushed to (a push counter), to forget the stalest host first.
    touched: u64,
}

/// The alerts of every host, bounded per host.
#[derive(Debug)]
pub struct AlertStore {
    hosts: HashMap<String, HostAlerts>,
    /// The encoded bytes of every host's alerts.
    bytes: usize,
    /// The bound on `bytes` ([`MAX_ALERT_BYTES`]; smaller in tests).
    max_bytes: usize,
    pushes: u64,
    received: u64,
    evicted: u64,
}

impl Default for AlertStore {
    /// An empty store bounded by [`MAX_ALERT_BYTES`].
    fn default() -> AlertStore {
        AlertStore::new()
    }
}

impl AlertStore {
    /// An empty store.
    pub fn new() -> AlertStore {
        AlertStore::with_max_bytes(MAX_ALERT_BYTES)
    }

    /// An empty store holding at most `max_bytes` of encoded alerts.
    pub fn with_max_bytes(max_bytes: usize) -> AlertStore {
        AlertStore {
            hosts: HashMap::new(),
            bytes: 0,
            max_bytes,
            pushes: 0,
            received: 0,
            evicted: 0,
        }
    }

    /// Keep `records`, all of which must be `host`'s (else nothing is kept).
    pub fn push(&mut self, host: &str, records: Vec<AlertRecord>) -> Result<AlertPushResponse, AlertError> {
        if records.len() > MAX_ALERT_BATCH {
            return Err(AlertError::TooLarge(format!(
                "{} alerts in one request; the limit is {MAX_ALERT_BATCH}",
                records.len()
            )));
        }
        if let Some((i, r)) = records.iter().enumerate().find(|(_, r)| r.host != host) {
            return Err(AlertError::BadRequest(format!(
                "alert {i} has host {:?}, not {host:?}; nothing was kept",
                r.host
            )));
        }
        let mut sized = Vec::with_capacity(records.len());
        for (i, r) in records.into_iter().enumerate() {
            let len = serde_json::to_vec(&r).map_or(usize::MAX, |v| v.len());
            if len > MAX_ALERT_RECORD_BYTES {
                return Err(AlertError::TooLarge(format!(
                    "alert {i} is {len} bytes encoded; the limit is {MAX_ALERT_RECORD_BYTES}; nothing was kept"
                )));
            }
            sized.push((r, len));
        }
        if !self.hosts.contains_key(host) && self.hosts.len() >= MAX_ALERT_HOSTS {
            // Forget the host pushed to least recently (a scan: only at the bound).
            if let Some(stale) = self.hosts.iter().min_by_key(|(_, h)| h.touched).map(|(k, _)| k.clone())
                && let Some(gone) = self.hosts.remove(&stale)
            {
                self.evicted += gone.ring.len() as u64;
                self.bytes -= gone.bytes;
            }
        }
        self.pushes += 1;
        let accepted = sized.len() as u64;
        self.received += accepted;
        let h = self.hosts.entry(host.to_string()).or_default();
        h.touched = self.pushes;
        for (r, len) in sized {
            if h.ring.len() == ALERTS_PER_HOST
                && let Some((_, old)) = h.ring.pop_front()
            {
                h.bytes -= old;
                self.bytes -= old;
                h.evicted += 1;
                self.evicted += 1;
            }
            h.ring.push_back((r, len));
            h.bytes += len;
            self.bytes += len;
        }
        self.shrink();
        let h = &self.hosts[host];
        Ok(AlertPushResponse {
            accepted,
            kept: h.ring.len() as u64,
            evicted: h.evicted,
        })
    }

    /// Past the byte bound, take the oldest alerts of the host holding the most bytes.
    fn shrink(&mut self) {
        while self.bytes > self.max_bytes {
            let Some(h) = self.hosts.values_mut().max_by_key(|h| h.bytes) else {
                return;
            };
            while self.bytes > self.max_bytes
                && let Some((_, len)) = h.ring.pop_front()
            {
                h.bytes -= len;
                self.bytes -= len;
                h.evicted += 1;
                self.evicted += 1;
                if h.ring.is_empty() {
                    break;
                }
            }
        }
    }

    /// The alerts matching `q`: the newest `limit` (default
    /// [`palisade_api::DEFAULT_ALERT_LIMIT`]), oldest first.
    pub fn query(&self, q: &AlertQuery) -> Result<AlertList, AlertError> {
        let limit = q.limit.unwrap_or(palisade_api::DEFAULT_ALERT_LIMIT);
        if limit > palisade_api::MAX_ALERT_LIMIT {
            return Err(AlertError::BadRequest(format!(
                "limit={limit} is over the maximum of {}",
                palisade_api::MAX_ALERT_LIMIT
            )));
        }
        if let Some(a) = &q.action
            && a != "allowed"
            && a != "blocked"
        {
            return Err(AlertError::BadRequest(format!(
                "action={a:?}: expected allowed or blocked"
            )));
        }
        let matches = |r: &&AlertRecord| {
            q.vm.as_ref().is_none_or(|vm| r.names_vm(vm))
                && q.sid.is_none_or(|s| r.alert.signature_id == s)
                && q.action.as_ref().is_none_or(|a| r.alert.action == *a)
                && q.since_ns.is_none_or(|t| r.last_ns.max(r.time_ns) >= t)
                && q.until_ns.is_none_or(|t| r.time_ns < t)
        };
        let mut found: Vec<&AlertRecord> = match &q.host {
            Some(h) => self
                .hosts
                .get(h)
                .into_iter()
                .flat_map(|h| h.ring.iter().map(|(r, _)| r))
                .filter(matches)
                .collect(),
            None => self
                .hosts
                .values()
                .flat_map(|h| h.ring.iter().map(|(r, _)| r))
                .filter(matches)
                .collect(),
        };
        // Hosts' clocks interleave: by time, then host, for a stable answer.
        found.sort_by(|a, b| (a.time_ns, &a.host).cmp(&(b.time_ns, &b.host)));
        let truncated = found.len() > limit;
        let skip = found.len().saturating_sub(limit);
        Ok(AlertList {
            alerts: found.into_iter().skip(skip).cloned().collect(),
            truncated,
        })
    }

    /// Counts for `/v1/status`.
    pub fn counts(&self) -> AlertCounts {
        AlertCounts {
            received: self.received,
            kept: self.hosts.values().map(|h| h.ring.len() as u64).sum(),
            evicted: self.evicted,
            hosts: self.hosts.len() as u64,
            bytes: self.bytes as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_audit::record::{AlertInfo, VmIdentity};

    fn alert(host: &str, t: u64, sid: u32, blocked: bool, vm: Option<&str>) -> AlertRecord {
        AlertRecord {
            timestamp: palisade_audit::time::format_rfc3339(t),
            time_ns: t,
            host: host.into(),
            flow_id: t,
            proto: "TCP".into(),
            src_ip: "198.51.100.7".parse().unwrap(),
            src_port: 40000,
            dest_ip: "10.0.1.11".parse().unwrap(),
            dest_port: 80,
            alert: AlertInfo {
                action: if blocked { "blocked" } else { "allowed" }.into(),
                rule_action: if blocked { "drop" } else { "alert" }.into(),
                signature_id: sid,
                rev: 1,
                signature: "test".into(),
                category: None,
                severity: 1,
            },
            profile: "full".into(),
            decided_by: Vec::new(),
            src: None,
            dest: vm.map(|n| VmIdentity {
                name: n.into(),
                uuid: "u".into(),
                vnic: format!("{n}.0"),
                zone: "web".into(),
                cluster: None,
                host: Some(host.into()),
                tags: Default::default(),
            }),
            count: 1,
            last_ns: t,
        }
    }

    #[test]
    fn a_noisy_host_pushes_out_only_its_own_alerts() {
        let mut s = AlertStore::new();
        s.push("quiet", vec![alert("quiet", 1, 7, true, Some("db-1"))]).unwrap();
        for chunk in 0..(ALERTS_PER_HOST / MAX_ALERT_BATCH + 2) {
            let batch = (0..MAX_ALERT_BATCH)
                .map(|i| alert("noisy", 10 + (chunk * MAX_ALERT_BATCH + i) as u64, 9, false, None))
                .collect();
            s.push("noisy", batch).unwrap();
        }
        let c = s.counts();
        assert_eq!(c.kept, ALERTS_PER_HOST as u64 + 1);
        assert_eq!(c.evicted, 2 * MAX_ALERT_BATCH as u64);
        let quiet = s
            .query(&AlertQuery {
                host: Some("quiet".into()),
                ..AlertQuery::default()
            })
            .unwrap();
        assert_eq!(quiet.alerts.len(), 1);
        // The noisy host's oldest went first.
        let oldest = s
            .query(&AlertQuery {
                host: Some("noisy".into()),
                limit: Some(MAX_ALERT_LIMIT_FOR_TEST),
                ..AlertQuery::default()
            })
            .unwrap();
        assert_eq!(oldest.alerts[0].time_ns, 10 + 2 * MAX_ALERT_BATCH as u64);
    }

    const MAX_ALERT_LIMIT_FOR_TEST: usize = palisade_api::MAX_ALERT_LIMIT;

    #[test]
    fn filters_hold_together_and_limit_keeps_the_newest() {
        let mut s = AlertStore::new();
        s.push(
            "hv1",
            vec![
                alert("hv1", 100, 1, true, Some("web-1")),
                alert("hv1", 200, 2, false, Some("web-1")),
                alert("hv1", 300, 1, false, Some("web-2")),
            ],
        )
        .unwrap();
        s.push("hv2", vec![alert("hv2", 250, 1, true, Some("web-1"))]).unwrap();
        let q = |f: fn(&mut AlertQuery)| {
            let mut q = AlertQuery::default();
            f(&mut q);
            s.query(&q)
                .unwrap()
                .alerts
                .iter()
                .map(|a| a.time_ns)
                .collect::<Vec<_>>()
        };
        assert_eq!(q(|_| {}), [100, 200, 250, 300]);
        assert_eq!(q(|q| q.sid = Some(1)), [100, 250, 300]);
        assert_eq!(q(|q| q.action = Some("blocked".into())), [100, 250]);
        assert_eq!(q(|q| q.vm = Some("web-1".into())), [100, 200, 250]);
        assert_eq!(q(|q| q.host = Some("hv2".into())), [250]);
        assert_eq!(q(|q| q.host = Some("hv3".into())), Vec::<u64>::new());
        assert_eq!(q(|q| (q.since_ns, q.until_ns) = (Some(200), Some(300))), [200, 250]);
        assert_eq!(q(|q| q.limit = Some(2)), [250, 300]);
        let l = s
            .query(&AlertQuery {
                limit: Some(2),
                ..AlertQuery::default()
            })
            .unwrap();
        assert!(l.truncated);
    }

    /// Past the byte bound, the host holding the most bytes loses its
    /// oldest alerts, not the others.
    #[test]
    fn past_the_byte_bound_the_biggest_host_loses_its_oldest() {
        let one = serde_json::to_vec(&alert("quiet", 1, 7, true, Some("db-1")))
            .unwrap()
            .len();
        let mut s = AlertStore::with_max_bytes(one * 50);
        s.push(
            "quiet",
            (0..10).map(|t| alert("quiet", t, 7, true, Some("db-1"))).collect(),
        )
        .unwrap();
        s.push(
            "noisy",
            (0..100)
                .map(|t| alert("noisy", 100 + t, 9, false, Some("db-1")))
                .collect(),
        )
        .unwrap();
        let c = s.counts();
        assert!(c.bytes <= (one * 50) as u64, "{c:?}");
        let quiet = s
            .query(&AlertQuery {
                host: Some("quiet".into()),
                ..AlertQuery::default()
            })
            .unwrap();
        assert_eq!(quiet.alerts.len(), 10, "the quiet host keeps all of its alerts");
        let noisy = s
            .query(&AlertQuery {
                host: Some("noisy".into()),
                ..AlertQuery::default()
            })
            .unwrap();
        assert!(
            noisy.alerts.len() < 50 && noisy.alerts.len() > 30,
            "{}",
            noisy.alerts.len()
        );
        assert_eq!(noisy.alerts.last().unwrap().time_ns, 199, "the newest stay");
        assert_eq!(c.evicted, 100 - noisy.alerts.len() as u64);
        // A record over the size limit is refused whole.
        let mut big = alert("quiet", 500, 7, true, None);
        big.alert.signature = "x".repeat(MAX_ALERT_RECORD_BYTES);
        assert!(matches!(s.push("quiet", vec![big]), Err(AlertError::TooLarge(_))));
        assert_eq!(s.counts().received, c.received);
    }

    #[test]
    fn refusals_keep_nothing() {
        let mut s = AlertStore::new();
        let e = s.push(
            "hv1",
            vec![alert("hv1", 1, 1, true, None), alert("hv2", 2, 1, true, None)],
        );
        assert!(matches!(e, Err(AlertError::BadRequest(m)) if m.contains("alert 1")));
        let e = s.push(
            "hv1",
            (0..=MAX_ALERT_BATCH as u64)
                .map(|t| alert("hv1", t, 1, false, None))
                .collect(),
        );
        assert!(matches!(e, Err(AlertError::TooLarge(_))));
        assert_eq!(s.counts(), AlertCounts::default());
        for bad in [
            AlertQuery {
                limit: Some(palisade_api::MAX_ALERT_LIMIT + 1),
                ..AlertQuery::default()
            },
            AlertQuery {
                action: Some("dropped".into()),
                ..AlertQuery::default()
            },
        ] {
            assert!(matches!(s.query(&bad), Err(AlertError::BadRequest(_))), "{bad:?}");
        }
    }
}

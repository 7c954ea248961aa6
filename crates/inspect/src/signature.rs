//! A rule made ready to evaluate: its kind, its compiled programs, its fast
//! pattern, its flowbits as numbers, and its place in the evaluation order.
//!
//! **Kinds** decide when a rule is looked at, as in Suricata:
//! - *IP-only*: nothing but the header (and `flowbits:set`, thresholds);
//!   checked on the first packet of each direction of a flow, so it alerts
//!   at most twice per flow. A pass or drop IP-only rule applies to the
//!   whole flow.
//! - *Packet*: header keywords (`flags`, `itype`, `ttl`, `flow`, …), a
//!   negated or ranged address, an application protocol with no buffer;
//!   checked on every packet.
//! - *Payload*: contents on the packet payload or the TCP stream.
//! - *Transaction*: application-layer buffers; checked once per transaction
//!   as its buffers appear, and alerting at most once per transaction.
//!
//! **Order** within a packet: pass rules first, then drop, reject, alert
//! (the default `action-order`); within an action, rules that set flowbits
//! before rules that both set and read them, before rules that only read
//! them, before the rest; then by priority, then by sid. A rule that sets a
//! flowbit is thus seen before one that tests it in the same packet.

use crate::matcher::Program;
use crate::rules::{Action, AppProto, Buffer, BufferDirection, Flowbit, Protocol, Rule, Step};

/// When a signature is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigKind {
    /// First packet of each flow direction.
    IpOnly,
    /// Every packet.
    Packet,
    /// Packet payload or stream data.
    Payload,
    /// Application-layer transactions of this protocol.
    Tx(AppProto),
}

/// A flowbit test, on numbered names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowbitTest {
    /// Any of these is set.
    IsSet(Vec<u32>),
    /// Any of these is not set.
    IsNotSet(Vec<u32>),
}

/// A flowbit change, on a numbered name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowbitOp {
    /// Set.
    Set(u32),
    /// Clear.
    Unset(u32),
    /// Flip.
    Toggle(u32),
}

/// A compiled signature.
#[derive(Debug, Clone)]
pub struct Signature {
    /// The rule it came from.
    pub rule: Rule,
    /// When it is evaluated.
    pub kind: SigKind,
    /// Effective priority: the rule's, else its classtype's, else 3.
    pub priority: u8,
    /// Its payload program, if it inspects the payload or stream.
    pub payload: Option<Program>,
    /// Its application-buffer programs.
    pub buffers: Vec<(Buffer, Program)>,
    /// Flowbit tests (all must hold).
    pub flowbit_tests: Vec<FlowbitTest>,
    /// Flowbit changes, applied when it matches.
    pub flowbit_ops: Vec<FlowbitOp>,
    /// The fast pattern and its buffer.
    pub fast_pattern: Option<(Buffer, Vec<u8>)>,
    /// Matches packets only (`dsize`, `flow:no_stream`, `tcp-pkt`).
    pub packet_only: bool,
    /// Matches stream data only (`flow:only_stream`, `tcp-stream`).
    pub stream_only: bool,
    /// The data direction a transaction signature inspects: true for the
    /// request (or both), false when only response buffers are used.
    pub tx_to_server: bool,
    /// Suppressions from a `threshold.config`: when one covers a match, the
    /// signature does not alert (its action and flowbits still apply).
    pub suppress: Vec<crate::rules::threshold_config::Suppress>,
}

/// Action order rank (pass first).
pub fn action_rank(a: Action) -> u8 {
    match a {
        Action::Pass => 0,
        Action::Drop => 1,
        Action::Reject => 2,
        Action::Alert => 3,
    }
}

/// Flowbits rank: setters first, then set-and-read, then readers, then the rest.
pub fn flowbits_rank(rule: &Rule) -> u8 {
    let reads = rule
        .flowbits
        .iter()
        .any(|f| matches!(f, Flowbit::IsSet(_) | Flowbit::IsNotSet(_)));
    let writes = rule
        .flowbits
        .iter()
        .any(|f| matches!(f, Flowbit::Set(_) | Flowbit::Unset(_) | Flowbit::Toggle(_)));
    match (writes, reads) {
        (true, false) => 0,
        (true, true) => 1,
        (false, true) => 2,
        (false, false) => 3,
    }
}

impl Signature {
    /// Compiles a rule. `priority` is the effective priority; `flowbit_id`
    /// numbers flowbit names.
    pub fn compile(rule: Rule, priority: u8, flowbit_id: &mut impl FnMut(&str) -> u32) -> Signature {
        let mut payload = None;
        let mut buffers = Vec::new();
        for b in &rule.buffers {
            let program = Program::new(&b.steps);
            if b.buffer == Buffer::Payload {
                payload = Some(program);
            } else {
                buffers.push((b.buffer, program));
            }
        }
        let mut flowbit_tests = Vec::new();
        let mut flowbit_ops = Vec::new();
        for f in &rule.flowbits {
            match f {
                Flowbit::Set(n) => flowbit_ops.push(FlowbitOp::Set(flowbit_id(n))),
                Flowbit::Unset(n) => flowbit_ops.push(FlowbitOp::Unset(flowbit_id(n))),
                Flowbit::Toggle(n) => flowbit_ops.push(FlowbitOp::Toggle(flowbit_id(n))),
                Flowbit::IsSet(ns) => {
                    flowbit_tests.push(FlowbitTest::IsSet(ns.iter().map(|n| flowbit_id(n)).collect()))
                }
                Flowbit::IsNotSet(ns) => {
                    flowbit_tests.push(FlowbitTest::IsNotSet(ns.iter().map(|n| flowbit_id(n)).collect()))
                }
            }
        }
        let app = rule.buffers.iter().find_map(|b| b.buffer.app_proto());
        let kind = if let Some(p) = app {
            SigKind::Tx(p)
        } else if payload.is_some() {
            SigKind::Payload
        } else if is_ip_only(&rule) {
            SigKind::IpOnly
        } else {
            SigKind::Packet
        };
        let packet_only = rule.flow.no_stream
            || matches!(rule.protocol, Protocol::TcpPkt)
            || rule
                .packet
                .iter()
                .any(|c| matches!(c, crate::rules::PacketCheck::Dsize(_)));
        let stream_only = rule.flow.only_stream || matches!(rule.protocol, Protocol::TcpStream);
        let fast_pattern = choose_fast_pattern(&rule);
        let app_buffers = || rule.buffers.iter().map(|b| b.buffer).filter(|b| *b != Buffer::Payload);
        let any_request = app_buffers().any(|b| b.direction() == BufferDirection::ToServer);
        let any_response = app_buffers().any(|b| b.direction() == BufferDirection::ToClient);
        let tx_to_server = any_request || (!any_response && !rule.flow.to_client);
        Signature {
            rule,
            kind,
            priority,
            payload,
            buffers,
            flowbit_tests,
            flowbit_ops,
            fast_pattern,
            packet_only,
            stream_only,
            tx_to_server,
            suppress: Vec::new(),
        }
    }

    /// Whether a `threshold.config` suppression covers a match from `src` to `dst`.
    pub fn suppressed(&self, src: core::net::IpAddr, dst: core::net::IpAddr) -> bool {
        self.suppress.iter().any(|s| s.covers(src, dst))
    }

    /// The sort key of the evaluation order.
    pub fn order_key(&self) -> (u8, u8, u8, u32, u32) {
        (
            action_rank(self.rule.action),
            flowbits_rank(&self.rule),
            self.priority,
            self.rule.sid,
            self.rule.gid,
        )
    }

    /// Whether the header (protocol, addresses, ports) admits a packet from
    /// `src:sp` to `dst:dp` of IP protocol `proto`.
    pub fn header_matches(
        &self,
        proto: u8,
        src: core::net::IpAddr,
        sp: u16,
        dst: core::net::IpAddr,
        dp: u16,
        has_ports: bool,
    ) -> bool {
        let r = &self.rule;
        if !r.protocol.admits(proto) {
            return false;
        }
        let ports = |sp: u16, dp: u16| {
            if has_ports {
                r.src_ports.contains(sp) && r.dst_ports.contains(dp)
            } else {
                r.src_ports.is_any() && r.dst_ports.is_any()
            }
        };
        let forward = r.src.contains(src) && r.dst.contains(dst) && ports(sp, dp);
        forward || (r.bidirectional && r.src.contains(dst) && r.dst.contains(src) && ports(dp, sp))
    }
}

/// IP-only: header, `flowbits:set`, thresholds; no negated or ranged address, no direction.
fn is_ip_only(rule: &Rule) -> bool {
    rule.buffers.is_empty()
        && rule.packet.is_empty()
        && rule.flow == Default::default()
        && !matches!(rule.protocol, Protocol::App(_))
        && !rule.header_has_negation
        && rule.flowbits.iter().all(|f| matches!(f, Flowbit::Set(_)))
}

/// The rule's fast pattern: its `fast_pattern` content, else its longest
/// positive content (application buffers preferred over the payload on ties).
fn choose_fast_pattern(rule: &Rule) -> Option<(Buffer, Vec<u8>)> {
    let mut best: Option<(Buffer, &crate::rules::Content)> = None;
    for b in &rule.buffers {
        for s in &b.steps {
            let Step::Content(c) = s else { continue };
            if c.negated {
                continue;
            }
            if c.fast_pattern {
                return Some((b.buffer, c.fast_bytes().to_vec()));
            }
            let better = match best {
                None => true,
                Some((bb, bc)) => {
                    c.pattern.len() > bc.pattern.len()
                        || (c.pattern.len() == bc.pattern.len() && bb == Buffer::Payload && b.buffer != Buffer::Payload)
                }
            };
            if better {
                best = Some((b.buffer, c));
            }
        }
    }
    best.map(|(b, c)| (b, c.fast_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{RuleContext, parse_rule};

    fn sig(opts: &str) -> Signature {
        sig_with("alert tcp any any -> any any", opts)
    }

    fn sig_with(header: &str, opts: &str) -> Signature {
        let rule = parse_rule(&format!("{header} ({opts} sid:1;)"), &RuleContext::default()).unwrap();
        let mut n = 0;
        Signature::compile(rule, 3, &mut |_| {
            n += 1;
            n
        })
    }

    #[test]
    fn kinds() {
        let cases: &[(&str, &str, SigKind)] = &[
            ("alert ip any any -> 8.8.8.8 any", "", SigKind::IpOnly),
            ("alert ip any any -> any any", "flowbits:set,a;", SigKind::IpOnly),
            ("alert ip any any -> any any", "flowbits:unset,a;", SigKind::Packet),
            ("alert tcp 1.1.1.1 any -> !1.1.1.1 any", "", SigKind::Packet),
            ("alert tcp any any -> any any", "flow:established;", SigKind::Packet),
            ("alert tls any any -> any any", "", SigKind::Packet),
            ("alert icmp any any -> any any", "itype:8;", SigKind::Packet),
            ("alert tcp any any -> any any", "content:\"x\";", SigKind::Payload),
            (
                "alert tcp any any -> any any",
                "uricontent:\"x\";",
                SigKind::Tx(AppProto::Http),
            ),
            (
                "alert dns any any -> any any",
                "dns.query; content:\"x\";",
                SigKind::Tx(AppProto::Dns),
            ),
        ];
        for (header, opts, kind) in cases {
            assert_eq!(sig_with(header, opts).kind, *kind, "{header} ({opts})");
        }
    }

    #[test]
    fn fast_patterns() {
        assert_eq!(sig(r#"content:"ab"; content:"abcd";"#).fast_pattern.unwrap().1, b"abcd");
        assert_eq!(
            sig(r#"content:"ab"; fast_pattern; content:"abcd";"#)
                .fast_pattern
                .unwrap()
                .1,
            b"ab"
        );
        assert_eq!(
            sig(r#"content:"abcdef"; fast_pattern:1,3;"#).fast_pattern.unwrap().1,
            b"bcd"
        );
        assert!(sig(r#"content:!"abc";"#).fast_pattern.is_none());
        let s = sig(r#"content:"abc"; http_uri; content:"xyz";"#);
        assert_eq!(s.fast_pattern.unwrap().0, Buffer::HttpUri);
    }

    #[test]
    fn packet_and_stream_only() {
        assert!(sig(r#"content:"a"; dsize:>1;"#).packet_only);
        assert!(sig(r#"content:"a"; flow:only_stream;"#).stream_only);
        assert!(sig_with("alert tcp-pkt any any -> any any", r#"content:"a";"#).packet_only);
    }

    #[test]
    fn headers_match_both_ways_when_bidirectional() {
        let s = sig_with("alert udp any :1024 <> 10.0.0.0/8 0", "");
        let a = "192.0.2.1".parse().unwrap();
        let b = "10.0.0.1".parse().unwrap();
        assert!(s.header_matches(17, a, 1000, b, 0, true));
        assert!(s.header_matches(17, b, 0, a, 1000, true));
        assert!(!s.header_matches(17, a, 2000, b, 0, true));
        assert!(!s.header_matches(6, a, 1000, b, 0, true));
    }
}

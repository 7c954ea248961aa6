//! A loaded ruleset, and the profiles that select from it.
//!
//! [`RuleSet`] holds every accepted rule compiled into a [`Signature`], in
//! evaluation order (a signature's id is its position). Loading either
//! refuses the whole file when any rule is refused, or, with
//! [`LoadOptions::skip_invalid`], keeps the rest and reports the refused ones
//! ([`RuleSet::refused`]).
//!
//! A [`ProfileSpec`] selects signatures by priority, classtype and sid (a
//! signature is in the profile when any criterion selects it); the built-in
//! ones are `full` (everything), `standard` (priority 1 and 2) and
//! `critical` (priority 1). A profile compiles into a [`Detector`]: the
//! prefilters and lists the engine walks for a flow inspected under that
//! profile. When a selected signature tests a flowbit that only unselected
//! signatures set, those setters are compiled in as *silent* dependencies:
//! they run for their flowbits, but never alert or act, so a profile does not
//! change what its own rules mean.

use std::collections::{HashMap, HashSet};

use crate::classification::Classifications;
use crate::error::{LoadError, RuleError, RuleErrorKind};
use crate::prefilter::{Prefilter, SigId};
use crate::rules::{AppProto, BUFFER_KINDS, Buffer, Rule, RuleContext, Step, parse_rules};
use crate::signature::{FlowbitOp, FlowbitTest, SigKind, Signature};

/// How to treat refused rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Keep the accepted rules when some are refused (the refused ones are
    /// listed in [`RuleSet::refused`]); otherwise any refusal fails the load.
    pub skip_invalid: bool,
}

/// The longest lookbehind kept for stream inspection, whatever the rules.
pub const MAX_LOOKBEHIND: usize = 1024;

/// Accepted rules compiled, in evaluation order.
#[derive(Debug, Clone)]
pub struct RuleSet {
    sigs: Vec<Signature>,
    flowbits: Vec<String>,
    classifications: Classifications,
    refused: Vec<RuleError>,
    lookbehind: usize,
    generation: u64,
}

/// Numbers rulesets, so a flow can tell that the rules changed under it.
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl RuleSet {
    /// Parses a rules file and compiles it.
    pub fn parse(text: &str, ctx: &RuleContext, options: LoadOptions) -> Result<RuleSet, LoadError> {
        let parsed = parse_rules(text, ctx);
        if !options.skip_invalid && !parsed.errors.is_empty() {
            return Err(LoadError::Refused(parsed.errors));
        }
        let mut set = RuleSet::from_rules(parsed.rules, ctx.classifications.clone(), options)?;
        let mut refused = parsed.errors;
        refused.append(&mut set.refused);
        refused.sort_by_key(|e| (e.line, e.column));
        set.refused = refused;
        Ok(set)
    }

    /// Compiles parsed rules. A repeated gid:sid is refused (the later rule).
    pub fn from_rules(
        rules: Vec<Rule>,
        classifications: Classifications,
        options: LoadOptions,
    ) -> Result<RuleSet, LoadError> {
        let mut seen: HashMap<(u32, u32), usize> = HashMap::new();
        let mut refused = Vec::new();
        let mut accepted = Vec::with_capacity(rules.len());
        for rule in rules {
            if let Some(&line) = seen.get(&(rule.gid, rule.sid)) {
                refused.push(RuleError::new(
                    rule.line,
                    1,
                    Some("sid".into()),
                    RuleErrorKind::DuplicateSid(rule.sid, line),
                ));
                continue;
            }
            seen.insert((rule.gid, rule.sid), rule.line);
            accepted.push(rule);
        }
        if !options.skip_invalid && !refused.is_empty() {
            return Err(LoadError::Refused(refused));
        }
        let mut names: HashMap<String, u32> = HashMap::new();
        let mut flowbits: Vec<String> = Vec::new();
        let mut sigs: Vec<Signature> = accepted
            .into_iter()
            .map(|rule| {
                let priority = rule
                    .priority
                    .or_else(|| {
                        rule.classtype
                            .as_deref()
                            .and_then(|c| classifications.get(c))
                            .map(|c| c.priority)
                    })
                    .unwrap_or(3);
                Signature::compile(rule, priority, &mut |n: &str| {
                    *names.entry(n.to_string()).or_insert_with(|| {
                        flowbits.push(n.to_string());
                        (flowbits.len() - 1) as u32
                    })
                })
            })
            .collect();
        sigs.sort_by_key(|s| s.order_key());
        let lookbehind = sigs
            .iter()
            .filter(|s| s.payload.is_some() && !s.packet_only)
            .flat_map(|s| s.rule.buffers.iter().filter(|b| b.buffer == Buffer::Payload))
            .flat_map(|b| b.steps.iter())
            .filter_map(|st| match st {
                Step::Content(c) if !c.negated => Some(c.pattern.len().saturating_sub(1)),
                _ => None,
            })
            .max()
            .unwrap_or(0)
            .min(MAX_LOOKBEHIND);
        Ok(RuleSet {
            sigs,
            flowbits,
            classifications,
            refused,
            lookbehind,
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Apply a `threshold.config` (see [`crate::rules::threshold_config`]
    /// for what each entry does). Returns the lines of the entries that name
    /// a signature the set does not have (they change nothing: a caller
    /// should say so).
    pub fn apply_threshold_config(&mut self, cfg: &crate::rules::threshold_config::ThresholdConfig) -> Vec<usize> {
        use crate::rules::threshold_config::EntryKind;
        let mut unmatched = Vec::new();
        // Every-signature thresholds first: one for a signature, later in the file or not, replaces it.
        let (global, specific): (Vec<_>, Vec<_>) = cfg.entries.iter().partition(|e| e.sid == 0);
        for e in global.into_iter().chain(specific) {
            let mut hit = false;
            for sig in self
                .sigs
                .iter_mut()
                .filter(|s| e.sid == 0 || (s.rule.sid == e.sid && s.rule.gid == e.gid))
            {
                hit = true;
                match &e.kind {
                    EntryKind::Threshold(t) if e.sid == 0 => {
                        if sig.rule.threshold.is_none() && sig.rule.detection_filter.is_none() {
                            sig.rule.threshold = Some(*t);
                        }
                    }
                    EntryKind::Threshold(t) => {
                        sig.rule.threshold = Some(*t);
                        sig.rule.detection_filter = None;
                    }
                    EntryKind::Suppress(s) => sig.suppress.push(s.clone()),
                }
            }
            if !hit {
                unmatched.push(e.line);
            }
        }
        unmatched
    }

    /// The refused rules, in file order.
    pub fn refused(&self) -> &[RuleError] {
        &self.refused
    }

    /// Number of signatures.
    pub fn len(&self) -> usize {
        self.sigs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.sigs.is_empty()
    }

    /// A signature by id.
    pub fn get(&self, id: SigId) -> &Signature {
        &self.sigs[id as usize]
    }

    /// All signatures, in evaluation order.
    pub fn signatures(&self) -> &[Signature] {
        &self.sigs
    }

    /// Number of distinct flowbit names.
    pub fn flowbit_count(&self) -> usize {
        self.flowbits.len()
    }

    /// The flowbit names, by number (what a flow's bits mean, for carrying
    /// them to another host's rules: [`crate::persist`]).
    pub fn flowbit_names(&self) -> &[String] {
        &self.flowbits
    }

    /// The category text of a signature's classtype.
    pub fn category(&self, id: SigId) -> Option<&str> {
        let c = self.get(id).rule.classtype.as_deref()?;
        self.classifications.get(c).map(|c| c.description.as_str())
    }

    /// A number no other ruleset of this process has: a flow whose state
    /// was built under another ruleset has its detection state reset (its
    /// flowbits and signature numbers mean nothing under the new rules).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Stream bytes kept before new data so patterns cut across segments are found.
    pub fn lookbehind(&self) -> usize {
        self.lookbehind
    }
}

/// Which signatures a profile selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileSpec {
    /// The profile's name (`full`, `critical`, …).
    pub name: String,
    /// Selects everything.
    pub all: bool,
    /// Selects signatures of this priority or more severe (lower number).
    pub max_priority: Option<u8>,
    /// Selects signatures of these classtypes.
    pub classtypes: Vec<String>,
    /// Selects these sids.
    pub sids: Vec<u32>,
}

impl ProfileSpec {
    /// Every signature.
    pub fn full() -> Self {
        ProfileSpec {
            name: "full".into(),
            all: true,
            max_priority: None,
            classtypes: Vec::new(),
            sids: Vec::new(),
        }
    }

    /// Priority 1 and 2.
    pub fn standard() -> Self {
        ProfileSpec {
            name: "standard".into(),
            all: false,
            max_priority: Some(2),
            classtypes: Vec::new(),
            sids: Vec::new(),
        }
    }

    /// Priority 1.
    pub fn critical() -> Self {
        ProfileSpec {
            name: "critical".into(),
            all: false,
            max_priority: Some(1),
            classtypes: Vec::new(),
            sids: Vec::new(),
        }
    }

    /// The built-in profile of that name.
    pub fn builtin(name: &str) -> Option<Self> {
        match name {
            "full" => Some(Self::full()),
            "standard" => Some(Self::standard()),
            "critical" => Some(Self::critical()),
            _ => None,
        }
    }

    /// Whether the profile selects `sig`.
    pub fn selects(&self, sig: &Signature) -> bool {
        self.all
            || self.max_priority.is_some_and(|p| sig.priority <= p)
            || sig.rule.classtype.as_ref().is_some_and(|c| self.classtypes.contains(c))
            || self.sids.contains(&sig.rule.sid)
    }

    /// Checks that the profile's classtypes exist.
    pub fn validate(&self, classifications: &Classifications) -> Result<(), LoadError> {
        for c in &self.classtypes {
            if classifications.get(c).is_none() {
                return Err(LoadError::BadProfile {
                    profile: self.name.clone(),
                    reason: format!("unknown classtype {c:?}"),
                });
            }
        }
        if !self.all && self.max_priority.is_none() && self.classtypes.is_empty() && self.sids.is_empty() {
            return Err(LoadError::BadProfile {
                profile: self.name.clone(),
                reason: "selects nothing (give all, a priority, classtypes or sids)".into(),
            });
        }
        Ok(())
    }
}

/// Protocol classes signatures are listed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProtoClass {
    Tcp = 0,
    Udp = 1,
    Icmp = 2,
    Other = 3,
}

impl ProtoClass {
    pub fn of(proto: u8) -> ProtoClass {
        match proto {
            6 => ProtoClass::Tcp,
            17 => ProtoClass::Udp,
            1 | 58 => ProtoClass::Icmp,
            _ => ProtoClass::Other,
        }
    }
    const PROBES: [(ProtoClass, &'static [u8]); 4] = [
        (ProtoClass::Tcp, &[6]),
        (ProtoClass::Udp, &[17]),
        (ProtoClass::Icmp, &[1, 58]),
        (ProtoClass::Other, &[0, 2, 47, 50, 132]),
    ];
}

fn app_index(p: AppProto) -> usize {
    match p {
        AppProto::Http => 0,
        AppProto::Tls => 1,
        AppProto::Dns => 2,
    }
}

/// A compiled profile: what the engine walks for each packet of a flow
/// inspected under it.
#[derive(Debug)]
pub struct Detector {
    /// The profile.
    pub spec: ProfileSpec,
    /// Per signature: compiled in (selected or a silent dependency).
    member: Vec<bool>,
    /// Per signature: a silent dependency (runs for flowbits, never alerts or acts).
    silent: Vec<bool>,
    pub(crate) ip_only: [Vec<SigId>; 4],
    pub(crate) packet: [Vec<SigId>; 4],
    pub(crate) payload_prefilter: Option<Prefilter>,
    pub(crate) payload_always: [Vec<SigId>; 4],
    pub(crate) tx_prefilter: Vec<Option<Prefilter>>,
    pub(crate) tx_always: [Vec<SigId>; 3],
    selected: usize,
    dependencies: usize,
}

impl Detector {
    /// Compiles `spec` over `rules`.
    pub fn build(rules: &RuleSet, spec: ProfileSpec) -> Result<Detector, LoadError> {
        spec.validate(&rules.classifications)?;
        let n = rules.len();
        let mut member: Vec<bool> = rules.sigs.iter().map(|s| spec.selects(s)).collect();
        let mut silent = vec![false; n];
        // Pull in the setters of flowbits the selected signatures test, transitively.
        let setters: HashMap<u32, Vec<usize>> = {
            let mut m: HashMap<u32, Vec<usize>> = HashMap::new();
            for (i, s) in rules.sigs.iter().enumerate() {
                for op in &s.flowbit_ops {
                    let (FlowbitOp::Set(b) | FlowbitOp::Unset(b) | FlowbitOp::Toggle(b)) = *op;
                    m.entry(b).or_default().push(i);
                }
            }
            m
        };
        let mut queue: Vec<usize> = (0..n).filter(|&i| member[i]).collect();
        let mut done: HashSet<u32> = HashSet::new();
        while let Some(i) = queue.pop() {
            for t in &rules.sigs[i].flowbit_tests {
                let (FlowbitTest::IsSet(bits) | FlowbitTest::IsNotSet(bits)) = t;
                for b in bits {
                    if !done.insert(*b) {
                        continue;
                    }
                    for &j in setters.get(b).map(Vec::as_slice).unwrap_or(&[]) {
                        if !member[j] {
                            member[j] = true;
                            silent[j] = true;
                            queue.push(j);
                        }
                    }
                }
            }
        }
        let mut d = Detector {
            spec,
            member: member.clone(),
            silent,
            ip_only: Default::default(),
            packet: Default::default(),
            payload_prefilter: None,
            payload_always: Default::default(),
            tx_prefilter: (0..BUFFER_KINDS).map(|_| None).collect(),
            tx_always: Default::default(),
            selected: 0,
            dependencies: 0,
        };
        let mut payload_patterns = Vec::new();
        let mut tx_patterns: Vec<Vec<(SigId, Vec<Vec<u8>>)>> = vec![Vec::new(); BUFFER_KINDS];
        for (i, s) in rules.sigs.iter().enumerate() {
            if !member[i] {
                continue;
            }
            if d.silent[i] {
                d.dependencies += 1;
            } else {
                d.selected += 1;
            }
            let id = i as SigId;
            let classes = ProtoClass::PROBES
                .iter()
                .filter(|(_, protos)| protos.iter().any(|&p| s.rule.protocol.admits(p)))
                .map(|(c, _)| *c as usize);
            match s.kind {
                SigKind::IpOnly => classes.for_each(|c| d.ip_only[c].push(id)),
                SigKind::Packet => classes.for_each(|c| d.packet[c].push(id)),
                SigKind::Payload => match &s.fast_pattern {
                    Some((Buffer::Payload, _)) => payload_patterns.push((id, literals(s, Buffer::Payload))),
                    _ => classes.for_each(|c| d.payload_always[c].push(id)),
                },
                SigKind::Tx(proto) => match &s.fast_pattern {
                    Some((b, _)) if *b != Buffer::Payload => tx_patterns[b.index()].push((id, literals(s, *b))),
                    _ => d.tx_always[app_index(proto)].push(id),
                },
            }
        }
        d.payload_prefilter = Prefilter::build(payload_patterns);
        for (b, pats) in tx_patterns.into_iter().enumerate() {
            d.tx_prefilter[b] = Prefilter::build(pats);
        }
        Ok(d)
    }

    /// Whether signature `id` is compiled into this profile.
    pub fn contains(&self, id: SigId) -> bool {
        self.member.get(id as usize).copied().unwrap_or(false)
    }

    /// Whether signature `id` is here only for the flowbits it sets.
    pub fn is_silent(&self, id: SigId) -> bool {
        self.silent.get(id as usize).copied().unwrap_or(false)
    }

    /// Signatures the profile selects.
    pub fn selected(&self) -> usize {
        self.selected
    }

    /// Signatures compiled in as silent flowbit dependencies.
    pub fn dependencies(&self) -> usize {
        self.dependencies
    }

    /// Signatures evaluated on every payload or transaction because they have no fast pattern.
    pub fn without_fast_pattern(&self) -> usize {
        let mut ids: HashSet<SigId> = HashSet::new();
        self.payload_always.iter().flatten().for_each(|&i| {
            ids.insert(i);
        });
        self.tx_always.iter().flatten().for_each(|&i| {
            ids.insert(i);
        });
        ids.len()
    }

    /// Heap bytes of the prefilters.
    pub fn memory_usage(&self) -> usize {
        self.payload_prefilter.as_ref().map_or(0, Prefilter::memory_usage)
            + self
                .tx_prefilter
                .iter()
                .flatten()
                .map(Prefilter::memory_usage)
                .sum::<usize>()
    }

    /// Every prefilter of the profile.
    pub fn prefilters(&self) -> impl Iterator<Item = &Prefilter> {
        self.payload_prefilter.iter().chain(self.tx_prefilter.iter().flatten())
    }

    /// Why any prefilter of the profile fell back from Vectorscan, if one did.
    pub fn prefilter_fallback(&self) -> Option<&str> {
        self.prefilters().find_map(Prefilter::fallback_reason)
    }

    pub(crate) fn tx_always_for(&self, p: AppProto) -> &[SigId] {
        &self.tx_always[app_index(p)]
    }
}

/// Every positive content a signature has in `buffer`: all must occur for it to match.
fn literals(sig: &Signature, buffer: Buffer) -> Vec<Vec<u8>> {
    sig.rule
        .buffer(buffer)
        .map(|b| {
            b.steps
                .iter()
                .filter_map(|st| match st {
                    Step::Content(c) if !c.negated => Some(c.pattern.clone()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"
alert tcp any any -> any any (msg:"a"; content:"abc"; priority:1; sid:1;)
alert tcp any any -> any any (msg:"b"; content:"abc"; classtype:trojan-activity; sid:2;)
alert tcp any any -> any any (msg:"c"; content:"zz"; sid:3;)
alert tcp any any -> any any (msg:"setter"; content:"login"; flowbits:set,logged; flowbits:noalert; sid:4;)
alert tcp any any -> any any (msg:"reader"; content:"admin"; flowbits:isset,logged; priority:1; sid:5;)
pass ip any any -> any any (msg:"p"; sid:6;)
drop tcp any any -> any any (msg:"d"; content:"x"; sid:7;)
"#;

    fn set() -> RuleSet {
        RuleSet::parse(RULES, &RuleContext::default(), LoadOptions::default()).unwrap()
    }

    #[test]
    fn evaluation_order_is_action_flowbits_priority_sid() {
        let s = set();
        let sids: Vec<u32> = s.signatures().iter().map(|s| s.rule.sid).collect();
        assert_eq!(sids, vec![6, 7, 4, 5, 1, 2, 3]);
        assert_eq!(s.lookbehind(), 4);
        assert_eq!(
            s.category(s.signatures().iter().position(|x| x.rule.sid == 2).unwrap() as u32),
            Some("A Network Trojan was detected")
        );
    }

    #[test]
    fn profiles_select_and_pull_in_flowbit_setters_silently() {
        let s = set();
        let full = Detector::build(&s, ProfileSpec::full()).unwrap();
        assert_eq!((full.selected(), full.dependencies()), (7, 0));
        let critical = Detector::build(&s, ProfileSpec::critical()).unwrap();
        // sid 1 (priority 1), sid 2 (trojan-activity: priority 1), sid 5 (priority 1); sid 4 silently.
        assert_eq!((critical.selected(), critical.dependencies()), (3, 1));
        let setter = s.signatures().iter().position(|x| x.rule.sid == 4).unwrap() as SigId;
        assert!(critical.contains(setter) && critical.is_silent(setter));
        let by_sid = ProfileSpec {
            name: "mine".into(),
            all: false,
            max_priority: None,
            classtypes: vec![],
            sids: vec![3],
        };
        assert_eq!(Detector::build(&s, by_sid).unwrap().selected(), 1);
        let bad = ProfileSpec {
            classtypes: vec!["nope".into()],
            ..ProfileSpec::critical()
        };
        assert!(Detector::build(&s, bad).is_err());
    }

    #[test]
    fn duplicate_sids_and_bad_rules() {
        let text = "alert tcp any any -> any any (sid:1;)\nalert tcp any any -> any any (sid:1;)\nalert tcp any any -> any any (foo; sid:2;)\n";
        assert!(RuleSet::parse(text, &RuleContext::default(), LoadOptions::default()).is_err());
        let s = RuleSet::parse(text, &RuleContext::default(), LoadOptions { skip_invalid: true }).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s.refused().iter().map(|e| e.line).collect::<Vec<_>>(), vec![2, 3]);
    }
}

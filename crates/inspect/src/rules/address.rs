//! Address and port groups of a rule header, and the variables they name.
//!
//! A group is `any`, one item, or a bracketed list of items; an item is an
//! address (`10.0.0.1`, `2001:db8::1`), a CIDR block (`10.0.0.0/8`), a range
//! (`10.0.0.1-10.0.0.9`), a variable (`$HOME_NET`) or a nested group, and any
//! of them may be negated with `!`. Ports are numbers, ranges (`1024:`,
//! `:1023`, `80:90`), variables and groups in the same way.
//!
//! A group resolves to a set of inclusive ranges: the union of its positive
//! items minus the union of its negative ones; a group of negative items only
//! starts from everything (`[!80,!443]` is every port but those two). IPv4 and
//! IPv6 keep separate range lists, so `any` holds both families and
//! `10.0.0.0/8` matches no IPv6 packet. Variables are expanded when the group
//! is parsed, with a depth limit, so `$A` defined as `[$B]` and `$B` as `[$A]`
//! is an error, not a hang.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::collections::BTreeMap;

/// How deeply variables and brackets may nest.
const MAX_NESTING: usize = 16;

/// A set of IPv4 and IPv6 addresses, as sorted, disjoint inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AddressSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl AddressSet {
    /// Every address of both families.
    pub fn any() -> Self {
        AddressSet {
            v4: vec![(0, u32::MAX)],
            v6: vec![(0, u128::MAX)],
        }
    }

    /// Whether this set holds every address.
    pub fn is_any(&self) -> bool {
        self.v4 == [(0, u32::MAX)] && self.v6 == [(0, u128::MAX)]
    }

    /// Whether `addr` is in the set.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => contains(&self.v4, u32::from(a)),
            IpAddr::V6(a) => contains(&self.v6, u128::from(a)),
        }
    }

    fn union(&mut self, other: &AddressSet) {
        self.v4 = union(&self.v4, &other.v4);
        self.v6 = union(&self.v6, &other.v6);
    }

    fn subtract(&mut self, other: &AddressSet) {
        self.v4 = subtract(&self.v4, &other.v4);
        self.v6 = subtract(&self.v6, &other.v6);
    }

    fn complement(&self) -> AddressSet {
        let mut all = AddressSet::any();
        all.subtract(self);
        all
    }
}

/// A set of ports, as sorted, disjoint inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortSet {
    ranges: Vec<(u16, u16)>,
}

impl PortSet {
    /// Every port.
    pub fn any() -> Self {
        PortSet {
            ranges: vec![(0, u16::MAX)],
        }
    }

    /// Whether this set holds every port.
    pub fn is_any(&self) -> bool {
        self.ranges == [(0, u16::MAX)]
    }

    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        contains(&self.ranges, port)
    }

    fn union(&mut self, other: &PortSet) {
        self.ranges = union(&self.ranges, &other.ranges);
    }

    fn subtract(&mut self, other: &PortSet) {
        self.ranges = subtract(&self.ranges, &other.ranges);
    }
}

/// Values that can be kept as inclusive ranges.
trait Point: Copy + Ord {
    const MAX: Self;
    fn pred(self) -> Self;
    fn succ(self) -> Self;
}

macro_rules! point {
    ($t:ty) => {
        impl Point for $t {
            const MAX: Self = <$t>::MAX;
            fn pred(self) -> Self {
                self - 1
            }
            fn succ(self) -> Self {
                self + 1
            }
        }
    };
}
point!(u16);
point!(u32);
point!(u128);

fn contains<T: Point>(ranges: &[(T, T)], x: T) -> bool {
    // The ranges are sorted and disjoint: the candidate is the last one starting at or before x.
    let idx = ranges.partition_point(|&(lo, _)| lo <= x);
    idx > 0 && ranges[idx - 1].1 >= x
}

fn normalize<T: Point>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            // Overlapping or adjacent ranges merge.
            Some(last) if last.1 == T::MAX || lo <= last.1.succ() => {
                if hi > last.1 {
                    last.1 = hi;
                }
            }
            _ => out.push((lo, hi)),
        }
    }
    out
}

fn union<T: Point>(a: &[(T, T)], b: &[(T, T)]) -> Vec<(T, T)> {
    normalize(a.iter().chain(b).copied().collect())
}

fn subtract<T: Point>(a: &[(T, T)], b: &[(T, T)]) -> Vec<(T, T)> {
    let mut out = Vec::new();
    for &(mut lo, hi) in a {
        let mut alive = true;
        for &(blo, bhi) in b {
            if !alive || bhi < lo || blo > hi {
                continue;
            }
            if blo > lo {
                out.push((lo, blo.pred()));
            }
            if bhi >= hi {
                alive = false;
            } else {
                lo = bhi.succ();
            }
        }
        if alive {
            out.push((lo, hi));
        }
    }
    normalize(out)
}

/// Address and port variables (`$HOME_NET`, `$HTTP_PORTS`), by name without the `$`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vars {
    addresses: BTreeMap<String, String>,
    ports: BTreeMap<String, String>,
}

impl Default for Vars {
    /// The variables of Suricata's default configuration: `HOME_NET` is the
    /// RFC 1918 ranges, `EXTERNAL_NET` everything else, the server groups are
    /// `HOME_NET`, and the usual port groups.
    fn default() -> Self {
        let mut addresses = BTreeMap::new();
        addresses.insert("HOME_NET".into(), "[192.168.0.0/16,10.0.0.0/8,172.16.0.0/12]".into());
        addresses.insert("EXTERNAL_NET".into(), "!$HOME_NET".into());
        for name in [
            "HTTP_SERVERS",
            "SMTP_SERVERS",
            "SQL_SERVERS",
            "DNS_SERVERS",
            "TELNET_SERVERS",
            "AIM_SERVERS",
            "DC_SERVERS",
            "DNP3_SERVER",
            "DNP3_CLIENT",
            "MODBUS_CLIENT",
            "MODBUS_SERVER",
            "ENIP_CLIENT",
            "ENIP_SERVER",
        ] {
            addresses.insert(name.into(), "$HOME_NET".into());
        }
        let mut ports = BTreeMap::new();
        for (name, value) in [
            ("HTTP_PORTS", "80"),
            ("SHELLCODE_PORTS", "!80"),
            ("ORACLE_PORTS", "1521"),
            ("SSH_PORTS", "22"),
            ("DNP3_PORTS", "20000"),
            ("MODBUS_PORTS", "502"),
            ("FILE_DATA_PORTS", "[$HTTP_PORTS,110,143]"),
            ("FTP_PORTS", "21"),
            ("GENEVE_PORTS", "6081"),
            ("VXLAN_PORTS", "4789"),
            ("TEREDO_PORTS", "3544"),
        ] {
            ports.insert(name.into(), value.into());
        }
        Vars { addresses, ports }
    }
}

impl Vars {
    /// No variables at all.
    pub fn empty() -> Self {
        Vars {
            addresses: BTreeMap::new(),
            ports: BTreeMap::new(),
        }
    }

    /// Defines (or redefines) an address variable; `value` is a group such as
    /// `[10.0.0.0/8,!10.1.0.0/16]`. Checked when a rule uses it.
    pub fn set_address(&mut self, name: &str, value: &str) {
        self.addresses
            .insert(name.trim_start_matches('$').to_string(), value.to_string());
    }

    /// Defines (or redefines) a port variable.
    pub fn set_port(&mut self, name: &str, value: &str) {
        self.ports
            .insert(name.trim_start_matches('$').to_string(), value.to_string());
    }

    /// The text of an address variable.
    pub fn address(&self, name: &str) -> Option<&str> {
        self.addresses.get(name).map(String::as_str)
    }

    /// The text of a port variable.
    pub fn port(&self, name: &str) -> Option<&str> {
        self.ports.get(name).map(String::as_str)
    }
}

/// Why a group did not parse; the caller adds the position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupError(pub String);

/// A group item: a set, and whether it was negated.
struct Item<S> {
    negated: bool,
    set: S,
}

/// Splits the inside of a bracketed list at top-level commas.
fn split_list(text: &str) -> Result<Vec<&str>, GroupError> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| GroupError(format!("unbalanced ']' in {text:?}")))?
            }
            ',' if depth == 0 => {
                out.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(GroupError(format!("unbalanced '[' in {text:?}")));
    }
    out.push(text[start..].trim());
    if out.iter().any(|s| s.is_empty()) {
        return Err(GroupError(format!("empty item in {text:?}")));
    }
    Ok(out)
}

/// Parses an address group (`any`, `$HOME_NET`, `[10.0.0.0/8,!10.1.1.1]`, …).
pub(crate) fn parse_addresses(text: &str, vars: &Vars) -> Result<AddressSet, GroupError> {
    addresses(text.trim(), vars, 0)
}

fn addresses(text: &str, vars: &Vars, depth: usize) -> Result<AddressSet, GroupError> {
    if depth > MAX_NESTING {
        return Err(GroupError(format!(
            "variables or brackets nest more than {MAX_NESTING} deep"
        )));
    }
    let item = address_item(text, vars, depth)?;
    Ok(if item.negated { item.set.complement() } else { item.set })
}

fn address_item(text: &str, vars: &Vars, depth: usize) -> Result<Item<AddressSet>, GroupError> {
    if depth > MAX_NESTING {
        return Err(GroupError(format!(
            "variables or brackets nest more than {MAX_NESTING} deep"
        )));
    }
    let text = text.trim();
    if let Some(rest) = text.strip_prefix('!') {
        let inner = address_item(rest, vars, depth + 1)?;
        return Ok(Item {
            negated: !inner.negated,
            set: inner.set,
        });
    }
    if let Some(name) = text.strip_prefix('$') {
        let value = vars
            .address(name)
            .ok_or_else(|| GroupError(format!("unknown address variable ${name}")))?;
        // A variable is a whole group: resolve it to a set first.
        return Ok(Item {
            negated: false,
            set: addresses(value, vars, depth + 1)?,
        });
    }
    if let Some(inner) = text.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| GroupError(format!("group {text:?} lacks its closing ']'")))?;
        let mut positive = AddressSet::default();
        let mut negative = AddressSet::default();
        let mut any_positive = false;
        for part in split_list(inner)? {
            let item = address_item(part, vars, depth + 1)?;
            if item.negated {
                negative.union(&item.set);
            } else {
                any_positive = true;
                positive.union(&item.set);
            }
        }
        if !any_positive {
            positive = AddressSet::any();
        }
        positive.subtract(&negative);
        return Ok(Item {
            negated: false,
            set: positive,
        });
    }
    if text.eq_ignore_ascii_case("any") {
        return Ok(Item {
            negated: false,
            set: AddressSet::any(),
        });
    }
    Ok(Item {
        negated: false,
        set: single_address(text)?,
    })
}

fn single_address(text: &str) -> Result<AddressSet, GroupError> {
    let bad = || GroupError(format!("{text:?} is not an address, CIDR block or range"));
    let mut set = AddressSet::default();
    if let Some((lo, hi)) = text.split_once('-') {
        match (lo.trim().parse::<IpAddr>(), hi.trim().parse::<IpAddr>()) {
            (Ok(IpAddr::V4(a)), Ok(IpAddr::V4(b))) if a <= b => set.v4.push((a.into(), b.into())),
            (Ok(IpAddr::V6(a)), Ok(IpAddr::V6(b))) if a <= b => set.v6.push((a.into(), b.into())),
            _ => return Err(bad()),
        }
        return Ok(set);
    }
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    match addr.parse::<IpAddr>().map_err(|_| bad())? {
        IpAddr::V4(a) => {
            let len = prefix_len(prefix, 32, text)?;
            set.v4.push(cidr_v4(a, len));
        }
        IpAddr::V6(a) => {
            let len = prefix_len(prefix, 128, text)?;
            set.v6.push(cidr_v6(a, len));
        }
    }
    Ok(set)
}

fn prefix_len(prefix: Option<&str>, max: u32, text: &str) -> Result<u32, GroupError> {
    let Some(p) = prefix else { return Ok(max) };
    // Suricata also accepts an IPv4 netmask written as an address (10.0.0.0/255.0.0.0).
    if max == 32
        && let Ok(mask) = p.parse::<Ipv4Addr>()
    {
        let m = u32::from(mask);
        if m.leading_ones() + m.trailing_zeros() == 32 {
            return Ok(m.leading_ones());
        }
        return Err(GroupError(format!("{p:?} in {text:?} is not a contiguous netmask")));
    }
    match p.parse::<u32>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(GroupError(format!(
            "prefix length {p:?} in {text:?} is not in 0..={max}"
        ))),
    }
}

fn cidr_v4(a: Ipv4Addr, len: u32) -> (u32, u32) {
    let host = if len == 0 {
        u32::MAX
    } else {
        (1u32 << (32 - len)).wrapping_sub(1)
    };
    let base = u32::from(a) & !host;
    (base, base | host)
}

fn cidr_v6(a: Ipv6Addr, len: u32) -> (u128, u128) {
    let host = if len == 0 {
        u128::MAX
    } else {
        (1u128 << (128 - len)).wrapping_sub(1)
    };
    let base = u128::from(a) & !host;
    (base, base | host)
}

/// Parses a port group (`any`, `80`, `1024:`, `[80,443,!8080]`, `$HTTP_PORTS`, …).
pub(crate) fn parse_ports(text: &str, vars: &Vars) -> Result<PortSet, GroupError> {
    ports(text.trim(), vars, 0)
}

fn ports(text: &str, vars: &Vars, depth: usize) -> Result<PortSet, GroupError> {
    let item = port_item(text, vars, depth)?;
    Ok(if item.negated {
        let mut all = PortSet::any();
        all.subtract(&item.set);
        all
    } else {
        item.set
    })
}

fn port_item(text: &str, vars: &Vars, depth: usize) -> Result<Item<PortSet>, GroupError> {
    if depth > MAX_NESTING {
        return Err(GroupError(format!(
            "variables or brackets nest more than {MAX_NESTING} deep"
        )));
    }
    let text = text.trim();
    if let Some(rest) = text.strip_prefix('!') {
        let inner = port_item(rest, vars, depth + 1)?;
        return Ok(Item {
            negated: !inner.negated,
            set: inner.set,
        });
    }
    if let Some(name) = text.strip_prefix('$') {
        let value = vars
            .port(name)
            .ok_or_else(|| GroupError(format!("unknown port variable ${name}")))?;
        return Ok(Item {
            negated: false,
            set: ports(value, vars, depth + 1)?,
        });
    }
    if let Some(inner) = text.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| GroupError(format!("group {text:?} lacks its closing ']'")))?;
        let mut positive = PortSet::default();
        let mut negative = PortSet::default();
        let mut any_positive = false;
        for part in split_list(inner)? {
            let item = port_item(part, vars, depth + 1)?;
            if item.negated {
                negative.union(&item.set);
            } else {
                any_positive = true;
                positive.union(&item.set);
            }
        }
        if !any_positive {
            positive = PortSet::any();
        }
        positive.subtract(&negative);
        return Ok(Item {
            negated: false,
            set: positive,
        });
    }
    if text.eq_ignore_ascii_case("any") {
        return Ok(Item {
            negated: false,
            set: PortSet::any(),
        });
    }
    let bad = || GroupError(format!("{text:?} is not a port, port range or group"));
    let num = |s: &str| s.trim().parse::<u16>().map_err(|_| bad());
    let (lo, hi) = match text.split_once(':') {
        Some((lo, hi)) => {
            let lo = if lo.trim().is_empty() { 0 } else { num(lo)? };
            let hi = if hi.trim().is_empty() { u16::MAX } else { num(hi)? };
            (lo, hi)
        }
        None => {
            let p = num(text)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(GroupError(format!("port range {text:?} is empty")));
    }
    Ok(Item {
        negated: false,
        set: PortSet { ranges: vec![(lo, hi)] },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn address_groups_resolve_as_union_minus_negations() {
        let vars = Vars::default();
        let cases: &[(&str, &[(&str, bool)])] = &[
            ("any", &[("1.2.3.4", true), ("::1", true)]),
            (
                "10.0.0.0/8",
                &[("10.255.0.1", true), ("11.0.0.1", false), ("::1", false)],
            ),
            ("[10.0.0.0/8,!10.1.0.0/16]", &[("10.2.0.1", true), ("10.1.2.3", false)]),
            (
                "![10.0.0.0/8,192.168.1.1]",
                &[("10.0.0.1", false), ("192.168.1.1", false), ("8.8.8.8", true)],
            ),
            ("[!1.2.3.4]", &[("1.2.3.4", false), ("1.2.3.5", true)]),
            (
                "$HOME_NET",
                &[("172.16.5.5", true), ("172.32.0.1", false), ("8.8.8.8", false)],
            ),
            (
                "$EXTERNAL_NET",
                &[("8.8.8.8", true), ("192.168.1.1", false), ("2001:db8::1", true)],
            ),
            ("10.0.0.1-10.0.0.3", &[("10.0.0.2", true), ("10.0.0.4", false)]),
            ("2001:db8::/32", &[("2001:db8:1::1", true), ("2001:db9::1", false)]),
            ("10.0.0.0/255.255.0.0", &[("10.0.9.9", true), ("10.1.0.0", false)]),
            (
                "[[1.1.1.1,2.2.2.2],![2.2.2.2]]",
                &[("1.1.1.1", true), ("2.2.2.2", false)],
            ),
        ];
        for (group, probes) in cases {
            let set = parse_addresses(group, &vars).unwrap_or_else(|e| panic!("{group}: {e:?}"));
            for (addr, want) in *probes {
                assert_eq!(set.contains(a(addr)), *want, "{group} contains {addr}");
            }
        }
    }

    #[test]
    fn bad_address_groups_are_refused() {
        let mut vars = Vars::default();
        vars.set_address("LOOP", "[$LOOP]");
        for bad in [
            "10.0.0.0/33",
            "[10.0.0.1",
            "10.0.0.1]",
            "$NOPE",
            "foo",
            "[1.1.1.1,]",
            "$LOOP",
            "10.0.0.5-10.0.0.1",
        ] {
            assert!(parse_addresses(bad, &vars).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn port_groups() {
        let vars = Vars::default();
        let cases: &[(&str, &[(u16, bool)])] = &[
            ("any", &[(0, true), (65535, true)]),
            ("80", &[(80, true), (81, false)]),
            ("1024:", &[(1023, false), (1024, true), (65535, true)]),
            (":1024", &[(0, true), (1024, true), (1025, false)]),
            (
                "[80,443,8000:8080,!8008]",
                &[(443, true), (8008, false), (8079, true), (22, false)],
            ),
            ("!80", &[(80, false), (81, true)]),
            ("[!80,!443]", &[(80, false), (443, false), (22, true)]),
            ("$HTTP_PORTS", &[(80, true), (8080, false)]),
            ("$FILE_DATA_PORTS", &[(80, true), (110, true), (143, true), (25, false)]),
        ];
        for (group, probes) in cases {
            let set = parse_ports(group, &vars).unwrap_or_else(|e| panic!("{group}: {e:?}"));
            for (port, want) in *probes {
                assert_eq!(set.contains(*port), *want, "{group} contains {port}");
            }
        }
        for bad in ["65536", "90:80", "[80", "x", "$NOPE", "1:2:3"] {
            assert!(parse_ports(bad, &vars).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn range_arithmetic() {
        assert_eq!(subtract(&[(0u16, 100)], &[(10, 20), (50, 100)]), vec![(0, 9), (21, 49)]);
        assert_eq!(union(&[(0u16, 5)], &[(6, 9), (20, 30)]), vec![(0, 9), (20, 30)]);
        assert_eq!(subtract(&[(0u16, u16::MAX)], &[(0, u16::MAX)]), vec![]);
    }
}

//! Rules, keys and matches: the vocabulary every classifier shares.
//!
//! Addresses are carried as `u128` whatever the family, IPv4 in the low 32
//! bits, so one `Key` type serves both families without an enum on the hot
//! path. A rule applies to one family; a policy rule for both becomes two.

use crate::RuleError;

/// An IP address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4: addresses in the low 32 bits of a `u128`.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Address width in bits.
    pub const fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// An address prefix, normalised: the bits past `len` are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    addr: u128,
    len: u8,
    family: Family,
}

impl Prefix {
    /// An IPv4 prefix; host bits past `len` are cleared.
    pub fn v4(addr: u32, len: u8) -> Result<Prefix, RuleError> {
        Prefix::new(Family::V4, u128::from(addr), len)
    }

    /// An IPv6 prefix; host bits past `len` are cleared.
    pub fn v6(addr: u128, len: u8) -> Result<Prefix, RuleError> {
        Prefix::new(Family::V6, addr, len)
    }

    /// A prefix of `family`; host bits past `len` are cleared.
    pub fn new(family: Family, addr: u128, len: u8) -> Result<Prefix, RuleError> {
        let max = family.bits();
        if len > max {
            return Err(RuleError::BadPrefixLength { len, max });
        }
        let addr = addr & family_mask(family) & prefix_mask(family, len);
        Ok(Prefix { addr, len, family })
    }

    /// The prefix matching every address of `family`.
    pub const fn any(family: Family) -> Prefix {
        Prefix {
            addr: 0,
            len: 0,
            family,
        }
    }

    /// The network address (host bits zero).
    pub const fn addr(&self) -> u128 {
        self.addr
    }

    /// The prefix length in bits.
    pub const fn len(&self) -> u8 {
        self.len
    }

    /// True for the zero-length prefix (matches everything).
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address family.
    pub const fn family(&self) -> Family {
        self.family
    }

    /// True if `addr` (of this prefix's family) lies inside the prefix.
    pub fn contains(&self, addr: u128) -> bool {
        (addr & family_mask(self.family) & prefix_mask(self.family, self.len)) == self.addr
    }

    /// The range the prefix covers in the top 32 bits of the address.
    ///
    /// The decision trees split on these 32-bit projections; for IPv4 the
    /// projection is exact, for IPv6 a match is confirmed on the full address.
    pub(crate) fn top32_range(&self) -> (u32, u32) {
        let (top, len) = match self.family {
            // Truncation is the point: IPv4 lives in the low 32 bits.
            Family::V4 => (self.addr as u32, self.len),
            Family::V6 => ((self.addr >> 96) as u32, self.len.min(32)),
        };
        // A /32 spans one value; `>> 32` would overflow.
        let span = u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
        (top, top | span)
    }
}

/// All-ones over the family's address width.
fn family_mask(family: Family) -> u128 {
    match family {
        Family::V4 => u128::from(u32::MAX),
        Family::V6 => u128::MAX,
    }
}

/// The network mask of a `len`-bit prefix (`len` at most the family's width).
fn prefix_mask(family: Family, len: u8) -> u128 {
    let bits = u32::from(family.bits());
    let len = u32::from(len);
    if len == 0 {
        0
    } else {
        (u128::MAX << (bits - len)) & family_mask(family)
    }
}

/// A classification rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Lower wins. ClassBench uses the line index.
    pub priority: u32,
    /// Source prefix.
    pub src: Prefix,
    /// Destination prefix (same family as `src`).
    pub dst: Prefix,
    /// Inclusive source port range.
    pub src_ports: (u16, u16),
    /// Inclusive destination port range.
    pub dst_ports: (u16, u16),
    /// IP protocol, or `None` for any.
    pub proto: Option<u8>,
    /// TCP flags `(value, mask)`: matches iff `flags & mask == value & mask`.
    pub tcp_flags: (u16, u16),
    /// vNIC-level metadata `(value, mask)`: matches iff `meta & mask == value & mask`.
    pub meta: (u32, u32),
    /// Opaque user data returned with a match.
    pub action: u32,
}

impl Rule {
    /// A rule matching every packet of `family`, with the given priority and action.
    pub const fn any(family: Family, priority: u32, action: u32) -> Rule {
        Rule {
            priority,
            src: Prefix::any(family),
            dst: Prefix::any(family),
            src_ports: (0, u16::MAX),
            dst_ports: (0, u16::MAX),
            proto: None,
            tcp_flags: (0, 0),
            meta: (0, 0),
            action,
        }
    }

    /// The rule's address family.
    pub const fn family(&self) -> Family {
        self.src.family
    }

    /// Checks the invariants a classifier relies on.
    pub fn validate(&self) -> Result<(), RuleError> {
        if self.src.family != self.dst.family {
            return Err(RuleError::MixedFamilies);
        }
        for (lo, hi) in [self.src_ports, self.dst_ports] {
            if lo > hi {
                return Err(RuleError::EmptyPortRange { lo, hi });
            }
        }
        Ok(())
    }

    /// True if every field of the rule matches `key` (the oracle's test).
    pub fn matches(&self, key: &Key) -> bool {
        key.family == self.src.family
            && self.src.contains(key.src)
            && self.dst.contains(key.dst)
            && (self.src_ports.0..=self.src_ports.1).contains(&key.sport)
            && (self.dst_ports.0..=self.dst_ports.1).contains(&key.dport)
            && self.proto.is_none_or(|p| p == key.proto)
            && key.flags & self.tcp_flags.1 == self.tcp_flags.0 & self.tcp_flags.1
            && key.meta & self.meta.1 == self.meta.0 & self.meta.1
    }
}

/// A packet header as the classifier sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    /// Address family of `src` and `dst`.
    pub family: Family,
    /// Source address (IPv4 in the low 32 bits; higher bits are ignored).
    pub src: u128,
    /// Destination address.
    pub dst: u128,
    /// Source port (0 where the protocol has none).
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// TCP flags (0 for other protocols).
    pub flags: u16,
    /// vNIC-level metadata word.
    pub meta: u32,
}

impl Key {
    /// An IPv4 key with zero metadata.
    pub const fn v4(src: u32, dst: u32, sport: u16, dport: u16, proto: u8, flags: u16) -> Key {
        Key {
            family: Family::V4,
            src: src as u128,
            dst: dst as u128,
            sport,
            dport,
            proto,
            flags,
            meta: 0,
        }
    }

    /// An IPv6 key with zero metadata.
    pub const fn v6(src: u128, dst: u128, sport: u16, dport: u16, proto: u8, flags: u16) -> Key {
        Key {
            family: Family::V6,
            src,
            dst,
            sport,
            dport,
            proto,
            flags,
            meta: 0,
        }
    }
}

/// Names an installed rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleId(pub u32);

/// The answer to a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Match {
    /// The matching rule.
    pub id: RuleId,
    /// Its priority.
    pub priority: u32,
    /// Its action (user data).
    pub action: u32,
}

/// Hands out rule ids, reusing freed ones (last freed first).
#[derive(Debug, Clone, Default)]
pub(crate) struct IdAlloc {
    next: u32,
    free: Vec<u32>,
}

impl IdAlloc {
    pub(crate) fn alloc(&mut self) -> Result<u32, RuleError> {
        if let Some(id) = self.free.pop() {
            return Ok(id);
        }
        // u32::MAX stays unused so it can mark "no rule" in packed orders.
        if self.next == u32::MAX {
            return Err(RuleError::Full);
        }
        self.next += 1;
        Ok(self.next - 1)
    }

    pub(crate) fn free(&mut self, id: u32) {
        self.free.push(id);
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.free.capacity() * size_of::<u32>()
    }
}

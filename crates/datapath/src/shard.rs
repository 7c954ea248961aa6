//! Choosing the worker that owns a flow.
//!
//! A multi-core host runs one [`crate::Engine`] per worker, each owning the
//! connections whose flows hash to it. The hash is symmetric
//! ([`FlowKey::symmetric_hash`]), so both directions of a connection, and the
//! ICMP errors that quote it ([`crate::Engine::dispatch_key`]), land on the same
//! worker and no state is shared between workers. The dispatcher (the I/O
//! layer) computes the shard; the engines themselves stay single-threaded.

use palisade_wire::flow::FlowKey;

/// The shard (0..`shards`) that owns `key`; 0 when `shards` is 0.
pub fn shard_of(key: &FlowKey, shards: usize) -> usize {
    if shards == 0 {
        return 0;
    }
    (key.symmetric_hash() % shards as u64) as usize
}

#[cfg(test)]
mod tests {
    use palisade_wire::flow::Segment;
    use palisade_wire::ip::IpProtocol;

    use super::*;

    #[test]
    fn both_directions_share_a_shard_and_shards_spread() {
        let mut used = [false; 8];
        for p in 0..256u16 {
            let k = FlowKey {
                segment: Segment::vlan(100),
                src: [p as u8; 16],
                dst: [2; 16],
                src_port: 40000 + p,
                dst_port: 443,
                protocol: IpProtocol::TCP,
                icmp_type: 0,
                icmp_code: 0,
            };
            assert_eq!(shard_of(&k, 8), shard_of(&k.reversed(), 8));
            used[shard_of(&k, 8)] = true;
        }
        assert!(used.iter().all(|u| *u), "256 flows reach all 8 shards");
        let k = FlowKey {
            segment: Segment::UNTAGGED,
            src: [0; 16],
            dst: [0; 16],
            src_port: 0,
            dst_port: 0,
            protocol: IpProtocol::UDP,
            icmp_type: 0,
            icmp_code: 0,
        };
        assert_eq!(shard_of(&k, 0), 0, "no shards: everything on the one engine");
    }
}

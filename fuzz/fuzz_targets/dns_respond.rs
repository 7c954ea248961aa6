//! Fuzz the lab's DNS responder with arbitrary datagrams: no panic, and an
//! answer only to something that parses as a query, echoing its id.
#![no_main]

use std::net::Ipv4Addr;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut records = palisade_lab::dns::Records::new();
    records.insert("web-1", Ipv4Addr::new(10, 0, 1, 11));
    records.insert("db-1.lab", Ipv4Addr::new(10, 0, 3, 31));
    if let Some(answer) = palisade_lab::dns::respond(&records, data) {
        assert!(palisade_lab::dns::parse_query(data).is_some(), "answered a non-query");
        assert!(answer.len() >= 12 && data.len() >= 2, "short answer");
        assert_eq!(answer[..2], data[..2], "the answer echoes the query id");
    }
});

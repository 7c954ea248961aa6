//! IPFIX (RFC 7011/7012) export of flow records over UDP.

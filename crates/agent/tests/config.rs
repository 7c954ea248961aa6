//! The agent's configuration file as an operator writes it: read from disk,
//! defaults filled in, and every mistake refused with the file and the field.

use std::path::Path;
use std::time::Duration;

use palisade_agent::config::{AfPacketRx, AgentConfig, ConfigError, MAX_WORKERS};

const MINIMAL: &str = "host = \"hv1\"\npolicy = \"/etc/palisade/policy\"\nstate_dir = \"/var/lib/palisade\"\n\
                       [underlay]\nlocal = \"192.168.100.1\"\n";

#[test]
fn a_file_is_read_and_defaults_filled_in() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("agent.toml");
    std::fs::write(&path, MINIMAL).unwrap();
    let c = AgentConfig::load(&path).unwrap();
    assert_eq!((c.host.as_str(), c.underlay.port), ("hv1", 4789));
    assert!(c.vnics.is_empty() && c.appliances.is_empty() && c.underlay.peers.is_empty());
    assert_eq!((c.metrics, c.audit.as_ref(), c.ipfix), (None, None, None));
    assert_eq!(c.audit_key_file(), Path::new("/var/lib/palisade/audit.key"));
    assert_eq!(c.audit_head_file(), Path::new("/var/lib/palisade/audit.head"));
    let r = c.audit_retention();
    assert_eq!((r.max_age, r.max_bytes), (Some(Duration::from_secs(90 * 86_400)), None));
    assert!((1..=MAX_WORKERS).contains(&c.workers()));
    assert_eq!(c.af_packet_rx, AfPacketRx::Socket);

    let c = AgentConfig::parse(
        &MINIMAL.replace(
            "[underlay]",
            "audit_max_age = \"12h\"\naudit_max_bytes = 1000000\nworkers = 3\naf_packet_rx = \"ring\"\n[underlay]",
        ),
        &path,
    )
    .unwrap();
    let r = c.audit_retention();
    assert_eq!(
        (r.max_age, r.max_bytes),
        (Some(Duration::from_secs(43_200)), Some(1_000_000))
    );
    assert_eq!(c.workers(), 3);
    assert_eq!(c.af_packet_rx, AfPacketRx::Ring);
}

#[test]
fn a_missing_file_is_a_read_error_naming_it() {
    let e = AgentConfig::load(Path::new("/nonexistent/agent.toml")).unwrap_err();
    assert!(matches!(&e, ConfigError::Read { path, .. } if path == Path::new("/nonexistent/agent.toml")));
    assert!(
        e.to_string().starts_with("cannot read /nonexistent/agent.toml: "),
        "{e}"
    );
}

#[test]
fn syntax_errors_say_where() {
    let e = AgentConfig::parse("host = \"hv1\"\nstate_dir = [\n", Path::new("a.toml")).unwrap_err();
    assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    let text = e.to_string();
    assert!(text.starts_with("a.toml: ") && text.contains("line 2"), "{text}");
    // A field missing, or of the wrong type, is a parse error too.
    for (bad, want) in [
        (MINIMAL.replace("host = \"hv1\"\n", ""), "missing field `host`"),
        (MINIMAL.replace("\"192.168.100.1\"", "42"), "line 5"),
        (MINIMAL.replace("[underlay]", "workers = \"4\"\n[underlay]"), "workers"),
        (
            MINIMAL.replace("[underlay]", "af_packet_rx = \"mmap\"\n[underlay]"),
            "unknown variant `mmap`",
        ),
    ] {
        let e = AgentConfig::parse(&bad, Path::new("a.toml")).unwrap_err().to_string();
        assert!(e.starts_with("a.toml: ") && e.contains(want), "{e} should say {want}");
    }
}

#[test]
fn inconsistent_values_name_the_field() {
    let vnic = |iface: &str| format!("{MINIMAL}[[vnic]]\nname = \"web-1.0\"\ninterface = \"{iface}\"\n");
    let cases = [
        (vnic(""), "vnic web-1.0: interface: `` is not a Linux interface name"),
        (
            vnic("a/b"),
            "vnic web-1.0: interface: `a/b` is not a Linux interface name",
        ),
        (vnic("has space"), "is not a Linux interface name"),
        (
            MINIMAL
                .replace("policy = \"/etc/palisade/policy\"\n", "")
                .replace("[underlay]", "[controller]\nservers = []\n[underlay]"),
            "controller.servers: is empty",
        ),
        (
            MINIMAL.replace(
                "[underlay]",
                "audit = \"/var/lib/palisade/trail\"\naudit_key = \"/var/lib/palisade/trail/k\"\n[underlay]",
            ),
            "audit_key: /var/lib/palisade/trail/k is inside the audit directory",
        ),
        (
            MINIMAL.replace("[underlay]", "audit_max_age = \"90\"\n[underlay]"),
            "audit_max_age: `90` is not a duration",
        ),
    ];
    for (text, want) in cases {
        let e = AgentConfig::parse(&text, Path::new("hv1.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { .. }), "{e}");
        let e = e.to_string();
        assert!(
            e.starts_with("hv1.toml: ") && e.contains(want),
            "{e} should contain {want}"
        );
    }
}

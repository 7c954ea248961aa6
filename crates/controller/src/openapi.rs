//! The OpenAPI 3 description of the API, served at `GET /openapi.json`.
//!
//! Written by hand from one table of endpoints, so adding a route means adding
//! a row here; the API tests request every path of the document and check
//! that the router knows it.

use serde_json::{Map, Value, json};

use palisade_api::validate::*;
use palisade_api::*;

/// The largest request body accepted (413 above). Bodies are read only
/// after the caller is authorized; the size is set by the largest policy an
/// apply carries: a 50,000-VM inventory is about 9 MiB of JSON. Defined here,
/// with the document that states it, and enforced by the server.
pub const BODY_LIMIT: usize = 32 << 20;

/// (method, path, summary, who may call, request schema, response schema).
type Endpoint = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static str,
);

const ENDPOINTS: &[Endpoint] = &[
    (
        "post",
        "/v1/policy",
        "Validate and apply a policy as a new current version (`?dry_run=true`: only validate)",
        "operator, admin (dry run: any role)",
        Some("ApplyRequest"),
        "ApplyResponse",
    ),
    (
        "get",
        "/v1/policy",
        "The current effective policy (files and tag overlay)",
        "any role",
        None,
        "PolicyBundle",
    ),
    (
        "get",
        "/v1/policy/versions",
        "Version history, oldest first",
        "any role",
        None,
        "VersionSummaryList",
    ),
    (
        "get",
        "/v1/policy/versions/{v}",
        "One version with its files",
        "any role",
        None,
        "VersionRecord",
    ),
    (
        "post",
        "/v1/policy/diff",
        "Unified diff against the current policy, and the vNIC chains that would change",
        "any role",
        Some("ApplyRequest"),
        "DiffResponse",
    ),
    (
        "post",
        "/v1/policy/rollback/{v}",
        "Make version v's files current again, as a new version",
        "operator, admin",
        None,
        "ApplyResponse",
    ),
    (
        "get",
        "/v1/vms",
        "VMs with their effective tags",
        "any role",
        None,
        "VmList",
    ),
    (
        "put",
        "/v1/vms/{name}/tags",
        "Set and remove tags of a VM (a new effective revision)",
        "operator, admin",
        Some("TagRequest"),
        "TagResponse",
    ),
    (
        "post",
        "/v1/vms/{name}/migrate",
        "Order a live migration of the VM to another host (202: the order, pending; the source host's agent carries it out; 409 while another of the VM's migrations is pending or running; 422: an unknown host, the VM's own host, a host without a registered agent). Recorded as a change",
        "operator, admin",
        Some("MigrateRequest"),
        "MigrationOrder",
    ),
    (
        "get",
        "/v1/vms/{name}/migration",
        "The VM's last migration order and its outcome",
        "any role",
        None,
        "MigrationOrder",
    ),
    (
        "get",
        "/v1/hosts",
        "Hosts of the inventory and of registered agents",
        "any role",
        None,
        "HostList",
    ),
    ("get", "/v1/agents", "Registered agents", "any role", None, "AgentList"),
    (
        "get",
        "/v1/changes",
        "Change records (who changed what)",
        "auditor, admin",
        None,
        "ChangeList",
    ),
    (
        "post",
        "/v1/agents/{host}/register",
        "Register the agent of a host",
        "client certificate with CN = host (plain HTTP: admin token)",
        Some("RegisterRequest"),
        "AgentRecord",
    ),
    (
        "get",
        "/v1/agents/{host}/policy",
        "Long-poll: the effective policy once its revision exceeds `after`, else 304 after `wait` seconds; with `have=VERSION`, a bundle of that same version comes without its files (`same_files: true`), and one of another version as edits of that version's files (`delta`), when they are smaller",
        "client certificate with CN = host (plain HTTP: admin token)",
        None,
        "PolicyBundle",
    ),
    (
        "post",
        "/v1/agents/{host}/report",
        "Report the installed revision and counters",
        "client certificate with CN = host (plain HTTP: admin token)",
        Some("ReportRequest"),
        "AgentRecord",
    ),
    (
        "post",
        "/v1/agents/{host}/health",
        "Report the host's datapath health (the report's host must be the path's, else 422); the controller's view of the host as it stands (its state is derived once a second)",
        "client certificate with CN = host (plain HTTP: admin token)",
        Some("HealthReport"),
        "HostHealth",
    ),
    (
        "post",
        "/v1/agents/{host}/flows",
        "Append the host's flow records (at most 10000, each with this host) to the controller's audit log, in one durable batch",
        "client certificate with CN = host (plain HTTP: admin token)",
        Some("FlowBatch"),
        "FlowPushResponse",
    ),
    (
        "get",
        "/v1/flows",
        "Flow records (and with `changes`, change records) of the controller's audit log, in sequence order",
        "any role",
        None,
        "FlowList",
    ),
    (
        "post",
        "/v1/agents/{host}/alerts",
        "Push the host's inline-inspection alerts (at most 2000, each with this host); the controller keeps the newest 20000 per host, in memory",
        "client certificate with CN = host (plain HTTP: admin token)",
        Some("AlertBatch"),
        "AlertPushResponse",
    ),
    (
        "get",
        "/v1/alerts",
        "Inline-inspection alerts the agents pushed, filtered; the newest `limit`, oldest first",
        "any role",
        None,
        "AlertList",
    ),
    (
        "get",
        "/v1/status",
        "This controller's status: its audit log, how many change records it failed to append, and how it compiled for tag changes",
        "any role",
        None,
        "ControllerStatus",
    ),
    (
        "post",
        "/v1/tokens",
        "Create an API token; the answer is the only time its secret is shown",
        "admin",
        Some("TokenRequest"),
        "TokenResponse",
    ),
    (
        "get",
        "/v1/tokens",
        "Every token, revoked ones included (never the secrets)",
        "admin",
        None,
        "TokenList",
    ),
    (
        "delete",
        "/v1/tokens/{name}",
        "Revoke the live tokens of that name (or id); refused (400) if no live admin token would remain",
        "admin",
        None,
        "TokenList",
    ),
    (
        "put",
        "/v1/agents/{host}/audit-head",
        "Publish the host's newest signed audit head: signed by the host's pinned key (else 409 for another key, 422 for a bad signature), ahead of the head held; a lower seq (rollback) or the same seq with another hash (fork) is refused with 409 and kept as evidence; the same head again changes nothing",
        "client certificate with CN = host (plain HTTP: admin token)",
        Some("HeadDocument"),
        "AuditHeadInfo",
    ),
    (
        "get",
        "/v1/agents/{host}/audit-head",
        "The host's pinned audit key, newest signed head and refused heads (what `palisade audit verify --server` checks a trail against)",
        "any role",
        None,
        "AuditHeadInfo",
    ),
    (
        "put",
        "/v1/agents/{host}/audit-key",
        "Replace the host's pinned audit key (a reinstalled host, a new trail); its head and refused heads are dropped, and named in the change record",
        "admin",
        Some("AuditKeyRequest"),
        "AuditHeadInfo",
    ),
    (
        "get",
        "/v1/agents/{host}/migrations",
        "The migration orders the host's agent is to act on: those to it not yet pre-staged, those from it once pre-staged (pending, not past their deadline)",
        "client certificate with CN = host (plain HTTP: admin token)",
        None,
        "MigrationOrderList",
    ),
    (
        "post",
        "/v1/agents/{host}/migrations/{name}",
        "The source agent took the VM's migration order (running) or finished it (completed, failed: stored with a migration record in the controller's trail); 409 for another order or one over already, 422 from another host than the order's source",
        "client certificate with CN = host (plain HTTP: admin token)",
        Some("MigrationReport"),
        "MigrationOrder",
    ),
    (
        "post",
        "/v1/agents/{host}/migrations/{name}/staged",
        "The destination agent is ready for the VM's migration (its vNICs attached with their rules; the order then goes to the source agent) or says why not (the order fails before anything moves, with its record); 409 for another order or one staged, taken or over already, 422 from another host than the order's destination",
        "client certificate with CN = host (plain HTTP: admin token)",
        Some("StagedReport"),
        "MigrationOrder",
    ),
    (
        "post",
        "/v1/agents/{host}/arrivals",
        "A guest announced itself (RARP or gratuitous ARP) on the host's vNIC: when the VM is placed on another host, it is placed on this one and a `follow` order is stored for the host it left (recorded as `vm.migrate.detected`); 404 for a vNIC the policy does not have, 409 while a migration of the VM to another host is under way, 422 for a MAC that is not the vNIC's",
        "client certificate with CN = host (plain HTTP: admin token)",
        Some("ArrivalReport"),
        "ArrivalResponse",
    ),
    (
        "get",
        "/v1/audit/head",
        "This controller's own audit trail: its public key and last published head",
        "any role",
        None,
        "AuditHeadInfo",
    ),
    ("get", "/openapi.json", "This document", "anyone", None, "Object"),
];

/// An object with these properties, the `required` ones listed (OpenAPI 3.0
/// refuses an empty `required`, so none is left out).
fn obj(props: &[(&str, Value)], required: &[&str]) -> Value {
    let p: Map<String, Value> = props.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    let mut o = json!({ "type": "object", "properties": p });
    if !required.is_empty() {
        o["required"] = json!(required);
    }
    o
}

/// A request body object: as [`obj`], refusing any other property (400).
fn closed(props: &[(&str, Value)], required: &[&str]) -> Value {
    let mut o = obj(props, required);
    o["additionalProperties"] = json!(false);
    o
}

/// A string anchored at both ends: Python's `$` (Schemathesis generates with
/// Python's `re`) also matches before a final newline, so the end is "no
/// character follows".
fn anchored(body: &str) -> String {
    format!("^{body}(?![\\s\\S])")
}

/// Text people read back: no control or invisible characters (400), at
/// most `max` characters (413).
fn printable(max: usize) -> Value {
    json!({ "type": "string", "maxLength": max, "pattern": anchored(&format!("[^{HIDDEN_CLASS}]*")) })
}

/// A 64-bit unsigned integer.
fn u64_schema() -> Value {
    json!({ "type": "integer", "minimum": 0, "maximum": u64::MAX })
}

fn schemas() -> Value {
    let s = json!({ "type": "string" });
    let n = u64_schema();
    let boolean = json!({ "type": "boolean" });
    let strmap = json!({ "type": "object", "additionalProperties": { "type": "string" } });
    let files = json!({ "type": "object", "additionalProperties": { "type": "string" },
        "description": "file name → YAML text" });
    let request_files = json!({
        "type": "object",
        "minProperties": 1,
        "maxProperties": MAX_FILES,
        "additionalProperties": { "type": "string" },
        "description": format!(
            "file name → YAML text. Each name is a plain *.yaml or *.yml name of at most \
             {MAX_FILE_NAME_CHARS} printable characters, not starting with a dot and without a \
             directory (else 422: OpenAPI 3.0 cannot constrain a map's keys); each file at most \
             {MAX_FILE_BYTES} bytes, all names and files together at most {MAX_BUNDLE_BYTES} (else 413)"),
    });
    let overlay = json!({ "type": "object", "description": "VM → tag → value, or null for a removed tag",
        "additionalProperties": { "type": "object", "additionalProperties": { "type": "string", "nullable": true } } });
    let counters = json!({ "type": "object", "additionalProperties": n.clone() });
    let r = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
    let list = |name: &str| json!({ "type": "array", "items": r(name) });
    let strings = json!({ "type": "array", "items": s.clone() });
    let summary = [
        ("version", n.clone()),
        ("author", s.clone()),
        ("time_ns", n.clone()),
        ("message", s.clone()),
        ("rollback_of", n.clone()),
    ];
    let mut version = summary.to_vec();
    version.push(("files", files.clone()));
    let tag_key = {
        let mut k = printable(MAX_TAG_KEY_CHARS);
        k["minLength"] = json!(1);
        k
    };
    let token_name = json!({ "type": "string", "minLength": 1, "maxLength": MAX_TOKEN_NAME_CHARS,
        "pattern": TOKEN_NAME_PATTERN });
    let role = json!({ "type": "string", "enum": ["admin", "operator", "auditor", "read-only"] });
    // Exactly `n` bytes of hex: another character 400, more digits 413, fewer 400.
    let hex = |n: usize| json!({ "type": "string", "minLength": 2 * n, "maxLength": 2 * n, "pattern": hex_pattern(n) });
    let mut key_hex = hex(32);
    key_hex["description"] =
        json!("an ed25519 public key, 64 hex digits (a value that is not a point of the curve: 422)");
    // null is as if absent.
    let mut optional_key = key_hex.clone();
    optional_key["nullable"] = json!(true);
    let endpoint = obj(
        &[
            (
                "addr",
                json!({ "type": "string", "description": "an IPv4 or IPv6 address" }),
            ),
            ("port", json!({ "type": "integer", "minimum": 0, "maximum": u16::MAX })),
            ("vm", r("VmIdentity")),
        ],
        &["addr", "port"],
    );
    let vm_identity = obj(
        &[
            ("name", s.clone()),
            ("uuid", s.clone()),
            ("vnic", s.clone()),
            ("zone", s.clone()),
            ("cluster", s.clone()),
            ("host", s.clone()),
            ("tags", strmap.clone()),
        ],
        &["name", "uuid", "vnic", "zone"],
    );
    let decision = obj(
        &[
            ("rule", s.clone()),
            (
                "level",
                json!({ "type": "string", "enum": ["datacenter", "cluster", "zone", "vm"] }),
            ),
            ("policy_version", n.clone()),
            ("chain", json!({ "type": "string", "enum": ["egress", "ingress"] })),
        ],
        &["rule", "level", "policy_version", "chain"],
    );
    let byte = json!({ "type": "integer", "minimum": 0, "maximum": u8::MAX });
    let mut icmp_message = obj(&[("type", byte.clone()), ("code", byte)], &["type", "code"]);
    icmp_message["additionalProperties"] = json!(false);
    icmp_message["description"] = json!("the ICMP or ICMPv6 message a flow was decided on (ICMP flows only)");
    let verdict = json!({ "type": "string", "enum": ["allow", "deny", "reject"] });
    let mut flow_record = obj(
        &[
            ("time_ns", n.clone()),
            ("flow_id", n.clone()),
            ("host", s.clone()),
            ("phase", json!({ "type": "string", "enum": ["start", "update", "end"] })),
            (
                "reason",
                json!({ "type": "string", "description": "why the flow ended (phase end only)",
                "enum": ["fin", "rst", "timeout", "policy_revoked", "evicted", "migrated", "shutdown"] }),
            ),
            ("src", r("Endpoint")),
            ("dst", r("Endpoint")),
            (
                "protocol",
                json!({ "type": "integer", "minimum": 0, "maximum": u8::MAX }),
            ),
            ("icmp", r("IcmpMessage")),
            ("verdict", verdict.clone()),
            ("decided_by", list("Decision")),
            ("packets_out", n.clone()),
            ("bytes_out", n.clone()),
            ("packets_in", n.clone()),
            ("bytes_in", n.clone()),
            ("start_ns", n.clone()),
            ("last_ns", n.clone()),
        ],
        &[
            "time_ns",
            "flow_id",
            "host",
            "phase",
            "src",
            "dst",
            "protocol",
            "verdict",
            "decided_by",
            "packets_out",
            "bytes_out",
            "packets_in",
            "bytes_in",
            "start_ns",
            "last_ns",
        ],
    );
    flow_record["additionalProperties"] = json!(false);
    flow_record["description"] = json!("one flow record of an agent's audit trail");
    let change = obj(
        &[
            ("time_ns", n.clone()),
            ("actor", s.clone()),
            ("action", s.clone()),
            ("resource", s.clone()),
            ("diff", s.clone()),
            ("policy_version", n.clone()),
        ],
        &["time_ns", "actor", "action", "resource", "diff"],
    );
    let mut change_record = change.clone();
    change_record["properties"]["kind"] = json!({ "type": "string", "enum": ["change"] });
    if let Some(a) = change_record["required"].as_array_mut() {
        a.push(json!("kind"));
    }
    let mut flow_entry = flow_record.clone();
    flow_entry["properties"]["kind"] = json!({ "type": "string", "enum": ["flow"] });
    if let Some(a) = flow_entry["required"].as_array_mut() {
        a.push(json!("kind"));
    }
    let u32_schema = json!({ "type": "integer", "minimum": 0, "maximum": u32::MAX });
    let mut alert_info = closed(
        &[
            (
                "action",
                json!({ "type": "string", "description": "allowed (the packet went on) or blocked" }),
            ),
            (
                "rule_action",
                json!({ "type": "string", "description": "the signature's action: alert, drop, reject or pass" }),
            ),
            ("signature_id", u32_schema.clone()),
            ("rev", u32_schema.clone()),
            ("signature", s.clone()),
            ("category", json!({ "type": "string", "nullable": true })),
            (
                "severity",
                json!({ "type": "integer", "minimum": 0, "maximum": u8::MAX }),
            ),
        ],
        &["action", "rule_action", "signature_id", "rev", "signature", "severity"],
    );
    alert_info["description"] = json!("the signature and what was done (Suricata EVE's `alert` object)");
    let mut nullable_vm = r("VmIdentity");
    nullable_vm = json!({ "allOf": [nullable_vm], "nullable": true });
    let port = json!({ "type": "integer", "minimum": 0, "maximum": u16::MAX });
    let mut alert_record = closed(
        &[
            ("timestamp", s.clone()),
            ("time_ns", n.clone()),
            ("host", s.clone()),
            ("flow_id", n.clone()),
            ("proto", s.clone()),
            (
                "src_ip",
                json!({ "type": "string", "description": "an IPv4 or IPv6 address" }),
            ),
            ("src_port", port.clone()),
            (
                "dest_ip",
                json!({ "type": "string", "description": "an IPv4 or IPv6 address" }),
            ),
            ("dest_port", port),
            ("alert", r("AlertInfo")),
            ("profile", s.clone()),
            ("decided_by", list("Decision")),
            ("src", nullable_vm.clone()),
            ("dest", nullable_vm),
            ("count", n.clone()),
            ("last_ns", n.clone()),
        ],
        &[
            "timestamp",
            "time_ns",
            "host",
            "proto",
            "src_ip",
            "src_port",
            "dest_ip",
            "dest_port",
            "alert",
            "profile",
        ],
    );
    alert_record["description"] = json!(
        "one alert of inline inspection, in Suricata EVE's field names, with both ends' VM identity (null: external); \
         `count` repeated alert-only hits of the signature on the flow, from `time_ns` to `last_ns`"
    );
    let table_fill = closed(
        &[
            ("worker", u32_schema.clone()),
            ("connections", n.clone()),
            ("capacity", n.clone()),
        ],
        &["worker", "connections", "capacity"],
    );
    let fail_open_episode = closed(
        &[
            (
                "zones",
                json!({ "type": "array", "maxItems": palisade_api::health::MAX_ZONES,
                        "items": { "type": "string", "minLength": 1, "maxLength": palisade_api::health::MAX_ZONE_NAME_CHARS } }),
            ),
            ("armed_at_ns", n.clone()),
            ("ended_at_ns", n.clone()),
        ],
        &["zones", "armed_at_ns", "ended_at_ns"],
    );
    let mut status = printable(16);
    status["minLength"] = json!(1);
    let health_state = json!({ "type": "string", "enum": ["unknown", "healthy", "degraded", "failed"] });
    let mut health_report = closed(
        &[
            (
                "host",
                json!({ "type": "string", "minLength": 1, "maxLength": MAX_HOST_NAME_CHARS, "pattern": HOST_PATTERN }),
            ),
            ("time_ns", n.clone()),
            ("interval_ms", n.clone()),
            ("uptime_s", n.clone()),
            ("status", status),
            ("enforcing", boolean.clone()),
            ("fail_open_active", boolean.clone()),
            ("workers", u32_schema.clone()),
            ("workers_alive", u32_schema),
            ("policy_version", n.clone()),
            (
                "controller_revision",
                json!({ "type": "integer", "minimum": 0, "maximum": u64::MAX, "nullable": true }),
            ),
            ("policy_age_s", n.clone()),
            (
                "policy_error",
                json!({ "type": "string", "maxLength": palisade_api::health::MAX_POLICY_ERROR_CHARS, "nullable": true }),
            ),
            ("ring_drops", n.clone()),
            ("table_drops", n.clone()),
            (
                "tables",
                json!({ "type": "array", "maxItems": palisade_api::health::MAX_WORKERS, "items": r("TableFill") }),
            ),
            (
                "zones",
                json!({ "type": "object", "maxProperties": palisade_api::health::MAX_ZONES,
                "additionalProperties": { "type": "string", "enum": ["open", "closed"] },
                "description": format!("zone → on_failure; each zone name 1 to {} printable characters (else 422)", palisade_api::health::MAX_ZONE_NAME_CHARS) }),
            ),
            (
                "fallback_planned",
                json!({ "type": "boolean", "description": "a fail-open plan is written: the open zones forward unfiltered if the agent dies and its fallback is armed" }),
            ),
            ("last_fail_open", r("FailOpenEpisode")),
        ],
        &[
            "host",
            "time_ns",
            "interval_ms",
            "uptime_s",
            "status",
            "enforcing",
            "fail_open_active",
            "workers",
            "workers_alive",
            "policy_version",
            "policy_age_s",
            "ring_drops",
            "table_drops",
            "tables",
            "zones",
        ],
    );
    health_report["description"] = json!("refused with 422: a host other than the path's, workers_alive above workers");
    let mut tag_request = closed(
        &[
            (
                "set",
                json!({ "type": "object", "maxProperties": MAX_TAGS_PER_REQUEST,
                "additionalProperties": printable(MAX_TAG_VALUE_CHARS),
                "description": format!("tag → value; each key 1 to {MAX_TAG_KEY_CHARS} printable characters \
                    (else 422: OpenAPI 3.0 cannot constrain a map's keys)") }),
            ),
            (
                "remove",
                json!({ "type": "array", "maxItems": MAX_TAGS_PER_REQUEST,
                "uniqueItems": true, "items": tag_key }),
            ),
        ],
        &[],
    );
    tag_request["minProperties"] = json!(1);
    tag_request["description"] = json!(format!(
        "refused with 422: nothing to set or remove (both fields empty), a key both set and \
         removed, and a VM with more than {MAX_OVERLAY_TAGS_PER_VM} tag keys set or removed \
         through the API"
    ));
    let audit = [
        (
            "HeadDocument",
            closed(
                &[
                    ("seq", n.clone()),
                    ("hash", hex(32)),
                    ("time_ns", n.clone()),
                    ("signature", hex(64)),
                    ("public_key", key_hex.clone()),
                ],
                &["seq", "hash", "time_ns", "signature", "public_key"],
            ),
        ),
        (
            "HeadConflict",
            obj(
                &[
                    ("head", r("HeadDocument")),
                    ("received_ns", n.clone()),
                    ("kind", json!({ "type": "string", "enum": ["rollback", "fork"] })),
                    ("reason", s.clone()),
                ],
                &["head", "received_ns", "kind", "reason"],
            ),
        ),
        (
            "RefusedKey",
            obj(
                &[("public_key", s.clone()), ("time_ns", n.clone())],
                &["public_key", "time_ns"],
            ),
        ),
        (
            "AuditHeadInfo",
            obj(
                &[
                    ("public_key", s.clone()),
                    ("pinned_ns", n.clone()),
                    ("head", r("HeadDocument")),
                    ("conflicts", list("HeadConflict")),
                    ("conflicts_seen", n.clone()),
                    ("refused_keys", list("RefusedKey")),
                ],
                &["public_key", "pinned_ns", "conflicts", "conflicts_seen", "refused_keys"],
            ),
        ),
        (
            "AuditKeyRequest",
            closed(&[("public_key", key_hex.clone())], &["public_key"]),
        ),
    ];
    let host_health = obj(
        &[
            ("state", health_state),
            ("reason", s.clone()),
            ("since_ns", n.clone()),
            ("last_report_ns", n.clone()),
            ("behind_since_ns", n.clone()),
            (
                "evacuation",
                obj(
                    &[
                        (
                            "status",
                            json!({ "type": "string", "enum": ["pending", "running", "done"] }),
                        ),
                        ("vms", strings.clone()),
                        ("started_ns", n.clone()),
                        ("outcome", s.clone()),
                    ],
                    &["status", "vms"],
                ),
            ),
            ("report", r("HealthReport")),
        ],
        &["state", "since_ns"],
    );
    let mut all = json!({
        "ApplyRequest": closed(&[("files", request_files), ("message", printable(MAX_MESSAGE_CHARS))], &["files"]),
        "ApplyResponse": obj(&[("version", n.clone()), ("revision", n.clone()), ("dry_run", boolean.clone()), ("warnings", s.clone())], &["version", "revision", "dry_run"]),
        "PolicyBundle": obj(&[("revision", n.clone()), ("version", n.clone()), ("files", files.clone()), ("tags", overlay), ("locations", strmap.clone()), ("same_files", boolean.clone()), ("delta", r("FilesDelta"))], &["revision", "version", "files", "tags"]),
        "FilesDelta": obj(&[("base", n.clone()), ("changed", json!({"type": "object", "description": "file name → edits of the held file: [{\"copy\": N} | {\"skip\": N} | {\"insert\": TEXT}]", "additionalProperties": {"type": "array", "items": {"type": "object"}}})), ("removed", strings.clone()), ("digest", json!({"type": "string", "description": "SHA-256 (hex) of the resulting files, each name and text length-prefixed, in name order"}))], &["base", "changed", "digest"]),
        "VersionSummary": obj(&summary, &["version", "author", "time_ns", "message"]),
        "VersionSummaryList": list("VersionSummary"),
        "VersionRecord": obj(&version, &["version", "author", "time_ns", "message", "files"]),
        "ChainChange": obj(&[("vnic", s.clone()), ("direction", json!({"type": "string", "enum": ["egress", "ingress"]})), ("change", json!({"type": "string", "enum": ["added", "removed", "changed"]}))], &["vnic", "direction", "change"]),
        "DiffResponse": obj(&[("base_version", n.clone()), ("diff", s.clone()), ("chains", list("ChainChange"))], &["base_version", "diff", "chains"]),
        "TagRequest": tag_request,
        "TagResponse": obj(&[("vm", s.clone()), ("tags", strmap.clone()), ("revision", n.clone()), ("chains", strings.clone())], &["vm", "tags", "revision", "chains"]),
        "Vm": obj(&[("name", s.clone()), ("uuid", s.clone()), ("cluster", s.clone()), ("host", s.clone()), ("tags", strmap.clone()), ("vnics", strings.clone())], &["name", "uuid", "tags", "vnics"]),
        "VmList": list("Vm"),
        "AgentRecord": obj(&[("host", s.clone()), ("registered_ns", n.clone()), ("last_seen_ns", n.clone()), ("installed_revision", n.clone()), ("agent_version", s.clone()), ("counters", counters.clone())], &["host", "registered_ns", "last_seen_ns", "installed_revision"]),
        "AgentList": list("AgentRecord"),
        "Host": obj(&[("name", s.clone()), ("cluster", s.clone()), ("vms", strings.clone()), ("agent", r("AgentRecord")), ("health", r("HostHealth"))], &["name", "vms"]),

        "HostList": list("Host"),
        "Change": change,
        "ChangeList": list("Change"),
        "RegisterRequest": closed(&[("agent_version", printable(MAX_AGENT_VERSION_CHARS)), ("audit_public_key", optional_key)], &[]),
        "ReportRequest": closed(&[("installed_revision", n.clone()), ("counters", json!({ "type": "object", "maxProperties": MAX_COUNTERS, "additionalProperties": n.clone(),
            "description": format!("counter name → value; each name 1 to {MAX_COUNTER_NAME_CHARS} printable characters (else 422)") }))], &["installed_revision"]),
        "TokenRequest": closed(&[("name", token_name), ("role", role.clone())], &["name", "role"]),
        "TokenList": list("TokenInfo"),
        "TokenInfo": obj(&[("id", s.clone()), ("name", s.clone()), ("role", role.clone()), ("created_ns", n.clone()),
            ("revoked", obj(&[("time_ns", n.clone()), ("by", s.clone())], &["time_ns", "by"]))], &["id", "name", "role", "created_ns"]),
        "TokenResponse": obj(&[("name", s.clone()), ("role", role), ("token", s.clone())], &["name", "role", "token"]),
        "Error": obj(&[("error", s.clone()), ("diagnostics", s.clone())], &["error"]),
        "Endpoint": endpoint,
        "VmIdentity": vm_identity,
        "Decision": decision,
        "IcmpMessage": icmp_message,
        "FlowRecord": flow_record,
        "FlowBatch": closed(&[("records", json!({"type": "array", "maxItems": MAX_FLOW_BATCH, "items": r("FlowRecord")}))], &["records"]),
        "FlowPushResponse": obj(&[("appended", n.clone()), ("last_seq", n.clone())], &["appended", "last_seq"]),
        "SeqRecord": obj(&[("seq", n.clone()), ("record", json!({ "oneOf": [flow_entry, change_record], "description": "a flow record (kind: flow) or a change record (kind: change)" }))], &["seq", "record"]),
        "FlowList": obj(&[("records", list("SeqRecord"))], &["records"]),
        "TrailStatus": obj(&[("dir", s.clone()), ("last_seq", n.clone()), ("append_failures", n.clone()), ("unaudited", n.clone()), ("last_error", s.clone()),
            ("signed_seq", n.clone()), ("published_seq", n.clone()), ("unsigned_records", n.clone()), ("publish_failures", n.clone())], &["dir", "last_seq", "append_failures"]),
        "CompileCounts": obj(&[("kept", n.clone()), ("caught_up", n.clone()), ("whole", n.clone())], &["kept", "caught_up", "whole"]),
        "ControllerStatus": obj(&[("audit", r("TrailStatus")), ("compiles", r("CompileCounts")), ("alerts", r("AlertCounts"))], &["compiles"]),
        "Object": json!({ "type": "object" }),
    });
    for (name, schema) in audit {
        all[name] = schema;
    }
    all["AlertInfo"] = alert_info;
    all["AlertRecord"] = alert_record;
    all["AlertBatch"] = closed(
        &[(
            "records",
            json!({"type": "array", "maxItems": MAX_ALERT_BATCH, "items": r("AlertRecord")}),
        )],
        &["records"],
    );
    all["AlertPushResponse"] = obj(
        &[("accepted", n.clone()), ("kept", n.clone()), ("evicted", n.clone())],
        &["accepted", "kept", "evicted"],
    );
    all["AlertList"] = obj(
        &[("alerts", list("AlertRecord")), ("truncated", boolean.clone())],
        &["alerts", "truncated"],
    );
    all["AlertCounts"] = obj(
        &[
            ("received", n.clone()),
            ("kept", n.clone()),
            ("evicted", n.clone()),
            ("hosts", n.clone()),
            ("bytes", n.clone()),
        ],
        &["received", "kept", "evicted", "hosts"],
    );
    all["MigrateRequest"] = closed(
        &[(
            "to",
            json!({ "type": "string", "minLength": 1, "maxLength": MAX_HOST_NAME_CHARS, "pattern": HOST_PATTERN }),
        )],
        &["to"],
    );
    all["MigrationOrder"] = obj(
        &[
            ("id", s.clone()),
            ("vm", s.clone()),
            ("vnics", strings.clone()),
            ("kind", json!({ "type": "string", "enum": ["ordered", "follow"] })),
            ("from", s.clone()),
            ("to", s.clone()),
            ("requested_by", s.clone()),
            ("requested_ns", n.clone()),
            ("deadline_ns", n.clone()),
            ("staged_ns", n.clone()),
            (
                "state",
                json!({ "type": "string", "enum": ["pending", "running", "completed", "failed"] }),
            ),
            ("started_ns", n.clone()),
            ("finished_ns", n.clone()),
            ("connections", n.clone()),
            ("state_bytes", n.clone()),
            ("state_blake3", s.clone()),
            ("switchover_us", n.clone()),
            ("reason", s.clone()),
        ],
        &[
            "id",
            "vm",
            "vnics",
            "from",
            "to",
            "requested_by",
            "requested_ns",
            "deadline_ns",
            "state",
        ],
    );
    all["MigrationOrderList"] = list("MigrationOrder");
    all["StagedReport"] = closed(
        &[
            ("id", s.clone()),
            ("ready", boolean.clone()),
            ("reason", printable(palisade_api::migration::MAX_MIGRATION_REASON)),
        ],
        &["id", "ready"],
    );
    all["ArrivalReport"] = closed(
        &[
            // As `check_text` takes it: no control or invisible characters.
            (
                "vnic",
                json!({ "type": "string", "minLength": 1, "maxLength": 255, "pattern": anchored(&format!("[^{HIDDEN_CLASS}]*")) }),
            ),
            (
                "mac",
                json!({ "type": "string", "minLength": 17, "maxLength": 17, "pattern": anchored("[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}") }),
            ),
            ("via", json!({ "type": "string", "enum": ["rarp", "garp"] })),
        ],
        &["vnic", "mac", "via"],
    );
    all["ArrivalResponse"] = obj(
        &[
            ("vm", s.clone()),
            ("moved", boolean.clone()),
            ("order", json!({ "$ref": "#/components/schemas/MigrationOrder" })),
        ],
        &["vm", "moved"],
    );
    all["MigrationReport"] = closed(
        &[
            ("id", s.clone()),
            (
                "state",
                json!({ "type": "string", "enum": ["running", "completed", "failed"] }),
            ),
            ("connections", n.clone()),
            ("state_bytes", n.clone()),
            (
                "state_blake3",
                json!({ "type": "string", "minLength": 64, "maxLength": 64, "pattern": anchored("[0-9a-f]{64}") }),
            ),
            ("switchover_us", n.clone()),
            ("reason", printable(palisade_api::migration::MAX_MIGRATION_REASON)),
        ],
        &["id", "state"],
    );
    all["HealthReport"] = health_report;
    all["TableFill"] = table_fill;
    all["FailOpenEpisode"] = fail_open_episode;
    all["HostHealth"] = host_health;
    all
}

/// The OpenAPI document.
pub fn document() -> Value {
    let err = |d: &str| json!({ "description": d, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } });
    let mut paths = Map::new();
    for (method, path, summary, who, req, resp) in ENDPOINTS {
        let mut params = Vec::new();
        for name in ["v", "name", "host"] {
            if !path.contains(&format!("{{{name}}}")) {
                continue;
            }
            let (schema, d) = match name {
                "v" => (u64_schema(), "a policy version".to_string()),
                "host" => (
                    json!({ "type": "string", "minLength": 1, "maxLength": MAX_HOST_NAME_CHARS, "pattern": HOST_PATTERN }),
                    "the agent's host name: labels of letters, digits, _ and - joined by single dots".to_string(),
                ),
                _ if path.starts_with("/v1/tokens") => (
                    json!({ "type": "string", "minLength": 1, "maxLength": MAX_TOKEN_NAME_CHARS, "pattern": TOKEN_NAME_PATTERN }),
                    "a token's name, or the start (12 characters or more) of its id".to_string(),
                ),
                _ => (
                    json!({ "type": "string", "minLength": 1, "pattern": anchored(&format!("[^{HIDDEN_CLASS}]+")) }),
                    "a VM of the current policy".to_string(),
                ),
            };
            params.push(json!({ "name": name, "in": "path", "required": true, "schema": schema, "description": d }));
        }
        let q = |name: &str, schema: Value, d: &str| json!({ "name": name, "in": "query", "schema": schema, "description": d });
        let int = |max: u64| json!({ "type": "integer", "minimum": 0, "maximum": max });
        if *path == "/v1/policy" && *method == "post" {
            params.push(q(
                "dry_run",
                json!({ "type": "boolean" }),
                "only validate: `true` or `false`",
            ));
        }
        if path.ends_with("/policy") && path.contains("{host}") {
            params.push(q("after", int(u64::MAX), "the revision the agent has"));
            params.push(q(
                "have",
                int(u64::MAX),
                "the policy version whose files the agent holds",
            ));
            params.push(q("wait", int(MAX_WAIT_S), "seconds to wait"));
        }
        if *path == "/v1/flows" {
            params.push(q(
                "vm",
                json!({"type": "string"}),
                "a VM at either end (or the VM a change concerns)",
            ));
            params.push(q("zone", json!({"type": "string"}), "a zone at either end"));
            params.push(q(
                "verdict",
                json!({"type": "string", "enum": ["allow", "deny", "reject"]}),
                "the verdict",
            ));
            params.push(q("rule", json!({"type": "string"}), "a deciding rule id"));
            params.push(q("since", int(u64::MAX), "records at or after (Unix ns)"));
            params.push(q("until", int(u64::MAX), "records before (Unix ns)"));
            let mut limit = int(MAX_FLOW_LIMIT as u64);
            limit["default"] = json!(DEFAULT_FLOW_LIMIT);
            params.push(q("limit", limit, "at most this many"));
            params.push(q(
                "changes",
                json!({"type": "boolean"}),
                "include change records: `true` or `false`",
            ));
        }
        if *path == "/v1/alerts" {
            params.push(q("host", json!({"type": "string"}), "the host that raised it"));
            params.push(q("vm", json!({"type": "string"}), "a VM at either end"));
            params.push(q("sid", int(u64::from(u32::MAX)), "the signature id"));
            params.push(q(
                "action",
                json!({"type": "string", "enum": ["allowed", "blocked"]}),
                "what was done with the packet",
            ));
            params.push(q("since", int(u64::MAX), "alerts at or after (Unix ns)"));
            params.push(q("until", int(u64::MAX), "alerts before (Unix ns)"));
            let mut limit = int(MAX_ALERT_LIMIT as u64);
            limit["default"] = json!(DEFAULT_ALERT_LIMIT);
            params.push(q("limit", limit, "at most this many, the newest"));
        }
        let mut unauthorized = err("no or unknown credentials");
        unauthorized["headers"] = json!({ "WWW-Authenticate": { "description": "the challenge (RFC 6750): Bearer",
            "required": true, "schema": { "type": "string" } } });
        let mut responses = json!({
            "200": { "description": "OK", "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{resp}") } } } },
            "400": err("malformed request: the body, a parameter or a path segment breaks this document's schema"),
            "401": unauthorized,
            "403": err("the role or certificate does not allow this"),
            "404": err("no such version, VM, token, endpoint, or audit key for the host"),
            "405": err("the path does not take this method (`Allow` lists those it takes)"),
            "413": err(&format!("over a size or count limit (the body: {} bytes)", BODY_LIMIT)),
        });
        if matches!(
            *path,
            "/v1/flows" | "/v1/agents/{host}/flows" | "/v1/status" | "/v1/audit/head" | "/v1/agents/{host}/audit-head"
        ) || req.is_some()
            || *method != "get"
        {
            responses["503"] = err("the store or the audit log failed, or this controller keeps no audit log");
        }
        if req.is_some() || path.contains("rollback") {
            responses["422"] = err(
                "well formed, but cannot be done: an invalid policy (`diagnostics` holds file:line:col messages), a file name or map key the server refuses, a conflicting request",
            );
        }
        if *path == "/v1/tokens" && *method == "post" {
            responses["409"] = err("a token of that name exists (names are unique, revoked tokens' too)");
        }
        if *path == "/v1/agents/{host}/register" || (*path == "/v1/agents/{host}/audit-head" && *method == "put") {
            responses["409"] = err(
                "another audit key than the host's pinned one (recorded), or a head behind or beside the one held: a rollback or fork (kept as evidence)",
            );
        }
        if path.contains("/migrat") && *method == "post" {
            responses["409"] = err(
                "another migration of the VM is pending or running, or the report is for another order or one over already",
            );
        }
        if *path == "/v1/vms/{name}/migrate" {
            let ok = responses["200"].take();
            responses.as_object_mut().map(|r| r.remove("200"));
            responses["202"] = ok;
            responses["202"]["description"] = json!("Accepted: the order, pending");
        }
        if path.contains("{host}/policy") {
            responses["304"] = json!({ "description": "no newer revision within `wait`" });
        }
        let mut op = json!({ "summary": summary, "description": format!("Allowed: {who}."), "parameters": params, "responses": responses });
        if let Some(req) = req {
            op["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{req}") } } } });
        }
        if *path == "/openapi.json" {
            // Served to anyone: no credentials, so no 401 or 403.
            op["security"] = json!([]);
            for code in ["401", "403", "404"] {
                op["responses"].as_object_mut().map(|r| r.remove(code));
            }
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = op;
    }
    json!({
        "openapi": "3.0.3",
        "info": { "title": "Palisade controller API", "version": env!("CARGO_PKG_VERSION") },
        "components": {
            "schemas": schemas(),
            "securitySchemes": { "token": { "type": "http", "scheme": "bearer" } }
        },
        "security": [{ "token": [] }],
        "paths": paths,
    })
}

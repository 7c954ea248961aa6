//! The OpenAPI 3 description of the API, served at `GET /openapi.json`.
//!
//! Written by hand from one table of endpoints, so adding a route means adding
//! a row here; the API tests request every path of the document and check
//! that the router knows it.

use serde_json::{Map, Value, json};

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
    ("get", "/openapi.json", "This document", "anyone", None, "Object"),
];

fn obj(props: &[(&str, Value)], required: &[&str]) -> Value {
    let p: Map<String, Value> = props.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    json!({ "type": "object", "properties": p, "required": required })
}

fn schemas() -> Value {
    let s = json!({ "type": "string" });
    let n = json!({ "type": "integer", "minimum": 0 });
    let files = json!({ "type": "object", "additionalProperties": { "type": "string" }, "description": "file name → YAML text" });
    let strmap = json!({ "type": "object", "additionalProperties": { "type": "string" } });
    let overlay = json!({ "type": "object", "description": "VM → tag → value, or null for a removed tag",
        "additionalProperties": { "type": "object", "additionalProperties": { "type": ["string", "null"] } } });
    let r = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
    let list = |name: &str| json!({ "type": "array", "items": r(name) });
    let summary = [
        ("version", n.clone()),
        ("author", s.clone()),
        ("time_ns", n.clone()),
        ("message", s.clone()),
        ("rollback_of", n.clone()),
    ];
    let mut version = summary.to_vec();
    version.push(("files", files.clone()));
    json!({
        "ApplyRequest": obj(&[("files", files.clone()), ("message", s.clone())], &["files"]),
        "ApplyResponse": obj(&[("version", n.clone()), ("revision", n.clone()), ("dry_run", json!({"type": "boolean"})), ("warnings", s.clone())], &["version", "revision", "dry_run"]),
        "PolicyBundle": obj(&[("revision", n.clone()), ("version", n.clone()), ("files", files.clone()), ("tags", overlay), ("same_files", json!({"type": "boolean"})), ("delta", json!({"$ref": "#/components/schemas/FilesDelta"}))], &["revision", "version", "files", "tags"]),
        "FilesDelta": obj(&[("base", n.clone()), ("changed", json!({"type": "object", "description": "file name → edits of the held file: [{\"copy\": N} | {\"skip\": N} | {\"insert\": TEXT}]", "additionalProperties": {"type": "array", "items": {"type": "object"}}})), ("removed", json!({"type": "array", "items": {"type": "string"}})), ("digest", json!({"type": "string", "description": "SHA-256 (hex) of the resulting files, each name and text length-prefixed, in name order"}))], &["base", "changed", "digest"]),
        "VersionSummary": obj(&summary, &["version", "author", "time_ns", "message"]),
        "VersionSummaryList": list("VersionSummary"),
        "VersionRecord": obj(&version, &["version", "author", "time_ns", "message", "files"]),
        "ChainChange": obj(&[("vnic", s.clone()), ("direction", json!({"enum": ["egress", "ingress"]})), ("change", json!({"enum": ["added", "removed", "changed"]}))], &["vnic", "direction", "change"]),
        "DiffResponse": obj(&[("base_version", n.clone()), ("diff", s.clone()), ("chains", list("ChainChange"))], &["base_version", "diff", "chains"]),
        "TagRequest": obj(&[("set", strmap.clone()), ("remove", json!({"type": "array", "items": s.clone()}))], &[]),
        "TagResponse": obj(&[("vm", s.clone()), ("tags", strmap.clone()), ("revision", n.clone()), ("chains", json!({"type": "array", "items": s.clone()}))], &["vm", "tags", "revision", "chains"]),
        "Vm": obj(&[("name", s.clone()), ("uuid", s.clone()), ("cluster", s.clone()), ("host", s.clone()), ("tags", strmap.clone()), ("vnics", json!({"type": "array", "items": s.clone()}))], &["name", "uuid", "tags", "vnics"]),
        "VmList": list("Vm"),
        "AgentRecord": obj(&[("host", s.clone()), ("registered_ns", n.clone()), ("last_seen_ns", n.clone()), ("installed_revision", n.clone()), ("agent_version", s.clone()), ("counters", json!({"type": "object", "additionalProperties": n.clone()}))], &["host", "registered_ns", "last_seen_ns", "installed_revision"]),
        "AgentList": list("AgentRecord"),
        "Host": obj(&[("name", s.clone()), ("cluster", s.clone()), ("vms", json!({"type": "array", "items": s.clone()})), ("agent", r("AgentRecord"))], &["name", "vms"]),
        "HostList": list("Host"),
        "Change": obj(&[("time_ns", n.clone()), ("actor", s.clone()), ("action", s.clone()), ("resource", s.clone()), ("diff", s.clone()), ("policy_version", n.clone())], &["time_ns", "actor", "action", "resource", "diff"]),
        "ChangeList": list("Change"),
        "RegisterRequest": obj(&[("agent_version", s.clone())], &[]),
        "ReportRequest": obj(&[("installed_revision", n.clone()), ("counters", json!({"type": "object", "additionalProperties": n.clone()}))], &["installed_revision"]),
        "TokenRequest": obj(&[("name", s.clone()), ("role", json!({"enum": ["admin", "operator", "auditor", "read-only"]}))], &["name", "role"]),
        "TokenList": list("TokenInfo"),
        "TokenInfo": obj(&[("id", s.clone()), ("name", s.clone()), ("role", s.clone()), ("created_ns", n.clone()),
            ("revoked", obj(&[("time_ns", n.clone()), ("by", s.clone())], &["time_ns", "by"]))], &["id", "name", "role", "created_ns"]),
        "TokenResponse": obj(&[("name", s.clone()), ("role", s.clone()), ("token", s.clone())], &["name", "role", "token"]),
        "Error": obj(&[("error", s.clone()), ("diagnostics", s.clone())], &["error"]),
        "FlowRecord": json!({ "type": "object", "description": "a palisade_audit FlowRecord (time_ns, flow_id, host, phase, src, dst, protocol, verdict, decided_by, counters)", "required": ["time_ns", "flow_id", "host", "phase", "src", "dst", "protocol", "verdict", "decided_by"] }),
        "FlowBatch": obj(&[("records", json!({"type": "array", "maxItems": crate::api::MAX_FLOW_BATCH, "items": r("FlowRecord")}))], &["records"]),
        "FlowPushResponse": obj(&[("appended", n.clone()), ("last_seq", n.clone())], &["appended", "last_seq"]),
        "SeqRecord": obj(&[("seq", n.clone()), ("record", json!({"type": "object", "description": "a FlowRecord or a Change, with `kind`: flow or change"}))], &["seq", "record"]),
        "FlowList": obj(&[("records", list("SeqRecord"))], &["records"]),
        "TrailStatus": obj(&[("dir", s.clone()), ("last_seq", n.clone()), ("append_failures", n.clone()), ("last_error", s.clone())], &["dir", "last_seq", "append_failures"]),
        "CompileCounts": obj(&[("kept", n.clone()), ("caught_up", n.clone()), ("whole", n.clone())], &["kept", "caught_up", "whole"]),
        "ControllerStatus": obj(&[("audit", r("TrailStatus")), ("compiles", r("CompileCounts"))], &["compiles"]),
        "Object": json!({ "type": "object" }),
    })
}

/// The OpenAPI document.
pub fn document() -> Value {
    let err = |d: &str| json!({ "description": d, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } });
    let mut paths = Map::new();
    for (method, path, summary, who, req, resp) in ENDPOINTS {
        let mut params = Vec::new();
        for name in ["v", "name", "host"] {
            if path.contains(&format!("{{{name}}}")) {
                let schema = if name == "v" {
                    json!({"type": "integer"})
                } else {
                    json!({"type": "string"})
                };
                params.push(json!({ "name": name, "in": "path", "required": true, "schema": schema }));
            }
        }
        if *path == "/v1/policy" && *method == "post" {
            params.push(json!({ "name": "dry_run", "in": "query", "schema": { "type": "boolean" } }));
        }
        if path.ends_with("/policy") && path.contains("{host}") {
            params.push(json!({ "name": "after", "in": "query", "schema": { "type": "integer" }, "description": "the revision the agent has" }));
            params.push(json!({ "name": "have", "in": "query", "schema": { "type": "integer" }, "description": "the policy version whose files the agent holds" }));
            params.push(json!({ "name": "wait", "in": "query", "schema": { "type": "integer", "maximum": crate::server::MAX_WAIT_S }, "description": "seconds to wait" }));
        }
        if *path == "/v1/flows" {
            let q = |name: &str, schema: Value, d: &str| json!({ "name": name, "in": "query", "schema": schema, "description": d });
            params.push(q(
                "vm",
                json!({"type": "string"}),
                "a VM at either end (or the VM a change concerns)",
            ));
            params.push(q("zone", json!({"type": "string"}), "a zone at either end"));
            params.push(q(
                "verdict",
                json!({"enum": ["allow", "deny", "reject"]}),
                "the verdict",
            ));
            params.push(q("rule", json!({"type": "string"}), "a deciding rule id"));
            params.push(q("since", json!({"type": "integer"}), "records at or after (Unix ns)"));
            params.push(q("until", json!({"type": "integer"}), "records before (Unix ns)"));
            params.push(q("limit", json!({"type": "integer", "default": crate::api::DEFAULT_FLOW_LIMIT, "maximum": crate::api::MAX_FLOW_LIMIT}), "at most this many"));
            params.push(q("changes", json!({"type": "boolean"}), "include change records"));
        }
        let mut responses = json!({
            "200": { "description": "OK", "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{resp}") } } } },
            "400": err("malformed request or JSON"),
            "401": err("no or unknown credentials"),
            "403": err("the role or certificate does not allow this"),
            "404": err("no such version, VM or endpoint"),
            "413": err("body over 32 MiB (flows: over 10000 records)"),
        });
        if matches!(*path, "/v1/flows" | "/v1/agents/{host}/flows" | "/v1/status") {
            responses["503"] = err("the audit log failed, or this controller keeps none");
        }
        if matches!(
            *path,
            "/v1/policy" | "/v1/policy/diff" | "/v1/policy/rollback/{v}" | "/v1/vms/{name}/tags"
        ) {
            responses["422"] = err("the policy does not validate; `diagnostics` holds file:line:col messages");
        }
        if path.contains("{host}/policy") {
            responses["304"] = json!({ "description": "no newer revision within `wait`" });
        }
        let mut op = json!({ "summary": summary, "description": format!("Allowed: {who}."), "parameters": params, "responses": responses });
        if let Some(req) = req {
            op["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{req}") } } } });
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

//! The OpenAPI 3 document of the REST API, served at
//! `GET /api/v1/openapi.json`. A test checks it against [`super::ROUTES`].

use serde_json::{json, Value};

fn err_responses(codes: &[&str]) -> Value {
    let mut m = serde_json::Map::new();
    for c in codes {
        let desc = match *c {
            "400" => "Invalid input: bad JSON, a wrong type, an unknown or read-only field",
            "404" => "Unknown DUT, PDU or port",
            "409" => {
                "Valid request that clashes with the current state (or the MarsDB file is invalid)"
            }
            "413" => "Body over the size limit",
            "415" => "Wrong content type",
            "406" => "No DUT matches the job's tags",
            "503" => "The job engine is not available",
            _ => "Error",
        };
        m.insert(
            (*c).to_string(),
            json!({"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
        );
    }
    Value::Object(m)
}

fn with(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    base
}

fn ok_json(schema: Value) -> Value {
    json!({"200": {"description": "OK", "content": {"application/json": {"schema": schema}}}})
}

fn ok_text(desc: &str) -> Value {
    json!({"200": {"description": desc, "content": {"text/plain": {"schema": {"type": "string"}}}}})
}

fn json_body(schema: Value) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema}}})
}

fn path_param(name: &str, desc: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "description": desc, "schema": {"type": "string"}})
}

/// Members of the DUT object beyond the reference's V2024 shape: job and
/// quick-check status, and what the optional hooks add (runner states,
/// console log endpoint).
fn dut_members(doc: &mut Value) {
    let runner = json!({"type": "object", "description": "The DUT's runner on one GitLab instance (never its token)", "properties": {
        "exposed": {"type": "boolean", "description": "The MarsDB entry's exposed"},
        "active": {"type": "boolean", "description": "Should be served now: DUT available, instance expose_runners, entry exposed, URL allowed"},
        "registered": {"type": "boolean"}, "runner_id": {"type": "integer", "nullable": true},
        "is_valid": {"type": "boolean", "nullable": true, "description": "Last check with GitLab: true valid, false refused, null not checked"},
        "in_config": {"type": "boolean", "description": "In gitlab-runner's config.toml"},
        "last_checked": {"type": "string", "format": "date-time", "nullable": true},
        "error": {"type": "string", "nullable": true}}});
    let members = json!({
        "first_seen": {"type": "string", "format": "date-time"},
        "current_job": {"type": "string", "nullable": true},
        "quick_check_queued": {"type": "boolean"},
        "gitlab_runners": {"type": "object", "additionalProperties": runner,
            "description": "Runner state by GitLab instance name (present when the executor manages GitLab runners)"},
        "logs_endpoint": {"type": "object", "description": "Where the console can be followed read-only (SALAD's tcp_port_logs on the host of SALAD_URL); absent while SALAD does not answer",
            "properties": {"host": {"type": "string"}, "port": {"type": "integer"}}}
    });
    if let (Some(props), Some(m)) = (
        doc["components"]["schemas"]["Dut"]["properties"].as_object_mut(),
        members.as_object(),
    ) {
        for (k, v) in m {
            props.insert(k.clone(), v.clone());
        }
    }
}

/// `GET /api/v1/artifacts` (the artifact cache).
fn artifacts_path() -> Value {
    let entry = json!({"type": "object", "properties": {
        "key": {"type": "string"}, "url": {"type": "string"}, "download_url": {"type": "string"},
        "size": {"type": "integer"}, "state": {"type": "string", "enum": ["fresh", "stale", "partial"]},
        "last_used": {"type": "string", "format": "date-time"},
        "validated_at": {"type": "string", "format": "date-time", "nullable": true},
        "etag": {"type": "string", "nullable": true}, "pinned": {"type": "boolean"}}});
    json!({"get": {"summary": "The artifact cache (EXECUTOR_ARTIFACT_CACHE_ROOT): every entry with its origin URL, size, last use, validation state (fresh, stale, partial) and the URL DUTs download it from (/artifacts/<key>, GET/HEAD with Range); enabled is false without a cache",
        "responses": ok_json(json!({"type": "object", "properties": {"enabled": {"type": "boolean"},
            "total_bytes": {"type": "integer"}, "max_bytes": {"type": "integer", "nullable": true},
            "artifacts": {"type": "array", "items": entry}}}))}})
}

/// The OpenAPI 3.0 document describing every route of [`super::ROUTES`].
pub fn document() -> Value {
    let id = path_param("id", "DUT id (usually its MAC address) or its full name");
    // Added after the document's json!, which is at the macro recursion
    // limit.
    let training_loop = json!({
        "get": {"summary": "The kept log (text) of training loop n (0-based index in training.loops); only loops that did not pass have one",
            "parameters": [id.clone(), path_param("n", "Index of the loop in the DUT's training.loops")],
            "responses": with(ok_text("The loop's log"), err_responses(&["404"]))}
    });
    let pdu = path_param("name", "PDU name");
    let port = path_param("port_id", "Port id");
    let dut_ref = json!({"$ref": "#/components/schemas/Dut"});
    let pdu_ref = json!({"$ref": "#/components/schemas/Pdu"});
    let port_ref = json!({"$ref": "#/components/schemas/Port"});
    let discover_ref = json!({"$ref": "#/components/schemas/Discovery"});
    let boot = json!({
        "summary": "iPXE boot script of the DUT's running job, else the BOOTS_DEFAULT_* defaults",
        "parameters": [id, {"name": "platform", "in": "query", "schema": {"type": "string"}},
                        {"name": "buildarch", "in": "query", "schema": {"type": "string"}}],
        "responses": with(ok_text("iPXE script"), err_responses(&["400"]))
    });
    let mut doc = json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Vivian executor REST API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Time-shares CI test machines (DUTs). Every /api/v1/dut... route is also served at the deprecated /api/v1/machine... path (and /api/v1/duts at /api/v1/machines). Errors are JSON {\"error\": \"...\"}."
        },
        "paths": {
            "/api/v1/duts": {"get": {"summary": "List the DUTs",
                "responses": ok_json(json!({"type": "object", "properties": {"duts": {"type": "object", "additionalProperties": dut_ref}}}))}},
            "/api/v1/dut/": {
                "post": {"summary": "Register a DUT (create, or merge into a known one); consumes a running discovery",
                    "requestBody": json_body(json!({"$ref": "#/components/schemas/DutRegistration"})),
                    "responses": with(ok_json(dut_ref.clone()), err_responses(&["400", "409", "413", "415"]))},
                "put": {"summary": "Same as POST",
                    "requestBody": json_body(json!({"$ref": "#/components/schemas/DutRegistration"})),
                    "responses": with(ok_json(dut_ref.clone()), err_responses(&["400", "409", "413", "415"]))}
            },
            "/api/v1/dut/discover": {
                "get": {"summary": "The running discovery, or null", "responses": ok_json(discover_ref.clone())},
                "post": {"summary": "Switch a free port ON to discover the machine behind it",
                    "requestBody": json_body(json!({"type": "object", "required": ["pdu", "port_id"], "additionalProperties": false,
                        "properties": {"pdu": {"type": "string"}, "port_id": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
                                       "timeout": {"type": "number", "default": 150}}})),
                    "responses": with(ok_text("Discovery started"), err_responses(&["400", "404", "409", "413", "415"]))},
                "delete": {"summary": "Cancel the running discovery and switch its port OFF",
                    "responses": with(ok_text("Discovery cancelled"), err_responses(&["409"]))}
            },
            "/api/v1/dut/{id}": {
                "get": {"summary": "One DUT", "parameters": [id.clone()],
                    "responses": with(ok_json(dut_ref.clone()), err_responses(&["404"]))},
                "patch": {"summary": "Update editable fields; un-retiring queues a quick check", "parameters": [id.clone()],
                    "requestBody": json_body(json!({"type": "object", "additionalProperties": false, "properties": {
                        "comment": {"type": "string", "nullable": true}, "is_retired": {"type": "boolean"},
                        "pdu_off_delay": {"type": "number", "minimum": 0}, "ready_for_service": {"type": "boolean"},
                        "manual_tags": {"type": "array", "items": {"type": "string"}}}})),
                    "responses": with(ok_text("Updated"), err_responses(&["400", "404", "409", "413", "415"]))},
                "delete": {"summary": "Remove the DUT, cancel its job, unregister its runners", "parameters": [id.clone()],
                    "responses": with(ok_text("Removed"), err_responses(&["404", "409"]))}
            },
            "/api/v1/dut/{id}/quick_check": {
                "get": {"summary": "Whether a quick check is queued (text true/false)", "parameters": [id.clone()],
                    "responses": with(ok_text("true or false"), err_responses(&["404"]))},
                "post": {"summary": "Queue a quick check", "parameters": [id.clone()],
                    "responses": with(ok_text("Queued"), err_responses(&["404"]))}
            },
            "/api/v1/dut/{id}/cancel_job": {
                "post": {"summary": "Cancel the DUT's queued or running job", "parameters": [id.clone()],
                    "responses": with(ok_text("Cancelling"), err_responses(&["404", "409"]))}
            },
            "/api/v1/duts/{id}/boot.ipxe": {"get": boot.clone()},
            "/boot/{id}/boot.ipxe": {"get": boot},
            "/api/v1/pdus": {"get": {"summary": "List the PDUs and their ports",
                "responses": ok_json(json!({"type": "object", "properties": {"pdus": {"type": "object", "additionalProperties": pdu_ref}}}))}},
            "/api/v1/pdu/{name}": {"get": {"summary": "One PDU", "parameters": [pdu.clone()],
                "responses": with(ok_json(pdu_ref.clone()), err_responses(&["404"]))}},
            "/api/v1/pdu/{name}/port/{port_id}": {
                "get": {"summary": "One port", "parameters": [pdu.clone(), port.clone()],
                    "responses": with(ok_json(port_ref.clone()), err_responses(&["404"]))},
                "patch": {"summary": "Switch a port on/off, or reserve/unreserve it (persisted in MarsDB)",
                    "parameters": [pdu, port],
                    "requestBody": json_body(json!({"type": "object", "additionalProperties": false, "properties": {
                        "state": {"type": "string", "enum": ["on", "off", "ON", "OFF"]},
                        "reserved": {"oneOf": [{"type": "boolean"}, {"type": "string", "enum": ["true", "false"]}]}}})),
                    "responses": with(ok_text("Done"), err_responses(&["400", "404", "409", "413", "415"]))}
            },
            "/api/v1/full-state": {"get": {"summary": "PDUs, DUTs, discovery, the time, and any MarsDB error",
                "responses": ok_json(json!({"type": "object", "properties": {
                    "pdus": {"type": "object", "additionalProperties": pdu_ref},
                    "duts": {"type": "object", "additionalProperties": dut_ref},
                    "discover": discover_ref, "now": {"type": "string", "format": "date-time"},
                    "marsdb_error": {"type": "string", "nullable": true}}}))}},
            "/api/v1/jobs": {"post": {"summary": "Submit a job (multipart: metadata, job, optional tarball; or the deprecated v0 JSON body)",
                "requestBody": {"required": true, "content": {
                    "multipart/form-data": {"schema": {"type": "object", "required": ["metadata", "job"], "properties": {
                        "metadata": {"type": "string", "format": "binary", "description": "application/json"},
                        "job": {"type": "string", "format": "binary", "description": "application/x-yaml"},
                        "job_bucket_initial_state_tarball_file": {"type": "string", "format": "binary"}}}},
                    "application/json": {"schema": {"type": "object"}}}},
                "responses": with(ok_json(json!({"type": "object", "properties": {"version": {"type": "integer"}, "error_msg": {"type": "string", "nullable": true}}})),
                                  err_responses(&["400", "404", "406", "409", "413", "415", "503"]))}},
            "/api/v1/openapi.json": {"get": {"summary": "This document", "responses": ok_json(json!({"type": "object"}))}}
        },
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
            "Dut": {"type": "object", "properties": {
                "id": {"type": "string"}, "state": {"type": "string", "enum": ["WAIT_FOR_CONFIG", "IDLE", "TRAINING", "QUEUED", "RUNNING", "RETIRED", "QUICK_CHECK"]},
                "ready_for_service": {"type": "boolean"}, "has_pdu_assigned": {"type": "boolean"},
                "local_tty_device": {"type": "string", "nullable": true}, "tags": {"type": "array", "items": {"type": "string"}},
                "manual_tags": {"type": "array", "items": {"type": "string"}}, "base_name": {"type": "string"},
                "full_name": {"type": "string"}, "mac_address": {"type": "string"}, "ip_address": {"type": "string"},
                "is_retired": {"type": "boolean"}, "training": {"type": "object"},
                "pdu": {"type": "object", "nullable": true, "properties": {"name": {"type": "string", "nullable": true}, "port_id": {"type": "string", "nullable": true}}},
                "pdu_off_delay": {"type": "number"}, "comment": {"type": "string", "nullable": true}}},
            "DutRegistration": {"type": "object", "additionalProperties": false, "properties": {
                "id": {"type": "string"}, "base_name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
                "manual_tags": {"type": "array", "items": {"type": "string"}}, "mac_address": {"type": "string"},
                "ip_address": {"type": "string", "format": "ipv4"}, "local_tty_device": {"type": "string", "nullable": true},
                "ready_for_service": {"type": "boolean"}, "is_retired": {"type": "boolean"}}},
            "Pdu": {"type": "object", "properties": {"ports": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Port"}},
                "state": {"type": "string"}, "error": {"type": "string", "nullable": true}}},
            "Port": {"type": "object", "properties": {"label": {"type": "string", "nullable": true}, "min_off_time": {"type": "number"},
                "state": {"type": "string", "enum": ["ON", "OFF", "REBOOT", "UNKNOWN"]}, "last_shutdown": {"type": "string", "format": "date-time", "nullable": true},
                "last_polled": {"type": "string", "format": "date-time", "nullable": true}, "reserved": {"type": "boolean"}}},
            "Discovery": {"type": "object", "nullable": true, "properties": {"pdu": {"type": "string"}, "port_id": {"type": "string"},
                "date": {"type": "string", "format": "date-time"}, "timeout": {"type": "number"}, "started_at": {"type": "number"},
                "expires_in": {"type": "number"}}}
        }}
    });
    doc["paths"]["/api/v1/dut/{id}/training/loop/{n}"] = training_loop;
    dut_members(&mut doc);
    doc["paths"]["/api/v1/artifacts"] = artifacts_path();
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn document_lists_exactly_the_routes_that_exist() {
        let doc = document();
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
        let routed: BTreeSet<(String, String)> = super::super::ROUTES
            .iter()
            .map(|r| (r.method.to_string(), r.path.to_string()))
            .collect();
        assert_eq!(documented, routed);
    }

    #[test]
    fn the_dut_schema_has_the_hooks_members() {
        let doc = document();
        let props = &doc["components"]["schemas"]["Dut"]["properties"];
        for m in [
            "id",
            "state",
            "gitlab_runners",
            "logs_endpoint",
            "current_job",
        ] {
            assert!(props.get(m).is_some(), "Dut schema lacks {m}");
        }
    }

    #[test]
    fn every_ref_points_to_a_schema() {
        let doc = document();
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for part in text.split("\"#/components/schemas/").skip(1) {
            let name = part.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "dangling $ref {name}");
        }
    }
}

//! The HTTP API (reference-compatible, plus the log extensions).
//!
//! | Method and path | Answer |
//! |---|---|
//! | `GET /api/v1/machine` | `{"machines": {id: M}}` |
//! | `GET /api/v1/machine/<id>` | M (the machine is created if unknown): `{"id", "tcp_port", "has_client", "tcp_port_logs"}` |
//! | `POST /api/v1/machine/<id>/reset` | 200 `Reset executed successfully`; 501 when a reset is impossible (no console, a netconsole, not a USB adapter on a hub with per-port power switching, disabled); 503 when it failed |
//! | `GET /api/v1/machine/<id>/clients` | Vivian: `{"log_size": N, "clients": [{"peer": "ip:port", "rw": bool, "start_offset": N}]}` |
//! | `GET /api/v1/machine/<id>/log?offset=N&length=L` | Vivian: raw bytes `[N, N+L)` of the machine's console log (`length` defaults to and is capped at 16 MiB), headers `X-Salad-Log-Offset` (N) and `X-Salad-Log-Size` (log size when read); 404 for an unknown machine, 501 when logs are disabled |
//!
//! **Getting missed bytes.** Every byte a machine's console produced has an
//! offset in its log (offsets continue across restarts of `salad`). A TCP
//! client that connects to `tcp_port` or `tcp_port_logs` finds its
//! `start_offset` in `/clients` under its own address (the local address of
//! its socket) and fetches `[0, start_offset)` (or from where a previous
//! connection stopped) from `/log`: the stream and the log together have no
//! gap and no overlap.
//!
//! Errors other than the reference's plain-text reset answers are JSON
//! `{"error": "..."}` naming what is wrong (400 for a bad machine id or query).

use std::collections::HashMap;
use std::convert::Infallible;

use percent_encoding::percent_decode_str;
use serde_json::json;
use vivian_core::console::ResetOutcome;
use warp::http::{Response, StatusCode};
use warp::{Filter, Rejection, Reply};

use crate::{Salad, SaladError};

/// Largest log slice one request returns.
pub const MAX_LOG_READ: usize = 16 << 20;

fn json_error(status: StatusCode, msg: impl Into<String>) -> warp::reply::Response {
    warp::reply::with_status(warp::reply::json(&json!({"error": msg.into()})), status)
        .into_response()
}

fn decode_id(raw: &str) -> Result<String, Box<warp::reply::Response>> {
    percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            Box::new(json_error(
                StatusCode::BAD_REQUEST,
                format!("machine id {raw:?} is not valid UTF-8 once percent-decoded"),
            ))
        })
}

fn salad_error(e: SaladError) -> warp::reply::Response {
    let status = match &e {
        SaladError::InvalidMachineId { .. } => StatusCode::BAD_REQUEST,
        SaladError::UnknownMachine(_) => StatusCode::NOT_FOUND,
        SaladError::LogUnavailable(_) => StatusCode::NOT_IMPLEMENTED,
        SaladError::Busy(_) => StatusCode::CONFLICT,
        SaladError::ResetFailed { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json_error(status, e.to_string())
}

fn text(status: StatusCode, body: &str) -> warp::reply::Response {
    Response::builder()
        .status(status)
        .header("content-type", "text/html; charset=utf-8")
        .body(body.to_string().into())
        .unwrap()
}

/// The API's routes, to serve or to mount in another warp application.
pub fn routes(
    salad: Salad,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone {
    let s = warp::any().map(move || salad.clone());
    let base = warp::path("api")
        .and(warp::path("v1"))
        .and(warp::path("machine"));

    let list = base
        .and(warp::path::end())
        .and(warp::get())
        .and(s.clone())
        .map(|salad: Salad| {
            let machines: serde_json::Map<String, serde_json::Value> = salad
                .machines()
                .into_iter()
                .map(|m| (m.id.clone(), serde_json::to_value(m).unwrap()))
                .collect();
            warp::reply::json(&json!({ "machines": machines })).into_response()
        });

    let one = base
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .and(warp::get())
        .and(s.clone())
        .map(|raw: String, salad: Salad| {
            let id = match decode_id(&raw) {
                Ok(id) => id,
                Err(r) => return *r,
            };
            match salad.machine(&id) {
                Ok(m) => warp::reply::json(&m).into_response(),
                Err(e) => salad_error(e),
            }
        });

    let reset = base
        .and(warp::path::param::<String>())
        .and(warp::path("reset"))
        .and(warp::path::end())
        .and(warp::post())
        .and(s.clone())
        .then(|raw: String, salad: Salad| async move {
            let id = match decode_id(&raw) {
                Ok(id) => id,
                Err(r) => return *r,
            };
            match salad.reset(&id).await {
                Ok(ResetOutcome::Done) => text(StatusCode::OK, "Reset executed successfully"),
                Ok(ResetOutcome::Unsupported(msg)) => text(StatusCode::NOT_IMPLEMENTED, &msg),
                Err(SaladError::ResetFailed { reason, .. }) => {
                    text(StatusCode::SERVICE_UNAVAILABLE, &reason)
                }
                Err(e) => salad_error(e),
            }
        });

    let clients = base
        .and(warp::path::param::<String>())
        .and(warp::path("clients"))
        .and(warp::path::end())
        .and(warp::get())
        .and(s.clone())
        .map(|raw: String, salad: Salad| {
            let id = match decode_id(&raw) {
                Ok(id) => id,
                Err(r) => return *r,
            };
            match salad.clients(&id) {
                Ok((size, clients)) => {
                    warp::reply::json(&json!({"log_size": size, "clients": clients}))
                        .into_response()
                }
                Err(e) => salad_error(e),
            }
        });

    let log = base
        .and(warp::path::param::<String>())
        .and(warp::path("log"))
        .and(warp::path::end())
        .and(warp::get())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(s.clone())
        .then(|raw: String, query: String, salad: Salad| async move {
            let id = match decode_id(&raw) {
                Ok(id) => id,
                Err(r) => return *r,
            };
            let params: HashMap<String, String> = match serde_urlencoded_parse(&query) {
                Ok(p) => p,
                Err(msg) => return json_error(StatusCode::BAD_REQUEST, msg),
            };
            let num = |k: &str, default: u64| -> Result<u64, Box<warp::reply::Response>> {
                match params.get(k) {
                    None => Ok(default),
                    Some(v) => v.parse::<u64>().map_err(|_| {
                        Box::new(json_error(
                            StatusCode::BAD_REQUEST,
                            format!("query parameter {k}={v:?} is not a non-negative integer"),
                        ))
                    }),
                }
            };
            if let Some(k) = params.keys().find(|k| *k != "offset" && *k != "length") {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown query parameter {k:?} (expected offset, length)"),
                );
            }
            let offset = match num("offset", 0) {
                Ok(v) => v,
                Err(r) => return *r,
            };
            let length = match num("length", MAX_LOG_READ as u64) {
                Ok(v) => v.min(MAX_LOG_READ as u64) as usize,
                Err(r) => return *r,
            };
            match salad.read_log(&id, offset, length).await {
                Ok(chunk) => Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/octet-stream")
                    .header("x-salad-log-offset", chunk.offset.to_string())
                    .header("x-salad-log-size", chunk.size.to_string())
                    .body(chunk.data.into())
                    .unwrap(),
                Err(e) => salad_error(e),
            }
        });

    list.or(one)
        .unify()
        .or(reset)
        .unify()
        .or(clients)
        .unify()
        .or(log)
        .unify()
        .recover(|r: Rejection| async move {
            let resp = if r.is_not_found() {
                json_error(StatusCode::NOT_FOUND, "no such endpoint")
            } else if r.find::<warp::reject::MethodNotAllowed>().is_some() {
                json_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method not allowed on this endpoint",
                )
            } else {
                json_error(StatusCode::BAD_REQUEST, format!("bad request: {r:?}"))
            };
            Ok::<_, Infallible>(resp)
        })
        .unify()
}

fn serde_urlencoded_parse(q: &str) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| {
            percent_decode_str(&s.replace('+', " "))
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| format!("query parameter {pair:?} is not valid UTF-8"))
        };
        out.insert(dec(k)?, dec(v)?);
    }
    Ok(out)
}

/// Serve the API on `listener` until the multiplexer shuts down.
pub async fn serve_http(salad: Salad, listener: tokio::net::TcpListener) {
    let mut shutdown = salad.inner_shutdown_rx();
    warp::serve(routes(salad))
        .incoming(listener)
        .graceful(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .run()
        .await;
}

//! Dispatch of a request to its endpoint, and the endpoints.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Map, Value};
use warp::http::{header, HeaderValue, StatusCode};
use warp::reply::Response;

use vivian_core::farm::{DutPatch, DutRegistration, Farm, FarmError, PortPatch};
use vivian_core::netboot::{BootRequest, DefaultNetboot, Netboot, NetbootError};

use super::body::{self, field};
use super::error::ApiError;
use super::hooks::{LogsSource, RunnerHook};
use super::routing::{self, Endpoint};
use super::views::{Hooks, ViewCache};
use super::{ApiState, Request};

mod jobs;

/// Shared state of the API.
pub(crate) struct Inner {
    pub farm: Arc<Farm>,
    pub netboot: Arc<dyn Netboot>,
    pub cache: ViewCache,
    /// The OpenAPI document, built at its first request: few clients ask
    /// for it, and building it at start-up cost every executor the code
    /// and heap of a 40 KiB JSON value.
    pub openapi: OnceLock<Bytes>,
    /// MinIO URL given to the submission-time render of job templates.
    pub minio_url: String,
    /// The artifact cache, when `EXECUTOR_ARTIFACT_CACHE_ROOT` is set.
    pub artifacts: OnceLock<Arc<crate::artifacts::Artifacts>>,
    /// GitLab runners of the DUTs (optional).
    pub runners: OnceLock<Arc<dyn RunnerHook>>,
    /// Console log endpoints of the DUTs (optional).
    pub logs: OnceLock<Arc<dyn LogsSource>>,
    /// `EXECUTOR_JOB__*` variables of the submission-time render.
    pub job_env: std::collections::BTreeMap<String, String>,
}

impl Inner {
    pub fn new(farm: Arc<Farm>, netboot: Option<Arc<dyn Netboot>>, minio_url: String) -> Self {
        let netboot = netboot.unwrap_or_else(|| {
            Arc::new(DefaultNetboot::new(
                vivian_core::config::BootDefaults::from_env_map(&Default::default()),
                farm.clone(),
            ))
        });
        Self {
            farm,
            netboot,
            cache: ViewCache::new(),
            openapi: OnceLock::new(),
            minio_url,
            artifacts: OnceLock::new(),
            runners: OnceLock::new(),
            logs: OnceLock::new(),
            job_env: Default::default(),
        }
    }
}

impl Inner {
    /// The installed hooks, for the view cache.
    pub fn hooks(&self) -> Hooks<'_> {
        Hooks {
            runners: self.runners.get().map(|h| h.as_ref()),
            logs: self.logs.get().map(|h| h.as_ref()),
        }
    }

    /// The renderings of the farm's current state.
    fn rendered(&self) -> Arc<super::views::Rendered> {
        self.cache.get(&self.farm, self.hooks())
    }
}

impl From<FarmError> for ApiError {
    fn from(e: FarmError) -> Self {
        let status = match &e {
            FarmError::Invalid(_) => StatusCode::BAD_REQUEST,
            FarmError::NotFound(_) => StatusCode::NOT_FOUND,
            FarmError::Forbidden(_) => StatusCode::FORBIDDEN,
            FarmError::NoMatch(_) => StatusCode::NOT_ACCEPTABLE,
            FarmError::Conflict(_) => StatusCode::CONFLICT,
            FarmError::Pdu(_) => StatusCode::BAD_GATEWAY,
            FarmError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            FarmError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// `GET /api/v1/artifacts`: the artifact cache's entries (an empty list
/// with `enabled: false` without a cache).
fn artifacts_listing(inner: &Inner) -> Result<Response, ApiError> {
    let v = match inner.artifacts.get() {
        Some(a) => a
            .listing()
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
        None => json!({"enabled": false, "artifacts": []}),
    };
    Ok(json_response(Bytes::from(v.to_string())))
}

fn json_response(body: Bytes) -> Response {
    let mut r = Response::new(body.into());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A JSON body sent as two pieces (no copy of the cached head).
fn json_pieces(head: Bytes, tail: Bytes) -> Response {
    let len = head.len() + tail.len();
    let pieces = futures::stream::iter([Ok::<Bytes, std::convert::Infallible>(head), Ok(tail)]);
    let mut r = warp::Reply::into_response(warp::reply::stream(pieces));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r
}

fn text_response(text: String) -> Response {
    let mut r = Response::new(text.into());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn discovery_json(farm: &Farm) -> Bytes {
    Bytes::from(serde_json::to_vec(&farm.discovery()).expect("discovery serialises"))
}

/// Answers one request.
pub(crate) async fn dispatch(state: &ApiState, req: Request) -> Result<Response, ApiError> {
    let inner = &*state.inner;
    let Some(ep) = routing::resolve(&req.path) else {
        return Err(ApiError::not_found(format!("No route for {}", req.path)));
    };
    let method = req.method.as_str();
    let allowed = ep.methods();
    let is_head = method == "HEAD" && allowed.contains(&"GET");
    if !allowed.contains(&method) && !is_head {
        let mut r = ApiError::method_not_allowed(method, &req.path, allowed).into_response();
        if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
            r.headers_mut().insert(header::ALLOW, v);
        }
        return Ok(r);
    }
    let method = if is_head { "GET" } else { method };
    let farm = &inner.farm;
    match (ep, method) {
        (Endpoint::Duts, _) => Ok(json_response(inner.rendered().duts_body.clone())),
        (Endpoint::FullState, _) => {
            let r = inner.rendered();
            let (head, tail) = r.full_state(&discovery_json(farm), &now_rfc3339());
            Ok(json_pieces(head, tail))
        }
        (Endpoint::Dut(id), "GET") => {
            let r = inner.rendered();
            r.find_dut(&id)
                .cloned()
                .map(json_response)
                .ok_or_else(|| unknown_dut(&id))
        }
        (Endpoint::Pdus, _) => Ok(json_response(inner.rendered().pdus_body.clone())),
        (Endpoint::Pdu(name), _) => inner
            .rendered()
            .pdu
            .get(&name)
            .cloned()
            .map(json_response)
            .ok_or_else(|| unknown_pdu(&name)),
        (Endpoint::Port(name, port), "GET") => {
            let r = inner.rendered();
            let pdu = r.view.pdus.get(&name).ok_or_else(|| unknown_pdu(&name))?;
            let p = pdu
                .ports
                .get(&port)
                .ok_or_else(|| unknown_port(&name, &port))?;
            Ok(json_response(Bytes::from(
                serde_json::to_vec(p).expect("port serialises"),
            )))
        }
        (Endpoint::Discover, "GET") => Ok(json_response(discovery_json(farm))),
        (Endpoint::Artifacts, _) => artifacts_listing(inner),
        (Endpoint::OpenApi, _) => Ok(json_response(
            inner
                .openapi
                .get_or_init(|| Bytes::from(super::openapi::document().to_string()))
                .clone(),
        )),
        (Endpoint::QuickCheck(id), "GET") => {
            let q = farm.quick_check_queued(&id)?;
            Ok(text_response(format!("{q}\n")))
        }
        (Endpoint::BootIpxe(id), _) => boot_ipxe(inner, &id, &req.query).await,
        (Endpoint::TrainingLoop(id, n), _) => {
            Ok(text_response(farm.training_loop_log(&id, n)?.to_string()))
        }

        // Mutations.
        (Endpoint::DutRegister, _) => {
            let obj = body::json_object(req.content_type.as_deref(), req.body).await?;
            let reg = DutRegistration::from_json(&obj)?;
            let (id, created) = farm.register_dut(reg).await?;
            let r = inner.rendered();
            let body = r
                .find_dut(&id.to_string())
                .cloned()
                .ok_or_else(|| unknown_dut(&id.to_string()))?;
            tracing::info!(dut = %id, created, "DUT registered");
            Ok(json_response(body))
        }
        (Endpoint::Dut(id), "PATCH") => {
            let obj = body::json_object(req.content_type.as_deref(), req.body).await?;
            let patch = DutPatch::from_json(&obj)?;
            Ok(text_response(farm.patch_dut(&id, patch).await?))
        }
        (Endpoint::Dut(id), "DELETE") => remove_dut(inner, &id).await,
        (Endpoint::QuickCheck(id), _) => Ok(text_response(farm.queue_quick_check(&id).await?)),
        (Endpoint::CancelJob(id), _) => Ok(text_response(farm.cancel_job(&id).await?)),
        (Endpoint::Discover, "POST") => {
            let obj = body::json_object(req.content_type.as_deref(), req.body).await?;
            let (pdu, port, timeout) = discovery_request(&obj)?;
            let t = farm.start_discovery(&pdu, &port, timeout).await?;
            Ok(text_response(format!(
                "Booting machine behind port {port} on PDU \"{pdu}\". Discovery will time out after {} seconds.\n",
                t.as_secs_f64()
            )))
        }
        (Endpoint::Discover, _) => Ok(text_response(format!(
            "{}\n",
            farm.cancel_discovery().await?
        ))),
        (Endpoint::Port(name, port), _) => {
            let obj = body::json_object(req.content_type.as_deref(), req.body).await?;
            let patch = PortPatch::from_json(&obj)?;
            Ok(text_response(farm.patch_port(&name, &port, patch).await?))
        }
        (Endpoint::Jobs, _) => jobs::submit(inner, req).await,
        (ep, m) => Err(ApiError::method_not_allowed(m, &format!("{ep:?}"), &[])),
    }
}

/// `DELETE /dut/<id>`: removes the DUT (EX A.5), then its runners, before
/// answering (a runner GitLab could not be reached for is retried by the
/// hook; the DUT is gone either way).
async fn remove_dut(inner: &Inner, key: &str) -> Result<Response, ApiError> {
    let farm = &inner.farm;
    let (mac, _) = farm.resolve_dut(key)?;
    let record = farm.db().snapshot().duts.get(&mac).cloned();
    let text = farm.remove_dut(key).await?;
    if let Some(hook) = inner.runners.get() {
        let r = hook.dut_removed(&mac, record.as_ref()).await;
        for (instance, reason) in &r.retrying {
            tracing::warn!(dut = %mac, instance = %instance, "the runner of the removed DUT could not be removed yet (retried later): {reason}");
        }
        if !r.removed.is_empty() {
            tracing::info!(dut = %mac, instances = ?r.removed, "removed the runners of the removed DUT");
        }
    }
    Ok(text_response(text))
}

fn unknown_dut(id: &str) -> ApiError {
    ApiError::not_found(format!("Unknown machine ID '{id}'"))
}

fn unknown_pdu(name: &str) -> ApiError {
    ApiError::not_found(format!("PDU \"{name}\" does not exist"))
}

fn unknown_port(pdu: &str, port: &str) -> ApiError {
    ApiError::not_found(format!("Port {port} does not exist on PDU \"{pdu}\""))
}

/// Validates `{"pdu": str, "port_id": str|int, "timeout"?: number}`.
fn discovery_request(
    obj: &Map<String, Value>,
) -> Result<(String, String, Option<Duration>), ApiError> {
    for k in obj.keys() {
        if !["pdu", "port_id", "timeout"].contains(&k.as_str()) {
            return Err(ApiError::bad_request(format!(
                "The field '{k}' is invalid (allowed: pdu, port_id, timeout)"
            )));
        }
    }
    let pdu = obj
        .get("pdu")
        .ok_or_else(|| ApiError::bad_request("The field 'pdu' is missing"))
        .and_then(|v| field::string("pdu", v))?;
    let port = obj
        .get("port_id")
        .ok_or_else(|| ApiError::bad_request("The field 'port_id' is missing"))
        .and_then(|v| field::string_or_int("port_id", v))?;
    let timeout = match obj.get("timeout") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let t = field::number("timeout", v)?;
            if !(t > 0.0 && t <= 86_400.0) {
                return Err(ApiError::bad_request(format!(
                    "The field 'timeout' must be a number of seconds in (0, 86400], got {t}"
                )));
            }
            Some(Duration::from_secs_f64(t))
        }
    };
    Ok((pdu, port, timeout))
}

async fn boot_ipxe(inner: &Inner, id: &str, query: &str) -> Result<Response, ApiError> {
    let mut platform = None;
    let mut buildarch = None;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "platform" => platform = Some(v.into_owned()),
            "buildarch" => buildarch = Some(v.into_owned()),
            _ => {}
        }
    }
    let request = BootRequest::ipxe(platform.as_deref(), buildarch.as_deref());
    // A known DUT (by id or full name) boots its job's deployment; anything
    // else, the defaults.
    let dut = inner
        .farm
        .resolve_dut(id)
        .ok()
        .map(|(mac, _)| mac.to_string());
    match inner.netboot.ipxe_script(dut.as_deref(), &request).await {
        Ok(script) => Ok(text_response(script)),
        Err(NetbootError::MissingDefault(e)) => Err(ApiError::bad_request(e.to_string())),
    }
}

/// Error body of `POST /jobs`: `{"error": m, "version": 1, "error_msg": m}`
/// (the reference client reads `error_msg`; COMPAT.md asks for `error`).
pub(crate) fn job_error(e: ApiError) -> Response {
    let body = json!({"error": e.message, "version": 1, "error_msg": e.message});
    let mut r = json_response(Bytes::from(body.to_string()));
    *r.status_mut() = e.status;
    r
}

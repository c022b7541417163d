//! The executor's REST API as warp filters an embedding program can mount.
//!
//! ```no_run
//! # async fn f(farm: std::sync::Arc<vivian_core::farm::Farm>) {
//! use warp::Filter;
//! let api = vivian::api::routes(vivian::api::ApiState::new(farm));
//! // Mount next to the program's own routes; paths outside /api/v1 and
//! // /boot are left to the routes that follow.
//! let app = api.or(warp::path("hello").map(|| "hi"));
//! # let _ = app;
//! # }
//! ```
//!
//! Conventions (COMPAT.md): unknown DUT, PDU or port is 404; invalid input
//! (bad JSON, wrong types, unknown or read-only fields) is 400; a valid
//! request that clashes with the current state is 409; bodies over the
//! limit are 413 and a wrong content type 415. Every error body is
//! `{"error": "<message>"}`, and a rejected request changes nothing.
//!
//! Request log ([`server_filter`], target `vivian::http`): every request
//! is an event with method, path, status and duration. Successful reads
//! are at `debug`, so that dashboards polling `full-state` cost no log
//! line at the default `info`; changes, refusals (4xx) and requests slower
//! than [`crate::serve::SLOW_REQUEST`] are at `info`, server errors at
//! `warn`. To see every request: `RUST_LOG=info,vivian::http=debug`.
//!
//! Optional hooks ([`hooks`]) add what services outside the farm know to
//! the DUT objects: `gitlab_runners` ([`RunnerHook`], GitLab) and
//! `logs_endpoint` ([`LogsSource`], SALAD); reads answer from memory.

pub mod body;
pub mod error;
mod handlers;
pub mod hooks;
pub mod logs;
pub mod openapi;
pub mod routing;
mod views;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use warp::http::Method;
use warp::reply::Response;
use warp::Filter;

pub use error::ApiError;
pub use hooks::{LogsEndpoint, LogsSource, RunnerHook, RunnerRemoval};
pub use logs::ConsoleLogs;
pub use routing::{Endpoint, Route, ROUTES};

use vivian_core::farm::Farm;
use vivian_core::netboot::Netboot;

/// What the API serves: the farm, plus the caches of rendered JSON views.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<handlers::Inner>,
}

/// Options of the API.
#[derive(Clone)]
pub struct ApiOptions {
    /// What serves `boot.ipxe`; default: the job deployments of the farm,
    /// else the seed's `BOOTS_DEFAULT_*` defaults.
    pub netboot: Option<Arc<dyn Netboot>>,
    /// `MINIO_URL`, a variable of the submission-time render of job
    /// templates.
    pub minio_url: String,
    /// The executor's `EXECUTOR_JOB__*` variables (lower-case names without
    /// the prefix), also variables of the submission-time render.
    pub job_env: std::collections::BTreeMap<String, String>,
}

impl Default for ApiOptions {
    fn default() -> Self {
        Self {
            netboot: None,
            minio_url: "http://ci-gateway:9000".to_string(),
            job_env: Default::default(),
        }
    }
}

impl ApiState {
    /// The API state for `farm`, with default options.
    pub fn new(farm: Arc<Farm>) -> Self {
        Self::with_options(farm, ApiOptions::default())
    }

    /// The API state for `farm`.
    pub fn with_options(farm: Arc<Farm>, options: ApiOptions) -> Self {
        let mut inner = handlers::Inner::new(farm, options.netboot, options.minio_url);
        inner.job_env = options.job_env;
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The farm behind the API.
    pub fn farm(&self) -> &Arc<Farm> {
        &self.inner.farm
    }

    /// Installs the artifact cache: `GET /api/v1/artifacts` lists it and
    /// [`server_filter`] serves `/artifacts/<key>` from it. A state has at
    /// most one: a second call returns `false` and changes nothing.
    pub fn set_artifacts(&self, artifacts: Arc<crate::artifacts::Artifacts>) -> bool {
        self.inner.artifacts.set(artifacts).is_ok()
    }

    /// The artifact cache, if one is installed.
    pub fn artifacts(&self) -> Option<Arc<crate::artifacts::Artifacts>> {
        self.inner.artifacts.get().cloned()
    }

    /// Installs the GitLab runner hook: the DUT objects get a
    /// `gitlab_runners` member (the runner state on each instance) and
    /// `DELETE /api/v1/dut/<id>` removes the DUT's runners before it
    /// answers. A state has at most one: a second call returns `false`
    /// and changes nothing.
    pub fn set_runner_hook(&self, hook: Arc<dyn RunnerHook>) -> bool {
        self.inner.runners.set(hook).is_ok()
    }

    /// [`ApiState::set_runner_hook`], builder style.
    pub fn with_runner_hook(self, hook: Arc<dyn RunnerHook>) -> Self {
        if !self.set_runner_hook(hook) {
            tracing::warn!("a runner hook is already installed: the new one is ignored");
        }
        self
    }

    /// Installs the source of the DUT objects' `logs_endpoint` (e.g. a
    /// [`ConsoleLogs`] following SALAD). A state has at most one: a second
    /// call returns `false` and changes nothing.
    pub fn set_logs_source(&self, source: Arc<dyn LogsSource>) -> bool {
        self.inner.logs.set(source).is_ok()
    }

    /// [`ApiState::set_logs_source`], builder style.
    pub fn with_logs_source(self, source: Arc<dyn LogsSource>) -> Self {
        if !self.set_logs_source(source) {
            tracing::warn!("a logs source is already installed: the new one is ignored");
        }
        self
    }
}

/// A request as the dispatcher sees it.
pub(crate) struct Request {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    pub remote: Option<SocketAddr>,
    pub body: body::BodyStream,
}

/// The API's routes. Requests under `/api/v1/` and `/boot/` are always
/// answered (404/405 with a JSON error for unknown routes or methods);
/// other paths are rejected with `not_found` so that routes mounted after
/// this filter can serve them.
pub fn routes(
    state: ApiState,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();
    warp::path::full()
        .and_then(|p: warp::path::FullPath| async move {
            if routing::is_api_path(p.as_str()) {
                Ok(p)
            } else {
                Err(warp::reject::not_found())
            }
        })
        .and(warp::method())
        .and(query)
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::addr::remote())
        .and(warp::body::stream().map(boxed_body))
        .and(warp::any().map(move || state.clone()))
        .then(
            |path: warp::path::FullPath,
             method: Method,
             query: String,
             content_type: Option<String>,
             remote: Option<SocketAddr>,
             body: body::BodyStream,
             state: ApiState| async move {
                let req = Request {
                    method,
                    path: path.as_str().to_owned(),
                    query,
                    content_type,
                    remote,
                    body,
                };
                match handlers::dispatch(&state, req).await {
                    Ok(resp) => resp,
                    Err(e) => e.into_response(),
                }
            },
        )
}

/// The body stream of warp, boxed, as `Bytes` chunks.
fn boxed_body<S, B>(stream: S) -> body::BodyStream
where
    S: futures::Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: bytes::Buf,
{
    Box::pin(stream.map(|r| match r {
        Ok(mut buf) => {
            let n = buf.remaining();
            Ok(buf.copy_to_bytes(n))
        }
        Err(e) => Err(std::io::Error::other(e)),
    }))
}

/// The JSON error answer for a rejection that reached the top of the
/// server (a path outside the API, or a rejection of a mounted filter).
pub fn rejection_response(rej: &warp::Rejection) -> Response {
    let e = if let Some(e) = rej.find::<ApiError>() {
        e.clone()
    } else if rej.is_not_found() {
        ApiError::not_found("No such route")
    } else if rej.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(
            warp::http::StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
        )
    } else if rej.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::new(
            warp::http::StatusCode::PAYLOAD_TOO_LARGE,
            "The request body is too large",
        )
    } else if let Some(e) = rej.find::<warp::reject::UnsupportedMediaType>() {
        ApiError::new(
            warp::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            e.to_string(),
        )
    } else {
        ApiError::bad_request(format!("Invalid request: {rej:?}"))
    };
    e.into_response()
}

/// A full server filter: [`routes`], a JSON 404 for everything else, and a
/// log line per request.
pub fn server_filter(
    state: ApiState,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    // `/artifacts/<key>` (DUT downloads from the artifact cache) first.
    let s = state.clone();
    let artifacts = crate::artifacts::routes(move || s.artifacts());
    crate::serve::with_request_log(crate::serve::with_json_fallback(
        artifacts.or(routes(state)).unify(),
    ))
}

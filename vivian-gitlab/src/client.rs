//! The GitLab implementation of [`RunnerRegistry`], over GitLab's REST API
//! v4 with reqwest.
//!
//! | Operation | Request | Outcome |
//! |---|---|---|
//! | register | `POST /api/v4/user/runners`, header `PRIVATE-TOKEN: <registration_token>`, form `runner_type`, `group_id`/`project_id`, `description`, `tag_list`, `run_untagged=false`, `maximum_timeout` | 201 + `{id, token}` |
//! | verify | `POST /api/v4/runners/verify`, form `token` | 200 valid, **403 invalid**, anything else an error |
//! | details | `GET /api/v4/runners/<id>`, header `PRIVATE-TOKEN: <access_token>` | 200 + runner JSON |
//! | remove | `DELETE /api/v4/runners`, form `token` | 204 removed, 403 unknown token |
//!
//! Tokens are sent in headers and form bodies, never in URLs, so they
//! cannot appear in error messages or proxy logs. Every request has a
//! timeout; 429 and 5xx answers (and connection failures) are retried with
//! exponential backoff, honouring `Retry-After` up to the maximum backoff.
//! Runner creation is not idempotent, so it is only retried when GitLab
//! cannot have acted on it (429, 502, 503, 504, connection refused).

use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use vivian_core::runner::{
    RegisteredRunner, RegistryEndpoint, RegistryError, RunnerDetails, RunnerRegistry, RunnerScope,
    RunnerSpec, Secret, TokenState,
};

/// Timeouts and retry policy of a [`GitlabClient`].
#[derive(Clone, Debug)]
pub struct GitlabClientOptions {
    /// Time limit of one HTTP request, from sending to the end of the body.
    pub request_timeout: Duration,
    /// Time limit to establish a connection.
    pub connect_timeout: Duration,
    /// Retries after the first attempt on 429/5xx or connection failures.
    pub max_retries: u32,
    /// Wait before the first retry; doubled at each retry.
    pub initial_backoff: Duration,
    /// Upper bound of a wait between retries (also caps `Retry-After`).
    pub max_backoff: Duration,
    /// Accept invalid TLS certificates (only for test instances).
    pub danger_accept_invalid_certs: bool,
}

impl Default for GitlabClientOptions {
    /// 30 s per request, 10 s to connect, 5 retries from 1 s up to 30 s.
    fn default() -> Self {
        GitlabClientOptions {
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_retries: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            danger_accept_invalid_certs: false,
        }
    }
}

/// A [`RunnerRegistry`] talking to GitLab instances over HTTP(S). One client
/// serves every instance: each call names its [`RegistryEndpoint`].
#[derive(Clone, Debug)]
pub struct GitlabClient {
    http: reqwest::Client,
    options: GitlabClientOptions,
}

/// Longest registry message kept in an error.
const MAX_MESSAGE: usize = 300;

impl GitlabClient {
    /// A client with these options. Fails only if the TLS backend cannot
    /// be initialised.
    ///
    /// Without system CA certificates (no `ca-certificates` package) the
    /// client is still built, without TLS roots, and a warning logged: a
    /// farm with no GitLab runners works, and requests to an https GitLab
    /// fail with a certificate error naming the instance.
    ///
    /// The client is its own, not shared: it follows no redirect (a
    /// redirect would carry the `PRIVATE-TOKEN` header to wherever it
    /// points), sends a `vivian-gitlab` user agent and may accept invalid
    /// certificates, all settings of a whole reqwest client.
    pub fn new(options: GitlabClientOptions) -> Result<Self, reqwest::Error> {
        let (http, _roots) = vivian_core::http_client::build_with("GitLab API", || {
            vivian_core::http_client::builder()
                .timeout(options.request_timeout)
                // The whole request has a limit; no shorter one per read.
                .read_timeout(options.request_timeout)
                .connect_timeout(options.connect_timeout)
                .user_agent(concat!("vivian-gitlab/", env!("CARGO_PKG_VERSION")))
                .danger_accept_invalid_certs(options.danger_accept_invalid_certs)
                .redirect(reqwest::redirect::Policy::none())
        })?;
        Ok(GitlabClient { http, options })
    }

    /// The options in force.
    pub fn options(&self) -> &GitlabClientOptions {
        &self.options
    }

    fn url(endpoint: &RegistryEndpoint, path: &str) -> Result<reqwest::Url, RegistryError> {
        let base = endpoint.url.trim_end_matches('/');
        reqwest::Url::parse(&format!("{base}/api/v4/{path}")).map_err(|e| {
            RegistryError::Misconfigured {
                instance: endpoint.name.clone(),
                reason: format!("invalid url {:?}: {e}", endpoint.url),
            }
        })
    }

    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .options
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt));
        retry_after.unwrap_or(exp).min(self.options.max_backoff)
    }

    /// Sends the request built by `build`, retrying on 429/5xx and
    /// connection failures. `idempotent` requests are also retried on
    /// 500 and on timeouts. Returns the last response (which may still be
    /// a 429/5xx when retries ran out) or `Unreachable`.
    async fn send(
        &self,
        endpoint: &RegistryEndpoint,
        operation: &str,
        idempotent: bool,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let mut attempt = 0u32;
        loop {
            let last = attempt >= self.options.max_retries;
            match build().send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let retryable = matches!(status.as_u16(), 429 | 502 | 503 | 504)
                        || (idempotent && status.is_server_error());
                    if !retryable || last {
                        return Ok(resp);
                    }
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let wait = self.backoff(attempt, retry_after);
                    tracing::debug!(
                        instance = %endpoint.name,
                        operation,
                        status = status.as_u16(),
                        ?wait,
                        "GitLab answered with a transient error, retrying"
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(err) => {
                    let err = err.without_url();
                    let retryable = err.is_connect() || (idempotent && err.is_timeout());
                    if !retryable || last {
                        return Err(RegistryError::Unreachable {
                            instance: endpoint.name.clone(),
                            reason: format!("{operation}: {}", error_chain(&err)),
                        });
                    }
                    let wait = self.backoff(attempt, None);
                    tracing::debug!(
                        instance = %endpoint.name,
                        operation,
                        error = %error_chain(&err),
                        ?wait,
                        "GitLab request failed, retrying"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
            attempt += 1;
        }
    }
}

/// The error and its sources, joined (reqwest's top-level message alone
/// says little).
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        source = s.source();
    }
    out
}

/// A short, single-line form of GitLab's error body (`{"message": ...}`
/// or `{"error": ...}` when JSON, else the text).
async fn error_message(resp: Response) -> String {
    let text = resp.text().await.unwrap_or_default();
    let msg = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => match v.get("message").or_else(|| v.get("error")) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => text.clone(),
        },
        Err(_) => text.clone(),
    };
    let msg = msg.replace(['\n', '\r'], " ");
    let mut msg = msg.trim().to_string();
    if msg.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
        msg.push('…');
    }
    msg
}

/// Maps a non-success answer to an error: 429/5xx are `Unreachable`
/// (retries ran out), the rest `Refused`.
async fn failure(endpoint: &RegistryEndpoint, operation: &str, resp: Response) -> RegistryError {
    let status = resp.status();
    let message = error_message(resp).await;
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        RegistryError::Unreachable {
            instance: endpoint.name.clone(),
            reason: format!("{operation}: HTTP {}: {message}", status.as_u16()),
        }
    } else {
        RegistryError::Refused {
            instance: endpoint.name.clone(),
            operation: operation.to_string(),
            status: status.as_u16(),
            message,
        }
    }
}

fn bad_response(endpoint: &RegistryEndpoint, operation: &str, reason: String) -> RegistryError {
    RegistryError::BadResponse {
        instance: endpoint.name.clone(),
        operation: operation.to_string(),
        reason,
    }
}

/// `POST /user/runners` answer (extra fields ignored).
#[derive(Deserialize)]
struct CreatedRunner {
    id: u64,
    token: String,
}

/// `POST /runners/verify` answer (GitLab 15.x+ returns the id; older
/// versions an empty body).
#[derive(Deserialize)]
struct VerifiedRunner {
    id: Option<u64>,
}

/// `GET /runners/:id` answer (extra fields ignored).
#[derive(Deserialize)]
struct RunnerJson {
    id: u64,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    tag_list: Vec<String>,
    #[serde(default)]
    maximum_timeout: Option<u64>,
    #[serde(default)]
    runner_type: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

fn token_header(token: &Secret) -> Result<reqwest::header::HeaderValue, ()> {
    let mut v = reqwest::header::HeaderValue::from_str(token.expose()).map_err(|_| ())?;
    v.set_sensitive(true);
    Ok(v)
}

#[async_trait]
impl RunnerRegistry for GitlabClient {
    async fn register(
        &self,
        endpoint: &RegistryEndpoint,
        spec: &RunnerSpec,
    ) -> Result<RegisteredRunner, RegistryError> {
        const OP: &str = "register";
        let token =
            endpoint
                .registration_token
                .as_ref()
                .ok_or_else(|| {
                    RegistryError::Misconfigured {
                instance: endpoint.name.clone(),
                reason:
                    "no registration_token: set one with the create_runner scope to create runners"
                        .into(),
            }
                })?;
        let header = token_header(token).map_err(|_| RegistryError::Misconfigured {
            instance: endpoint.name.clone(),
            reason: "registration_token contains characters not allowed in an HTTP header".into(),
        })?;
        let url = Self::url(endpoint, "user/runners")?;
        let mut form: Vec<(&str, String)> = vec![
            ("runner_type", spec.scope.runner_type().to_string()),
            ("description", spec.description.clone()),
            ("tag_list", spec.tags.join(",")),
            ("run_untagged", "false".to_string()),
            ("maximum_timeout", spec.maximum_timeout.to_string()),
        ];
        match spec.scope {
            RunnerScope::Instance => {}
            RunnerScope::Group(id) => form.push(("group_id", id.to_string())),
            RunnerScope::Project(id) => form.push(("project_id", id.to_string())),
        }
        let resp = self
            .send(endpoint, OP, false, || {
                self.http
                    .request(Method::POST, url.clone())
                    .header("PRIVATE-TOKEN", header.clone())
                    .form(&form)
            })
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(failure(endpoint, OP, resp).await);
        }
        let body = resp.bytes().await.map_err(|e| RegistryError::Unreachable {
            instance: endpoint.name.clone(),
            reason: format!("{OP}: reading the answer: {}", e.without_url()),
        })?;
        let created: CreatedRunner = serde_json::from_slice(&body)
            .map_err(|e| bad_response(endpoint, OP, format!("invalid JSON: {e}")))?;
        if created.token.is_empty() {
            return Err(bad_response(endpoint, OP, "empty runner token".into()));
        }
        Ok(RegisteredRunner {
            id: created.id,
            token: Secret::new(created.token),
        })
    }

    async fn verify(
        &self,
        endpoint: &RegistryEndpoint,
        token: &Secret,
    ) -> Result<TokenState, RegistryError> {
        const OP: &str = "verify";
        let url = Self::url(endpoint, "runners/verify")?;
        let resp = self
            .send(endpoint, OP, true, || {
                self.http
                    .request(Method::POST, url.clone())
                    .form(&[("token", token.expose())])
            })
            .await?;
        match resp.status() {
            StatusCode::FORBIDDEN => Ok(TokenState::Invalid),
            s if s.is_success() => {
                let body = resp.bytes().await.unwrap_or_default();
                let runner_id = serde_json::from_slice::<VerifiedRunner>(&body)
                    .ok()
                    .and_then(|v| v.id);
                Ok(TokenState::Valid { runner_id })
            }
            _ => Err(failure(endpoint, OP, resp).await),
        }
    }

    async fn details(
        &self,
        endpoint: &RegistryEndpoint,
        runner_id: u64,
    ) -> Result<RunnerDetails, RegistryError> {
        const OP: &str = "details";
        let token = endpoint
            .access_token
            .as_ref()
            .ok_or_else(|| RegistryError::Misconfigured {
                instance: endpoint.name.clone(),
                reason: "no access_token: cannot read runner details".into(),
            })?;
        let header = token_header(token).map_err(|_| RegistryError::Misconfigured {
            instance: endpoint.name.clone(),
            reason: "access_token contains characters not allowed in an HTTP header".into(),
        })?;
        let url = Self::url(endpoint, &format!("runners/{runner_id}"))?;
        let resp = self
            .send(endpoint, OP, true, || {
                self.http
                    .request(Method::GET, url.clone())
                    .header("PRIVATE-TOKEN", header.clone())
            })
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(failure(endpoint, OP, resp).await);
        }
        let body = resp.bytes().await.map_err(|e| RegistryError::Unreachable {
            instance: endpoint.name.clone(),
            reason: format!("{OP}: reading the answer: {}", e.without_url()),
        })?;
        let r: RunnerJson = serde_json::from_slice(&body)
            .map_err(|e| bad_response(endpoint, OP, format!("invalid JSON: {e}")))?;
        Ok(RunnerDetails {
            id: r.id,
            description: r.description.unwrap_or_default(),
            tags: r.tag_list,
            maximum_timeout: r.maximum_timeout,
            runner_type: r.runner_type,
            status: r.status,
        })
    }

    async fn remove(
        &self,
        endpoint: &RegistryEndpoint,
        token: &Secret,
    ) -> Result<(), RegistryError> {
        const OP: &str = "remove";
        let url = Self::url(endpoint, "runners")?;
        let resp = self
            .send(endpoint, OP, true, || {
                self.http
                    .request(Method::DELETE, url.clone())
                    .form(&[("token", token.expose())])
            })
            .await?;
        match resp.status() {
            StatusCode::NO_CONTENT => Ok(()),
            StatusCode::FORBIDDEN => Err(RegistryError::InvalidToken {
                instance: endpoint.name.clone(),
            }),
            _ => Err(failure(endpoint, OP, resp).await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let c = GitlabClient::new(GitlabClientOptions {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.backoff(0, None), Duration::from_millis(100));
        assert_eq!(c.backoff(1, None), Duration::from_millis(200));
        assert_eq!(c.backoff(2, None), Duration::from_millis(400));
        assert_eq!(c.backoff(3, None), Duration::from_millis(500));
        assert_eq!(c.backoff(40, None), Duration::from_millis(500));
        assert_eq!(
            c.backoff(0, Some(Duration::from_secs(60))),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn url_joins_with_or_without_trailing_slash() {
        let mut ep = RegistryEndpoint {
            name: "gl".into(),
            url: "https://gitlab.example/".into(),
            registration_token: None,
            access_token: None,
        };
        assert_eq!(
            GitlabClient::url(&ep, "runners/verify").unwrap().as_str(),
            "https://gitlab.example/api/v4/runners/verify"
        );
        ep.url = "https://example.org/gitlab".into();
        assert_eq!(
            GitlabClient::url(&ep, "user/runners").unwrap().as_str(),
            "https://example.org/gitlab/api/v4/user/runners"
        );
        ep.url = "not a url".into();
        assert!(matches!(
            GitlabClient::url(&ep, "x"),
            Err(RegistryError::Misconfigured { .. })
        ));
    }
}

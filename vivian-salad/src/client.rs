//! The executor's console sources: a SALAD service over HTTP + TCP
//! ([`SaladClient`]) and the multiplexer embedded in the process
//! ([`InProcessConsoles`]).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::net::TcpStream;
use vivian_core::console::{
    ConsoleAttachment, ConsoleError, ConsoleMachine, ConsoleSource, LogChunk, ResetOutcome,
};
use vivian_core::http_client::TlsRoots;

use crate::machine::ClientInfo;
use crate::{Salad, SaladError};

/// Default `SALAD_URL`.
pub const DEFAULT_SALAD_URL: &str = "http://ci-gateway:8005";

/// Characters escaped in a machine id inside a URL path.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b':');

/// How long [`SaladClient::attach`] waits for the service to register the
/// new connection before deciding it was refused.
const REGISTER_WAIT: Duration = Duration::from_secs(2);

/// A SALAD service (ours or the reference) reached over the network.
///
/// `attach` asks `GET {url}/api/v1/machine/<id>` for `tcp_port` and connects
/// to that port on the URL's host. Against Vivian's `salad`, it also finds
/// its `start_offset` through `/clients`, and `read_log` works; against the
/// reference they are `None` / [`ConsoleError::NotSupported`].
#[derive(Debug, Clone)]
pub struct SaladClient {
    base: String,
    host: String,
    http: reqwest::Client,
}

#[derive(serde::Deserialize)]
struct MachineList {
    machines: BTreeMap<String, ConsoleMachine>,
}

#[derive(serde::Deserialize)]
struct ClientList {
    clients: Vec<ClientInfo>,
}

/// `url` checked (http or https, with a host): the base URL without a
/// trailing `/`, the host (without IPv6 brackets) and whether it is https.
fn parse_salad_url(url: &str) -> Result<(String, String, bool), ConsoleError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| salad_url_error(url, format!("invalid SALAD_URL: {e}")))?;
    if parsed.scheme() != "http" && parsed.scheme() != "https" {
        return Err(salad_url_error(
            url,
            "invalid SALAD_URL: the scheme must be http or https".into(),
        ));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| salad_url_error(url, "invalid SALAD_URL: it has no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let base = url.trim_end_matches('/').to_string();
    Ok((base, host, parsed.scheme() == "https"))
}

fn salad_url_error(url: &str, reason: String) -> ConsoleError {
    ConsoleError::Unavailable {
        source_name: url.to_string(),
        reason,
    }
}

/// Time limit of one request to the SALAD API (connecting, sending, and
/// reading the whole answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Time limit to connect to the SALAD API, in clients built by
/// [`SaladClient::new`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl SaladClient {
    /// A client of the SALAD at `url` (e.g. `http://ci-gateway:8005`), with
    /// an HTTP client of its own (see [`SaladClient::with_http_client`] to
    /// share one). Without system CA certificates an `http://` SALAD still
    /// works (a warning is logged); an `https://` one is refused.
    pub fn new(url: &str) -> Result<Self, ConsoleError> {
        // The URL first: a bad one costs no trust-store parsing.
        let parsed = parse_salad_url(url)?;
        let (http, roots) = vivian_core::http_client::build_with("SALAD", || {
            vivian_core::http_client::builder().connect_timeout(CONNECT_TIMEOUT)
        })
        .map_err(|e| salad_url_error(url, e.to_string()))?;
        Self::from_parts(url, parsed, http, roots)
    }

    /// A client of the SALAD at `url` that sends its requests with `http`
    /// (a clone of a client shared with the rest of the process, from
    /// [`vivian_core::http_client`] say), built with `roots`: an `https://`
    /// URL is refused when the client has no TLS root. Each request is
    /// limited to 30 s whatever the client's own timeouts; connecting is
    /// limited by the client's connect timeout.
    pub fn with_http_client(
        url: &str,
        http: reqwest::Client,
        roots: TlsRoots,
    ) -> Result<Self, ConsoleError> {
        Self::from_parts(url, parse_salad_url(url)?, http, roots)
    }

    fn from_parts(
        url: &str,
        (base, host, https): (String, String, bool),
        http: reqwest::Client,
        roots: TlsRoots,
    ) -> Result<Self, ConsoleError> {
        if https && roots == TlsRoots::Missing {
            return Err(salad_url_error(
                url,
                "cannot set up TLS for SALAD_URL: the system has no CA certificate".into(),
            ));
        }
        Ok(Self { base, host, http })
    }

    /// A client of `SALAD_URL` (default `http://ci-gateway:8005`).
    pub fn from_env() -> Result<Self, ConsoleError> {
        let url = std::env::var("SALAD_URL").unwrap_or_else(|_| DEFAULT_SALAD_URL.to_string());
        Self::new(&url)
    }

    fn machine_url(&self, id: &str) -> String {
        format!(
            "{}/api/v1/machine/{}",
            self.base,
            utf8_percent_encode(id, PATH_SEGMENT)
        )
    }

    fn unavailable(&self, reason: impl std::fmt::Display) -> ConsoleError {
        ConsoleError::Unavailable {
            source_name: self.base.clone(),
            reason: reason.to_string(),
        }
    }

    async fn get(&self, url: &str) -> Result<reqwest::Response, ConsoleError> {
        self.http
            .get(url)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.unavailable(format!("GET {url}: {e}")))
    }

    /// Our own address appears in `/clients` once the service registered
    /// the connection. `Ok(None)`: the service has no `/clients` (reference).
    async fn find_start_offset(
        &self,
        id: &str,
        local: std::net::SocketAddr,
        stream: &TcpStream,
    ) -> Result<Option<u64>, ConsoleError> {
        let url = format!("{}/clients", self.machine_url(id));
        let deadline = tokio::time::Instant::now() + REGISTER_WAIT;
        loop {
            let resp = self.get(&url).await?;
            if resp.status() == reqwest::StatusCode::NOT_FOUND {
                // The reference SALAD: no way to know.
                return Ok(None);
            }
            if !resp.status().is_success() {
                return Err(self.unavailable(format!("GET {url}: HTTP {}", resp.status())));
            }
            let list: ClientList = resp
                .json()
                .await
                .map_err(|e| self.unavailable(format!("GET {url}: {e}")))?;
            if let Some(c) = list.clients.iter().find(|c| c.rw && c.peer == Some(local)) {
                return Ok(Some(c.start_offset));
            }
            // Refused? The service then wrote its error line and closed.
            let mut peek = [0u8; 256];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(1), stream.peek(&mut peek)).await
            {
                let text = String::from_utf8_lossy(&peek[..n]);
                if text.starts_with("ERROR:") {
                    return Err(ConsoleError::Busy {
                        machine_id: id.into(),
                        message: text.trim_end().to_string(),
                    });
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.unavailable(format!(
                    "the connection to the console of {id} was not registered within {REGISTER_WAIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[async_trait]
impl ConsoleSource for SaladClient {
    fn name(&self) -> String {
        self.base.clone()
    }

    async fn machines(&self) -> Result<Vec<ConsoleMachine>, ConsoleError> {
        let url = format!("{}/api/v1/machine", self.base);
        let resp = self.get(&url).await?;
        if !resp.status().is_success() {
            return Err(self.unavailable(format!("GET {url}: HTTP {}", resp.status())));
        }
        let list: MachineList = resp
            .json()
            .await
            .map_err(|e| self.unavailable(format!("GET {url}: {e}")))?;
        Ok(list.machines.into_values().collect())
    }

    async fn machine(&self, machine_id: &str) -> Result<ConsoleMachine, ConsoleError> {
        let url = self.machine_url(machine_id);
        let resp = self.get(&url).await?;
        if resp.status() == reqwest::StatusCode::BAD_REQUEST {
            let body = resp.text().await.unwrap_or_default();
            return Err(ConsoleError::InvalidMachineId {
                machine_id: machine_id.into(),
                reason: body,
            });
        }
        if !resp.status().is_success() {
            return Err(self.unavailable(format!("GET {url}: HTTP {}", resp.status())));
        }
        resp.json()
            .await
            .map_err(|e| self.unavailable(format!("GET {url}: {e}")))
    }

    async fn attach(&self, machine_id: &str) -> Result<ConsoleAttachment, ConsoleError> {
        let m = self.machine(machine_id).await?;
        if m.has_client {
            return Err(ConsoleError::Busy {
                machine_id: machine_id.into(),
                message: format!("ERROR: {}", crate::BUSY_MESSAGE),
            });
        }
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            TcpStream::connect((self.host.as_str(), m.tcp_port)),
        )
        .await
        .map_err(|_| {
            self.unavailable(format!(
                "connecting to {}:{} timed out",
                self.host, m.tcp_port
            ))
        })?
        .map_err(|e| {
            self.unavailable(format!("connecting to {}:{}: {e}", self.host, m.tcp_port))
        })?;
        let _ = stream.set_nodelay(true);
        let local = stream
            .local_addr()
            .map_err(|e| self.unavailable(e.to_string()))?;
        let start_offset = self.find_start_offset(machine_id, local, &stream).await?;
        let (reader, writer) = stream.into_split();
        Ok(ConsoleAttachment {
            machine_id: machine_id.into(),
            reader: Box::new(reader),
            writer: Box::new(writer),
            start_offset,
        })
    }

    async fn reset(&self, machine_id: &str) -> Result<ResetOutcome, ConsoleError> {
        let url = format!("{}/reset", self.machine_url(machine_id));
        let resp = self
            .http
            .post(&url)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.unavailable(format!("POST {url}: {e}")))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        match status.as_u16() {
            200..=299 => Ok(ResetOutcome::Done),
            501 => Ok(ResetOutcome::Unsupported(body)),
            _ => Err(ConsoleError::Failed {
                machine_id: machine_id.into(),
                reason: format!("POST {url}: HTTP {status}: {body}"),
            }),
        }
    }

    async fn read_log(
        &self,
        machine_id: &str,
        offset: u64,
        max_len: usize,
    ) -> Result<LogChunk, ConsoleError> {
        let url = format!(
            "{}/log?offset={offset}&length={max_len}",
            self.machine_url(machine_id)
        );
        let resp = self.get(&url).await?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND
            || status == reqwest::StatusCode::NOT_IMPLEMENTED
        {
            return Err(ConsoleError::NotSupported {
                operation: format!("reading the console log of {machine_id}"),
                source_name: self.base.clone(),
            });
        }
        if !status.is_success() {
            return Err(self.unavailable(format!("GET {url}: HTTP {status}")));
        }
        let size = resp
            .headers()
            .get("x-salad-log-size")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| self.unavailable(format!("GET {url}: no X-Salad-Log-Size header")))?;
        let data = resp
            .bytes()
            .await
            .map_err(|e| self.unavailable(format!("GET {url}: {e}")))?
            .to_vec();
        Ok(LogChunk { offset, data, size })
    }
}

/// The multiplexer embedded in the process, as a [`ConsoleSource`]: attach
/// is in memory (no socket), the machines' TCP ports still serve observers.
#[derive(Debug, Clone)]
pub struct InProcessConsoles {
    salad: Salad,
}

impl InProcessConsoles {
    /// Wrap a started multiplexer.
    pub fn new(salad: Salad) -> Self {
        Self { salad }
    }

    /// The multiplexer (to add stream consoles, serve its HTTP API...).
    pub fn salad(&self) -> &Salad {
        &self.salad
    }
}

fn local_error(e: SaladError) -> ConsoleError {
    match e {
        SaladError::InvalidMachineId { id, reason } => ConsoleError::InvalidMachineId {
            machine_id: id,
            reason,
        },
        SaladError::Busy(id) => ConsoleError::Busy {
            machine_id: id,
            message: format!("ERROR: {}", crate::BUSY_MESSAGE),
        },
        SaladError::LogUnavailable(id) => ConsoleError::NotSupported {
            operation: format!("reading the console log of {id}"),
            source_name: "in-process".into(),
        },
        SaladError::UnknownMachine(id) => ConsoleError::Failed {
            machine_id: id.clone(),
            reason: format!("unknown machine {id:?}"),
        },
        SaladError::ResetFailed { id, reason } => ConsoleError::Failed {
            machine_id: id,
            reason,
        },
        other => ConsoleError::Unavailable {
            source_name: "in-process".into(),
            reason: other.to_string(),
        },
    }
}

#[async_trait]
impl ConsoleSource for InProcessConsoles {
    fn name(&self) -> String {
        "in-process".into()
    }

    async fn machines(&self) -> Result<Vec<ConsoleMachine>, ConsoleError> {
        Ok(self.salad.machines())
    }

    async fn machine(&self, machine_id: &str) -> Result<ConsoleMachine, ConsoleError> {
        self.salad.machine(machine_id).map_err(local_error)
    }

    async fn attach(&self, machine_id: &str) -> Result<ConsoleAttachment, ConsoleError> {
        let a = self.salad.attach(machine_id, true).map_err(local_error)?;
        Ok(ConsoleAttachment {
            machine_id: machine_id.into(),
            reader: Box::new(a.reader),
            writer: Box::new(a.writer),
            start_offset: Some(a.start_offset),
        })
    }

    async fn reset(&self, machine_id: &str) -> Result<ResetOutcome, ConsoleError> {
        self.salad.reset(machine_id).await.map_err(local_error)
    }

    async fn read_log(
        &self,
        machine_id: &str,
        offset: u64,
        max_len: usize,
    ) -> Result<LogChunk, ConsoleError> {
        self.salad
            .read_log(machine_id, offset, max_len)
            .await
            .map_err(local_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_client_is_refused_a_bad_url() {
        let http = reqwest::Client::builder()
            .tls_certs_only([])
            .build()
            .unwrap();
        let roots = TlsRoots::Missing;
        assert!(SaladClient::with_http_client("ftp://x", http.clone(), roots).is_err());
        assert!(SaladClient::with_http_client("not a url", http.clone(), roots).is_err());
        let Err(e) = SaladClient::with_http_client("https://gw:8005", http.clone(), roots) else {
            panic!("https without TLS roots is refused");
        };
        assert!(e.to_string().contains("no CA certificate"), "{e}");
        assert!(
            SaladClient::with_http_client("https://gw:8005", http.clone(), TlsRoots::System)
                .is_ok()
        );
        let c = SaladClient::with_http_client("http://[::1]:8005/", http, roots).unwrap();
        assert_eq!(c.name(), "http://[::1]:8005");
        assert_eq!(c.host, "::1");
    }

    /// The 30 s limit holds whatever client is given: a SALAD that accepts
    /// the connection and never answers. (Paused clock: no real wait.)
    #[tokio::test(start_paused = true)]
    async fn a_request_through_a_client_without_timeouts_gives_up_after_30_s() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let http = reqwest::Client::builder()
            .tls_certs_only([])
            .build()
            .unwrap();
        let salad = SaladClient::with_http_client(&url, http, TlsRoots::Missing).unwrap();
        let start = tokio::time::Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(3600), salad.machines())
            .await
            .expect("the request was not limited");
        assert!(
            matches!(result, Err(ConsoleError::Unavailable { .. })),
            "{result:?}"
        );
        let waited = start.elapsed();
        assert!(
            waited >= REQUEST_TIMEOUT && waited < REQUEST_TIMEOUT + Duration::from_secs(1),
            "gave up after {waited:?}"
        );
        drop(silent);
    }
}

//! A SigV4-signing HTTP client for the admin APIs (MinIO admin, IAM) and
//! for raw S3 requests from a chosen source address.

use std::net::IpAddr;
use std::time::Duration;

use reqwest::Method;
use vivian_core::storage::{Credentials, StorageError};

use crate::sigv4::{self, Canonical};

/// An answer: status, headers, body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: reqwest::header::HeaderMap,
    /// Body.
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends SigV4-signed requests to one server with one credential.
#[derive(Clone)]
pub struct SignedClient {
    http: reqwest::Client,
    endpoint: url::Url,
    creds: Credentials,
    region: String,
    service: String,
}

impl std::fmt::Debug for SignedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedClient")
            .field("endpoint", &self.endpoint.as_str())
            .field("creds", &self.creds)
            .field("region", &self.region)
            .field("service", &self.service)
            .finish()
    }
}

impl SignedClient {
    /// A client of `endpoint` signing as `creds` for `service` in `region`.
    pub fn new(
        endpoint: &url::Url,
        creds: &Credentials,
        region: &str,
        service: &str,
        local_address: Option<IpAddr>,
    ) -> Result<Self, StorageError> {
        // Without CA certificates on the machine, still a client for
        // http:// (a MinIO next to the executor usually is).
        let (http, _) = vivian_core::http_client::build_with("MinIO admin", || {
            vivian_core::http_client::builder()
                .timeout(Duration::from_secs(60))
                .local_address(local_address)
        })
        .map_err(|e| StorageError::Backend(format!("cannot create an HTTP client: {e}")))?;
        Ok(SignedClient {
            http,
            endpoint: endpoint.clone(),
            creds: creds.clone(),
            region: region.to_string(),
            service: service.to_string(),
        })
    }

    /// The same client signing with other credentials.
    pub fn with_credentials(&self, creds: &Credentials) -> Self {
        SignedClient {
            creds: creds.clone(),
            ..self.clone()
        }
    }

    /// The server.
    pub fn endpoint(&self) -> &url::Url {
        &self.endpoint
    }

    /// The credentials it signs with.
    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// Sends `method path?query` with `headers` and `body`, signed (the
    /// `X-Amz-Content-Sha256` header always set). `path` is appended to the
    /// endpoint's path; its segments are URI-encoded here.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Answer, StorageError> {
        let base = self.endpoint.path().trim_end_matches('/');
        let enc_path = format!("{base}{}", sigv4::uri_encode(path, true));
        let mut url = self.endpoint.clone();
        url.set_path("");
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => {
                return Err(StorageError::Backend(format!(
                    "{} has no host",
                    self.endpoint
                )))
            }
        };
        let q: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let query_string = {
            let mut parts: Vec<String> = q
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{}={}",
                        sigv4::uri_encode(k, false),
                        sigv4::uri_encode(v, false)
                    )
                })
                .collect();
            parts.sort();
            parts.join("&")
        };
        let full = format!(
            "{}://{host}{enc_path}{}{query_string}",
            url.scheme(),
            if query_string.is_empty() { "" } else { "?" }
        );
        let amz_date = sigv4::amz_date_now();
        let payload_hash = sigv4::sha256_hex(&body);
        let mut signed: Vec<(String, String)> = vec![
            ("host".into(), host.clone()),
            ("x-amz-date".into(), amz_date.clone()),
            ("x-amz-content-sha256".into(), payload_hash.clone()),
        ];
        for (n, v) in headers {
            signed.push((n.to_ascii_lowercase(), v.to_string()));
        }
        let canonical = Canonical {
            method: method.as_str(),
            path: &enc_path,
            query: &q,
            headers: &signed,
            payload_hash: &payload_hash,
        };
        let auth = sigv4::authorization(
            &self.creds.access_key,
            self.creds.secret_key.expose(),
            &amz_date,
            &self.region,
            &self.service,
            &canonical,
        );
        let mut req = self
            .http
            .request(method.clone(), &full)
            .header("authorization", auth);
        for (n, v) in &signed {
            if n != "host" {
                req = req.header(n.as_str(), v.as_str());
            }
        }
        let resp = req
            .body(body)
            .send()
            .await
            .map_err(|e| StorageError::Backend(format!("{} {}: {e}", method, self.endpoint)))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| StorageError::Backend(format!("{} {}: {e}", method, self.endpoint)))?
            .to_vec();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }
}

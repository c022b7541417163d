//! AWS Signature Version 4, both sides: signing the MinIO admin and IAM
//! requests, and verifying them in the fake admin server (the same
//! canonical-request code, so what one side writes the other must match;
//! the real clients in the tests keep both honest).

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Hex SHA-256 of the empty body.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

/// RFC 3986 encoding as S3 wants it: unreserved characters kept, everything
/// else `%XX` (space is `%20`); `/` kept when `keep_slash`.
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The parts of a request that SigV4 covers.
#[derive(Debug, Clone)]
pub struct Canonical<'a> {
    /// `GET`, `PUT`, ...
    pub method: &'a str,
    /// The path, already URI-encoded as it goes on the wire.
    pub path: &'a str,
    /// Decoded query parameters.
    pub query: &'a [(String, String)],
    /// The signed headers: lower-case names and values.
    pub headers: &'a [(String, String)],
    /// Hex SHA-256 of the body (or `UNSIGNED-PAYLOAD`).
    pub payload_hash: &'a str,
}

impl Canonical<'_> {
    /// The `SignedHeaders` value.
    pub fn signed_headers(&self) -> String {
        let mut names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names.join(";")
    }

    /// The canonical request text.
    pub fn request(&self) -> String {
        let mut q: Vec<(String, String)> = self
            .query
            .iter()
            .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
            .collect();
        q.sort();
        let query = q
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let mut h: Vec<(String, String)> = self
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.to_ascii_lowercase(),
                    v.split_whitespace().collect::<Vec<_>>().join(" "),
                )
            })
            .collect();
        h.sort();
        let mut headers = String::new();
        for (n, v) in &h {
            headers.push_str(&format!("{n}:{v}\n"));
        }
        let path = if self.path.is_empty() { "/" } else { self.path };
        format!(
            "{}\n{}\n{}\n{}\n{}\n{}",
            self.method,
            path,
            query,
            headers,
            self.signed_headers(),
            self.payload_hash
        )
    }
}

/// The signature of `canonical` for `secret` at `amz_date`
/// (`YYYYMMDDTHHMMSSZ`) in the scope `<date>/<region>/<service>/aws4_request`.
pub fn signature(
    secret: &str,
    amz_date: &str,
    region: &str,
    service: &str,
    canonical: &Canonical<'_>,
) -> String {
    let date = &amz_date[..amz_date.len().min(8)];
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical.request().as_bytes())
    );
    let k = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k = hmac(&k, region.as_bytes());
    let k = hmac(&k, service.as_bytes());
    let k = hmac(&k, b"aws4_request");
    hex::encode(hmac(&k, to_sign.as_bytes()))
}

/// The `Authorization` header value.
pub fn authorization(
    access_key: &str,
    secret: &str,
    amz_date: &str,
    region: &str,
    service: &str,
    canonical: &Canonical<'_>,
) -> String {
    let date = &amz_date[..amz_date.len().min(8)];
    format!(
        "AWS4-HMAC-SHA256 Credential={access_key}/{date}/{region}/{service}/aws4_request, SignedHeaders={}, Signature={}",
        canonical.signed_headers(),
        signature(secret, amz_date, region, service, canonical)
    )
}

/// A parsed `Authorization: AWS4-HMAC-SHA256 ...` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedAuthorization {
    /// The access key.
    pub access_key: String,
    /// `YYYYMMDD` of the scope.
    pub date: String,
    /// Region of the scope (may be empty: madmin signs with no region).
    pub region: String,
    /// Service of the scope.
    pub service: String,
    /// Signed header names.
    pub signed_headers: Vec<String>,
    /// The signature.
    pub signature: String,
}

/// Parses an `Authorization` header; `None` when it is not SigV4.
pub fn parse_authorization(value: &str) -> Option<ParsedAuthorization> {
    let rest = value.strip_prefix("AWS4-HMAC-SHA256")?.trim();
    let mut cred = None;
    let mut signed = None;
    let mut sig = None;
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            cred = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            sig = Some(v);
        }
    }
    let cred: Vec<&str> = cred?.split('/').collect();
    if cred.len() != 5 || cred[4] != "aws4_request" {
        return None;
    }
    Some(ParsedAuthorization {
        access_key: cred[0].to_string(),
        date: cred[1].to_string(),
        region: cred[2].to_string(),
        service: cred[3].to_string(),
        signed_headers: signed?.split(';').map(|s| s.to_string()).collect(),
        signature: sig?.to_string(),
    })
}

/// `YYYYMMDDTHHMMSSZ` for now.
pub fn amz_date_now() -> String {
    chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AWS documentation's example (IAM ListUsers, "Create a signed
    /// AWS API request"): a published known answer.
    #[test]
    fn aws_documentation_vector() {
        let query = vec![
            ("Action".to_string(), "ListUsers".to_string()),
            ("Version".to_string(), "2010-05-08".to_string()),
        ];
        let headers = vec![
            (
                "content-type".to_string(),
                "application/x-www-form-urlencoded; charset=utf-8".to_string(),
            ),
            ("host".to_string(), "iam.amazonaws.com".to_string()),
            ("x-amz-date".to_string(), "20150830T123600Z".to_string()),
        ];
        let c = Canonical {
            method: "GET",
            path: "/",
            query: &query,
            headers: &headers,
            payload_hash: EMPTY_SHA256,
        };
        assert_eq!(
            sha256_hex(c.request().as_bytes()),
            "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59"
        );
        assert_eq!(
            signature(
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                "20150830T123600Z",
                "us-east-1",
                "iam",
                &c
            ),
            "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
    }

    #[test]
    fn authorization_round_trip() {
        let c = Canonical {
            method: "PUT",
            path: "/minio/admin/v3/add-user",
            query: &[("accessKey".into(), "a b".into())],
            headers: &[("host".into(), "h:1".into())],
            payload_hash: EMPTY_SHA256,
        };
        let a = authorization("AK", "SK", "20260101T000000Z", "", "s3", &c);
        let p = parse_authorization(&a).unwrap();
        assert_eq!(p.access_key, "AK");
        assert_eq!(p.region, "");
        assert_eq!(p.signed_headers, vec!["host"]);
        assert_eq!(
            p.signature,
            signature("SK", "20260101T000000Z", "", "s3", &c)
        );
        assert!(c.request().contains("accessKey=a%20b"));
    }
}

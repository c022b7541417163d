//! An in-process fake of the MinIO admin API (the calls of
//! object-storage.md §1.3), for tests: it verifies SigV4 signatures and the
//! `X-Amz-Content-Sha256` body hash, decrypts and encrypts bodies as MinIO
//! does, and keeps users, policies and groups in memory. Its faithfulness
//! is checked against real admin clients (Python `minio`'s `MinioAdmin`,
//! Go `madmin-go` as Debian packages it). Besides the calls the backend
//! makes, it serves `list-users` (encrypted answer) and `group` for them.
//!
//! Attach/detach answer in the current protocol (200 + encrypted body)
//! when the request has `Content-Type: application/octet-stream`, in the
//! legacy one (201/204, empty) otherwise, as servers before 2023-06 did.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::{json, Value};
use vivian_core::storage::Credentials;
use warp::http::{HeaderMap, Method, StatusCode};
use warp::Filter;

use crate::sigv4::{self, Canonical};
use crate::sio;

/// A user of the fake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeUser {
    /// Its secret key.
    pub secret: String,
    /// `enabled` or `disabled`.
    pub status: String,
    /// Attached policies.
    pub policies: Vec<String>,
}

/// What the fake holds.
#[derive(Debug, Default)]
pub struct FakeState {
    /// Users by access key.
    pub users: BTreeMap<String, FakeUser>,
    /// Policies by name.
    pub policies: BTreeMap<String, Value>,
    /// Groups and their members.
    pub groups: BTreeMap<String, BTreeSet<String>>,
    /// Every call, as `METHOD path` (for tests).
    pub calls: Vec<String>,
    /// The `Host` headers of the authenticated calls (signed, since the
    /// signature must include `host`).
    pub hosts: BTreeSet<String>,
}

/// A running fake MinIO admin server.
pub struct FakeMinio {
    /// `http://127.0.0.1:<port>`.
    pub url: url::Url,
    /// Its state.
    pub state: Arc<Mutex<FakeState>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for FakeMinio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeMinio")
            .field("url", &self.url.as_str())
            .finish()
    }
}

/// `user-info`'s JSON for a user.
fn user_info(st: &FakeState, ak: &str, u: &FakeUser) -> Value {
    let member_of: Vec<&String> = st
        .groups
        .iter()
        .filter(|(_, m)| m.contains(ak))
        .map(|(g, _)| g)
        .collect();
    let mut v = json!({"policyName": u.policies.join(","), "status": u.status, "updatedAt": "2026-01-01T00:00:00Z"});
    if !member_of.is_empty() {
        v["memberOf"] = json!(member_of);
    }
    v
}

struct Server {
    root: Credentials,
    state: Arc<Mutex<FakeState>>,
}

fn error(status: StatusCode, code: &str, message: &str) -> warp::reply::Response {
    let body = json!({"Code": code, "Message": message, "Resource": "", "RequestId": "fake", "HostId": "fake"});
    warp::http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(body.to_string().into())
        .unwrap()
}

fn reply(status: StatusCode, body: Vec<u8>) -> warp::reply::Response {
    warp::http::Response::builder()
        .status(status)
        .body(body.into())
        .unwrap()
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

impl Server {
    fn secret_of(&self, ak: &str) -> Option<String> {
        if ak == self.root.access_key {
            return Some(self.root.secret_key.expose().to_string());
        }
        let st = self.state.lock().unwrap();
        st.users.get(ak).map(|u| u.secret.clone())
    }

    /// Checks the signature; returns the caller's access key and secret.
    fn authenticate(
        &self,
        method: &Method,
        path: &str,
        query: &[(String, String)],
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(String, String), Box<warp::reply::Response>> {
        let denied = |code: &str, m: &str| Err(Box::new(error(StatusCode::FORBIDDEN, code, m)));
        let Some(hash) = headers
            .get("x-amz-content-sha256")
            .and_then(|v| v.to_str().ok())
        else {
            return denied("AccessDenied", "Access Denied.");
        };
        if hash != sigv4::sha256_hex(body) {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                "XAmzContentSHA256Mismatch",
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
            )));
        }
        let Some(auth) = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(sigv4::parse_authorization)
        else {
            return denied("AccessDenied", "Access Denied.");
        };
        let Some(secret) = self.secret_of(&auth.access_key) else {
            return denied(
                "InvalidAccessKeyId",
                "The Access Key Id you provided does not exist in our records.",
            );
        };
        let Some(date) = headers.get("x-amz-date").and_then(|v| v.to_str().ok()) else {
            return denied("AccessDenied", "Missing X-Amz-Date.");
        };
        if !auth.signed_headers.iter().any(|h| h == "host") {
            return denied("AccessDenied", "Host is not signed.");
        }
        let mut signed = Vec::new();
        for h in &auth.signed_headers {
            let v = headers
                .get(h.as_str())
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            signed.push((h.clone(), v.to_string()));
        }
        let c = Canonical {
            method: method.as_str(),
            path,
            query,
            headers: &signed,
            payload_hash: hash,
        };
        let expected = sigv4::signature(&secret, date, &auth.region, &auth.service, &c);
        if expected != auth.signature {
            return denied(
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            );
        }
        Ok((auth.access_key, secret))
    }

    fn handle(
        &self,
        method: Method,
        path: String,
        raw_query: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> warp::reply::Response {
        let query: Vec<(String, String)> = raw_query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (decode(k), decode(v))
            })
            .collect();
        let q = |name: &str| {
            query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let Some(call) = path.strip_prefix("/minio/admin/v3/") else {
            if path.starts_with("/minio/admin/") {
                return error(
                    StatusCode::UPGRADE_REQUIRED,
                    "XMinioAdminVersionMismatch",
                    "This 'admin' API is not supported by server in 'mode-server-xl'",
                );
            }
            return error(StatusCode::NOT_FOUND, "NotImplemented", "not an admin call");
        };
        let (caller, secret) = match self.authenticate(&method, &path, &query, &headers, &body) {
            Ok(c) => c,
            Err(r) => return *r,
        };
        let call = call.to_string();
        {
            let mut st = self.state.lock().unwrap();
            st.calls.push(format!("{method} {call}"));
            let host = headers.get("host").and_then(|v| v.to_str().ok());
            st.hosts.insert(host.unwrap_or("").to_string());
        }
        let is_root = caller == self.root.access_key;
        // A user may only read its own user-info.
        if !(is_root || (call == "user-info" && q("accessKey") == caller)) {
            return error(StatusCode::FORBIDDEN, "AccessDenied", "Access Denied.");
        }
        let bad_json = || {
            error(
                StatusCode::BAD_REQUEST,
                "XMinioAdminConfigBadJSON",
                "JSON configuration provided is of incorrect format",
            )
        };
        let mut st = self.state.lock().unwrap();
        match (method.as_str(), call.as_str()) {
            ("GET", "info") => reply(
                StatusCode::OK,
                json!({"mode": "online"}).to_string().into_bytes(),
            ),
            ("PUT", "add-user") => {
                let ak = q("accessKey");
                let Ok(plain) = sio::decrypt(&secret, &body) else {
                    return bad_json();
                };
                let Ok(v) = serde_json::from_slice::<Value>(&plain) else {
                    return bad_json();
                };
                let Some(sk) = v["secretKey"].as_str() else {
                    return bad_json();
                };
                if ak.len() < 3 || sk.len() < 8 {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "XMinioAdminInvalidArgument",
                        "access key or secret key too short",
                    );
                }
                let status = v["status"].as_str().unwrap_or("enabled").to_string();
                let policies = st
                    .users
                    .get(&ak)
                    .map(|u| u.policies.clone())
                    .unwrap_or_default();
                st.users.insert(
                    ak,
                    FakeUser {
                        secret: sk.to_string(),
                        status,
                        policies,
                    },
                );
                reply(StatusCode::OK, vec![])
            }
            ("DELETE", "remove-user") => {
                let ak = q("accessKey");
                if st.users.remove(&ak).is_none() {
                    return error(
                        StatusCode::NOT_FOUND,
                        "XMinioAdminNoSuchUser",
                        "The specified user does not exist.",
                    );
                }
                for members in st.groups.values_mut() {
                    members.remove(&ak);
                }
                reply(StatusCode::OK, vec![])
            }
            ("GET", "user-info") => {
                let ak = q("accessKey");
                let Some(u) = st.users.get(&ak) else {
                    return error(
                        StatusCode::NOT_FOUND,
                        "XMinioAdminNoSuchUser",
                        "The specified user does not exist.",
                    );
                };
                let v = user_info(&st, &ak, u);
                reply(StatusCode::OK, v.to_string().into_bytes())
            }
            ("GET", "list-users") => {
                // Encrypted with the caller's secret, as MinIO does.
                let all: serde_json::Map<String, Value> = st
                    .users
                    .iter()
                    .map(|(ak, u)| (ak.clone(), user_info(&st, ak, u)))
                    .collect();
                reply(
                    StatusCode::OK,
                    sio::encrypt(
                        &secret,
                        Value::Object(all).to_string().as_bytes(),
                        sio::Algorithm::Argon2idAesGcm,
                    ),
                )
            }
            ("GET", "group") => {
                let name = q("group");
                let Some(members) = st.groups.get(&name) else {
                    return error(
                        StatusCode::NOT_FOUND,
                        "XMinioAdminNoSuchGroup",
                        "The specified group does not exist.",
                    );
                };
                let v = json!({"name": name, "status": "enabled", "members": members, "policy": "", "updatedAt": "2026-01-01T00:00:00Z"});
                reply(StatusCode::OK, v.to_string().into_bytes())
            }
            ("PUT", "update-group-members") => {
                let Ok(v) = serde_json::from_slice::<Value>(&body) else {
                    return bad_json();
                };
                let (Some(group), Some(members)) = (v["group"].as_str(), v["members"].as_array())
                else {
                    return bad_json();
                };
                let mut names = Vec::new();
                for m in members {
                    let Some(m) = m.as_str() else {
                        return bad_json();
                    };
                    if !st.users.contains_key(m) {
                        return error(
                            StatusCode::NOT_FOUND,
                            "XMinioAdminNoSuchUser",
                            "The specified user does not exist.",
                        );
                    }
                    names.push(m.to_string());
                }
                if v["isRemove"].as_bool() == Some(true) {
                    let Some(g) = st.groups.get_mut(group) else {
                        return error(
                            StatusCode::NOT_FOUND,
                            "XMinioAdminNoSuchGroup",
                            "The specified group does not exist.",
                        );
                    };
                    for n in names {
                        g.remove(&n);
                    }
                } else {
                    st.groups
                        .entry(group.to_string())
                        .or_default()
                        .extend(names);
                }
                reply(StatusCode::OK, vec![])
            }
            ("PUT", "add-canned-policy") => {
                let name = q("name");
                if body.is_empty() || name.is_empty() {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "XMinioAdminInvalidArgument",
                        "policy name and body are required",
                    );
                }
                let Ok(v) = serde_json::from_slice::<Value>(&body) else {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "XMinioMalformedPolicy",
                        "policy is not JSON",
                    );
                };
                if v["Statement"].as_array().is_none() {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "XMinioMalformedPolicy",
                        "policy has no Statement",
                    );
                }
                st.policies.insert(name, v);
                reply(StatusCode::OK, vec![])
            }
            ("DELETE", "remove-canned-policy") => {
                let name = q("name");
                if st.policies.remove(&name).is_none() {
                    return error(
                        StatusCode::NOT_FOUND,
                        "XMinioAdminNoSuchPolicy",
                        "The canned policy does not exist.",
                    );
                }
                for u in st.users.values_mut() {
                    u.policies.retain(|p| p != &name);
                }
                reply(StatusCode::OK, vec![])
            }
            ("POST", "idp/builtin/policy/attach") | ("POST", "idp/builtin/policy/detach") => {
                let attach = call.ends_with("attach");
                let modern = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v == "application/octet-stream");
                let Ok(plain) = sio::decrypt(&secret, &body) else {
                    return bad_json();
                };
                let Ok(v) = serde_json::from_slice::<Value>(&plain) else {
                    return bad_json();
                };
                let Some(user) = v["user"].as_str().map(str::to_string) else {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "XMinioAdminInvalidArgument",
                        "exactly one of user and group is required",
                    );
                };
                let policies: Vec<String> = v["policies"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|p| p.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                for p in &policies {
                    if !st.policies.contains_key(p) {
                        return error(
                            StatusCode::NOT_FOUND,
                            "XMinioAdminNoSuchPolicy",
                            "The canned policy does not exist.",
                        );
                    }
                }
                let Some(u) = st.users.get_mut(&user) else {
                    return error(
                        StatusCode::NOT_FOUND,
                        "XMinioAdminNoSuchUser",
                        "The specified user does not exist.",
                    );
                };
                let mut changed = Vec::new();
                for p in policies {
                    let has = u.policies.contains(&p);
                    if attach && !has {
                        u.policies.push(p.clone());
                        changed.push(p);
                    } else if !attach && has {
                        u.policies.retain(|x| x != &p);
                        changed.push(p);
                    }
                }
                if changed.is_empty() {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "XMinioAdminPolicyChangeAlreadyApplied",
                        "The specified policy change is already in effect.",
                    );
                }
                if modern {
                    let key = if attach {
                        "policiesAttached"
                    } else {
                        "policiesDetached"
                    };
                    let answer = json!({key: changed, "updatedAt": "2026-01-01T00:00:00Z"});
                    reply(
                        StatusCode::OK,
                        sio::encrypt(
                            &secret,
                            answer.to_string().as_bytes(),
                            sio::Algorithm::Argon2idAesGcm,
                        ),
                    )
                } else if attach {
                    reply(StatusCode::CREATED, vec![])
                } else {
                    reply(StatusCode::NO_CONTENT, vec![])
                }
            }
            _ => error(
                StatusCode::BAD_REQUEST,
                "InvalidRequest",
                "unknown admin call",
            ),
        }
    }
}

impl FakeMinio {
    /// Starts the fake on 127.0.0.1 with the root credentials `root`.
    pub async fn start(root: Credentials) -> std::io::Result<FakeMinio> {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let server = Arc::new(Server {
            root,
            state: state.clone(),
        });
        let route = warp::method()
            .and(warp::path::full())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .map(
                move |m: Method, p: warp::path::FullPath, q: String, h: HeaderMap, b: Bytes| {
                    server.handle(m, p.as_str().to_string(), q, h, b)
                },
            );
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(
            warp::serve(route)
                .incoming(listener)
                .graceful(async move {
                    let _ = rx.await;
                })
                .run(),
        );
        Ok(FakeMinio {
            url: format!("http://{addr}").parse().expect("a valid URL"),
            state,
            stop: Some(tx),
            task: Some(task),
        })
    }

    /// Adds a user directly (a submitter, say), in `groups`.
    pub fn add_user(&self, access_key: &str, secret: &str, groups: &[&str]) {
        let mut st = self.state.lock().unwrap();
        st.users.insert(
            access_key.to_string(),
            FakeUser {
                secret: secret.to_string(),
                status: "enabled".into(),
                policies: vec![],
            },
        );
        for g in groups {
            st.groups
                .entry(g.to_string())
                .or_default()
                .insert(access_key.to_string());
        }
    }

    /// Stops the server.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for FakeMinio {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

//! A fake GitLab for the tests: a warp app implementing the runner
//! endpoints Vivian uses, with GitLab's status codes and JSON shapes.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Reply};

pub const REGISTRATION_TOKEN: &str = "glpat-registration-0001";
pub const ACCESS_TOKEN: &str = "glpat-readonly-access-0002";

/// A runner as the fake holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeRunner {
    pub id: u64,
    pub token: String,
    pub description: String,
    pub tags: Vec<String>,
    pub maximum_timeout: Option<u64>,
    pub runner_type: String,
    pub group_id: Option<u64>,
    pub project_id: Option<u64>,
    pub run_untagged: bool,
}

#[derive(Default)]
pub struct FakeState {
    pub next_id: u64,
    pub runners: BTreeMap<u64, FakeRunner>,
    /// Answer 503 to everything.
    pub down: bool,
    /// Answer 429 (with Retry-After: 0) to this many next requests.
    pub throttle: u32,
    /// Requests seen, as "METHOD path".
    pub requests: Vec<String>,
}

/// The fake server; stops when dropped.
pub struct FakeGitlab {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<FakeState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGitlab {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json_reply(status: StatusCode, body: serde_json::Value) -> Response {
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

fn runner_json(r: &FakeRunner) -> serde_json::Value {
    json!({
        "active": true,
        "paused": false,
        "architecture": null,
        "description": r.description,
        "id": r.id,
        "ip_address": null,
        "is_shared": r.runner_type == "instance_type",
        "runner_type": r.runner_type,
        "contacted_at": null,
        "maintenance_note": null,
        "name": null,
        "online": false,
        "status": "never_contacted",
        "platform": null,
        "projects": [],
        "revision": null,
        "tag_list": r.tags,
        "version": null,
        "access_level": "not_protected",
        "maximum_timeout": r.maximum_timeout,
        "run_untagged": r.run_untagged,
        "locked": false
    })
}

impl FakeGitlab {
    pub async fn start() -> FakeGitlab {
        let state: Arc<Mutex<FakeState>> = Arc::new(Mutex::new(FakeState {
            next_id: 100,
            ..Default::default()
        }));
        let st = state.clone();
        let with_state = warp::any().map(move || st.clone());

        // Outage / throttling / request log, before any route.
        let gate = warp::method()
            .and(warp::path::full())
            .and(with_state.clone())
            .and_then(
                |m: warp::http::Method, p: warp::path::FullPath, st: Arc<Mutex<FakeState>>| async move {
                    let mut s = st.lock().unwrap();
                    s.requests.push(format!("{m} {}", p.as_str()));
                    if s.down {
                        return Err(warp::reject::custom(Down));
                    }
                    if s.throttle > 0 {
                        s.throttle -= 1;
                        return Err(warp::reject::custom(Throttled));
                    }
                    Ok::<_, warp::Rejection>(())
                },
            )
            .untuple_one();

        let create = warp::post()
            .and(warp::path!("api" / "v4" / "user" / "runners"))
            .and(warp::header::optional::<String>("private-token"))
            .and(warp::body::form::<HashMap<String, String>>())
            .and(with_state.clone())
            .map(
                |tok: Option<String>, form: HashMap<String, String>, st: Arc<Mutex<FakeState>>| {
                    if tok.as_deref() != Some(REGISTRATION_TOKEN) {
                        return json_reply(StatusCode::UNAUTHORIZED, json!({"message": "401 Unauthorized"}));
                    }
                    let rt = form.get("runner_type").cloned().unwrap_or_default();
                    let id_of = |k: &str| form.get(k).and_then(|v| v.parse::<u64>().ok());
                    match rt.as_str() {
                        "instance_type" => {}
                        "group_type" if id_of("group_id").is_some() => {}
                        "project_type" if id_of("project_id").is_some() => {}
                        "group_type" | "project_type" => {
                            return json_reply(
                                StatusCode::BAD_REQUEST,
                                json!({"message": "400 Bad request - missing group_id or project_id"}),
                            )
                        }
                        _ => {
                            return json_reply(
                                StatusCode::BAD_REQUEST,
                                json!({"error": "runner_type does not have a valid value"}),
                            )
                        }
                    }
                    let mut s = st.lock().unwrap();
                    s.next_id += 1;
                    let id = s.next_id;
                    let token = format!("glrt-fake{id:06}");
                    let tags = form
                        .get("tag_list")
                        .map(|t| {
                            t.split(',')
                                .filter(|x| !x.is_empty())
                                .map(|x| x.trim().to_string())
                                .collect()
                        })
                        .unwrap_or_default();
                    s.runners.insert(
                        id,
                        FakeRunner {
                            id,
                            token: token.clone(),
                            description: form.get("description").cloned().unwrap_or_default(),
                            tags,
                            maximum_timeout: id_of("maximum_timeout"),
                            runner_type: rt,
                            group_id: id_of("group_id"),
                            project_id: id_of("project_id"),
                            run_untagged: form.get("run_untagged").map(|v| v == "true").unwrap_or(true),
                        },
                    );
                    json_reply(
                        StatusCode::CREATED,
                        json!({"id": id, "token": token, "token_expires_at": null}),
                    )
                },
            );

        let verify = warp::post()
            .and(warp::path!("api" / "v4" / "runners" / "verify"))
            .and(warp::body::form::<HashMap<String, String>>())
            .and(with_state.clone())
            .map(|form: HashMap<String, String>, st: Arc<Mutex<FakeState>>| {
                let s = st.lock().unwrap();
                let tok = form.get("token").cloned().unwrap_or_default();
                match s.runners.values().find(|r| r.token == tok) {
                    Some(r) => json_reply(
                        StatusCode::OK,
                        json!({"id": r.id, "token": r.token, "token_expires_at": null}),
                    ),
                    None => json_reply(StatusCode::FORBIDDEN, json!({"message": "403 Forbidden"})),
                }
            });

        let details = warp::get()
            .and(warp::path!("api" / "v4" / "runners" / u64))
            .and(warp::header::optional::<String>("private-token"))
            .and(with_state.clone())
            .map(|id: u64, tok: Option<String>, st: Arc<Mutex<FakeState>>| {
                if tok.as_deref() != Some(ACCESS_TOKEN) {
                    return json_reply(
                        StatusCode::UNAUTHORIZED,
                        json!({"message": "401 Unauthorized"}),
                    );
                }
                let s = st.lock().unwrap();
                match s.runners.get(&id) {
                    Some(r) => json_reply(StatusCode::OK, runner_json(r)),
                    None => json_reply(
                        StatusCode::NOT_FOUND,
                        json!({"message": "404 Runner Not Found"}),
                    ),
                }
            });

        let delete = warp::delete()
            .and(warp::path!("api" / "v4" / "runners"))
            .and(warp::body::form::<HashMap<String, String>>())
            .and(with_state.clone())
            .map(|form: HashMap<String, String>, st: Arc<Mutex<FakeState>>| {
                let mut s = st.lock().unwrap();
                let tok = form.get("token").cloned().unwrap_or_default();
                let id = s.runners.values().find(|r| r.token == tok).map(|r| r.id);
                match id {
                    Some(id) => {
                        s.runners.remove(&id);
                        StatusCode::NO_CONTENT.into_response()
                    }
                    None => json_reply(StatusCode::FORBIDDEN, json!({"message": "403 Forbidden"})),
                }
            });

        let routes = gate
            .and(
                create
                    .or(verify)
                    .unify()
                    .or(details)
                    .unify()
                    .or(delete)
                    .unify(),
            )
            .recover(|r: warp::Rejection| async move {
                if r.find::<Down>().is_some() {
                    return Ok::<_, std::convert::Infallible>(json_reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"message": "503 Service Unavailable"}),
                    ));
                }
                if r.find::<Throttled>().is_some() {
                    let mut resp = json_reply(
                        StatusCode::TOO_MANY_REQUESTS,
                        json!({"message": "Retry later"}),
                    );
                    resp.headers_mut()
                        .insert("retry-after", warp::http::HeaderValue::from_static("0"));
                    return Ok(resp);
                }
                Ok(json_reply(
                    StatusCode::NOT_FOUND,
                    json!({"error": "404 Not Found"}),
                ))
            });

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(warp::serve(routes).incoming(listener).run());
        FakeGitlab { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn runners(&self) -> Vec<FakeRunner> {
        self.state
            .lock()
            .unwrap()
            .runners
            .values()
            .cloned()
            .collect()
    }

    pub fn runner_by_description(&self, d: &str) -> Option<FakeRunner> {
        self.runners().into_iter().find(|r| r.description == d)
    }

    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    pub fn throttle(&self, n: u32) {
        self.state.lock().unwrap().throttle = n;
    }

    pub fn delete_runner(&self, id: u64) {
        self.state.lock().unwrap().runners.remove(&id);
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

#[derive(Debug)]
struct Down;
impl warp::reject::Reject for Down {}

#[derive(Debug)]
struct Throttled;
impl warp::reject::Reject for Throttled {}

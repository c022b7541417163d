//! An in-process fake executor for the client tests: a small warp app that
//! accepts `POST /api/v1/jobs` (multipart), records what it got, answers as
//! told and connects back to the client speaking the real v1 protocol
//! (`vivian_core::protocol`), plus the two DUT listing endpoints.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Buf;
use futures::{StreamExt, TryStreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use vivian_core::job::JobStatus;
use vivian_core::protocol::{
    read_message, write_message, ControlMessage, JobBucket, Message, Payload, SessionEnd, Severity,
};
use warp::Filter;

/// One step of what the fake executor does on the callback connection.
#[derive(Debug, Clone)]
pub enum Step {
    /// Send a control message.
    Ctrl(String, u32, Value),
    /// Send console bytes.
    Io(Vec<u8>),
    /// Send raw bytes (possibly a broken frame).
    Raw(Vec<u8>),
    /// Send `session_end`.
    End(JobStatus, Option<JobBucket>),
    /// Wait until the client sent exactly these bytes as job_io.
    ExpectInput(Vec<u8>),
    /// Wait that long.
    Sleep(u64),
}

/// A part of a recorded submission.
#[derive(Debug, Clone)]
pub struct PartRecord {
    pub name: String,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: Vec<u8>,
}

/// A recorded submission.
#[derive(Debug, Clone)]
pub struct Submission {
    pub peer: Option<SocketAddr>,
    pub parts: Vec<PartRecord>,
}

impl Submission {
    pub fn part(&self, name: &str) -> Option<&PartRecord> {
        self.parts.iter().find(|p| p.name == name)
    }

    pub fn metadata(&self) -> Value {
        serde_json::from_slice(&self.part("metadata").expect("metadata part").data)
            .expect("metadata JSON")
    }
}

#[derive(Default)]
struct State {
    /// Replies given before accepting: (HTTP status, JSON body).
    refusals: VecDeque<(u16, Value)>,
    /// Whether to connect back after accepting.
    connect_back: bool,
    script: Vec<Step>,
    submissions: Vec<Submission>,
    /// job_io bytes received from the client.
    input: Vec<u8>,
    /// The script ran to its end.
    script_done: bool,
}

/// The fake executor; stops when dropped.
pub struct FakeExecutor {
    pub url: String,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeExecutor {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeExecutor {
    /// Starts a fake executor on 127.0.0.1 (free port) that refuses with
    /// `refusals` first, then accepts and runs `script` on the callback
    /// connection (or does not connect back when `connect_back` is false).
    pub async fn start(
        refusals: Vec<(u16, Value)>,
        connect_back: bool,
        script: Vec<Step>,
    ) -> FakeExecutor {
        let state = Arc::new(Mutex::new(State {
            refusals: refusals.into(),
            connect_back,
            script,
            ..Default::default()
        }));
        let st = state.clone();
        let jobs = warp::post()
            .and(warp::path!("api" / "v1" / "jobs"))
            .and(warp::addr::remote())
            .and(warp::multipart::form().max_length(64 * 1024 * 1024))
            .and_then(
                move |peer: Option<SocketAddr>, form: warp::multipart::FormData| {
                    let st = st.clone();
                    async move {
                        let parts: Vec<PartRecord> = form
                            .then(|part| async move {
                                let part = part.expect("multipart part");
                                let name = part.name().to_string();
                                let filename = part.filename().map(str::to_string);
                                let content_type = part.content_type().map(str::to_string);
                                let data: Vec<u8> = part
                                    .stream()
                                    .try_fold(Vec::new(), |mut acc, mut buf| async move {
                                        while buf.has_remaining() {
                                            let chunk = buf.chunk().to_vec();
                                            buf.advance(chunk.len());
                                            acc.extend_from_slice(&chunk);
                                        }
                                        Ok(acc)
                                    })
                                    .await
                                    .expect("part data");
                                PartRecord {
                                    name,
                                    filename,
                                    content_type,
                                    data,
                                }
                            })
                            .collect()
                            .await;
                        let sub = Submission { peer, parts };
                        let (refusal, connect, script) = {
                            let mut s = st.lock().unwrap();
                            s.submissions.push(sub.clone());
                            (s.refusals.pop_front(), s.connect_back, s.script.clone())
                        };
                        if let Some((code, body)) = refusal {
                            let status = warp::http::StatusCode::from_u16(code).unwrap();
                            return Ok::<_, warp::Rejection>(warp::reply::with_status(
                                warp::reply::json(&body),
                                status,
                            ));
                        }
                        if connect {
                            let meta = sub.metadata();
                            let host = meta["callback"]["host"]
                                .as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|| peer.expect("peer").ip().to_string());
                            let port =
                                meta["callback"]["port"].as_u64().expect("callback port") as u16;
                            let st = st.clone();
                            tokio::spawn(async move { run_script(&host, port, script, st).await });
                        }
                        Ok(warp::reply::with_status(
                            warp::reply::json(&json!({"version": 1, "error_msg": null})),
                            warp::http::StatusCode::OK,
                        ))
                    }
                },
            );
        let duts = warp::get().and(warp::path!("api" / "v1" / "duts")).map(|| {
            warp::reply::json(&json!({"duts": {
                "52:54:00:11:22:0a": {"id": "52:54:00:11:22:0a", "full_name": "farm-gfx10-1", "state": "IDLE", "ip_address": "10.42.0.10", "comment": null, "tags": ["gfx10"]},
                "52:54:00:11:22:0b": {"id": "52:54:00:11:22:0b", "full_name": "farm-gfx10-2", "state": "RUNNING", "ip_address": "10.42.0.11", "comment": "new fan"}
            }}))
        });
        let dut = warp::get()
            .and(warp::path!("api" / "v1" / "dut" / String))
            .map(|id: String| {
                if id == "52:54:00:11:22:0a" {
                    warp::reply::with_status(
                        warp::reply::json(
                            &json!({"id": id, "full_name": "farm-gfx10-1", "state": "IDLE"}),
                        ),
                        warp::http::StatusCode::OK,
                    )
                } else {
                    warp::reply::with_status(
                        warp::reply::json(&json!({"error": format!("Unknown DUT '{id}'")})),
                        warp::http::StatusCode::NOT_FOUND,
                    )
                }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(warp::serve(jobs.or(duts).or(dut)).incoming(listener).run());
        FakeExecutor {
            url: format!("http://{addr}/"),
            state,
            server,
        }
    }

    pub fn submissions(&self) -> Vec<Submission> {
        self.state.lock().unwrap().submissions.clone()
    }

    pub fn input(&self) -> Vec<u8> {
        self.state.lock().unwrap().input.clone()
    }

    pub fn script_done(&self) -> bool {
        self.state.lock().unwrap().script_done
    }
}

async fn run_script(host: &str, port: u16, script: Vec<Step>, st: Arc<Mutex<State>>) {
    let stream = TcpStream::connect((host, port))
        .await
        .expect("connect back to the client");
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        while let Ok(Some(m)) = read_message(&mut rd).await {
            if let Payload::JobIo(d) = m.payload {
                if tx.send(d).is_err() {
                    break;
                }
            }
        }
    });
    for step in script {
        match step {
            Step::Ctrl(text, tag, metadata) => {
                let msg = Message::new(Payload::Control(ControlMessage {
                    msg: text,
                    severity: Severity::Info,
                    tag,
                    metadata: metadata.as_object().cloned().unwrap_or_default(),
                }));
                write_message(&mut wr, &msg).await.unwrap();
            }
            Step::Io(data) => write_message(&mut wr, &Message::job_io(data))
                .await
                .unwrap(),
            Step::Raw(data) => {
                use tokio::io::AsyncWriteExt;
                wr.write_all(&data).await.unwrap();
            }
            Step::End(status, job_bucket) => {
                let msg = Message::new(Payload::SessionEnd(SessionEnd {
                    status,
                    joules_consumed: None,
                    job_bucket,
                }));
                write_message(&mut wr, &msg).await.unwrap();
            }
            Step::ExpectInput(want) => {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                loop {
                    if st.lock().unwrap().input == want {
                        break;
                    }
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(d)) => st.lock().unwrap().input.extend_from_slice(&d),
                        _ => panic!(
                            "the client did not send {want:?} (got {:?})",
                            st.lock().unwrap().input
                        ),
                    }
                }
            }
            Step::Sleep(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    }
    st.lock().unwrap().script_done = true;
    // Half-close, then keep the socket open a little for the client to read.
    use tokio::io::AsyncWriteExt;
    let _ = wr.shutdown().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// A minimal job file in `dir`.
pub fn write_job(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("job.yml");
    std::fs::write(
        &p,
        "version: 1\ntarget: {tags: []}\nconsole_patterns: {}\ndeployment:\n  start:\n    kernel: {url: \"http://h/k\"}\n",
    )
    .unwrap();
    p
}

/// The standard session: a control line, console bytes in two frames, the verdict.
pub fn standard_script(status: JobStatus) -> Vec<Step> {
    vec![
        Step::Ctrl("+0.001s: Boot the machine\n".into(), 0, json!({})),
        Step::Io(b"[    0.000000] Linux version 6.1".to_vec()),
        Step::Io(b" (vivian)\r\nJOB_RESULT=0\r\n".to_vec()),
        Step::Ctrl(
            "+1.500s: Matched the following patterns: job_success\n".into(),
            401,
            json!({"patterns": ["job_success"], "line": "JOB_RESULT=0\r\n"}),
        ),
        Step::End(status, None),
    ]
}

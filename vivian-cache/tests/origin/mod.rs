//! A local HTTP/1.1 origin for the artifact cache's tests and benchmark,
//! on 127.0.0.1, that can be told to be slow, to drop the connection
//! mid-body, to answer `304`, to change its ETag, to fail with a status
//! and to go down. It records every request it answers.
//!
//! Shared by `vivian-cache/tests`, `vivian-cache/benches` and the
//! executor's `bins/tests/artifacts.rs` (included with `#[path]`).

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// One file of the origin.
#[derive(Debug, Clone, Default)]
pub struct Resource {
    /// The body.
    pub body: Arc<Vec<u8>>,
    /// `ETag` (with its quotes), if any.
    pub etag: Option<String>,
    /// `Last-Modified`, if any.
    pub last_modified: Option<String>,
    /// `Cache-Control`, if any.
    pub cache_control: Option<String>,
}

impl Resource {
    /// A body with an ETag and a `Cache-Control`.
    pub fn new(body: impl Into<Vec<u8>>, etag: &str, cache_control: &str) -> Self {
        Resource {
            body: Arc::new(body.into()),
            etag: Some(format!("\"{etag}\"")),
            last_modified: Some("Wed, 21 Oct 2015 07:28:00 GMT".into()),
            cache_control: Some(cache_control.into()),
        }
    }
}

/// What the origin is told to do.
#[derive(Debug, Clone, Default)]
pub struct Knobs {
    /// Pause before the response head.
    pub head_delay: Duration,
    /// Pause after each 64 KiB of body.
    pub chunk_delay: Duration,
    /// Close the connection after this many body bytes of a response...
    pub drop_after: Option<u64>,
    /// ... this many times.
    pub drops_left: u32,
    /// Answer every request with this status and no body.
    pub status: Option<u16>,
    /// Never answer 304 (a server without conditional requests).
    pub no_conditional: bool,
}

/// One answered request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// Request path.
    pub path: String,
    /// Status answered.
    pub status: u16,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// Whether it carried `If-None-Match` or `If-Modified-Since`.
    pub conditional: bool,
    /// Body bytes sent.
    pub body_bytes: u64,
}

#[derive(Default)]
struct State {
    files: Mutex<HashMap<String, Resource>>,
    knobs: Mutex<Knobs>,
    hits: Mutex<Vec<Hit>>,
}

/// The running origin. Dropping it stops it.
pub struct Origin {
    addr: SocketAddr,
    state: Arc<State>,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(h) = self.server.lock().unwrap().take() {
            h.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Origin {
    /// Starts an origin on a free port of 127.0.0.1.
    pub async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let server = tokio::spawn(serve(listener, state.clone()));
        Origin {
            addr,
            state,
            server: Mutex::new(Some(server)),
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Adds or replaces a file.
    pub fn put(&self, path: &str, r: Resource) {
        lock(&self.state.files).insert(path.to_string(), r);
    }

    /// Changes a file's body and ETag (a new version).
    pub fn change(&self, path: &str, body: impl Into<Vec<u8>>, etag: &str) {
        let mut f = lock(&self.state.files);
        let r = f.get_mut(path).expect("known file");
        r.body = Arc::new(body.into());
        r.etag = Some(format!("\"{etag}\""));
        r.last_modified = Some("Thu, 22 Oct 2015 07:28:00 GMT".into());
    }

    /// The knobs, to change them.
    pub fn knobs(&self) -> MutexGuard<'_, Knobs> {
        lock(&self.state.knobs)
    }

    /// Every request answered so far.
    pub fn hits(&self) -> Vec<Hit> {
        lock(&self.state.hits).clone()
    }

    /// Requests for `path` answered with `status`.
    pub fn count(&self, path: &str, status: u16) -> usize {
        lock(&self.state.hits)
            .iter()
            .filter(|h| h.path == path && h.status == status)
            .count()
    }

    /// Body bytes sent for `path`.
    pub fn bytes_sent(&self, path: &str) -> u64 {
        lock(&self.state.hits)
            .iter()
            .filter(|h| h.path == path)
            .map(|h| h.body_bytes)
            .sum()
    }

    /// Forgets the recorded requests.
    pub fn clear_hits(&self) {
        lock(&self.state.hits).clear();
    }

    /// Stops listening and closes every connection: requests are refused.
    pub async fn go_down(&self) {
        let h = lock(&self.server).take();
        if let Some(h) = h {
            h.abort();
            let _ = h.await;
        }
    }

    /// Listens again on the same port.
    pub async fn come_up(&self) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        *lock(&self.server) = Some(tokio::spawn(serve(listener, self.state.clone())));
    }
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    // Connections live in the set: aborting the server task drops the set,
    // which aborts them (the origin "goes down" at once).
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            a = listener.accept() => {
                if let Ok((s, _)) = a {
                    let _ = s.set_nodelay(true);
                    conns.spawn(connection(s, state.clone()));
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

struct Req {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Req> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let mut lines = head.split("\r\n");
            let mut first = lines.next()?.split_whitespace();
            let method = first.next()?.to_string();
            let path = first.next()?.to_string();
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect();
            return Some(Req {
                method,
                path,
                headers,
            });
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let mut tmp = [0u8; 4096];
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

async fn connection(mut s: TcpStream, state: Arc<State>) {
    let mut buf = Vec::new();
    while let Some(req) = read_head(&mut s, &mut buf).await {
        if !answer(&mut s, &req, &state).await {
            return;
        }
    }
}

/// Answers one request; false when the connection must close.
async fn answer(s: &mut TcpStream, req: &Req, state: &State) -> bool {
    let knobs = lock(&state.knobs).clone();
    let res = lock(&state.files).get(&req.path).cloned();
    if !knobs.head_delay.is_zero() {
        tokio::time::sleep(knobs.head_delay).await;
    }
    let record = |status: u16, body_bytes: u64| {
        lock(&state.hits).push(Hit {
            path: req.path.clone(),
            status,
            range: req.header("range").map(String::from),
            conditional: req.header("if-none-match").is_some()
                || req.header("if-modified-since").is_some(),
            body_bytes,
        });
    };
    if let Some(st) = knobs.status {
        record(st, 0);
        let head = format!("HTTP/1.1 {st} Oops\r\ncontent-length: 0\r\n\r\n");
        return s.write_all(head.as_bytes()).await.is_ok();
    }
    let Some(r) = res else {
        record(404, 0);
        return s
            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            .await
            .is_ok();
    };
    let mut meta = String::new();
    if let Some(e) = &r.etag {
        meta.push_str(&format!("etag: {e}\r\n"));
    }
    if let Some(l) = &r.last_modified {
        meta.push_str(&format!("last-modified: {l}\r\n"));
    }
    if let Some(c) = &r.cache_control {
        meta.push_str(&format!("cache-control: {c}\r\n"));
    }
    meta.push_str("accept-ranges: bytes\r\ncontent-type: application/octet-stream\r\n");
    // Conditional requests.
    if !knobs.no_conditional {
        let inm = req.header("if-none-match");
        let ims = req.header("if-modified-since");
        let not_modified = match (inm, &r.etag) {
            (Some(v), Some(e)) => v.split(',').any(|t| t.trim() == e || t.trim() == "*"),
            (Some(_), None) => false,
            (None, _) => ims.is_some() && ims == r.last_modified.as_deref(),
        };
        if not_modified {
            record(304, 0);
            let head = format!("HTTP/1.1 304 Not Modified\r\n{meta}\r\n");
            return s.write_all(head.as_bytes()).await.is_ok();
        }
    }
    let size = r.body.len() as u64;
    // Range, honoured when If-Range (if any) matches the current version.
    let if_range_ok = match req.header("if-range") {
        None => true,
        Some(v) => Some(v) == r.etag.as_deref() || Some(v) == r.last_modified.as_deref(),
    };
    let range = req
        .header("range")
        .filter(|_| if_range_ok)
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| {
            let start: u64 = a.parse().ok()?;
            let end: u64 = if b.is_empty() {
                size.checked_sub(1)?
            } else {
                b.parse().ok()?
            };
            (start <= end && end < size).then_some((start, end))
        });
    let (status, start, end) = match range {
        Some((a, b)) => (206u16, a, b + 1),
        None => (200u16, 0, size),
    };
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-length: {}\r\n{meta}",
        if status == 206 {
            "Partial Content"
        } else {
            "OK"
        },
        end - start
    );
    if status == 206 {
        head.push_str(&format!(
            "content-range: bytes {start}-{}/{size}\r\n",
            end - 1
        ));
    }
    head.push_str("\r\n");
    if s.write_all(head.as_bytes()).await.is_err() {
        record(status, 0);
        return false;
    }
    if req.method == "HEAD" {
        record(status, 0);
        return true;
    }
    let drop_at = match knobs.drop_after {
        Some(n) if knobs.drops_left > 0 => Some(n),
        _ => None,
    };
    let step: usize = if knobs.chunk_delay.is_zero() && drop_at.is_none() {
        4 << 20
    } else {
        64 << 10
    };
    let mut sent = 0u64;
    let mut pos = start as usize;
    while pos < end as usize {
        let mut n = step.min(end as usize - pos);
        if let Some(d) = drop_at {
            if sent >= d {
                lock(&state.knobs).drops_left -= 1;
                record(status, sent);
                // Close without finishing: the client sees a short body.
                let _ = s.shutdown().await;
                return false;
            }
            n = n.min((d - sent) as usize).max(1);
        }
        if s.write_all(&r.body[pos..pos + n]).await.is_err() {
            record(status, sent);
            return false;
        }
        pos += n;
        sent += n as u64;
        if !knobs.chunk_delay.is_zero() {
            tokio::time::sleep(knobs.chunk_delay).await;
        }
    }
    record(status, sent);
    true
}

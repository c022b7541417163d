//! The network half of the cache: freshness decisions, revalidation and
//! resumable downloads. Called with the entry's lock held.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;
use http_cache_semantics::{AfterResponse, BeforeRequest, CacheOptions, CachePolicy};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use crate::store::{Meta, Partial};
use crate::{CacheError, FetchOutcome, Fetched, Inner};

/// The request the cache makes for `url`, as the cache rules see it.
fn request_for(url: &str, headers: &HeaderMap) -> http::request::Parts {
    let mut parts = http::Request::get(url)
        .body(())
        .expect("a normalised URL is a valid URI")
        .into_parts()
        .0;
    parts.headers = headers.clone();
    parts
}

fn response_parts(status: StatusCode, headers: &HeaderMap) -> http::response::Parts {
    let mut parts = http::Response::builder()
        .status(status)
        .body(())
        .expect("a status is a valid response")
        .into_parts()
        .0;
    parts.headers = headers.clone();
    parts
}

fn cache_options() -> CacheOptions {
    // A private cache: job artifacts marked `private` (e.g. behind a CI
    // token) are still the job's to cache.
    CacheOptions {
        shared: false,
        ..CacheOptions::default()
    }
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
}

/// A strong validator usable in `If-Range`: a strong `ETag`, else
/// `Last-Modified`.
fn if_range_validator(h: &HeaderMap) -> Option<String> {
    match header_str(h, header::ETAG) {
        Some(e) if !e.starts_with("W/") => Some(e),
        _ => header_str(h, header::LAST_MODIFIED),
    }
}

/// `Content-Range: bytes <start>-<end>/<total|*>` → (start, end, total).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (s, e) = range.split_once('-')?;
    let total = if total.trim() == "*" {
        None
    } else {
        Some(total.trim().parse().ok()?)
    };
    Some((s.trim().parse().ok()?, e.trim().parse().ok()?, total))
}

fn headers_vec(h: &HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

fn headers_map(v: &[(String, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, val) in v {
        if let (Ok(k), Ok(val)) = (
            header::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(val),
        ) {
            h.append(k, val);
        }
    }
    h
}

fn is_transient(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

pub(crate) async fn fetch_locked(
    inner: &Inner,
    url: &str,
    key: &str,
) -> Result<Fetched, CacheError> {
    let store = &inner.store;
    let now = SystemTime::now();
    let existing = store.read_meta(key).filter(|m| m.url == url);
    let Some(meta) = existing else {
        return download(inner, url, key, None).await;
    };
    let plain = request_for(url, &HeaderMap::new());
    let conditional = match meta.policy.before_request(&plain, now) {
        BeforeRequest::Fresh(_) => {
            store.touch(key, &meta);
            tracing::debug!(url, "artifact cache: fresh hit");
            return Ok(Fetched {
                key: key.to_string(),
                url: url.to_string(),
                size: meta.size,
                outcome: FetchOutcome::Hit,
            });
        }
        BeforeRequest::Stale { request, .. } => request.headers,
    };
    tracing::debug!(url, "artifact cache: stale entry, revalidating");
    let stale = |reason: String| {
        tracing::warn!(
            url,
            "artifact cache: the origin cannot revalidate the stale entry ({reason}): using it"
        );
        store.touch(key, &meta);
        Ok(Fetched {
            key: key.to_string(),
            url: url.to_string(),
            size: meta.size,
            outcome: FetchOutcome::StaleOriginError { reason },
        })
    };
    let may_stale = inner.config.serve_stale_on_error && meta.may_serve_stale();
    let resp = match inner
        .client
        .get(url)
        .headers(conditional.clone())
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) if may_stale => return stale(error_chain(&e)),
        Err(e) => {
            return Err(CacheError::Unreachable {
                url: url.to_string(),
                reason: error_chain(&e),
            })
        }
    };
    let status = resp.status();
    if status == StatusCode::NOT_MODIFIED {
        let req = request_for(url, &conditional);
        let res = response_parts(status, resp.headers());
        match meta.policy.after_response(&req, &res, SystemTime::now()) {
            AfterResponse::NotModified(policy, parts) => {
                let mut m = meta.clone();
                m.policy = policy;
                m.validated_at = SystemTime::now();
                m.etag = header_str(&parts.headers, header::ETAG).or(m.etag);
                m.last_modified =
                    header_str(&parts.headers, header::LAST_MODIFIED).or(m.last_modified);
                m.cache_control = header_str(&parts.headers, header::CACHE_CONTROL);
                store.write_meta(key, &m).map_err(|e| e.with_url(url))?;
                store.touch(key, &m);
                tracing::debug!(url, "artifact cache: revalidated (304)");
                return Ok(Fetched {
                    key: key.to_string(),
                    url: url.to_string(),
                    size: m.size,
                    outcome: FetchOutcome::Revalidated,
                });
            }
            AfterResponse::Modified(..) => {
                // A 304 for another version than ours: download afresh.
                tracing::info!(
                    url,
                    "artifact cache: 304 with another validator: downloading"
                );
                return download(inner, url, key, None).await;
            }
        }
    }
    if status == StatusCode::OK {
        tracing::info!(
            url,
            "artifact cache: the origin has a new version: downloading"
        );
        return download(inner, url, key, Some(resp)).await;
    }
    if is_transient(status) && may_stale {
        return stale(format!("HTTP {}", status.as_u16()));
    }
    if is_transient(status) {
        // No usable stale copy: a full download with retries.
        return download(inner, url, key, None).await;
    }
    Err(CacheError::Status {
        url: url.to_string(),
        status: status.as_u16(),
    })
}

/// The error and its causes, on one line (reqwest's own message is terse).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Downloads `url` into the entry's partial body (resuming what is there
/// when the origin allows it), then publishes it. `first` is a `200`
/// response already received (from a revalidation).
async fn download(
    inner: &Inner,
    url: &str,
    key: &str,
    mut first: Option<reqwest::Response>,
) -> Result<Fetched, CacheError> {
    let store = &inner.store;
    let cfg = &inner.config;
    let dir = store.entry_dir(key);
    std::fs::create_dir_all(&dir).map_err(|e| CacheError::io(&dir, e).with_url(url))?;
    let partial_path = store.partial_path(key);
    // Resume state: (state, bytes on disk).
    let mut state: Option<(Partial, u64)> = if first.is_some() {
        None
    } else {
        store.read_partial(key, url)
    };
    if let Some((_, len)) = &state {
        tracing::info!(
            url,
            bytes = len,
            "artifact cache: resuming a partial download"
        );
    }
    let mut attempts = 0u32;
    let mut received_now = 0u64;
    let mut resumes_now = 0u32;
    let mut last_error = String::new();
    let mut progress = true;
    loop {
        if attempts >= cfg.attempts.max(1) {
            let (received, expected) = state
                .as_ref()
                .map(|(p, l)| (*l, p.total))
                .unwrap_or((0, None));
            return Err(if received > 0 {
                CacheError::Interrupted {
                    url: url.to_string(),
                    attempts,
                    received,
                    expected,
                    reason: last_error,
                }
            } else {
                CacheError::Unreachable {
                    url: url.to_string(),
                    reason: format!("{last_error} (after {attempts} attempts)"),
                }
            });
        }
        if attempts > 0 && !progress {
            tokio::time::sleep(cfg.retry_delay).await;
        }
        progress = false;
        let resp = match first.take() {
            Some(r) => {
                attempts += 1;
                r
            }
            None => {
                let mut headers = HeaderMap::new();
                let resuming = match &state {
                    Some((p, len)) if *len > 0 && p.validator.is_some() => {
                        let v = p.validator.as_deref().unwrap_or_default();
                        if let (Ok(r), Ok(v)) = (
                            HeaderValue::from_str(&format!("bytes={len}-")),
                            HeaderValue::from_str(v),
                        ) {
                            headers.insert(header::RANGE, r);
                            headers.insert(header::IF_RANGE, v);
                            true
                        } else {
                            false
                        }
                    }
                    _ => false,
                };
                if !resuming {
                    state = None;
                }
                attempts += 1;
                match inner.client.get(url).headers(headers).send().await {
                    Ok(r) => r,
                    Err(e) => {
                        last_error = error_chain(&e);
                        tracing::warn!(
                            url,
                            attempt = attempts,
                            "artifact cache: request failed: {last_error}"
                        );
                        continue;
                    }
                }
            }
        };
        let status = resp.status();
        let offset = match status {
            StatusCode::OK => {
                let headers = resp.headers();
                let p = Partial {
                    url: url.to_string(),
                    headers: headers_vec(headers),
                    response_time: SystemTime::now(),
                    validator: if_range_validator(headers),
                    total: resp.content_length(),
                    resumes: 0,
                };
                store.write_partial(key, &p).map_err(|e| e.with_url(url))?;
                state = Some((p, 0));
                0
            }
            StatusCode::PARTIAL_CONTENT if state.is_some() => {
                let (p, len) = state.as_ref().expect("checked");
                let range = header_str(resp.headers(), header::CONTENT_RANGE)
                    .as_deref()
                    .and_then(parse_content_range);
                match range {
                    Some((start, _end, total))
                        if start == *len
                            && (p.total.is_none() || total.is_none() || total == p.total) =>
                    {
                        let mut p = p.clone();
                        p.resumes += 1;
                        p.total = p.total.or(total);
                        resumes_now += 1;
                        inner.counters.resumes.fetch_add(1, Ordering::Relaxed);
                        store.write_partial(key, &p).map_err(|e| e.with_url(url))?;
                        tracing::info!(url, from = start, "artifact cache: resuming with Range");
                        let len = *len;
                        state = Some((p, len));
                        len
                    }
                    other => {
                        // Not the range asked for: start over.
                        last_error = format!("unexpected Content-Range {other:?}");
                        store.discard_partial(key);
                        state = None;
                        continue;
                    }
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE if state.is_some() => {
                let (p, len) = state.as_ref().expect("checked");
                if p.total == Some(*len) {
                    // Everything is already there.
                    return publish(inner, url, key, received_now, resumes_now).await;
                }
                last_error = "the origin refused the resume range (416)".into();
                store.discard_partial(key);
                state = None;
                continue;
            }
            s if is_transient(s) => {
                last_error = format!("HTTP {}", s.as_u16());
                tracing::warn!(
                    url,
                    attempt = attempts,
                    "artifact cache: origin error {}",
                    s.as_u16()
                );
                continue;
            }
            s => {
                return Err(CacheError::Status {
                    url: url.to_string(),
                    status: s.as_u16(),
                })
            }
        };

        // Stream the body to the partial file from `offset`.
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&partial_path)
            .await
            .map_err(|e| CacheError::io(&partial_path, e).with_url(url))?;
        let mut file = file;
        file.set_len(offset)
            .await
            .map_err(|e| CacheError::io(&partial_path, e).with_url(url))?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| CacheError::io(&partial_path, e).with_url(url))?;
        let mut w = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut len = offset;
        let total = state.as_ref().and_then(|(p, _)| p.total);
        let mut resp = resp;
        let mut broke = None;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if total.is_some_and(|t| len + chunk.len() as u64 > t) {
                        store.discard_partial(key);
                        return Err(CacheError::Corrupt {
                            url: url.to_string(),
                            reason: format!(
                                "the origin sent more than the {} bytes it announced",
                                total.unwrap_or_default()
                            ),
                        });
                    }
                    w.write_all(&chunk)
                        .await
                        .map_err(|e| CacheError::io(&partial_path, e).with_url(url))?;
                    len += chunk.len() as u64;
                    received_now += chunk.len() as u64;
                    inner
                        .counters
                        .bytes_downloaded
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    progress = true;
                }
                Ok(None) => break,
                Err(e) => {
                    broke = Some(error_chain(&e));
                    break;
                }
            }
        }
        w.flush()
            .await
            .map_err(|e| CacheError::io(&partial_path, e).with_url(url))?;
        let file = w.into_inner();
        file.sync_all()
            .await
            .map_err(|e| CacheError::io(&partial_path, e).with_url(url))?;
        drop(file);
        if let Some((_, l)) = state.as_mut() {
            *l = len;
        }
        if let Some(reason) = broke {
            last_error = reason;
            tracing::warn!(
                url,
                bytes = len,
                attempt = attempts,
                "artifact cache: transfer broke: {last_error}"
            );
            continue;
        }
        if let Some(t) = total {
            if len < t {
                last_error = format!("the connection closed after {len} of {t} bytes");
                tracing::warn!(url, attempt = attempts, "artifact cache: {last_error}");
                continue;
            }
        }
        return publish(inner, url, key, received_now, resumes_now).await;
    }
}

/// Turns the complete partial body into the published entry.
async fn publish(
    inner: &Inner,
    url: &str,
    key: &str,
    received: u64,
    resumes_now: u32,
) -> Result<Fetched, CacheError> {
    let store = &inner.store;
    let (p, len) = store
        .read_partial(key, url)
        .ok_or_else(|| CacheError::Corrupt {
            url: url.to_string(),
            reason: "the resume state of the download vanished".into(),
        })?;
    let headers = headers_map(&p.headers);
    let req = request_for(url, &HeaderMap::new());
    let res = response_parts(StatusCode::OK, &headers);
    let policy = CachePolicy::new_options(&req, &res, p.response_time, cache_options());
    let now = SystemTime::now();
    let meta = Meta {
        url: url.to_string(),
        body: String::new(),
        size: len,
        policy,
        fetched_at: now,
        validated_at: p.response_time,
        resumes: p.resumes,
        content_type: header_str(&headers, header::CONTENT_TYPE),
        etag: header_str(&headers, header::ETAG),
        last_modified: header_str(&headers, header::LAST_MODIFIED),
        cache_control: header_str(&headers, header::CACHE_CONTROL),
    };
    // Renames and a metadata write: the body itself was synced already.
    let meta = store.publish(key, meta).map_err(|e| e.with_url(url))?;
    tracing::info!(
        url,
        key,
        bytes = len,
        resumes = p.resumes,
        resumed_now = resumes_now,
        "artifact cache: downloaded"
    );
    Ok(Fetched {
        key: key.to_string(),
        url: url.to_string(),
        size: meta.size,
        outcome: FetchOutcome::Downloaded {
            bytes: received,
            resumes: p.resumes,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            parse_content_range("bytes 10-19/20"),
            Some((10, 19, Some(20)))
        );
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, 0, None)));
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes x-1/2"), None);
    }

    #[test]
    fn if_range_prefers_a_strong_etag() {
        let mut h = HeaderMap::new();
        h.insert(
            header::LAST_MODIFIED,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        h.insert(header::ETAG, HeaderValue::from_static("W/\"weak\""));
        assert_eq!(
            if_range_validator(&h).as_deref(),
            Some("Wed, 21 Oct 2015 07:28:00 GMT")
        );
        h.insert(header::ETAG, HeaderValue::from_static("\"strong\""));
        assert_eq!(if_range_validator(&h).as_deref(), Some("\"strong\""));
    }
}

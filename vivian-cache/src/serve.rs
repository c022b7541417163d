//! Serving cache entries over HTTP (`GET`/`HEAD`, single byte ranges),
//! independent of the server framework: [`respond`] gives an
//! `http::Response` whose body is a stream of file chunks.

use std::io::{Seek, SeekFrom};
use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::EntryFile;

/// Size of the chunks read from the body file.
pub const CHUNK_SIZE: usize = 1 << 20;

/// A response body: file chunks.
pub type BodyStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send + Sync>>;

/// What a `Range` header asks of a body of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No (usable) range: the whole body, `200`.
    Full,
    /// Bytes `start..=end`, `206`.
    Partial {
        /// First byte.
        start: u64,
        /// Last byte (inclusive).
        end: u64,
    },
    /// A range past the end: `416`.
    Unsatisfiable,
}

/// Interprets a `Range` header for a body of `size` bytes. Only single
/// byte ranges are honoured (`bytes=a-b`, `bytes=a-`, `bytes=-n`); a
/// malformed header or a multi-range request gets the whole body, as RFC
/// 9110 allows.
pub fn parse_range(range: Option<&str>, size: u64) -> RangeAnswer {
    let Some(spec) = range.and_then(|r| r.trim().strip_prefix("bytes=")) else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeAnswer::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix: the last n bytes.
        let Ok(n) = b.parse::<u64>() else {
            return RangeAnswer::Full;
        };
        if n == 0 || size == 0 {
            return RangeAnswer::Unsatisfiable;
        }
        let n = n.min(size);
        return RangeAnswer::Partial {
            start: size - n,
            end: size - 1,
        };
    }
    let Ok(start) = a.parse::<u64>() else {
        return RangeAnswer::Full;
    };
    let end = if b.is_empty() {
        size.saturating_sub(1)
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e.min(size.saturating_sub(1)),
            _ => return RangeAnswer::Full,
        }
    };
    if start >= size {
        return RangeAnswer::Unsatisfiable;
    }
    RangeAnswer::Partial { start, end }
}

/// A stream of `len` bytes of `file` from `start`, in chunks of
/// [`CHUNK_SIZE`].
pub fn body_stream(mut file: std::fs::File, start: u64, len: u64) -> std::io::Result<BodyStream> {
    use tokio::io::AsyncReadExt;
    file.seek(SeekFrom::Start(start))?;
    let reader = tokio::fs::File::from_std(file).take(len);
    Ok(Box::pin(tokio_util::io::ReaderStream::with_capacity(
        reader, CHUNK_SIZE,
    )))
}

/// The answer to a `GET` (or, with `head`, `HEAD`) of `entry`, honouring
/// `Range` (and `If-Range` with the entry's ETag). The body is `None` for
/// `HEAD` and `416`.
pub fn respond(
    entry: EntryFile,
    head: bool,
    range: Option<&str>,
    if_range: Option<&str>,
) -> std::io::Result<Response<Option<BodyStream>>> {
    let size = entry.size;
    // If-Range with another validator than ours: the whole body.
    let range = match if_range {
        Some(v) if v.trim() != entry.etag => None,
        _ => range,
    };
    let answer = parse_range(range, size);
    let mut b = Response::builder()
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, &entry.etag)
        .header(
            header::CONTENT_TYPE,
            entry
                .content_type
                .as_deref()
                .and_then(|c| HeaderValue::from_str(c).ok())
                .unwrap_or(HeaderValue::from_static("application/octet-stream")),
        );
    if let Some(lm) = entry
        .last_modified
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        b = b.header(header::LAST_MODIFIED, lm);
    }
    let (status, start, len) = match answer {
        RangeAnswer::Full => (StatusCode::OK, 0, size),
        RangeAnswer::Partial { start, end } => {
            b = b.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        RangeAnswer::Unsatisfiable => {
            return Ok(b
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .header(header::CONTENT_LENGTH, 0)
                .body(None)
                .expect("valid response"));
        }
    };
    b = b.status(status).header(header::CONTENT_LENGTH, len);
    let body = if head {
        None
    } else {
        Some(body_stream(entry.file, start, len)?)
    };
    Ok(b.body(body).expect("valid response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeAnswer::*;
        let p = |start, end| Partial { start, end };
        let cases: &[(Option<&str>, u64, RangeAnswer)] = &[
            (None, 10, Full),
            (Some("bytes=0-4"), 10, p(0, 4)),
            (Some("bytes=5-"), 10, p(5, 9)),
            (Some("bytes=5-100"), 10, p(5, 9)),
            (Some("bytes=-3"), 10, p(7, 9)),
            (Some("bytes=-30"), 10, p(0, 9)),
            (Some("bytes=10-"), 10, Unsatisfiable),
            (Some("bytes=-0"), 10, Unsatisfiable),
            (Some("bytes=4-2"), 10, Full),
            (Some("bytes=0-1,3-4"), 10, Full),
            (Some("items=0-1"), 10, Full),
            (Some("bytes=x-"), 10, Full),
            (Some("bytes=0-"), 0, Unsatisfiable),
        ];
        for (h, size, want) in cases {
            assert_eq!(parse_range(*h, *size), *want, "{h:?} of {size}");
        }
    }
}

//! Request bodies: size limits, content types and strict JSON objects.

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde_json::{Map, Value};
use std::pin::Pin;

use super::error::ApiError;

/// The body of a request, not read yet.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// Size limit of a JSON request body.
pub const JSON_BODY_LIMIT: usize = 64 * 1024;

/// How much of an oversized body is read and dropped before answering 413.
const DRAIN_LIMIT: usize = 1024 * 1024;

/// Reads the whole body, refusing (413) once it exceeds `limit`.
pub async fn read_limited(mut body: BodyStream, limit: usize) -> Result<Bytes, ApiError> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::bad_request(format!("Cannot read the request body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            // Read (and drop) a moderately larger body to its end, so the
            // client gets the 413 instead of a reset while it still sends;
            // give up on anything bigger (the connection is then closed).
            let mut seen = buf.len() + chunk.len();
            drop(buf);
            while seen <= DRAIN_LIMIT {
                match body.next().await {
                    Some(Ok(c)) => seen += c.len(),
                    _ => break,
                }
            }
            return Err(ApiError::payload_too_large(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// The media type of a Content-Type header value, lower case, without
/// parameters.
pub fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Reads a JSON object body: checks the content type (absent or
/// `application/json`, else 415), the size (413) and that the body is one
/// JSON object (400 naming the position of a syntax error).
pub async fn json_object(
    content_type: Option<&str>,
    body: BodyStream,
) -> Result<Map<String, Value>, ApiError> {
    if let Some(ct) = content_type {
        let mt = media_type(ct);
        if mt != "application/json" && !mt.ends_with("+json") {
            return Err(ApiError::unsupported_media_type(ct, "application/json"));
        }
    }
    let bytes = read_limited(body, JSON_BODY_LIMIT).await?;
    parse_json_object(&bytes)
}

/// Parses `bytes` as one JSON object.
pub fn parse_json_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::bad_request(
            "The request body is empty: expected a JSON object",
        ));
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("The request body is not valid JSON: {e}")))?;
    match value {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::bad_request(format!(
            "The request body must be a JSON object, not {}",
            json_type_name(&other)
        ))),
    }
}

pub use vivian_core::farm::field::json_type_name;

/// Typed accessors that name the field and the expected type on error.
pub mod field {
    use super::*;

    use vivian_core::farm::field as core;

    fn wrong(name: &str, expected: &str, v: &Value) -> ApiError {
        core::wrong(name, expected, v).into()
    }

    /// A string.
    pub fn string(name: &str, v: &Value) -> Result<String, ApiError> {
        Ok(core::get_string(name, v)?)
    }

    /// A string or null.
    pub fn opt_string(name: &str, v: &Value) -> Result<Option<String>, ApiError> {
        Ok(core::get_opt_string(name, v)?)
    }

    /// A boolean.
    pub fn boolean(name: &str, v: &Value) -> Result<bool, ApiError> {
        Ok(core::get_bool(name, v)?)
    }

    /// A finite number (integer or float).
    pub fn number(name: &str, v: &Value) -> Result<f64, ApiError> {
        v.as_f64()
            .filter(|f| f.is_finite())
            .ok_or_else(|| wrong(name, "a number", v))
    }

    /// A list of strings.
    pub fn string_list(name: &str, v: &Value) -> Result<Vec<String>, ApiError> {
        Ok(core::get_tags(name, v)?)
    }

    /// A string or an integer, as a string (PDU port ids).
    pub fn string_or_int(name: &str, v: &Value) -> Result<String, ApiError> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
            _ => Err(wrong(name, "a string or an integer", v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_of(chunks: Vec<&'static [u8]>) -> BodyStream {
        Box::pin(futures::stream::iter(
            chunks.into_iter().map(|c| Ok(Bytes::from_static(c))),
        ))
    }

    #[tokio::test]
    async fn body_over_the_limit_is_413() {
        let e = read_limited(stream_of(vec![b"12345", b"678"]), 6)
            .await
            .unwrap_err();
        assert_eq!(e.status.as_u16(), 413);
        assert_eq!(
            read_limited(stream_of(vec![b"123", b"456"]), 6)
                .await
                .unwrap()
                .as_ref(),
            b"123456"
        );
    }

    #[tokio::test]
    async fn content_type_is_checked() {
        let e = json_object(Some("text/plain"), stream_of(vec![b"{}"]))
            .await
            .unwrap_err();
        assert_eq!(e.status.as_u16(), 415);
        assert!(json_object(
            Some("application/json; charset=utf-8"),
            stream_of(vec![b"{}"])
        )
        .await
        .is_ok());
        assert!(json_object(None, stream_of(vec![b"{}"])).await.is_ok());
    }

    #[test]
    fn non_objects_and_bad_json_are_400() {
        for body in [&b"[]"[..], b"1", b"{", b"", b"\"x\"", b"{\"a\":}"] {
            let e = parse_json_object(body).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{body:?}");
        }
    }

    #[test]
    fn field_errors_name_the_field() {
        let e = field::string("comment", &Value::Bool(true)).unwrap_err();
        assert_eq!(
            e.message,
            "The field 'comment' must be a string, not a boolean"
        );
        let e = field::number("pdu_off_delay", &Value::String("x".into())).unwrap_err();
        assert!(e.message.contains("pdu_off_delay"));
        let e = field::string_list("tags", &serde_json::json!(["a", 1])).unwrap_err();
        assert!(e.message.contains("item 1"));
        assert_eq!(
            field::string_or_int("port_id", &serde_json::json!(3)).unwrap(),
            "3"
        );
    }
}

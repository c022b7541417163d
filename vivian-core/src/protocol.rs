//! The client ↔ executor protocol, version 1 (EX C.1-C.3), without I/O.
//!
//! * **Submission**: `POST /api/v1/jobs` as `multipart/form-data` with a
//!   `metadata` JSON part ([`SubmissionMetadata`]), the raw `job` text and
//!   an optional tarball part; the reply is parsed by
//!   [`submission_error_message`].
//! * **Callback stream**: the executor connects back to the client and both
//!   sides exchange frames: a 4-byte big-endian length, then that many bytes
//!   of UTF-8 JSON `{"msg_type", "date", "payload"}` ([`Message`]).
//!   `job_io` payloads are [`base85`] text.
//!
//! Encoding is byte-identical to the reference's Python (`", "` and `": "`
//! separators, non-ASCII escaped as `\uXXXX`). Decoding accepts any valid
//! JSON. Nothing here panics on any input; frames are bounded by
//! [`MAX_FRAME_LEN`]. [`FrameDecoder`] is a sans-I/O decoder; [`read_message`]
//! and [`write_message`] drive it over any tokio reader/writer.

use std::collections::BTreeMap;
use std::io;

use chrono::{DateTime, Timelike, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::job::{Deadline, JobStatus, Target};

/// Largest frame accepted or produced (16 MiB).
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Name of the metadata part of a submission.
pub const PART_METADATA: &str = "metadata";
/// Name of the job part of a submission.
pub const PART_JOB: &str = "job";
/// Name of the optional tarball part (initial state of the job bucket).
pub const PART_TARBALL: &str = "job_bucket_initial_state_tarball_file";
/// Content type of the metadata part.
pub const MIME_METADATA: &str = "application/json";
/// Content type of the job part.
pub const MIME_JOB: &str = "application/x-yaml";
/// Content type of the tarball part.
pub const MIME_TARBALL: &str = "application/octet-stream";

/// The reference's message for a connection closed inside a frame.
pub const EOF_MID_FRAME: &str =
    "The connection got interrupted before receiving the end of the message";

/// Why a frame or message could not be decoded or encoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The peer closed the connection inside a frame.
    #[error("{EOF_MID_FRAME}")]
    Truncated,
    /// A frame announced more than [`MAX_FRAME_LEN`] bytes.
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN} bytes")]
    FrameTooLarge(usize),
    /// The frame is not UTF-8 JSON of the expected shape.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A well-formed message of a type this side does not know. The frame
    /// was consumed, so the stream can go on.
    #[error("unknown message type '{0}'")]
    UnknownType(String),
    /// A `job_io` payload is not valid base85.
    #[error("invalid job_io payload: {0}")]
    Base85(#[from] base85::Base85Error),
    /// Reading or writing failed.
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
}

impl ProtocolError {
    /// Whether the stream is still in sync after this error (the faulty
    /// frame was consumed whole), so the reader may skip it and go on.
    pub fn is_recoverable(&self) -> bool {
        matches!(
            self,
            ProtocolError::Malformed(_) | ProtocolError::UnknownType(_) | ProtocolError::Base85(_)
        )
    }
}

/// Severity of a control message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Debugging detail (never sent by the reference).
    Debug = 0,
    /// Information.
    Info = 1,
    /// Warning.
    Warn = 2,
    /// Error.
    Error = 3,
}

impl Severity {
    fn from_i64(v: i64) -> Option<Severity> {
        Some(match v {
            0 => Severity::Debug,
            1 => Severity::Info,
            2 => Severity::Warn,
            3 => Severity::Error,
            _ => return None,
        })
    }
}

/// Control message tags (V2025). Unknown tags read as [`tag::NO_TAG`].
pub mod tag {
    /// No tag.
    pub const NO_TAG: u32 = 0;
    /// Infrastructure setup started.
    pub const JOB_INFRA_SETUP_START: u32 = 100;
    /// Infrastructure setup complete.
    pub const JOB_INFRA_SETUP_COMPLETE: u32 = 101;
    /// Infrastructure setup failed.
    pub const JOB_INFRA_SETUP_ERROR: u32 = 102;
    /// Teardown started.
    pub const JOB_INFRA_TEARDOWN_START: u32 = 105;
    /// Teardown complete.
    pub const JOB_INFRA_TEARDOWN_COMPLETE: u32 = 106;
    /// The PDU port started power cycling.
    pub const PDU_PORT_POWER_CYCLING_START: u32 = 200;
    /// The PDU port finished power cycling.
    pub const PDU_PORT_POWER_CYCLING_COMPLETE: u32 = 201;
    /// The DUT's power sequence was detected.
    pub const DUT_POWER_SEQUENCE_DETECTED: u32 = 300;
    /// The DUT's firmware finished booting.
    pub const DUT_FIRMWARE_BOOT_COMPLETE: u32 = 301;
    /// A timeout expired; metadata `{"timeout": {name, seconds, retries, retried, is_retrying}}`.
    pub const TIMEOUT_HIT: u32 = 400;
    /// Console patterns matched; metadata `{patterns, line}`.
    pub const DUT_CONSOLE_PATTERN_MATCHED: u32 = 401;

    /// Every known tag.
    pub const ALL: [u32; 12] = [0, 100, 101, 102, 105, 106, 200, 201, 300, 301, 400, 401];
}

/// A `ctrl` message (executor → client).
#[derive(Debug, Clone, PartialEq)]
pub struct ControlMessage {
    /// The text, conventionally `+<seconds>s: <text>\n`.
    pub msg: String,
    /// Its severity.
    pub severity: Severity,
    /// Its tag (see [`tag`]); unknown tags read as 0.
    pub tag: u32,
    /// Structured details.
    pub metadata: Map<String, Value>,
}

/// Where the client can fetch the job bucket after the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobBucket {
    /// `http://<user>:<pass>@<host>:<port>`.
    pub minio_access_url: String,
    /// The bucket.
    pub bucket_name: String,
}

/// A `session_end` message (executor → client).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionEnd {
    /// The verdict.
    pub status: JobStatus,
    /// Energy used by the DUT during the job, if measured.
    pub joules_consumed: Option<f64>,
    /// The job bucket, when the client may download it.
    pub job_bucket: Option<JobBucket>,
}

/// What a message carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// `ctrl`.
    Control(ControlMessage),
    /// `job_io`: raw console bytes (executor → client) or keystrokes
    /// (client → executor).
    JobIo(Vec<u8>),
    /// `session_end`.
    SessionEnd(SessionEnd),
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// When it was created.
    pub date: DateTime<Utc>,
    /// What it carries.
    pub payload: Payload,
}

impl Message {
    /// A message dated now.
    pub fn new(payload: Payload) -> Self {
        Message {
            date: Utc::now(),
            payload,
        }
    }

    /// A control message dated now, with no tag nor metadata.
    pub fn control(msg: impl Into<String>, severity: Severity) -> Self {
        Self::new(Payload::Control(ControlMessage {
            msg: msg.into(),
            severity,
            tag: tag::NO_TAG,
            metadata: Map::new(),
        }))
    }

    /// A `job_io` message dated now.
    pub fn job_io(data: impl Into<Vec<u8>>) -> Self {
        Self::new(Payload::JobIo(data.into()))
    }

    /// A `session_end` message dated now, without energy nor bucket.
    pub fn session_end(status: JobStatus) -> Self {
        Self::new(Payload::SessionEnd(SessionEnd {
            status,
            joules_consumed: None,
            job_bucket: None,
        }))
    }

    /// The `msg_type` of this message.
    pub fn msg_type(&self) -> &'static str {
        match self.payload {
            Payload::Control(_) => "ctrl",
            Payload::JobIo(_) => "job_io",
            Payload::SessionEnd(_) => "session_end",
        }
    }

    /// The JSON document of this message, as Python's `json.dumps` writes it.
    pub fn to_json(&self) -> Vec<u8> {
        let payload = match &self.payload {
            Payload::Control(c) => json!({
                "msg": c.msg,
                "severity": c.severity as u8,
                "tag": c.tag,
                "metadata": c.metadata,
            }),
            Payload::JobIo(data) => Value::String(base85::encode(data)),
            Payload::SessionEnd(s) => {
                let mut m =
                    json!({"status": s.status.as_str(), "joules_consumed": s.joules_consumed});
                if let (Some(b), Some(obj)) = (&s.job_bucket, m.as_object_mut()) {
                    obj.insert(
                        "job_bucket".into(),
                        json!({"minio_access_url": b.minio_access_url, "bucket_name": b.bucket_name}),
                    );
                }
                m
            }
        };
        let doc = json!({"msg_type": self.msg_type(), "date": python_isoformat(&self.date), "payload": payload});
        python_json(&doc)
    }

    /// The whole frame: length header and JSON.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let body = self.to_json();
        if body.len() > MAX_FRAME_LEN {
            return Err(ProtocolError::FrameTooLarge(body.len()));
        }
        let mut out = Vec::with_capacity(body.len() + 4);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decodes the JSON document of one frame.
    pub fn decode(json: &[u8]) -> Result<Message, ProtocolError> {
        let malformed = |m: &str| ProtocolError::Malformed(m.to_string());
        let doc: Value =
            serde_json::from_slice(json).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
        let obj = doc
            .as_object()
            .ok_or_else(|| malformed("the message is not a JSON object"))?;
        let msg_type = obj
            .get("msg_type")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed("no msg_type string"))?;
        let date_text = obj
            .get("date")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed("no date string"))?;
        let date = Deadline::parse(date_text)
            .ok_or_else(|| ProtocolError::Malformed(format!("invalid date '{date_text}'")))?
            .0;
        let payload = obj.get("payload").unwrap_or(&Value::Null);
        let payload = match msg_type {
            "ctrl" => {
                let p = payload
                    .as_object()
                    .ok_or_else(|| malformed("ctrl payload is not an object"))?;
                let msg = p
                    .get("msg")
                    .and_then(Value::as_str)
                    .ok_or_else(|| malformed("ctrl payload has no msg string"))?;
                let severity = match p.get("severity") {
                    None | Some(Value::Null) => Severity::Info,
                    Some(v) => v
                        .as_i64()
                        .and_then(Severity::from_i64)
                        .ok_or_else(|| ProtocolError::Malformed(format!("invalid severity {v}")))?,
                };
                let tag = p
                    .get("tag")
                    .and_then(Value::as_u64)
                    .and_then(|t| u32::try_from(t).ok())
                    .filter(|t| tag::ALL.contains(t))
                    .unwrap_or(tag::NO_TAG);
                let metadata = p
                    .get("metadata")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                Payload::Control(ControlMessage {
                    msg: msg.to_string(),
                    severity,
                    tag,
                    metadata,
                })
            }
            "job_io" => {
                let text = payload
                    .as_str()
                    .ok_or_else(|| malformed("job_io payload is not a string"))?;
                Payload::JobIo(base85::decode(text)?)
            }
            "session_end" => {
                let p = payload
                    .as_object()
                    .ok_or_else(|| malformed("session_end payload is not an object"))?;
                let status = p
                    .get("status")
                    .and_then(Value::as_str)
                    .map(JobStatus::from_name)
                    .unwrap_or(JobStatus::Unknown);
                let joules_consumed = p.get("joules_consumed").and_then(Value::as_f64);
                let job_bucket = match p.get("job_bucket") {
                    None | Some(Value::Null) => None,
                    Some(b) => Some(serde_json::from_value(b.clone()).map_err(|e| {
                        ProtocolError::Malformed(format!("invalid job_bucket: {e}"))
                    })?),
                };
                Payload::SessionEnd(SessionEnd {
                    status,
                    joules_consumed,
                    job_bucket,
                })
            }
            other => return Err(ProtocolError::UnknownType(other.to_string())),
        };
        Ok(Message { date, payload })
    }
}

/// The reference's control text: `+<seconds since job start, 3 decimals>s:
/// <text>` followed by a newline (added when missing).
pub fn control_text(since_job_start: std::time::Duration, text: &str) -> String {
    let nl = if text.ends_with('\n') { "" } else { "\n" };
    format!("+{:.3}s: {text}{nl}", since_job_start.as_secs_f64())
}

/// `datetime.isoformat()` of an aware UTC datetime: microseconds only when
/// non-zero, `+00:00` suffix.
fn python_isoformat(d: &DateTime<Utc>) -> String {
    let micros = d.nanosecond() / 1000 % 1_000_000;
    if micros == 0 {
        d.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
    } else {
        format!("{}.{micros:06}+00:00", d.format("%Y-%m-%dT%H:%M:%S"))
    }
}

/// Serialises like Python's `json.dumps` defaults.
fn python_json(v: &Value) -> Vec<u8> {
    struct PyFormatter;
    impl serde_json::ser::Formatter for PyFormatter {
        fn begin_array_value<W: ?Sized + io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_key<W: ?Sized + io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
            w.write_all(b": ")
        }
        fn write_string_fragment<W: ?Sized + io::Write>(
            &mut self,
            w: &mut W,
            fragment: &str,
        ) -> io::Result<()> {
            for c in fragment.chars() {
                if c.is_ascii() {
                    w.write_all(&[c as u8])?;
                } else {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        write!(w, "\\u{u:04x}")?;
                    }
                }
            }
            Ok(())
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter);
    // Serialising a `Value` into a Vec cannot fail.
    let _ = v.serialize(&mut ser);
    out
}

/// A sans-I/O frame decoder: push bytes as they arrive, pop messages.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame's JSON, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME_LEN {
            return Err(ProtocolError::FrameTooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(frame))
    }

    /// The next complete message, if one is buffered. A recoverable error
    /// (see [`ProtocolError::is_recoverable`]) consumed its frame.
    pub fn next_message(&mut self) -> Result<Option<Message>, ProtocolError> {
        match self.next_frame()? {
            Some(f) => Message::decode(&f).map(Some),
            None => Ok(None),
        }
    }

    /// Call at end of stream: an error if a partial frame is buffered.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Truncated)
        }
    }
}

/// Reads one frame's JSON; `Ok(None)` on a clean end of stream (between
/// frames).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, ProtocolError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ProtocolError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge(len));
    }
    let mut body = vec![0u8; len];
    match r.read_exact(&mut body).await {
        Ok(_) => Ok(Some(body)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ProtocolError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Reads and decodes one message; `Ok(None)` on a clean end of stream.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<Message>, ProtocolError> {
    match read_frame(r).await? {
        Some(f) => Message::decode(&f).map(Some),
        None => Ok(None),
    }
}

/// Encodes and writes one message (and flushes).
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
) -> Result<(), ProtocolError> {
    w.write_all(&msg.encode()?).await?;
    w.flush().await?;
    Ok(())
}

/// `callback` of the submission metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Callback {
    /// Host the executor connects to; defaults to the HTTP peer address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Port the client listens on.
    pub port: u16,
}

/// MinIO credentials of the submitter. `Debug` masks the secret key.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinioCredentials {
    /// Access key.
    pub access_key: String,
    /// Secret key.
    pub secret_key: String,
}

impl std::fmt::Debug for MinioCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MinioCredentials")
            .field("access_key", &self.access_key)
            .field("secret_key", &"<masked>")
            .finish()
    }
}

/// `minio` of the submission metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinioRequest {
    /// Credentials with access to every group (sent as `{}` when none).
    #[serde(default, with = "optional_credentials")]
    pub credentials: Option<MinioCredentials>,
    /// Groups the job's MinIO user joins.
    #[serde(default, deserialize_with = "null_as_default")]
    pub groups: Vec<String>,
}

mod optional_credentials {
    use super::MinioCredentials;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::{Map, Value};

    pub fn serialize<S: Serializer>(c: &Option<MinioCredentials>, s: S) -> Result<S::Ok, S::Error> {
        match c {
            Some(c) => c.serialize(s),
            None => Map::<String, Value>::new().serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<MinioCredentials>, D::Error> {
        match Option::<Map<String, Value>>::deserialize(d)? {
            None => Ok(None),
            Some(m) if m.is_empty() => Ok(None),
            Some(m) => serde_json::from_value(Value::Object(m))
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `target` of the submission metadata (overrides the job's target).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetOverride {
    /// DUT id.
    #[serde(default)]
    pub id: Option<String>,
    /// DUT tags.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
}

impl TargetOverride {
    /// As a job target.
    pub fn to_target(&self) -> Target {
        Target {
            id: self.id.clone().filter(|s| !s.is_empty()),
            tags: self.tags.clone().unwrap_or_default(),
        }
    }
}

/// The `metadata` part of a version-1 submission (EX C.1). Unknown keys are
/// ignored, so newer clients keep working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmissionMetadata {
    /// Protocol version (1).
    pub version: u32,
    /// The submitter's job id; defaults to `untitled-<unix ts>`.
    #[serde(default)]
    pub job_id: Option<String>,
    /// Where to connect back.
    pub callback: Callback,
    /// Overrides the job's target when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetOverride>,
    /// MinIO credentials and groups.
    #[serde(default)]
    pub minio: MinioRequest,
    /// Environment forwarded by the client (V2025).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub environ: BTreeMap<String, String>,
    /// Cookie of a job source (V2025).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_cookie: Option<String>,
    /// URL of the job text instead of a `job` part (V2025).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_desc_url: Option<String>,
}

impl SubmissionMetadata {
    /// Minimal metadata for a client listening on `port`.
    pub fn new(port: u16) -> Self {
        SubmissionMetadata {
            version: 1,
            job_id: None,
            callback: Callback { host: None, port },
            target: None,
            minio: MinioRequest::default(),
            environ: BTreeMap::new(),
            job_cookie: None,
            job_desc_url: None,
        }
    }

    /// Parses the metadata part; the error says what is wrong.
    pub fn from_json(data: &[u8]) -> Result<Self, String> {
        let meta: SubmissionMetadata =
            serde_json::from_slice(data).map_err(|e| format!("invalid metadata: {e}"))?;
        if meta.version != 1 {
            return Err(format!("Invalid request version {}", meta.version));
        }
        Ok(meta)
    }

    /// The target of the submission: the metadata's when present (it
    /// overrides the job's entirely), else the job's.
    pub fn effective_target(&self, job: &crate::job::Job) -> Target {
        match &self.target {
            Some(t) => t.to_target(),
            None => job.target.clone(),
        }
    }

    /// The job id, or `untitled-<unix ts>` at `now`.
    pub fn job_id_or_default(&self, now: DateTime<Utc>) -> String {
        self.job_id
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("untitled-{}", now.timestamp()))
    }
}

/// The message of a refused submission, read as the reference client does
/// (`error`, else `error_msg`, else `reason`); the raw body when it is not
/// such JSON.
pub fn submission_error_message(body: &[u8]) -> String {
    if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(body) {
        for key in ["error", "error_msg", "reason"] {
            match m.get(key) {
                Some(Value::String(s)) => return s.clone(),
                Some(Value::Null) | None => {}
                Some(v) => return v.to_string(),
            }
        }
    }
    let text = String::from_utf8_lossy(body).trim().to_string();
    if text.is_empty() {
        "(empty response)".to_string()
    } else {
        text
    }
}

/// Base85 with Python's `base64.b85encode` alphabet (RFC 1924 / git), as
/// used by `job_io` payloads.
pub mod base85 {
    /// The 85 symbols, by value.
    pub const ALPHABET: &[u8; 85] =
        b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~";

    /// Invalid base85 text.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum Base85Error {
        /// A character outside the alphabet.
        #[error("bad base85 character at position {0}")]
        BadCharacter(usize),
        /// A group of five characters worth more than 2^32 - 1.
        #[error("base85 overflow in hunk starting at byte {0}")]
        Overflow(usize),
    }

    const INVALID: u8 = 0xff;

    const fn decode_table() -> [u8; 256] {
        let mut t = [INVALID; 256];
        let mut i = 0;
        while i < 85 {
            t[ALPHABET[i] as usize] = i as u8;
            i += 1;
        }
        t
    }
    static DECODE: [u8; 256] = decode_table();

    /// Encodes like `base64.b85encode(data)` (no padding).
    pub fn encode(data: &[u8]) -> String {
        let mut out = Vec::with_capacity(data.len().div_ceil(4) * 5);
        for chunk in data.chunks(4) {
            let mut word = [0u8; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            let mut v = u32::from_be_bytes(word);
            let mut digits = [0u8; 5];
            for d in digits.iter_mut().rev() {
                *d = ALPHABET[(v % 85) as usize];
                v /= 85;
            }
            out.extend_from_slice(&digits[..chunk.len() + 1]);
        }
        // Only ASCII symbols were pushed.
        String::from_utf8(out).unwrap_or_default()
    }

    /// Decodes like `base64.b85decode(text)`, with the same error cases.
    pub fn decode(text: &str) -> Result<Vec<u8>, Base85Error> {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len() / 5 * 4 + 4);
        for (n, chunk) in bytes.chunks(5).enumerate() {
            let start = n * 5;
            let mut acc: u64 = 0;
            for k in 0..5 {
                let v = match chunk.get(k) {
                    Some(&c) => match DECODE[c as usize] {
                        INVALID => return Err(Base85Error::BadCharacter(start + k)),
                        v => v,
                    },
                    None => 84,
                };
                acc = acc * 85 + v as u64;
            }
            let word = u32::try_from(acc).map_err(|_| Base85Error::Overflow(start))?;
            let keep = if chunk.len() == 5 {
                4
            } else {
                chunk.len().saturating_sub(1)
            };
            out.extend_from_slice(&word.to_be_bytes()[..keep]);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_masks_the_submitters_secret() {
        let c = MinioCredentials {
            access_key: "SUBMITTER".into(),
            secret_key: "submitter-secret".into(),
        };
        let dbg = format!(
            "{:?}",
            MinioRequest {
                credentials: Some(c.clone()),
                ..Default::default()
            }
        );
        assert!(dbg.contains("SUBMITTER"));
        assert!(!dbg.contains("submitter-secret"), "{dbg}");
        // The wire form keeps it.
        assert!(serde_json::to_string(&c)
            .unwrap()
            .contains("submitter-secret"));
    }

    #[test]
    fn reference_test_vector() {
        let vector: &[u8] =
            b"\x00\x00\x00\x59{\"msg_type\": \"session_end\", \"date\": \"1970-01-01T00:00:00\", \"payload\": {\"status\": \"PASS\"}}";
        let mut d = FrameDecoder::new();
        d.push(&vector[..10]);
        assert!(d.next_message().unwrap().is_none());
        assert!(matches!(d.finish(), Err(ProtocolError::Truncated)));
        d.push(&vector[10..]);
        let m = d.next_message().unwrap().unwrap();
        assert_eq!(m.date, DateTime::<Utc>::UNIX_EPOCH);
        assert_eq!(
            m.payload,
            Payload::SessionEnd(SessionEnd {
                status: JobStatus::Pass,
                joules_consumed: None,
                job_bucket: None
            })
        );
        d.finish().unwrap();
    }

    #[test]
    fn encoding_is_python_like() {
        let mut m = Message::control("+1.000s: héllo \u{1F600}\n", Severity::Warn);
        m.date = DateTime::<Utc>::UNIX_EPOCH;
        assert_eq!(
            String::from_utf8(m.to_json()).unwrap(),
            r#"{"msg_type": "ctrl", "date": "1970-01-01T00:00:00+00:00", "payload": {"msg": "+1.000s: h\u00e9llo \ud83d\ude00\n", "severity": 2, "tag": 0, "metadata": {}}}"#
        );
        let frame = m.encode().unwrap();
        assert_eq!(Message::decode(&frame[4..]).unwrap(), m);
    }

    #[test]
    fn hostile_frames_are_errors() {
        let mut d = FrameDecoder::new();
        d.push(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            d.next_frame(),
            Err(ProtocolError::FrameTooLarge(_))
        ));
        for bad in [&b"not json"[..], b"[]", b"{}", b"{\"msg_type\": \"ctrl\", \"date\": \"x\"}",
            b"{\"msg_type\": \"job_io\", \"date\": \"1970-01-01\", \"payload\": \"\\u00ff\"}",
            b"{\"msg_type\": \"ctrl\", \"date\": \"1970-01-01\", \"payload\": {\"msg\": \"a\", \"severity\": 9}}"] {
            let e = Message::decode(bad).unwrap_err();
            assert!(e.is_recoverable(), "{e}");
        }
        let e =
            Message::decode(b"{\"msg_type\": \"hello\", \"date\": \"1970-01-01\"}").unwrap_err();
        assert!(matches!(e, ProtocolError::UnknownType(ref t) if t == "hello"));
    }

    #[test]
    fn control_texts() {
        let d = std::time::Duration::from_millis(12_345);
        assert_eq!(
            control_text(d, "Boot the machine"),
            "+12.345s: Boot the machine\n"
        );
        assert_eq!(control_text(d, "x\n"), "+12.345s: x\n");
    }

    #[test]
    fn base85_edges() {
        assert_eq!(base85::encode(b""), "");
        assert_eq!(base85::decode("").unwrap(), b"");
        assert_eq!(base85::encode(b"\x00"), "00");
        assert_eq!(
            base85::decode("~").unwrap_err(),
            base85::Base85Error::Overflow(0)
        );
        assert_eq!(
            base85::decode("0000\"").unwrap_err(),
            base85::Base85Error::BadCharacter(4)
        );
        for n in 0..40u8 {
            let data: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37).wrapping_add(n)).collect();
            assert_eq!(base85::decode(&base85::encode(&data)).unwrap(), data);
        }
    }
}

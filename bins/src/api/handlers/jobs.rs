//! `POST /api/v1/jobs` (EX A.15, C.1): the multipart submission (version 1)
//! and the deprecated JSON one (version 0), validated here; the DUT
//! selection and the hand-over to the job engine are the farm's.

use bytes::Bytes;
use serde_json::{json, Value};
use warp::http::StatusCode;
use warp::reply::Response;

use vivian_core::farm::{JobSubmission, JobTarget};
use vivian_core::job::{Job, ParseOptions, TemplateVars};
use vivian_core::protocol::{
    SubmissionMetadata, MIME_JOB, MIME_METADATA, PART_JOB, PART_METADATA, PART_TARBALL,
};

use super::super::body::{media_type, read_limited, BodyStream};
use super::{job_error, json_response, ApiError, Inner, Request};

/// Size limit of a whole submission (the tarball makes most of it).
pub const JOB_BODY_LIMIT: u64 = 256 * 1024 * 1024;
/// Size limit of the metadata part.
pub const METADATA_LIMIT: u64 = 64 * 1024;
/// Size limit of the job description.
pub const JOB_TEXT_LIMIT: u64 = 1024 * 1024;

struct Parts {
    metadata: Option<Bytes>,
    job: Option<Bytes>,
    tarball: Option<Bytes>,
}

fn multer_error(e: multer::Error) -> ApiError {
    match e {
        multer::Error::StreamSizeExceeded { limit } => ApiError::payload_too_large(limit as usize),
        multer::Error::FieldSizeExceeded { limit, field_name } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "The part '{}' is larger than the limit of {limit} bytes",
                field_name.unwrap_or_default()
            ),
        ),
        e => ApiError::bad_request(format!("Invalid multipart body: {e}")),
    }
}

fn check_part_type(name: &str, got: Option<&str>, accepted: &[&str]) -> Result<(), ApiError> {
    let got = got.unwrap_or("");
    let mt = media_type(got);
    if accepted.contains(&mt.as_str()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "The part '{name}' has the content type '{got}': expected {}",
                accepted.join(" or ")
            ),
        ))
    }
}

async fn read_parts(boundary: String, body: BodyStream) -> Result<Parts, ApiError> {
    let constraints = multer::Constraints::new()
        .allowed_fields(vec![PART_METADATA, PART_JOB, PART_TARBALL])
        .size_limit(
            multer::SizeLimit::new()
                .whole_stream(JOB_BODY_LIMIT)
                .for_field(PART_METADATA, METADATA_LIMIT)
                .for_field(PART_JOB, JOB_TEXT_LIMIT),
        );
    let mut mp = multer::Multipart::with_constraints(body, boundary, constraints);
    let mut parts = Parts {
        metadata: None,
        job: None,
        tarball: None,
    };
    loop {
        let field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(multer::Error::UnknownField { field_name }) => {
                return Err(ApiError::bad_request(format!(
                    "Unknown part '{}' (expected {PART_METADATA}, {PART_JOB}, {PART_TARBALL})",
                    field_name.unwrap_or_default()
                )))
            }
            Err(e) => return Err(multer_error(e)),
        };
        let name = field.name().unwrap_or("").to_string();
        let ct = field.content_type().map(|m| m.to_string());
        let slot = match name.as_str() {
            PART_METADATA => {
                check_part_type(&name, ct.as_deref(), &[MIME_METADATA])?;
                &mut parts.metadata
            }
            PART_JOB => {
                check_part_type(
                    &name,
                    ct.as_deref(),
                    &[MIME_JOB, "application/yaml", "text/yaml", "text/x-yaml"],
                )?;
                &mut parts.job
            }
            _ => &mut parts.tarball,
        };
        if slot.is_some() {
            return Err(ApiError::bad_request(format!(
                "The part '{name}' is given twice"
            )));
        }
        let data = field.bytes().await.map_err(multer_error)?;
        *slot = Some(data);
    }
    Ok(parts)
}

/// Whether `data` starts like a tar archive, compressed or not.
fn looks_like_tarball(data: &[u8]) -> bool {
    const MAGICS: &[&[u8]] = &[
        b"\x1f\x8b",         // gzip
        b"\xfd7zXZ\x00",     // xz
        b"\x28\xb5\x2f\xfd", // zstd
        b"BZh",              // bzip2
        b"\x5d\x00\x00",     // lzma
    ];
    MAGICS.iter().any(|m| data.starts_with(m)) || (data.len() >= 262 && &data[257..262] == b"ustar")
}

fn parse_job(inner: &Inner, text: &str) -> Result<Job, ApiError> {
    let mut vars = TemplateVars::for_submission(&inner.minio_url);
    vars.add_vars(&inner.job_env);
    Job::from_template(text, &vars, &ParseOptions::from_env())
        .map_err(|e| ApiError::bad_request(format!("Invalid job description: {e}")))
}

fn check_deadline(job: &Job) -> Result<(), ApiError> {
    if let Some(d) = &job.deadline {
        if d.is_past(chrono::Utc::now()) {
            return Err(ApiError::bad_request(format!(
                "The job's deadline ({}) has passed",
                d.0.to_rfc3339()
            )));
        }
    }
    Ok(())
}

pub(crate) async fn submit(inner: &Inner, req: Request) -> Result<Response, ApiError> {
    let ct = req.content_type.clone().unwrap_or_default();
    let mt = media_type(&ct);
    let res = if mt == "multipart/form-data" {
        submit_v1(inner, req, &ct).await
    } else if mt == "application/json" {
        return Ok(match submit_v0(inner, req).await {
            Ok(r) => r,
            Err(e) => {
                let body = json!({"error": e.message, "reason": e.message});
                let mut r = json_response(Bytes::from(body.to_string()));
                *r.status_mut() = e.status;
                r
            }
        });
    } else {
        Err(ApiError::unsupported_media_type(
            &ct,
            "multipart/form-data (or application/json for the deprecated version 0)",
        ))
    };
    Ok(res.unwrap_or_else(job_error))
}

async fn submit_v1(inner: &Inner, req: Request, ct: &str) -> Result<Response, ApiError> {
    let boundary = multer::parse_boundary(ct).map_err(|e| {
        ApiError::bad_request(format!("Invalid multipart content type '{ct}': {e}"))
    })?;
    let parts = read_parts(boundary, req.body).await?;
    let metadata = parts
        .metadata
        .ok_or_else(|| ApiError::bad_request("The part 'metadata' is missing"))?;
    let meta = SubmissionMetadata::from_json(&metadata).map_err(ApiError::bad_request)?;
    if meta.job_desc_url.is_some() {
        return Err(ApiError::bad_request(
            "'job_desc_url' is not supported: send the job description as the 'job' part",
        ));
    }
    let job_text = parts
        .job
        .ok_or_else(|| ApiError::bad_request("The part 'job' is missing"))?;
    let job_text = String::from_utf8(job_text.to_vec())
        .map_err(|_| ApiError::bad_request("The part 'job' is not UTF-8 text"))?;
    if let Some(t) = &parts.tarball {
        if !looks_like_tarball(t) {
            return Err(ApiError::bad_request("Invalid tarball file"));
        }
    }
    let job = parse_job(inner, &job_text)?;
    check_deadline(&job)?;
    let target = match &meta.target {
        Some(t) => t.to_target(),
        None => job.target.clone(),
    };
    let callback_host = meta
        .callback
        .host
        .clone()
        .filter(|h| !h.is_empty())
        .or_else(|| req.remote.map(|a| a.ip().to_string()))
        .ok_or_else(|| {
            ApiError::bad_request("callback.host is missing and the peer address is unknown")
        })?;
    let job_id = meta.job_id_or_default(chrono::Utc::now());
    let submission = JobSubmission {
        version: 1,
        job_id: job_id.clone(),
        callback_host,
        callback_port: meta.callback.port,
        target: JobTarget {
            id: target.id,
            tags: target.tags,
        },
        job_text,
        tarball: parts.tarball.map(|b| b.to_vec()),
        minio: serde_json::to_value(&meta.minio).ok(),
        environ: meta.environ.clone(),
    };
    let dut = inner.farm.submit_job(submission).await?;
    let body =
        json!({"version": 1, "error_msg": Value::Null, "job_id": job_id, "dut": dut.to_string()});
    Ok(json_response(Bytes::from(body.to_string())))
}

async fn submit_v0(inner: &Inner, req: Request) -> Result<Response, ApiError> {
    let raw = read_limited(req.body, JOB_TEXT_LIMIT as usize + METADATA_LIMIT as usize).await?;
    let obj = super::super::body::parse_json_object(&raw)?;
    for k in obj.keys() {
        if k != "metadata" && k != "job" {
            return Err(ApiError::bad_request(format!(
                "The field '{k}' is invalid (version 0 has metadata and job)"
            )));
        }
    }
    let meta = obj
        .get("metadata")
        .and_then(Value::as_object)
        .ok_or_else(|| ApiError::bad_request("The field 'metadata' must be an object"))?;
    let port = meta
        .get("callback_port")
        .and_then(Value::as_u64)
        .filter(|p| *p > 0 && *p <= u16::MAX as u64)
        .ok_or_else(|| ApiError::bad_request("metadata.callback_port must be a port number"))?;
    let host = match meta.get("callback_host") {
        None | Some(Value::Null) => req.remote.map(|a| a.ip().to_string()),
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(ApiError::bad_request(
                "metadata.callback_host must be a string",
            ))
        }
    }
    .ok_or_else(|| ApiError::bad_request("metadata.callback_host is missing"))?;
    let job_text = obj
        .get("job")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("The field 'job' must be a string"))?
        .to_string();
    let job = parse_job(inner, &job_text)?;
    check_deadline(&job)?;
    let job_id = format!("untitled-{}", chrono::Utc::now().timestamp());
    let submission = JobSubmission {
        version: 0,
        job_id,
        callback_host: host,
        callback_port: port as u16,
        target: JobTarget {
            id: job.target.id.clone(),
            tags: job.target.tags.clone(),
        },
        job_text,
        ..JobSubmission::default()
    };
    inner.farm.submit_job(submission).await?;
    Ok(json_response(Bytes::from_static(b"{\"reason\":null}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tarball_magic() {
        assert!(looks_like_tarball(b"\x1f\x8b\x08rest"));
        let mut tar = vec![0u8; 512];
        tar[257..262].copy_from_slice(b"ustar");
        assert!(looks_like_tarball(&tar));
        assert!(!looks_like_tarball(b"hello world"));
    }
}
